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
//! and the host's fallback answers (counted). The spare is handed the last
//! gateway set on its own thread: it takes over with the set already pushed
//! (one that started before the set changed is replaced, never caught up
//! on the worker). An instance retired (after a failure, when recycled, or
//! with its policy) is dropped on a helper thread too: unmapping a language
//! runtime's memory is the worker's time as well. On the data path the
//! instance also keeps the time its calls took, for the breaker
//! ([`Policy::spent`]). Elsewhere (`compare`, `policy check`) a restart is
//! inline and no time is reported, so a run stays a function of its seed.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
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
        WasmPolicy::new(self.clone(), self.take_warm(), None, Latest::shared())
    }

    /// An instance for the data path, started here (call this off the data
    /// path), with a spare started on a helper thread so a failure never
    /// waits for a start.
    pub fn serve(&self) -> Result<WasmPolicy, String> {
        let live = match self.take_warm() {
            Some(live) => live,
            None => self.start().map_err(StartError::into_message)?,
        };
        let latest = Latest::shared();
        let spare = self.start_spare(&latest);
        Ok(WasmPolicy::new(
            self.clone(),
            Some(live),
            Some(spare),
            latest,
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

    /// Start an instance on a helper thread and push it the latest set
    /// there; it comes back with the version of the set it has.
    fn start_spare(&self, latest: &Arc<Mutex<Latest>>) -> Receiver<Result<Spare, String>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (me, latest) = (self.clone(), latest.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("segwlb-spare-{}", self.name()))
            .spawn(move || {
                let spare = me
                    .start()
                    .map_err(StartError::into_message)
                    .and_then(|live| {
                        // The set as it is now that the instance is up.
                        let Latest { version, set } =
                            latest.lock().map_err(|e| e.to_string())?.clone();
                        let live = replay(&me, live, set.as_deref()).map_err(|e| e.to_string())?;
                        Ok(Spare { live, version })
                    });
                let _ = tx.send(spare);
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

/// A spare instance, started and told the set of `version`.
struct Spare {
    live: Live,
    version: u64,
}

/// The last gateway set pushed, shared with the threads starting spares.
#[derive(Clone, Default)]
struct Latest {
    /// Bumped with every set.
    version: u64,
    set: Option<Arc<Vec<Gateway>>>,
}

impl Latest {
    fn shared() -> Arc<Mutex<Latest>> {
        Arc::default()
    }
}

/// One running instance of a wasm policy.
pub struct WasmPolicy {
    loaded: Loaded,
    live: Option<Live>,
    /// On the data path: the next instance, being started or ready.
    spare: Option<Receiver<Result<Spare, String>>>,
    /// The last set pushed, replayed into a fresh instance after a trap
    /// (by the thread that starts it, on the data path).
    latest: Arc<Mutex<Latest>>,
    /// The worker's time spent in calls since [`Policy::spent`] last took
    /// it; measured on the data path only.
    spent: Duration,
    restarts: u64,
    recycles: u64,
}

impl Drop for WasmPolicy {
    fn drop(&mut self) {
        if let Some(live) = self.live.take() {
            retire(live);
        }
        // A spare still starting is dropped by its own thread; a ready one
        // waits in the channel and would be dropped here.
        if let Some(Ok(spare)) = self.spare.take().and_then(|rx| rx.try_recv().ok()) {
            retire(spare.live);
        }
    }
}

impl WasmPolicy {
    fn new(
        loaded: Loaded,
        live: Option<Live>,
        spare: Option<Receiver<Result<Spare, String>>>,
        latest: Arc<Mutex<Latest>>,
    ) -> Self {
        WasmPolicy {
            loaded,
            live,
            spare,
            latest,
            spent: Duration::ZERO,
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
                None => {
                    let live = self
                        .loaded
                        .start()
                        .map_err(|e| CallError::Unavailable(e.into_message()))?;
                    let set = self.latest().set;
                    replay(&self.loaded, live, set.as_deref())?
                }
                Some(_) => match self.take_spare() {
                    Ok(Some(live)) => live,
                    Ok(None) => return Err(CallError::Restarting),
                    Err(reason) => return Err(CallError::Unavailable(reason)),
                },
            };
            self.live = Some(live);
        }
        Ok(self.live.as_mut().expect("started above"))
    }

    fn latest(&self) -> Latest {
        self.latest.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The spare if it is ready and has the latest set (`Ok(None)`: not
    /// yet), and the next one started behind it, off the data path. A
    /// spare told an older set is dropped (off the worker) for a new one.
    fn take_spare(&mut self) -> Result<Option<Live>, String> {
        let Some(spare) = &self.spare else {
            return Ok(None);
        };
        let taken = match spare.try_recv() {
            Err(TryRecvError::Empty) => return Ok(None),
            Ok(Ok(spare)) if spare.version == self.latest().version => Ok(Some(spare.live)),
            Ok(Ok(stale)) => {
                retire(stale.live);
                Ok(None)
            }
            // It failed to start; try again.
            Ok(Err(reason)) => Err(reason),
            Err(TryRecvError::Disconnected) => Ok(None),
        };
        self.spare = Some(self.loaded.start_spare(&self.latest));
        taken
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
            let set = self.latest().set;
            self.loaded
                .start()
                .ok()
                .and_then(|f| replay(&self.loaded, f, set.as_deref()).ok())
        };
        if let Some(fresh) = fresh {
            tracing::debug!(
                policy = self.loaded.name(),
                memory,
                cap,
                "instance recycled near its memory cap"
            );
            if let Some(old) = self.live.replace(fresh) {
                retire(old);
            }
            self.recycles += 1;
        }
    }

    /// Run one call into the guest; on failure, drop the instance.
    fn call<R>(
        &mut self,
        budget: Duration,
        f: impl FnOnce(&Bindings, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let started = self.spare.is_some().then(Instant::now);
        let r = self.call_timed(budget, f);
        if let Some(t) = started {
            self.spent += t.elapsed();
        }
        r
    }

    fn call_timed<R>(
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
                if let Some(dead) = self.live.take() {
                    retire(dead);
                }
                self.restarts += 1;
                Err(err)
            }
        }
    }
}

/// Push `set` (if any) into a fresh instance, under the setup budget.
fn replay(loaded: &Loaded, mut live: Live, set: Option<&Vec<Gateway>>) -> Result<Live, CallError> {
    if let Some(gateways) = set {
        let budget = loaded.0.limits.setup;
        arm(&mut live.store, budget);
        live.bindings
            .set_gateways(&mut live.store, gateways)
            .map_err(|e| CallError::Unavailable(classify(&live.store, &e, budget).to_string()))?;
    }
    Ok(live)
}

/// Drop an instance on a helper thread: freeing a store unmaps its linear
/// memory (tens of megabytes for a language runtime), which is not the
/// worker's job. Dropped here when the helper is busy with a backlog.
fn retire(live: Live) {
    static REAPER: OnceLock<Option<SyncSender<Live>>> = OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Live>(4);
        std::thread::Builder::new()
            .name("segwlb-reaper".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    if let Some(tx) = reaper {
        // Full or gone: dropped here, as before.
        let _ = tx.try_send(live);
    }
}

impl Policy for WasmPolicy {
    fn name(&self) -> &str {
        self.loaded.name()
    }

    fn set_gateways(&mut self, gateways: &[Gateway]) -> Result<(), CallError> {
        let set = Arc::new(gateways.to_vec());
        // Kept either way: a fresh instance gets this set.
        if let Ok(mut latest) = self.latest.lock() {
            latest.version += 1;
            latest.set = Some(set.clone());
        }
        // A spare ready with the old set is replaced now, so the next is
        // ready with this one (off the worker) when it is needed.
        if let Some(spare) = &self.spare {
            if let Ok(ready) = spare.try_recv() {
                if let Ok(stale) = ready {
                    retire(stale.live);
                }
                self.spare = Some(self.loaded.start_spare(&self.latest));
            }
        }
        if self.live.is_none() {
            // Starting replays the stored set.
            return self.live().map(|_| ());
        }
        let budget = self.loaded.0.limits.setup;
        self.call(budget, |b, store| b.set_gateways(store, &set))
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

    fn spent(&mut self) -> Duration {
        std::mem::take(&mut self.spent)
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
