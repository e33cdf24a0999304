//! A `compare` scenario on real tunnels: the lab's initiators arrive step by
//! step, the scenario's events happen to real charons and to the running
//! balancer, and where each tunnel lands is read from the segws' SAs. The
//! result is the simulation's [`Outcome`], measured, so that `report.json`
//! has the same keys for both; and the tunnels' keys as the balancer saw
//! them ([`GivenPeer`]), so that the simulation can be asked to predict
//! exactly this run.
//!
//! What the lab does as the simulation does:
//! - arrivals and churn as [`churn::Plan`] lays them out: new initiators
//!   and returning peers initiate in turn, each once the balancer has
//!   decided the one before ([`initiate::in_order`]; arrival order is the
//!   plan's); closing tunnels are terminated by their initiators (IKE
//!   DELETE, all at once) at the start of their step, and the simulation
//!   is told the step (`ends`);
//! - a segw fails: every tunnel pings once (DPD stays quiet), the
//!   initiators' bridge drops their IKE and NAT keepalives for a moment
//!   ([`State::quiet_control`]), its charon is killed and its link goes
//!   down; once the balancer's health probes mark it down, one packet goes
//!   through each of its tunnels in arrival order, each re-placement
//!   confirmed before the next (the simulation re-places them on their
//!   next packet, in that order); then the initiators' DPD restarts them
//!   on the segws the balancer chose;
//! - a segw recovers (link up, a fresh charon), joins (a new namespace and
//!   `ctl gateway add`), leaves (`ctl gateway remove`, its tunnels
//!   re-placed as for a failure); weights and drains through `ctl`;
//! - a swap is `ctl policy use` with the same policy; a rebalance moves
//!   tunnels whose IPsec SAs stay behind, so DPD re-establishes them too
//!   (the initiators' DPD: the segws' is slower,
//!   [`super::strongswan::SEGW_DPD_SLOWER`]).
//!
//! - time in the dark: from a failure, a removal or a rebalance until
//!   the step settles, every tunnel live at it is probed 5 times a second
//!   ([`Prober`]); a moved tunnel's first answer ends its outage, which
//!   goes into the outcome per event as the simulation predicts it;
//! - traffic: with `[traffic]`, at the end of each step each tunnel sends
//!   its share through its real SA ([`Scaled`]), counted by the segws and
//!   the balancer around it;
//! - capacity: each segw's charon refuses IKE SAs past its capacity
//!   (`ikesa_limit`) as the balancer does; a tunnel refused (every segw
//!   full) is one whose initiator is up on no segw at the end of a step.
//!
//! What it does not: raw ESP (kernel-libipsec always encapsulates in UDP
//! 4500), NAT'd shares other than one NAT namespace, idle expiry (a lab
//! run is shorter than the balancer's idle timeout, and the simulation's
//! steps add up to less too: closed tunnels stay in both tables). Time is
//! real: a step is as long as its work.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use super::churn::Plan;
use super::initiate;
use super::netns::Netns;
use super::probe::{Prober, PERIOD};
use super::report::{by_inner, ping_each};
use super::topology::{BalancerFailure, State};
use super::traffic::{self, Flow, Scaled};
use super::{Error, Result};
use crate::balancer::DropReason;
use crate::compare::outage::{Dark, Found, Summary};
use crate::compare::scenario::Failure;
use crate::compare::sim::{self, GivenPeer, Landing, Outcome, SegwNow};
use crate::compare::{Event, Scenario, SegwSpec};
use crate::control::ctl::Request;
use crate::control::status::{Status, TunnelStatus};
use crate::policy::FallbackReason;

/// How long re-established tunnels may take after a failure or a
/// rebalance: DPD (the lab's dpd_delay, 5 s by default), its retransmits
/// (~6 s), a new IKE_SA_INIT and IKE_AUTH, with room to spare (it takes
/// 8–12 s at 300 tunnels) ...
const CONVERGE: Duration = Duration::from_secs(90);
/// ... and more per live tunnel: a rebalance at 2,000 moved 1,318, whose
/// restarts queue in the charons (50 initiators each, every restart a
/// 2048-bit DH on both sides); some took more than 90 s.
const CONVERGE_PER_TUNNEL: Duration = Duration::from_millis(100);
/// Rounds of two pings for a tunnel that did not answer its step's ping.
const PING_RETRIES: usize = 3;
/// How long the balancer's health check may take to see a segw go or come.
const HEALTH: Duration = Duration::from_secs(15);

/// What a scenario did to the lab.
#[derive(Debug, Clone)]
pub struct Driven {
    /// Measured as the simulation measures (no policy timing: `policy_ns`
    /// is 0; frames and drops are the balancer's).
    pub outcome: Outcome,
    /// Every tunnel as the balancer saw it when it arrived, in arrival
    /// order: the input for the simulation's prediction.
    pub peers: Vec<GivenPeer>,
    /// Each tunnel's initiator, in arrival order (a returning peer's name
    /// again, with the tunnel's number of that initiator: `i7#2`).
    pub initiators: Vec<String>,
    /// Tunnels closed by their initiators, and opened by returning peers.
    pub closed: usize,
    pub returned: usize,
    /// Tunnels that never came up, came up on more than one segw, or that
    /// the balancer and the segws place apart.
    pub problems: Vec<String>,
    /// `(step, initiator)` of a tunnel that was up but answered none of
    /// its pings in that step (see [`PING_RETRIES`]).
    pub silent: Vec<(u32, String)>,
    /// The scenario's traffic through the real SAs, when it has some.
    pub carried: Option<Carried>,
    /// Per event: how its moved tunnels came back.
    pub came_back: Vec<CameBack>,
    pub seconds: f64,
}

/// How an event's moved tunnels came back, by what the probes and the
/// initiators' SAs say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CameBack {
    /// On a new IKE SA, established after the event (DPD restarted it),
    /// and answering the probes.
    pub new_sa: u64,
    /// On a new IKE SA, but no probe answered before the step settled: its
    /// time in the dark is the SA's (1 s resolution).
    pub new_sa_unanswered: u64,
    /// Answering on an IKE SA from before the event.
    pub same_sa: u64,
    /// Neither: still dark when the step settled.
    pub not_back: u64,
}

/// When a tunnel live at an event came back, seconds after it: its first
/// probe answered, and its current IKE SA established (negative: before).
struct Back {
    probe: Option<f64>,
    sa: Option<f64>,
    /// Probes that got no answer.
    lost: u32,
}

/// The scenario's `[traffic]` through the lab: sent at the end of each
/// step, once its tunnels are settled, each tunnel's through the segw that
/// holds it. Per step and segw (the scenario's order), in lab bytes.
#[derive(Debug, Clone)]
pub struct Carried {
    /// Lab bytes per simulated byte, and each datagram's IP size.
    pub scale: f64,
    pub ip_bytes: u32,
    /// What the segws' child SAs counted, inner packets both ways (read
    /// just before and just after the step's traffic: the pings, DPD and
    /// keepalives of the step are not in it).
    pub segws: Vec<Vec<u64>>,
    /// What the balancer counted to and from each segw meanwhile: the same
    /// packets as ESP in UDP, and whatever IKE and keepalives passed.
    pub balancer: Vec<Vec<u64>>,
    /// Inner bytes sent, both ways, per step.
    pub offered: Vec<u64>,
    /// Each segw's charon's CPU over the step, a share of one core, as
    /// reported to the balancer (`ctl gateway report`); `None` while dead.
    pub cpu: Vec<Vec<Option<f64>>>,
}

/// Drive `scenario` through the lab `state` (up, with its policy): the
/// lab's initiators are the tunnels. `say` hears what happens, step by step.
pub fn drive(state: &mut State, scenario: &Scenario, say: &mut dyn FnMut(&str)) -> Result<Driven> {
    let started = Instant::now();
    let segws = scenario.all_segws();
    let plan = Plan::of(scenario);
    check_fits(state, scenario, &plan)?;
    let policy = state.policy.clone();
    let mut now = SegwNow::at_start(scenario);
    // Per tunnel (life), in arrival order.
    let lives = plan.lives.len();
    let mut holder: Vec<Option<usize>> = vec![None; lives];
    let mut refused = vec![false; lives];
    let mut peers: Vec<GivenPeer> = Vec::with_capacity(lives);
    let mut arrived = 0;
    let (mut moved, mut minimum) = (Vec::new(), Vec::new());
    let mut darks: Vec<Vec<Dark>> = Vec::new();
    // Per balancer failure: its event, the tunnels live at it, and how
    // many the new active placed again.
    let mut takeovers: Vec<(usize, u64, u64)> = Vec::new();
    // Per event: tunnels moved gracefully.
    let mut graceful: Vec<u64> = Vec::new();
    let mut came_back: Vec<CameBack> = Vec::new();
    let mut last_event: Option<usize> = None;
    let mut split = 0;
    let mut refused_tunnels = 0;
    let mut per_step = Vec::with_capacity(scenario.steps as usize);
    let mut problems = Vec::new();
    let mut silent_tunnels = Vec::new();
    let capacities = scenario.has_capacities();
    let mut refused_per_step = Vec::with_capacity(scenario.steps as usize);
    let at_capacity = |s: &Status| {
        s.drops
            .get(DropReason::AtCapacity.as_str())
            .copied()
            .unwrap_or(0)
    };
    let mut refused_before = at_capacity(&state.balancer_status()?);
    let scaled = Scaled::of(scenario, &plan);
    let mut carried = scaled.as_ref().map(|s| Carried {
        scale: s.scale,
        ip_bytes: s.ip_bytes,
        segws: Vec::new(),
        balancer: Vec::new(),
        offered: Vec::new(),
        cpu: Vec::new(),
    });

    for step in 0..scenario.steps {
        let mut rebalancing = false;
        // A graceful drain or rebalance this step: its moves are over when
        // the events are, and a tunnel that moved was never dark but for
        // the probes it lost.
        let mut graceful_event = false;
        let mut disrupted = false;
        let mut clock = Phases::start();
        let cpu_before = (traffic::charon_cpu(state)?, Instant::now());
        // Tunnels close first: an event's minimum counts only tunnels that
        // will send in its step.
        let closing: Vec<usize> = plan.closing(step).collect();
        if !closing.is_empty() {
            say(&format!("step {step}: {} tunnels close", closing.len()));
        }
        let closers: Vec<usize> = closing.iter().map(|&l| plan.lives[l].initiator).collect();
        for (&i, done) in closers.iter().zip(initiate::close(state, &closers)) {
            if let Err(e) = done.result {
                let name = &state.initiators[i].name;
                problems.push(format!("step {step}: {name} did not close: {e}"));
            }
        }
        for &l in &closing {
            holder[l] = None;
        }
        clock.lap("close");
        let live = |l: usize| plan.lives[l].live_in(step);
        let lives_now: Vec<usize> = (0..arrived).filter(|&l| live(l)).collect();
        let initiators_now: Vec<usize> =
            lives_now.iter().map(|&l| plan.lives[l].initiator).collect();
        // Probes through every live tunnel from the step's first event
        // that moves tunnels until its step has settled.
        let mut probing: Option<(Instant, Prober)> = None;
        // This step's balancer failure: its event, the new active, and
        // what that one had placed before it took over.
        let mut takeover: Option<(usize, usize, u64)> = None;
        for e in scenario.events.iter().filter(|e| e.step == step) {
            say(&format!("step {step}: {}", e.label()));
            let counts = counts_of(&holder, segws.len());
            minimum.push(sim::minimum_moved(
                &e.event, e.graceful, &counts, &now, &segws,
            ));
            moved.push(0);
            darks.push(Vec::new());
            graceful.push(0);
            came_back.push(CameBack::default());
            last_event = Some(moved.len() - 1);
            match &e.event {
                Event::Fail(name) => {
                    // Traffic through every tunnel first: the initiators'
                    // DPD stays quiet while the balancer re-places.
                    let live: Vec<usize> = (0..arrived)
                        .filter(|&l| live(l))
                        .map(|l| plan.lives[l].initiator)
                        .collect();
                    ping_each(state, &live, 1, "1", "1")?;
                    let t0 = Instant::now();
                    let done = quietly(state, |state| {
                        state.fail_segw(name)?;
                        wait_health(state, name, false)?;
                        let gone = sim::segw_index(&segws, name);
                        replace_in_order(state, &plan, &holder, &peers, gone)
                    })?;
                    say(&format!("step {step}: {done}"));
                    disrupted = true;
                    if probing.is_none() {
                        probing = Some((t0, Prober::start(state, &initiators_now)?));
                    }
                }
                Event::Recover(name) => {
                    state.recover_segw(name)?;
                    wait_health(state, name, true)?;
                }
                Event::Add(spec) => {
                    state.add_segw(&spec.name, spec.weight, spec.capacity, spec.throughput)?;
                    wait_health(state, &spec.name, true)?;
                }
                Event::Remove(name) => {
                    let t0 = Instant::now();
                    let done = quietly(state, |state| {
                        state.remove_segw(name)?;
                        let gone = sim::segw_index(&segws, name);
                        replace_in_order(state, &plan, &holder, &peers, gone)
                    })?;
                    say(&format!("step {step}: {done}"));
                    disrupted = true;
                    if probing.is_none() {
                        probing = Some((t0, Prober::start(state, &initiators_now)?));
                    }
                }
                Event::Weight(name, weight) => {
                    state.ctl(&Request::GatewayWeight {
                        name: name.clone(),
                        weight: *weight,
                    })?;
                }
                Event::Drain(name) | Event::Undrain(name) => {
                    let draining = matches!(e.event, Event::Drain(_));
                    if e.graceful && probing.is_none() {
                        probing = Some((Instant::now(), Prober::start(state, &initiators_now)?));
                    }
                    state.ctl(&Request::GatewayDrain {
                        name: name.clone(),
                        draining,
                        graceful: e.graceful,
                    })?;
                    if e.graceful {
                        graceful_event = true;
                        say(&format!("step {step}: {}", moves_settled(state)?));
                    }
                }
                Event::Swap { rebalance } => {
                    let t0 = Instant::now();
                    // Graceful: probes from before the moves, whose cost is
                    // the probes lost. Else from after the swap: a moved
                    // tunnel's first answer is when it came back (a probe
                    // sent before would be answered by its old segw).
                    if e.graceful && probing.is_none() {
                        probing = Some((t0, Prober::start(state, &initiators_now)?));
                    }
                    state.ctl(&Request::PolicyUse {
                        name: policy.clone(),
                        rebalance: *rebalance,
                        graceful: e.graceful,
                    })?;
                    if *rebalance && probing.is_none() {
                        probing = Some((t0, Prober::start(state, &initiators_now)?));
                    }
                    if e.graceful {
                        graceful_event = true;
                        say(&format!("step {step}: {}", moves_settled(state)?));
                    } else {
                        rebalancing |= *rebalance;
                        disrupted |= *rebalance;
                    }
                }
                Event::BalancerFail(how) => {
                    // Probes from before the failure: what a tunnel lost is
                    // its time in the dark.
                    if probing.is_none() {
                        probing = Some((Instant::now(), Prober::start(state, &initiators_now)?));
                    }
                    let how = match how {
                        Failure::Kill => BalancerFailure::Killed,
                        Failure::Uplink => BalancerFailure::UplinkDown,
                    };
                    let t0 = Instant::now();
                    let failed = state.fail_active_balancer(how)?;
                    let next = 1 - failed;
                    let placed_before = state.balancers[next].status(0)?.counters.placed;
                    state.wait_active(next)?;
                    say(&format!(
                        "step {step}: {} active after {:.0} ms",
                        state.balancers[next].name,
                        t0.elapsed().as_secs_f64() * 1e3
                    ));
                    takeover = Some((moved.len() - 1, next, placed_before));
                }
                Event::BalancerRecover => {
                    let Some(k) = state.balancers.iter().position(|b| b.failed.is_some()) else {
                        return Err(Error::State(format!(
                            "step {step}: no balancer of the pair has failed"
                        )));
                    };
                    // Started again from the binary its peer runs.
                    let peer = state.balancers[1 - k].pid;
                    let exe =
                        std::fs::read_link(format!("/proc/{peer}/exe")).map_err(|e| Error::Io {
                            what: format!("finding the binary of balancer pid {peer}"),
                            source: e,
                        })?;
                    let took = state.recover_balancer(k, &exe)?;
                    say(&format!(
                        "step {step}: {} back as the standby, holding the table, after {:.0} ms",
                        state.balancers[k].name,
                        took.as_secs_f64() * 1e3
                    ));
                }
            }
            SegwNow::apply(&mut now, &segws, &e.event);
        }
        // A takeover: what the new active placed again (what the
        // replication had not brought it), once every probed tunnel has
        // spoken through it (before this step's arrivals).
        if let Some((e, next, placed_before)) = takeover {
            std::thread::sleep(PERIOD * 3);
            let placed = state.balancers[next].status(0)?.counters.placed;
            takeovers.push((e, lives_now.len() as u64, placed - placed_before));
        }

        clock.lap("events");

        // Arrivals, in the plan's order.
        let arriving = plan.arriving(step);
        let arrivals: Vec<usize> = arriving.clone().map(|l| plan.lives[l].initiator).collect();
        for (&i, done) in arrivals.iter().zip(initiate::in_order(state, &arrivals)?) {
            if let Err(e) = done.result {
                let name = &state.initiators[i].name;
                problems.push(format!("step {step}: {name} did not come up: {e}"));
            }
        }
        arrived = arrived.max(arriving.end);
        clock.lap("initiate");

        let up: Vec<usize> = (0..arrived).filter(|&l| live(l)).collect();
        let held = if disrupted {
            let (held, again) = converge(state, &plan, &up, &peers, capacities)?;
            if again > 0 {
                say(&format!(
                    "step {step}: {again} initiators whose DPD restart gave up (the segws' setup queue outlasted its retransmits) initiated again"
                ));
            }
            held
        } else {
            holdings(state, &plan, &up)?
        };
        clock.lap("settle");
        // When each tunnel live at the event answered its first probe.
        // And when the IKE SA its initiator uses now was established,
        // from the initiator's own list (1 s resolution): a time after the
        // event is a new IKE SA, set up again by DPD.
        let mut back: HashMap<usize, Back> = HashMap::new();
        if let Some((t0, prober)) = probing.take() {
            let seen = prober.stop()?;
            let since = t0.elapsed().as_secs_f64();
            let sas = state.initiator_sas();
            for (&l, seen) in lives_now.iter().zip(seen) {
                let current = sas[plan.lives[l].initiator]
                    .iter()
                    .filter(|sa| sa.is_up())
                    .filter_map(|sa| sa.established)
                    .min();
                back.insert(
                    l,
                    Back {
                        probe: seen.first.map(|f| f.duration_since(t0).as_secs_f64()),
                        sa: current.map(|age| since - age as f64),
                        lost: seen.sent.saturating_sub(seen.replies),
                    },
                );
            }
        }
        let initiators: Vec<usize> = up.iter().map(|&l| plan.lives[l].initiator).collect();
        // Up somewhere (a refused tunnel passes nothing) and silent: asked
        // again (a tunnel DPD just re-established can take a moment to
        // pass), then a problem.
        let answered = ping_each(state, &initiators, 1, "1", "2")?;
        let mut silent: Vec<usize> = initiators
            .iter()
            .zip(&held)
            .zip(answered)
            .filter(|((_, h), (_, received))| !h.is_empty() && *received == 0)
            .map(|((&i, _), _)| i)
            .collect();
        for _ in 0..PING_RETRIES {
            if silent.is_empty() {
                break;
            }
            let answered = ping_each(state, &silent, 2, "0.5", "2")?;
            silent = silent
                .into_iter()
                .zip(answered)
                .filter(|(_, (_, received))| *received == 0)
                .map(|(i, _)| i)
                .collect();
        }
        for i in silent {
            silent_tunnels.push((step, state.initiators[i].name.clone()));
        }
        clock.lap("ping");

        if let (Some(scaled), Some(carried)) = (&scaled, &mut carried) {
            let names: Vec<&str> = segws.iter().map(|s| s.name.as_str()).collect();
            carry(
                state, scaled, carried, &names, step, &plan, &up, &held, cpu_before,
            )?;
            clock.lap("traffic");
        }

        let mut moved_now = 0;
        for (&l, h) in up.iter().zip(&held) {
            let name = &state.initiators[plan.lives[l].initiator].name;
            let Some(&at) = h.first() else {
                // With capacities, up nowhere is refused: every segw was
                // full when it (or its re-placement) asked.
                if capacities {
                    holder[l] = None;
                    if !std::mem::replace(&mut refused[l], true) {
                        refused_tunnels += 1;
                    }
                }
                continue;
            };
            if h.len() > 1 {
                problems.push(format!("step {step}: {name} is up on {} segws", h.len()));
            }
            let before = holder[l];
            let before_up = before.is_some_and(|b| now[b].is_live());
            if graceful_event && before.is_some_and(|b| b != at) {
                // Moved make-before-break: dark only for the probes lost.
                moved_now += 1;
                if let Some(e) = last_event {
                    graceful[e] += 1;
                    let lost = back.get(&l).map_or(0, |b| b.lost);
                    darks[e].push(Dark {
                        seconds: Some(f64::from(lost) * PERIOD.as_secs_f64()),
                        found: Found::Dpd,
                    });
                }
                holder[l] = Some(at);
                continue;
            }
            let taken_over = takeover.map(|(e, ..)| e);
            match sim::landing(before, at, before_up, rebalancing) {
                Landing::Stayed if taken_over.is_some() => {
                    // Kept through the takeover: dark for the probes lost.
                    if let (Some(e), Some(b)) = (taken_over, back.get(&l)) {
                        darks[e].push(Dark {
                            seconds: Some(f64::from(b.lost) * PERIOD.as_secs_f64()),
                            found: Found::Takeover,
                        });
                    }
                }
                Landing::First | Landing::Stayed => {}
                Landing::Moved => {
                    moved_now += 1;
                    if let (Some(e), Some(b)) = (last_event, back.get(&l)) {
                        let new_sa = b.sa.filter(|&t| t > -1.0);
                        darks[e].push(Dark {
                            // The probes say; where none was answered
                            // before the step settled, the new SA does.
                            seconds: b.probe.or(new_sa),
                            found: Found::Dpd,
                        });
                        let why = &mut came_back[e];
                        match (new_sa, b.probe) {
                            (Some(_), Some(_)) => why.new_sa += 1,
                            (Some(_), None) => why.new_sa_unanswered += 1,
                            (None, Some(_)) => why.same_sa += 1,
                            (None, None) => why.not_back += 1,
                        }
                    }
                }
                Landing::Split => split += 1,
            }
            holder[l] = Some(at);
        }
        match last_event {
            Some(e) => moved[e] += moved_now,
            None => split += moved_now,
        }
        if !arriving.is_empty() {
            peers.extend(keys(state, &plan, arriving, step)?);
        }
        let counts = counts_of(&holder, segws.len());
        say(&format!(
            "step {step}: {} tunnels: {} ({clock})",
            up.len(),
            segws
                .iter()
                .zip(&counts)
                .map(|(s, c)| format!("{} {c}", s.name))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        per_step.push(counts);
        let refused_now = at_capacity(&state.balancer_status()?);
        refused_per_step.push(refused_now - refused_before);
        refused_before = refused_now;
    }
    let last = scenario.steps.saturating_sub(1);
    for l in 0..arrived {
        if plan.lives[l].live_in(last) && holder[l].is_none() && !refused[l] {
            let name = &state.initiators[plan.lives[l].initiator].name;
            problems.push(format!("{name} is not up on any segw"));
        }
    }

    // Tunnel by tunnel, the balancer's view is the segws'.
    let balancer = balancer_placement(state, &peers)?;
    for (l, (&segws_say, &balancer_says)) in holder.iter().zip(&balancer).enumerate() {
        if plan.lives[l].live_in(last) && segws_say.is_some() && segws_say != balancer_says {
            let name = &state.initiators[plan.lives[l].initiator].name;
            let at = |k: Option<usize>| k.map_or("none", |k| state.segws[k].name.as_str());
            problems.push(format!(
                "{name}: on {} by its segws, on {} by the balancer",
                at(segws_say),
                at(balancer_says)
            ));
        }
    }

    let status = state.balancer_status()?;
    // Per event, as the simulation has them: each balancer failure's
    // takeover, measured.
    let takeovers: Vec<Option<sim::Takeover>> = (0..moved.len())
        .map(|e| {
            let &(_, tunnels, replaced) = takeovers.iter().find(|t| t.0 == e)?;
            Some(sim::Takeover {
                tunnels,
                kept: tunnels.saturating_sub(moved[e]),
                replaced,
                moved: moved[e],
                outage: Summary::of(&darks[e]),
            })
        })
        .collect();
    let outcome = Outcome {
        policy: status.policy.name.clone(),
        segws: segws
            .iter()
            .zip(&now)
            .map(|(s, n)| SegwSpec {
                name: s.name.clone(),
                weight: n.weight,
                capacity: s.capacity,
                throughput: s.throughput,
            })
            .collect(),
        per_step,
        // What the segws counted, in the scenario's bytes.
        bytes_per_step: carried.as_ref().map_or_else(Vec::new, |c| {
            c.segws
                .iter()
                .map(|step| {
                    step.iter()
                        .map(|&b| (b as f64 / c.scale).round() as u64)
                        .collect()
                })
                .collect()
        }),
        moved,
        minimum_moved: minimum,
        // Measured by the probes: from the event until a moved tunnel's
        // first reply (by DPD restarting it on its new segw).
        outage: darks.iter().map(|d| Summary::of(d)).collect(),
        // Setups per second are the balancer's pace here: not measured.
        setups_peak: vec![0; graceful.len()],
        graceful,
        split,
        fair_weights: now.iter().map(SegwNow::fair_weight).collect(),
        decisions: status.policy.decisions,
        policy_ns: 0,
        fallbacks: status.policy.fallbacks,
        full_answers: status
            .policy
            .fallbacks_by_reason
            .get(FallbackReason::GatewayFull.as_str())
            .copied()
            .unwrap_or(0),
        refused_per_step,
        refused_tunnels,
        frames: status.counters.forwarded,
        drops: drops_of(&status),
        returns_lost: 0,
        placements: holder,
        takeovers,
    };
    let mut opened = vec![0; state.initiators.len()];
    let initiators = plan
        .lives
        .iter()
        .map(|l| {
            opened[l.initiator] += 1;
            let name = &state.initiators[l.initiator].name;
            match opened[l.initiator] {
                1 => name.clone(),
                n => format!("{name}#{n}"),
            }
        })
        .collect();
    Ok(Driven {
        outcome,
        peers,
        initiators,
        closed: plan.closes(),
        returned: plan.returns(),
        problems,
        silent: silent_tunnels,
        carried,
        came_back,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One step's traffic through the tunnels `up` (lives) held where `held`
/// says, counted by the segws and the balancer around it; then each segw's
/// charon CPU since `cpu_before` reported to the balancer.
#[allow(clippy::too_many_arguments)]
fn carry(
    state: &State,
    scaled: &Scaled,
    carried: &mut Carried,
    names: &[&str],
    step: u32,
    plan: &Plan,
    up: &[usize],
    held: &[Vec<usize>],
    cpu_before: (std::collections::BTreeMap<String, f64>, Instant),
) -> Result<()> {
    let at = scaled.step(step);
    let flows: Vec<Flow> = up
        .iter()
        .zip(held)
        .filter_map(|(&l, h)| {
            let (up, down) = scaled.bytes(&at, l);
            Some(Flow {
                initiator: plan.lives[l].initiator,
                segw: state.segws[*h.first()?].name.clone(),
                up,
                down,
            })
        })
        .collect();
    let balancer = |s: &Status| -> Vec<u64> {
        names
            .iter()
            .map(|n| s.gateway(n).map_or(0, |g| g.bytes_to + g.bytes_from))
            .collect()
    };
    let segws_before = traffic::counted(state)?;
    let balancer_before = balancer(&state.balancer_counters()?);
    let (up, down) = traffic::send(state, &flows, scaled.ip_bytes as usize)?;
    let segws_after = traffic::counted(state)?;
    let balancer_after = balancer(&state.balancer_counters()?);
    carried.offered.push(up + down);
    carried.segws.push(
        names
            .iter()
            .map(|n| {
                let c = segws_after.get(*n).map_or_else(Default::default, |a| {
                    a.since(segws_before.get(*n).unwrap_or(&traffic::Reading::default()))
                });
                c.bytes_in + c.bytes_out
            })
            .collect(),
    );
    carried.balancer.push(
        balancer_after
            .iter()
            .zip(&balancer_before)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect(),
    );
    let (before, since) = cpu_before;
    let after = traffic::charon_cpu(state)?;
    let reported = traffic::report_cpu(state, &before, &after, since.elapsed().as_secs_f64())?;
    carried
        .cpu
        .push(names.iter().map(|n| reported.get(*n).copied()).collect());
    Ok(())
}

/// Where a step's time went: its phases, in order, with their seconds.
struct Phases {
    since: Instant,
    laps: Vec<(&'static str, f64)>,
}

impl Phases {
    fn start() -> Self {
        Phases {
            since: Instant::now(),
            laps: Vec::new(),
        }
    }

    fn lap(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.laps
            .push((phase, now.duration_since(self.since).as_secs_f64()));
        self.since = now;
    }
}

/// `close 0.1 s, ping 1.4 s`: the phases that took 50 ms or more.
impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self
            .laps
            .iter()
            .filter(|(_, s)| *s >= 0.05)
            .map(|(p, s)| format!("{p} {s:.1} s"))
            .collect();
        f.write_str(&shown.join(", "))
    }
}

/// The lab must start with the scenario's segws, in its order, and have
/// initiators to be its tunnels.
fn check_fits(state: &State, scenario: &Scenario, plan: &Plan) -> Result<()> {
    let lab: Vec<(&str, u32)> = state
        .segws
        .iter()
        .filter(|s| s.present)
        .map(|s| (s.name.as_str(), s.weight))
        .collect();
    let wanted: Vec<(&str, u32)> = scenario
        .segws
        .iter()
        .map(|s| (s.name.as_str(), s.weight))
        .collect();
    if lab != wanted {
        return Err(Error::State(format!(
            "the lab's segws {lab:?} are not the scenario's {wanted:?}: bring the lab up from the scenario (`segwlb lab compare` does)"
        )));
    }
    if state.initiators.len() < plan.initiators {
        return Err(Error::State(format!(
            "the scenario needs {} initiators (its tunnels and their churn), the lab has {}: bring the lab up from the scenario (`lab up --scenario`)",
            plan.initiators,
            state.initiators.len()
        )));
    }
    Ok(())
}

fn counts_of(holder: &[Option<usize>], segws: usize) -> Vec<u64> {
    let mut counts = vec![0; segws];
    for &h in holder.iter().flatten() {
        counts[h] += 1;
    }
    counts
}

/// Wait until the balancer sees `name` healthy (with its MAC learned) or
/// down.
/// Until the balancer's graceful moves are over (at most
/// [`MOVES_SETTLE`]); what they did.
fn moves_settled(state: &State) -> Result<String> {
    let started = Instant::now();
    loop {
        let m = state.balancer_status()?.moves;
        if m.queued + m.asked + m.moving + m.lingering == 0 {
            return Ok(format!(
                "graceful moves over in {:.1} s: {} moved, {} timed out in all",
                started.elapsed().as_secs_f64(),
                m.moved,
                m.timed_out
            ));
        }
        if started.elapsed() > MOVES_SETTLE {
            return Err(Error::State(format!(
                "graceful moves not over after {MOVES_SETTLE:?}: {} queued, {} asked, {} moving",
                m.queued, m.asked, m.moving
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How long a step's graceful moves may take.
const MOVES_SETTLE: Duration = Duration::from_secs(600);

fn wait_health(state: &State, name: &str, healthy: bool) -> Result<()> {
    let until = Instant::now() + HEALTH;
    loop {
        let s = state.balancer_status()?;
        let seen = s
            .gateway(name)
            .is_some_and(|g| g.healthy == healthy && (!healthy || g.mac.is_some()));
        if seen {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(Error::Step {
                what: format!(
                    "waiting for the balancer to see {name} {}",
                    if healthy { "up" } else { "down" }
                ),
                detail: format!("not after {} s", HEALTH.as_secs()),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `f` with the initiators' control traffic on 4500 held back
/// ([`State::quiet_control`]): a segw going and its tunnels re-placed in
/// arrival order.
fn quietly<T>(state: &mut State, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
    state.quiet_control(true)?;
    let done = f(state)?;
    state.quiet_control(false)?;
    Ok(done)
}

/// One packet through each tunnel `holder` puts on segw `segw`, in arrival
/// order, each waiting until the balancer has re-placed it: the order in
/// which the simulation re-places them. It must beat the initiators' DPD,
/// which re-places a tunnel with its own packet (out of turn) about
/// `dpd_delay` after the last packet they received: the caller pinged
/// every tunnel just before the segw went, and a turn here is one UDP
/// datagram from the tunnel's inner address (a socket opened in its
/// namespace beforehand) and a poll of the balancer's move counter, a few
/// milliseconds; a `ping` process per turn took tens, and a few hundred
/// tunnels ran into DPD. A tunnel the balancer no longer has on `segw` is
/// skipped.
fn replace_in_order(
    state: &State,
    plan: &Plan,
    holder: &[Option<usize>],
    peers: &[GivenPeer],
    segw: usize,
) -> Result<InOrder> {
    let gone = state.segws[segw].name.as_str();
    let status = state.balancer_status()?;
    let on_gone: std::collections::HashSet<(String, u16)> = status
        .gateways
        .iter()
        .filter(|g| g.name == gone)
        .flat_map(|g| &g.tunnel_list)
        .map(|t| (t.peer.clone(), t.opened_port))
        .collect();
    let mut turns = Vec::new();
    for (l, _) in holder.iter().enumerate().filter(|(_, h)| **h == Some(segw)) {
        let Some(p) = peers.get(l) else { continue };
        if on_gone.contains(&(p.addr.to_string(), p.ike_port)) {
            let init = &state.initiators[plan.lives[l].initiator];
            let inner = init.inner;
            let socket = Netns::adopt(&init.ns)?
                .enter(move || UdpSocket::bind((inner, 0)))?
                .map_err(|source| Error::Io {
                    what: format!("a UDP socket on {inner} in {}", init.ns),
                    source,
                })?;
            turns.push(socket);
        }
    }
    let moved = || -> Result<u64> { Ok(state.balancer_counters()?.counters.moved) };
    let mut done = InOrder {
        before: holder.iter().filter(|h| **h == Some(segw)).count() - turns.len(),
        ..InOrder::default()
    };
    // The discard port: nothing answers, the packet only has to leave.
    let to = (state.service, 9);
    for socket in turns {
        let before = moved()?;
        socket
            .send_to(b"segwlb lab: re-place", to)
            .map_err(|source| Error::Io {
                what: "send through a tunnel".into(),
                source,
            })?;
        let until = Instant::now() + Duration::from_secs(1);
        while moved()? == before && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        match moved()? - before {
            1 => done.in_order += 1,
            0 => done.late += 1,
            _ => done.others += 1,
        }
    }
    Ok(done)
}

impl std::fmt::Display for InOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "re-placed {} in arrival order; {} before their turn, {} late, {} waits with more than one",
            self.in_order, self.before, self.late, self.others
        )
    }
}

/// How [`replace_in_order`] went: tunnels re-placed by their own packet,
/// in order; re-placed before their turn (their DPD came first); not
/// re-placed within the wait; and waits in which more than one moved.
#[derive(Default)]
struct InOrder {
    in_order: usize,
    before: usize,
    late: usize,
    others: usize,
}

/// For each tunnel in `up` (lives), the segws holding the IKE SA its
/// initiator is using now (established, child installed). An SA a segw
/// keeps for a tunnel that moved away (until its DPD clears it) is not
/// the tunnel: the initiator's current SA is.
fn holdings(state: &State, plan: &Plan, up: &[usize]) -> Result<Vec<Vec<usize>>> {
    let mut segw_sas = Vec::new();
    for s in &state.segws {
        // A segw that left, or whose charon is dead, holds nothing.
        let sas = if s.present {
            state.list_sas(&s.dir).unwrap_or_default()
        } else {
            Vec::new()
        };
        segw_sas.push(sas);
    }
    let segw_sas: Vec<_> = segw_sas.iter().map(|sas| by_inner(sas)).collect();
    let initiator_sas = state.initiator_sas();
    let mut held = vec![Vec::new(); up.len()];
    for (i, &l) in up.iter().enumerate() {
        let n = plan.lives[l].initiator;
        let inner = state.initiators[n].inner.to_string();
        let current: Vec<&str> = initiator_sas[n]
            .iter()
            .filter(|sa| sa.is_up())
            .map(|sa| sa.initiator_spi.as_str())
            .collect();
        for (k, sas) in segw_sas.iter().enumerate() {
            let holds = sas
                .get(inner.as_str())
                .is_some_and(|sa| current.contains(&sa.initiator_spi.as_str()));
            if holds {
                held[i].push(k);
            }
        }
    }
    Ok(held)
}

/// Wait until every keyed tunnel is up on exactly the segw the balancer
/// has it on (after a failure or a rebalance the balancer moves a tunnel
/// first, and DPD re-establishes it there afterwards); what is held then.
/// With `capacities`, a tunnel the balancer keeps on a segw that is down
/// (its re-placement refused: every segw full) is settled up nowhere.
fn converge(
    state: &State,
    plan: &Plan,
    up: &[usize],
    peers: &[GivenPeer],
    capacities: bool,
) -> Result<(Vec<Vec<usize>>, usize)> {
    let started = Instant::now();
    let until = started + CONVERGE + CONVERGE_PER_TUNNEL * up.len() as u32;
    // Initiators seen with no IKE SA at all at the last look, and when that
    // was: their DPD restart gave up (see [`GAVE_UP`]).
    let (mut bare, mut looked): (Vec<usize>, Option<Instant>) = (Vec::new(), None);
    let mut again = 0;
    loop {
        let held = holdings(state, plan, up)?;
        let placed = balancer_placement(state, peers)?;
        let healthy = healthy(state)?;
        let settled = up.iter().zip(&held).all(|(&l, h)| match placed.get(l) {
            Some(Some(k)) if capacities && !healthy[*k] => h.is_empty(),
            Some(Some(k)) => h.as_slice() == [*k],
            _ if capacities => h.len() <= 1,
            _ => h.len() == 1,
        });
        if settled || Instant::now() > until {
            return Ok((held, again));
        }
        // Where capacities refuse tunnels, a tunnel with no SA may be a
        // refusal: the next step tries it again, as the simulation does.
        let due = looked.is_none_or(|t| t.elapsed() >= GAVE_UP_LOOK);
        if !capacities && started.elapsed() >= GAVE_UP && due {
            let sas = state.initiator_sas_known();
            let now_bare: Vec<usize> = up
                .iter()
                .zip(&held)
                .filter(|(_, h)| h.is_empty())
                .map(|(&l, _)| plan.lives[l].initiator)
                .filter(|&i| sas[i].as_ref().is_some_and(Vec::is_empty))
                .collect();
            // Bare at two looks in a row: not between a delete and its
            // restart.
            for &i in now_bare.iter().filter(|i| bare.contains(i)) {
                let init = &state.initiators[i];
                if state
                    .swanctl_spawn(&init.dir, &init.initiate_args())
                    .is_ok()
                {
                    again += 1;
                }
            }
            bare = now_bare;
            looked = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A DPD restart is one attempt: an initiator whose new IKE_SA_INIT or
/// IKE_AUTH goes unanswered through its retransmits (~6 s with the lab's
/// timers) gives up, and with `keyingtries = 1` tries no more. At 2,000
/// tunnels a rebalance restarts ~1,600 at once, and the segws' charons
/// (every setup a 2048-bit DH, five charons and forty initiator charons on
/// two cores) queued some answers longer than that: those tunnels stayed
/// down for good, and the step never settled. A base station tries again;
/// so does the drive, for an initiator with no IKE SA at all at two looks
/// [`GAVE_UP_LOOK`] apart, from this long after the event (past DPD and
/// its retransmits) on. (`keyingtries = 0` on the initiators would have
/// charon retry by itself, but also a tunnel the balancer refused at
/// capacity, at its own pace, not the simulation's.)
const GAVE_UP: Duration = Duration::from_secs(15);
const GAVE_UP_LOOK: Duration = Duration::from_secs(3);

/// Whether the balancer has each lab segw up.
fn healthy(state: &State) -> Result<Vec<bool>> {
    let status = state.balancer_counters()?;
    Ok(state
        .segws
        .iter()
        .map(|s| status.gateway(&s.name).is_some_and(|g| g.healthy))
        .collect())
}

/// The lab segw (index into `state.segws`) the balancer's table puts each
/// of `peers` on, found by the endpoint the tunnel opened from.
fn balancer_placement(state: &State, peers: &[GivenPeer]) -> Result<Vec<Option<usize>>> {
    let status = state.balancer_status()?;
    let mut at: HashMap<(&str, u16), &str> = HashMap::new();
    for g in &status.gateways {
        for t in &g.tunnel_list {
            at.entry((&t.peer, t.opened_port)).or_insert(&g.name);
        }
    }
    Ok(peers
        .iter()
        .map(|p| {
            let addr = p.addr.to_string();
            let g = *at.get(&(addr.as_str(), p.ike_port))?;
            state.segws.iter().position(|s| s.name == g)
        })
        .collect())
}

/// The keys of `tunnels` as the balancer placed them: the segw's SA gives
/// the IKE SPI, the balancer's entry for that SPI the endpoint it opened
/// from and the one it floated to.
fn keys(
    state: &State,
    plan: &Plan,
    tunnels: std::ops::Range<usize>,
    step: u32,
) -> Result<Vec<GivenPeer>> {
    let status = state.balancer_status()?;
    let mut sas = Vec::new();
    for s in state.segws.iter().filter(|s| s.present) {
        sas.extend(state.list_sas(&s.dir).unwrap_or_default());
    }
    let sas = by_inner(&sas);
    let entries: HashMap<&str, &TunnelStatus> = status
        .gateways
        .iter()
        .flat_map(|g| &g.tunnel_list)
        .filter_map(|t| Some((t.ike_spi.as_deref()?, t)))
        .collect();
    tunnels
        .map(|l| {
            let i = plan.lives[l].initiator;
            let ends = plan.lives[l].ends;
            let init = &state.initiators[i];
            let inner = init.inner.to_string();
            let spi = sas.get(inner.as_str()).map(|sa| sa.initiator_spi.clone());
            let entry = spi.as_deref().and_then(|spi| entries.get(spi));
            match (spi, entry) {
                (Some(spi), Some(t)) => Ok(GivenPeer {
                    step,
                    addr: t.peer.parse().map_err(|_| {
                        Error::State(format!(
                            "the balancer's peer {:?} is not an address",
                            t.peer
                        ))
                    })?,
                    ike_port: t.opened_port,
                    natt_port: Some(t.peer_port),
                    ike_spi: u64::from_str_radix(&spi, 16)
                        .map_err(|_| Error::State(format!("IKE SPI {spi:?} is not hex")))?,
                    ends,
                }),
                // Not up: the simulation still gets the tunnel, from its
                // outer address as configured, so the counts line up.
                _ => Ok(GivenPeer {
                    step,
                    addr: init.outer,
                    ike_port: 500,
                    natt_port: Some(4500),
                    ike_spi: 0x1a6_0000_0000 + l as u64,
                    ends,
                }),
            }
        })
        .collect()
}

/// The balancer's drops, non-zero ones only, by reason.
fn drops_of(status: &Status) -> Vec<(&'static str, u64)> {
    DropReason::ALL
        .iter()
        .filter_map(|r| {
            let n = status.drops.get(r.as_str()).copied().unwrap_or(0);
            (n > 0).then(|| (r.as_str(), n))
        })
        .collect()
}
