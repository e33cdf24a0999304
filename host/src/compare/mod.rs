//! `segwlb compare`: every policy on the same workload, side by side.
//!
//! Today the workload runs through the policy layer as the balancer uses it
//! ([`Guarded`] over the real wasm component), with tunnel affinity as the
//! design fixes it: a tunnel keeps its segw until that segw fails or a
//! rebalance is asked for; only new tunnels ask the policy. Driving the
//! same scenario as frames through the balancer core is the next step.

pub mod scenario;

use std::fmt;
use std::time::{Duration, Instant};

use crate::policy::{Gateway, Guarded, Policy, TunnelKey};
use crate::time::Timestamp;
use crate::workload::{self, Rng};
pub use scenario::{Event, Scenario, SegwSpec};

/// One policy's run through a scenario.
#[derive(Debug, Clone)]
pub struct PolicyRun {
    pub policy: String,
    pub segws: Vec<String>,
    /// Tunnels per segw (in `segws` order) at the start and after each event.
    pub tunnels_per_segw: Vec<Vec<u64>>,
    /// Per event: tunnels moved, and the fewest any policy could move.
    pub moved_per_event: Vec<u64>,
    pub minimum_moved_per_event: Vec<u64>,
    /// max(count / fair share) over segws taking tunnels at the end, where
    /// the fair share follows the weights.
    pub max_over_fair: f64,
    /// Coefficient of variation of count / fair share at the end.
    pub cov: f64,
    pub decisions: u64,
    pub ns_per_decision: f64,
    pub fallbacks: u64,
}

struct Farm {
    gateways: Vec<Gateway>,
    /// Live tunnels and their segw id.
    tunnels: Vec<(TunnelKey, u32)>,
    policy: Guarded,
    in_policy: Duration,
}

impl Farm {
    fn push_set(&mut self) {
        for g in &mut self.gateways {
            g.tunnels = self.tunnels.iter().filter(|t| t.1 == g.id).count() as u64;
        }
        self.policy
            .set_gateways(self.gateways.clone(), Timestamp::ZERO);
    }

    fn place(&mut self, key: &TunnelKey) -> Option<u32> {
        let started = Instant::now();
        let choice = self.policy.choose(key, Timestamp::ZERO);
        self.in_policy += started.elapsed();
        choice.map(|c| c.gateway)
    }

    fn open(&mut self, key: TunnelKey) {
        if let Some(gw) = self.place(&key) {
            self.tunnels.push((key, gw));
        }
    }

    /// Place again the tunnels `which` selects; returns how many changed segw.
    fn replace(&mut self, which: impl Fn(u32) -> bool) -> u64 {
        let mut moved = 0;
        for i in 0..self.tunnels.len() {
            let (key, old) = self.tunnels[i].clone();
            if which(old) {
                match self.place(&key) {
                    Some(new) => {
                        moved += u64::from(new != old);
                        self.tunnels[i].1 = new;
                    }
                    None => self.tunnels[i].1 = u32::MAX,
                }
            }
        }
        self.tunnels.retain(|t| t.1 != u32::MAX);
        moved
    }

    fn id(&self, name: &str) -> usize {
        self.gateways
            .iter()
            .position(|g| g.name == name)
            .unwrap_or_else(|| panic!("no segw {name}"))
    }

    fn counts(&self) -> Vec<u64> {
        self.gateways
            .iter()
            .map(|g| self.tunnels.iter().filter(|t| t.1 == g.id).count() as u64)
            .collect()
    }

    /// Fair share per segw (0 for those not taking tunnels).
    fn fair(&self) -> Vec<f64> {
        let total: f64 = self.tunnels.len() as f64;
        let weight: u32 = self
            .gateways
            .iter()
            .filter(|g| g.takes_new_tunnels())
            .map(|g| g.weight)
            .sum();
        self.gateways
            .iter()
            .map(|g| {
                if g.takes_new_tunnels() {
                    total * f64::from(g.weight) / f64::from(weight)
                } else {
                    0.0
                }
            })
            .collect()
    }
}

/// Run `scenario` with the policy `make` builds (called once at the start
/// and again for each hot swap).
pub fn run(scenario: &Scenario, seed: u64, make: &mut dyn FnMut() -> Box<dyn Policy>) -> PolicyRun {
    let first = make();
    let name = first.name().to_string();
    let mut farm = Farm {
        gateways: Vec::new(),
        tunnels: Vec::new(),
        policy: Guarded::new(first),
        in_policy: Duration::ZERO,
    };
    let mut next_id = 1;
    let mut add = |farm: &mut Farm, spec: &SegwSpec| {
        farm.gateways.push(Gateway {
            id: next_id,
            name: spec.name.clone(),
            weight: spec.weight,
            healthy: true,
            draining: false,
            tunnels: 0,
        });
        next_id += 1;
    };
    for spec in &scenario.segws {
        add(&mut farm, spec);
    }
    farm.push_set();

    // One stream of keys: the initial population, then each step's arrivals.
    let churned = (scenario.tunnels as f64 * scenario.churn).round() as usize;
    let total = scenario.tunnels + churned * scenario.events.len();
    let mut keys = workload::tunnel_keys(seed, total, scenario.mix).into_iter();
    let mut rng = Rng::new(seed ^ 0xc0ffee);
    for key in keys.by_ref().take(scenario.tunnels) {
        farm.open(key);
    }

    let mut series = vec![farm.counts()];
    let (mut moved, mut minimum) = (Vec::new(), Vec::new());
    for event in &scenario.events {
        for _ in 0..churned.min(farm.tunnels.len()) {
            let gone = rng.below(farm.tunnels.len() as u64) as usize;
            farm.tunnels.swap_remove(gone);
        }
        for key in keys.by_ref().take(churned) {
            farm.open(key);
        }
        let (m, min) = match event {
            Event::Fail(n) | Event::Remove(n) => {
                let i = farm.id(n);
                let id = farm.gateways[i].id;
                if matches!(event, Event::Fail(_)) {
                    farm.gateways[i].healthy = false;
                } else {
                    farm.gateways.remove(i);
                }
                farm.push_set();
                let stranded = farm.tunnels.iter().filter(|t| t.1 == id).count() as u64;
                (farm.replace(|gw| gw == id), stranded)
            }
            Event::Recover(n) => {
                let i = farm.id(n);
                farm.gateways[i].healthy = true;
                farm.push_set();
                (0, 0)
            }
            Event::Add(spec) => {
                add(&mut farm, spec);
                farm.push_set();
                (0, 0)
            }
            Event::Weight(n, w) => {
                let i = farm.id(n);
                farm.gateways[i].weight = *w;
                farm.push_set();
                (0, 0)
            }
            Event::Drain(n) => {
                let i = farm.id(n);
                farm.gateways[i].draining = true;
                farm.push_set();
                (0, 0)
            }
            Event::Swap { rebalance } => {
                farm.policy.replace(make());
                if *rebalance {
                    // The fewest moves that reach fair shares: the excess
                    // of every segw over its share.
                    let excess: f64 = farm
                        .counts()
                        .iter()
                        .zip(farm.fair())
                        .map(|(&c, f)| (c as f64 - f).max(0.0))
                        .sum();
                    (farm.replace(|_| true), excess.round() as u64)
                } else {
                    (0, 0)
                }
            }
        };
        moved.push(m);
        minimum.push(min);
        series.push(farm.counts());
    }
    // Segws added later have no entry in the earlier snapshots: pad with 0.
    let width = farm.gateways.len();
    series.iter_mut().for_each(|s| s.resize(width, 0));

    let ratios: Vec<f64> = farm
        .counts()
        .iter()
        .zip(farm.fair())
        .filter(|(_, f)| *f > 0.0)
        .map(|(&c, f)| c as f64 / f)
        .collect();
    let mean = ratios.iter().sum::<f64>() / ratios.len().max(1) as f64;
    let var = ratios.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / ratios.len().max(1) as f64;
    let stats = farm.policy.stats();
    PolicyRun {
        policy: name,
        segws: farm.gateways.iter().map(|g| g.name.clone()).collect(),
        tunnels_per_segw: series,
        moved_per_event: moved,
        minimum_moved_per_event: minimum,
        max_over_fair: ratios.iter().copied().fold(0.0, f64::max),
        cov: if mean > 0.0 { var.sqrt() / mean } else { 0.0 },
        decisions: stats.decisions,
        ns_per_decision: farm.in_policy.as_nanos() as f64 / stats.decisions.max(1) as f64,
        fallbacks: stats.fallbacks_total(),
    }
}

/// The terminal table: one row per policy, best spread first.
pub struct Table<'a> {
    pub scenario: &'a Scenario,
    pub seed: u64,
    pub runs: &'a [PolicyRun],
}

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.scenario;
        let segws: Vec<String> = s
            .segws
            .iter()
            .map(|g| {
                if g.weight == 1 {
                    g.name.clone()
                } else {
                    format!("{}(w{})", g.name, g.weight)
                }
            })
            .collect();
        writeln!(
            f,
            "workload: {} tunnels over {}; {:.0}% NAT'd, {:.0}% raw ESP; {:.0}% churn per step; seed {}",
            s.tunnels,
            segws.join(" "),
            s.mix.nat * 100.0,
            (1.0 - s.mix.nat) * s.mix.raw_esp * 100.0,
            s.churn * 100.0,
            self.seed
        )?;
        let events: Vec<String> = s
            .events
            .iter()
            .enumerate()
            .map(|(i, e)| format!("[{}] {}", i + 1, e.label()))
            .collect();
        writeln!(f, "events:   {}", events.join("  "))?;
        writeln!(f)?;
        let mut ranked: Vec<&PolicyRun> = self.runs.iter().collect();
        ranked.sort_by(|a, b| {
            a.max_over_fair
                .total_cmp(&b.max_over_fair)
                .then(a.policy.cmp(&b.policy))
        });
        let width = ranked
            .iter()
            .map(|r| moved_cell(r).chars().count())
            .max()
            .unwrap_or(0)
            .max(29);
        writeln!(
            f,
            "{:<4} {:<18} {:>9} {:>7}  {:<width$} {:>7} {:>9}",
            "rank",
            "policy",
            "max/fair",
            "cov",
            "moved at each event (minimum)",
            "ns/dec",
            "fallbacks"
        )?;
        for (i, r) in ranked.iter().enumerate() {
            writeln!(
                f,
                "{:<4} {:<18} {:>9.3} {:>6.1}%  {:<width$} {:>7.0} {:>9}",
                i + 1,
                r.policy,
                r.max_over_fair,
                r.cov * 100.0,
                moved_cell(r),
                r.ns_per_decision,
                r.fallbacks
            )?;
        }
        writeln!(f)?;
        writeln!(f, "tunnels per segw: at start, then after each event")?;
        for r in ranked {
            writeln!(f, "  {}", r.policy)?;
            for (g, name) in r.segws.iter().enumerate() {
                let row: Vec<String> = r
                    .tunnels_per_segw
                    .iter()
                    .map(|s| format!("{:>6}", s[g]))
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
mod tests {
    use super::*;
    use crate::policy::native;
    use crate::workload::Mix;

    fn small(events: Vec<Event>) -> Scenario {
        let segw = |name: &str| SegwSpec {
            name: name.into(),
            weight: 1,
        };
        Scenario {
            segws: vec![segw("a"), segw("b"), segw("c")],
            tunnels: 12,
            mix: Mix::default(),
            churn: 0.0,
            events,
        }
    }

    fn run_native(name: &str, scenario: &Scenario) -> PolicyRun {
        run(scenario, 1, &mut || native::shipped(name, &[]).unwrap())
    }

    #[test]
    fn round_robin_twelve_over_three_then_one_fails() {
        let r = run_native(
            "round-robin",
            &small(vec![Event::Fail("b".into()), Event::Recover("b".into())]),
        );
        assert_eq!(r.tunnels_per_segw[0], [4, 4, 4]);
        // b's 4 tunnels alternate over a and c; nobody else moves.
        assert_eq!(r.tunnels_per_segw[1], [6, 0, 6]);
        assert_eq!((r.moved_per_event[0], r.minimum_moved_per_event[0]), (4, 4));
        // Recovery moves nothing: affinity.
        assert_eq!(r.tunnels_per_segw[2], [6, 0, 6]);
        assert_eq!(r.moved_per_event[1], 0);
        assert!((r.max_over_fair - 1.5).abs() < 1e-9, "{}", r.max_over_fair);
    }

    #[test]
    fn rebalance_minimum_is_the_excess_over_fair_shares() {
        let r = run_native(
            "round-robin",
            &small(vec![
                Event::Fail("b".into()),
                Event::Recover("b".into()),
                Event::Swap { rebalance: true },
            ]),
        );
        // 6/0/6 against a fair 4/4/4: two must leave a and two leave c.
        assert_eq!(r.minimum_moved_per_event[2], 4);
        assert_eq!(r.tunnels_per_segw[3], [4, 4, 4]);
        assert!(r.moved_per_event[2] >= 4);
    }

    #[test]
    fn a_hot_swap_without_rebalance_moves_nothing() {
        let r = run_native(
            "consistent-hash",
            &small(vec![Event::Swap { rebalance: false }]),
        );
        assert_eq!((r.moved_per_event[0], r.minimum_moved_per_event[0]), (0, 0));
        assert_eq!(r.tunnels_per_segw[0], r.tunnels_per_segw[1]);
    }

    #[test]
    fn builtin_shows_the_tradeoffs() {
        let s = Scenario::builtin();
        let ch = run_native("consistent-hash", &s);
        let rr = run_native("round-robin", &s);
        let w = run_native("weighted", &s);
        let rebalance = s.events.len() - 1;
        // Consistent hashing moves close to the minimum on the rebalance,
        // round-robin far more.
        let excess = |r: &PolicyRun| {
            r.moved_per_event[rebalance] as f64 / r.minimum_moved_per_event[rebalance] as f64
        };
        assert!(
            excess(&ch) < 1.5,
            "consistent-hash moved {}x the minimum",
            excess(&ch)
        );
        assert!(
            excess(&rr) > 2.0,
            "round-robin moved {}x the minimum",
            excess(&rr)
        );
        // Weighted honours 2:1:1:1(:1) after the rebalance; the others cannot.
        assert!(
            w.max_over_fair < 1.05,
            "weighted max/fair {}",
            w.max_over_fair
        );
        // Ignoring weights, each of 5 segws gets 1/5 against a fair 1/6: 1.2.
        assert!(rr.max_over_fair > 1.15 && ch.max_over_fair > 1.15);
        assert_eq!(w.fallbacks + ch.fallbacks + rr.fallbacks, 0);
    }
}
