//! `segwlb compare`: every policy on the same scenario, driven as real
//! frames through the balancer core ([`sim`]), measured the same way, and
//! reported as a ranked table, `report.json` and `report.html`.

pub mod ecmp;
pub mod outage;
pub mod report;
pub mod scenario;
pub mod sim;
pub mod traffic;

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::balancer::DropReason;
use crate::policy::Policy;
pub use scenario::{Event, Scenario, ScenarioError, SegwSpec, TimedEvent};

/// Keys every object of `report.json` has, `segwlb compare`'s and
/// `segwlb lab compare`'s alike: what tools may rely on.
pub const REPORT_KEYS: [&str; 16] = [
    "policy",
    "tunnels_per_segw",
    "max_over_mean",
    "cov",
    "moved_per_event",
    "minimum_moved_per_event",
    "split_tunnels",
    "ns_per_decision",
    "fallbacks",
    "peak_utilization",
    "seconds_over_80",
    "seconds_over_100",
    "throughput_max_over_mean",
    "outage_seconds_per_event",
    "outage_p95_per_event",
    "failovers",
];

/// One policy's run through a scenario: what `report.json` holds per policy.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRun {
    pub policy: String,
    pub scenario: String,
    pub seed: u64,
    /// Every segw that took part, in scenario order.
    pub segws: Vec<String>,
    /// Weights at the end; 0 for a segw not taking new tunnels then (down,
    /// draining or removed).
    pub weights_at_end: Vec<u32>,
    /// Live tunnels per segw at the end.
    pub tunnels_per_segw: BTreeMap<String, u64>,
    /// Live tunnels per segw (in `segws` order) at the end of every step.
    pub tunnels_over_time: Vec<Vec<u64>>,
    /// max(tunnels / fair share) over the segws taking tunnels at the end,
    /// the fair share following the weights: 1.0 is a perfect spread.
    pub max_over_mean: f64,
    /// Coefficient of variation of tunnels / fair share at the end.
    pub cov: f64,
    /// "step N: what happened", one per event.
    pub events: Vec<String>,
    /// Tunnels moved at each event, and the fewest any policy could move.
    pub moved_per_event: Vec<u64>,
    pub minimum_moved_per_event: Vec<u64>,
    /// Per event, the time its moved tunnels spend dark as the peers'
    /// timers (`[peers]`, `compare::outage`) predict it: tunnel-seconds in
    /// all, and one tunnel's median, 95th percentile and longest, seconds;
    /// and the tunnels that never come back (`dpd_action = "clear"`).
    /// Empty for a lab's measured run (its prediction is beside it).
    pub outage_seconds_per_event: Vec<f64>,
    pub outage_p50_per_event: Vec<f64>,
    pub outage_p95_per_event: Vec<f64>,
    pub outage_max_per_event: Vec<f64>,
    pub never_back_per_event: Vec<u64>,
    /// Per event, of its moved tunnels those moved gracefully (make-before-
    /// break, `graceful = true`: never dark), and the most new IKE SAs
    /// those moves brought one segw in one second (bounded by the
    /// scenario's `moves_per_second`). 0 where the event is not graceful.
    pub graceful_moves_per_event: Vec<u64>,
    pub setups_per_second_peak_per_event: Vec<u64>,
    /// Tunnels whose packets reached a second segw while the first was up
    /// and no rebalance was asked for. Anything but 0 is a broken tunnel.
    pub split_tunnels: u64,
    /// One per `balancer_fail` event: what the pair's takeover cost. Its
    /// moves and time in the dark are also the event's in
    /// `moved_per_event` and `outage_*_per_event`.
    pub failovers: Vec<Failover>,
    pub decisions: u64,
    /// Wall time per policy decision, wasm call included; `null` when the
    /// run was asked not to time (`--no-timing`), so a report is
    /// byte-for-byte the same for the same seed.
    pub ns_per_decision: Option<f64>,
    pub fallbacks: u64,
    /// Each segw's capacity (0: no limit), in `segws` order.
    pub capacity_per_segw: Vec<u64>,
    /// Tunnels refused at least once because every segw taking tunnels was
    /// full (a refused initiator tries again every step), and all the tries
    /// refused.
    pub refused_tunnels: u64,
    pub refused_tries: u64,
    /// Tries refused from each event's step up to the next event.
    pub refused_per_event: Vec<u64>,
    /// The policy's answers of a segw at its capacity, placed elsewhere by
    /// segwlb's guard: tunnels a balancer that did not know the capacities
    /// would have sent to a segw that refuses them.
    pub full_answers: u64,
    /// The most tunnels each segw held at the end of a step.
    pub peak_per_segw: Vec<u64>,
    /// Simulated seconds each segw spent at or above 90% of its capacity
    /// (0 for a segw without one).
    pub secs_above_90: Vec<u64>,
    /// Each segw's throughput capacity, bytes/s (0: not given), in `segws`
    /// order.
    pub throughput_capacity_per_segw: Vec<u64>,
    /// Bytes/s each segw carried, both ways, in every step (in `segws`
    /// order), as the balancer counted them.
    pub throughput_over_time: Vec<Vec<f64>>,
    /// Each segw's highest utilization in any step (see
    /// `policy::load::utilization`: the fuller of traffic over throughput
    /// capacity and tunnels over tunnel capacity).
    pub peak_utilization: BTreeMap<String, f64>,
    /// Simulated seconds in which some segw was above 80% and above 100%
    /// utilization, and each segw's own.
    pub seconds_over_80: u64,
    pub seconds_over_100: u64,
    pub seconds_over_80_per_segw: Vec<u64>,
    pub seconds_over_100_per_segw: Vec<u64>,
    /// The busy hour: the step in which the segws carried the most, and
    /// there max / mean of the per-segw throughput (over those carrying
    /// any), beside `max_over_mean`, the spread of tunnels.
    pub busy_step: u32,
    pub throughput_max_over_mean: f64,
    /// Frames through the balancer, both ways.
    pub frames: u64,
    /// Frames the balancer dropped, by reason; and segw frames that did not
    /// make it back. Both 0 when the core does its job.
    pub drops: BTreeMap<String, u64>,
    pub returns_lost: u64,
}

/// A `balancer_fail` as `report.json` gives it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failover {
    /// Its position in `events`.
    pub event: usize,
    /// Tunnels up at the failure: those the standby knew (kept where they
    /// were, no policy asked), those it placed again (opened within the
    /// replication lag), and of those, the ones placed on another segw.
    pub tunnels: u64,
    pub kept: u64,
    pub replaced: u64,
    pub moved: u64,
    /// Tunnel-seconds in the dark (every tunnel for the detection time, a
    /// moved one then until its peers set up again), one tunnel's 95th
    /// percentile and longest, seconds; and moved tunnels never back
    /// (`dpd_action = "clear"`).
    pub dark_seconds: f64,
    pub dark_p95: f64,
    pub dark_max: f64,
    pub never_back: u64,
}

/// How to run a comparison.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub seed: u64,
    pub timing: bool,
}

/// Run `scenario` with the policy `make` builds (at the start and at each
/// swap); `progress` hears each finished step.
pub fn run(
    scenario: &Scenario,
    options: Options,
    make: &mut dyn FnMut() -> Box<dyn Policy>,
    progress: &mut dyn FnMut(u32),
) -> PolicyRun {
    let out = sim::run(scenario, options.seed, make, progress);
    PolicyRun::of(scenario, options, out)
}

impl PolicyRun {
    /// What `report.json` says of one outcome: a simulated one, or the
    /// lab's (`segwlb lab compare` measures the same things on real
    /// tunnels).
    pub fn of(scenario: &Scenario, options: Options, out: sim::Outcome) -> PolicyRun {
        let end = out.per_step.last().cloned().unwrap_or_default();
        let fair = sim::fair_shares(&end, &out.fair_weights);
        let ratios: Vec<f64> = end
            .iter()
            .zip(&fair)
            .filter(|(_, f)| **f > 0.0)
            .map(|(&c, f)| c as f64 / f)
            .collect();
        let n = ratios.len().max(1) as f64;
        let mean = ratios.iter().sum::<f64>() / n;
        let var = ratios.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
        let capacities: Vec<u64> = out.segws.iter().map(|s| s.capacity).collect();
        let peak_per_segw: Vec<u64> = (0..out.segws.len())
            .map(|g| out.per_step.iter().map(|c| c[g]).max().unwrap_or(0))
            .collect();
        let secs_above_90 = capacities
            .iter()
            .enumerate()
            .map(|(g, &cap)| {
                let hot = out
                    .per_step
                    .iter()
                    .filter(|c| cap > 0 && c[g] * 10 >= cap * 9)
                    .count() as u64;
                hot * scenario.step_secs
            })
            .collect();
        // Tries refused from each event's step to the next event's (events
        // are sorted by step; of several in one step, the last takes it).
        let starts: Vec<usize> = scenario.events.iter().map(|e| e.step as usize).collect();
        let refused_per_event = starts
            .iter()
            .enumerate()
            .map(|(i, &from)| match starts.get(i + 1) {
                Some(&next) if next == from => 0,
                next => {
                    let to = next.copied().unwrap_or(usize::MAX);
                    out.refused_per_step.iter().take(to).skip(from).sum()
                }
            })
            .collect();
        let load = LoadFigures::of(scenario, &out);
        let failovers = (out.takeovers.iter().enumerate())
            .filter_map(|(event, t)| {
                let t = t.as_ref()?;
                Some(Failover {
                    event,
                    tunnels: t.tunnels,
                    kept: t.kept,
                    replaced: t.replaced,
                    moved: t.moved,
                    dark_seconds: round1(t.outage.seconds),
                    dark_p95: round1(t.outage.p95),
                    dark_max: round1(t.outage.max),
                    never_back: t.outage.never,
                })
            })
            .collect();
        PolicyRun {
            policy: out.policy,
            scenario: scenario.name.clone(),
            seed: options.seed,
            segws: out.segws.iter().map(|s| s.name.clone()).collect(),
            weights_at_end: out.fair_weights,
            tunnels_per_segw: out
                .segws
                .iter()
                .zip(&end)
                .map(|(s, &c)| (s.name.clone(), c))
                .collect(),
            tunnels_over_time: out.per_step,
            max_over_mean: round4(ratios.iter().copied().fold(0.0, f64::max)),
            cov: round4(if mean > 0.0 { var.sqrt() / mean } else { 0.0 }),
            events: scenario
                .events
                .iter()
                .map(|e| format!("step {}: {}", e.step, e.label()))
                .collect(),
            moved_per_event: out.moved,
            minimum_moved_per_event: out.minimum_moved,
            outage_seconds_per_event: out.outage.iter().map(|o| round1(o.seconds)).collect(),
            outage_p50_per_event: out.outage.iter().map(|o| round1(o.p50)).collect(),
            outage_p95_per_event: out.outage.iter().map(|o| round1(o.p95)).collect(),
            outage_max_per_event: out.outage.iter().map(|o| round1(o.max)).collect(),
            never_back_per_event: out.outage.iter().map(|o| o.never).collect(),
            graceful_moves_per_event: out.graceful,
            setups_per_second_peak_per_event: out.setups_peak,
            split_tunnels: out.split,
            failovers,
            decisions: out.decisions,
            ns_per_decision: options
                .timing
                .then(|| (out.policy_ns as f64 / out.decisions.max(1) as f64).round()),
            fallbacks: out.fallbacks,
            capacity_per_segw: capacities,
            refused_tunnels: out.refused_tunnels,
            refused_tries: out.refused_per_step.iter().sum(),
            refused_per_event,
            full_answers: out.full_answers,
            peak_per_segw,
            secs_above_90,
            throughput_capacity_per_segw: out.segws.iter().map(|s| s.throughput).collect(),
            peak_utilization: out
                .segws
                .iter()
                .zip(&load.peak)
                .map(|(s, &p)| (s.name.clone(), round4(p)))
                .collect(),
            seconds_over_80: load.over_80,
            seconds_over_100: load.over_100,
            seconds_over_80_per_segw: load.over_80_per_segw,
            seconds_over_100_per_segw: load.over_100_per_segw,
            busy_step: load.busy_step,
            throughput_max_over_mean: round4(load.busy_max_over_mean),
            throughput_over_time: load.throughput,
            frames: out.frames,
            drops: out
                .drops
                .into_iter()
                .map(|(r, n)| (r.to_string(), n))
                .collect(),
            returns_lost: out.returns_lost,
        }
    }
}

fn percent(x: f64) -> i64 {
    (x * 100.0).round() as i64
}

/// `x` to one decimal, as the reports show seconds.
pub(crate) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// Load as a run carried it, step by step.
struct LoadFigures {
    throughput: Vec<Vec<f64>>,
    peak: Vec<f64>,
    over_80: u64,
    over_100: u64,
    over_80_per_segw: Vec<u64>,
    over_100_per_segw: Vec<u64>,
    busy_step: u32,
    busy_max_over_mean: f64,
}

impl LoadFigures {
    fn of(scenario: &Scenario, out: &sim::Outcome) -> LoadFigures {
        let secs = scenario.step_secs;
        let n = out.segws.len();
        let throughput: Vec<Vec<f64>> = out
            .bytes_per_step
            .iter()
            .map(|step| step.iter().map(|&b| b as f64 / secs as f64).collect())
            .collect();
        let mut f = LoadFigures {
            peak: vec![0.0; n],
            over_80: 0,
            over_100: 0,
            over_80_per_segw: vec![0; n],
            over_100_per_segw: vec![0; n],
            busy_step: 0,
            busy_max_over_mean: 0.0,
            throughput: Vec::new(),
        };
        for (rates, tunnels) in throughput.iter().zip(&out.per_step) {
            let (mut any_80, mut any_100) = (false, false);
            for (g, spec) in out.segws.iter().enumerate() {
                let u = crate::policy::load::utilization(
                    rates[g],
                    spec.throughput,
                    tunnels[g],
                    spec.capacity,
                );
                f.peak[g] = f.peak[g].max(u);
                if u > 0.8 {
                    f.over_80_per_segw[g] += secs;
                    any_80 = true;
                }
                if u > 1.0 {
                    f.over_100_per_segw[g] += secs;
                    any_100 = true;
                }
            }
            f.over_80 += if any_80 { secs } else { 0 };
            f.over_100 += if any_100 { secs } else { 0 };
        }
        let total = |step: &Vec<f64>| step.iter().sum::<f64>();
        if let Some((busy, rates)) = throughput
            .iter()
            .enumerate()
            .max_by(|a, b| total(a.1).total_cmp(&total(b.1)).then(b.0.cmp(&a.0)))
        {
            let carrying: Vec<f64> = rates.iter().copied().filter(|&r| r > 0.0).collect();
            let mean = carrying.iter().sum::<f64>() / carrying.len().max(1) as f64;
            let max = carrying.iter().copied().fold(0.0, f64::max);
            f.busy_step = busy as u32;
            f.busy_max_over_mean = if mean > 0.0 { max / mean } else { 0.0 };
        }
        f.throughput = throughput;
        f
    }
}

impl PolicyRun {
    /// Each segw's peak: `name peak/capacity (s at >= 90%)`, or `name peak`
    /// for one without a capacity.
    pub fn peak_cells(&self) -> Vec<String> {
        self.segws
            .iter()
            .enumerate()
            .map(|(g, name)| match self.capacity_per_segw[g] {
                0 => format!("{name} {}", self.peak_per_segw[g]),
                cap => format!(
                    "{name} {}/{cap} ({})",
                    self.peak_per_segw[g], self.secs_above_90[g]
                ),
            })
            .collect()
    }

    /// Does any segw have a throughput capacity (so load is ranked)?
    pub fn carries_traffic_load(&self) -> bool {
        self.throughput_capacity_per_segw.iter().any(|&t| t > 0)
    }

    /// How well it carried the load, lower is better: seconds over 100%,
    /// over 80%, and the hottest segw's peak in whole percent (as shown: a
    /// tenth of a percent is noise, and the spread of tunnels decides then).
    pub fn load_key(&self) -> (u64, u64, i64) {
        (
            self.seconds_over_100,
            self.seconds_over_80,
            percent(self.peak_utilization_max()),
        )
    }

    /// The hottest segw's peak utilization.
    pub fn peak_utilization_max(&self) -> f64 {
        self.peak_utilization.values().copied().fold(0.0, f64::max)
    }

    /// Moves over all events against the minimum: 1.0 is the least any
    /// policy could disturb.
    pub fn disruption(&self) -> f64 {
        let moved: u64 = self.moved_per_event.iter().sum();
        let minimum: u64 = self.minimum_moved_per_event.iter().sum();
        if minimum == 0 {
            if moved == 0 {
                1.0
            } else {
                f64::INFINITY
            }
        } else {
            moved as f64 / minimum as f64
        }
    }
}

/// Best first: broken tunnels lose outright, then refused tunnels, then
/// answers of a full segw (0 for all without capacities), then — where
/// segws have a throughput capacity — load (seconds over 100%, over 80%,
/// the hottest segw's peak), then the spread of tunnels, then the
/// disruption.
pub fn ranked(runs: &[PolicyRun]) -> Vec<&PolicyRun> {
    let mut ranked: Vec<&PolicyRun> = runs.iter().collect();
    ranked.sort_by(|a, b| {
        a.split_tunnels
            .cmp(&b.split_tunnels)
            .then(a.refused_tunnels.cmp(&b.refused_tunnels))
            .then(a.full_answers.cmp(&b.full_answers))
            .then_with(|| match a.carries_traffic_load() {
                // Where segws have a throughput capacity, load before count.
                true => a.load_key().cmp(&b.load_key()),
                false => std::cmp::Ordering::Equal,
            })
            .then(a.max_over_mean.total_cmp(&b.max_over_mean))
            .then(a.disruption().total_cmp(&b.disruption()))
            .then(a.policy.cmp(&b.policy))
    });
    ranked
}

/// The terminal table: one row per policy, ranked.
pub struct Table<'a> {
    pub scenario: &'a Scenario,
    pub seed: u64,
    pub runs: &'a [PolicyRun],
}

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "scenario {}; seed {}", self.scenario, self.seed)?;
        let events: Vec<String> = self
            .scenario
            .events
            .iter()
            .enumerate()
            .map(|(i, e)| format!("[{}] step {}: {}", i + 1, e.step, e.label()))
            .collect();
        writeln!(f, "events:   {}", events.join("  "))?;
        writeln!(f)?;
        let ranked = ranked(self.runs);
        let width = ranked
            .iter()
            .map(|r| moved_cell(r).chars().count())
            .max()
            .unwrap_or(0)
            .max(29);
        writeln!(
            f,
            "{:<4} {:<18} {:>9} {:>7}  {:<width$} {:>5} {:>7} {:>9}",
            "rank",
            "policy",
            "max/fair",
            "cov",
            "moved at each event (minimum)",
            "split",
            "ns/dec",
            "fallbacks"
        )?;
        for (i, r) in ranked.iter().enumerate() {
            let ns = r
                .ns_per_decision
                .map_or_else(|| "-".to_string(), |ns| format!("{ns:.0}"));
            writeln!(
                f,
                "{:<4} {:<18} {:>9.3} {:>6.1}%  {:<width$} {:>5} {:>7} {:>9}",
                i + 1,
                r.policy,
                r.max_over_mean,
                r.cov * 100.0,
                moved_cell(r),
                r.split_tunnels,
                ns,
                r.fallbacks
            )?;
        }
        for r in &ranked {
            // Foreign traffic (ARP for others, non-IPsec) is normal on a
            // real link (the lab's); anything else is a tunnel's loss.
            // Refusals for capacity are the capacity table's, below.
            let lost: BTreeMap<&str, u64> = r
                .drops
                .iter()
                .filter(|(reason, _)| {
                    !DropReason::ALL.iter().any(|d| {
                        d.as_str() == reason.as_str()
                            && (d.is_foreign() || *d == DropReason::AtCapacity)
                    })
                })
                .map(|(reason, &n)| (reason.as_str(), n))
                .collect();
            let dropped: u64 = lost.values().sum();
            if dropped > 0 || r.returns_lost > 0 {
                writeln!(
                    f,
                    "  ! {}: the balancer dropped {dropped} tunnel frames {lost:?}, {} replies lost",
                    r.policy, r.returns_lost
                )?;
            }
        }
        if self.scenario.has_capacities() {
            writeln!(f)?;
            capacity_table(f, &ranked)?;
        }
        if let Some(traffic) = &self.scenario.traffic {
            writeln!(f)?;
            writeln!(f, "{}", traffic.describe())?;
            load_table(f, self.scenario, &ranked)?;
        }
        if ranked.iter().any(|r| {
            r.moved_per_event.iter().any(|&m| m > 0)
                || r.outage_seconds_per_event.iter().any(|&s| s > 0.0)
        }) {
            writeln!(f)?;
            outage_table(f, self.scenario, &ranked)?;
        }
        if self.scenario.has_failovers() {
            writeln!(f)?;
            failover_table(f, self.scenario, &ranked)?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "tunnels per segw: at the end of each event's step, and at the end"
        )?;
        let steps: Vec<usize> = self
            .scenario
            .events
            .iter()
            .map(|e| e.step as usize)
            .chain([self.scenario.steps as usize - 1])
            .collect();
        for r in ranked {
            writeln!(f, "  {}", r.policy)?;
            for (g, name) in r.segws.iter().enumerate() {
                let row: Vec<String> = steps
                    .iter()
                    .filter_map(|&s| r.tunnels_over_time.get(s))
                    .map(|counts| format!("{:>7}", counts[g]))
                    .collect();
                writeln!(f, "    {name:<8}{}", row.join(""))?;
            }
        }
        Ok(())
    }
}

/// Refusals, answers of a full segw, and each segw's peak against its
/// capacity; then who refuses fewest.
fn capacity_table(f: &mut fmt::Formatter<'_>, ranked: &[&PolicyRun]) -> fmt::Result {
    writeln!(
        f,
        "capacity: refused = tunnels with every segw full (tries; at each event); \
         full answers = the policy chose a full segw and segwlb placed the tunnel elsewhere \
         (a balancer blind to capacity would have lost it there)"
    )?;
    writeln!(
        f,
        "  {:<18} {:>8} {:>7}  {:<22} {:>12}  peak/capacity (s at >= 90%)",
        "policy", "refused", "tries", "at each event", "full answers"
    )?;
    for r in ranked {
        let events: Vec<String> = r
            .refused_per_event
            .iter()
            .enumerate()
            .map(|(e, n)| format!("[{}]{n}", e + 1))
            .collect();
        writeln!(
            f,
            "  {:<18} {:>8} {:>7}  {:<22} {:>12}  {}",
            r.policy,
            r.refused_tunnels,
            r.refused_tries,
            events.join(" "),
            r.full_answers,
            r.peak_cells().join("  ")
        )?;
    }
    if let Some(best) = ranked.first() {
        let ties: Vec<&str> = ranked
            .iter()
            .filter(|r| r.refused_tunnels == best.refused_tunnels)
            .map(|r| r.policy.as_str())
            .collect();
        write!(
            f,
            "refuses fewest: {} ({} tunnels)",
            ties.join(", "),
            best.refused_tunnels
        )?;
        if ties.len() > 1 {
            write!(
                f,
                "; of those, fewest answers of a full segw: {} ({})",
                best.policy, best.full_answers
            )?;
        }
        writeln!(f)?;
    }
    Ok(())
}

/// Each segw's peak utilization, the seconds over 80% and 100%, and the
/// spread of bytes at the busy hour beside the spread of tunnels; then who
/// carried the load best.
fn load_table(
    f: &mut fmt::Formatter<'_>,
    scenario: &Scenario,
    ranked: &[&PolicyRun],
) -> fmt::Result {
    let Some(first) = ranked.first() else {
        return Ok(());
    };
    let clock = |step: u32| {
        let start = scenario
            .traffic
            .as_ref()
            .map_or(0.0, |t| t.start_hour * 3600.0);
        let secs = start + f64::from(step) * scenario.step_secs as f64;
        let minutes = (secs / 60.0).round() as u64 % (24 * 60);
        format!("{:02}:{:02}", minutes / 60, minutes % 60)
    };
    writeln!(
        f,
        "load: utilization = the fuller of traffic / throughput capacity and tunnels / tunnel capacity; \
         busy hour = the step the segws carried most ({} for {})",
        clock(first.busy_step),
        first.policy
    )?;
    writeln!(
        f,
        "  {:<18} {:>6} {:>6}  {:>13} {:>13}  peak utilization per segw",
        "policy", "s>80%", "s>100%", "bytes max/mean", "tunnels max/fair"
    )?;
    for r in ranked {
        let peaks: Vec<String> = r
            .segws
            .iter()
            .map(|name| format!("{name} {:.0}%", r.peak_utilization[name] * 100.0))
            .collect();
        writeln!(
            f,
            "  {:<18} {:>6} {:>6}  {:>13.3} {:>13.3}  {}",
            r.policy,
            r.seconds_over_80,
            r.seconds_over_100,
            r.throughput_max_over_mean,
            r.max_over_mean,
            peaks.join("  ")
        )?;
    }
    // The first in the ranking of those that carried it best (min_by_key
    // keeps the first of equals).
    let best = ranked
        .iter()
        .min_by_key(|r| r.load_key())
        .expect("not empty");
    writeln!(
        f,
        "carries the load best: {} ({} s over 100%, {} s over 80%, hottest segw at {:.0}%)",
        best.policy,
        best.seconds_over_100,
        best.seconds_over_80,
        best.peak_utilization_max() * 100.0
    )
}

/// Per policy and event: the tunnel-minutes its moves cost in the dark,
/// and one tunnel's p95; then who costs least.
fn outage_table(
    f: &mut fmt::Formatter<'_>,
    scenario: &Scenario,
    ranked: &[&PolicyRun],
) -> fmt::Result {
    writeln!(f, "time in the dark: {}", scenario.peers.describe())?;
    writeln!(
        f,
        "  {:<18} {:>9}  tunnel-minutes dark (p95 of one tunnel) at each event",
        "policy", "in all"
    )?;
    for r in ranked {
        if r.outage_seconds_per_event.is_empty() {
            continue;
        }
        let cells: Vec<String> = (r.outage_seconds_per_event.iter())
            .zip(&r.outage_p95_per_event)
            .zip(&r.never_back_per_event)
            .enumerate()
            .filter(|(e, ((secs, _), _))| r.moved_per_event[*e] > 0 || **secs > 0.0)
            .map(|(e, ((secs, p95), never))| {
                let never = match never {
                    0 => String::new(),
                    n => format!(", {n} never back"),
                };
                let graceful = match r.graceful_moves_per_event.get(e) {
                    Some(&n) if n > 0 => format!(
                        ", {n} graceful at ≤{}/s a segw",
                        r.setups_per_second_peak_per_event[e]
                    ),
                    _ => String::new(),
                };
                format!(
                    "[{}]{:.1} ({p95:.1} s{never}{graceful})",
                    e + 1,
                    secs / 60.0
                )
            })
            .collect();
        let all: f64 = r.outage_seconds_per_event.iter().sum();
        writeln!(
            f,
            "  {:<18} {:>9.1}  {}",
            r.policy,
            all / 60.0,
            cells.join(" ")
        )?;
    }
    let dark = |r: &&&PolicyRun| {
        let secs: f64 = r.outage_seconds_per_event.iter().sum();
        let never: u64 = r.never_back_per_event.iter().sum();
        (never, (secs * 10.0).round() as u64)
    };
    if let Some(best) = ranked
        .iter()
        .filter(|r| !r.outage_seconds_per_event.is_empty())
        .min_by_key(dark)
    {
        writeln!(
            f,
            "least time in the dark: {} ({:.1} tunnel-minutes)",
            best.policy,
            best.outage_seconds_per_event.iter().sum::<f64>() / 60.0
        )?;
    }
    Ok(())
}

/// Per policy and `balancer_fail`: the tunnels the standby knew, those it
/// placed again and those it moved, and their time in the dark; then who
/// moves fewest.
fn failover_table(
    f: &mut fmt::Formatter<'_>,
    scenario: &Scenario,
    ranked: &[&PolicyRun],
) -> fmt::Result {
    writeln!(f, "balancer failover: {}", scenario.pair.describe())?;
    writeln!(
        f,
        "  {:<18} at each failover: tunnels kept / re-placed / moved, tunnel-minutes dark (p95 of one tunnel)",
        "policy"
    )?;
    for r in ranked {
        let cells: Vec<String> = r
            .failovers
            .iter()
            .map(|o| {
                let never = match o.never_back {
                    0 => String::new(),
                    n => format!(", {n} never back"),
                };
                format!(
                    "[{}] {} / {} / {}, {:.1} ({:.1} s{never})",
                    o.event + 1,
                    o.kept,
                    o.replaced,
                    o.moved,
                    o.dark_seconds / 60.0,
                    o.dark_p95
                )
            })
            .collect();
        writeln!(f, "  {:<18} {}", r.policy, cells.join("  "))?;
    }
    let moved = |r: &&&PolicyRun| r.failovers.iter().map(|o| o.moved).sum::<u64>();
    if let Some(best) = ranked.iter().min_by_key(moved) {
        writeln!(
            f,
            "moves fewest at a failover: {} ({} of {} re-placed)",
            best.policy,
            moved(&best),
            best.failovers.iter().map(|o| o.replaced).sum::<u64>()
        )?;
    }
    Ok(())
}

fn moved_cell(r: &PolicyRun) -> String {
    let cells: Vec<String> = r
        .moved_per_event
        .iter()
        .zip(&r.minimum_moved_per_event)
        .enumerate()
        .map(|(e, (m, min))| format!("[{}]{m}({min})", e + 1))
        .collect();
    cells.join(" ")
}

#[cfg(test)]
mod tests;
