//! Weighted rendezvous hashing (highest random weight, with the logarithmic
//! method of Schindelhauer & Schomaker).
//!
//! Each gateway scores a tunnel by `ln(u) / weight`, with `u` in (0, 1) a
//! hash of the tunnel's endpoint and the gateway's name; the highest score
//! wins. The winner is gateway i with probability exactly wᵢ/Σw, so weights
//! 1:10 give 1:10 — not the "1:10 becomes 1:5.5" of schemes that scale the
//! hash by the weight.
//!
//! Why rendezvous rather than a weighted Maglev fill: when one weight
//! changes, only tunnels that must move to honour the new shares do (from or
//! to that gateway); nothing shuffles between the others. The price is O(N)
//! per decision (a hash and a log per gateway), which at 64 gateways still
//! fits the budget for a new tunnel, and no table to rebuild.

use segwlb_policy_sdk::{export_policy, hash, Balance, Gateway, Params, TunnelKey};

#[derive(Debug, Default)]
pub struct Weighted {
    /// (id, name hash, 1/weight) of each gateway that takes new tunnels.
    members: Vec<(u32, u64, f64)>,
}

impl Balance for Weighted {
    fn configure(params: Params) -> Result<Self, String> {
        params.finish(&[])?;
        Ok(Weighted::default())
    }

    fn set_gateways(&mut self, gateways: &[Gateway]) {
        self.members = gateways
            .iter()
            .filter(|g| g.takes_new_tunnels())
            .map(|g| {
                (
                    g.id,
                    hash::str_seeded(&g.name, 0x77),
                    1.0 / f64::from(g.weight),
                )
            })
            .collect();
    }

    fn choose(&mut self, key: &TunnelKey) -> Option<u32> {
        let k = key.endpoint_hash();
        let mut best: Option<(f64, u32)> = None;
        for &(id, name, inv_weight) in &self.members {
            // ln(u) < 0; dividing by the weight brings heavy gateways closer
            // to 0, i.e. higher.
            let score = hash::ln(hash::unit_open(hash::mix(k ^ name))) * inv_weight;
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, id));
            }
        }
        best.map(|(_, id)| id)
    }
}

export_policy!(Weighted);

#[cfg(test)]
mod tests {
    use super::*;
    use segwlb_policy_sdk::Opener;
    use std::net::{IpAddr, Ipv4Addr};

    fn set(weights: &[u32]) -> Vec<Gateway> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Gateway {
                id: i as u32 + 1,
                name: format!("segw{}", i + 1),
                weight,
                healthy: true,
                draining: false,
                tunnels: 0,
            })
            .collect()
    }

    fn key(n: u32) -> TunnelKey {
        TunnelKey {
            peer: IpAddr::V4(Ipv4Addr::from(0x0a02_0000 + n)),
            peer_port: 4500,
            vip: IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1)),
            ike_spi: None,
            opened_by: Opener::NatT,
        }
    }

    fn place(weights: &[u32], n: u32) -> Vec<u32> {
        let mut p = Weighted::configure(Params::default()).unwrap();
        p.set_gateways(&set(weights));
        (0..n).map(|i| p.choose(&key(i)).unwrap()).collect()
    }

    fn shares(placed: &[u32], gateways: usize) -> Vec<f64> {
        (1..=gateways as u32)
            .map(|g| placed.iter().filter(|&&p| p == g).count() as f64 / placed.len() as f64)
            .collect()
    }

    #[test]
    fn one_to_ten_means_one_to_ten() {
        let s = shares(&place(&[1, 10], 110_000), 2);
        let ratio = s[1] / s[0];
        assert!((9.6..10.4).contains(&ratio), "ratio {ratio}");
    }

    #[test]
    fn two_one_one_one() {
        let s = shares(&place(&[2, 1, 1, 1], 100_000), 4);
        for (got, want) in s.iter().zip([0.4, 0.2, 0.2, 0.2]) {
            assert!((got - want).abs() < 0.01, "shares {s:?}");
        }
    }

    #[test]
    fn weight_change_moves_only_to_or_from_that_gateway() {
        let before = place(&[1, 1, 1, 1], 40_000);
        let after = place(&[1, 1, 1, 3], 40_000);
        for (b, a) in before.iter().zip(&after) {
            assert!(
                b == a || *a == 4,
                "a tunnel moved {b} -> {a}, not to the heavier gateway"
            );
        }
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count() as f64 / 40_000.0;
        // Minimum: segw4 goes from 1/4 to 3/6 of tunnels, so 1/4 must move.
        assert!((0.23..0.27).contains(&moved), "moved {moved}");
    }

    #[test]
    fn weight_zero_takes_nothing() {
        assert!(place(&[0, 1], 1000).iter().all(|&g| g == 2));
        let mut p = Weighted::default();
        p.set_gateways(&set(&[0, 0]));
        assert_eq!(p.choose(&key(1)), None);
    }
}
