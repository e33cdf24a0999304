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

/// Decisions kept at once. A flood of first fragments is a flood; past
/// this, the stale are swept and new ones are not kept.
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
}

impl Fragments {
    /// Where the packet's first fragment went, if it came.
    pub fn decided(&self, key: &FragmentKey) -> Option<GwId> {
        self.decided.get(key).map(|&(gw, _)| gw)
    }

    pub fn decide(&mut self, key: FragmentKey, gw: GwId, now: Timestamp, ttl: Duration) {
        if self.decided.len() >= DECIDED && !self.decided.contains_key(&key) {
            self.decided.retain(|_, (_, at)| now.since(*at) < ttl);
            if self.decided.len() >= DECIDED {
                return;
            }
        }
        self.decided.insert(key, (gw, now));
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
        let (mut frames, mut bytes) = (0, 0);
        self.held.retain(|_, h| {
            let waiting = now.since(h.since) <= hold;
            if !waiting {
                frames += h.frames.len();
                bytes += h.frames.iter().map(Vec::capacity).sum::<usize>();
            }
            waiting
        });
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
