//! Weighted rendezvous hashing (highest random weight with the logarithmic
//! method of Schindelhauer & Schomaker), sampled into a lookup table, with
//! bounded loads (Mirrokni, Thorup & Zadimoghaddam; HAProxy's
//! `hash-balance-factor`).
//!
//! [`Rendezvous`] is the preference: each gateway scores a key by
//! `ln(u) / weight`, `u` in (0, 1) a hash of the key and the gateway's name;
//! the highest score is the key's first choice, the next its second, and so
//! on. Gateway i is first with probability exactly wᵢ/Σw, so weights 1:10
//! give 1:10, not the "1:10 becomes 1:5.5" of schemes that scale the hash by
//! the weight. And when one weight changes, a first choice moves only to or
//! from that gateway: nothing shuffles between the others.
//!
//! Hashing alone meets the shares only on average: 12 tunnels over weights
//! 2:1:1 landed 4/3/5 in the lab, the heavy gateway getting the fewest. So
//! each gateway also has a bound: it takes a new tunnel only while its load
//! is under `balance-factor`% of its fair share of the tunnels placed so far
//! plus this one (exactly: `load < max(⌈s⌉, ⌊factor%·s⌋)`, `s = (n+1)·w/Σw`);
//! a key whose first choice is full goes to its next choice with room. At 100% the shares are exact at
//! every step (no gateway is ever above ⌈share·n⌉); the default, 105, lets
//! a gateway run 5% over its share, in whole tunnels, before keys spill
//! (12 tunnels at 2:1:1 are still 6/3/3: 5% of a share of 3 is not a
//! tunnel); 0 turns the bound off (pure rendezvous). A failure still moves only the failed gateway's
//! tunnels: affinity keeps everyone else, and the survivors take the
//! orphans in proportion to their weights.
//!
//! Why 105 and not 100, measured with `segwlb policy check --gateways 64
//! --tunnels 100000`: at 100 every gateway sits at its bound, so a key whose
//! first choice is full ranks all 64 gateways (2.2 µs a decision, against
//! 0.6–1.1 µs at 105, on a busy 2-core machine), and placing the population
//! afresh after one gateway leaves moves 50.6% of the tunnels (the minimum
//! is 1.6%) because exact bounds cascade spills; at 105, max/mean 1.048
//! and 3.7% move; at 4 gateways 25.0% (the minimum) against 51.0% at 100.
//! 110 gives 1.063 and 2.4%, 125 1.108 and 1.7%: 105 keeps shares within
//! 5% and the disruption near the minimum.
//!
//! The load is what the host pushed with the set (`tunnels`) plus the
//! tunnels this policy placed since; the host pushes again on every set
//! change, and with every count 0 before a rebalance, which then places the
//! whole population afresh within the bounds. Tunnels that ended since the
//! last push still count until the next one; ends are spread over gateways
//! like the tunnels themselves, so the shares hold.
//!
//! [`Weighted`] evaluates the first choice once per slot of a table of prime
//! size M when the set changes, and a tunnel takes `table[hash % M]`: one
//! load instead of N logarithms (1.2 µs native at 64 gateways). Only a key
//! whose first choice is full ranks the gateways for its slot (N scores).
//!
//! Why not a weighted Maglev fill: it hits slot shares exactly, but a weight
//! change reshuffles slots among all gateways, not just the one that changed.
//!
//! Parameters: `table-size` (prime, default 65537), `balance-factor`
//! (percent, 0 or ≥ 100, default 105).

use segwlb_policy_sdk::{export_policy, hash, table, Balance, Gateway, Load, Params, TunnelKey};

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
            let member = (g.id, hash::str_seeded(&g.name, NAME_SEED));
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
        self.winner_where(key, |_| true)
    }

    /// The best-ranked gateway for a key among those `eligible` accepts
    /// (the host's fallback skips full gateways this way).
    pub fn winner_where(&self, key: u64, eligible: impl Fn(u32) -> bool) -> Option<u32> {
        let mut best: Option<(f64, u32)> = None;
        for class in &self.classes {
            // Highest hash in the class; unit_open keeps only the top 52
            // bits, so compare those (first in set order wins a tie).
            let Some((id, h)) = class
                .members
                .iter()
                .filter(|&&(id, _)| eligible(id))
                .map(|&(id, name)| (id, hash::mix(key ^ name)))
                .reduce(|a, b| if b.1 >> 12 > a.1 >> 12 { b } else { a })
            else {
                continue;
            };
            let score = score_of(h, class.inv_weight);
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, id));
            }
        }
        best.map(|(_, id)| id)
    }
}

/// A gateway's score for a key: `ln(u) / weight` with `u` = the hash of key
/// and name in (0, 1). ln(u) < 0, so dividing by the weight brings heavy
/// gateways closer to 0, i.e. higher.
fn score_of(key_and_name: u64, inv_weight: f64) -> f64 {
    hash::ln(hash::unit_open(key_and_name)) * inv_weight
}

/// A gateway that takes new tunnels, and what it holds.
#[derive(Debug, Clone, Copy)]
struct Member {
    id: u32,
    name_hash: u64,
    weight: u64,
    /// Pushed with the set, plus placed since.
    load: u64,
}

#[derive(Debug)]
pub struct Weighted {
    configured_size: u32,
    /// Percent of the fair share a gateway may hold before keys spill to
    /// their next choice; 0 = no bound.
    balance_factor: u32,
    rendezvous: Rendezvous,
    /// First choice per slot; empty when no gateway takes tunnels.
    table: Vec<u32>,
    members: Vec<Member>,
    total_weight: u64,
    /// Σ load over the members.
    placed: u64,
}

impl Weighted {
    pub fn new(table_size: u32, balance_factor: u32) -> Result<Self, String> {
        if balance_factor != 0 && balance_factor < 100 {
            return Err(format!(
                "parameter `balance-factor` = {balance_factor}: must be 0 (no bound) or \
                 a percentage ≥ 100 (100 = exact shares)"
            ));
        }
        Ok(Weighted {
            configured_size: table::validate(table_size)?,
            balance_factor,
            rendezvous: Rendezvous::default(),
            table: Vec::new(),
            members: Vec::new(),
            total_weight: 0,
            placed: 0,
        })
    }

    /// May member `m` take one more tunnel? Its load must be under its
    /// bound: its exact share of the tunnels so far plus this one,
    /// `s = (n+1)·w/Σw`, rounded up (so 100% is exact), or `factor`% of
    /// it rounded down to whole tunnels, whichever is larger: the slack only
    /// counts once it is a whole tunnel, so small populations stay exact.
    fn has_room(&self, m: &Member, placed: u64) -> bool {
        let share = u128::from(placed + 1) * u128::from(m.weight);
        let total = u128::from(self.total_weight);
        let exact = share.div_ceil(total);
        let slack = u128::from(self.balance_factor) * share / (100 * total);
        u128::from(m.load) < exact.max(slack)
    }

    fn member(&self, id: u32) -> usize {
        self.members
            .iter()
            .position(|m| m.id == id)
            .expect("the table holds members only")
    }
}

impl Balance for Weighted {
    fn configure(mut params: Params) -> Result<Self, String> {
        let size = params.get("table-size")?.unwrap_or(table::DEFAULT_SIZE);
        let factor = params.get("balance-factor")?.unwrap_or(DEFAULT_FACTOR);
        params.finish(&["table-size", "balance-factor"])?;
        Self::new(size, factor)
    }

    fn set_gateways(&mut self, gateways: &[Gateway]) {
        self.rendezvous = Rendezvous::new(gateways);
        self.members = gateways
            .iter()
            .filter(|g| g.takes_new_tunnels())
            .map(|g| Member {
                id: g.id,
                name_hash: hash::str_seeded(&g.name, NAME_SEED),
                weight: u64::from(g.weight),
                load: g.tunnels,
            })
            .collect();
        self.total_weight = self.members.iter().map(|m| m.weight).sum();
        self.placed = self.members.iter().map(|m| m.load).sum();
        self.table = if self.members.is_empty() {
            Vec::new()
        } else {
            let size = table::size_for(self.configured_size, self.members.len());
            (0..size as u64)
                .map(|slot| {
                    self.rendezvous
                        .winner(slot_hash(slot))
                        .expect("members exist")
                })
                .collect()
        };
    }

    fn choose(&mut self, key: &TunnelKey, _load: &dyn Load) -> Option<u32> {
        if self.table.is_empty() {
            return None;
        }
        let slot = key.endpoint_hash() % self.table.len() as u64;
        let first = self.member(self.table[slot as usize]);
        let chosen = if self.balance_factor == 0 {
            first
        } else {
            let placed = self.placed;
            if self.has_room(&self.members[first], placed) {
                first
            } else {
                // The best-scoring member with room; there is one, as
                // Σ bounds ≥ n + 1 > n = Σ loads.
                let key = slot_hash(slot);
                let mut best: Option<(f64, usize)> = None;
                for (i, m) in self.members.iter().enumerate() {
                    if self.has_room(m, placed) {
                        let score = score_of(hash::mix(key ^ m.name_hash), 1.0 / m.weight as f64);
                        if best.is_none_or(|(s, _)| score > s) {
                            best = Some((score, i));
                        }
                    }
                }
                best.map_or(first, |(_, i)| i)
            }
        };
        self.placed += 1;
        let m = &mut self.members[chosen];
        m.load += 1;
        Some(m.id)
    }
}

/// The default `balance-factor`: see the module docs for the measurements.
pub const DEFAULT_FACTOR: u32 = 105;

/// Seeds the gateway name hashes: part of where every key goes.
const NAME_SEED: u64 = 0x77;

/// The rendezvous key of table slot `slot`.
fn slot_hash(slot: u64) -> u64 {
    hash::mix(slot ^ 0x5eed)
}

export_policy!(Weighted);

#[cfg(test)]
mod tests {
    use super::*;
    use segwlb_policy_sdk::{Empty, Opener};
    use std::net::{IpAddr, Ipv4Addr};

    fn set(weights: &[u32]) -> Vec<Gateway> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Gateway::new(i as u32 + 1, format!("segw{}", i + 1), weight))
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

    fn with_factor(factor: u32) -> Weighted {
        let params = Params::new(vec![("balance-factor".into(), factor.to_string())]);
        Weighted::configure(params).unwrap()
    }

    fn place_with(mut p: Weighted, weights: &[u32], n: u32) -> Vec<u32> {
        p.set_gateways(&set(weights));
        (0..n).map(|i| p.choose(&key(i), &Empty).unwrap()).collect()
    }

    fn place(weights: &[u32], n: u32) -> Vec<u32> {
        place_with(with_factor(100), weights, n)
    }

    fn counts(placed: &[u32], gateways: usize) -> Vec<usize> {
        (1..=gateways as u32)
            .map(|g| placed.iter().filter(|&&p| p == g).count())
            .collect()
    }

    fn shares(placed: &[u32], gateways: usize) -> Vec<f64> {
        counts(placed, gateways)
            .into_iter()
            .map(|c| c as f64 / placed.len() as f64)
            .collect()
    }

    #[test]
    fn the_default_factor_is_105_and_still_exact_on_twelve_tunnels() {
        let p = Weighted::configure(Params::default()).unwrap();
        assert_eq!(p.balance_factor, DEFAULT_FACTOR);
        let placed = place_with(p, &[2, 1, 1], 12);
        assert_eq!(counts(&placed, 3), [6, 3, 3]);
        // 64 gateways, 100k tunnels: within 5% of the shares.
        let p = Weighted::configure(Params::default()).unwrap();
        let placed = place_with(p, &[1; 64], 100_000);
        let most = *counts(&placed, 64).iter().max().unwrap();
        assert!(most as f64 / (100_000.0 / 64.0) <= 1.05, "{most}");
    }

    #[test]
    fn twelve_tunnels_at_two_one_one_are_six_three_three() {
        // What the lab asks for. Pure rendezvous gave these keys 4/3/5.
        assert_eq!(counts(&place(&[2, 1, 1], 12), 3), vec![6, 3, 3]);
        // And at every step on the way no gateway is over ⌈share·n⌉.
        let placed = place(&[2, 1, 1], 1000);
        for n in 1..=placed.len() {
            for (g, c) in counts(&placed[..n], 3).into_iter().enumerate() {
                let w = [2, 1, 1][g];
                assert!(c * 4 <= n * w + 3, "{c} on gateway {} after {n}", g + 1);
            }
        }
    }

    #[test]
    fn one_to_ten_means_one_to_ten() {
        assert_eq!(counts(&place(&[1, 10], 110_000), 2), vec![10_000, 100_000]);
        // Without the bound, the preference alone gets there on average.
        let s = shares(&place_with(with_factor(0), &[1, 10], 110_000), 2);
        let ratio = s[1] / s[0];
        assert!((9.6..10.4).contains(&ratio), "ratio {ratio}");
    }

    #[test]
    fn two_one_one_one() {
        assert_eq!(
            counts(&place(&[2, 1, 1, 1], 100_000), 4),
            vec![40_000, 20_000, 20_000, 20_000]
        );
    }

    #[test]
    fn most_keys_get_their_first_choice() {
        // The bound only redirects keys whose first choice is full; a looser
        // bound redirects fewer.
        let first = |factor: u32| {
            let placed = place_with(with_factor(factor), &[1, 1, 1, 1], 40_000);
            let pure = place_with(with_factor(0), &[1, 1, 1, 1], 40_000);
            placed.iter().zip(&pure).filter(|(a, b)| a == b).count() as f64 / 40_000.0
        };
        // Measured: 62% at 100% (exact shares leave no slack, so spills
        // cascade), 99.8% at 105%.
        let (exact, loose) = (first(100), first(105));
        assert!(exact > 0.55, "{exact} on their first choice at 100%");
        assert!(loose > 0.99, "{loose} on their first choice at 105%");
    }

    #[test]
    fn a_failure_spreads_the_orphans_by_weight() {
        // As the host does it: place, push the set with the counts when a
        // gateway goes down, then place that gateway's tunnels again.
        let weights = [2, 1, 1, 1];
        let mut p = with_factor(100);
        let mut gateways = set(&weights);
        p.set_gateways(&gateways);
        let mut placed: Vec<u32> = (0..10_000)
            .map(|i| p.choose(&key(i), &Empty).unwrap())
            .collect();
        let held = counts(&placed, 4);
        for (g, c) in gateways.iter_mut().zip(&held) {
            g.tunnels = *c as u64;
        }
        gateways[2].healthy = false;
        p.set_gateways(&gateways);
        for (i, at) in placed.iter_mut().enumerate() {
            if *at == 3 {
                *at = p.choose(&key(i as u32), &Empty).unwrap();
            }
        }
        // 2:1:1 over the survivors, exactly.
        assert_eq!(counts(&placed, 4), vec![5000, 2500, 0, 2500]);
    }

    #[test]
    fn a_spilled_key_takes_its_best_choice_with_room() {
        // Two gateways, the second full: every key lands on the first,
        // whatever its preference; then the bound lets it go back.
        let mut gateways = set(&[1, 1]);
        gateways[1].tunnels = 10;
        let mut p = with_factor(100);
        p.set_gateways(&gateways);
        let placed: Vec<u32> = (0..20)
            .map(|i| p.choose(&key(i), &Empty).unwrap())
            .collect();
        assert!(placed[..10].iter().all(|&g| g == 1), "{placed:?}");
        assert_eq!(counts(&placed, 2), vec![15, 5]);
    }

    #[test]
    fn the_table_agrees_with_rendezvous_in_shares() {
        // The table's slots are rendezvous answers, so its slot shares are
        // the weights up to sampling error.
        let mut p = with_factor(100);
        p.set_gateways(&set(&[3, 1]));
        let heavy = p.table.iter().filter(|&&g| g == 1).count() as f64 / p.table.len() as f64;
        assert!((heavy - 0.75).abs() < 0.006, "slot share {heavy}");
    }

    #[test]
    fn weight_change_moves_first_choices_only_to_or_from_that_gateway() {
        let before = place_with(with_factor(0), &[1, 1, 1, 1], 40_000);
        let after = place_with(with_factor(0), &[1, 1, 1, 3], 40_000);
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
        let mut p = with_factor(100);
        p.set_gateways(&set(&[0, 0]));
        assert_eq!(p.choose(&key(1), &Empty), None);
        assert_eq!(Rendezvous::new(&set(&[0, 0])).winner(1), None);
    }

    #[test]
    fn parameters_are_validated() {
        let params = Params::new(vec![("table-size".into(), "1000".into())]);
        assert!(Weighted::configure(params).unwrap_err().contains("prime"));
        let params = Params::new(vec![("balance-factor".into(), "80".into())]);
        let err = Weighted::configure(params).unwrap_err();
        assert!(
            err.contains("balance-factor") && err.contains("80"),
            "{err}"
        );
    }
}
