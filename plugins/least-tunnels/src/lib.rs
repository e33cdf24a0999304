//! Weighted least-connection (IPVS's `wlc`, HAProxy's `leastconn`): a new
//! tunnel goes to the gateway with the fewest live tunnels per unit of
//! weight, read from the host's live load at the moment of the decision.
//!
//! IPsec tunnels are the longest sessions there are, so what a gateway
//! holds now says more than how many it was given: a gateway that came back
//! empty after a failure takes every new tunnel until it has caught up.
//!
//! - Ties (equal tunnels per weight, as at the start) go to the gateway
//!   whose name hashes highest with the tunnel's endpoint: deterministic for
//!   a key and a load state, and spread, not always the first in the set.
//! - A gateway at its capacity, down, draining or of weight 0 is skipped;
//!   with none left the answer is `none` (the host refuses the tunnel).
//! - Cost: every gateway's live load, read in one call into the host
//!   (`Load::tunnels_of`), then a scan: it grows with the set, gently.
//!
//! No parameters.

use std::cmp::Ordering;

use segwlb_policy_sdk::{export_policy, hash, load, Balance, Gateway, Load, Params, TunnelKey};

#[derive(Debug, Default)]
pub struct LeastTunnels {
    members: Vec<Member>,
    /// The members' ids, for one read of all their loads.
    ids: Vec<u32>,
    /// Their loads, read per decision (kept to reuse its allocation).
    loads: Vec<u64>,
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
const NAME_SEED: u64 = 0x1ea5;

impl Balance for LeastTunnels {
    fn configure(params: Params) -> Result<Self, String> {
        params.finish(&[])?;
        Ok(LeastTunnels::default())
    }

    fn set_gateways(&mut self, gateways: &[Gateway]) {
        self.members = gateways
            .iter()
            .filter(|g| g.takes_new_tunnels())
            .map(|g| Member {
                id: g.id,
                weight: g.weight,
                capacity: g.capacity,
                name_hash: hash::str_seeded(&g.name, NAME_SEED),
            })
            .collect();
        self.ids = self.members.iter().map(|m| m.id).collect();
    }

    fn choose(&mut self, key: &TunnelKey, load: &dyn Load) -> Option<u32> {
        let endpoint = key.endpoint_hash();
        load.tunnels_of(&self.ids, &mut self.loads);
        let mut best: Option<(Member, u64)> = None;
        for (&m, &tunnels) in self.members.iter().zip(&self.loads) {
            if m.capacity != 0 && tunnels >= m.capacity {
                continue;
            }
            let better = match best {
                None => true,
                Some((b, b_tunnels)) => {
                    match load::per_weight((tunnels, m.weight), (b_tunnels, b.weight)) {
                        Ordering::Less => true,
                        Ordering::Greater => false,
                        Ordering::Equal => {
                            hash::mix(endpoint ^ m.name_hash) > hash::mix(endpoint ^ b.name_hash)
                        }
                    }
                }
            };
            if better {
                best = Some((m, tunnels));
            }
        }
        best.map(|(m, _)| m.id)
    }
}

export_policy!(LeastTunnels);

#[cfg(test)]
mod tests {
    use super::*;
    use segwlb_policy_sdk::Empty;
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};

    fn gw(id: u32, weight: u32, capacity: u64) -> Gateway {
        Gateway {
            capacity,
            ..Gateway::new(id, format!("segw{id}"), weight)
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

    /// A live load the test places into, as the host would.
    #[derive(Default)]
    struct Counts(RefCell<BTreeMap<u32, u64>>);

    impl Counts {
        fn of(pairs: &[(u32, u64)]) -> Self {
            Counts(RefCell::new(pairs.iter().copied().collect()))
        }
        fn place(&self, p: &mut LeastTunnels, n: u32) -> Option<u32> {
            let id = p.choose(&key(n), self)?;
            *self.0.borrow_mut().entry(id).or_default() += 1;
            Some(id)
        }
        fn get(&self, id: u32) -> u64 {
            self.tunnels(id)
        }
    }

    impl Load for Counts {
        fn tunnels(&self, id: u32) -> u64 {
            self.0.borrow().get(&id).copied().unwrap_or(0)
        }
    }

    #[test]
    fn fills_the_emptiest_gateway() {
        let mut p = LeastTunnels::default();
        p.set_gateways(&[gw(1, 1, 0), gw(2, 1, 0), gw(3, 1, 0)]);
        // segw3 came back empty after a failure: it takes every new tunnel
        // until it has caught up with the others.
        let load = Counts::of(&[(1, 40), (2, 38), (3, 0)]);
        for n in 0..38 {
            assert_eq!(load.place(&mut p, n), Some(3), "tunnel {n}");
        }
        // Then 2 and 3 (tied at 38) before 1 (at 40) takes any.
        let next: Vec<u32> = (38..40).map(|n| load.place(&mut p, n).unwrap()).collect();
        assert!(next.iter().all(|&id| id != 1), "{next:?}");
        assert_eq!((load.get(1), load.get(2), load.get(3)), (40, 39, 39));
    }

    #[test]
    fn weights_set_the_shares_exactly() {
        let mut p = LeastTunnels::default();
        p.set_gateways(&[gw(1, 2, 0), gw(2, 1, 0), gw(3, 1, 0)]);
        let load = Counts::default();
        for n in 0..12 {
            load.place(&mut p, n);
        }
        assert_eq!((load.get(1), load.get(2), load.get(3)), (6, 3, 3));
    }

    #[test]
    fn skips_full_down_draining_and_weight_zero() {
        let mut p = LeastTunnels::default();
        let mut down = gw(2, 1, 0);
        down.healthy = false;
        let mut draining = gw(3, 1, 0);
        draining.draining = true;
        p.set_gateways(&[gw(1, 1, 5), down, draining, gw(4, 0, 0), gw(5, 1, 0)]);
        // 1 is full at 5 although it holds fewer than 5's 9.
        let load = Counts::of(&[(1, 5), (5, 9)]);
        assert_eq!(load.place(&mut p, 0), Some(5));
        // Everyone who could take it is full: no answer (the host refuses).
        p.set_gateways(&[gw(1, 1, 5), gw(5, 1, 10)]);
        assert_eq!(load.place(&mut p, 1), None);
    }

    #[test]
    fn ties_are_deterministic_and_spread() {
        let mut p = LeastTunnels::default();
        p.set_gateways(&[gw(1, 1, 0), gw(2, 1, 0), gw(3, 1, 0), gw(4, 1, 0)]);
        // An empty set: every choice is a tie, decided by the key alone.
        let first: Vec<u32> = (0..400)
            .map(|n| p.choose(&key(n), &Empty).unwrap())
            .collect();
        let again: Vec<u32> = (0..400)
            .map(|n| p.choose(&key(n), &Empty).unwrap())
            .collect();
        assert_eq!(first, again);
        for id in 1..=4 {
            let share = first.iter().filter(|&&g| g == id).count();
            assert!((60..=140).contains(&share), "segw{id}: {share} of 400");
        }
    }

    /// Pinned: where the first tunnels go on an empty set of four. A change
    /// here moves tunnels in every run that compares against an older one.
    #[test]
    fn golden_placements() {
        let mut p = LeastTunnels::default();
        p.set_gateways(&[gw(1, 1, 0), gw(2, 1, 0), gw(3, 2, 0), gw(4, 1, 0)]);
        let load = Counts::default();
        let placed: Vec<u32> = (0..10).map(|n| load.place(&mut p, n).unwrap()).collect();
        assert_eq!(placed, GOLDEN);
    }
    const GOLDEN: [u32; 10] = [3, 4, 1, 2, 3, 4, 3, 1, 2, 3];

    #[test]
    fn rejects_parameters() {
        let params = Params::new(vec![("table-size".into(), "7".into())]);
        assert!(LeastTunnels::configure(params)
            .unwrap_err()
            .contains("table-size"));
    }
}
