//! Pieces of fragmented packets from initiators.
//!
//! Only a packet's first fragment carries the UDP ports and SPIs that find
//! its tunnel; a later fragment has its source, destination and IP ID, no
//! more. A segw cannot reassemble a packet whose pieces went to two segws,
//! so every piece must follow the first:
//!
//! - the first fragment is steered like a whole packet, always on its own
//!   merits (two peers behind one NAT may reuse an IP ID within the
//!   window), and where it went is *decided* for its (source, destination,
//!   protocol, ID), for the pieces after it;
//! - a later fragment that arrives before its first fragment is *held* here
//!   until the first fragment comes, then they leave together.
//!
//! The address alone cannot stand in for the first fragment: behind a NAT
//! one address holds tunnels on several segws, and a new tunnel from a
//! known address (a fragmented IKE_SA_INIT) may go elsewhere.
//!
//! Bounds, stated: at most [`DECIDED`] decisions, each kept
//! [`Timeouts::fragment`](super::affinity::Timeouts); a new one past that
//! evicts the oldest (counted), so a flood of first fragments costs the
//! flood's own decisions and never stops new ones. Held: at most
//! [`HOLD_PACKETS`] packets, [`HOLD_FRAMES_PER_PACKET`] pieces each and
//! [`HOLD_BYTES`] in all, each for `Timeouts::fragment_hold`; then they are
//! dropped (counted): a first fragment that late is lost, and no segw could
//! reassemble the packet without it. A later fragment that finds no room is
//! handed back, the caller's to place or drop.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Duration;

use super::gateways::GwId;
use crate::packet::{Fragment, IpPacket};
use crate::time::Timestamp;

/// What every piece of one packet shares: source, destination, protocol
/// and IP ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    id: u32,
}

impl FragmentKey {
    pub fn of(ip: &IpPacket, piece: Fragment) -> Self {
        FragmentKey {
            src: ip.src,
            dst: ip.dst,
            protocol: piece.protocol,
            id: piece.id,
        }
    }
}

/// Decisions kept at once; a new one past this evicts the oldest. At ~200
/// bytes a first fragment, 64 Ki decisions within the 5 s they are kept is
/// ~20 Mbit/s of nothing but first fragments.
pub const DECIDED: usize = 65_536;
/// Packets with held pieces at once.
pub const HOLD_PACKETS: usize = 256;
/// Held pieces per packet: an IKE message or an ESP packet past the MTU is
/// 2–4 pieces; a 64 KiB datagram would be 45+, and is not what a tunnel sends.
pub const HOLD_FRAMES_PER_PACKET: usize = 16;
/// Bytes of held frames in all (their allocations, not their IP lengths).
pub const HOLD_BYTES: usize = 1 << 20;

/// Seeded per map: the keys are whatever a sender puts in its headers.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Later fragments waiting for their first.
#[derive(Debug)]
pub struct Held {
    /// The frames, as they arrived (MACs not yet rewritten).
    pub frames: Vec<Vec<u8>>,
    /// Their IP lengths, summed: for the byte counters.
    pub ip_bytes: u64,
    since: Timestamp,
}

#[derive(Debug, Default)]
pub struct Fragments {
    decided: HashMap<FragmentKey, (GwId, Timestamp)>,
    /// Decisions in the order they were made, oldest first, each with its
    /// time: what a full map evicts and what the sweep expires, one at the
    /// front at a time. A key decided again is here twice; the older entry
    /// is stale (its time is not the map's) and is skipped.
    order: VecDeque<(FragmentKey, Timestamp)>,
    /// Decisions evicted to make room for newer ones.
    pub evicted: u64,
    held: HashMap<FragmentKey, Held>,
    held_frames: usize,
    held_bytes: usize,
    /// No held packet is older: with a flood filling the hold, looking for
    /// stale ones is one comparison, not a pass over them all.
    oldest: Option<Timestamp>,
}

impl Fragments {
    /// Where the packet's first fragment went, if it came.
    pub fn decided(&self, key: &FragmentKey) -> Option<GwId> {
        self.decided.get(key).map(|&(gw, _)| gw)
    }

    pub fn decide(&mut self, key: FragmentKey, gw: GwId, now: Timestamp) {
        if self.decided.insert(key, (gw, now)).is_none() && self.decided.len() > DECIDED {
            self.pop_oldest();
            self.evicted += 1;
        }
        self.order.push_back((key, now));
        if self.order.len() > 2 * DECIDED {
            // Keys decided again left stale entries: drop them all, once
            // per DECIDED decisions at most.
            let decided = &self.decided;
            self.order
                .retain(|(k, at)| decided.get(k).is_some_and(|&(_, t)| t == *at));
        }
    }

    /// Forget the oldest decision still in force.
    fn pop_oldest(&mut self) {
        while let Some((key, at)) = self.order.pop_front() {
            if self.decided.get(&key).is_some_and(|&(_, t)| t == at) {
                self.decided.remove(&key);
                return;
            }
        }
    }

    /// Decisions kept now.
    pub fn decisions(&self) -> usize {
        self.decided.len()
    }

    /// Keep `frame` until its first fragment comes; the frame back when
    /// that would pass a bound.
    pub fn hold(
        &mut self,
        key: FragmentKey,
        mut frame: Vec<u8>,
        ip_len: usize,
        now: Timestamp,
    ) -> Result<(), Vec<u8>> {
        frame.shrink_to_fit();
        let bytes = frame.capacity();
        let room = match self.held.get(&key) {
            Some(h) => h.frames.len() < HOLD_FRAMES_PER_PACKET,
            None => self.held.len() < HOLD_PACKETS,
        };
        if !room || self.held_bytes + bytes > HOLD_BYTES {
            return Err(frame);
        }
        self.held_frames += 1;
        self.held_bytes += bytes;
        self.oldest = Some(self.oldest.map_or(now, |t| t.min(now)));
        let held = self.held.entry(key).or_insert_with(|| Held {
            frames: Vec::with_capacity(2),
            ip_bytes: 0,
            since: now,
        });
        held.frames.push(frame);
        held.ip_bytes += ip_len as u64;
        Ok(())
    }

    /// What waits for `key`, taken out.
    pub fn take(&mut self, key: &FragmentKey) -> Option<Held> {
        if self.held.is_empty() {
            return None;
        }
        let held = self.held.remove(key)?;
        self.forget(&held);
        Some(held)
    }

    /// Drop what has waited longer than `hold`, and decisions older than
    /// `ttl`. Returns the number of held frames dropped.
    pub fn expire(&mut self, now: Timestamp, hold: Duration, ttl: Duration) -> usize {
        while let Some(&(key, at)) = self.order.front() {
            if now.since(at) < ttl {
                break;
            }
            self.order.pop_front();
            if self.decided.get(&key).is_some_and(|&(_, t)| t == at) {
                self.decided.remove(&key);
            }
        }
        self.expire_held(now, hold)
    }

    /// Drop what has waited longer than `hold`; the number of frames.
    pub fn expire_held(&mut self, now: Timestamp, hold: Duration) -> usize {
        if self.oldest.is_none_or(|t| now.since(t) <= hold) {
            return 0;
        }
        let (mut frames, mut bytes, mut oldest) = (0, 0, None::<Timestamp>);
        self.held.retain(|_, h| {
            let waiting = now.since(h.since) <= hold;
            if waiting {
                oldest = Some(oldest.map_or(h.since, |t| t.min(h.since)));
            } else {
                frames += h.frames.len();
                bytes += h.frames.iter().map(Vec::capacity).sum::<usize>();
            }
            waiting
        });
        self.oldest = oldest;
        self.held_frames -= frames;
        self.held_bytes -= bytes;
        frames
    }

    fn forget(&mut self, held: &Held) {
        self.held_frames -= held.frames.len();
        self.held_bytes -= held.frames.iter().map(Vec::capacity).sum::<usize>();
    }

    /// (packets, frames, bytes) held now.
    pub fn held(&self) -> (usize, usize, usize) {
        (self.held.len(), self.held_frames, self.held_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn key(id: u32) -> FragmentKey {
        FragmentKey {
            src: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
            dst: IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1)),
            protocol: 17,
            id,
        }
    }

    #[test]
    fn a_full_map_of_decisions_evicts_the_oldest_and_keeps_the_newest() {
        let mut f = Fragments::default();
        let t = |ms| Timestamp::ZERO + Duration::from_millis(ms);
        for id in 0..DECIDED as u32 {
            f.decide(key(id), 1, t(0));
        }
        // Decided again, later: no longer the oldest.
        f.decide(key(0), 2, t(1));
        f.decide(key(u32::MAX), 3, t(2));
        assert_eq!((f.decisions(), f.evicted), (DECIDED, 1));
        assert_eq!(f.decided(&key(0)), Some(2));
        assert_eq!(f.decided(&key(1)), None, "the oldest went");
        assert_eq!(f.decided(&key(u32::MAX)), Some(3));
        // Far more decisions than room, the bookkeeping stays bounded.
        for id in 0..5 * DECIDED as u32 {
            f.decide(key(id % 1000), 1, t(3 + u64::from(id)));
        }
        assert!(f.order.len() <= 2 * DECIDED + 1);
        // Expiry goes by the time of the latest decision of each key.
        let last = t(3 + 5 * DECIDED as u64 - 1);
        f.expire(last, Duration::ZERO, Duration::from_millis(500));
        assert_eq!(f.decisions(), 500);
    }

    #[test]
    fn every_bound_of_the_hold_hands_the_frame_back() {
        let now = Timestamp::ZERO;
        let mut f = Fragments::default();
        // Pieces per packet.
        for _ in 0..HOLD_FRAMES_PER_PACKET {
            f.hold(key(1), vec![0; 100], 100, now).unwrap();
        }
        assert_eq!(f.hold(key(1), vec![7; 100], 100, now), Err(vec![7; 100]));
        // Bytes in all: 64 KiB frames, one packet each.
        let mut f = Fragments::default();
        let big = 64 << 10;
        for id in 0..(HOLD_BYTES / big) as u32 {
            f.hold(key(id), vec![0; big], big, now).unwrap();
        }
        assert!(f.hold(key(999), vec![0; big], big, now).is_err());
        assert_eq!(f.held(), (HOLD_BYTES / big, HOLD_BYTES / big, HOLD_BYTES));
        // Packets.
        let mut f = Fragments::default();
        for id in 0..HOLD_PACKETS as u32 {
            f.hold(key(id), vec![0; 60], 46, now).unwrap();
        }
        assert!(f.hold(key(u32::MAX), vec![0; 60], 46, now).is_err());
        // Taking a packet out frees its room; its IP bytes add up.
        let held = f.take(&key(3)).unwrap();
        assert_eq!((held.frames.len(), held.ip_bytes), (1, 46));
        assert!(f.hold(key(u32::MAX), vec![0; 60], 46, now).is_ok());
        // Stale ones go, counted in frames; fresh ones stay.
        let later = now + Duration::from_millis(1500);
        f.hold(key(u32::MAX - 1), vec![0; 60], 46, later)
            .unwrap_err();
        assert_eq!(f.expire_held(later, Duration::from_secs(1)), HOLD_PACKETS);
        assert_eq!(f.held(), (0, 0, 0));
    }
}
