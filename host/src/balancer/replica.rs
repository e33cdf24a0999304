//! The tunnel table as a pair of balancers shares it: what the active
//! streams to its standby, and how the standby applies it (the stream
//! itself, its order, authentication and bounds are `crate::pair`'s).
//!
//! The unit is a slot of the active's table. A [`Delta::Tunnel`] says
//! "slot N holds this tunnel now" (placed, answered, confirmed, re-keyed,
//! moved, re-bound to a new endpoint, a next hop learned), a
//! [`Delta::Gone`] "slot N is empty now" (expired, evicted, closed).
//! Both are idempotent, so a snapshot taken a slice at a time while the
//! table changes, followed by the changes made since it began, leaves the
//! standby with the active's table: a slot read twice is simply read in
//! its newer state.
//!
//! What a delta carries is the state file's record of a tunnel
//! ([`SavedTunnel`]): the standby holds what a warm restart would, kept
//! current. Not replicated: frame and byte counts after the record was
//! made, idle times (a standby never expires a tunnel; the active's
//! expiries come as `Gone`, and at takeover every tunnel's idle timer
//! starts afresh), graceful moves under way, and held fragments.
//!
//! Pure: the active's changes in, deltas out; deltas in, the standby's
//! table changed. Sockets, threads and the clock are the caller's.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::affinity::{Change, Overflowed, TunnelId};
use super::saved::{saved, tunnel, SavedTunnel};
use super::Balancer;
use crate::control::config::{format_mac, parse_mac};
use crate::policy::Policy;
use crate::time::Timestamp;

/// One change of the active's table, as its standby applies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "delta", rename_all = "kebab-case")]
pub enum Delta {
    /// Slot `slot` of the active's table holds this tunnel now.
    Tunnel { slot: u32, tunnel: SavedTunnel },
    /// Slot `slot` of the active's table is empty now.
    Gone { slot: u32 },
    /// The segws' MACs by name and the uplink's default next hop, as the
    /// active knows them: the standby never probes, and without them its
    /// first frames after a takeover would wait for a probe round.
    Neighbours {
        gateways: Vec<(String, String)>,
        next_hop: Option<String>,
    },
}

/// The active's side of a replica: what it last said of the neighbours,
/// and as of which gateway epoch and default next hop (the neighbours are
/// looked at again only when one of those moved).
#[derive(Debug, Default)]
pub struct Source {
    neighbours: Option<Delta>,
    as_of: Option<(u64, Option<crate::packet::Mac>)>,
}

/// The standby's side: which of its tunnels stands for which slot of the
/// active's table, and what applying deltas did.
#[derive(Debug, Default)]
pub struct Replica {
    by_slot: HashMap<u32, TunnelId>,
    slot_of: HashMap<TunnelId, u32>,
    pub counters: ReplicaCounters,
}

/// What applying deltas did, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaCounters {
    pub applied: u64,
    /// A replicated tunnel whose SPI or endpoint one of ours still had
    /// (ours was older: the active's word wins, ours went).
    pub conflicts: u64,
    /// On a segw this balancer does not have: the two configs differ.
    pub unknown_gateway: u64,
    /// A record this build cannot read.
    pub invalid: u64,
    /// Past this balancer's table size.
    pub table_full: u64,
}

impl Replica {
    /// How many of the active's slots this replica holds.
    pub fn len(&self) -> usize {
        self.by_slot.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_slot.is_empty()
    }
}

impl<P: Policy> Balancer<P> {
    /// Drop every frame and answer nothing (`true`, the standby of a pair),
    /// or carry traffic (`false`). The table stays as it is.
    pub fn set_standby(&mut self, standby: bool) {
        if self.standby != standby {
            // The fast path carries what the core would: nothing, or all.
            self.fast_path_changed();
        }
        self.standby = standby;
    }

    pub fn is_standby(&self) -> bool {
        self.standby
    }

    /// Log the table's changes for a standby from now on (`false`: stop).
    pub fn replicate(&mut self, on: bool) {
        self.table.log_changes(on);
    }

    /// The table's changes since the last call, as deltas in the order
    /// they happened, into `out`; and the neighbours if they changed. A
    /// slot touched several times is sent once, in its state now, at its
    /// last change (after the `Gone` of the tunnel it held before, if it
    /// was reused). `Err`: the change log overflowed; the standby must be
    /// sent the whole table again.
    pub fn replica_deltas(
        &mut self,
        source: &mut Source,
        now: Timestamp,
        out: &mut Vec<Delta>,
    ) -> Result<(), Overflowed> {
        let changes = self.table.take_changes()?;
        let mut later = HashSet::with_capacity(changes.len());
        let mut last = vec![false; changes.len()];
        for (i, c) in changes.iter().enumerate().rev() {
            if let Change::Touched(id) = *c {
                last[i] = later.insert(id);
            }
        }
        for (c, last) in changes.into_iter().zip(last) {
            match c {
                Change::Removed(slot) => out.push(Delta::Gone { slot }),
                Change::Touched(slot) if last => out.extend(self.slot_delta(slot, now)),
                Change::Touched(_) => {}
            }
        }
        // A segw's MAC moves the epoch; the next hop is looked at itself.
        let as_of = Some((self.epoch, self.default_next_hop));
        if source.as_of != as_of {
            source.as_of = as_of;
            let neighbours = self.neighbours_delta();
            if source.neighbours.as_ref() != Some(&neighbours) {
                source.neighbours = Some(neighbours.clone());
                out.push(neighbours);
            }
        }
        Ok(())
    }

    /// The table from slot `from`, at most `budget` slots of it, as deltas
    /// (the neighbours first, with the first slice), and where to go on
    /// (`None`: every slot was read). A snapshot is taken a slice per turn
    /// while the table changes: start the change log first (see
    /// [`replicate`](Self::replicate)) and send its deltas after it.
    pub fn snapshot_slice(
        &mut self,
        source: &mut Source,
        from: usize,
        budget: usize,
        now: Timestamp,
        out: &mut Vec<Delta>,
    ) -> Option<usize> {
        if from == 0 {
            let neighbours = self.neighbours_delta();
            source.as_of = Some((self.epoch, self.default_next_hop));
            source.neighbours = Some(neighbours.clone());
            out.push(neighbours);
        }
        let table = self.table();
        let end = table.slots().min(from.saturating_add(budget));
        for (slot, _) in table.slots_in(from..end) {
            out.extend(self.slot_delta(slot, now));
        }
        (end < table.slots()).then_some(end)
    }

    fn slot_delta(&self, slot: TunnelId, now: Timestamp) -> Option<Delta> {
        let t = self.table.get(slot)?;
        let gw = self.gateways.get(t.gateway)?;
        Some(Delta::Tunnel {
            slot,
            tunnel: saved(t, &gw.spec.name, now),
        })
    }

    fn neighbours_delta(&self) -> Delta {
        Delta::Neighbours {
            gateways: self
                .gateways
                .iter()
                .filter(|g| g.spec.mac.is_none())
                .filter_map(|g| Some((g.spec.name.clone(), format_mac(&g.mac?))))
                .collect(),
            next_hop: self.default_next_hop.as_ref().map(format_mac),
        }
    }

    /// Apply one of the active's deltas to this (the standby's) table.
    pub fn apply(&mut self, replica: &mut Replica, delta: Delta, now: Timestamp) {
        replica.counters.applied += 1;
        match delta {
            Delta::Gone { slot } => self.unreplicate(replica, slot),
            Delta::Tunnel { slot, tunnel: s } => {
                self.unreplicate(replica, slot);
                let Some(gw) = self.gateways.by_name(&s.gateway).map(|g| g.id) else {
                    replica.counters.unknown_gateway += 1;
                    return;
                };
                // A standby never expires a tunnel: its idle time starts now.
                let Some(mut t) = tunnel(&s, gw, now) else {
                    replica.counters.invalid += 1;
                    return;
                };
                t.last_seen = now;
                // A tunnel of ours where this one is: the active dropped
                // it, and its `Gone` is still to come (or was lost with a
                // connection). The active's word wins.
                let stale = [
                    t.ike_spi.and_then(|spi| self.table.by_spi(spi)),
                    self.table.by_endpoint(t.peer, t.peer_port),
                ];
                for id in stale.into_iter().flatten() {
                    replica.counters.conflicts += 1;
                    self.forget_replicated(replica, id);
                }
                match self.insert(t) {
                    Ok(id) => {
                        // The slot was ours for another slot's tunnel,
                        // evicted to make room.
                        if let Some(old) = replica.slot_of.insert(id, slot) {
                            replica.by_slot.remove(&old);
                        }
                        replica.by_slot.insert(slot, id);
                    }
                    Err(_) => replica.counters.table_full += 1,
                }
            }
            Delta::Neighbours { gateways, next_hop } => {
                for (name, mac) in gateways {
                    let Some(mac) = parse_mac(&mac) else {
                        replica.counters.invalid += 1;
                        continue;
                    };
                    if let Ok(g) = self.gateways.by_name_mut(&name) {
                        if g.spec.mac.is_none() && g.mac != Some(mac) {
                            g.mac = Some(mac);
                            self.epoch += 1;
                        }
                    }
                }
                if !self.next_hop_configured() {
                    if let Some(mac) = next_hop.as_deref().and_then(parse_mac) {
                        self.set_default_next_hop(Some(mac));
                    }
                }
            }
        }
    }

    /// The tunnel standing for the active's `slot`, gone.
    fn unreplicate(&mut self, replica: &mut Replica, slot: u32) {
        if let Some(id) = replica.by_slot.remove(&slot) {
            replica.slot_of.remove(&id);
            if let Some(gone) = self.table.remove(id) {
                self.forget(&gone);
            }
        }
    }

    fn forget_replicated(&mut self, replica: &mut Replica, id: TunnelId) {
        match replica.slot_of.get(&id) {
            Some(&slot) => self.unreplicate(replica, slot),
            None => {
                if let Some(gone) = self.table.remove(id) {
                    self.forget(&gone);
                }
            }
        }
    }

    /// Empty the table, to take a whole new copy of the active's (a
    /// standby that reconnects, or whose stream overflowed).
    pub fn clear_replica(&mut self, replica: &mut Replica) {
        for id in self.table.ids() {
            if let Some(gone) = self.table.remove(id) {
                self.forget(&gone);
            }
        }
        replica.by_slot.clear();
        replica.slot_of.clear();
    }

    /// This standby becomes the active: it carries traffic from now on,
    /// and every tunnel's idle timer starts now (a standby's idle times
    /// say when the active last changed a tunnel, not when it last carried
    /// traffic). The replica's bookkeeping is dropped.
    pub fn take_over(&mut self, replica: &mut Replica, now: Timestamp) {
        self.set_standby(false);
        for id in self.table.ids() {
            if let Some(t) = self.table.get_mut(id) {
                t.last_seen = t.last_seen.max(now);
            }
        }
        replica.by_slot.clear();
        replica.slot_of.clear();
    }
}
