//! {{name}}: a segwlb balancing policy.
//!
//! Build: put this crate in plugins/{{name}}/, add "{{name}}" to `members` in
//! plugins/Cargo.toml, and run `cargo build` at the repo root (host/build.rs
//! builds every policy crate for wasm32 and writes policies/{{name}}.wasm);
//! `cargo test -p {{name}}` in plugins/ runs the tests below natively.
//!
//! The contract is wit/policy.wit; the SDK (plugins/sdk) turns it into the
//! plain-Rust [`Balance`] trait: `configure` once with the `[policy.params]`
//! of the config, `set_gateways` whenever the gateway set changes, `choose`
//! for each NEW tunnel (existing tunnels stay where they are without asking).
//!
//! This starting point spreads new tunnels over the gateways that take them
//! by a hash of the tunnel's outer address and port
//! ([`TunnelKey::endpoint_hash`]), so a tunnel that comes back after a
//! failure lands on the same gateway while the set is unchanged.
//!
//! A policy is sandboxed: no I/O, clock or randomness. Decide from the
//! parameters, the gateway set and the key only; a panic traps, and the host
//! then counts it and places the tunnel itself.

use segwlb_policy_sdk::{export_policy, Balance, Gateway, Load, Params, TunnelKey};

#[derive(Debug, Default)]
pub struct Policy {
    /// Ids of the gateways that take new tunnels, in the host's order.
    members: Vec<u32>,
}

impl Balance for Policy {
    fn configure(params: Params) -> Result<Self, String> {
        // To take a parameter, make `params` mut and, before `finish`:
        //     let spread: u32 = params.get("spread")?.unwrap_or(1);
        // then list it: `params.finish(&["spread"])?`.
        params.finish(&[])?;
        Ok(Policy::default())
    }

    fn set_gateways(&mut self, gateways: &[Gateway]) {
        // Healthy, not draining, weight > 0: the host refuses any other answer.
        self.members = gateways
            .iter()
            .filter(|g| g.takes_new_tunnels())
            .map(|g| g.id)
            .collect();
    }

    /// `load` is the live view: `load.tunnels(id)` now, and from contract
    /// 0.3.0 `load.gateway(id)` (traffic each way, utilization) and
    /// `load.utilization_of(ids, ..)` for many gateways in one call. This
    /// starting point does not read it.
    fn choose(&mut self, key: &TunnelKey, _load: &dyn Load) -> Option<u32> {
        if self.members.is_empty() {
            return None;
        }
        let i = key.endpoint_hash() % self.members.len() as u64;
        Some(self.members[i as usize])
    }
}

export_policy!(Policy);

#[cfg(test)]
mod tests {
    use super::*;
    use segwlb_policy_sdk::{Empty, Opener};
    use std::net::{IpAddr, Ipv4Addr};

    fn gw(id: u32, healthy: bool, draining: bool) -> Gateway {
        Gateway {
            healthy,
            draining,
            ..Gateway::new(id, format!("segw{id}"), 1)
        }
    }

    fn key(n: u32) -> TunnelKey {
        TunnelKey {
            peer: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)),
            peer_port: 500,
            vip: IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1)),
            ike_spi: Some(u64::from(n)),
            opened_by: Opener::Ike,
        }
    }

    #[test]
    fn answers_only_gateways_that_take_tunnels() {
        let mut p = Policy::configure(Params::default()).unwrap();
        p.set_gateways(&[
            gw(1, true, false),
            gw(2, false, false),
            gw(3, true, true),
            gw(4, true, false),
        ]);
        for n in 0..100 {
            let g = p.choose(&key(n), &Empty).unwrap();
            assert!(g == 1 || g == 4, "chose {g}");
        }
    }

    #[test]
    fn same_key_same_gateway() {
        let mut p = Policy::configure(Params::default()).unwrap();
        p.set_gateways(&[gw(1, true, false), gw(2, true, false), gw(3, true, false)]);
        for n in 0..100 {
            assert_eq!(p.choose(&key(n), &Empty), p.choose(&key(n), &Empty));
        }
    }

    #[test]
    fn none_when_nobody_takes_tunnels() {
        let mut p = Policy::configure(Params::default()).unwrap();
        assert_eq!(p.choose(&key(0), &Empty), None);
        p.set_gateways(&[gw(1, false, false)]);
        assert_eq!(p.choose(&key(0), &Empty), None);
    }

    #[test]
    fn rejects_unknown_parameters() {
        let params = Params::new(vec![("spread".into(), "2".into())]);
        assert!(Policy::configure(params).unwrap_err().contains("spread"));
    }
}
