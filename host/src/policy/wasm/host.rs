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

/// Core instances one policy instance may make. A component is several
/// core modules (a language runtime's libraries, wit-component's shims and
/// adapter); wasmtime's default is 10,000.
const MAX_INSTANCES: usize = 128;
/// Linear memories one instance may define (wasmtime's default is 10,000,
/// each reserving gigabytes of address space). The cap on their bytes is on
/// the sum of them all.
const MAX_MEMORIES: usize = 8;
/// Tables one instance may define, and their elements in all: host memory
/// outside the cap on linear memory (a funcref is a pointer or two).
const MAX_TABLES: usize = 16;
const MAX_TABLE_ELEMENTS: usize = 1 << 18;

/// The store data of one instance.
pub struct HostState {
    /// The cap on the instance's linear memory: all its memories together.
    pub memory_cap: usize,
    /// Set when the cap refused a growth: the trap that follows is then a
    /// memory-cap failure, not a generic one.
    pub memory_denied: bool,
    /// Linear memory granted so far, all memories together (the initial
    /// images included; wasm memory never shrinks).
    pub memory_peak: usize,
    /// Table elements granted so far, all tables together.
    table_elements: usize,
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
            table_elements: 0,
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
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            // Past the memory's own maximum: wasmtime refuses it (-1 to
            // the guest); nothing is granted, so nothing is counted.
            return Ok(false);
        }
        let total = self.memory_peak.saturating_sub(current) + desired;
        if total > self.memory_cap {
            self.memory_denied = true;
            wasmtime::bail!(
                "policy memory cap of {} bytes reached (wanted {total} in all)",
                self.memory_cap
            );
        }
        self.memory_peak = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.table_elements.saturating_sub(current) + desired;
        if maximum.is_some_and(|max| desired > max) || total > MAX_TABLE_ELEMENTS {
            return Ok(false);
        }
        self.table_elements = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}
