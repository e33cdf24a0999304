//! A WASI 0.2 that grants nothing, for guests built by language toolchains.
//!
//! componentize-py, componentize-js, TinyGo and wasi-libc produce components
//! that import the WASI 0.2 interfaces whether or not the policy uses them.
//! We link wasmtime-wasi's implementation of them with a context in which
//! every door is shut:
//!
//! - no preopened directory (every `open` fails), no environment, no
//!   arguments, an empty stdin;
//! - no network: TCP, UDP and name lookup are off and every address is
//!   refused;
//! - stdout and stderr go to the log, a line at a time, tagged with the
//!   policy's name and rate-limited with its `log` import ([`GuestLog`]);
//! - random bytes come from a seed the host derives from the policy's name
//!   and parameters, and both clocks read a [`VirtualClock`] that the host
//!   advances by [`VirtualClock::STEP`] before each call into the guest. A
//!   sleep advances that clock and returns at once: it never blocks the
//!   thread (an epoch deadline cannot interrupt a host call, so a real
//!   sleep would stall the data path for as long as the guest asked).
//!
//! So a policy is a deterministic function of its parameters, gateway set
//! and calls in any language, as the contract requires, and `compare` with a
//! Python policy is byte-identical for the same seed.
//!
//! Components that import only `segwlb:policy/log` are linked without any
//! of this ([`super::Runtime`] keeps two linkers).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime::StoreContextMut;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{
    Deterministic, HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView,
};

use super::log::GuestLog;

/// What the WASI shims need of an instance's store data.
pub trait WasiHost: 'static {
    fn clock(&self) -> &VirtualClock;
    fn wasi_table(&mut self) -> &mut ResourceTable;
}

/// The WASI 0.2 packages a policy may import. Each is linked deny-all.
pub const PACKAGES: [&str; 6] = [
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:cli/",
    "wasi:filesystem/",
    "wasi:sockets/",
];

/// The version wasmtime-wasi defines; a guest's `0.2.x` import of any patch
/// release links to it (wasmtime matches 0.2 imports semver-compatibly).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// Is `import` one of the WASI 0.2 interfaces the host links?
pub fn is_wasi_import(import: &str) -> bool {
    PACKAGES.iter().any(|p| import.starts_with(p)) && import.contains("@0.2.")
}

/// WASI resources (streams, pollables, descriptors) one instance may hold at
/// once. They live in host memory, outside the cap on the guest's: at
/// wasmtime's default of 1,000,000 a guest that never drops a sleep's
/// pollable held ~21 MiB of the host's per instance (measured here). A language runtime
/// holds a few dozen.
const MAX_RESOURCES: usize = 4096;

/// What one instance's WASI sees: its context and its resource table.
pub struct Wasi {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl Wasi {
    /// A context that grants nothing; see the module docs.
    pub fn deny_all(seed: u64, clock: &VirtualClock, log: &Arc<Mutex<GuestLog>>) -> Self {
        let mut b = WasiCtx::builder();
        b.stdout(LogOutput {
            log: log.clone(),
            level: tracing::Level::INFO,
        })
        .stderr(LogOutput {
            log: log.clone(),
            level: tracing::Level::WARN,
        })
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }))
        .secure_random(Deterministic::new(random_bytes(seed)))
        .insecure_random(Deterministic::new(random_bytes(!seed)))
        .insecure_random_seed(u128::from(seed) << 64 | u128::from(!seed))
        // A guest asking for megabytes of randomness costs host memory.
        .max_random_size(1 << 20)
        .monotonic_clock(clock.clone())
        .wall_clock(WallClock(clock.clone()));
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        Wasi {
            ctx: b.build(),
            table,
        }
    }

    pub fn view(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// Link the WASI 0.2 interfaces into `linker`, with sleeps that advance
/// the virtual clock instead of blocking.
pub fn add_to_linker<T: WasiHost + WasiView>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |mut cx: StoreContextMut<'_, T>, (ns,): (u64,)| {
            let state = cx.data_mut();
            state.clock().advance(ns);
            Ok((ready(state.wasi_table())?,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |mut cx: StoreContextMut<'_, T>, (when,): (u64,)| {
            let state = cx.data_mut();
            state.clock().advance_to(when);
            Ok((ready(state.wasi_table())?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A pollable that is ready at once: what a sleep returns here.
struct Ready;

#[wasmtime_wasi::async_trait]
impl Pollable for Ready {
    async fn ready(&mut self) {}
}

fn ready(table: &mut ResourceTable) -> wasmtime::Result<Resource<DynPollable>> {
    let r = table.push(Ready)?;
    wasmtime_wasi::p2::subscribe(table, r)
}

/// The guest's time, in nanoseconds: advanced by the host, never read from
/// the machine. Shared by an instance's WASI clocks and the host.
#[derive(Clone, Default)]
pub struct VirtualClock(Arc<AtomicU64>);

impl VirtualClock {
    /// How far the clock moves before each call into the guest, so that a
    /// guest timing itself sees time pass, the same way on every run.
    pub const STEP: Duration = Duration::from_millis(1);

    pub fn tick(&self) {
        self.advance(Self::STEP.as_nanos() as u64);
    }

    pub fn advance(&self, ns: u64) {
        // Saturating: a guest asking to sleep for u64::MAX ns must not wrap
        // the clock back to the start.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_add(ns))
            });
    }

    pub fn advance_to(&self, ns: u64) {
        self.0.fetch_max(ns, Ordering::Relaxed);
    }

    pub fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl HostMonotonicClock for VirtualClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        VirtualClock::now(self)
    }
}

/// The wall clock: a fixed instant (2025-01-01T00:00:00Z) plus virtual time.
struct WallClock(VirtualClock);

impl WallClock {
    const START: Duration = Duration::from_secs(1_735_689_600);
}

impl HostWallClock for WallClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }
    fn now(&self) -> Duration {
        Self::START + Duration::from_nanos(self.0.now())
    }
}

/// 4 KiB of SplitMix64 output from `seed`, which `Deterministic` cycles.
fn random_bytes(seed: u64) -> Vec<u8> {
    let mut state = seed;
    (0..512)
        .flat_map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            segwlb_policy_sdk::hash::mix(state).to_le_bytes()
        })
        .collect()
}

/// Stdout or stderr of a guest: lines to the policy's log.
struct LogOutput {
    log: Arc<Mutex<GuestLog>>,
    level: tracing::Level,
}

impl IsTerminal for LogOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LogStream {
            log: self.log.clone(),
            level: self.level,
            line: Vec::new(),
        })
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only WASI 0.3 guests write through this; none is linked.
        Box::new(tokio::io::sink())
    }
}

/// One open stdout/stderr stream: it accepts every write at once (a guest
/// printing megabytes is never blocked or failed) and passes complete lines
/// to the log, which keeps what its rate allows.
struct LogStream {
    log: Arc<Mutex<GuestLog>>,
    level: tracing::Level,
    line: Vec<u8>,
}

/// Bytes of one stdout line kept before the rest of it is dropped.
const LINE_MAX: usize = 1024;

impl LogStream {
    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end_matches('\r');
        if let Ok(mut log) = self.log.lock() {
            log.emit(self.level, text);
        }
        self.line.clear();
    }
}

impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        for piece in bytes.split_inclusive(|&b| b == b'\n') {
            let (text, ends) = match piece.split_last() {
                Some((b'\n', text)) => (text, true),
                _ => (piece, false),
            };
            let room = LINE_MAX.saturating_sub(self.line.len());
            self.line.extend_from_slice(&text[..text.len().min(room)]);
            if ends {
                self.emit();
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        if !self.line.is_empty() {
            self.emit();
        }
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wasi_0_2_packages_are_wasi_imports() {
        assert!(is_wasi_import("wasi:io/poll@0.2.9"));
        assert!(is_wasi_import("wasi:sockets/tcp@0.2.0"));
        assert!(!is_wasi_import("wasi:http/outgoing-handler@0.2.3"));
        assert!(!is_wasi_import("wasi:io/poll@0.3.0"));
        assert!(!is_wasi_import("segwlb:policy/log@0.1.0"));
        assert!(!is_wasi_import("evil:wasi:io/poll@0.2.9"));
    }

    #[test]
    fn the_virtual_clock_only_moves_forward_and_saturates() {
        let c = VirtualClock::default();
        c.tick();
        assert_eq!(c.now(), 1_000_000);
        c.advance_to(10);
        assert_eq!(c.now(), 1_000_000);
        c.advance(u64::MAX);
        assert_eq!(c.now(), u64::MAX);
    }

    #[test]
    fn random_bytes_depend_on_the_seed_only() {
        assert_eq!(random_bytes(7), random_bytes(7));
        assert_ne!(random_bytes(7), random_bytes(8));
        assert_eq!(random_bytes(7).len(), 4096);
    }

    #[test]
    fn stdout_is_cut_into_bounded_lines() {
        let log = Arc::new(Mutex::new(GuestLog::new("t")));
        let mut s = LogStream {
            log: log.clone(),
            level: tracing::Level::INFO,
            line: Vec::new(),
        };
        s.write(Bytes::from_static(b"one\ntw")).unwrap();
        s.write(Bytes::from(vec![b'o'; 5000])).unwrap();
        assert_eq!(s.line.len(), LINE_MAX, "a line without end is held bounded");
        s.write(Bytes::from_static(b"\nthree")).unwrap();
        s.flush().unwrap();
        assert_eq!(log.lock().unwrap().lines(), 3);
    }
}
