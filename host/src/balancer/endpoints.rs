//! The affinity table's busiest index: outer (address, UDP port) → tunnel.
//!
//! Every ESP-in-UDP frame and every IKE message is looked up here, so at a
//! million tunnels this index decides how fast the core runs: its lookups
//! miss the cache, and the misses are the time. A general hash map
//! (hashbrown) reads a control byte, then its bucket: two misses per
//! lookup. This table keeps the key and the tunnel id together in one
//! 24-byte slot and probes linearly from the slot the hash names, so a
//! lookup is one miss (two when the run crosses a cache line), and
//! [`prefetch`](EndpointIndex::prefetch) can start that miss early for a
//! caller that knows its next frames.
//!
//! Open addressing with linear probing, at most 3/4 full (it doubles
//! before), deletion by shifting the rest of the run back (no tombstones:
//! a long-lived table under churn keeps short runs). The hash is seeded per
//! table, so spoofed sources cannot be chosen to pile into one run.

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;

use super::affinity::{AddrKey, TunnelId};

/// An outer endpoint: address and UDP port (0 for raw ESP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct EndpointKey {
    pub addr: AddrKey,
    pub port: u16,
}

impl EndpointKey {
    pub fn new(addr: IpAddr, port: u16) -> Self {
        EndpointKey {
            addr: AddrKey::from(addr),
            port,
        }
    }
}

/// (address, port), hashed as one word: the port goes into bits that are
/// zero in an IPv4-mapped address (for IPv6 a rare collision of hashes,
/// never a false match: equality compares both fields).
impl Hash for EndpointKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u128(self.addr.word() ^ (u128::from(self.port) << 112));
    }
}

/// One slot: 24 bytes, no padding to speak of.
#[derive(Debug, Clone, Copy)]
struct Slot {
    key: EndpointKey,
    /// [`EMPTY`] for a free slot.
    id: TunnelId,
}

/// No tunnel has this id (the table's capacity stays below it).
const EMPTY: TunnelId = TunnelId::MAX;

const FREE: Slot = Slot {
    key: EndpointKey {
        addr: AddrKey::ZERO,
        port: 0,
    },
    id: EMPTY,
};

/// Slots in a new table; grows by doubling.
const MIN_SLOTS: usize = 16;

#[derive(Debug, Clone)]
pub(super) struct EndpointIndex {
    slots: Box<[Slot]>,
    /// `slots.len() - 1`: the length is a power of two.
    mask: usize,
    len: usize,
    hasher: foldhash::fast::RandomState,
}

impl Default for EndpointIndex {
    fn default() -> Self {
        EndpointIndex {
            slots: vec![FREE; MIN_SLOTS].into_boxed_slice(),
            mask: MIN_SLOTS - 1,
            len: 0,
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl EndpointIndex {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    fn home(&self, key: &EndpointKey) -> usize {
        self.hasher.hash_one(key) as usize & self.mask
    }

    /// Where `key` is, or the free slot that ends its run.
    fn find(&self, key: &EndpointKey) -> (usize, bool) {
        let mut i = self.home(key);
        loop {
            let slot = &self.slots[i];
            if slot.id == EMPTY {
                return (i, false);
            }
            if slot.key == *key {
                return (i, true);
            }
            i = (i + 1) & self.mask;
        }
    }

    pub fn get(&self, key: &EndpointKey) -> Option<TunnelId> {
        match self.find(key) {
            (i, true) => Some(self.slots[i].id),
            _ => None,
        }
    }

    /// Point `key` at `id`, replacing what it pointed at.
    pub fn insert(&mut self, key: EndpointKey, id: TunnelId) {
        self.put(key, id, true);
    }

    /// Point `key` at `id` unless it already points somewhere.
    pub fn insert_if_absent(&mut self, key: EndpointKey, id: TunnelId) {
        self.put(key, id, false);
    }

    fn put(&mut self, key: EndpointKey, id: TunnelId, replace: bool) {
        debug_assert_ne!(id, EMPTY, "tunnel ids stay below the empty mark");
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        match self.find(&key) {
            (i, true) => {
                if replace {
                    self.slots[i].id = id;
                }
            }
            (i, false) => {
                self.slots[i] = Slot { key, id };
                self.len += 1;
            }
        }
    }

    /// Forget `key` if it points at `id` (and leave it if another tunnel
    /// has taken it since).
    pub fn remove_if(&mut self, key: &EndpointKey, id: TunnelId) {
        let (mut hole, found) = self.find(key);
        if !found || self.slots[hole].id != id {
            return;
        }
        self.len -= 1;
        // Shift back every later slot of the run that may sit in the hole:
        // one whose home is not cyclically in (hole, j].
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            if self.slots[j].id == EMPTY {
                break;
            }
            let home = self.home(&self.slots[j].key);
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.slots[hole] = FREE;
    }

    fn grow(&mut self) {
        self.grow_to(self.slots.len() * 2);
    }

    /// Room for `keys` keys without growing: growing rehashes every key,
    /// tens of milliseconds at a million, in one go.
    pub fn reserve(&mut self, keys: usize) {
        let slots = (keys.saturating_mul(4) / 3 + 1).next_power_of_two();
        if slots > self.slots.len() {
            self.grow_to(slots);
        }
    }

    fn grow_to(&mut self, slots: usize) {
        let bigger = vec![FREE; slots].into_boxed_slice();
        let old = std::mem::replace(&mut self.slots, bigger);
        self.mask = self.slots.len() - 1;
        for slot in old.iter().filter(|s| s.id != EMPTY) {
            let (i, _) = self.find(&slot.key);
            self.slots[i] = *slot;
        }
    }

    /// Start loading the slot `key` hashes to, for a lookup soon after: a
    /// hint, with no effect on what the table holds.
    pub fn prefetch(&self, key: &EndpointKey) {
        let slot: *const Slot = &self.slots[self.home(key)];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch reads nothing the program sees and cannot
        // fault; the pointer is to a live slot anyway.
        #[allow(unused_unsafe)]
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(slot.cast());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = slot;
    }

    /// Bytes per key when the table is at its fullest (3/4).
    pub const fn bytes_per_key() -> usize {
        std::mem::size_of::<Slot>() * 4 / 3
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    use super::*;
    use crate::workload::Rng;

    fn key(n: u32, port: u16) -> EndpointKey {
        EndpointKey::new(IpAddr::V4(Ipv4Addr::from(n)), port)
    }

    #[test]
    fn a_slot_is_24_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 24);
    }

    /// Random inserts, conditional inserts and removes over a small key
    /// space (long runs, wrap-around at the end of the slots, growth) agree
    /// with a std HashMap doing the same.
    #[test]
    fn agrees_with_a_hash_map_under_churn() {
        let mut rng = Rng::new(7);
        let mut index = EndpointIndex::default();
        let mut model: HashMap<(u32, u16), TunnelId> = HashMap::new();
        for step in 0..200_000u32 {
            let (n, port) = (
                rng.below(3000) as u32,
                [500, 4500, 0][rng.below(3) as usize],
            );
            let k = key(n, port);
            let id = rng.below(50) as TunnelId;
            match rng.below(4) {
                0 => {
                    index.insert(k, id);
                    model.insert((n, port), id);
                }
                1 => {
                    index.insert_if_absent(k, id);
                    model.entry((n, port)).or_insert(id);
                }
                _ => {
                    index.remove_if(&k, id);
                    if model.get(&(n, port)) == Some(&id) {
                        model.remove(&(n, port));
                    }
                }
            }
            assert_eq!(index.get(&k), model.get(&(n, port)).copied(), "step {step}");
            assert_eq!(index.len(), model.len(), "step {step}");
        }
        for n in 0..3000 {
            for port in [500, 4500, 0] {
                assert_eq!(index.get(&key(n, port)), model.get(&(n, port)).copied());
            }
        }
    }

    #[test]
    fn a_removed_key_leaves_the_rest_of_its_run_findable() {
        let mut index = EndpointIndex::default();
        // Many keys in a small table: runs are long and cross the end.
        for n in 0..11 {
            index.insert(key(n, 4500), n);
        }
        for gone in 0..11 {
            let mut copy = index.clone();
            copy.remove_if(&key(gone, 4500), gone);
            for n in 0..11 {
                let want = (n != gone).then_some(n);
                assert_eq!(copy.get(&key(n, 4500)), want, "after removing {gone}");
            }
        }
    }

    #[test]
    fn remove_if_leaves_a_key_another_tunnel_took() {
        let mut index = EndpointIndex::default();
        index.insert(key(1, 500), 1);
        index.insert(key(1, 500), 2);
        index.remove_if(&key(1, 500), 1);
        assert_eq!(index.get(&key(1, 500)), Some(2));
        index.insert_if_absent(key(1, 500), 3);
        assert_eq!(index.get(&key(1, 500)), Some(2));
    }
}
