//! The circuit breaker in front of a policy that runs to its deadline.
//!
//! A call that times out held the one worker thread for the whole call
//! budget (20 ms by default): every frame of every tunnel waited behind
//! it. A policy that does that once will likely do it again (a loop that
//! depends on the key, a runtime that went slow), and a flood of new
//! sources would make every frame wait. So after a timeout the breaker
//! *opens*: for a period no call reaches the policy and the guard's
//! fallback answers (counted as `breaker_open`). Then one call is let
//! through as a probe: in time, the breaker closes; late again, it opens
//! for twice as long, up to [`MAX_PERIOD`]. A slow policy thus costs at most
//! one deadline per period. Time is the core's (passed in).

use std::time::Duration;

use crate::time::Timestamp;

/// How long the breaker stays open after the first timeout.
pub const FIRST_PERIOD: Duration = Duration::from_secs(1);
/// The longest it stays open, however often the probes time out.
pub const MAX_PERIOD: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Calls reach the policy.
    Closed,
    /// No call reaches the policy until `until`; the next period is `next`.
    Open { until: Timestamp, next: Duration },
    /// The period is over: the next call is a probe. If it times out, the
    /// breaker opens for `next`.
    Probing { next: Duration },
}

/// What the breaker says about the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Call the policy.
    Call,
    /// Do not: fall back.
    Open,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    /// Times it opened.
    pub trips: u64,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: State::Closed,
            trips: 0,
        }
    }
}

impl Breaker {
    /// May a call reach the policy at `now`?
    pub fn gate(&mut self, now: Timestamp) -> Gate {
        match self.state {
            State::Open { until, next } if now >= until => {
                self.state = State::Probing { next };
                Gate::Call
            }
            State::Open { .. } => Gate::Open,
            State::Closed | State::Probing { .. } => Gate::Call,
        }
    }

    /// The call let through at `now` ran to its deadline (`true`) or not.
    /// Returns the period the breaker now stays open for, when it opened.
    pub fn record(&mut self, timed_out: bool, now: Timestamp) -> Option<Duration> {
        let period = match (self.state, timed_out) {
            (_, false) => {
                self.state = State::Closed;
                return None;
            }
            (State::Probing { next }, true) => next,
            (State::Closed, true) => FIRST_PERIOD,
            (State::Open { .. }, true) => return None,
        };
        self.state = State::Open {
            until: now + period,
            next: (period * 2).min(MAX_PERIOD),
        };
        self.trips += 1;
        Some(period)
    }

    /// A new policy (or the same one restarted) starts with a closed breaker.
    pub fn reset(&mut self) {
        self.state = State::Closed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp::ZERO + Duration::from_millis(ms)
    }

    #[test]
    fn a_timeout_opens_it_a_late_probe_doubles_the_period_a_prompt_one_closes_it() {
        let mut b = Breaker::default();
        assert_eq!(b.gate(at(0)), Gate::Call);
        assert_eq!(b.record(false, at(0)), None);
        assert_eq!(b.gate(at(1)), Gate::Call);
        assert_eq!(b.record(true, at(1)), Some(FIRST_PERIOD));
        // Open: nothing reaches the policy for a second.
        assert_eq!(b.gate(at(2)), Gate::Open);
        assert_eq!(b.gate(at(1000)), Gate::Open);
        // The probe, late again: two seconds.
        assert_eq!(b.gate(at(1001)), Gate::Call);
        assert_eq!(b.record(true, at(1001)), Some(Duration::from_secs(2)));
        assert_eq!(b.gate(at(3000)), Gate::Open);
        assert_eq!(b.gate(at(3001)), Gate::Call);
        // In time: closed, and the next timeout starts from one second.
        assert_eq!(b.record(false, at(3001)), None);
        assert_eq!(b.gate(at(3002)), Gate::Call);
        assert_eq!(b.record(true, at(3002)), Some(FIRST_PERIOD));
        assert_eq!(b.trips, 3);
    }

    #[test]
    fn the_period_stops_growing_at_its_bound() {
        let mut b = Breaker::default();
        let mut now = at(0);
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            assert_eq!(b.gate(now), Gate::Call);
            last = b.record(true, now).unwrap();
            now = now + last;
        }
        assert_eq!(last, MAX_PERIOD);
    }
}
