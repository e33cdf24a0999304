//! Least utilization: a new tunnel goes to the gateway with the lowest
//! utilization, read from the host's live load at the moment of the
//! decision (contract 0.3.0's `gateway-load`).
//!
//! Utilization is the host's one model of how full a segw is: the larger of
//! its traffic (both ways, smoothed over a few seconds) over its throughput
//! capacity and its tunnels over its tunnel capacity, or a utilization the
//! segw reported (its CPU) when that is higher. A tunnel's own traffic is
//! not known when it opens, so what this balances is the gateways' measured
//! load: it sends new tunnels where there is headroom, in proportion to it.
//!
//! - Segws of unequal throughput need no weights: the one that encrypts
//!   10 Gbit/s fills to the same utilization as the one that does 4.
//!   Utilization is already relative to each segw's own capacity, so
//!   weights only break ties (and lead where nothing can be measured, as
//!   below): weights that describe a segw's size would count it twice.
//! - A burst of new tunnels does not herd onto the gateway that was
//!   lightest at the last measurement: the host counts each tunnel placed
//!   since then at that gateway's mean traffic per tunnel.
//! - A gateway with neither a throughput nor a tunnel capacity cannot be
//!   said to be full: its utilization would read 0 forever and it would
//!   take every tunnel. So unless every gateway that takes tunnels has one
//!   or the other, it is least-tunnels: fewest tunnels per weight, ties to
//!   the gateway whose name hashes highest with the tunnel's endpoint.
//! - A gateway at its tunnel capacity, down, draining or of weight 0 is
//!   skipped; with none left the answer is `none` (the host refuses).
//! - Cost: every gateway's load in one call into the host
//!   (`Load::gateways_of`), then a scan.
//!
//! It moves nothing by itself (no policy does: the table keeps tunnels
//! where they are); in a rebalance it places the population afresh by
//! headroom, each tunnel counted at the fleet's mean traffic per tunnel.
//!
//! No parameters.

use std::cmp::Ordering;

use segwlb_policy_sdk::{export_policy, hash, load, Balance, Gateway, Load, Params, TunnelKey};

#[derive(Debug, Default)]
pub struct LeastUtilization {
    members: Vec<Member>,
    /// Every member has a throughput or a tunnel capacity: utilization
    /// compares them.
    measurable: bool,
    /// The members' ids, for one read of all their loads.
    ids: Vec<u32>,
    /// Their tunnels and utilization, read per decision (kept to reuse
    /// the allocations).
    tunnels: Vec<u64>,
    utilization: Vec<f64>,
}

/// A gateway that takes new tunnels.
#[derive(Debug, Clone, Copy)]
struct Member {
    id: u32,
    weight: u32,
    capacity: u64,
    name_hash: u64,
}

/// Seeds the tie-break hash of gateway names.
const NAME_SEED: u64 = 0x1ea5_0003;

/// A member as read for one decision.
#[derive(Clone, Copy)]
struct Seen<'a> {
    member: &'a Member,
    tunnels: u64,
    utilization: f64,
}

/// `a` against `b`, lighter first: utilization (when `measurable`), then
/// tunnels per weight, then the name hash with the endpoint (higher wins).
fn lighter(a: &Seen, b: &Seen, endpoint: u64, measurable: bool) -> Ordering {
    let (am, bm) = (a.member, b.member);
    let by_utilization = match measurable {
        true => a.utilization.total_cmp(&b.utilization),
        false => Ordering::Equal,
    };
    by_utilization
        .then_with(|| load::per_weight((a.tunnels, am.weight), (b.tunnels, bm.weight)))
        .then_with(|| {
            let score = |m: &Member| hash::mix(endpoint ^ m.name_hash);
            score(bm).cmp(&score(am))
        })
}

impl Balance for LeastUtilization {
    fn configure(params: Params) -> Result<Self, String> {
        params.finish(&[])?;
        Ok(LeastUtilization::default())
    }

    fn set_gateways(&mut self, gateways: &[Gateway]) {
        let mut measurable = true;
        self.members = gateways
            .iter()
            .filter(|g| g.takes_new_tunnels())
            .inspect(|g| measurable &= g.throughput > 0 || g.capacity > 0)
            .map(|g| Member {
                id: g.id,
                weight: g.weight,
                capacity: g.capacity,
                name_hash: hash::str_seeded(&g.name, NAME_SEED),
            })
            .collect();
        self.ids = self.members.iter().map(|m| m.id).collect();
        self.measurable = measurable;
    }

    fn choose(&mut self, key: &TunnelKey, load: &dyn Load) -> Option<u32> {
        let endpoint = key.endpoint_hash();
        load.utilization_of(&self.ids, &mut self.tunnels, &mut self.utilization);
        let seen = self
            .members
            .iter()
            .zip(&self.tunnels)
            .zip(&self.utilization)
            .map(|((member, &tunnels), &utilization)| Seen {
                member,
                tunnels,
                utilization,
            });
        seen.filter(|s| s.member.capacity == 0 || s.tunnels < s.member.capacity)
            .min_by(|a, b| lighter(a, b, endpoint, self.measurable))
            .map(|s| s.member.id)
    }
}

export_policy!(LeastUtilization);

#[cfg(test)]
mod tests {
    use super::*;
    use segwlb_policy_sdk::GatewayLoad;
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};

    fn gw(id: u32, weight: u32, capacity: u64) -> Gateway {
        Gateway {
            capacity,
            ..Gateway::new(id, format!("segw{id}"), weight)
        }
    }

    /// A gateway of `throughput` bytes/s, weight 1, no tunnel capacity.
    fn sized(id: u32, throughput: f64) -> Gateway {
        Gateway {
            throughput: throughput as u64,
            ..gw(id, 1, 0)
        }
    }

    fn key(n: u32) -> TunnelKey {
        let peer = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n));
        TunnelKey::ike(
            peer,
            IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1)),
            Some(u64::from(n)),
        )
    }

    /// A host's load in miniature: tunnels per gateway, and each new tunnel
    /// carrying `per_tunnel` bytes/s onto a gateway of `throughput` bytes/s
    /// (the host's model: traffic over throughput, or a report if higher).
    #[derive(Default)]
    struct Farm {
        tunnels: RefCell<BTreeMap<u32, u64>>,
        throughput: BTreeMap<u32, f64>,
        reported: BTreeMap<u32, f64>,
        per_tunnel: f64,
    }

    impl Farm {
        fn place(&self, p: &mut LeastUtilization, n: u32) -> Option<u32> {
            let id = p.choose(&key(n), self)?;
            *self.tunnels.borrow_mut().entry(id).or_default() += 1;
            Some(id)
        }
        fn get(&self, id: u32) -> u64 {
            self.tunnels(id)
        }
    }

    impl Load for Farm {
        fn tunnels(&self, id: u32) -> u64 {
            self.tunnels.borrow().get(&id).copied().unwrap_or(0)
        }
        fn gateway(&self, id: u32) -> GatewayLoad {
            let tunnels = self.tunnels(id);
            let measured = self
                .throughput
                .get(&id)
                .map_or(0.0, |t| tunnels as f64 * self.per_tunnel / t);
            let reported = self.reported.get(&id).copied();
            GatewayLoad {
                tunnels,
                measured,
                reported,
                utilization: reported.map_or(measured, |r| r.max(measured)),
                ..GatewayLoad::default()
            }
        }
    }

    #[test]
    fn fills_segws_in_proportion_to_their_throughput_without_weights() {
        let mut p = LeastUtilization::default();
        p.set_gateways(&[sized(1, 10e9), sized(2, 10e9), sized(3, 4e9)]);
        let farm = Farm {
            throughput: [(1, 10e9), (2, 10e9), (3, 4e9)].into(),
            per_tunnel: 1e6,
            ..Farm::default()
        };
        for n in 0..2400 {
            farm.place(&mut p, n);
        }
        // 10 : 10 : 4 of 2,400.
        assert_eq!((farm.get(1), farm.get(2), farm.get(3)), (1000, 1000, 400));
    }

    #[test]
    fn a_segw_reporting_a_hot_cpu_takes_nothing_until_the_others_catch_up() {
        let mut p = LeastUtilization::default();
        p.set_gateways(&[sized(1, 1e9), sized(2, 1e9)]);
        let farm = Farm {
            throughput: [(1, 1e9), (2, 1e9)].into(),
            reported: [(1, 0.6)].into(),
            per_tunnel: 1e6,
            ..Farm::default()
        };
        // segw2 is at 0.1% per tunnel: it takes the first 600.
        for n in 0..600 {
            assert_eq!(farm.place(&mut p, n), Some(2), "tunnel {n}");
        }
        assert_eq!(farm.get(1), 0);
    }

    #[test]
    fn without_capacities_it_is_least_tunnels_per_weight() {
        let mut p = LeastUtilization::default();
        p.set_gateways(&[gw(1, 2, 0), gw(2, 1, 0), gw(3, 1, 0)]);
        let farm = Farm::default();
        for n in 0..12 {
            farm.place(&mut p, n);
        }
        assert_eq!((farm.get(1), farm.get(2), farm.get(3)), (6, 3, 3));
    }

    #[test]
    fn where_capacities_say_the_size_weights_do_not_count_it_twice() {
        let mut p = LeastUtilization::default();
        // segw1 is twice the box, and weighted 2 for it.
        let big = Gateway {
            weight: 2,
            ..sized(1, 2e9)
        };
        p.set_gateways(&[big, sized(2, 1e9)]);
        let farm = Farm {
            throughput: [(1, 2e9), (2, 1e9)].into(),
            per_tunnel: 1e6,
            ..Farm::default()
        };
        for n in 0..300 {
            farm.place(&mut p, n);
        }
        assert_eq!((farm.get(1), farm.get(2)), (200, 100));
    }

    #[test]
    fn a_gateway_nothing_measures_makes_it_least_tunnels() {
        let mut p = LeastUtilization::default();
        // segw3 came without a throughput: its utilization reads 0 however
        // many tunnels it holds. It must not take them all.
        p.set_gateways(&[sized(1, 1e9), sized(2, 1e9), gw(3, 1, 0)]);
        let farm = Farm {
            throughput: [(1, 1e9), (2, 1e9)].into(),
            per_tunnel: 1e6,
            ..Farm::default()
        };
        for n in 0..300 {
            farm.place(&mut p, n);
        }
        assert_eq!((farm.get(1), farm.get(2), farm.get(3)), (100, 100, 100));
    }

    #[test]
    fn skips_full_down_draining_and_weight_zero() {
        let mut p = LeastUtilization::default();
        let mut down = gw(2, 1, 0);
        down.healthy = false;
        let mut draining = gw(3, 1, 0);
        draining.draining = true;
        p.set_gateways(&[gw(1, 1, 5), down, draining, gw(4, 0, 0), gw(5, 1, 0)]);
        let farm = Farm::default();
        farm.tunnels.borrow_mut().extend([(1, 5), (5, 9)]);
        assert_eq!(farm.place(&mut p, 0), Some(5));
        p.set_gateways(&[gw(1, 1, 5), gw(5, 1, 10)]);
        assert_eq!(farm.place(&mut p, 1), None);
    }

    /// Pinned: where the first tunnels go on an empty set of four, one of
    /// them twice as fast. A change here moves tunnels in every run that
    /// compares against an older one.
    #[test]
    fn golden_placements() {
        let mut p = LeastUtilization::default();
        p.set_gateways(&[sized(1, 2e9), sized(2, 1e9), sized(3, 1e9), sized(4, 1e9)]);
        let farm = Farm {
            throughput: [(1, 2e9), (2, 1e9), (3, 1e9), (4, 1e9)].into(),
            per_tunnel: 1e6,
            ..Farm::default()
        };
        let placed: Vec<u32> = (0..10).map(|n| farm.place(&mut p, n).unwrap()).collect();
        assert_eq!(placed, GOLDEN);
    }
    const GOLDEN: [u32; 10] = [2, 1, 3, 4, 1, 3, 2, 4, 1, 1];

    #[test]
    fn rejects_parameters() {
        let params = Params::new(vec![("table-size".into(), "7".into())]);
        assert!(LeastUtilization::configure(params)
            .unwrap_err()
            .contains("table-size"));
    }
}
