//! Which initiator opens a tunnel in which step of a scenario, and which
//! tunnels close: the lab's version of the scenario's arrivals and churn,
//! decided before the run so that the lab plays it and the simulation
//! replays it (each tunnel's `ends` step goes into its [`GivenPeer`]).
//!
//! A *life* is one tunnel: an initiator from the step it initiates until
//! the step its initiator closes it (IKE DELETE), if it does.
//!
//! - The initial population arrives evenly over `arrive_over` steps, the
//!   peak in its step, each new initiator in turn.
//! - From step `arrive_over` on, `round(count × churn)` live tunnels close
//!   at the start of each step (before its events, as in the simulation),
//!   drawn with a fixed seed. The peers that closed one step earlier come
//!   back: each initiates afresh from the same addresses (a new IKE SA).
//!   At the first churn step nobody is due back, so new initiators arrive
//!   in their place: the population stays at the scenario's count.
//!
//! Arrival order is life order: returning peers first (in the order of
//! the tunnels they closed), then new ones.
//!
//! [`GivenPeer`]: crate::compare::sim::GivenPeer

use crate::compare::Scenario;
use crate::workload::Rng;

/// The seed of the draw of closing tunnels: fixed, so a lab run is
/// repeatable and every policy sees the same churn.
const SEED: u64 = 0x1ab_c4e5;

/// One tunnel of the lab's run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Life {
    /// Index into the lab's initiators.
    pub initiator: usize,
    pub arrives: u32,
    /// The step at whose start its initiator closes it.
    pub ends: Option<u32>,
}

impl Life {
    /// Up during `step` (after that step's closes and arrivals).
    pub fn live_in(&self, step: u32) -> bool {
        self.arrives <= step && self.ends.is_none_or(|e| step < e)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// In arrival order.
    pub lives: Vec<Life>,
    /// Initiators the lab needs.
    pub initiators: usize,
}

impl Plan {
    pub fn of(scenario: &Scenario) -> Plan {
        let t = &scenario.tunnels;
        let arrive_over = t.arrive_over.max(1) as usize;
        let churned = (t.count as f64 * t.churn).round() as usize;
        let mut rng = Rng::new(SEED);
        let mut lives: Vec<Life> = Vec::new();
        let mut live: Vec<usize> = Vec::new();
        let mut back_next: Vec<usize> = Vec::new();
        let mut initiators = 0;
        for step in 0..scenario.steps {
            let mut closed = Vec::new();
            if step as usize >= arrive_over {
                for _ in 0..churned.min(live.len()) {
                    let k = rng.below(live.len() as u64) as usize;
                    let l = live.swap_remove(k);
                    lives[l].ends = Some(step);
                    closed.push(l);
                }
            }
            // They come back in the order they first arrived.
            closed.sort_unstable();
            let closed: Vec<usize> = closed.into_iter().map(|l| lives[l].initiator).collect();
            let mut fresh = if (step as usize) < arrive_over {
                t.count * (step as usize + 1) / arrive_over - t.count * step as usize / arrive_over
            } else {
                0
            };
            fresh += t.peak.filter(|p| p.step == step).map_or(0, |p| p.tunnels);
            let returning = std::mem::replace(&mut back_next, closed);
            if step as usize >= arrive_over {
                fresh += churned.min(t.count).saturating_sub(returning.len());
            }
            let new = (initiators..initiators + fresh).collect::<Vec<_>>();
            initiators += fresh;
            for initiator in returning.into_iter().chain(new) {
                live.push(lives.len());
                lives.push(Life {
                    initiator,
                    arrives: step,
                    ends: None,
                });
            }
        }
        Plan { lives, initiators }
    }

    /// Lives that arrive in `step`: a contiguous run of `lives`.
    pub fn arriving(&self, step: u32) -> std::ops::Range<usize> {
        let from = self.lives.partition_point(|l| l.arrives < step);
        let to = self.lives.partition_point(|l| l.arrives <= step);
        from..to
    }

    /// Lives its initiator closes at the start of `step`.
    pub fn closing(&self, step: u32) -> impl Iterator<Item = usize> + '_ {
        (0..self.lives.len()).filter(move |&l| self.lives[l].ends == Some(step))
    }

    /// Tunnels that close over the run.
    pub fn closes(&self) -> usize {
        self.lives.iter().filter(|l| l.ends.is_some()).count()
    }

    /// Tunnels opened by a peer that had one before.
    pub fn returns(&self) -> usize {
        self.lives.len() - self.initiators
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(count: usize, arrive_over: u32, churn: f64, steps: u32) -> Scenario {
        let mut s = Scenario::builtin_lab();
        s.tunnels.count = count;
        s.tunnels.arrive_over = arrive_over;
        s.tunnels.churn = churn;
        s.tunnels.peak = None;
        s.steps = steps;
        s
    }

    #[test]
    fn without_churn_every_initiator_opens_one_tunnel_that_stays() {
        let p = Plan::of(&scenario(12, 6, 0.0, 8));
        assert_eq!(p.initiators, 12);
        assert_eq!(p.lives.len(), 12);
        assert!(p.lives.iter().all(|l| l.ends.is_none()));
        // Two per step over steps 0..6, in initiator order.
        assert_eq!(p.arriving(0), 0..2);
        assert_eq!(p.arriving(5), 10..12);
        assert_eq!(p.arriving(6), 12..12);
        let order: Vec<usize> = p.lives.iter().map(|l| l.initiator).collect();
        assert_eq!(order, (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn churn_closes_and_brings_peers_back_a_step_later_at_a_steady_population() {
        let s = scenario(100, 2, 0.1, 6);
        let p = Plan::of(&s);
        // Steps 2..6 close 10 each; the first churn step's 10 are new
        // initiators, the later ones are the peers that closed a step
        // before.
        assert_eq!(p.initiators, 110);
        assert_eq!(p.closes(), 40);
        assert_eq!(p.returns(), 30);
        for step in 0..6 {
            let live = p.lives.iter().filter(|l| l.live_in(step)).count();
            let want = if step == 0 { 50 } else { 100 };
            assert_eq!(live, want, "step {step}");
            // An initiator has at most one tunnel up at a time.
            let mut up: Vec<usize> = p
                .lives
                .iter()
                .filter(|l| l.live_in(step))
                .map(|l| l.initiator)
                .collect();
            up.sort_unstable();
            up.dedup();
            assert_eq!(up.len(), live, "step {step}");
        }
        for step in 3..6 {
            let closed_before: Vec<usize> =
                p.closing(step - 1).map(|l| p.lives[l].initiator).collect();
            let back: Vec<usize> = p.arriving(step).map(|l| p.lives[l].initiator).collect();
            assert_eq!(
                back,
                closed_before,
                "step {step}: the peers of step {}",
                step - 1
            );
        }
        // A tunnel closes only after it arrived, and lives are in arrival
        // order.
        assert!(p.lives.iter().all(|l| l.ends.is_none_or(|e| e > l.arrives)));
        assert!(p.lives.windows(2).all(|w| w[0].arrives <= w[1].arrives));
        // The same plan every time.
        assert_eq!(Plan::of(&s), p);
    }
}
