//! Policies as wasm components, run by wasmtime under limits.
//!
//! One file per concern:
//! - here, [`Runtime`]: the one shared `Engine` (Winch by default), its epoch
//!   ticker, the two linkers (the contract's `log` alone; `log` plus a
//!   deny-all WASI) and [`Runtime::load`]: read, compile (or take from the
//!   [`Cache`]), check, pre-instantiate, try the parameters;
//! - `contract.rs`: what a component must export and may import, and the
//!   errors that name the file and the problem ([`LoadError`]);
//! - `versions.rs`: the contract versions linked ([`Version`]: 0.1.0,
//!   0.2.0, 0.3.0), each by its own bindings, and one way to call any;
//! - `instance.rs`: [`Loaded`] and [`WasmPolicy`], limits per call, restarts;
//! - `host.rs`: the per-instance host state: memory cap, `log`, clock;
//! - `log.rs`: a guest's log (its `log` import, stdout, stderr), rate-limited;
//! - `wasi.rs`: the WASI 0.2 that grants nothing, for language runtimes;
//! - `cache.rs`: compiled components on disk.
//!
//! Compiling happens off the data path, so swapping is a pointer move.
//! Limits: every entry into the guest re-arms an epoch deadline (the ticker
//! advances the epoch every [`TICK`]; deadlines are sticky on a `Store`, so a
//! call made without re-arming would inherit a stale one), and a
//! `ResourceLimiter` caps linear memory.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker};
use wasmtime::Engine;

mod cache;
mod contract;
mod host;
mod instance;
mod log;
mod versions;
mod wasi;

pub use cache::{Cache, Origin};
pub use contract::LoadError;
pub use instance::{Loaded, WasmPolicy};
pub use versions::Version;

use host::HostState;
use instance::{LoadedInner, StartError};

/// How often the epoch advances: the granularity of every time budget.
pub const TICK: Duration = Duration::from_millis(2);

/// What a policy may spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall time for one `choose`.
    pub call: Duration,
    /// Wall time for starting an instance, `configure` and `set-gateways`
    /// (table rebuilds).
    pub setup: Duration,
    /// Linear memory, in bytes.
    pub memory: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            call: Duration::from_millis(20),
            setup: Duration::from_millis(500),
            memory: 32 << 20,
        }
    }
}

/// How one load went, for `policy check` and the logs.
#[derive(Debug, Clone, Copy)]
pub struct LoadTimes {
    /// Compile, or deserialize from the cache.
    pub compile: Duration,
    pub origin: Origin,
    /// Instantiate + `configure`, once.
    pub start: Duration,
}

/// The shared wasmtime engine, its linkers, its cache and the thread that
/// advances its epoch.
pub struct Runtime {
    engine: Engine,
    compiler: Compiler,
    /// For components that import only the contract's interfaces (every
    /// version's `log`, and `load`).
    plain: Arc<Linker<HostState>>,
    /// For components that also import WASI 0.2: linked deny-all.
    wasi: Arc<Linker<HostState>>,
    cache: Option<Cache>,
    stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

/// Which of wasmtime's compilers turns a policy into machine code.
///
/// Measured here on the shipped policies (23–49 KB components), on a busy
/// 2-core machine: Winch compiles them in 12–20 ms, Cranelift in 60–92 ms;
/// a decision costs the same within noise (190–440 ns either way: the call
/// across the component boundary dominates, not the policy's code). A hot
/// swap is mostly compile time, so Winch is the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compiler {
    /// The single-pass baseline compiler: fast to compile.
    #[default]
    Winch,
    /// The optimising compiler: for heavy policies whose own code matters.
    Cranelift,
}

impl std::str::FromStr for Compiler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "winch" => Ok(Compiler::Winch),
            "cranelift" => Ok(Compiler::Cranelift),
            other => Err(format!("`{other}`: the compiler is `winch` or `cranelift`")),
        }
    }
}

impl Runtime {
    /// A runtime with the default compiler and the default cache directory.
    pub fn new() -> Result<Self, String> {
        Self::with_compiler(Compiler::default())
    }

    /// A runtime compiling policies with `compiler` (Cranelift where Winch
    /// has no backend for this machine; [`Runtime::compiler`] says), caching
    /// compiled policies in [`Cache::default_dir`].
    pub fn with_compiler(mut compiler: Compiler) -> Result<Self, String> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true).wasm_component_model(true);
        // Data segments are copied into each instance, not mapped from a
        // sealed memfd: sealing fails now and then under memory pressure
        // (the kernel's F_SEAL_WRITE waits ~150 ms for pinned pages, then
        // gives up with EBUSY), and a policy then could not start. We start
        // an instance at load, for the spare and after a failure, all off
        // the data path, so the copy-on-write start bought little.
        config.memory_init_cow(false);
        let engine = match compiler {
            Compiler::Winch => {
                config.strategy(wasmtime::Strategy::Winch);
                Engine::new(&config).or_else(|e| {
                    // Winch has backends for x86_64 and aarch64 only.
                    tracing::warn!(
                        "winch unavailable here ({e:#}); compiling policies with cranelift"
                    );
                    compiler = Compiler::Cranelift;
                    config.strategy(wasmtime::Strategy::Cranelift);
                    Engine::new(&config)
                })
            }
            Compiler::Cranelift => {
                config.strategy(wasmtime::Strategy::Cranelift);
                Engine::new(&config)
            }
        }
        .map_err(|e| format!("cannot start wasmtime: {e:#}"))?;
        let link = |with_wasi: bool| -> wasmtime::Result<Linker<HostState>> {
            let mut linker = Linker::new(&engine);
            versions::add_to_linker(&mut linker)?;
            if with_wasi {
                wasi::add_to_linker(&mut linker)?;
            }
            Ok(linker)
        };
        let plain = link(false).map_err(|e| format!("cannot link the host's imports: {e:#}"))?;
        let with_wasi = link(true).map_err(|e| format!("cannot link WASI: {e:#}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (engine, stop) = (engine.clone(), stop.clone());
            std::thread::Builder::new()
                .name("segwlb-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| format!("cannot start the epoch thread: {e}"))?
        };
        Ok(Runtime {
            engine,
            compiler,
            plain: Arc::new(plain),
            wasi: Arc::new(with_wasi),
            cache: Cache::default_dir().map(Cache::at),
            stop,
            ticker: Some(ticker),
        })
    }

    /// Keep compiled policies in `cache`, or (`None`) compile every time.
    pub fn set_cache(&mut self, cache: Option<Cache>) {
        self.cache = cache;
    }

    /// The compiler in use.
    pub fn compiler(&self) -> Compiler {
        self.compiler
    }

    /// Read, check, pre-instantiate and configure a policy.
    pub fn load(
        &self,
        path: &Path,
        params: &[(String, String)],
        limits: Limits,
    ) -> Result<Loaded, LoadError> {
        let bytes = std::fs::read(path).map_err(|err| LoadError::Read {
            path: path.into(),
            err,
        })?;
        self.load_bytes(path, &bytes, params, limits)
    }

    /// As [`load`](Self::load), from bytes already read; `path` names them in errors.
    pub fn load_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
        params: &[(String, String)],
        limits: Limits,
    ) -> Result<Loaded, LoadError> {
        self.load_timed(path, bytes, params, limits).map(|(l, _)| l)
    }

    /// As [`load_bytes`](Self::load_bytes), saying where the time went.
    pub fn load_timed(
        &self,
        path: &Path,
        bytes: &[u8],
        params: &[(String, String)],
        limits: Limits,
    ) -> Result<(Loaded, LoadTimes), LoadError> {
        let path = path.to_path_buf();
        if bytes.starts_with(b"\0asm\x01\0\0\0") {
            return Err(LoadError::CoreModule { path });
        }
        let t = Instant::now();
        let compiled = match &self.cache {
            Some(cache) => cache.component(&self.engine, bytes),
            None => Component::new(&self.engine, bytes).map(|c| (c, Origin::Compiled)),
        };
        let (component, origin) = compiled.map_err(|e| LoadError::Invalid {
            path: path.clone(),
            reason: format!("{e:#}"),
        })?;
        let compile = t.elapsed();
        let imports = contract::check(&self.engine, &path, &component)?;
        let linker = if imports.needs_wasi() {
            &self.wasi
        } else {
            &self.plain
        };
        let mismatch = |e: wasmtime::Error| LoadError::Mismatch {
            path: path.clone(),
            reason: format!("{e:#}"),
        };
        let pre = linker.instantiate_pre(&component).map_err(mismatch)?;
        let pre = versions::Pre::new(imports.version, pre).map_err(mismatch)?;
        let name = path
            .file_stem()
            .map_or_else(|| "policy".into(), |s| s.to_string_lossy().into_owned());
        let seed = seed_of(&name, params);
        let log = Arc::new(Mutex::new(log::GuestLog::new(&name)));
        let loaded = Loaded(Arc::new(LoadedInner {
            name,
            path,
            engine: self.engine.clone(),
            pre,
            params: params.to_vec(),
            limits,
            version: imports.version,
            reads_load: imports.reads_load,
            wasi: imports.wasi,
            seed,
            log,
            warm: Mutex::new(None),
        }));
        // Start once now, so bad parameters are a load error, not a
        // fallback storm later; the instance is kept for the first taker.
        let t = Instant::now();
        let live = loaded.start().map_err(|e| match e {
            StartError::Rejected(message) => LoadError::Params {
                path: loaded.path().into(),
                message,
            },
            StartError::Failed(reason) => LoadError::Start {
                path: loaded.path().into(),
                reason,
            },
        })?;
        let start = t.elapsed();
        if let Ok(mut warm) = loaded.0.warm.lock() {
            *warm = Some(live);
        }
        Ok((
            loaded,
            LoadTimes {
                compile,
                origin,
                start,
            },
        ))
    }
}

/// The seed of a policy's deterministic randomness: its name and parameters,
/// so two runs of the same policy see the same bytes.
fn seed_of(name: &str, params: &[(String, String)]) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    for (k, v) in params {
        h.update([0]);
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().unwrap_or_default())
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}
