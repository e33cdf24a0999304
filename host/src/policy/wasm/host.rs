//! What the host keeps per guest instance, and the imports it answers:
//! the memory cap, the `log` import (shared with the guest's stdout and
//! stderr), the virtual clock, and for WASI guests their deny-all WASI.

use std::sync::{Arc, Mutex};

use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::{WasiCtxView, WasiView};

use super::bindings::segwlb::policy::{log as wit_log, types as wit};
use super::log::GuestLog;
use super::wasi::{VirtualClock, Wasi, WasiHost};

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
    /// Made on the first WASI call: only a component that imports WASI
    /// ever has one.
    wasi: Option<Wasi>,
    seed: u64,
}

impl HostState {
    pub fn new(policy: &str, memory_cap: usize, seed: u64) -> Self {
        HostState {
            memory_cap,
            memory_denied: false,
            memory_peak: 0,
            log: Arc::new(Mutex::new(GuestLog::new(policy))),
            clock: VirtualClock::default(),
            wasi: None,
            seed,
        }
    }

    fn wasi(&mut self) -> &mut Wasi {
        let (seed, clock, log) = (self.seed, &self.clock, &self.log);
        self.wasi
            .get_or_insert_with(|| Wasi::deny_all(seed, clock, log))
    }
}

impl WasiHost for HostState {
    fn clock(&self) -> &VirtualClock {
        &self.clock
    }

    fn wasi_table(&mut self) -> &mut ResourceTable {
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
