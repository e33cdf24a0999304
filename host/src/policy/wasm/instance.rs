//! A loaded policy and its running instances.
//!
//! [`Loaded`] is a checked, pre-instantiated component: cheap to clone and
//! send. [`WasmPolicy`] is one instance behind the [`Policy`] trait. Every
//! entry into the guest re-arms its epoch deadline and advances its virtual
//! clock. After any failure the instance is dropped and a fresh one takes
//! over, replaying `configure` and the last gateway set: a policy may lose
//! its state, never the host.
//!
//! Starting an instance of a language runtime (CPython, SpiderMonkey) costs
//! milliseconds, so on the data path ([`Loaded::serve`]) nothing is started
//! inline: the instance is started by the caller (the control plane), a
//! spare is kept warm on a helper thread, and after a failure the spare
//! takes over; while none is ready, calls fail as [`CallError::Restarting`]
//! and the host's fallback answers (counted). Elsewhere (`compare`, `policy
//! check`) a restart is inline, so a run stays a function of its seed.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::{Engine, Store, Trap};

use super::host::HostState;
use super::log::GuestLog;
use super::versions::{Bindings, Pre, Version};
use super::{Limits, TICK};
use crate::policy::{CallError, Gateway, Load, Policy, TunnelKey};

/// A checked, pre-instantiated policy. Cheap to clone and to send to
/// another thread; [`instantiate`](Self::instantiate) or
/// [`serve`](Self::serve) give a live one.
#[derive(Clone)]
pub struct Loaded(pub(super) Arc<LoadedInner>);

pub(super) struct LoadedInner {
    pub name: String,
    pub path: PathBuf,
    pub engine: Engine,
    pub pre: Pre,
    pub params: Vec<(String, String)>,
    pub limits: Limits,
    pub version: Version,
    /// It imports `load`: the live load is copied in before each `choose`.
    pub reads_load: bool,
    /// The WASI interfaces it imports (empty: no WASI linked).
    pub wasi: Vec<String>,
    /// Seeds its deterministic randomness: from its name and parameters.
    pub seed: u64,
    /// Its log, shared by every instance (one rate limit for the policy).
    pub log: Arc<Mutex<GuestLog>>,
    /// The instance started at load to try the parameters, handed to the
    /// first taker instead of starting another.
    pub warm: Mutex<Option<Live>>,
}

pub(super) enum StartError {
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

    /// The contract version it was built against.
    pub fn version(&self) -> Version {
        self.0.version
    }

    /// Whether it reads the live load (contract 0.2.0's `load`).
    pub fn reads_load(&self) -> bool {
        self.0.reads_load
    }

    /// The WASI 0.2 interfaces the component imports (each linked with
    /// nothing granted); empty when it imports only the contract's `log`.
    pub fn wasi_imports(&self) -> &[String] {
        &self.0.wasi
    }

    /// An instance for a simulation: started on first use, restarted inline
    /// after a failure (deterministic, and as slow as a start).
    pub fn instantiate(&self) -> WasmPolicy {
        WasmPolicy::new(self.clone(), self.take_warm(), None)
    }

    /// An instance for the data path, started here (call this off the data
    /// path), with a spare started on a helper thread so a failure never
    /// waits for a start.
    pub fn serve(&self) -> Result<WasmPolicy, String> {
        let live = match self.take_warm() {
            Some(live) => live,
            None => self.start().map_err(StartError::into_message)?,
        };
        Ok(WasmPolicy::new(
            self.clone(),
            Some(live),
            Some(self.start_spare()),
        ))
    }

    /// How long one instance takes to start (instantiate + `configure`).
    pub fn time_start(&self) -> Result<Duration, String> {
        let t = Instant::now();
        self.start().map_err(StartError::into_message)?;
        Ok(t.elapsed())
    }

    fn take_warm(&self) -> Option<Live> {
        self.0.warm.lock().ok()?.take()
    }

    pub(super) fn start(&self) -> Result<Live, StartError> {
        let inner = &self.0;
        let state = HostState::new(inner.log.clone(), inner.limits.memory, inner.seed);
        let mut store = Store::new(&inner.engine, state);
        store.limiter(|s| s);
        arm(&mut store, inner.limits.setup);
        let bindings = match inner.pre.instantiate(&mut store) {
            Ok(b) => b,
            Err(e) => {
                return Err(StartError::Failed(
                    classify(&store, &e, inner.limits.setup).to_string(),
                ))
            }
        };
        arm(&mut store, inner.limits.setup);
        match bindings.configure(&mut store, &inner.params) {
            Ok(Ok(())) => Ok(Live { store, bindings }),
            Ok(Err(message)) => Err(StartError::Rejected(message)),
            Err(e) => Err(StartError::Failed(
                classify(&store, &e, inner.limits.setup).to_string(),
            )),
        }
    }

    fn start_spare(&self) -> Receiver<Result<Live, String>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("segwlb-spare-{}", self.name()))
            .spawn(move || {
                let _ = tx.send(me.start().map_err(StartError::into_message));
            });
        if let Err(e) = spawned {
            tracing::warn!(policy = self.name(), "cannot start a spare instance: {e}");
        }
        rx
    }
}

impl StartError {
    fn into_message(self) -> String {
        match self {
            StartError::Rejected(m) => format!("rejected its parameters: {m}"),
            StartError::Failed(m) => m,
        }
    }
}

pub(super) struct Live {
    store: Store<HostState>,
    bindings: Bindings,
}

/// One running instance of a wasm policy.
pub struct WasmPolicy {
    loaded: Loaded,
    live: Option<Live>,
    /// On the data path: the next instance, being started or ready.
    spare: Option<Receiver<Result<Live, String>>>,
    /// The last set pushed, replayed into a fresh instance after a trap.
    gateways: Option<Vec<Gateway>>,
    restarts: u64,
    recycles: u64,
}

impl WasmPolicy {
    fn new(
        loaded: Loaded,
        live: Option<Live>,
        spare: Option<Receiver<Result<Live, String>>>,
    ) -> Self {
        WasmPolicy {
            loaded,
            live,
            spare,
            gateways: None,
            restarts: 0,
            recycles: 0,
        }
    }

    pub fn loaded(&self) -> &Loaded {
        &self.loaded
    }

    /// Fresh instances started after a failure.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Linear memory of the live instance (0 when none is running).
    pub fn memory_bytes(&self) -> usize {
        self.live.as_ref().map_or(0, |l| l.store.data().memory_peak)
    }

    /// Lines the policy's instances wrote to its log, stdout and stderr,
    /// and how many of them the rate limit let through to the host's log.
    pub fn log_lines(&self) -> (u64, u64) {
        self.loaded
            .0
            .log
            .lock()
            .map(|g| (g.lines(), g.shown()))
            .unwrap_or((0, 0))
    }

    /// The live instance, starting (or restarting) one when needed.
    fn live(&mut self) -> Result<&mut Live, CallError> {
        if self.live.is_none() {
            let live = match self.spare {
                None => self
                    .loaded
                    .start()
                    .map_err(|e| CallError::Unavailable(e.into_message()))?,
                Some(_) => match self.take_spare() {
                    Ok(Some(live)) => live,
                    Ok(None) => return Err(CallError::Restarting),
                    Err(reason) => return Err(CallError::Unavailable(reason)),
                },
            };
            let live = self.replay(live)?;
            self.live = Some(live);
        }
        Ok(self.live.as_mut().expect("started above"))
    }

    /// The spare if it is ready (`Ok(None)`: not yet), and the next one
    /// started behind it, off the data path.
    fn take_spare(&mut self) -> Result<Option<Live>, String> {
        let Some(spare) = &self.spare else {
            return Ok(None);
        };
        let taken = match spare.try_recv() {
            Err(TryRecvError::Empty) => return Ok(None),
            Ok(Ok(live)) => Ok(Some(live)),
            // It failed to start; try again.
            Ok(Err(reason)) => Err(reason),
            Err(TryRecvError::Disconnected) => Ok(None),
        };
        self.spare = Some(self.loaded.start_spare());
        taken
    }

    /// Push the last gateway set into a fresh instance.
    fn replay(&self, mut live: Live) -> Result<Live, CallError> {
        if let Some(gateways) = &self.gateways {
            let budget = self.loaded.0.limits.setup;
            arm(&mut live.store, budget);
            live.bindings
                .set_gateways(&mut live.store, gateways)
                .map_err(|e| {
                    CallError::Unavailable(classify(&live.store, &e, budget).to_string())
                })?;
        }
        Ok(live)
    }

    /// Instances retired because their memory neared the cap.
    pub fn recycles(&self) -> u64 {
        self.recycles
    }

    /// A guest whose linear memory has grown past 3/4 of its cap (a
    /// JavaScript engine does not reclaim a call's garbage between calls)
    /// is replaced by a fresh instance before it reaches the cap, so no
    /// call fails for it. On the data path the spare takes over when it is
    /// ready (else the next call tries again); elsewhere a start is inline.
    fn recycle_if_full(&mut self) {
        let cap = self.loaded.0.limits.memory;
        let memory = self.memory_bytes();
        if memory <= cap / 4 * 3 {
            return;
        }
        let fresh = if self.spare.is_some() {
            self.take_spare().ok().flatten()
        } else {
            self.loaded.start().ok()
        };
        if let Some(fresh) = fresh.and_then(|f| self.replay(f).ok()) {
            tracing::debug!(
                policy = self.loaded.name(),
                memory,
                cap,
                "instance recycled near its memory cap"
            );
            self.live = Some(fresh);
            self.recycles += 1;
        }
    }

    /// Run one call into the guest; on failure, drop the instance.
    fn call<R>(
        &mut self,
        budget: Duration,
        f: impl FnOnce(&Bindings, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let live = self.live()?;
        arm(&mut live.store, budget);
        match f(&live.bindings, &mut live.store) {
            Ok(r) => {
                self.recycle_if_full();
                Ok(r)
            }
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
        let set = gateways.to_vec();
        if self.live.is_none() {
            // Starting replays the stored set.
            self.gateways = Some(set);
            return self.live().map(|_| ());
        }
        let budget = self.loaded.0.limits.setup;
        let pushed = self.call(budget, |b, store| b.set_gateways(store, &set));
        // Kept either way: after a failure, the fresh instance gets this set.
        self.gateways = Some(set);
        pushed
    }

    fn choose(&mut self, key: &TunnelKey, load: &Load) -> Result<Option<u32>, CallError> {
        let budget = self.loaded.0.limits.call;
        let reads_load = self.loaded.0.reads_load;
        self.call(budget, |b, store| {
            if reads_load {
                // A copy of a few hundred bytes; `load.tunnels` reads it.
                store.data_mut().load.copy_from(load);
            }
            b.choose(store, key)
        })
    }
}

/// Before every entry into the guest: a fresh deadline of `budget` (they
/// are sticky on a `Store`: a call made without re-arming inherits a stale
/// one), and its virtual clock one step on.
fn arm(store: &mut Store<HostState>, budget: Duration) {
    let ticks = (budget.as_micros() / TICK.as_micros()) as u64 + 1;
    store.set_epoch_deadline(ticks);
    store.data().clock.tick();
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
