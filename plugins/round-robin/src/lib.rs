//! Round-robin: each new tunnel goes to the next gateway that takes new
//! tunnels (healthy, not draining, weight > 0), in the host's order.
//!
//! The cursor remembers the *id* of the last gateway chosen, not an index, so
//! a gateway joining, leaving or going down does not make the rotation skip
//! or repeat the others. Weights other than 0 are ignored: use `weighted`
//! for shares.

use segwlb_policy_sdk::{export_policy, Balance, Gateway, Load, Params, TunnelKey};

#[derive(Debug, Default)]
pub struct RoundRobin {
    /// Every gateway in set order, with whether it takes new tunnels.
    order: Vec<(u32, bool)>,
    last: Option<u32>,
}

impl Balance for RoundRobin {
    fn configure(params: Params) -> Result<Self, String> {
        params.finish(&[])?;
        Ok(RoundRobin::default())
    }

    fn set_gateways(&mut self, gateways: &[Gateway]) {
        self.order = gateways
            .iter()
            .map(|g| (g.id, g.takes_new_tunnels()))
            .collect();
    }

    fn choose(&mut self, _key: &TunnelKey, _load: &dyn Load) -> Option<u32> {
        let n = self.order.len();
        // Start just after the last one chosen; from the top if it is gone.
        let start = self
            .last
            .and_then(|last| self.order.iter().position(|&(id, _)| id == last))
            .map_or(0, |i| i + 1);
        let next = (0..n)
            .map(|step| self.order[(start + step) % n])
            .find(|&(_, takes)| takes)?
            .0;
        self.last = Some(next);
        Some(next)
    }
}

export_policy!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use segwlb_policy_sdk::Empty;
    use std::net::{IpAddr, Ipv4Addr};

    fn gw(id: u32, healthy: bool, draining: bool) -> Gateway {
        Gateway {
            healthy,
            draining,
            ..Gateway::new(id, format!("segw{id}"), 1)
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

    fn picks(p: &mut RoundRobin, n: u32) -> Vec<u32> {
        (0..n).map(|i| p.choose(&key(i), &Empty).unwrap()).collect()
    }

    #[test]
    fn rotates_in_set_order() {
        let mut p = RoundRobin::configure(Params::default()).unwrap();
        p.set_gateways(&[gw(3, true, false), gw(1, true, false), gw(2, true, false)]);
        assert_eq!(picks(&mut p, 7), [3, 1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn skips_down_and_draining() {
        let mut p = RoundRobin::default();
        p.set_gateways(&[
            gw(1, true, false),
            gw(2, false, false),
            gw(3, true, true),
            gw(4, true, false),
        ]);
        assert_eq!(picks(&mut p, 4), [1, 4, 1, 4]);
    }

    #[test]
    fn set_change_keeps_rotation_going() {
        let mut p = RoundRobin::default();
        p.set_gateways(&[gw(1, true, false), gw(2, true, false), gw(3, true, false)]);
        assert_eq!(picks(&mut p, 2), [1, 2]);
        // 2 (the last chosen) goes down: carry on after it, not from the top.
        p.set_gateways(&[gw(1, true, false), gw(2, false, false), gw(3, true, false)]);
        assert_eq!(picks(&mut p, 3), [3, 1, 3]);
    }

    #[test]
    fn none_when_nobody_takes_tunnels() {
        let mut p = RoundRobin::default();
        assert_eq!(p.choose(&key(0), &Empty), None);
        p.set_gateways(&[gw(1, false, false)]);
        assert_eq!(p.choose(&key(0), &Empty), None);
    }

    #[test]
    fn rejects_parameters() {
        let params = Params::new(vec![("table-size".into(), "7".into())]);
        assert!(RoundRobin::configure(params)
            .unwrap_err()
            .contains("table-size"));
    }
}
