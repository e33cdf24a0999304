//! `segwlb compare`: every policy on the same scenario, driven as real
//! frames through the balancer core ([`sim`]), measured the same way, and
//! reported as a ranked table, `report.json` and `report.html`.

pub mod report;
pub mod scenario;
pub mod sim;

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::balancer::DropReason;
use crate::policy::Policy;
pub use scenario::{Event, Scenario, ScenarioError, SegwSpec, TimedEvent};

/// Keys every object of `report.json` has, `segwlb compare`'s and
/// `segwlb lab compare`'s alike: what tools may rely on.
pub const REPORT_KEYS: [&str; 9] = [
    "policy",
    "tunnels_per_segw",
    "max_over_mean",
    "cov",
    "moved_per_event",
    "minimum_moved_per_event",
    "split_tunnels",
    "ns_per_decision",
    "fallbacks",
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
    /// Tunnels whose packets reached a second segw while the first was up
    /// and no rebalance was asked for. Anything but 0 is a broken tunnel.
    pub split_tunnels: u64,
    pub decisions: u64,
    /// Wall time per policy decision, wasm call included; `null` when the
    /// run was asked not to time (`--no-timing`), so a report is
    /// byte-for-byte the same for the same seed.
    pub ns_per_decision: Option<f64>,
    pub fallbacks: u64,
    /// Frames through the balancer, both ways.
    pub frames: u64,
    /// Frames the balancer dropped, by reason; and segw frames that did not
    /// make it back. Both 0 when the core does its job.
    pub drops: BTreeMap<String, u64>,
    pub returns_lost: u64,
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
                .map(|e| format!("step {}: {}", e.step, e.event.label()))
                .collect(),
            moved_per_event: out.moved,
            minimum_moved_per_event: out.minimum_moved,
            split_tunnels: out.split,
            decisions: out.decisions,
            ns_per_decision: options
                .timing
                .then(|| (out.policy_ns as f64 / out.decisions.max(1) as f64).round()),
            fallbacks: out.fallbacks,
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

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

impl PolicyRun {
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

/// Best first: broken tunnels lose outright, then the spread, then the
/// disruption.
pub fn ranked(runs: &[PolicyRun]) -> Vec<&PolicyRun> {
    let mut ranked: Vec<&PolicyRun> = runs.iter().collect();
    ranked.sort_by(|a, b| {
        a.split_tunnels
            .cmp(&b.split_tunnels)
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
            .map(|(i, e)| format!("[{}] step {}: {}", i + 1, e.step, e.event.label()))
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
            let lost: BTreeMap<&str, u64> = r
                .drops
                .iter()
                .filter(|(reason, _)| {
                    !DropReason::ALL
                        .iter()
                        .any(|d| d.as_str() == reason.as_str() && d.is_foreign())
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
