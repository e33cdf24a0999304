//! What the host keeps per guest instance: the memory cap, the log (the
//! `log` import's, shared with the guest's stdout and stderr), the live load
//! `load` reads, the virtual clock, and for WASI guests their deny-all WASI.
//! (The contract's imports themselves are answered in `versions.rs`.)

use std::sync::{Arc, Mutex};

use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::{WasiCtxView, WasiView};

use super::log::GuestLog;
use super::wasi::{VirtualClock, Wasi, WasiHost};
use crate::policy::Load;

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
    /// The live load, copied in before each `choose` of a component that
    /// imports `load` (contract 0.2.0 on).
    pub load: Load,
    /// Made on the first WASI call: only a component that imports WASI
    /// ever has one.
    wasi: Option<Wasi>,
    seed: u64,
}

impl HostState {
    /// `log` is the loaded policy's, shared by all its instances (one rate
    /// limit per policy, not per instance).
    pub fn new(log: Arc<Mutex<GuestLog>>, memory_cap: usize, seed: u64) -> Self {
        HostState {
            memory_cap,
            memory_denied: false,
            memory_peak: 0,
            log,
            clock: VirtualClock::default(),
            load: Load::default(),
            wasi: None,
            seed,
        }
    }

    /// A line from the guest's `log` import (any contract version).
    pub fn guest_log(&mut self, level: tracing::Level, message: &str) {
        if let Ok(mut log) = self.log.lock() {
            log.emit(level, message);
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
