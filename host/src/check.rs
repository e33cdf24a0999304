//! `segwlb policy check`: a policy author's first feedback loop.
//!
//! Feeds a policy a sample gateway set and synthetic tunnels through the
//! same [`Guarded`] wrapper the balancer uses, and reports the spread, the
//! cost per decision, what a rebalance after one gateway leaves would move,
//! and every contract violation (each one a fallback the host had to make).

use std::fmt;
use std::time::Instant;

use crate::policy::{FallbackReason, Gateway, Guarded, Load, Policy, PolicyStats};
use crate::time::Timestamp;
use crate::workload::{self, Mix};

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub gateways: u32,
    pub tunnels: usize,
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            gateways: 4,
            tunnels: 10_000,
            seed: 1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub policy: String,
    /// (name, tunnels) per gateway, all healthy.
    pub counts: Vec<(String, u64)>,
    pub max_over_mean: f64,
    pub ns_per_decision: f64,
    /// Share of tunnels placed elsewhere when the last gateway is down and
    /// every tunnel is placed afresh, and the minimum (that gateway's share).
    pub rebalance_moved: Option<(f64, f64)>,
    pub stats: PolicyStats,
}

impl Report {
    /// Contract violations: each is a fallback the host had to make.
    pub fn violations(&self) -> Vec<(FallbackReason, u64)> {
        FallbackReason::ALL
            .iter()
            .map(|&r| (r, self.stats.fallbacks_for(r)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

fn sample_set(n: u32) -> Vec<Gateway> {
    (1..=n)
        .map(|id| Gateway {
            id,
            name: format!("segw{id}"),
            weight: 1,
            healthy: true,
            draining: false,
            tunnels: 0,
            capacity: 0,
            throughput: 0,
        })
        .collect()
}

pub fn run(policy: Box<dyn Policy>, opts: Options) -> Report {
    let keys = workload::tunnel_keys(opts.seed, opts.tunnels, Mix::default());
    let mut guarded = Guarded::new(policy);
    let set = sample_set(opts.gateways.max(1));
    guarded.set_gateways(set.clone(), Timestamp::ZERO);

    // Each placement counts in the live load the next decision reads, as
    // in the balancer.
    let place = |guarded: &mut Guarded<_>, load: &mut Load, k| {
        let gw = guarded.choose(k, load, Timestamp::ZERO).ok()?.gateway;
        load.add(gw, 1);
        Some(gw)
    };
    let started = Instant::now();
    let mut load = Load::default();
    let placed: Vec<Option<u32>> = keys
        .iter()
        .map(|k| place(&mut guarded, &mut load, k))
        .collect();
    let ns_per_decision = started.elapsed().as_nanos() as f64 / keys.len().max(1) as f64;

    let counts: Vec<(String, u64)> = set
        .iter()
        .map(|g| {
            (
                g.name.clone(),
                placed.iter().filter(|&&p| p == Some(g.id)).count() as u64,
            )
        })
        .collect();
    let mean = keys.len() as f64 / set.len() as f64;
    let max = counts.iter().map(|c| c.1).max().unwrap_or(0) as f64;

    // One gateway down, one draining: the policy must avoid both. Then
    // the down one alone, placing every tunnel afresh, for the rebalance cost.
    let mut rebalance_moved = None;
    if set.len() >= 3 {
        let mut constrained = set.clone();
        constrained[0].healthy = false;
        constrained[1].draining = true;
        guarded.set_gateways(constrained, Timestamp::ZERO);
        let mut load = Load::default();
        for k in keys.iter().take(2_000) {
            place(&mut guarded, &mut load, k);
        }
    }
    if set.len() >= 2 {
        let mut one_down = set.clone();
        let last = one_down.len() - 1;
        one_down[last].healthy = false;
        let down_id = one_down[last].id;
        guarded.set_gateways(one_down, Timestamp::ZERO);
        let mut load = Load::default();
        let moved = keys
            .iter()
            .zip(&placed)
            .filter(|(k, before)| place(&mut guarded, &mut load, k) != **before)
            .count();
        let minimum = placed.iter().filter(|&&p| p == Some(down_id)).count();
        let n = keys.len().max(1) as f64;
        rebalance_moved = Some((moved as f64 / n, minimum as f64 / n));
    }

    Report {
        policy: guarded.policy().name().to_string(),
        counts,
        max_over_mean: if mean > 0.0 { max / mean } else { 0.0 },
        ns_per_decision,
        rebalance_moved,
        stats: guarded.stats().clone(),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: u64 = self.counts.iter().map(|c| c.1).sum();
        writeln!(
            f,
            "policy {}: {} gateways, {} tunnels",
            self.policy,
            self.counts.len(),
            total
        )?;
        let widest = self.counts.iter().map(|c| c.1).max().unwrap_or(1).max(1);
        for (name, n) in &self.counts {
            let bar = "#".repeat((n * 40 / widest) as usize);
            writeln!(f, "  {name:<10} {n:>9}  {bar}")?;
        }
        writeln!(f, "max/mean        {:.3}", self.max_over_mean)?;
        writeln!(f, "ns per decision {:.0}", self.ns_per_decision)?;
        if let Some((moved, minimum)) = self.rebalance_moved {
            writeln!(
                f,
                "rebalance after one gateway leaves: {:.1}% of tunnels move (minimum {:.1}%)",
                moved * 100.0,
                minimum * 100.0
            )?;
        }
        let violations = self.violations();
        if violations.is_empty() {
            write!(
                f,
                "contract: ok ({} decisions, no fallbacks)",
                self.stats.decisions
            )
        } else {
            write!(f, "contract: VIOLATED:")?;
            for (reason, n) in violations {
                write!(f, " {}×{n}", reason.as_str())?;
            }
            Ok(())
        }
    }
}
