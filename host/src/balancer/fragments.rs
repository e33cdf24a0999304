//! Pieces of fragmented packets from initiators.
//!
//! Only a packet's first fragment carries the UDP ports and SPIs that find
//! its tunnel; a later fragment has its source, destination and IP ID, no
//! more. A segw cannot reassemble a packet whose pieces went to two segws,
//! so every piece must follow the first:
//!
//! - the first fragment is steered like a whole packet, and where it went is
//!   *decided* for its (source, destination, ID), for the pieces after it;
//! - a later fragment that arrives before its first fragment is *held* here
//!   until the first fragment comes, then they leave together.
//!
//! The address alone cannot stand in for the first fragment: behind a NAT
//! one address holds tunnels on several segws, and a new tunnel from a
//! known address (a fragmented IKE_SA_INIT) may go elsewhere.
//!
//! Bounds, stated: at most [`DECIDED`] decisions, each kept
//! [`Timeouts::fragment`](super::affinity::Timeouts). Held: at most
//! [`HOLD_PACKETS`] packets, [`HOLD_FRAMES_PER_PACKET`] pieces each and
//! [`HOLD_BYTES`] in all, each for `Timeouts::fragment_hold`; then they are
//! dropped (counted): a first fragment that late is lost, and no segw could
//! reassemble the packet without it. A later fragment that finds no room is
//! handed back, the caller's to place or drop.

use std::net::IpAddr;
use std::time::Duration;

use super::gateways::GwId;
use crate::time::Timestamp;

/// (source, destination, IP ID): what every piece of one packet shares.
pub type FragmentKey = (IpAddr, IpAddr, u32);

/// Decisions kept at once. A flood of first fragments is a flood: past
/// this, new ones are not kept until the expiry sweep frees room (sweeping
/// on the data path would cost a pass over all of them per frame).
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
        if self.decided.len() < DECIDED || self.decided.contains_key(&key) {
            self.decided.insert(key, (gw, now));
        }
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
        self.decided.retain(|_, (_, at)| now.since(*at) < ttl);
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
        let a = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
        let b = IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1));
        (a, b, id)
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
