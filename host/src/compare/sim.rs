//! A scenario as real frames through the real balancer core, on in-memory
//! ports, on simulated time.
//!
//! Each tunnel is a peer that opens with IKE_SA_INIT on 500, answers and
//! floats to 4500 (through its NAT, with a port the NAT chose) or stays on
//! 500 and sends raw ESP, then sends ESP every step; its segw answers every
//! frame. Where each frame lands is the truth the report is made of: a
//! tunnel "is on" the segw its last packet reached. The balancer does not
//! know the simulation exists: it sees frames, a port and a time.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::outage::{Dark, Found, Move, Summary};
use super::scenario::{Event, Scenario, SegwSpec};
use super::traffic::{Profile, Sent, Step};
use crate::balancer::affinity::Timeouts;
use crate::balancer::{
    farm, Balancer, Bulk, Config, DropReason, GatewaySpec, PortId, Prefix, Verdict, UPLINK,
};
use crate::packet::craft::{self, EspFrame};
use crate::packet::{ike, IkeHeader, Mac};
use crate::policy::{CallError, FallbackReason, Gateway, Load, Policy, TunnelKey};
use crate::time::Timestamp;
use crate::workload::{vip_for, Rng, VIP, VIP6};

/// The initiator side's router: the source MAC of every frame from peers.
pub(crate) const ROUTER: Mac = [2, 0xaa, 0, 0, 0, 1];
/// Bytes of IKE payload after the header (a typical IKE_SA_INIT is ~300).
const IKE_EXTRA: usize = 240;
/// How many tunnels ahead the sim asks the core to prefetch.
const PREFETCH_AHEAD: usize = 8;

/// What one policy's run through a scenario saw.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub policy: String,
    /// Every segw that took part, in scenario order (additions last).
    pub segws: Vec<SegwSpec>,
    /// Live tunnels per segw (in `segws` order) at the end of each step.
    pub per_step: Vec<Vec<u64>>,
    /// IP bytes each segw carried in each step, both directions, as the
    /// balancer counted them (its gateway counters).
    pub bytes_per_step: Vec<Vec<u64>>,
    /// Per event: tunnels whose packets reached a different segw in the
    /// event's step, and the fewest any policy could have moved.
    pub moved: Vec<u64>,
    pub minimum_moved: Vec<u64>,
    /// Per event: how long its moved tunnels stay dark, as the peers'
    /// timers ([`super::outage`]) predict. Empty where nobody predicted
    /// it (a lab's measured outcome).
    pub outage: Vec<Summary>,
    /// Per event: of its moved tunnels, those moved gracefully (make-before-
    /// break: never dark), and the most new IKE SAs those moves brought one
    /// segw in one second (what the pace, `moves_per_second`, holds down).
    pub graceful: Vec<u64>,
    pub setups_peak: Vec<u64>,
    /// Tunnels whose packets reached a second segw while the first was
    /// still up, with no rebalance asked for.
    pub split: u64,
    /// At the end: which segws take new tunnels, and their weights then.
    pub fair_weights: Vec<u32>,
    pub decisions: u64,
    pub policy_ns: u64,
    pub fallbacks: u64,
    /// Policy answers of a segw at its capacity, replaced by one with room.
    pub full_answers: u64,
    /// Tunnel openings (or re-placements off a failed segw) refused with
    /// every segw full, per step; a refused initiator tries again each step.
    pub refused_per_step: Vec<u64>,
    /// Tunnels refused at least once.
    pub refused_tunnels: u64,
    pub frames: u64,
    /// Frames the balancer dropped, by reason (none expected).
    pub drops: Vec<(&'static str, u64)>,
    /// Frames a segw sent that did not reach the initiator side.
    pub returns_lost: u64,
    /// Where each tunnel is at the end (index into `segws`; `None` for
    /// one that closed), in arrival order as long as no tunnel ended: with [`Arrivals::Given`], the
    /// tunnel-by-tunnel prediction.
    pub placements: Vec<Option<usize>>,
    /// Per event: for a `balancer_fail`, how the standby's takeover went;
    /// `None` for every other event. Empty where nobody modelled it (a
    /// lab's measured outcome).
    pub takeovers: Vec<Option<Takeover>>,
}

/// One `balancer_fail`, tunnel by tunnel: the standby takes over with the
/// table as replicated to it, and places again what it does not know.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Takeover {
    /// Tunnels up at the failure (on a segw, not closed): those kept and
    /// those placed again, but for any the standby refused (every segw
    /// full), which count as refusals.
    pub tunnels: u64,
    /// Known to the standby: they stay on their segw, no policy asked.
    pub kept: u64,
    /// Opened within the replication lag before the failure, so unknown to
    /// the standby: its policy placed them again on their next packet ...
    pub replaced: u64,
    /// ... on another segw than the one holding their SA.
    pub moved: u64,
    /// Every tunnel in the dark: the detection time for all, and for a
    /// moved one then as long as its peers take to notice.
    pub outage: Summary,
}

/// The seed of a run with [`Arrivals::Given`] tunnels: their traffic
/// profiles are drawn from it by arrival number, so that the lab sends each
/// tunnel what the simulation will predict for it.
pub const GIVEN_SEED: u64 = 0;

/// Where a run's tunnels come from.
#[derive(Debug, Clone, Copy)]
pub enum Arrivals<'a> {
    /// The scenario's population, drawn from this seed.
    Seeded(u64),
    /// These tunnels, in this order, each in its step, living to the end
    /// (the scenario's count, shares and churn do not apply): the lab's
    /// tunnels as the balancer saw them, to predict where they land.
    Given(&'a [GivenPeer]),
}

/// One tunnel named by the caller.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GivenPeer {
    /// The step it arrives in.
    pub step: u32,
    pub addr: IpAddr,
    /// The port its IKE_SA_INIT came from: 500, or what a NAT made of it.
    pub ike_port: u16,
    /// The port after the float to 4500 (a NAT's), or `None` for raw ESP
    /// with IKE staying on 500.
    pub natt_port: Option<u16>,
    pub ike_spi: u64,
    /// The step at whose start its initiator closes it (IKE DELETE): from
    /// then on it sends nothing and counts on no segw. The balancer keeps
    /// its entry until idle expiry, as the real one does.
    #[serde(default)]
    pub ends: Option<u32>,
}

/// A policy with a stopwatch on `choose`.
struct Timed {
    inner: Box<dyn Policy>,
    spent_ns: Arc<AtomicU64>,
}

impl Policy for Timed {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn set_gateways(&mut self, gateways: &[Gateway]) -> Result<(), CallError> {
        self.inner.set_gateways(gateways)
    }
    fn choose(&mut self, key: &TunnelKey, load: &Load) -> Result<Option<u32>, CallError> {
        let started = Instant::now();
        let answer = self.inner.choose(key, load);
        self.spent_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        answer
    }
}

struct Peer {
    addr: IpAddr,
    /// Source port of IKE on 500: 500, or what the NAT made of it.
    ike_port: u16,
    /// Source port after the float to 4500; `None`: raw ESP, IKE stays on 500.
    natt_port: Option<u16>,
    ike_spi: u64,
    responder_spi: u64,
    /// ESP SPIs: towards the segw, and back.
    spi_in: u32,
    spi_out: u32,
    seq: u32,
    /// Where its packets land (index into `segws`); `None` before the
    /// first, and after a refusal (every segw full) until it is placed.
    segw: Option<usize>,
    /// It was refused at least once.
    refused: bool,
    /// Closed by its initiator (a given tunnel's `ends`): it sends nothing.
    closed: bool,
    /// What it carries, with the scenario's `[traffic]`.
    profile: Option<Profile>,
    /// When its entry in the table was made: its opening as
    /// [`Sim::spread_openings`] times it, or the new IKE SA of a graceful
    /// move.
    opened: Timestamp,
    /// Unknown to the balancer serving now (opened within the replication
    /// lag before it took over): its next packet is a miss.
    unknown: bool,
}

/// Where one segw of a scenario stands as its events move it: what the
/// simulation and the lab driver both track to know fair shares and the
/// fewest moves an event allows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SegwNow {
    pub present: bool,
    pub up: bool,
    pub draining: bool,
    pub weight: u32,
}

impl SegwNow {
    /// Every segw of `scenario` (`Scenario::all_segws` order) at the start:
    /// the ones it lists present and up, the ones its events add absent.
    pub fn at_start(scenario: &Scenario) -> Vec<SegwNow> {
        scenario
            .all_segws()
            .iter()
            .enumerate()
            .map(|(i, s)| SegwNow {
                present: i < scenario.segws.len(),
                up: true,
                draining: false,
                weight: s.weight,
            })
            .collect()
    }

    /// Still there and answering: a tunnel leaving it was not pushed.
    pub fn is_live(&self) -> bool {
        self.present && self.up
    }

    /// Its weight while it takes new tunnels, else 0: its fair share.
    pub fn fair_weight(&self) -> u32 {
        if self.is_live() && !self.draining {
            self.weight
        } else {
            0
        }
    }

    /// `event` happened to the set `now` (in `segws` order).
    pub fn apply(now: &mut [SegwNow], segws: &[SegwSpec], event: &Event) {
        match event {
            Event::Fail(n) => now[segw_index(segws, n)].up = false,
            Event::Recover(n) => now[segw_index(segws, n)].up = true,
            Event::Add(spec) => {
                now[segw_index(segws, &spec.name)] = SegwNow {
                    present: true,
                    up: true,
                    draining: false,
                    weight: spec.weight,
                }
            }
            Event::Remove(n) => now[segw_index(segws, n)].present = false,
            Event::Weight(n, w) => now[segw_index(segws, n)].weight = *w,
            Event::Drain(n) => now[segw_index(segws, n)].draining = true,
            Event::Undrain(n) => now[segw_index(segws, n)].draining = false,
            Event::Swap { .. } | Event::BalancerFail(_) | Event::BalancerRecover => {}
        }
    }
}

/// The core's configuration in front of `segws` segws (segw n on port n,
/// as [`farm`] lays them out), answering for the VIPs on the uplink.
pub(crate) fn core_config(segws: usize, max_tunnels: usize) -> Config {
    Config {
        port_macs: (0..=segws as PortId).map(farm::port_mac).collect(),
        proxy: vec![
            Prefix::new(IpAddr::V4(VIP), 32).expect("a /32"),
            Prefix::new(IpAddr::V6(VIP6), 128).expect("a /128"),
        ],
        proxy_gateways: Vec::new(),
        max_tunnels,
        timeouts: Timeouts::default(),
    }
}

/// The position of the segw `name` in `segws`.
pub(crate) fn segw_index(segws: &[SegwSpec], name: &str) -> usize {
    segws
        .iter()
        .position(|s| s.name == name)
        .expect("the scenario was validated: events name known segws")
}

/// The fewest tunnels any policy must move for `event`, from the tunnels
/// per segw and the segws' states just before it: a failed or removed
/// segw's tunnels; on a rebalance, every segw's excess over its fair
/// share; nothing otherwise (a balancer's failure too: a standby whose
/// policy answers what the active's did moves nothing).
pub(crate) fn minimum_moved(
    event: &Event,
    graceful: bool,
    counts: &[u64],
    now: &[SegwNow],
    segws: &[SegwSpec],
) -> u64 {
    match event {
        Event::Fail(n) | Event::Remove(n) => counts[segw_index(segws, n)],
        Event::Drain(n) if graceful => counts[segw_index(segws, n)],
        Event::Swap { rebalance: true } => {
            let weights: Vec<u32> = now.iter().map(SegwNow::fair_weight).collect();
            counts
                .iter()
                .zip(fair_shares(counts, &weights))
                .map(|(&c, f)| (c as f64 - f).max(0.0))
                .sum::<f64>()
                .round() as u64
        }
        _ => 0,
    }
}

struct Sim<'s> {
    scenario: &'s Scenario,
    segws: Vec<SegwSpec>,
    state: Vec<SegwNow>,
    /// What the balancer was built from: a standby is built the same.
    config: Config,
    /// The balancer serving: the first, or the standby that took over.
    lb: Balancer<Timed>,
    /// What the balancers that failed counted before they did.
    served: Served,
    spent_ns: Arc<AtomicU64>,
    peers: Vec<Peer>,
    counts: Vec<u64>,
    rng: Rng,
    /// With [`Arrivals::Given`]: the tunnels, taken in order.
    given: &'s [GivenPeer],
    next_host: u32,
    nat_ports: Vec<u16>,
    now: Timestamp,
    rebalancing: bool,
    moved_this_step: u64,
    /// How long each tunnel moved this step stays dark.
    dark_this_step: Vec<Dark>,
    /// A peer is following a graceful move (its new IKE SA lands on the
    /// target): not a move that darkens it, not a split.
    following: bool,
    graceful_this_step: u64,
    /// New IKE SAs of graceful moves by (second of the run, segw).
    setups_this_step: std::collections::HashMap<(u64, usize), u64>,
    split: u64,
    frames: u64,
    returns_lost: u64,
    refused_tunnels: u64,
    /// Tunnels arrived so far: the next one's number, for its profile.
    arrived: u64,
    seed: u64,
    /// This step's traffic, with the scenario's `[traffic]`.
    step: Option<Step>,
    /// Each segw's bytes by the serving balancer's counters when last read.
    carried: Vec<u64>,
    /// The peers opened this step, in order.
    opening: Vec<usize>,
    /// A takeover this step, and its tunnels' time in the dark.
    takeover: Option<Takeover>,
    takeover_darks: Vec<Dark>,
    buf: Vec<u8>,
}

/// What a balancer counted: kept when it fails, so that a run's figures are
/// those of every balancer that served in it.
#[derive(Debug, Default)]
struct Served {
    decisions: u64,
    fallbacks: u64,
    full_answers: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl Served {
    fn add(&mut self, lb: &Balancer<Timed>) {
        let stats = lb.policy_stats();
        self.decisions += stats.decisions;
        self.fallbacks += stats.fallbacks_total();
        self.full_answers += stats.fallbacks_for(FallbackReason::GatewayFull);
        for (n, &r) in self.drops.iter_mut().zip(&DropReason::ALL) {
            *n += lb.counters().dropped(r);
        }
    }
}

/// Run `scenario` with the policy `make` builds (once at the start, again at
/// each swap). `progress` hears each finished step.
pub fn run(
    scenario: &Scenario,
    seed: u64,
    make: &mut dyn FnMut() -> Box<dyn Policy>,
    progress: &mut dyn FnMut(u32),
) -> Outcome {
    run_with(scenario, Arrivals::Seeded(seed), make, progress)
}

/// [`run`] with the tunnels from `arrivals`.
pub fn run_with(
    scenario: &Scenario,
    arrivals: Arrivals,
    make: &mut dyn FnMut() -> Box<dyn Policy>,
    progress: &mut dyn FnMut(u32),
) -> Outcome {
    let (seed, given) = match arrivals {
        Arrivals::Seeded(seed) => (seed, None),
        Arrivals::Given(peers) => (GIVEN_SEED, Some(peers)),
    };
    let segws = scenario.all_segws();
    let spent_ns = Arc::new(AtomicU64::new(0));
    let first = Timed {
        inner: make(),
        spent_ns: spent_ns.clone(),
    };
    let policy = first.name().to_string();
    // Room for every tunnel that ever lives: ended ones stay until idle
    // expiry, as they would in a real balancer.
    let max_tunnels = given.map_or(scenario.total_tunnels(), <[_]>::len) + 1024;
    let config = core_config(segws.len(), max_tunnels);
    let mut sim = Sim {
        scenario,
        state: SegwNow::at_start(scenario),
        counts: vec![0; segws.len()],
        carried: vec![0; segws.len()],
        segws,
        lb: Balancer::new(config.clone(), first),
        config,
        served: Served::default(),
        spent_ns,
        peers: Vec::with_capacity(given.map_or(scenario.tunnels.count, <[_]>::len)),
        given: given.unwrap_or_default(),
        rng: Rng::new(seed),
        next_host: 0,
        nat_ports: vec![0; scenario.tunnels.nat_addresses as usize],
        now: Timestamp::ZERO,
        rebalancing: false,
        moved_this_step: 0,
        dark_this_step: Vec::new(),
        following: false,
        graceful_this_step: 0,
        setups_this_step: Default::default(),
        split: 0,
        frames: 0,
        returns_lost: 0,
        refused_tunnels: 0,
        arrived: 0,
        seed,
        step: None,
        opening: Vec::new(),
        takeover: None,
        takeover_darks: Vec::new(),
        buf: Vec::with_capacity(1600),
    };
    for i in 0..scenario.segws.len() {
        sim.add_gateway(i);
    }
    sim.set_move_settings();

    let t = &scenario.tunnels;
    let arrive_over = t.arrive_over.max(1) as usize;
    let churned = (t.count as f64 * t.churn).round() as usize;
    let (mut moved, mut minimum) = (Vec::new(), Vec::new());
    let mut darks: Vec<Vec<Dark>> = Vec::new();
    let (mut graceful, mut setups_peak) = (Vec::new(), Vec::new());
    let mut per_step = Vec::with_capacity(scenario.steps as usize);
    let mut bytes_per_step = Vec::with_capacity(scenario.steps as usize);
    let mut refused_per_step = Vec::with_capacity(scenario.steps as usize);
    let mut takeovers = Vec::new();
    let mut last_event: Option<usize> = None;
    // The balancer_fail event of this step, if any.
    let mut takeover_at: Option<usize> = None;
    for step in 0..scenario.steps {
        sim.now = Timestamp::from_secs(u64::from(step) * scenario.step_secs);
        sim.step = scenario.traffic.as_ref().map(|t| {
            let secs = scenario.step_secs as f64;
            t.step(f64::from(step) * secs, secs)
        });
        // The last step's traffic, as rates: what load-aware policies see.
        sim.lb.measure(sim.now);
        sim.moved_this_step = 0;
        sim.rebalancing = false;
        // Tunnels end first, so an event's minimum counts only tunnels that
        // will send in its step.
        if step as usize >= arrive_over && given.is_none() {
            for _ in 0..churned.min(sim.peers.len()) {
                let gone = sim.rng.below(sim.peers.len() as u64) as usize;
                let peer = sim.peers.swap_remove(gone);
                if let Some(g) = peer.segw {
                    sim.counts[g] -= 1;
                }
            }
        }
        if let Some(given) = given {
            for (i, p) in given.iter().enumerate().take(sim.peers.len()) {
                if p.ends == Some(step) {
                    sim.close(i);
                }
            }
        }
        for event in scenario.events.iter().filter(|e| e.step == step) {
            minimum.push(sim.apply(&event.event, event.graceful, make));
            moved.push(0);
            darks.push(Vec::new());
            graceful.push(0);
            setups_peak.push(0);
            takeovers.push(None);
            last_event = Some(moved.len() - 1);
            if matches!(event.event, Event::BalancerFail(_)) {
                takeover_at = last_event;
            }
        }
        let arrivals = if let Some(given) = given {
            given.iter().filter(|p| p.step == step).count()
        } else if (step as usize) < arrive_over {
            let peak = t.peak.filter(|p| p.step == step).map_or(0, |p| p.tunnels);
            t.count * (step as usize + 1) / arrive_over - t.count * step as usize / arrive_over
                + peak
        } else {
            scenario.population_at(step).saturating_sub(sim.peers.len())
        };
        let refused_before = sim.lb.counters().dropped(DropReason::AtCapacity);
        let old = sim.peers.len();
        for _ in 0..arrivals {
            sim.arrive();
        }
        for i in 0..sim.peers.len() {
            // The table is far larger than the cache: start the lookup of a
            // tunnel a few ahead, so its miss overlaps this one's work.
            let ahead = sim.peers.get(i + PREFETCH_AHEAD);
            if let Some((addr, Some(port))) = ahead.map(|p| (p.addr, p.natt_port)) {
                sim.lb.prefetch(addr, port);
            }
            if sim.peers[i].closed {
                continue;
            }
            // New, or refused before (every segw was full): IKE_SA_INIT
            // again, as an initiator retries.
            if i >= old || sim.peers[i].segw.is_none() {
                sim.open(i);
                sim.opening.push(i);
            }
            if sim.peers[i].segw.is_some() {
                match sim.peers[i].profile {
                    Some(profile) => sim.traffic(i, profile),
                    None => {
                        for _ in 0..t.packets_per_step {
                            sim.esp(i, None);
                        }
                    }
                }
            }
        }
        refused_per_step.push(sim.lb.counters().dropped(DropReason::AtCapacity) - refused_before);
        sim.spread_openings();
        sim.play_moves();
        match last_event {
            Some(e) => {
                moved[e] += sim.moved_this_step + sim.graceful_this_step;
                darks[e].append(&mut sim.dark_this_step);
                graceful[e] += sim.graceful_this_step;
                let peak = sim.setups_this_step.values().max().copied().unwrap_or(0);
                setups_peak[e] = setups_peak[e].max(peak);
            }
            None => {
                sim.split += sim.moved_this_step;
                sim.dark_this_step.clear();
            }
        }
        if let Some(e) = takeover_at.take() {
            takeovers[e] = Some(sim.took_over());
        }
        per_step.push(sim.counts.clone());
        bytes_per_step.push(sim.carried_since());
        sim.lb.expire(sim.now, usize::MAX);
        progress(step);
    }

    let mut served = sim.served;
    served.add(&sim.lb);
    Outcome {
        policy,
        fair_weights: sim.state.iter().map(SegwNow::fair_weight).collect(),
        segws: sim.segws,
        per_step,
        bytes_per_step,
        moved,
        minimum_moved: minimum,
        outage: darks.iter().map(|d| Summary::of(d)).collect(),
        graceful,
        setups_peak,
        split: sim.split,
        decisions: served.decisions,
        policy_ns: sim.spent_ns.load(Ordering::Relaxed),
        fallbacks: served.fallbacks,
        full_answers: served.full_answers,
        refused_per_step,
        refused_tunnels: sim.refused_tunnels,
        frames: sim.frames,
        drops: DropReason::ALL
            .iter()
            .zip(served.drops)
            .map(|(r, n)| (r.as_str(), n))
            .filter(|&(_, n)| n > 0)
            .collect(),
        returns_lost: sim.returns_lost,
        placements: sim.peers.iter().map(|p| p.segw).collect(),
        takeovers,
    }
}

impl Sim<'_> {
    fn add_gateway(&mut self, i: usize) {
        let port = (i + 1) as PortId;
        let spec = GatewaySpec {
            name: self.segws[i].name.clone(),
            port,
            mac: Some(farm::segw_mac(port as u8)),
            weight: self.state[i].weight,
            capacity: self.segws[i].capacity,
            throughput: self.segws[i].throughput,
            ..Default::default()
        };
        self.lb
            .add_gateway(spec, self.now)
            .expect("the scenario was validated: names are unique");
    }

    fn set_move_settings(&mut self) {
        self.lb.set_move_settings(crate::balancer::moves::Settings {
            per_second: self.scenario.moves_per_second,
            ..Default::default()
        });
    }

    /// Apply one event (`graceful`: its moves make-before-break); returns
    /// the fewest tunnels any policy must move.
    fn apply(
        &mut self,
        event: &Event,
        graceful: bool,
        make: &mut dyn FnMut() -> Box<dyn Policy>,
    ) -> u64 {
        let now = self.now;
        let minimum = minimum_moved(event, graceful, &self.counts, &self.state, &self.segws);
        SegwNow::apply(&mut self.state, &self.segws, event);
        let checked = "the scenario was validated: events name segws present then";
        match event {
            Event::Fail(n) | Event::Recover(n) => {
                let up = matches!(event, Event::Recover(_));
                self.lb.set_healthy(n, up, now).expect(checked);
            }
            Event::Add(spec) => {
                let i = segw_index(&self.segws, &spec.name);
                self.segws[i].weight = spec.weight;
                self.add_gateway(i);
            }
            Event::Remove(n) => self.lb.remove_gateway(n, now).expect(checked),
            Event::Weight(n, w) => self.lb.set_weight(n, *w, now).expect(checked),
            Event::Drain(n) if graceful => {
                self.lb.drain_gracefully(n, now).expect(checked);
            }
            Event::Drain(n) | Event::Undrain(n) => {
                let draining = matches!(event, Event::Drain(_));
                self.lb.set_draining(n, draining, now).expect(checked);
            }
            Event::Swap { rebalance } => {
                let next = Timed {
                    inner: make(),
                    spent_ns: self.spent_ns.clone(),
                };
                if *rebalance && graceful {
                    // Its moves are queued; the peers follow in `play_moves`.
                    self.lb.swap_policy_gracefully(next, now);
                    while self.lb.rebalance_step(usize::MAX, now).is_none() {}
                } else {
                    self.lb.replace_policy(next, *rebalance, now);
                    self.rebalancing = *rebalance;
                }
            }
            Event::BalancerFail(_) => self.take_over(make),
            // Back as the standby, it takes a snapshot and forwards nothing.
            Event::BalancerRecover => {}
        }
        minimum
    }

    /// The pair's active balancer fails and the standby takes over. The
    /// standby is a balancer of its own: the same configuration, the segws
    /// as they stand, its own instance of the policy (which has placed
    /// nothing: a round-robin starts its turn afresh, and its load view
    /// has no rates until it measures), and the active's table as it was
    /// `replication_lag` ago, as the state file carries it
    /// (`Balancer::save`, `restore`) less the tunnels opened since. Those
    /// are unknown to it: their next packet is a miss its policy places.
    /// What the active had queued (graceful moves) is not replicated.
    fn take_over(&mut self, make: &mut dyn FnMut() -> Box<dyn Policy>) {
        let pair = self.scenario.pair;
        let since = self.now.before(pair.replication_lag);
        let mut takeover = Takeover::default();
        let mut unknown = HashSet::new();
        for p in self.peers.iter_mut() {
            if p.closed || p.segw.is_none() {
                continue;
            }
            takeover.tunnels += 1;
            if p.opened > since {
                p.unknown = true;
                unknown.insert(p.ike_spi);
            } else {
                takeover.kept += 1;
            }
        }
        let known = Dark {
            seconds: Some(pair.detection.as_secs_f64()),
            found: Found::Takeover,
        };
        for _ in 0..takeover.kept {
            self.dark_at_takeover(known);
        }
        self.takeover = Some(takeover);

        let mut replicated = self.lb.save(self.now);
        replicated.retain(|t| !t.ike_spi.is_some_and(|spi| unknown.contains(&spi)));
        let policy = Timed {
            inner: make(),
            spent_ns: self.spent_ns.clone(),
        };
        let standby = Balancer::new(self.config.clone(), policy);
        let failed = std::mem::replace(&mut self.lb, standby);
        self.served.add(&failed);
        let checked = "the standby has every segw present";
        for i in 0..self.segws.len() {
            let segw = self.state[i];
            if !segw.present {
                continue;
            }
            self.add_gateway(i);
            let name = &self.segws[i].name;
            if !segw.up {
                self.lb.set_healthy(name, false, self.now).expect(checked);
            }
            if segw.draining {
                self.lb.set_draining(name, true, self.now).expect(checked);
            }
        }
        self.set_move_settings();
        let restored = self.lb.restore(&replicated, self.now);
        assert_eq!(
            restored.loaded,
            replicated.len(),
            "a replicated table restores whole ({restored})"
        );
        // Its counters start at 0.
        self.carried.fill(0);
    }

    /// Tunnel `i`, unknown to the standby that took over, was placed again
    /// by its policy, on another segw (`moved`) or its own. It was dark for
    /// the detection time; moved, then as long as its peers take to notice
    /// (its old segw still holding its SA and answering, or not).
    fn replaced(&mut self, i: usize, moved: bool, old_answers: bool) {
        let detection = self.scenario.pair.detection.as_secs_f64();
        let dark = if moved {
            let after = self.dark(i, old_answers);
            Dark {
                seconds: after.seconds.map(|s| detection + s),
                ..after
            }
        } else {
            Dark {
                seconds: Some(detection),
                found: Found::Takeover,
            }
        };
        self.dark_at_takeover(dark);
        let t = (self.takeover.as_mut()).expect("an unknown tunnel lands in its takeover's step");
        t.replaced += 1;
        t.moved += u64::from(moved);
    }

    /// This step's takeover, over: its tunnels' time in the dark summed up.
    /// A tunnel still unknown was not placed in its step (refused: every
    /// segw full) and counts as a refusal, not as the takeover's.
    fn took_over(&mut self) -> Takeover {
        for p in &mut self.peers {
            p.unknown = false;
        }
        let mut takeover = self.takeover.take().expect("a balancer_fail takes over");
        takeover.outage = Summary::of(&self.takeover_darks);
        self.takeover_darks.clear();
        takeover
    }

    /// A tunnel's time in the dark at a takeover: the event's and the
    /// takeover's own.
    fn dark_at_takeover(&mut self, dark: Dark) {
        self.dark_this_step.push(dark);
        self.takeover_darks.push(dark);
    }

    /// The tunnels opened this step, timed: spread evenly over the step in
    /// the order they were opened, the k-th of n at the middle of the k-th
    /// n-th of it.
    ///
    /// A step's openings all go through the core at its start, and nothing
    /// else cares when within it each happened; a `balancer_fail` does,
    /// at the start of a later step: the ones within the replication lag
    /// before it are unknown to the standby. Spread this way, a lag L
    /// covers the last round(n × L / step) of the step's openings (a tie
    /// rounds down), the share arrivals uniform over the step would give
    /// on average, and the tunnels re-placed are the last ones opened.
    /// It is deterministic and draws nothing, so a scenario's other
    /// figures do not change when it gains a failover; random times would
    /// add noise, not truth: the simulation does not time arrivals within
    /// a step in the first place.
    fn spread_openings(&mut self) {
        let step = Duration::from_secs(self.scenario.step_secs).as_nanos();
        let n = self.opening.len() as u128;
        for (k, &i) in self.opening.iter().enumerate() {
            let at = step * (2 * k as u128 + 1) / (2 * n);
            self.peers[i].opened = self.now + Duration::from_nanos(at as u64);
        }
        self.opening.clear();
    }

    /// A new peer: the next given one; else its own address, or a NAT's
    /// address with a fresh port.
    fn arrive(&mut self) {
        let t = &self.scenario.tunnels;
        let mut ike_spi = self.rng.next_u64() | 1;
        let responder_spi = self.rng.next_u64() | 1;
        let spi_in = (self.rng.next_u64() as u32) | 0x100;
        let spi_out = (self.rng.next_u64() as u32) | 0x100;
        let (addr, ike_port, natt_port) = if let Some(p) = self.given.get(self.peers.len()) {
            ike_spi = p.ike_spi;
            (p.addr, p.ike_port, p.natt_port)
        } else if self.rng.chance(t.nat) {
            let nat = self.rng.below(u64::from(t.nat_addresses)) as usize;
            // 100.64.0.0/10, carrier-grade NAT space; the NAT hands out
            // ports in turn, one mapping for 500 and one for 4500.
            let mut port = || {
                self.nat_ports[nat] = self.nat_ports[nat].wrapping_add(1);
                1024 + self.nat_ports[nat] % 64_000
            };
            let (a, b) = (port(), port());
            (
                IpAddr::V4(Ipv4Addr::from(0x6440_0000 + nat as u32)),
                a,
                Some(b),
            )
        } else {
            // A distinct address each (an odd stride visits all): in
            // 10.0.0.0/8, or over IPv6 in 2001:db8:100::/48. (No draw
            // without an IPv6 share: IPv4-only scenarios keep their seeds.)
            self.next_host = self.next_host.wrapping_add(0x9e3779b1);
            let host = self.next_host & 0x00ff_ffff;
            let addr = if t.ipv6 > 0.0 && self.rng.chance(t.ipv6) {
                IpAddr::V6(Ipv6Addr::from(
                    (0x2001_0db8_0100_u128 << 80) | u128::from(host),
                ))
            } else {
                IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | host))
            };
            let raw = self.rng.chance(t.raw_esp);
            (addr, 500, if raw { None } else { Some(4500) })
        };
        // Drawn by arrival number: the population's draws above are the
        // same with traffic or without.
        let profile = (self.scenario.traffic.as_ref()).map(|t| t.profile(self.seed, self.arrived));
        self.arrived += 1;
        self.peers.push(Peer {
            addr,
            ike_port,
            natt_port,
            ike_spi,
            responder_spi,
            spi_in,
            spi_out,
            seq: 0,
            segw: None,
            refused: false,
            closed: false,
            profile,
            opened: self.now,
            unknown: false,
        });
    }

    /// What each segw carried since last asked (both ways, as the serving
    /// balancer counted).
    fn carried_since(&mut self) -> Vec<u64> {
        self.segws
            .iter()
            .zip(self.carried.iter_mut())
            .map(|(spec, total)| {
                let now = self
                    .lb
                    .gateway(&spec.name)
                    .map_or(*total, |g| g.counters.bytes_to + g.counters.bytes_from);
                now.saturating_sub(std::mem::replace(total, now))
            })
            .collect()
    }

    /// Tunnel `i`'s traffic this step: one ESP frame each way standing for
    /// all its packets.
    fn traffic(&mut self, i: usize, profile: Profile) {
        let step = self.step.as_ref().expect("a profile has traffic");
        let sent = step.sent(profile);
        self.esp(i, Some(sent));
    }

    /// Its initiator closes tunnel `i`: off its segw's count, silent from
    /// now on. The balancer hears nothing it can read (the DELETE is
    /// encrypted) and keeps the entry until idle expiry.
    fn close(&mut self, i: usize) {
        let p = &mut self.peers[i];
        p.closed = true;
        if let Some(g) = p.segw.take() {
            self.counts[g] -= 1;
        }
    }

    /// IKE_SA_INIT and IKE_AUTH, each answered.
    fn open(&mut self, i: usize) {
        let p = &self.peers[i];
        let opening = Opening {
            addr: p.addr,
            ike_port: p.ike_port,
            natt_port: p.natt_port,
            initiator_spi: p.ike_spi,
        };
        let theirs = p.responder_spi;
        self.peer_sends(i, &opening.init());
        if self.peers[i].segw.is_none() {
            // Refused: no segw answers; it tries again next step.
            return;
        }
        self.segw_answers(i, &opening.init_reply(theirs));
        self.peer_sends(i, &opening.auth(theirs));
        self.segw_answers(i, &opening.auth_reply(theirs));
    }

    /// One ESP packet each way; with `bulk`, standing for that traffic.
    fn esp(&mut self, i: usize, bulk: Option<(Sent, Sent)>) {
        let p = &mut self.peers[i];
        p.seq = p.seq.wrapping_add(1);
        let len = self.scenario.tunnels.esp_bytes as usize;
        let ports = p.natt_port.map(|port| (port, 4500));
        EspFrame {
            dst: farm::port_mac(UPLINK),
            src: ROUTER,
            from: p.addr,
            to: vip_for(p.addr),
            ports,
            spi: p.spi_in,
            seq: p.seq,
            len,
        }
        .write(&mut self.buf);
        self.send_in_as(i, bulk.map(|(up, _)| up));
        let p = &self.peers[i];
        let Some(g) = p.segw else { return };
        let port = (g + 1) as PortId;
        EspFrame {
            dst: farm::port_mac(port),
            src: farm::segw_mac(port as u8),
            from: vip_for(p.addr),
            to: p.addr,
            ports: ports.map(|(a, b)| (b, a)),
            spi: p.spi_out,
            seq: p.seq,
            len,
        }
        .write(&mut self.buf);
        self.send_back_as(port, bulk.map(|(_, down)| down));
    }

    fn peer_sends(&mut self, i: usize, ip: &[u8]) {
        self.buf = craft::frame(farm::port_mac(UPLINK), ROUTER, None, ip);
        self.send_in(i);
    }

    fn segw_answers(&mut self, i: usize, ip: &[u8]) {
        let Some(g) = self.peers[i].segw else { return };
        let port = (g + 1) as PortId;
        self.buf = craft::frame(farm::port_mac(port), farm::segw_mac(port as u8), None, ip);
        self.send_back(port);
    }

    /// `buf` from peer `i` into the uplink; note where it lands, or that it
    /// was refused (every segw full): then the peer has no segw until a
    /// later try is placed.
    fn send_in(&mut self, i: usize) {
        self.send_in_as(i, None)
    }

    /// [`send_in`](Self::send_in), standing for `bulk` when it carries any.
    fn send_in_as(&mut self, i: usize, bulk: Option<Sent>) {
        self.frames += 1;
        let verdict = match bulk.filter(|b| b.packets > 0) {
            Some(b) => self
                .lb
                .handle_bulk(&mut self.buf, UPLINK, self.now, bulk_of(b)),
            None => self.lb.handle(&mut self.buf, UPLINK, self.now),
        };
        match verdict {
            Verdict::Drop(DropReason::AtCapacity) => {
                let peer = &mut self.peers[i];
                if let Some(old) = peer.segw.take() {
                    self.counts[old] -= 1;
                }
                if !std::mem::replace(&mut peer.refused, true) {
                    self.refused_tunnels += 1;
                }
            }
            verdict => {
                if let Some(port) = verdict.forwarded_to().filter(|&p| p != UPLINK) {
                    self.landed(i, usize::from(port) - 1);
                }
            }
        }
    }

    /// `buf` from the segw on `port`; it must reach the initiator side.
    fn send_back(&mut self, port: PortId) {
        self.send_back_as(port, None)
    }

    fn send_back_as(&mut self, port: PortId, bulk: Option<Sent>) {
        self.frames += 1;
        let verdict = match bulk.filter(|b| b.packets > 0) {
            Some(b) => self
                .lb
                .handle_bulk(&mut self.buf, port, self.now, bulk_of(b)),
            None => self.lb.handle(&mut self.buf, port, self.now),
        };
        if verdict.forwarded_to() != Some(UPLINK) {
            self.returns_lost += 1;
        }
    }

    fn landed(&mut self, i: usize, segw: usize) {
        let peer = &mut self.peers[i];
        let before = peer.segw.replace(segw);
        let unknown = std::mem::take(&mut peer.unknown);
        if let Some(old) = before {
            if old != segw {
                self.counts[old] -= 1;
            }
        }
        if before != Some(segw) {
            self.counts[segw] += 1;
        }
        if self.following {
            if before != Some(segw) {
                self.graceful_this_step += 1;
                let second = self.now.since_epoch().as_secs();
                *self.setups_this_step.entry((second, segw)).or_default() += 1;
            }
            return;
        }
        let old_up = before.is_some_and(|g| self.state[g].is_live());
        let old_answers = before.is_some_and(|g| self.state[g].up);
        // Placed afresh by a standby that did not know it, it left its segw
        // by the failover, as by a rebalance: a move, not a split.
        let landing = landing(before, segw, old_up, self.rebalancing || unknown);
        if landing == Landing::Moved {
            self.moved_this_step += 1;
        }
        match landing {
            _ if unknown => self.replaced(i, landing == Landing::Moved, old_answers),
            Landing::Stayed | Landing::First => {}
            Landing::Moved => {
                let dark = self.dark(i, old_answers);
                self.dark_this_step.push(dark);
            }
            Landing::Split => self.split += 1,
        }
    }

    /// The graceful moves under way, over this step's seconds: the
    /// balancer asks them at its pace, and each peer asked follows at once,
    /// as strongSwan does a redirect (a new IKE SA and CHILD_SA from the
    /// same endpoint, new SPIs; the old SAs end when the new ones work).
    fn play_moves(&mut self) {
        self.graceful_this_step = 0;
        self.setups_this_step.clear();
        if self.lb.moves().is_empty() {
            return;
        }
        let start = self.now;
        let end = start + Duration::from_secs(self.scenario.step_secs);
        let mut at: std::collections::HashMap<(IpAddr, u16), usize> = self
            .peers
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.closed && p.segw.is_some())
            .map(|(i, p)| ((p.addr, p.natt_port.unwrap_or(p.ike_port)), i))
            .collect();
        while self.now < end && !self.lb.moves().is_empty() {
            for ask in self.lb.graceful_step(self.now) {
                if let Some(i) = at.remove(&(ask.peer, ask.peer_port)) {
                    self.follow(i);
                }
            }
            self.now = self.now + MOVES_TICK;
        }
        self.now = start;
    }

    /// Peer `i` follows a redirect: a new IKE SA, new SPIs.
    fn follow(&mut self, i: usize) {
        let p = &mut self.peers[i];
        p.opened = self.now;
        p.ike_spi = self.rng.next_u64() | 1;
        p.responder_spi = self.rng.next_u64() | 1;
        p.spi_in = (self.rng.next_u64() as u32) | 0x100;
        p.spi_out = (self.rng.next_u64() as u32) | 0x100;
        self.following = true;
        self.open(i);
        self.following = false;
    }

    /// How long tunnel `i`, just moved off a segw that still answers for
    /// its SA or not, stays dark: the peers' timers and its downlink.
    fn dark(&self, i: usize, old_answers: bool) -> Dark {
        let peer = &self.peers[i];
        let down_packets = match (peer.profile, &self.step) {
            (Some(profile), Some(step)) => step.sent(profile).1.packets,
            _ => u64::from(self.scenario.tunnels.packets_per_step),
        };
        self.scenario.peers.dark(Move {
            old_answers,
            downlink_every: self.scenario.step_secs as f64 / down_packets as f64,
            phase: Move::phase_of(peer.ike_spi),
        })
    }
}

/// How a peer opens a tunnel, as the IP packets each side sends: IKE_SA_INIT
/// and its answer on 500, then IKE_AUTH and its answer, on 4500 after the
/// float (from `natt_port`, with the non-ESP marker) or on 500 for a peer
/// that stays there and sends raw ESP.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Opening {
    pub addr: IpAddr,
    /// The port its IKE_SA_INIT comes from: 500, or what a NAT made of it.
    pub ike_port: u16,
    pub natt_port: Option<u16>,
    pub initiator_spi: u64,
}

impl Opening {
    pub fn init(&self) -> Vec<u8> {
        self.ike(ike::IKE_SA_INIT, 0, false)
    }

    /// The segw's answer, with its own SPI of the IKE SA.
    pub fn init_reply(&self, responder_spi: u64) -> Vec<u8> {
        self.ike(ike::IKE_SA_INIT, responder_spi, true)
    }

    pub fn auth(&self, responder_spi: u64) -> Vec<u8> {
        self.ike(ike::IKE_AUTH, responder_spi, false)
    }

    pub fn auth_reply(&self, responder_spi: u64) -> Vec<u8> {
        self.ike(ike::IKE_AUTH, responder_spi, true)
    }

    /// The peer's port and the VIP's for the exchange, IKE on UDP.
    fn ports(&self, exchange: u8) -> (u16, u16, bool) {
        match self.natt_port {
            Some(port) if exchange != ike::IKE_SA_INIT => (port, 4500, true),
            _ => (self.ike_port, 500, false),
        }
    }

    fn ike(&self, exchange: u8, responder_spi: u64, response: bool) -> Vec<u8> {
        let header = IkeHeader {
            initiator_spi: self.initiator_spi,
            responder_spi,
            exchange,
            from_initiator: !response,
            response,
            message_id: u32::from(exchange == ike::IKE_AUTH),
        };
        let (port, vip_port, float) = self.ports(exchange);
        let body = craft::ike_body(&header, float, IKE_EXTRA);
        let vip = vip_for(self.addr);
        match response {
            false => craft::udp_packet(self.addr, port, vip, vip_port, &body),
            true => craft::udp_packet(vip, vip_port, self.addr, port, &body),
        }
    }
}

/// How often the simulation lets the balancer ask graceful moves.
const MOVES_TICK: Duration = Duration::from_millis(100);

fn bulk_of(sent: Sent) -> Bulk {
    Bulk {
        packets: sent.packets,
        bytes: sent.bytes,
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Landing {
    First,
    Stayed,
    /// Off a segw that failed or left, or by a rebalance: counted against
    /// the event.
    Moved,
    /// Off a segw that is still up, unasked: the tunnel is broken.
    Split,
}

/// What a packet of a tunnel last seen on `before` landing on `now` means.
pub(crate) fn landing(
    before: Option<usize>,
    now: usize,
    before_up: bool,
    rebalancing: bool,
) -> Landing {
    match before {
        None => Landing::First,
        Some(old) if old == now => Landing::Stayed,
        Some(_) if before_up && !rebalancing => Landing::Split,
        Some(_) => Landing::Moved,
    }
}

/// Each segw's fair share of `counts`' total, by `weights` (0: takes none).
pub fn fair_shares(counts: &[u64], weights: &[u32]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    let weight: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    weights
        .iter()
        .map(|&w| {
            if weight == 0 {
                0.0
            } else {
                total as f64 * w as f64 / weight as f64
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaving_a_segw_that_is_up_is_a_split_unless_a_rebalance_asked() {
        assert_eq!(landing(None, 1, true, false), Landing::First);
        assert_eq!(landing(Some(1), 1, true, false), Landing::Stayed);
        assert_eq!(landing(Some(1), 2, true, false), Landing::Split);
        assert_eq!(landing(Some(1), 2, true, true), Landing::Moved);
        assert_eq!(landing(Some(1), 2, false, false), Landing::Moved);
    }

    #[test]
    fn an_esp_frame_written_in_place_is_what_the_parser_reads() {
        let mut buf = Vec::new();
        let frame = EspFrame {
            dst: farm::port_mac(UPLINK),
            src: ROUTER,
            from: Ipv4Addr::new(100, 64, 0, 9).into(),
            to: VIP.into(),
            ports: Some((40_001, 4500)),
            spi: 0xc300_0001,
            seq: 7,
            len: 120,
        };
        frame.write(&mut buf);
        let parsed = crate::packet::parse(&buf).expect("a valid frame");
        let crate::packet::Kind::Ip(ip) = parsed.kind else {
            panic!("not IP")
        };
        assert_eq!(ip.src, frame.from);
        assert!(matches!(
            ip.payload,
            crate::packet::Payload::EspInUdp { spi: 0xc300_0001, udp } if udp.src == 40_001
        ));
        // The IPv4 header checksum verifies.
        assert_eq!(crate::packet::checksum::internet(&buf[14..34]), 0);
        EspFrame {
            ports: None,
            ..frame
        }
        .write(&mut buf);
        assert_eq!(buf.len(), 14 + 20 + 120);
        let crate::packet::Kind::Ip(ip) = crate::packet::parse(&buf).unwrap().kind else {
            panic!("not IP")
        };
        assert!(matches!(
            ip.payload,
            crate::packet::Payload::Esp { spi: 0xc300_0001 }
        ));
    }

    #[test]
    fn an_ipv6_esp_frame_written_in_place_is_the_one_craft_builds() {
        let peer = IpAddr::V6("2001:db8:100::7".parse().unwrap());
        let frame = EspFrame {
            dst: farm::port_mac(UPLINK),
            src: ROUTER,
            from: peer,
            to: IpAddr::V6(VIP6),
            ports: Some((4500, 4500)),
            spi: 0xc300_0002,
            seq: 9,
            len: 120,
        };
        let mut buf = Vec::new();
        frame.write(&mut buf);
        // craft builds it with etherparse, UDP checksum and all.
        let body = craft::esp_body(0xc300_0002, 9, 120);
        let ip = craft::udp_packet(peer, 4500, IpAddr::V6(VIP6), 4500, &body);
        assert_eq!(buf, craft::frame(farm::port_mac(UPLINK), ROUTER, None, &ip));
        EspFrame {
            ports: None,
            ..frame
        }
        .write(&mut buf);
        let ip = craft::ip_packet(peer, IpAddr::V6(VIP6), 50, &body, 0);
        assert_eq!(buf, craft::frame(farm::port_mac(UPLINK), ROUTER, None, &ip));
    }
}
