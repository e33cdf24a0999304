//! The live data path: one worker thread owns the balancer and every
//! port's sending half. Readers hand it frames over a channel; the control
//! plane hands it commands over another. No lock is taken per frame.
//!
//! ```text
//!  rx-uplink ─┐                        ┌─► Tx uplink
//!  rx-segw1  ─┼─► frames ─► Worker ────┼─► Tx segw1       (Verdict::Forward / Reply)
//!  rx-segw2  ─┘   commands ─►  │       └─► Tx segw2
//!                              └─ timers: health probes, idle expiry
//! ```
//!
//! This is the edge where time is read: the worker stamps each batch from
//! a monotonic clock and passes it into the core.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{select, Receiver, Sender};

use crate::balancer::saved::SavedTunnel;
use crate::balancer::{Balancer, GatewaySpec, HealthConfig, PortId, Prefix, Verdict, UPLINK};
use crate::control::status::{
    Gathered, PolicyRecord, PortStatus, Status, TunnelLists, WorkerStatus,
};
use crate::io::{Received, Tx};
use crate::packet::Mac;
use crate::policy::wasm::WasmPolicy;
use crate::policy::Policy;
use crate::time::Timestamp;

pub mod fast;
pub mod hook;
mod pair;
pub mod pauses;
#[cfg(test)]
mod tests;

use pauses::{Pauses, Turn};

/// Frames handled per wake-up before the worker looks at commands and
/// timers again.
const BATCH: usize = 256;
/// The most one turn of the loop works before it looks at its frames
/// again: a batch of frames stops taking more, and background work (a
/// status at a million tunnels, a rebalance) stops for the turn. The clock
/// is looked at every chunk of work (below), so a turn ends within a chunk
/// of this.
const SLICE: Duration = Duration::from_micros(300);
/// Frames handled between looks at the clock.
const FRAMES_CHUNK: usize = 8;
/// Table slots a status visits between looks at the clock.
const STATUS_CHUNK: usize = 1024;
/// Tunnels a rebalance re-places between looks at the clock: each is a
/// policy call, a microsecond or so in wasm.
const REBALANCE_CHUNK: usize = 16;
/// Slots of the affinity table the idle sweep visits per tick.
/// (1,024 slots every 6 ms: 170k slots/s, a million-tunnel table swept
/// every 6 s, each tick a small fraction of a millisecond.)
const SWEEP_BUDGET: usize = 1024;
const SWEEP_EVERY: Duration = Duration::from_millis(6);
/// How often the gateways' traffic is measured into rates
/// (`Balancer::measure`): a pass over the gateways, none over the tunnels.
pub const MEASURE_EVERY: Duration = Duration::from_secs(1);
/// The most tunnel slots one call of the timers updates the rates of: ~0.2
/// ms at a million tunnels, where a slot is rarely in the cache. At the
/// timers' 6 ms cadence that is ~340,000 tunnels a second: each tunnel's
/// rates are updated every second up to there, every ~3 s at a million.
const TUNNEL_RATES_MAX: usize = 2_048;
/// How old the fast path's counters in a status or a save may be (the
/// measurement folds them every second too).
const FOLD_FRESH: Duration = Duration::from_secs(1);
/// How often segws are asked for their MAC when health probing is off.
const MAC_REFRESH: Duration = Duration::from_secs(1);

/// Why a graceful move is refused without a hook.
const NO_HOOK: &str = "graceful moves need [moves] hook in the config: the command that asks a segw to send a peer away (the balancer cannot speak IKE for it)";

/// The answer to a command that changes something: what changed, or why not.
pub type Reply = Result<String, String>;

/// What the control plane asks of the worker.
pub enum Command {
    Status {
        /// The oldest tunnels of each gateway, and the heaviest overall,
        /// to list (gathered here; sorted and formatted by whoever asked:
        /// [`Gathered::finish`]).
        tunnels: usize,
        top: usize,
        reply: Sender<Gathered>,
    },
    /// Swap the policy. `noticed` is when the change was first seen (a file
    /// event, a ctl request): the swap latency runs from there.
    UsePolicy {
        /// Started by the control plane, never on the data path.
        policy: Box<WasmPolicy>,
        rebalance: bool,
        /// With `rebalance`: the tunnels that move do so gracefully
        /// (`balancer::moves`).
        graceful: bool,
        noticed: Instant,
        reply: Sender<Reply>,
    },
    /// A reload that failed before reaching the worker: counted.
    PolicyRejected,
    Drain {
        name: String,
        draining: bool,
        /// Also move its tunnels off, gracefully (`balancer::moves`).
        graceful: bool,
        reply: Sender<Reply>,
    },
    Weight {
        name: String,
        weight: u32,
        reply: Sender<Reply>,
    },
    Capacity {
        name: String,
        capacity: u64,
        reply: Sender<Reply>,
    },
    Throughput {
        name: String,
        throughput: u64,
        reply: Sender<Reply>,
    },
    /// A segw's utilization, reported from outside.
    Report {
        name: String,
        utilization: f64,
        reply: Sender<Reply>,
    },
    AddGateway {
        spec: GatewaySpec,
        draining: bool,
        interface: String,
        port_mac: Mac,
        tx: Box<dyn Tx>,
        reply: Sender<Reply>,
    },
    RemoveGateway {
        name: String,
        reply: Sender<Reply>,
    },
    SetProxy {
        uplink: Vec<Prefix>,
        gateways: Vec<Prefix>,
    },
    SetHealth(Option<HealthConfig>),
    /// Every tunnel, saved a slice at a time between frames.
    Save {
        reply: Sender<Vec<SavedTunnel>>,
    },
    /// `ctl role`: become active or standby (`None`: say which).
    Role {
        role: Option<crate::pair::Role>,
        reply: Sender<Reply>,
    },
    /// The pair's sync link (see `crate::pair::link`).
    Pair(crate::pair::link::PairEvent),
}

struct Port {
    interface: String,
    tx: Box<dyn Tx>,
    /// Frames of the batch in hand, sent together by [`Worker::flush`].
    outbox: Vec<Vec<u8>>,
    sent: u64,
    errors: u64,
}

/// A monotonic clock turned into the core's `Timestamp`s. It starts at
/// [`Clock::HISTORY`], not at 0: a table restored from a state file sets
/// each tunnel's first and last seen times back by their saved ages, and
/// a clock at 0 would cut those to 0 — every dead tunnel would get a fresh
/// idle timeout at every restart, and keep holding its segw's capacity.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// How far back a restored age reaches: ten years (ages beyond it are
    /// cut to it, which no timeout can tell apart).
    pub const HISTORY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

    pub fn start() -> Self {
        Clock {
            start: Instant::now(),
        }
    }

    pub fn now(&self) -> Timestamp {
        Timestamp::from_duration(Self::HISTORY + self.start.elapsed())
    }

    /// Time since the clock started.
    pub fn uptime(&self) -> Duration {
        self.start.elapsed()
    }
}

pub struct Worker {
    lb: Balancer<Box<dyn Policy>>,
    ports: Vec<Option<Port>>,
    clock: Clock,
    /// The VIPs (one per family): probed on the segw ports, announced on
    /// the uplink.
    vips: Vec<IpAddr>,
    health: Option<HealthConfig>,
    next_probe: Timestamp,
    next_sweep: Timestamp,
    next_measure: Timestamp,
    next_tunnel_rates: Timestamp,
    policy: PolicyRecord,
    last_send_error_log: Option<Instant>,
    pauses: Pauses,
    /// `ctl status` requests that list tunnels, gathered a slice at a time.
    statuses: std::collections::VecDeque<(TunnelLists, Sender<Gathered>)>,
    /// Saves under way: the next slot, what is saved so far, who asked.
    saves: std::collections::VecDeque<(usize, Vec<SavedTunnel>, Sender<Vec<SavedTunnel>>)>,
    /// The swap whose rebalance is under way, answered when it ends.
    swap: Option<Swapped>,
    /// The XDP fast path in front of the ports, when it runs.
    fast: Option<fast::Fast>,
    /// Folds of the fast path's counters into the core: when the last
    /// was, and how many so far.
    folded: Option<Timestamp>,
    folds: u64,
    /// What asks a segw to move a peer (`[moves] hook`); without it no
    /// graceful move is taken.
    hook: Option<hook::Hook>,
    /// One of a pair of balancers (`[pair]`), if it is.
    pair: Option<pair::Pair>,
}

/// A policy swap, to be answered (with the moves, after a rebalance).
struct Swapped {
    reply: Sender<Reply>,
    graceful: bool,
    old: String,
    name: String,
    file: String,
    took: Duration,
}

impl Swapped {
    fn answer(self, moved: Option<u64>) {
        let what = match moved {
            Some(moved) if self.graceful => {
                format!("{moved} tunnels to move by the rebalance, gracefully")
            }
            Some(moved) => format!("{moved} tunnels moved by the rebalance"),
            None => "no tunnel moved".into(),
        };
        let ms = self.took.as_secs_f64() * 1e3;
        tracing::info!(
            policy = %self.name, from = %self.old, file = %self.file,
            swap_ms = format!("{ms:.2}"),
            "policy swapped in; {what}"
        );
        let _ = self.reply.send(Ok(format!(
            "policy {} -> {} ({}); {what}; swapped in {ms:.2} ms",
            self.old, self.name, self.file
        )));
    }
}

impl Worker {
    /// `ports`: the sending half of each port already in `lb`'s config, by
    /// port id: (interface name, Tx).
    pub fn new(
        lb: Balancer<Box<dyn Policy>>,
        ports: Vec<(PortId, String, Box<dyn Tx>)>,
        vips: Vec<IpAddr>,
        health: Option<HealthConfig>,
        policy: PolicyRecord,
        clock: Clock,
    ) -> Self {
        let mut w = Worker {
            lb,
            ports: Vec::new(),
            clock,
            vips,
            health,
            next_probe: Timestamp::ZERO,
            next_sweep: Timestamp::ZERO,
            next_measure: Timestamp::ZERO,
            next_tunnel_rates: Timestamp::ZERO,
            policy,
            last_send_error_log: None,
            pauses: Pauses::default(),
            statuses: Default::default(),
            saves: Default::default(),
            swap: None,
            fast: None,
            folded: None,
            folds: 0,
            hook: None,
            pair: None,
        };
        for (port, interface, tx) in ports {
            w.set_port(port, interface, tx);
        }
        w
    }

    /// Graceful moves: their pace, and the hook that asks the old segws.
    pub fn use_moves(
        &mut self,
        settings: crate::balancer::moves::Settings,
        hook: Option<Vec<String>>,
    ) {
        self.lb.set_move_settings(settings);
        self.hook = hook.map(hook::Hook::start);
    }

    /// The graceful moves the pace allows now, handed to the hook.
    fn graceful_moves(&mut self, now: Timestamp) {
        for ask in self.lb.graceful_step(now) {
            let name = |id| {
                self.lb
                    .gateway_by_id(id)
                    .map_or_else(|| id.to_string(), |g| g.spec.name.clone())
            };
            let (from, to) = (name(ask.from), name(ask.to));
            match &self.hook {
                Some(hook) => hook.ask(ask, from, to),
                None => tracing::warn!(%from, %to, peer = %ask.peer, "graceful move with no hook"),
            }
        }
    }

    /// Put the XDP fast path in front of every port, from now on (ports
    /// added later too). A port it cannot take: said once, and the worker
    /// goes on without it.
    pub fn use_fast_path(&mut self, path: crate::io::xdp::FastPath) {
        let mode = if path.is_native() {
            "native"
        } else {
            "generic"
        };
        let mut fast = fast::Fast::new(path);
        for (port, p) in self.ports.iter().enumerate() {
            let Some(p) = p else { continue };
            let port = port as PortId;
            if let Err(e) = fast.add_port(port, &p.interface, self.lb.port_mac(port)) {
                tracing::error!("{e}: running on AF_PACKET alone");
                return;
            }
        }
        tracing::info!("the XDP fast path carries established tunnels ({mode} XDP)");
        self.fast = Some(fast);
    }

    /// The fast path's turn: its maps, its counters.
    fn fast_path_turn(&mut self, now: Timestamp, spent: Duration) {
        self.on_fast_path(|fast, lb| fast.turn(lb, now, spent));
    }

    /// The fast path's counters into the core now, before they are read.
    fn fast_path_count(&mut self, now: Timestamp) {
        if let Some(fast) = &mut self.fast {
            fast.count(&mut self.lb, now);
            self.folded = Some(now);
            self.folds += 1;
        }
    }

    /// `work` on the fast path, if it runs; a failure ends it.
    fn on_fast_path(
        &mut self,
        work: impl FnOnce(
            &mut fast::Fast,
            &mut Balancer<Box<dyn Policy>>,
        ) -> Result<(), crate::io::xdp::XdpError>,
    ) {
        if let Some(fast) = &mut self.fast {
            if let Err(e) = work(fast, &mut self.lb) {
                tracing::error!("the XDP fast path failed: {e}; running on AF_PACKET alone");
                self.fast = None;
            }
        }
    }

    fn set_port(&mut self, port: PortId, interface: String, tx: Box<dyn Tx>) {
        if let Some(fast) = &mut self.fast {
            if let Err(e) = fast.add_port(port, &interface, self.lb.port_mac(port)) {
                tracing::error!("{e}: running on AF_PACKET alone");
                self.fast = None;
            }
        }
        let i = usize::from(port);
        if self.ports.len() <= i {
            self.ports.resize_with(i + 1, || None);
        }
        self.ports[i] = Some(Port {
            interface,
            tx,
            outbox: Vec::with_capacity(BATCH),
            sent: 0,
            errors: 0,
        });
    }

    /// Announce the VIPs on the uplink (a gratuitous ARP, an unsolicited
    /// neighbour advertisement), so initiators' neighbour caches point at
    /// us from the start.
    pub fn announce(&mut self) {
        if self.lb.is_standby() {
            return;
        }
        for vip in self.vips.clone() {
            for (port, frame) in self.lb.announce(vip) {
                if port == UPLINK {
                    self.send(port, &frame);
                }
            }
        }
    }

    /// Run until `stop` is set or every sender has gone; then the worker,
    /// for what is left to do with its table (save it).
    pub fn run(
        mut self,
        frames: Receiver<Received>,
        commands: Receiver<Command>,
        stop: &AtomicBool,
    ) -> Self {
        while !stop.load(Ordering::Relaxed) {
            // A turn: timers, a slice of background work, then what came
            // in. Its busy time is timed; the wait for input is not.
            let turn = Turn::start();
            let now = self.clock.now();
            self.timers(now);
            self.background(now);
            let (mut busy, mut wall) = turn.elapsed();
            let wait = if self.has_background() {
                Duration::ZERO
            } else {
                self.next_timer()
                    .since(now)
                    .clamp(Duration::from_millis(1), Duration::from_millis(100))
            };
            select! {
                recv(frames) -> first => {
                    let Ok(first) = first else { return self };
                    let turn = Turn::start();
                    self.batch(first, &frames);
                    let (cpu, w) = turn.elapsed();
                    (busy, wall) = (busy + cpu, wall + w);
                }
                recv(commands) -> c => {
                    let Ok(c) = c else { return self };
                    let turn = Turn::start();
                    let now = self.clock.now();
                    self.command(c, now);
                    let (cpu, w) = turn.elapsed();
                    (busy, wall) = (busy + cpu, wall + w);
                }
                default(wait) => {}
            }
            if self.pair.is_some() {
                let turn = Turn::start();
                self.pair_turn(self.clock.now());
                let (cpu, w) = turn.elapsed();
                (busy, wall) = (busy + cpu, wall + w);
            }
            if self.fast.is_some() {
                let turn = Turn::start();
                self.fast_path_turn(self.clock.now(), busy);
                let (cpu, w) = turn.elapsed();
                (busy, wall) = (busy + cpu, wall + w);
            }
            self.pauses.record(busy, wall);
        }
        self
    }

    /// Every tunnel, saved as of now (at shutdown: all at once).
    pub fn save(&self) -> Vec<SavedTunnel> {
        self.lb.save(self.clock.now())
    }

    /// Frames from the channel, `first` and up to [`BATCH`] in all, for
    /// at most about a [`SLICE`]; then they leave.
    fn batch(&mut self, first: Received, frames: &Receiver<Received>) {
        let started = Instant::now();
        let now = self.clock.now();
        self.handle(first, now);
        for n in 1..BATCH {
            if n % FRAMES_CHUNK == 0 && started.elapsed() >= SLICE {
                break;
            }
            let Ok(more) = frames.try_recv() else { break };
            self.handle(more, now);
        }
        self.flush();
    }

    /// Status requests and a rebalance are worked on a slice at a time.
    fn has_background(&self) -> bool {
        self.lb.is_rebalancing()
            || self.pair_has_background()
            || !self.statuses.is_empty()
            || !self.saves.is_empty()
            || self.fast.as_ref().is_some_and(fast::Fast::resyncing)
    }

    /// About a [`SLICE`] of background work: the rebalance first (new
    /// tunnels meanwhile go by the new policy), then status requests in the
    /// order they came, then saves of the table.
    fn background(&mut self, now: Timestamp) {
        let started = Instant::now();
        while started.elapsed() < SLICE {
            if self.lb.is_rebalancing() {
                if let Some(moved) = self.lb.rebalance_step(REBALANCE_CHUNK, now) {
                    if let Some(swap) = self.swap.take() {
                        swap.answer(Some(moved));
                    }
                }
                continue;
            }
            if self.pair_background(now) {
                continue;
            }
            if let Some((lists, _)) = self.statuses.front_mut() {
                if lists.advance(&self.lb, STATUS_CHUNK) {
                    let (lists, reply) = self.statuses.pop_front().expect("the front one");
                    let _ = reply.send(self.snapshot(lists, now));
                }
                continue;
            }
            let Some((from, saved, _)) = self.saves.front_mut() else {
                return;
            };
            match self.lb.save_slice(*from, STATUS_CHUNK, now, saved) {
                Some(next) => *from = next,
                None => {
                    let (_, saved, reply) = self.saves.pop_front().expect("the front one");
                    let _ = reply.send(saved);
                }
            }
        }
    }

    /// One frame through the core, and out.
    pub fn frame(&mut self, rx: Received, now: Timestamp) {
        self.handle(rx, now);
        self.flush();
    }

    /// One frame through the core, into its port's outbox.
    fn handle(&mut self, mut rx: Received, now: Timestamp) {
        match self.lb.handle(&mut rx.frame, rx.port, now) {
            Verdict::Forward(port) => self.queue(port, rx.frame),
            Verdict::ForwardWithHeld(port, held) => {
                self.queue(port, rx.frame);
                for frame in held {
                    self.queue(port, frame);
                }
            }
            Verdict::Reply => self.queue(rx.port, rx.frame),
            Verdict::Held | Verdict::Drop(_) => {}
        }
    }

    fn queue(&mut self, port: PortId, frame: Vec<u8>) {
        if let Some(p) = self
            .ports
            .get_mut(usize::from(port))
            .and_then(Option::as_mut)
        {
            p.outbox.push(frame);
        }
    }

    /// Send every port's outbox, a batch per port (one `sendmmsg` on
    /// AF_PACKET), in the order the frames came.
    fn flush(&mut self) {
        for p in self.ports.iter_mut().flatten() {
            if p.outbox.is_empty() {
                continue;
            }
            let frames: Vec<&[u8]> = p.outbox.iter().map(Vec::as_slice).collect();
            let (sent, error) = p.tx.send_batch(&frames);
            p.sent += sent as u64;
            p.errors += (frames.len() - sent) as u64;
            p.outbox.clear();
            if let Some(e) = error {
                let quiet = self
                    .last_send_error_log
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
                if !quiet {
                    tracing::warn!(interface = %p.interface, "send failed: {e} (further failures counted, logged every 10 s)");
                    self.last_send_error_log = Some(Instant::now());
                }
            }
        }
    }

    /// A frame of the worker's own (a probe, an announcement): out now.
    fn send(&mut self, port: PortId, frame: &[u8]) {
        self.queue(port, frame.to_vec());
        self.flush();
    }

    fn next_timer(&self) -> Timestamp {
        self.next_probe.min(self.next_sweep).min(self.next_measure)
    }

    /// Health probes, the traffic measurement and the idle sweep, when due. With health checking
    /// off, the probes still go out (every [`MAC_REFRESH`]): they are how
    /// a segw's MAC is learned and kept fresh; nobody is marked down.
    pub fn timers(&mut self, now: Timestamp) {
        let health = self.health.unwrap_or(HealthConfig {
            interval: MAC_REFRESH,
            down_after: u32::MAX,
            up_after: 1,
        });
        // A standby is silent: it probes nobody (the active's MACs come
        // with its stream).
        if !self.lb.is_standby() && now >= self.next_probe {
            let round = self.lb.probe(&self.vips, &health, now);
            for (id, name, healthy) in &round.changes {
                if *healthy {
                    tracing::info!(gateway = %name, id, "segw answers again: marked up");
                } else {
                    tracing::warn!(
                        gateway = %name, id,
                        "segw stopped answering probes for {}: marked down; its tunnels move on their next packet",
                        self.vips.iter().map(ToString::to_string).collect::<Vec<_>>().join(" and ")
                    );
                }
            }
            for (port, frame) in round.frames {
                self.send(port, &frame);
            }
            self.next_probe = now + health.interval;
        }
        if now >= self.next_measure {
            // What the fast path forwarded counts too.
            self.fast_path_count(now);
            self.lb.measure(now);
            self.next_measure = now + MEASURE_EVERY;
            // The tunnels' pass starts now, on the same counts.
            self.next_tunnel_rates = now;
        }
        // The tunnels' rates: the pass each measurement begins, at most
        // TUNNEL_RATES_MAX slots every SWEEP_EVERY, so the worker's turns
        // stay short and a large table's pass takes longer instead.
        if now >= self.next_tunnel_rates {
            self.lb.measure_tunnels(now, TUNNEL_RATES_MAX);
            self.next_tunnel_rates = now + SWEEP_EVERY;
        }
        if now >= self.next_sweep && self.lb.is_standby() {
            // The active's expiries come with its stream; the handshake
            // window still closes here.
            self.lb.age(now, SWEEP_BUDGET);
            self.next_sweep = now + SWEEP_EVERY;
        }
        if now >= self.next_sweep {
            self.graceful_moves(now);
            let gone = self.lb.expire(now, SWEEP_BUDGET);
            if gone > 0 {
                tracing::debug!(tunnels = gone, "idle tunnels expired");
            }
            self.next_sweep = now + SWEEP_EVERY;
        }
    }

    pub fn command(&mut self, command: Command, now: Timestamp) {
        // A fold reads every tunnel slot the fast path has written: for a
        // status or a save, at most one a FOLD_FRESH, whoever asks how often.
        let stale = self.folded.is_none_or(|at| now.since(at) >= FOLD_FRESH);
        if stale && matches!(command, Command::Status { .. } | Command::Save { .. }) {
            self.fast_path_count(now);
        }
        match command {
            Command::Status {
                tunnels: 0,
                top: 0,
                reply,
            } => {
                let _ = reply.send(self.snapshot(TunnelLists::new(0), now));
            }
            // Listing tunnels walks the table: a slice at a time.
            Command::Status {
                tunnels,
                top,
                reply,
            } => {
                self.statuses
                    .push_back((TunnelLists::with_top(tunnels, top), reply));
            }
            Command::UsePolicy {
                policy,
                rebalance,
                graceful,
                noticed,
                reply,
            } => {
                if graceful && self.hook.is_none() {
                    let _ = reply.send(Err(NO_HOOK.into()));
                    return;
                }
                let name = policy.loaded().name().to_string();
                let file = policy.loaded().path().display().to_string();
                let contract = policy.loaded().version().package();
                let live: Box<dyn Policy> = policy;
                let old = if rebalance && graceful {
                    self.lb.swap_policy_gracefully(live, now)
                } else {
                    self.lb.swap_policy(live, rebalance, now)
                };
                let took = noticed.elapsed();
                self.policy.reloads += 1;
                self.policy.name = name.clone();
                self.policy.file = file.clone();
                self.policy.contract = contract.into();
                self.policy.loaded_at = unix_now();
                self.policy.last_swap_ms = Some(took.as_secs_f64() * 1e3);
                let swapped = Swapped {
                    reply,
                    graceful,
                    old: old.name().to_string(),
                    name,
                    file,
                    took,
                };
                if let Some(cut_short) = self.swap.take() {
                    let _ = cut_short.reply.send(Err(format!(
                        "the rebalance to {} was cut short by a swap to {}",
                        cut_short.name, swapped.name
                    )));
                }
                if rebalance {
                    // Answered with the moves when the rebalance ends.
                    self.swap = Some(swapped);
                } else {
                    swapped.answer(None);
                }
            }
            Command::PolicyRejected => self.policy.rejected += 1,
            Command::Drain {
                name,
                draining: true,
                graceful: true,
                reply,
            } => {
                let r = if self.hook.is_none() {
                    Err(NO_HOOK.to_string())
                } else {
                    let pace = self.lb.moves().settings.per_second;
                    self.lb
                        .drain_gracefully(&name, now)
                        .map(|n| {
                            format!(
                                "gateway {name} draining: no new tunnels; its {n} working tunnels move gracefully, {pace} a second"
                            )
                        })
                        .map_err(|e| e.to_string())
                };
                let _ = reply.send(r);
            }
            Command::Drain {
                name,
                draining,
                reply,
                ..
            } => {
                let r = self
                    .lb
                    .set_draining(&name, draining, now)
                    .map(|()| {
                        if draining {
                            format!("gateway {name} draining: no new tunnels, existing ones stay")
                        } else {
                            format!("gateway {name} takes new tunnels again")
                        }
                    })
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Command::Weight {
                name,
                weight,
                reply,
            } => {
                let before = self.lb.gateway(&name).map(|g| g.spec.weight);
                let r = self
                    .lb
                    .set_weight(&name, weight, now)
                    .map(|()| format!("gateway {name} weight {} -> {weight}", before.unwrap_or(0)))
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Command::Throughput {
                name,
                throughput,
                reply,
            } => {
                let before = self.lb.gateway(&name).map_or(0, |g| g.spec.throughput);
                let show = |t: u64| match t {
                    0 => "none".to_string(),
                    t => crate::units::show_rate(t as f64),
                };
                let r = self
                    .lb
                    .set_throughput(&name, throughput, now)
                    .map(|()| {
                        format!(
                            "gateway {name} throughput {} -> {}",
                            show(before),
                            show(throughput)
                        )
                    })
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Command::Report {
                name,
                utilization,
                reply,
            } => {
                let r = self
                    .lb
                    .report_utilization(&name, utilization, now)
                    .map(|()| format!("gateway {name} reports utilization {utilization}"))
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Command::Capacity {
                name,
                capacity,
                reply,
            } => {
                let before = self.lb.gateway(&name).map(|g| g.spec.capacity);
                let r = self
                    .lb
                    .set_capacity(&name, capacity, now)
                    .map(|()| {
                        format!(
                            "gateway {name} capacity {} -> {capacity} (0: no limit)",
                            before.unwrap_or(0)
                        )
                    })
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Command::AddGateway {
                spec,
                draining,
                interface,
                port_mac,
                tx,
                reply,
            } => {
                let (name, port) = (spec.name.clone(), spec.port);
                // Validated first: a refused gateway changes no port's MAC.
                let r = self
                    .lb
                    .add_gateway(spec, now)
                    .and_then(|_| {
                        self.lb.set_port_mac(port, port_mac);
                        self.lb.set_draining(&name, draining, now)
                    })
                    .map(|()| format!("gateway {name} added on {interface} (port {port})"))
                    .map_err(|e| e.to_string());
                if r.is_ok() {
                    self.set_port(port, interface, tx);
                    // Probe it now: learn its MAC before its first tunnel.
                    self.next_probe = now;
                }
                let _ = reply.send(r);
            }
            Command::RemoveGateway { name, reply } => {
                let port = self
                    .lb
                    .gateway(&name)
                    .map(|g| (g.spec.port, g.counters.tunnels));
                let r = self
                    .lb
                    .remove_gateway(&name, now)
                    .map(|()| {
                        let (port, tunnels) = port.expect("it existed");
                        if let Some(p) = self.ports.get_mut(usize::from(port)) {
                            *p = None;
                        }
                        format!("gateway {name} removed; its {tunnels} tunnels move on their next packet")
                    })
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Command::SetProxy { uplink, gateways } => self.lb.set_proxy(uplink, gateways),
            Command::SetHealth(health) => {
                self.health = health;
                self.next_probe = now;
            }
            Command::Save { reply } => {
                let room = self.lb.table().len();
                self.saves.push_back((0, Vec::with_capacity(room), reply));
            }
            Command::Role { role, reply } => {
                let _ = reply.send(self.set_role(role, now));
            }
            Command::Pair(event) => self.pair_event(event, now),
        }
    }

    /// A status listing up to `tunnels` tunnels per gateway, all at once
    /// (the loop gathers lists a slice at a time instead).
    pub fn status(&self, tunnels: usize, now: Timestamp) -> Status {
        let mut lists = TunnelLists::new(tunnels);
        while !lists.advance(&self.lb, usize::MAX) {}
        self.snapshot(lists, now).finish()
    }

    fn snapshot(&self, lists: TunnelLists, now: Timestamp) -> Gathered {
        let ports = self
            .ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let p = p.as_ref()?;
                Some(PortStatus {
                    port: i as PortId,
                    interface: p.interface.clone(),
                    sent: p.sent,
                    send_errors: p.errors,
                })
            })
            .collect();
        let mut gathered = Gathered::of(
            &self.lb,
            &self.policy,
            ports,
            now,
            self.clock.uptime().as_secs_f64(),
            lists,
        );
        let status = gathered.status_mut();
        status.worker = self.worker_status();
        status.pair = self.pair_status();
        if let Some(hook) = &self.hook {
            use std::sync::atomic::Ordering::Relaxed;
            let c = &hook.counters;
            status.moves.hook_ran = c.ran.load(Relaxed);
            status.moves.hook_failed = c.failed.load(Relaxed) + c.dropped.load(Relaxed);
        }
        gathered
    }

    fn worker_status(&self) -> WorkerStatus {
        let p = &self.pauses;
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        WorkerStatus {
            turns: p.turns(),
            busy_s: p.total().as_secs_f64(),
            longest_pause_us: us(p.longest()),
            longest_pause_wall_us: us(p.longest_wall()),
            p999_pause_us: us(p.quantile(0.999)),
            pauses_over_1ms: p.at_least(Duration::from_millis(1)),
            wall_pauses_over_1ms: p.wall_at_least(Duration::from_millis(1)),
            fast_path_entries: self.fast.as_ref().map_or(0, |f| f.entries() as u64),
            fast_path_resyncing: self.fast.as_ref().is_some_and(fast::Fast::resyncing),
            histogram: p.cumulative().map(|(b, n)| (b.map(us), n)).collect(),
        }
    }
}

/// Seconds since the Unix epoch, for people (loaded-at times).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
