//! What the host keeps per guest instance, and the imports it answers:
//! the memory cap, the `log` import (shared with the guest's stdout and
//! stderr), the virtual clock, and for WASI guests their deny-all WASI.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::{WasiCtxView, WasiView};

use super::bindings::segwlb::policy::{log as wit_log, types as wit};
use super::wasi::{VirtualClock, Wasi};

/// The store data of one instance.
pub struct HostState {
    pub memory_cap: usize,
    /// Set when the cap refused a growth: the trap that follows is then a
    /// memory-cap failure, not a generic one.
    pub memory_denied: bool,
    /// The most linear memory granted so far (the initial image included).
    pub memory_peak: usize,
    pub log: Arc<Mutex<GuestLog>>,
    pub clock: VirtualClock,
    /// Present when the component imports WASI.
    wasi: Option<Wasi>,
    seed: u64,
}

impl HostState {
    pub fn new(policy: &str, memory_cap: usize, wasi: bool, seed: u64) -> Self {
        let log = Arc::new(Mutex::new(GuestLog::new(policy)));
        let clock = VirtualClock::default();
        HostState {
            memory_cap,
            memory_denied: false,
            memory_peak: 0,
            wasi: wasi.then(|| Wasi::deny_all(seed, &clock, &log)),
            log,
            clock,
            seed,
        }
    }

    fn wasi(&mut self) -> &mut Wasi {
        // Only the WASI linker calls in here, and only components that
        // import WASI get it; a context made late grants nothing either.
        let (seed, clock, log) = (self.seed, &self.clock, &self.log);
        self.wasi
            .get_or_insert_with(|| Wasi::deny_all(seed, clock, log))
    }

    pub fn wasi_table(&mut self) -> &mut ResourceTable {
        self.wasi().view().table
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        self.wasi().view()
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
        self.memory_peak = self.memory_peak.max(desired);
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

/// Log lines a policy may emit per second (log import, stdout and stderr
/// together); the rest are counted, not shown.
const LINES_PER_SEC: u32 = 20;
/// Longest log line kept from a policy.
const LINE_MAX: usize = 512;

/// A policy's log: tags lines with its name and keeps a chatty guest from
/// flooding the host's log.
pub struct GuestLog {
    policy: Arc<str>,
    window: Option<Instant>,
    in_window: u32,
    lines: u64,
    shown: u64,
}

impl GuestLog {
    pub fn new(policy: &str) -> Self {
        GuestLog {
            policy: policy.into(),
            window: None,
            in_window: 0,
            lines: 0,
            shown: 0,
        }
    }

    /// Lines the guest wrote, shown or not.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Lines that reached the host's log.
    pub fn shown(&self) -> u64 {
        self.shown
    }

    pub fn emit(&mut self, level: tracing::Level, message: &str) {
        self.lines += 1;
        // The I/O edge: a clock is fine here; it decides only what is shown.
        let now = Instant::now();
        match self.window {
            Some(start) if now.duration_since(start) < Duration::from_secs(1) => {
                self.in_window += 1
            }
            _ => {
                if self.in_window > LINES_PER_SEC {
                    tracing::warn!(
                        policy = &*self.policy,
                        "{} log lines dropped",
                        self.in_window - LINES_PER_SEC
                    );
                }
                self.window = Some(now);
                self.in_window = 1;
            }
        }
        if self.in_window > LINES_PER_SEC {
            return;
        }
        self.shown += 1;
        let mut message = std::borrow::Cow::Borrowed(message);
        if message.len() > LINE_MAX {
            let cut = (0..=LINE_MAX)
                .rev()
                .find(|&i| message.is_char_boundary(i))
                .unwrap_or(0);
            message = format!("{}…", &message[..cut]).into();
        }
        let policy = &*self.policy;
        match level {
            tracing::Level::ERROR => tracing::error!(policy, "{message}"),
            tracing::Level::WARN => tracing::warn!(policy, "{message}"),
            tracing::Level::INFO => tracing::info!(policy, "{message}"),
            _ => tracing::debug!(policy, "{message}"),
        }
    }
}

impl wit_log::Host for HostState {
    fn log(&mut self, level: wit_log::Level, message: String) {
        let level = match level {
            wit_log::Level::Error => tracing::Level::ERROR,
            wit_log::Level::Warn => tracing::Level::WARN,
            wit_log::Level::Info => tracing::Level::INFO,
            wit_log::Level::Debug => tracing::Level::DEBUG,
        };
        if let Ok(mut log) = self.log.lock() {
            log.emit(level, &message);
        }
    }
}

impl wit::Host for HostState {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_rate_and_long_lines_are_cut() {
        let mut log = GuestLog::new("chatty");
        for i in 0..1000 {
            log.emit(
                tracing::Level::INFO,
                &format!("line {i} {}", "é".repeat(400)),
            );
        }
        assert_eq!(log.lines(), 1000);
        // Within one second: the first LINES_PER_SEC, no more.
        assert_eq!(log.shown(), u64::from(LINES_PER_SEC));
    }
}
