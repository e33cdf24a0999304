//! Traffic as rates, and utilization reported from outside: what
//! `Balancer::measure` turns the gateways' counters into, on time passed in.
//!
//! A rate is an exponentially weighted moving average of what the counters
//! grew by between two measurements, with time constant [`WINDOW`]: a
//! change of load shows ~63% after one window and ~95% after three. The
//! first measurement after the counters start takes the interval's rate as
//! it is (no ramp up from zero).
//!
//! A reported utilization (a segw's CPU, from an agent; `ctl gateway
//! report`) counts as gRPC's weighted round robin counts ORCA reports
//! (gRFC A58): only once reports have come for the blackout period
//! ([`Reporting::blackout`], 10 s by default: one report from a segw that
//! just started says little), and no longer once none came for the
//! expiry period ([`Reporting::expiry`], 3 min: an agent that stopped is
//! not believed forever).

use std::time::Duration;

use crate::policy::load::{Rates, Sample};
use crate::policy::Policy;
use crate::time::Timestamp;

use super::gateways::{GatewayCounters, GatewayError};
use super::Balancer;

/// The rates' time constant.
pub const WINDOW: Duration = Duration::from_secs(5);

/// How far a rate moves towards the last `dt` seconds' (see the module's
/// doc): all the way for the first interval, else by `1 - e^(-dt/WINDOW)`.
fn weight(dt: f64, primed: bool) -> f64 {
    if primed {
        1.0 - (-dt / WINDOW.as_secs_f64()).exp()
    } else {
        1.0
    }
}

/// A gateway's traffic meter.
#[derive(Debug, Clone, Copy, Default)]
pub struct Meter {
    /// The counters (frames to, bytes to, frames from, bytes from) at the
    /// last measurement, and when.
    last: Option<(Timestamp, [u64; 4])>,
    /// Has a rate been taken yet?
    primed: bool,
    pub rates: Rates,
}

impl Meter {
    /// Measure `counters` at `now`.
    pub fn sample(&mut self, counters: &GatewayCounters, now: Timestamp) {
        let c = [
            counters.frames_to,
            counters.bytes_to,
            counters.frames_from,
            counters.bytes_from,
        ];
        let Some((then, before)) = self.last else {
            self.last = Some((now, c));
            return;
        };
        let dt = now.since(then).as_secs_f64();
        if dt <= 0.0 {
            return;
        }
        let per_sec = |i: usize| c[i].saturating_sub(before[i]) as f64 / dt;
        let now_rates = Rates {
            packets_to: per_sec(0),
            bytes_to: per_sec(1),
            packets_from: per_sec(2),
            bytes_from: per_sec(3),
        };
        let a = weight(dt, self.primed);
        let ewma = |old: f64, new: f64| old + a * (new - old);
        self.rates = Rates {
            bytes_to: ewma(self.rates.bytes_to, now_rates.bytes_to),
            bytes_from: ewma(self.rates.bytes_from, now_rates.bytes_from),
            packets_to: ewma(self.rates.packets_to, now_rates.packets_to),
            packets_from: ewma(self.rates.packets_from, now_rates.packets_from),
        };
        self.primed = true;
        self.last = Some((now, c));
    }
}

/// A tunnel's traffic as rates: packets and bytes per second each way,
/// smoothed as a gateway's are, updated when the tunnel sweep passes it
/// ([`Balancer::measure_tunnels`]). 40 bytes: the counters' low 32 bits
/// at the last visit (a difference of wrapping u32s is exact below 4 GB
/// between two visits), and rates in f32.
#[derive(Debug, Clone, Copy, Default)]
pub struct TunnelRates {
    /// Milliseconds of the balancer's clock at the last visit, wrapping;
    /// 0 before the first.
    at_ms: u32,
    seen: [u32; 4],
    primed: bool,
    /// Packets to, bytes to, packets from, bytes from, per second.
    pub per_sec: [f32; 4],
}

impl TunnelRates {
    /// Both ways, bytes/s: what "heaviest" means.
    pub fn bytes_per_sec(&self) -> f32 {
        self.per_sec[1] + self.per_sec[3]
    }

    /// The tunnel's counters (frames to, bytes to, frames back, bytes back)
    /// at `now`.
    fn sample(&mut self, counters: [u64; 4], now: Timestamp) {
        let now_ms = (now.since_epoch().as_millis() as u32).max(1);
        let low = counters.map(|c| c as u32);
        if self.at_ms == 0 {
            (self.at_ms, self.seen) = (now_ms, low);
            return;
        }
        let dt = f64::from(now_ms.wrapping_sub(self.at_ms)) / 1e3;
        if dt <= 0.0 {
            return;
        }
        let a = weight(dt, self.primed);
        for ((rate, now), seen) in self.per_sec.iter_mut().zip(low).zip(self.seen) {
            let new = f64::from(now.wrapping_sub(seen)) / dt;
            let old = f64::from(*rate);
            *rate = (old + a * (new - old)) as f32;
        }
        (self.at_ms, self.seen, self.primed) = (now_ms, low, true);
    }
}

/// Rates are for reading: two tunnels are the same whatever their rates.
impl PartialEq for TunnelRates {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for TunnelRates {}

/// When reported utilization counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reporting {
    pub blackout: Duration,
    pub expiry: Duration,
}

impl Default for Reporting {
    /// gRFC A58's defaults.
    fn default() -> Self {
        Reporting {
            blackout: Duration::from_secs(10),
            expiry: Duration::from_secs(180),
        }
    }
}

/// Where a gateway's reported utilization stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReportState {
    /// Nothing reported, or the last report expired.
    None,
    /// Reports are coming, not yet for the blackout period: not counted.
    Blackout { value: f64 },
    /// Counted.
    Live { value: f64 },
}

impl ReportState {
    /// The value that counts now, if any.
    pub fn live(self) -> Option<f64> {
        match self {
            ReportState::Live { value } => Some(value),
            _ => None,
        }
    }
}

/// A gateway's reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reported {
    /// The last value, when it came, and when this run of reports began
    /// (the first report after none, or after an expiry).
    last: Option<(f64, Timestamp, Timestamp)>,
}

impl Reported {
    /// A report of `value` (0.0 = idle, 1.0 = full; more is overload) at `now`.
    pub fn report(&mut self, value: f64, now: Timestamp, rules: Reporting) {
        let began = match self.last {
            Some((_, at, began)) if now.since(at) < rules.expiry => began,
            _ => now,
        };
        self.last = Some((value, now, began));
    }

    pub fn state(&self, now: Timestamp, rules: Reporting) -> ReportState {
        match self.last {
            Some((_, at, _)) if now.since(at) >= rules.expiry => ReportState::None,
            Some((value, _, began)) if now.since(began) < rules.blackout => {
                ReportState::Blackout { value }
            }
            Some((value, _, _)) => ReportState::Live { value },
            None => ReportState::None,
        }
    }
}

impl<P: Policy> Balancer<P> {
    /// Measure every gateway's traffic at `now` (its rates, see [`Meter`])
    /// and give the policies' load view the new samples. The caller's
    /// clock: the live worker every second, the simulation every step.
    /// Costs one pass over the gateways, none over the tunnels.
    pub fn measure(&mut self, now: Timestamp) {
        let rules = self.reporting;
        let mut samples = Vec::new();
        for g in self.gateways.iter_mut() {
            g.meter.sample(&g.counters, now);
            samples.push((
                g.id,
                Sample {
                    rates: g.meter.rates,
                    tunnels: g.counters.tunnels,
                    throughput: g.spec.throughput,
                    capacity: g.spec.capacity,
                    reported: g.reported.state(now, rules).live(),
                },
            ));
        }
        self.load.set_samples(samples);
        // And a pass over the tunnels' rates, from where the last one
        // stopped, unless one is still under way (a large table).
        if self.rate_pass_left == 0 {
            self.rate_pass_left = self.table.slots();
        }
    }

    /// `name` reports its utilization: `value` (0.0 idle, 1.0 full) at
    /// `now`. Counts from the next [`measure`](Self::measure) once the
    /// blackout is over.
    pub fn report_utilization(
        &mut self,
        name: &str,
        value: f64,
        now: Timestamp,
    ) -> Result<(), GatewayError> {
        let rules = self.reporting;
        self.gateways
            .by_name_mut(name)?
            .reported
            .report(value, now, rules);
        Ok(())
    }

    /// Update the rates of up to `budget` more tunnels' slots of the pass
    /// the last [`measure`](Self::measure) began, at `now`. The pass starts
    /// right where a measurement is taken (the live worker folds the fast
    /// path's counters in just before), so each tunnel's rate covers the
    /// same counting periods as its gateway's; on a large table it goes on
    /// a slice a time over the next turns. Returns the slots visited (0:
    /// no pass under way).
    pub fn measure_tunnels(&mut self, now: Timestamp, budget: usize) -> usize {
        let n = self.table.slots();
        let visits = budget.min(n).min(self.rate_pass_left);
        self.rate_pass_left -= visits;
        for _ in 0..visits {
            if self.rate_cursor >= n {
                self.rate_cursor = 0;
            }
            let id = self.rate_cursor as super::affinity::TunnelId;
            self.rate_cursor += 1;
            if let Some(t) = self.table.get_mut(id) {
                let counters = [t.frames, t.bytes, t.frames_back, t.bytes_back];
                t.rates.sample(counters, now);
            }
        }
        visits
    }

    /// When reports count (blackout, expiry).
    pub fn set_reporting(&mut self, rules: Reporting) {
        self.reporting = rules;
    }

    pub fn reporting(&self) -> Reporting {
        self.reporting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(bytes_to: u64, bytes_from: u64) -> GatewayCounters {
        GatewayCounters {
            frames_to: bytes_to / 100,
            bytes_to,
            frames_from: bytes_from / 100,
            bytes_from,
            ..GatewayCounters::default()
        }
    }

    #[test]
    fn the_first_interval_s_rate_is_taken_as_it_is_then_smoothed() {
        let mut m = Meter::default();
        m.sample(&counters(0, 0), Timestamp::from_secs(10));
        assert_eq!(m.rates, Rates::default());
        m.sample(&counters(1000, 4000), Timestamp::from_secs(11));
        assert_eq!(m.rates.bytes_to, 1000.0);
        assert_eq!(m.rates.bytes_from, 4000.0);
        assert_eq!(m.rates.packets_from, 40.0);
        // The load doubles: after one window ~63% of the way, after three ~95%.
        let mut t = 11;
        let (mut to, mut from) = (1000, 4000);
        for _ in 0..5 {
            t += 1;
            to += 2000;
            from += 8000;
            m.sample(&counters(to, from), Timestamp::from_secs(t));
        }
        assert!((m.rates.bytes_to - (2000.0 - 1000.0 * (-1.0f64).exp())).abs() < 1e-6);
        for _ in 0..10 {
            t += 1;
            to += 2000;
            from += 8000;
            m.sample(&counters(to, from), Timestamp::from_secs(t));
        }
        assert!(m.rates.bytes_to > 1950.0, "{}", m.rates.bytes_to);
    }

    #[test]
    fn a_report_counts_after_the_blackout_and_expires() {
        let rules = Reporting::default();
        let at = Timestamp::from_secs;
        let mut r = Reported::default();
        assert_eq!(r.state(at(0), rules), ReportState::None);
        r.report(0.73, at(100), rules);
        assert_eq!(
            r.state(at(105), rules),
            ReportState::Blackout { value: 0.73 }
        );
        r.report(0.75, at(108), rules);
        assert_eq!(r.state(at(110), rules).live(), Some(0.75));
        // No report for 3 minutes: gone.
        assert_eq!(r.state(at(108 + 180), rules), ReportState::None);
        // A report after that starts a new blackout.
        r.report(0.5, at(400), rules);
        assert_eq!(
            r.state(at(401), rules),
            ReportState::Blackout { value: 0.5 }
        );
        assert_eq!(r.state(at(410), rules).live(), Some(0.5));
    }
}
