//! Weighted rendezvous hashing (highest random weight with the logarithmic
//! method of Schindelhauer & Schomaker), sampled into a lookup table.
//!
//! [`Rendezvous`] is the definition: each gateway scores a key by
//! `ln(u) / weight`, `u` in (0, 1) a hash of the key and the gateway's name;
//! the highest score wins. Gateway i wins with probability exactly wᵢ/Σw, so
//! weights 1:10 give 1:10, not the "1:10 becomes 1:5.5" of schemes that
//! scale the hash by the weight. And when one weight changes, a key moves
//! only to or from that gateway: nothing shuffles between the others.
//!
//! [`Weighted`] evaluates that function once per slot of a table of prime
//! size M when the set changes, and a tunnel takes `table[hash % M]`. Both
//! properties carry over slot by slot, and a decision is one load instead of
//! N logarithms (1.2 µs native at 64 gateways, measured; a table keeps it
//! flat at any N). The price: shares follow the slots, which sample the
//! weights with a relative error of about 1/√(M·share), ~0.5% at the default
//! M = 65537; and a set change costs M·N scores.
//!
//! Why not a weighted Maglev fill: it hits shares exactly, but a weight
//! change reshuffles slots among all gateways, not just the one that changed.
//!
//! Parameter: `table-size` (prime, default 65537).

use segwlb_policy_sdk::{export_policy, hash, table, Balance, Gateway, Params, TunnelKey};

/// Weighted rendezvous over the gateways that take new tunnels, computed
/// per key. The host uses it directly as its fallback.
///
/// Gateways are grouped by weight: `ln` is monotonic, so within one weight
/// the highest hash wins and only one logarithm per weight class is needed
/// (sets usually have one to three distinct weights).
#[derive(Debug, Default, Clone)]
pub struct Rendezvous {
    classes: Vec<WeightClass>,
}

#[derive(Debug, Clone)]
struct WeightClass {
    inv_weight: f64,
    weight: u32,
    /// (id, name hash), in set order.
    members: Vec<(u32, u64)>,
}

impl Rendezvous {
    pub fn new(gateways: &[Gateway]) -> Self {
        let mut classes: Vec<WeightClass> = Vec::new();
        for g in gateways.iter().filter(|g| g.takes_new_tunnels()) {
            let member = (g.id, hash::str_seeded(&g.name, 0x77));
            match classes.iter_mut().find(|c| c.weight == g.weight) {
                Some(class) => class.members.push(member),
                None => classes.push(WeightClass {
                    inv_weight: 1.0 / f64::from(g.weight),
                    weight: g.weight,
                    members: vec![member],
                }),
            }
        }
        Rendezvous { classes }
    }

    pub fn members(&self) -> usize {
        self.classes.iter().map(|c| c.members.len()).sum()
    }

    /// The winner for a 64-bit key hash.
    pub fn winner(&self, key: u64) -> Option<u32> {
        let mut best: Option<(f64, u32)> = None;
        for class in &self.classes {
            // Highest hash in the class; unit_open keeps only the top 52
            // bits, so compare those (first in set order wins a tie).
            let (id, h) = class
                .members
                .iter()
                .map(|&(id, name)| (id, hash::mix(key ^ name)))
                .reduce(|a, b| if b.1 >> 12 > a.1 >> 12 { b } else { a })?;
            // ln(u) < 0; dividing by the weight brings heavy gateways
            // closer to 0, i.e. higher.
            let score = hash::ln(hash::unit_open(h)) * class.inv_weight;
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, id));
            }
        }
        best.map(|(_, id)| id)
    }
}

#[derive(Debug)]
pub struct Weighted {
    configured_size: u32,
    /// Gateway id per slot; empty when no gateway takes tunnels.
    table: Vec<u32>,
}

impl Weighted {
    pub fn with_table_size(size: u32) -> Result<Self, String> {
        Ok(Weighted {
            configured_size: table::validate(size)?,
            table: Vec::new(),
        })
    }
}

impl Balance for Weighted {
    fn configure(mut params: Params) -> Result<Self, String> {
        let size = params.get("table-size")?.unwrap_or(table::DEFAULT_SIZE);
        params.finish(&["table-size"])?;
        Self::with_table_size(size)
    }

    fn set_gateways(&mut self, gateways: &[Gateway]) {
        let rendezvous = Rendezvous::new(gateways);
        self.table = if rendezvous.members() == 0 {
            Vec::new()
        } else {
            let size = table::size_for(self.configured_size, rendezvous.members());
            (0..size as u64)
                .map(|slot| {
                    rendezvous
                        .winner(hash::mix(slot ^ 0x5eed))
                        .expect("members exist")
                })
                .collect()
        };
    }

    fn choose(&mut self, key: &TunnelKey) -> Option<u32> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(key.endpoint_hash() % self.table.len() as u64) as usize])
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
    fn the_table_agrees_with_rendezvous_in_shares() {
        // The table's slots are rendezvous answers, so its slot shares are
        // the weights up to sampling error.
        let mut p = Weighted::configure(Params::default()).unwrap();
        p.set_gateways(&set(&[3, 1]));
        let heavy = p.table.iter().filter(|&&g| g == 1).count() as f64 / p.table.len() as f64;
        assert!((heavy - 0.75).abs() < 0.006, "slot share {heavy}");
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
        let mut p = Weighted::configure(Params::default()).unwrap();
        p.set_gateways(&set(&[0, 0]));
        assert_eq!(p.choose(&key(1)), None);
        assert_eq!(Rendezvous::new(&set(&[0, 0])).winner(1), None);
    }

    #[test]
    fn table_size_is_validated() {
        let params = Params::new(vec![("table-size".into(), "1000".into())]);
        assert!(Weighted::configure(params).unwrap_err().contains("prime"));
    }
}
