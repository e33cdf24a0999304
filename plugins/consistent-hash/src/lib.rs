//! Consistent hashing with a Maglev lookup table (Eisenbud et al., NSDI '16).
//!
//! Every gateway that takes new tunnels fills slots of a table of prime size
//! M, each in its own pseudo-random order (offset and skip from its *name*,
//! so the table survives restarts that renumber ids), taking turns until the
//! table is full. A tunnel goes to `table[hash(address, port) % M]`.
//!
//! - Spread: each gateway owns ⌊M/N⌋ or ⌈M/N⌉ slots; with M > 100·N the
//!   shares differ by under 1%.
//! - Disruption: when a gateway leaves, its slots are refilled by the others
//!   and few other slots change, so close to 1/N of tunnels move; one joining
//!   takes close to 1/(N+1).
//! - Cost: the table is rebuilt once per set change, O(M log M); a decision
//!   is one hash and one load.
//!
//! Parameter: `table-size` (prime, default 65537). When the set grows past
//! M/100 gateways the policy switches to the next prime above 100·N and says
//! so in the log, rather than silently spreading worse.

use segwlb_policy_sdk::{export_policy, hash, table, Balance, Gateway, Load, Params, TunnelKey};

#[derive(Debug)]
pub struct ConsistentHash {
    configured_size: u32,
    /// Gateway id per slot; empty when no gateway takes tunnels.
    table: Vec<u32>,
}

impl ConsistentHash {
    pub fn with_table_size(size: u32) -> Result<Self, String> {
        Ok(ConsistentHash {
            configured_size: table::validate(size)?,
            table: Vec::new(),
        })
    }

    /// The table size in use (the configured one unless the set outgrew it).
    pub fn table_size(&self) -> usize {
        self.table.len()
    }
}

impl Balance for ConsistentHash {
    fn configure(mut params: Params) -> Result<Self, String> {
        let size = params.get("table-size")?.unwrap_or(table::DEFAULT_SIZE);
        params.finish(&["table-size"])?;
        Self::with_table_size(size)
    }

    fn set_gateways(&mut self, gateways: &[Gateway]) {
        let mut members: Vec<&Gateway> =
            gateways.iter().filter(|g| g.takes_new_tunnels()).collect();
        // The fill order decides ties between gateways: make it depend on
        // names only, never on the host's ordering of the set.
        members.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        let size = table::size_for(self.configured_size, members.len());
        self.table = maglev_table(&members, size);
    }

    fn choose(&mut self, key: &TunnelKey, _load: &dyn Load) -> Option<u32> {
        if self.table.is_empty() {
            return None;
        }
        let slot = key.endpoint_hash() % self.table.len() as u64;
        Some(self.table[slot as usize])
    }
}

export_policy!(ConsistentHash);

/// Maglev population: gateways take turns claiming their next preferred free
/// slot until all `m` slots are claimed.
fn maglev_table(members: &[&Gateway], m: usize) -> Vec<u32> {
    if members.is_empty() {
        return Vec::new();
    }
    const EMPTY: u32 = u32::MAX;
    let m64 = m as u64;
    let prefs: Vec<(u64, u64)> = members
        .iter()
        .map(|g| {
            let offset = hash::str_seeded(&g.name, 0xa5a5) % m64;
            let skip = hash::str_seeded(&g.name, 0x5a5a) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; members.len()];
    let mut slots = vec![EMPTY; m];
    let mut filled = 0;
    loop {
        for (i, g) in members.iter().enumerate() {
            let (offset, skip) = prefs[i];
            let mut slot = ((offset + next[i] * skip) % m64) as usize;
            while slots[slot] != EMPTY {
                next[i] += 1;
                slot = ((offset + next[i] * skip) % m64) as usize;
            }
            slots[slot] = g.id;
            next[i] += 1;
            filled += 1;
            if filled == m {
                return slots;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use segwlb_policy_sdk::Empty;
    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv4Addr};

    fn gws(n: u32) -> Vec<Gateway> {
        (1..=n)
            .map(|id| Gateway::new(id, format!("segw{id}"), 1))
            .collect()
    }

    fn key(n: u32) -> TunnelKey {
        let peer = IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + n));
        TunnelKey::ike(peer, IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1)), None)
    }

    fn place(p: &mut ConsistentHash, n: u32) -> Vec<u32> {
        (0..n).map(|i| p.choose(&key(i), &Empty).unwrap()).collect()
    }

    fn policy(set: &[Gateway]) -> ConsistentHash {
        let mut p = ConsistentHash::configure(Params::default()).unwrap();
        p.set_gateways(set);
        p
    }

    #[test]
    fn spreads_evenly() {
        let mut p = policy(&gws(4));
        let mut counts = HashMap::new();
        for g in place(&mut p, 100_000) {
            *counts.entry(g).or_insert(0u32) += 1;
        }
        let max = *counts.values().max().unwrap() as f64;
        assert_eq!(counts.len(), 4);
        assert!(max / 25_000.0 <= 1.03, "max/mean {}", max / 25_000.0);
    }

    #[test]
    fn leaving_moves_about_its_own_share() {
        let set = gws(5);
        let before = place(&mut policy(&set), 50_000);
        let mut down = set.clone();
        down[2].healthy = false;
        let after = place(&mut policy(&down), 50_000);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let own = before.iter().filter(|&&g| g == 3).count();
        // Every tunnel of segw3 must move; others may move only a little.
        assert!(before.iter().zip(&after).all(|(b, a)| *b != 3 || *a != 3));
        assert!(
            moved >= own && (moved as f64) < own as f64 * 1.1,
            "moved {moved}, own {own}"
        );
    }

    #[test]
    fn joining_takes_about_one_over_n_plus_one() {
        let before = place(&mut policy(&gws(4)), 50_000);
        let after = place(&mut policy(&gws(5)), 50_000);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count() as f64 / 50_000.0;
        assert!((0.18..0.23).contains(&moved), "moved {moved}, ideal 0.20");
    }

    #[test]
    fn host_order_does_not_matter() {
        let mut reversed = gws(4);
        reversed.reverse();
        assert_eq!(
            place(&mut policy(&gws(4)), 1000),
            place(&mut policy(&reversed), 1000)
        );
    }

    /// Golden mapping: a change here moves real tunnels. Update it only on
    /// purpose, and say so in the release notes.
    #[test]
    fn golden_keys() {
        let mut p = policy(&gws(3));
        assert_eq!(place(&mut p, 12), GOLDEN_3);
    }
    const GOLDEN_3: [u32; 12] = [2, 2, 2, 2, 1, 2, 3, 3, 2, 3, 1, 3];

    #[test]
    fn table_size_is_validated_and_grows() {
        assert!(ConsistentHash::with_table_size(65_536)
            .unwrap_err()
            .contains("prime"));
        let err = ConsistentHash::configure(Params::new(vec![("table-size".into(), "x".into())]))
            .unwrap_err();
        assert!(err.contains("table-size"), "{err}");
        let mut p = ConsistentHash::with_table_size(101).unwrap();
        p.set_gateways(&gws(3));
        assert!(p.table_size() > 300 && table::is_prime(p.table_size() as u32));
    }

    #[test]
    fn no_members_no_answer() {
        let mut set = gws(2);
        set.iter_mut().for_each(|g| g.draining = true);
        assert_eq!(policy(&set).choose(&key(1), &Empty), None);
    }
}
