//! Policies as wasm components, run by wasmtime under limits.
//!
//! [`Runtime`] owns the one shared `Engine` and its epoch ticker. [`load`]
//! reads a component, checks it against the contract (clear errors naming
//! the file and what is wrong), pre-instantiates it and tries its
//! parameters: a [`Loaded`] policy is known good and cheap to instantiate,
//! so compiling happens off the data path and swapping is a pointer move.
//! [`WasmPolicy`] is one live instance behind the [`Policy`] trait.
//!
//! Limits: every entry into the guest re-arms an epoch deadline (the ticker
//! advances the epoch every [`TICK`]; deadlines are sticky on a `Store`, so a
//! call made without re-arming would inherit a stale one), and a
//! `ResourceLimiter` caps linear memory. After any trap the instance is
//! dropped and the next call starts a fresh one, replaying `configure` and
//! the last gateway set: a policy may lose its state, never the host.
//!
//! [`load`]: Runtime::load

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};

use super::{CallError, Gateway, Opener, Policy, TunnelKey, CONTRACT};

mod bindings {
    wasmtime::component::bindgen!({ world: "policy", path: "../wit" });
}

use bindings::segwlb::policy::{log as wit_log, types as wit};

/// How often the epoch advances: the granularity of every time budget.
pub const TICK: Duration = Duration::from_millis(2);

const EXPORT: &str = "segwlb:policy/balancer@0.1.0";
const EXPORTED_FUNCS: [&str; 3] = ["configure", "set-gateways", "choose"];
const ALLOWED_IMPORTS: [&str; 2] = ["segwlb:policy/log@0.1.0", "segwlb:policy/types@0.1.0"];

/// What a policy may spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall time for one `choose`.
    pub call: Duration,
    /// Wall time for `configure` and `set-gateways` (table rebuilds).
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

/// A policy file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: cannot read the policy: {err}{}", path.display(), build_hint(path))]
    Read { path: PathBuf, err: std::io::Error },
    #[error(
        "{}: is a core wasm module, not a component: componentise it \
         (segwlb's `cargo build` does this for plugins/; or `wasm-tools component new`)",
        path.display()
    )]
    CoreModule { path: PathBuf },
    #[error("{}: not a valid wasm component: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}: does not export `{EXPORT}` (its exports: {found})", path.display())]
    NoBalancer { path: PathBuf, found: String },
    #[error(
        "{}: built against contract {found}; this segwlb speaks {CONTRACT}: \
         rebuild it against wit/policy.wit",
        path.display()
    )]
    WrongVersion { path: PathBuf, found: String },
    #[error("{}: `{EXPORT}` lacks `{missing}` (the contract needs configure, set-gateways, choose)", path.display())]
    MissingExport { path: PathBuf, missing: String },
    #[error("{}: imports `{import}`, but a policy may import only segwlb:policy/log", path.display())]
    ForbiddenImport { path: PathBuf, import: String },
    #[error("{}: does not match {CONTRACT}: {reason}", path.display())]
    Mismatch { path: PathBuf, reason: String },
    #[error("{}: could not start: {reason}", path.display())]
    Start { path: PathBuf, reason: String },
    #[error("{}: rejected its parameters: {message}", path.display())]
    Params { path: PathBuf, message: String },
}

fn build_hint(path: &Path) -> &'static str {
    if path.starts_with("policies") || path.parent().is_some_and(|p| p.ends_with("policies")) {
        " (the shipped policies are built by `cargo build`; see README)"
    } else {
        ""
    }
}

/// The shared wasmtime engine and the thread that advances its epoch.
pub struct Runtime {
    engine: Engine,
    compiler: Compiler,
    linker: Arc<Linker<HostState>>,
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
    /// A runtime with the default compiler.
    pub fn new() -> Result<Self, String> {
        Self::with_compiler(Compiler::default())
    }

    /// A runtime compiling policies with `compiler` (Cranelift where Winch
    /// has no backend for this machine; [`Runtime::compiler`] says).
    pub fn with_compiler(mut compiler: Compiler) -> Result<Self, String> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true).wasm_component_model(true);
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
        let mut linker = Linker::new(&engine);
        bindings::Policy::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| format!("cannot link the host's imports: {e:#}"))?;
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
            linker: Arc::new(linker),
            stop,
            ticker: Some(ticker),
        })
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
        let path = path.to_path_buf();
        if bytes.starts_with(b"\0asm\x01\0\0\0") {
            return Err(LoadError::CoreModule { path });
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| LoadError::Invalid {
            path: path.clone(),
            reason: format!("{e:#}"),
        })?;
        self.check_contract(&path, &component)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Mismatch {
                path: path.clone(),
                reason: format!("{e:#}"),
            })?;
        let pre = bindings::PolicyPre::new(pre).map_err(|e| LoadError::Mismatch {
            path: path.clone(),
            reason: format!("{e:#}"),
        })?;
        let name = path
            .file_stem()
            .map_or_else(|| "policy".into(), |s| s.to_string_lossy().into_owned());
        let loaded = Loaded(Arc::new(LoadedInner {
            name,
            path,
            engine: self.engine.clone(),
            pre,
            params: params.to_vec(),
            limits,
        }));
        // Configure once now, so bad parameters are a load error, not a
        // fallback storm later.
        loaded.start().map_err(|e| match e {
            StartError::Rejected(message) => LoadError::Params {
                path: loaded.0.path.clone(),
                message,
            },
            StartError::Failed(reason) => LoadError::Start {
                path: loaded.0.path.clone(),
                reason,
            },
        })?;
        Ok(loaded)
    }

    /// Names first, so the usual mistakes get a message a person can act
    /// on; the full type check follows in `PolicyPre::new`.
    fn check_contract(&self, path: &Path, component: &Component) -> Result<(), LoadError> {
        let ty = component.component_type();
        let exports: Vec<&str> = ty.exports(&self.engine).map(|(name, _)| name).collect();
        let Some(balancer) = ty.get_export(&self.engine, EXPORT) else {
            let other_version = exports
                .iter()
                .find(|e| e.starts_with("segwlb:policy/balancer@"));
            return Err(match other_version {
                Some(found) => LoadError::WrongVersion {
                    path: path.into(),
                    found: found.replace("/balancer", ""),
                },
                None => LoadError::NoBalancer {
                    path: path.into(),
                    found: if exports.is_empty() {
                        "none".into()
                    } else {
                        exports.join(", ")
                    },
                },
            });
        };
        let ComponentItem::ComponentInstance(instance) = balancer.ty else {
            return Err(LoadError::Mismatch {
                path: path.into(),
                reason: format!("`{EXPORT}` is not an instance"),
            });
        };
        for func in EXPORTED_FUNCS {
            if instance.get_export(&self.engine, func).is_none() {
                return Err(LoadError::MissingExport {
                    path: path.into(),
                    missing: func.into(),
                });
            }
        }
        // After the exports: a component of another contract version also
        // imports that version's types, and the version is the news.
        for (import, _) in ty.imports(&self.engine) {
            if !ALLOWED_IMPORTS.contains(&import) {
                return Err(LoadError::ForbiddenImport {
                    path: path.into(),
                    import: import.into(),
                });
            }
        }
        Ok(())
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}

/// A checked, pre-instantiated policy. Cheap to clone and to send to
/// another thread; [`instantiate`](Self::instantiate) gives a live one.
#[derive(Clone)]
pub struct Loaded(Arc<LoadedInner>);

struct LoadedInner {
    name: String,
    path: PathBuf,
    engine: Engine,
    pre: bindings::PolicyPre<HostState>,
    params: Vec<(String, String)>,
    limits: Limits,
}

enum StartError {
    Rejected(String),
    Failed(String),
}

impl Loaded {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn path(&self) -> &Path {
        &self.0.path
    }

    pub fn limits(&self) -> Limits {
        self.0.limits
    }

    /// A live instance, configured (the gateway set comes with the first
    /// `set_gateways`).
    pub fn instantiate(&self) -> WasmPolicy {
        WasmPolicy {
            loaded: self.clone(),
            live: None,
            gateways: None,
            restarts: 0,
        }
    }

    fn start(&self) -> Result<Live, StartError> {
        let inner = &self.0;
        let state = HostState::new(&inner.name, inner.limits.memory);
        let mut store = Store::new(&inner.engine, state);
        store.limiter(|s| s);
        store.set_epoch_deadline(ticks(inner.limits.setup));
        let bindings = inner
            .pre
            .instantiate(&mut store)
            .map_err(|e| StartError::Failed(format!("{e:#}")))?;
        store.set_epoch_deadline(ticks(inner.limits.setup));
        match bindings
            .segwlb_policy_balancer()
            .call_configure(&mut store, &inner.params)
        {
            Ok(Ok(())) => Ok(Live { store, bindings }),
            Ok(Err(message)) => Err(StartError::Rejected(message)),
            Err(e) => Err(StartError::Failed(
                classify(&store, &e, inner.limits.setup).to_string(),
            )),
        }
    }
}

struct Live {
    store: Store<HostState>,
    bindings: bindings::Policy,
}

/// One running instance of a wasm policy.
pub struct WasmPolicy {
    loaded: Loaded,
    live: Option<Live>,
    /// The last set pushed, replayed into a fresh instance after a trap.
    gateways: Option<Vec<wit::Gateway>>,
    restarts: u64,
}

impl WasmPolicy {
    pub fn loaded(&self) -> &Loaded {
        &self.loaded
    }

    /// Fresh instances started after a failure.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// The live instance, starting (or restarting) one when needed.
    fn live(&mut self) -> Result<&mut Live, CallError> {
        if self.live.is_none() {
            let mut live = self.loaded.start().map_err(|e| match e {
                StartError::Rejected(m) | StartError::Failed(m) => CallError::Unavailable(m),
            })?;
            if let Some(gateways) = &self.gateways {
                let budget = self.loaded.0.limits.setup;
                live.store.set_epoch_deadline(ticks(budget));
                live.bindings
                    .segwlb_policy_balancer()
                    .call_set_gateways(&mut live.store, gateways)
                    .map_err(|e| {
                        CallError::Unavailable(classify(&live.store, &e, budget).to_string())
                    })?;
            }
            self.live = Some(live);
        }
        Ok(self.live.as_mut().expect("started above"))
    }

    /// Run one call into the guest; on failure, drop the instance.
    fn call<R>(
        &mut self,
        budget: Duration,
        f: impl FnOnce(&bindings::Policy, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let live = self.live()?;
        live.store.set_epoch_deadline(ticks(budget));
        match f(&live.bindings, &mut live.store) {
            Ok(r) => Ok(r),
            Err(e) => {
                let err = classify(&live.store, &e, budget);
                self.live = None;
                self.restarts += 1;
                Err(err)
            }
        }
    }
}

impl Policy for WasmPolicy {
    fn name(&self) -> &str {
        self.loaded.name()
    }

    fn set_gateways(&mut self, gateways: &[Gateway]) -> Result<(), CallError> {
        let set: Vec<wit::Gateway> = gateways.iter().map(to_wit_gateway).collect();
        if self.live.is_none() {
            // Starting replays the stored set.
            self.gateways = Some(set);
            return self.live().map(|_| ());
        }
        let budget = self.loaded.0.limits.setup;
        let pushed = self.call(budget, |b, store| {
            b.segwlb_policy_balancer().call_set_gateways(store, &set)
        });
        // Kept either way: after a failure, the fresh instance gets this set.
        self.gateways = Some(set);
        pushed
    }

    fn choose(&mut self, key: &TunnelKey) -> Result<Option<u32>, CallError> {
        let key = to_wit_key(key);
        let budget = self.loaded.0.limits.call;
        self.call(budget, |b, store| {
            b.segwlb_policy_balancer().call_choose(store, key)
        })
    }
}

fn ticks(budget: Duration) -> u64 {
    (budget.as_micros() / TICK.as_micros()) as u64 + 1
}

fn classify(store: &Store<HostState>, err: &wasmtime::Error, budget: Duration) -> CallError {
    if store.data().memory_denied {
        return CallError::MemoryCap(store.data().memory_cap);
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => CallError::Timeout(budget),
        Some(trap) => CallError::Trap(trap.to_string()),
        None => CallError::Trap(format!("{err:#}")),
    }
}

fn to_wit_ip(ip: std::net::IpAddr) -> wit::IpAddress {
    match ip {
        std::net::IpAddr::V4(a) => wit::IpAddress::V4(a.into()),
        std::net::IpAddr::V6(a) => {
            let bits = u128::from(a);
            wit::IpAddress::V6(((bits >> 64) as u64, bits as u64))
        }
    }
}

fn to_wit_key(key: &TunnelKey) -> wit::TunnelKey {
    wit::TunnelKey {
        peer: to_wit_ip(key.peer),
        peer_port: key.peer_port,
        vip: to_wit_ip(key.vip),
        ike_spi: key.ike_spi,
        opened_by: match key.opened_by {
            Opener::Ike => wit::Opener::Ike,
            Opener::NatT => wit::Opener::NatT,
            Opener::Esp => wit::Opener::Esp,
        },
    }
}

fn to_wit_gateway(g: &Gateway) -> wit::Gateway {
    wit::Gateway {
        id: g.id,
        name: g.name.clone(),
        weight: g.weight,
        healthy: g.healthy,
        draining: g.draining,
        tunnels: g.tunnels,
    }
}

/// What the host keeps per instance: limits and the log import's state.
struct HostState {
    policy: Arc<str>,
    memory_cap: usize,
    memory_denied: bool,
    log_window: Option<Instant>,
    log_lines: u32,
}

/// Log lines a policy may emit per second; the rest are counted, not shown.
const LOG_LINES_PER_SEC: u32 = 20;
/// Longest log line kept from a policy.
const LOG_LINE_MAX: usize = 512;

impl HostState {
    fn new(policy: &str, memory_cap: usize) -> Self {
        HostState {
            policy: policy.into(),
            memory_cap,
            memory_denied: false,
            log_window: None,
            log_lines: 0,
        }
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.memory_denied = true;
            wasmtime::bail!(
                "policy memory cap of {} bytes reached (wanted {desired})",
                self.memory_cap
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 65_536)
    }
}

impl wit_log::Host for HostState {
    fn log(&mut self, level: wit_log::Level, mut message: String) {
        // The I/O edge: a clock is fine here, and it keeps a chatty policy
        // from flooding the log.
        let now = Instant::now();
        match self.log_window {
            Some(start) if now.duration_since(start) < Duration::from_secs(1) => {
                self.log_lines += 1
            }
            _ => {
                if self.log_lines > LOG_LINES_PER_SEC {
                    tracing::warn!(
                        policy = &*self.policy,
                        "{} log lines dropped",
                        self.log_lines - LOG_LINES_PER_SEC
                    );
                }
                self.log_window = Some(now);
                self.log_lines = 1;
            }
        }
        if self.log_lines > LOG_LINES_PER_SEC {
            return;
        }
        if message.len() > LOG_LINE_MAX {
            let cut = (0..=LOG_LINE_MAX)
                .rev()
                .find(|&i| message.is_char_boundary(i))
                .unwrap_or(0);
            message.truncate(cut);
            message.push('…');
        }
        let policy = &*self.policy;
        match level {
            wit_log::Level::Error => tracing::error!(policy, "{message}"),
            wit_log::Level::Warn => tracing::warn!(policy, "{message}"),
            wit_log::Level::Info => tracing::info!(policy, "{message}"),
            wit_log::Level::Debug => tracing::debug!(policy, "{message}"),
        }
    }
}

impl wit::Host for HostState {}
