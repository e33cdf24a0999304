//! The live load the core keeps and a policy reads in `choose`: tunnels per
//! gateway (exact, every placement counted at once), and each gateway's
//! traffic as last measured, with its capacities and any reported
//! utilization — from which [`utilization`] is the one model of how full a
//! segw is.

use std::sync::atomic::{AtomicU64, Ordering};

pub use segwlb_policy_sdk::GatewayLoad;

/// Bytes and packets per second, each way ("to" the segw, "from" it).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub bytes_to: f64,
    pub bytes_from: f64,
    pub packets_to: f64,
    pub packets_from: f64,
}

impl Rates {
    /// Both directions: what the segw encrypts and decrypts.
    pub fn bytes(&self) -> f64 {
        self.bytes_to + self.bytes_from
    }
}

/// A gateway as last measured (`Balancer::measure`), with what it may carry.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub rates: Rates,
    /// Its tunnels when measured.
    pub tunnels: u64,
    /// Its throughput capacity, bytes/s both ways; 0 for not given.
    pub throughput: u64,
    /// Its tunnel capacity; 0 for no limit.
    pub capacity: u64,
    /// A utilization reported from outside, while live.
    pub reported: Option<f64>,
}

/// How full a segw is, the one model every part of segwlb uses (the live
/// load view, `ctl status`, `compare`'s report): the larger of
///
/// - its traffic, both directions, over its throughput capacity, and
/// - its tunnels over its tunnel capacity,
///
/// each where that capacity is given (0 without either). 1.0 is full.
/// Utilization never refuses a tunnel: only the tunnel capacity does.
pub fn utilization(bytes_per_sec: f64, throughput: u64, tunnels: u64, capacity: u64) -> f64 {
    let by_traffic = if throughput > 0 {
        bytes_per_sec / throughput as f64
    } else {
        0.0
    };
    let by_tunnels = if capacity > 0 {
        tunnels as f64 / capacity as f64
    } else {
        0.0
    };
    by_traffic.max(by_tunnels)
}

/// What to balance on: the measured utilization, or a live report when it
/// is the higher (a segw's CPU can be the bottleneck its bytes do not show).
pub fn with_report(measured: f64, reported: Option<f64>) -> f64 {
    reported.map_or(measured, |r| r.max(measured))
}

/// Tunnels per gateway now, and each gateway's last sample, indexed by
/// gateway id (ids count up from 1 and are never reused, so a flat vector
/// is both the cheapest lookup and what a wasm policy's store copies before
/// a call).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Load {
    by_id: Vec<u64>,
    samples: Vec<Sample>,
    /// Per sample, what a decision needs of it, worked out once per
    /// measurement: every policy call reads it for every gateway.
    quick: Vec<Quick>,
    /// Bytes/s per tunnel over every measured gateway: the rate a tunnel
    /// placed on a gateway that had none when measured is assumed to carry.
    mean_per_tunnel: f64,
    /// Which samples these are, unique in the process (0: none yet): a
    /// copy takes them only when they differ (once a second in the live
    /// balancer, while tunnels change with every placement).
    samples_epoch: u64,
}

/// A sample as [`Load::utilization`] uses it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Quick {
    /// Tunnels when measured, and the utilization measured then.
    tunnels: u64,
    at_sample: f64,
    /// Utilization per tunnel: by traffic (the mean rate per tunnel over
    /// the throughput), and by count (1 / capacity); 0 where not given.
    per_tunnel_traffic: f64,
    per_tunnel_count: f64,
    /// A live report.
    reported: Option<f64>,
}

/// The next [`Load::samples_epoch`].
fn next_epoch() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Load {
    /// Tunnels on gateway `id`; 0 for an id never counted.
    pub fn tunnels(&self, id: u32) -> u64 {
        self.by_id.get(id as usize).copied().unwrap_or(0)
    }

    /// One more (`delta` 1) or one fewer (-1) tunnel on `id`.
    pub fn add(&mut self, id: u32, delta: i64) {
        let i = id as usize;
        if self.by_id.len() <= i {
            self.by_id.resize(i + 1, 0);
        }
        self.by_id[i] = self.by_id[i].saturating_add_signed(delta);
    }

    /// Take a new measurement of every gateway (`(id, sample)`); gateways
    /// not listed keep none.
    pub fn set_samples(&mut self, samples: impl IntoIterator<Item = (u32, Sample)>) {
        self.samples.iter_mut().for_each(|s| *s = Sample::default());
        let (mut bytes, mut tunnels) = (0.0, 0u64);
        for (id, s) in samples {
            let i = id as usize;
            if self.samples.len() <= i {
                self.samples.resize(i + 1, Sample::default());
            }
            self.samples[i] = s;
            bytes += s.rates.bytes();
            tunnels += s.tunnels;
        }
        self.mean_per_tunnel = if tunnels > 0 {
            bytes / tunnels as f64
        } else {
            0.0
        };
        self.derive();
    }

    /// Work out [`Quick`] for every sample, under a new epoch.
    fn derive(&mut self) {
        let mean = self.mean_per_tunnel;
        self.quick = self
            .samples
            .iter()
            .map(|s| {
                let per_tunnel_rate = match s.tunnels {
                    0 => mean,
                    n => s.rates.bytes() / n as f64,
                };
                Quick {
                    tunnels: s.tunnels,
                    at_sample: utilization(s.rates.bytes(), s.throughput, s.tunnels, s.capacity),
                    per_tunnel_traffic: match s.throughput {
                        0 => 0.0,
                        t => per_tunnel_rate / t as f64,
                    },
                    per_tunnel_count: match s.capacity {
                        0 => 0.0,
                        c => 1.0 / c as f64,
                    },
                    reported: s.reported,
                }
            })
            .collect();
        self.samples_epoch = next_epoch();
    }

    /// The same samples as `other`, with no tunnels counted and no traffic
    /// of its own: what a rebalance places into, where each tunnel placed
    /// counts at the fleet's mean rate per tunnel (a tunnel's traffic goes
    /// with it, so a gateway's own mean says nothing about where it lands).
    pub fn fresh_from(other: &Load) -> Load {
        let mut samples = other.samples.clone();
        for s in &mut samples {
            s.rates = Rates::default();
            s.tunnels = 0;
        }
        let mut fresh = Load {
            samples,
            mean_per_tunnel: other.mean_per_tunnel,
            ..Load::default()
        };
        fresh.derive();
        fresh
    }

    /// The last sample of `id`.
    pub fn sample(&self, id: u32) -> Sample {
        self.samples.get(id as usize).copied().unwrap_or_default()
    }

    /// Gateway `id` now: its measured rates, and its utilization with the
    /// tunnels placed (or gone) since the measurement counted at its mean
    /// rate per tunnel (the fleet's, when it had none).
    pub fn gateway(&self, id: u32) -> GatewayLoad {
        let s = self.sample(id);
        let tunnels = self.tunnels(id);
        let measured = self.measured(id, tunnels);
        GatewayLoad {
            tunnels,
            bytes_to: s.rates.bytes_to.round() as u64,
            bytes_from: s.rates.bytes_from.round() as u64,
            packets_to: s.rates.packets_to.round() as u64,
            packets_from: s.rates.packets_from.round() as u64,
            measured,
            reported: s.reported,
            utilization: with_report(measured, s.reported),
        }
    }

    /// [`gateway`](Self::gateway)`(id).utilization`, without the rest.
    #[inline]
    pub fn utilization(&self, id: u32) -> f64 {
        let reported = self.quick.get(id as usize).and_then(|q| q.reported);
        with_report(self.measured(id, self.tunnels(id)), reported)
    }

    /// `id`'s measured utilization with `tunnels` now: as measured, or,
    /// with tunnels placed or gone since, each at the mean per tunnel.
    #[inline]
    fn measured(&self, id: u32, tunnels: u64) -> f64 {
        let Some(q) = self.quick.get(id as usize) else {
            return 0.0;
        };
        if tunnels == q.tunnels {
            return q.at_sample;
        }
        let n = tunnels as f64;
        (q.per_tunnel_traffic * n).max(q.per_tunnel_count * n)
    }

    /// Become a copy of `other`, keeping this one's allocations (a wasm
    /// policy's store takes the live load this way before each call): the
    /// tunnel counts always, the samples when they are not these already.
    pub fn copy_from(&mut self, other: &Load) {
        self.by_id.clone_from(&other.by_id);
        if self.samples_epoch != other.samples_epoch {
            self.samples.clone_from(&other.samples);
            self.quick.clone_from(&other.quick);
            self.mean_per_tunnel = other.mean_per_tunnel;
            self.samples_epoch = other.samples_epoch;
        }
    }
}

impl segwlb_policy_sdk::Load for Load {
    fn tunnels(&self, id: u32) -> u64 {
        Load::tunnels(self, id)
    }

    fn gateway(&self, id: u32) -> GatewayLoad {
        Load::gateway(self, id)
    }

    fn utilization_of(&self, ids: &[u32], tunnels: &mut Vec<u64>, utilization: &mut Vec<f64>) {
        tunnels.clear();
        utilization.clear();
        tunnels.extend(ids.iter().map(|&id| self.tunnels(id)));
        utilization.extend(ids.iter().map(|&id| self.utilization(id)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(bytes: f64, tunnels: u64, throughput: u64, capacity: u64) -> Sample {
        Sample {
            rates: Rates {
                bytes_to: bytes / 5.0,
                bytes_from: bytes * 4.0 / 5.0,
                ..Rates::default()
            },
            tunnels,
            throughput,
            capacity,
            reported: None,
        }
    }

    #[test]
    fn utilization_is_the_fuller_of_traffic_and_tunnels() {
        assert_eq!(utilization(250.0, 1000, 10, 100), 0.25);
        assert_eq!(utilization(250.0, 1000, 50, 100), 0.5);
        assert_eq!(utilization(250.0, 0, 10, 0), 0.0);
        assert_eq!(utilization(2000.0, 1000, 0, 0), 2.0);
    }

    #[test]
    fn tunnels_placed_since_the_measurement_count_at_the_gateway_s_mean() {
        let mut load = Load::default();
        load.add(1, 10);
        load.add(2, 0);
        load.set_samples([
            (1, sample(500.0, 10, 1000, 0)),
            (2, sample(0.0, 0, 1000, 0)),
        ]);
        assert_eq!(load.gateway(1).utilization, 0.5);
        assert_eq!(load.gateway(1).bytes_to, 100);
        assert_eq!(load.gateway(1).bytes_from, 400);
        // Ten more on gateway 1: twice the traffic, at 50 B/s each.
        load.add(1, 10);
        assert_eq!(load.gateway(1).utilization, 1.0);
        // The measured rates themselves do not move until measured again.
        assert_eq!(load.gateway(1).bytes_from, 400);
        // Gateway 2 had none: its new tunnels count at the fleet's mean.
        load.add(2, 4);
        assert_eq!(load.gateway(2).utilization, 0.2);
    }

    #[test]
    fn a_live_report_counts_when_it_is_the_higher() {
        let mut load = Load::default();
        load.add(1, 10);
        let mut s = sample(500.0, 10, 1000, 0);
        s.reported = Some(0.73);
        load.set_samples([(1, s)]);
        let g = load.gateway(1);
        assert_eq!(
            (g.measured, g.reported, g.utilization),
            (0.5, Some(0.73), 0.73)
        );
        s.reported = Some(0.2);
        load.set_samples([(1, s)]);
        assert_eq!(load.gateway(1).utilization, 0.5);
    }

    #[test]
    fn a_fresh_load_for_a_rebalance_counts_placements_at_the_fleet_mean() {
        let mut load = Load::default();
        load.add(1, 10);
        load.add(2, 10);
        load.set_samples([
            (1, sample(900.0, 10, 1000, 0)),
            (2, sample(100.0, 10, 2000, 0)),
        ]);
        let mut fresh = Load::fresh_from(&load);
        assert_eq!(fresh.gateway(1).utilization, 0.0);
        fresh.add(1, 10);
        fresh.add(2, 10);
        // 50 B/s per tunnel wherever it lands.
        assert_eq!(fresh.gateway(1).utilization, 0.5);
        assert_eq!(fresh.gateway(2).utilization, 0.25);
    }
}
