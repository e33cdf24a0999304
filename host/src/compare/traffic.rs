//! Traffic as load: what each tunnel of a scenario carries, step by step.
//!
//! A tunnel's **rate** is its busy-hour mean, both directions together,
//! drawn once per tunnel from a named distribution (lognormal across cells,
//! as base-station traffic is; a Pareto tail as an option). Its **daily
//! shape** scales that rate through the day (built-in shapes, or factors of
//! the scenario's own); the shape's largest factor is 1, its busy hour. What
//! a tunnel sends in a step is rate × factor at mid-step × the step's
//! length, split between the directions by `downlink_ratio` (downlink,
//! segw → initiator, is the heavier), in packets of `packet_bytes`.
//!
//! Draws depend on the seed and the tunnel's arrival number only, never on
//! the order of other draws: adding traffic to a scenario changes no
//! tunnel's address, port or SPI, so placements stay where they were.

use segwlb_policy_sdk::hash;

/// Seconds in a day: shapes repeat with it.
pub const DAY_SECS: f64 = 86_400.0;

/// The built-in daily shapes, one factor per hour from 00:00, busy hour 1.
/// After the patterns measured on a city's towers (Xu et al., IMC'15:
/// residential, office, transport and mixed areas): a residential cell
/// peaks late in the evening, an office cell through working hours, a
/// transport cell at the two commutes.
pub const BUILTIN_SHAPES: [(&str, [f64; 24]); 4] = [
    (
        "residential",
        [
            0.42, 0.30, 0.21, 0.16, 0.14, 0.15, 0.22, 0.33, 0.42, 0.48, 0.52, 0.56, 0.60, 0.60,
            0.60, 0.62, 0.66, 0.72, 0.80, 0.88, 0.95, 1.00, 0.92, 0.65,
        ],
    ),
    (
        "business",
        [
            0.10, 0.07, 0.06, 0.05, 0.05, 0.07, 0.15, 0.40, 0.75, 0.95, 1.00, 0.98, 0.90, 0.95,
            1.00, 0.97, 0.90, 0.75, 0.50, 0.35, 0.28, 0.22, 0.17, 0.13,
        ],
    ),
    (
        "transport",
        [
            0.10, 0.06, 0.05, 0.05, 0.07, 0.20, 0.60, 1.00, 0.90, 0.55, 0.45, 0.45, 0.50, 0.45,
            0.45, 0.50, 0.70, 0.95, 0.85, 0.55, 0.40, 0.30, 0.22, 0.15,
        ],
    ),
    ("flat", [1.0; 24]),
];

/// How a tunnel's busy-hour rate is drawn (bytes/s, both directions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateDist {
    /// `median · e^(sigma · N(0,1))`: half the tunnels below the median.
    LogNormal { median: f64, sigma: f64 },
    /// `min · U^(-1/alpha)`: a heavy tail, every tunnel at least `min`
    /// (alpha > 1, so the mean is finite: `min · alpha / (alpha - 1)`).
    Pareto { min: f64, alpha: f64 },
}

impl RateDist {
    /// The rate for two independent uniforms in (0, 1).
    fn draw(&self, u1: f64, u2: f64) -> f64 {
        match *self {
            RateDist::LogNormal { median, sigma } => {
                // Box–Muller: one standard normal from two uniforms.
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                median * (sigma * z).exp()
            }
            RateDist::Pareto { min, alpha } => min * u1.powf(-1.0 / alpha),
        }
    }

    /// The distribution's mean (bytes/s).
    pub fn mean(&self) -> f64 {
        match *self {
            RateDist::LogNormal { median, sigma } => median * (sigma * sigma / 2.0).exp(),
            RateDist::Pareto { min, alpha } => min * alpha / (alpha - 1.0),
        }
    }
}

/// A daily shape: factors spread evenly over the day from 00:00, linearly
/// interpolated (and around midnight), scaled so the largest is 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub name: String,
    factors: Vec<f64>,
}

impl Shape {
    /// `factors` (at least one, none negative, not all zero), scaled so
    /// the largest is 1.
    pub fn new(name: &str, factors: &[f64]) -> Result<Shape, String> {
        if factors.is_empty() {
            return Err("needs at least one factor".into());
        }
        if let Some(bad) = factors.iter().find(|f| !f.is_finite() || **f < 0.0) {
            return Err(format!("factors are >= 0, not {bad}"));
        }
        let top = factors.iter().copied().fold(0.0, f64::max);
        if top == 0.0 {
            return Err("factors are all 0: the shape carries nothing".into());
        }
        Ok(Shape {
            name: name.to_string(),
            factors: factors.iter().map(|f| f / top).collect(),
        })
    }

    pub fn builtin(name: &str) -> Option<Shape> {
        BUILTIN_SHAPES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(n, f)| Shape::new(n, f).expect("built-in shapes are valid"))
    }

    /// The factor at `secs` into a day (any number: taken modulo a day).
    pub fn at(&self, secs: f64) -> f64 {
        let n = self.factors.len();
        let pos = secs.rem_euclid(DAY_SECS) / DAY_SECS * n as f64;
        let i = (pos.floor() as usize).min(n - 1);
        let frac = pos - i as f64;
        self.factors[i] * (1.0 - frac) + self.factors[(i + 1) % n] * frac
    }
}

/// A scenario's `[traffic]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Traffic {
    pub rate: RateDist,
    /// Downlink bytes (segw → initiator) per uplink byte.
    pub downlink_ratio: f64,
    /// The mean ESP packet on the wire (IP bytes), to count packets.
    pub packet_bytes: u32,
    /// Hour of the day at the start of step 0.
    pub start_hour: f64,
    /// Daily shapes and the share of tunnels each (shares sum to 1).
    pub shapes: Vec<(Shape, f64)>,
}

/// What one tunnel carries: drawn once, when it arrives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    /// Busy-hour rate, bytes/s, both directions.
    pub rate: f64,
    /// Index into [`Traffic::shapes`].
    pub shape: u8,
}

/// One direction of a tunnel's traffic in one step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    pub packets: u64,
    pub bytes: u64,
}

/// One step of a scenario's traffic, for every tunnel in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Per shape: the factor at mid-step times the step's seconds.
    bytes_per_rate: Vec<f64>,
    up_share: f64,
    per_packet: f64,
}

impl Step {
    /// What a tunnel of `profile` sends in this step: (uplink, downlink).
    #[inline]
    pub fn sent(&self, profile: Profile) -> (Sent, Sent) {
        let bytes = profile.rate * self.bytes_per_rate[usize::from(profile.shape)];
        let up = bytes * self.up_share;
        let split = |b: f64| {
            let bytes = b.round() as u64;
            let packets = if bytes == 0 {
                0
            } else {
                (b * self.per_packet).round().max(1.0) as u64
            };
            Sent { packets, bytes }
        };
        (split(up), split(bytes - up))
    }
}

/// Seeds the per-tunnel draws, apart from the population's sequence.
const PROFILE_SEED: u64 = 0x7a11_c0de_0000_0001;

impl Traffic {
    /// The profile of the `n`th tunnel to arrive in a run seeded `seed`.
    pub fn profile(&self, seed: u64, n: u64) -> Profile {
        let base =
            hash::mix(seed ^ PROFILE_SEED).wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let u = |k: u64| hash::unit_open(hash::mix(base ^ k));
        let rate = self.rate.draw(u(1), u(2));
        let pick = u(3);
        let mut acc = 0.0;
        let mut shape = self.shapes.len() - 1;
        for (i, (_, share)) in self.shapes.iter().enumerate() {
            acc += share;
            if pick < acc {
                shape = i;
                break;
            }
        }
        Profile {
            rate,
            shape: shape as u8,
        }
    }

    /// The factor of `profile`'s shape over the step that starts `start`
    /// seconds into the run and lasts `secs`: its value at mid-step.
    pub fn factor(&self, profile: Profile, start: f64, secs: f64) -> f64 {
        let t = self.start_hour * 3600.0 + start + secs / 2.0;
        self.shapes[profile.shape as usize].0.at(t)
    }

    /// What a tunnel of `profile` sends in the step that starts `start`
    /// seconds into the run and lasts `secs`: (uplink, downlink).
    pub fn sent(&self, profile: Profile, start: f64, secs: f64) -> (Sent, Sent) {
        self.step(start, secs).sent(profile)
    }

    /// The step that starts `start` seconds into the run and lasts `secs`,
    /// worked out once for all its tunnels (each shape's factor).
    pub fn step(&self, start: f64, secs: f64) -> Step {
        let t = self.start_hour * 3600.0 + start + secs / 2.0;
        Step {
            bytes_per_rate: self.shapes.iter().map(|(s, _)| s.at(t) * secs).collect(),
            up_share: 1.0 / (1.0 + self.downlink_ratio),
            per_packet: 1.0 / f64::from(self.packet_bytes),
        }
    }

    /// One line: what the traffic is.
    pub fn describe(&self) -> String {
        let rate = match self.rate {
            RateDist::LogNormal { median, sigma } => format!(
                "lognormal (median {}, sigma {sigma})",
                crate::units::show_rate(median)
            ),
            RateDist::Pareto { min, alpha } => format!(
                "Pareto (min {}, alpha {alpha})",
                crate::units::show_rate(min)
            ),
        };
        let shapes: Vec<String> = self
            .shapes
            .iter()
            .map(|(s, share)| format!("{:.0}% {}", share * 100.0, s.name))
            .collect();
        format!(
            "traffic: busy-hour rate per tunnel {rate}, mean {}; downlink {}× uplink; {}",
            crate::units::show_rate(self.rate.mean()),
            self.downlink_ratio,
            shapes.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traffic(rate: RateDist) -> Traffic {
        Traffic {
            rate,
            downlink_ratio: 4.0,
            packet_bytes: 1000,
            start_hour: 0.0,
            shapes: vec![
                (Shape::builtin("residential").unwrap(), 0.5),
                (Shape::builtin("business").unwrap(), 0.5),
            ],
        }
    }

    #[test]
    fn lognormal_rates_have_their_median_and_mean() {
        let t = traffic(RateDist::LogNormal {
            median: 1e6,
            sigma: 1.0,
        });
        let mut rates: Vec<f64> = (0..100_000).map(|n| t.profile(7, n).rate).collect();
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        assert!((median / 1e6 - 1.0).abs() < 0.02, "median {median}");
        let mean = rates.iter().sum::<f64>() / rates.len() as f64;
        assert!((mean / t.rate.mean() - 1.0).abs() < 0.03, "mean {mean}");
    }

    #[test]
    fn pareto_rates_are_at_least_the_minimum_with_a_heavy_tail() {
        let t = traffic(RateDist::Pareto {
            min: 1e5,
            alpha: 1.5,
        });
        let rates: Vec<f64> = (0..100_000).map(|n| t.profile(7, n).rate).collect();
        assert!(rates.iter().all(|&r| r >= 1e5));
        // P(X > 10·min) = 10^-1.5 ≈ 3.2%.
        let tail = rates.iter().filter(|&&r| r > 1e6).count() as f64 / rates.len() as f64;
        assert!((tail - 0.0316).abs() < 0.003, "tail {tail}");
    }

    #[test]
    fn profiles_depend_on_seed_and_arrival_only() {
        let t = traffic(RateDist::LogNormal {
            median: 1e6,
            sigma: 1.0,
        });
        assert_eq!(t.profile(3, 41), t.profile(3, 41));
        assert_ne!(t.profile(3, 41), t.profile(4, 41));
        let business = (0..10_000).filter(|&n| t.profile(3, n).shape == 1).count();
        assert!((4_800..5_200).contains(&business), "{business}");
    }

    #[test]
    fn a_shape_peaks_at_one_and_interpolates_between_hours() {
        let s = Shape::new("two", &[1.0, 3.0]).unwrap();
        assert_eq!(s.at(0.0), 1.0 / 3.0);
        assert_eq!(s.at(DAY_SECS / 2.0), 1.0);
        // A quarter of the way: halfway between the two factors.
        assert!((s.at(DAY_SECS / 4.0) - 2.0 / 3.0).abs() < 1e-12);
        // Around midnight back to the first.
        assert!((s.at(DAY_SECS * 0.75) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.at(DAY_SECS), s.at(0.0));
        let res = Shape::builtin("residential").unwrap();
        assert_eq!(res.at(21.0 * 3600.0), 1.0);
        assert!(Shape::new("x", &[0.0, 0.0]).is_err());
        assert!(Shape::new("x", &[]).is_err());
        assert!(Shape::new("x", &[1.0, -1.0]).is_err());
    }

    #[test]
    fn a_step_sends_rate_times_factor_times_time_split_by_the_ratio() {
        let t = Traffic {
            shapes: vec![(Shape::builtin("flat").unwrap(), 1.0)],
            ..traffic(RateDist::LogNormal {
                median: 1e6,
                sigma: 0.0,
            })
        };
        let p = Profile {
            rate: 1e6,
            shape: 0,
        };
        let (up, down) = t.sent(p, 0.0, 10.0);
        assert_eq!(up.bytes + down.bytes, 10_000_000);
        assert_eq!(down.bytes, 4 * up.bytes);
        assert_eq!(up.packets, 2_000);
        assert_eq!(down.packets, 8_000);
        let quiet = Profile {
            rate: 0.0,
            shape: 0,
        };
        assert_eq!(t.sent(quiet, 0.0, 10.0), (Sent::default(), Sent::default()));
    }
}
