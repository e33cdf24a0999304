//! The live load the core keeps and a policy reads in `choose`: tunnels per
//! gateway (exact, every placement counted at once), and each gateway's
//! traffic as last measured, with its capacities and any reported
//! utilization — from which [`utilization`] is the one model of how full a
//! segw is.

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

/// Tunnels per gateway now, and each gateway's last sample, indexed by
/// gateway id (ids count up from 1 and are never reused, so a flat vector
/// is both the cheapest lookup and what a wasm policy's store copies before
/// a call).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Load {
    by_id: Vec<u64>,
    samples: Vec<Sample>,
    /// Bytes/s per tunnel over every measured gateway: the rate a tunnel
    /// placed on a gateway that had none when measured is assumed to carry.
    mean_per_tunnel: f64,
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
        Load {
            by_id: Vec::new(),
            samples,
            mean_per_tunnel: other.mean_per_tunnel,
        }
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
        let per_tunnel = if s.tunnels > 0 {
            s.rates.bytes() / s.tunnels as f64
        } else {
            self.mean_per_tunnel
        };
        let bytes = if tunnels == s.tunnels {
            s.rates.bytes()
        } else {
            per_tunnel * tunnels as f64
        };
        let measured = utilization(bytes, s.throughput, tunnels, s.capacity);
        GatewayLoad {
            tunnels,
            bytes_to: s.rates.bytes_to.round() as u64,
            bytes_from: s.rates.bytes_from.round() as u64,
            packets_to: s.rates.packets_to.round() as u64,
            packets_from: s.rates.packets_from.round() as u64,
            measured,
            reported: s.reported,
            utilization: s.reported.map_or(measured, |r| r.max(measured)),
        }
    }

    /// Become a copy of `other`, keeping this one's allocations (a wasm
    /// policy's store takes the live load this way before each call).
    pub fn copy_from(&mut self, other: &Load) {
        self.by_id.clone_from(&other.by_id);
        self.samples.clone_from(&other.samples);
        self.mean_per_tunnel = other.mean_per_tunnel;
    }
}

impl segwlb_policy_sdk::Load for Load {
    fn tunnels(&self, id: u32) -> u64 {
        Load::tunnels(self, id)
    }

    fn gateway(&self, id: u32) -> GatewayLoad {
        Load::gateway(self, id)
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
