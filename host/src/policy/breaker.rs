//! The circuit breaker in front of a policy that costs the worker too much.
//!
//! Every call into a policy holds the one worker thread: every frame of
//! every tunnel waits behind it. A policy that misbehaves once will likely
//! do it again (a loop that depends on the key, a runtime that went slow, a
//! bug that traps), and a flood of new sources would make every frame wait.
//! So the breaker *opens* when a call
//!
//! - ran to its deadline (20 ms by default, for `choose`),
//! - failed, [`FAILURES_TO_TRIP`] calls in a row (a trap, the memory cap, an
//!   instance that would not start), or
//! - brought the guest's time on the worker past [`GUEST_TIME_PER_SEC`] in
//!   a second: calls that each end in time (or trap) before their deadline
//!   but together take the worker's time. A `set-gateways` push counts by
//!   its failures and its deadline, not its time (see `Guarded::push`).
//!
//! While open, for a period no call reaches the policy and the guard's
//! fallback answers (counted as `breaker_open`). Then one call is let
//! through as a probe: prompt and successful, the breaker closes; else it
//! opens for twice as long, up to [`MAX_PERIOD`]. A policy thus costs at
//! most about one deadline, or one second's share, per period. Time is the
//! core's (passed in); the guest's time is what the policy says it spent
//! ([`super::Policy::spent`]: measured on the data path, zero in
//! simulations, so a simulation stays a function of its seed).

use std::time::Duration;

use crate::time::Timestamp;

/// How long the breaker stays open after it first opens.
pub const FIRST_PERIOD: Duration = Duration::from_secs(1);
/// The longest it stays open, however often the probes fail.
pub const MAX_PERIOD: Duration = Duration::from_secs(60);
/// Failed calls in a row that open it.
pub const FAILURES_TO_TRIP: u32 = 3;
/// The guest's time on the worker, in any one second, that opens it: a
/// quarter of the worker. (A Python policy deciding in 100 µs stays under
/// it up to 2,500 new tunnels a second.)
pub const GUEST_TIME_PER_SEC: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Calls reach the policy.
    Closed,
    /// No call reaches the policy until `until`; the next period is `next`.
    Open { until: Timestamp, next: Duration },
    /// The period is over: the next call is a probe. If it fails, the
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

/// How a call into the policy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It returned (whatever it answered).
    Returned,
    /// It trapped, hit the memory cap, or could not be started.
    Failed,
    /// It ran to its deadline.
    TimedOut,
    /// It was not run (its fresh instance is still being started): neither
    /// a success nor the guest's fault.
    NotRun,
}

/// Why the breaker opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trip {
    Deadline,
    Failures,
    /// The guest's time in the current second.
    GuestTime(Duration),
}

impl std::fmt::Display for Trip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trip::Deadline => write!(f, "a call ran to its deadline"),
            Trip::Failures => write!(f, "{FAILURES_TO_TRIP} calls in a row failed"),
            Trip::GuestTime(spent) => write!(
                f,
                "it took {spent:?} of the worker in a second (at most {GUEST_TIME_PER_SEC:?})"
            ),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    /// Failed calls in a row.
    failures: u32,
    /// The second being measured: its start and the guest's time in it.
    window: (Timestamp, Duration),
    /// Times it opened.
    pub trips: u64,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: State::Closed,
            failures: 0,
            window: (Timestamp::ZERO, Duration::ZERO),
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

    /// Is it open at `now` (no call would be let through)?
    pub fn is_open(&self, now: Timestamp) -> bool {
        matches!(self.state, State::Open { until, .. } if now < until)
    }

    /// A call let through at `now` ended so, having taken `spent` of the
    /// worker. Returns the period the breaker now stays open for, and why,
    /// when it opened.
    pub fn record(
        &mut self,
        outcome: Outcome,
        spent: Duration,
        now: Timestamp,
    ) -> Option<(Duration, Trip)> {
        if now.since(self.window.0) >= Duration::from_secs(1) || now < self.window.0 {
            self.window = (now, Duration::ZERO);
        }
        self.window.1 += spent;
        match outcome {
            Outcome::Returned => self.failures = 0,
            Outcome::Failed | Outcome::TimedOut => self.failures += 1,
            Outcome::NotRun => {}
        }
        let trip = if outcome == Outcome::TimedOut {
            Some(Trip::Deadline)
        } else if self.failures >= FAILURES_TO_TRIP
            || (outcome == Outcome::Failed && matches!(self.state, State::Probing { .. }))
        {
            Some(Trip::Failures)
        } else if self.window.1 > GUEST_TIME_PER_SEC {
            Some(Trip::GuestTime(self.window.1))
        } else {
            None
        };
        let period = match (self.state, trip) {
            (State::Open { .. }, _) => return None,
            (_, None) => {
                if outcome == Outcome::Returned {
                    self.state = State::Closed;
                }
                return None;
            }
            (State::Probing { next }, Some(_)) => next,
            (State::Closed, Some(_)) => FIRST_PERIOD,
        };
        self.state = State::Open {
            until: now + period,
            next: (period * 2).min(MAX_PERIOD),
        };
        // The probe after the period starts afresh.
        self.failures = 0;
        self.window = (now + period, Duration::ZERO);
        self.trips += 1;
        trip.map(|t| (period, t))
    }

    /// A new policy (or the same one restarted) starts with a closed breaker.
    pub fn reset(&mut self) {
        let trips = self.trips;
        *self = Breaker {
            trips,
            ..Breaker::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp::ZERO + Duration::from_millis(ms)
    }

    /// Record a call that took no time; the period it opened for, if any.
    fn period(b: &mut Breaker, outcome: Outcome, now: Timestamp) -> Option<Duration> {
        b.record(outcome, Duration::ZERO, now).map(|(p, _)| p)
    }

    #[test]
    fn a_timeout_opens_it_a_late_probe_doubles_the_period_a_prompt_one_closes_it() {
        let mut b = Breaker::default();
        assert_eq!(b.gate(at(0)), Gate::Call);
        assert_eq!(period(&mut b, Outcome::Returned, at(0)), None);
        assert_eq!(b.gate(at(1)), Gate::Call);
        assert_eq!(period(&mut b, Outcome::TimedOut, at(1)), Some(FIRST_PERIOD));
        // Open: nothing reaches the policy for a second.
        assert_eq!(b.gate(at(2)), Gate::Open);
        assert_eq!(b.gate(at(1000)), Gate::Open);
        // The probe, late again: two seconds.
        assert_eq!(b.gate(at(1001)), Gate::Call);
        assert_eq!(
            period(&mut b, Outcome::TimedOut, at(1001)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(b.gate(at(3000)), Gate::Open);
        assert_eq!(b.gate(at(3001)), Gate::Call);
        // In time: closed, and the next timeout starts from one second.
        assert_eq!(period(&mut b, Outcome::Returned, at(3001)), None);
        assert_eq!(b.gate(at(3002)), Gate::Call);
        assert_eq!(
            period(&mut b, Outcome::TimedOut, at(3002)),
            Some(FIRST_PERIOD)
        );
        assert_eq!(b.trips, 3);
    }

    #[test]
    fn the_period_stops_growing_at_its_bound() {
        let mut b = Breaker::default();
        let mut now = at(0);
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            assert_eq!(b.gate(now), Gate::Call);
            last = period(&mut b, Outcome::TimedOut, now).unwrap();
            now = now + last;
        }
        assert_eq!(last, MAX_PERIOD);
    }

    #[test]
    fn failures_in_a_row_open_it_and_a_return_between_them_does_not() {
        let mut b = Breaker::default();
        for ms in 0..2 {
            assert_eq!(period(&mut b, Outcome::Failed, at(ms)), None);
        }
        assert_eq!(period(&mut b, Outcome::Returned, at(2)), None);
        assert_eq!(period(&mut b, Outcome::NotRun, at(3)), None);
        for ms in 4..6 {
            assert_eq!(period(&mut b, Outcome::Failed, at(ms)), None);
        }
        assert_eq!(
            b.record(Outcome::Failed, Duration::ZERO, at(6)),
            Some((FIRST_PERIOD, Trip::Failures))
        );
        assert_eq!(b.gate(at(7)), Gate::Open);
        // The probe fails: open again, for longer, at once.
        assert_eq!(b.gate(at(1006)), Gate::Call);
        assert_eq!(
            period(&mut b, Outcome::Failed, at(1006)),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn the_guests_time_over_a_second_opens_it() {
        let mut b = Breaker::default();
        let ten = Duration::from_millis(10);
        // 10 ms a call, a call every 5 ms: a quarter of the worker by the
        // 26th call.
        let tripped = (0..100u64)
            .position(|n| b.record(Outcome::Returned, ten, at(5 * n)).is_some())
            .unwrap();
        assert_eq!(tripped, 25);
        assert_eq!(b.gate(at(5 * 25 + 1)), Gate::Open);
        // The same calls, one every 50 ms: 200 ms a second, never.
        let mut b = Breaker::default();
        assert!((0..100u64).all(|n| b.record(Outcome::Returned, ten, at(50 * n)).is_none()));
    }
}
