//! A `compare` scenario on real tunnels: the lab's initiators arrive step by
//! step, the scenario's events happen to real charons and to the running
//! balancer, and where each tunnel lands is read from the segws' SAs. The
//! result is the simulation's [`Outcome`], measured, so that `report.json`
//! has the same keys for both; and the tunnels' keys as the balancer saw
//! them ([`GivenPeer`]), so that the simulation can be asked to predict
//! exactly this run.
//!
//! What the lab does as the simulation does:
//! - arrivals: the scenario's arrival pattern over the lab's N initiators,
//!   each tunnel initiated in turn (arrival order is initiator order);
//! - a segw fails: its charon is killed and its link goes down; once the
//!   balancer's health probes mark it down, one packet goes through each
//!   of its tunnels in arrival order, each re-placement confirmed before
//!   the next (the simulation re-places them on their next packet, in
//!   that order); then the initiators' DPD restarts them on the segws the
//!   balancer chose;
//! - a segw recovers (link up, a fresh charon), joins (a new namespace and
//!   `ctl gateway add`), leaves (`ctl gateway remove`, its tunnels
//!   re-placed as for a failure); weights and drains through `ctl`;
//! - a swap is `ctl policy use` with the same policy; a rebalance moves
//!   tunnels whose IPsec SAs stay behind, so DPD re-establishes them too.
//!
//! - capacity: each segw's charon refuses IKE SAs past its capacity
//!   (`ikesa_limit`) as the balancer does; a tunnel refused (every segw
//!   full) is one whose initiator is up on no segw at the end of a step.
//!
//! What it does not: churn (a lab tunnel lives for the whole run), raw ESP
//! (kernel-libipsec always encapsulates in UDP 4500), NAT'd shares other
//! than one NAT namespace. Time is real: a step is as long as its work.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::report::established;
use super::topology::State;
use super::{Error, Result};
use crate::balancer::DropReason;
use crate::compare::sim::{self, GivenPeer, Landing, Outcome, SegwNow};
use crate::compare::{Event, Scenario, SegwSpec};
use crate::control::ctl::Request;
use crate::control::status::Status;
use crate::policy::FallbackReason;

/// How long re-established tunnels may take after a failure or a
/// rebalance: DPD (the lab's dpd_delay, 5 s by default), its retransmits
/// (~6 s), a new IKE_SA_INIT and IKE_AUTH, with room to spare.
const CONVERGE: Duration = Duration::from_secs(90);
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
    /// Initiator names, in arrival order.
    pub initiators: Vec<String>,
    /// Tunnels that never came up, or came up on more than one segw.
    pub problems: Vec<String>,
    pub seconds: f64,
}

/// Drive `scenario` through the lab `state` (up, with its policy): the
/// lab's initiators are the tunnels. `say` hears what happens, step by step.
pub fn drive(state: &mut State, scenario: &Scenario, say: &mut dyn FnMut(&str)) -> Result<Driven> {
    let started = Instant::now();
    let segws = scenario.all_segws();
    check_fits(state, scenario)?;
    let policy = state.policy.clone();
    let mut now = SegwNow::at_start(scenario);
    let n = state.initiators.len();
    let arrive_over = scenario.tunnels.arrive_over.max(1) as usize;
    let mut holder: Vec<Option<usize>> = vec![None; n];
    let mut peers: Vec<GivenPeer> = Vec::with_capacity(n);
    let mut arrived = 0;
    let (mut moved, mut minimum) = (Vec::new(), Vec::new());
    let mut last_event: Option<usize> = None;
    let mut split = 0;
    let mut refused_tunnels = 0;
    let mut per_step = Vec::with_capacity(scenario.steps as usize);
    let mut problems = Vec::new();
    let capacities = scenario.has_capacities();
    let mut refused = vec![false; n];
    let mut refused_per_step = Vec::with_capacity(scenario.steps as usize);
    let at_capacity = |s: &Status| {
        s.drops
            .get(DropReason::AtCapacity.as_str())
            .copied()
            .unwrap_or(0)
    };
    let mut refused_before = at_capacity(&state.balancer_status()?);
    // The peak's tunnels are the last initiators.
    let peak = scenario.tunnels.peak.map_or(0, |p| p.tunnels.min(n));
    let initial = n - peak;

    for step in 0..scenario.steps {
        let mut rebalancing = false;
        let mut disrupted = false;
        for e in scenario.events.iter().filter(|e| e.step == step) {
            say(&format!("step {step}: {}", e.event.label()));
            let counts = counts_of(&holder, segws.len());
            minimum.push(sim::minimum_moved(&e.event, &counts, &now, &segws));
            moved.push(0);
            last_event = Some(moved.len() - 1);
            match &e.event {
                Event::Fail(name) => {
                    state.fail_segw(name)?;
                    wait_health(state, name, false)?;
                    replace_in_order(state, &holder, sim::segw_index(&segws, name))?;
                    disrupted = true;
                }
                Event::Recover(name) => {
                    state.recover_segw(name)?;
                    wait_health(state, name, true)?;
                }
                Event::Add(spec) => {
                    state.add_segw(&spec.name, spec.weight, spec.capacity)?;
                    wait_health(state, &spec.name, true)?;
                }
                Event::Remove(name) => {
                    state.remove_segw(name)?;
                    replace_in_order(state, &holder, sim::segw_index(&segws, name))?;
                    disrupted = true;
                }
                Event::Weight(name, weight) => {
                    state.ctl(&Request::GatewayWeight {
                        name: name.clone(),
                        weight: *weight,
                    })?;
                }
                Event::Drain(name) | Event::Undrain(name) => {
                    let draining = matches!(e.event, Event::Drain(_));
                    state.ctl(&Request::GatewayDrain {
                        name: name.clone(),
                        draining,
                    })?;
                }
                Event::Swap { rebalance } => {
                    state.ctl(&Request::PolicyUse {
                        name: policy.clone(),
                        rebalance: *rebalance,
                    })?;
                    rebalancing |= *rebalance;
                    disrupted |= *rebalance;
                }
            }
            SegwNow::apply(&mut now, &segws, &e.event);
        }

        // Arrivals, one after the other.
        let due = if step as usize >= arrive_over {
            0
        } else {
            initial * (step as usize + 1) / arrive_over - initial * step as usize / arrive_over
        } + scenario
            .tunnels
            .peak
            .filter(|p| p.step == step)
            .map_or(0, |_| peak);
        let first_new = arrived;
        for i in arrived..arrived + due {
            let init = &state.initiators[i];
            if let Err(e) = state.swanctl(
                &init.dir,
                &[
                    "--initiate",
                    "--child",
                    super::strongswan::CHILD,
                    "--timeout",
                    "30",
                ],
            ) {
                problems.push(format!("step {step}: {} did not come up: {e}", init.name));
            }
        }
        arrived += due;

        let held = if disrupted {
            converge(state, arrived, &peers, capacities)?
        } else {
            holdings(state, arrived)?
        };
        ping_all(state, arrived)?;

        let mut moved_now = 0;
        for (i, h) in held.iter().enumerate() {
            let Some(&at) = h.first() else {
                // With capacities, up nowhere is refused: every segw was
                // full when it (or its re-placement) asked.
                if capacities {
                    holder[i] = None;
                    if !std::mem::replace(&mut refused[i], true) {
                        refused_tunnels += 1;
                    }
                }
                continue;
            };
            if h.len() > 1 {
                problems.push(format!(
                    "step {step}: {} is up on {} segws",
                    state.initiators[i].name,
                    h.len()
                ));
            }
            let before = holder[i];
            let before_up = before.is_some_and(|b| now[b].is_live());
            match sim::landing(before, at, before_up, rebalancing) {
                Landing::First | Landing::Stayed => {}
                Landing::Moved => moved_now += 1,
                Landing::Split => split += 1,
            }
            holder[i] = Some(at);
        }
        match last_event {
            Some(e) => moved[e] += moved_now,
            None => split += moved_now,
        }
        if arrived > first_new {
            peers.extend(keys(state, first_new..arrived, step)?);
        }
        let counts = counts_of(&holder, segws.len());
        say(&format!(
            "step {step}: {arrived} tunnels: {}",
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
    for (i, h) in holder.iter().enumerate().take(arrived) {
        if h.is_none() && !refused[i] {
            problems.push(format!(
                "{} is not up on any segw",
                state.initiators[i].name
            ));
        }
    }

    let status = state.balancer_status()?;
    let outcome = Outcome {
        policy: status.policy.name.clone(),
        segws: segws
            .iter()
            .zip(&now)
            .map(|(s, n)| SegwSpec {
                name: s.name.clone(),
                weight: n.weight,
                capacity: s.capacity,
            })
            .collect(),
        per_step,
        moved,
        minimum_moved: minimum,
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
    };
    Ok(Driven {
        outcome,
        peers,
        initiators: state.initiators.iter().map(|i| i.name.clone()).collect(),
        problems,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The lab must start with the scenario's segws, in its order, and have
/// initiators to be its tunnels.
fn check_fits(state: &State, scenario: &Scenario) -> Result<()> {
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
    if state.initiators.is_empty() {
        return Err(Error::State("the lab has no initiators".into()));
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

/// One packet through each tunnel `holder` puts on segw `segw`, in arrival
/// order, each waiting until the balancer has re-placed it: the order in
/// which the simulation re-places them.
fn replace_in_order(state: &State, holder: &[Option<usize>], segw: usize) -> Result<()> {
    let mut pings = Vec::new();
    for (i, _) in holder.iter().enumerate().filter(|(_, h)| **h == Some(segw)) {
        let before = state.balancer_status()?.counters.moved;
        pings.push(ping(state, i, 1, "1")?);
        let until = Instant::now() + Duration::from_secs(3);
        // A tunnel whose initiator's DPD got there first is re-placed
        // already: the wait runs out and the order is what DPD made it.
        while state.balancer_status()?.counters.moved == before && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    for mut p in pings {
        let _ = p.wait();
    }
    Ok(())
}

/// For each of the first `arrived` tunnels, the segws holding the IKE SA
/// its initiator is using now (established, child installed). An SA a
/// segw keeps for a tunnel that moved away (until its DPD clears it) is
/// not the tunnel: the initiator's current SA is.
fn holdings(state: &State, arrived: usize) -> Result<Vec<Vec<usize>>> {
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
    let mut held = vec![Vec::new(); arrived];
    for (i, init) in state.initiators.iter().take(arrived).enumerate() {
        let inner = init.inner.to_string();
        let current: Vec<String> = state
            .list_sas(&init.dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|sa| {
                sa.state == "ESTABLISHED" && sa.children.iter().any(|c| c.state == "INSTALLED")
            })
            .map(|sa| sa.initiator_spi)
            .collect();
        for (k, sas) in segw_sas.iter().enumerate() {
            let holds = sas
                .iter()
                .any(|sa| established(sa, &inner) && current.contains(&sa.initiator_spi));
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
    arrived: usize,
    peers: &[GivenPeer],
    capacities: bool,
) -> Result<Vec<Vec<usize>>> {
    let until = Instant::now() + CONVERGE;
    loop {
        let held = holdings(state, arrived)?;
        let placed = balancer_placement(state, peers)?;
        let up: Vec<bool> = {
            let status = state.balancer_status()?;
            state
                .segws
                .iter()
                .map(|s| status.gateway(&s.name).is_some_and(|g| g.healthy))
                .collect()
        };
        let settled = held.iter().enumerate().all(|(i, h)| match placed.get(i) {
            Some(Some(k)) if capacities && !up[*k] => h.is_empty(),
            Some(Some(k)) => h.as_slice() == [*k],
            _ if capacities => h.len() <= 1,
            _ => h.len() == 1,
        });
        if settled || Instant::now() > until {
            return Ok(held);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The lab segw (index into `state.segws`) the balancer's table puts each
/// of `peers` on, found by the endpoint the tunnel opened from.
fn balancer_placement(state: &State, peers: &[GivenPeer]) -> Result<Vec<Option<usize>>> {
    let status = state.balancer_status()?;
    Ok(peers
        .iter()
        .map(|p| {
            let addr = p.addr.to_string();
            let g = status.gateways.iter().find(|g| {
                g.tunnel_list
                    .iter()
                    .any(|t| t.peer == addr && t.opened_port == p.ike_port)
            })?;
            state.segws.iter().position(|s| s.name == g.name)
        })
        .collect())
}

/// `ping -c COUNT -W WAIT` from tunnel `i`'s inner address to the service.
fn ping(state: &State, i: usize, count: u32, wait: &str) -> Result<Child> {
    let init = &state.initiators[i];
    Command::new("ip")
        .args(["netns", "exec", &init.ns, "ping", "-n", "-q"])
        .args(["-c", &count.to_string(), "-W", wait, "-I"])
        .arg(init.inner.to_string())
        .arg(state.service.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| Error::Io {
            what: "start ping".into(),
            source,
        })
}

/// Traffic through every arrived tunnel: one ping each, all at once.
fn ping_all(state: &State, arrived: usize) -> Result<()> {
    let pings = (0..arrived)
        .map(|i| ping(state, i, 1, "2"))
        .collect::<Result<Vec<_>>>()?;
    for mut p in pings {
        let _ = p.wait();
    }
    Ok(())
}

/// The keys of `tunnels` as the balancer placed them: the segw's SA gives
/// the IKE SPI, the balancer's entry for that SPI the endpoint it opened
/// from and the one it floated to.
fn keys(state: &State, tunnels: std::ops::Range<usize>, step: u32) -> Result<Vec<GivenPeer>> {
    let status = state.balancer_status()?;
    let mut sas = Vec::new();
    for s in state.segws.iter().filter(|s| s.present) {
        sas.extend(state.list_sas(&s.dir).unwrap_or_default());
    }
    tunnels
        .map(|i| {
            let init = &state.initiators[i];
            let inner = init.inner.to_string();
            let spi = sas
                .iter()
                .find(|sa| established(sa, &inner))
                .map(|sa| sa.initiator_spi.clone());
            let entry = spi.as_deref().and_then(|spi| {
                status
                    .gateways
                    .iter()
                    .flat_map(|g| &g.tunnel_list)
                    .find(|t| t.ike_spi.as_deref() == Some(spi))
            });
            match (spi, entry) {
                (Some(spi), Some(t)) => Ok(GivenPeer {
                    step,
                    addr: t.peer.parse().map_err(|_| {
                        Error::State(format!("the balancer's peer {:?} is not IPv4", t.peer))
                    })?,
                    ike_port: t.opened_port,
                    natt_port: Some(t.peer_port),
                    ike_spi: u64::from_str_radix(&spi, 16)
                        .map_err(|_| Error::State(format!("IKE SPI {spi:?} is not hex")))?,
                }),
                // Not up: the simulation still gets the tunnel, from its
                // outer address as configured, so the counts line up.
                _ => Ok(GivenPeer {
                    step,
                    addr: init.outer,
                    ike_port: 500,
                    natt_port: Some(4500),
                    ike_spi: 0x1a6_0000_0000 + i as u64,
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
