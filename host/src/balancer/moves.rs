//! Graceful moves: make-before-break. A tunnel the balancer wants on another
//! segw (a graceful drain, a graceful rebalance) is not re-pointed; its old
//! segw is asked to send the peer away (an IKEv2 Redirect, RFC 5685, to the
//! VIP itself: the balancer cannot speak IKE for a segw, so the I/O edge
//! runs a hook for each [`MoveRequest`]). The peer builds a new IKE SA and
//! its CHILD_SAs from the same endpoint, and deletes the old ones only once
//! the new ones work. The balancer sends the new IKE SA to the target and
//! everything of the old one to the old segw, so no packet has nowhere to
//! go:
//!
//! | frame from the peer, during a move     | goes to                       |
//! |----------------------------------------|-------------------------------|
//! | IKE_SA_INIT with a new SPI, from the   | the target: a new entry, the  |
//! | old tunnel's endpoint                  | *successor* (no policy call)  |
//! | IKE of either IKE SA                   | its own entry (by SPI)        |
//! | ESP, before the target answered the    | the old segw (its SPI noted)  |
//! | successor's IKE_AUTH                   |                               |
//! | ESP after, with an SPI the old SA used | the old segw                  |
//! | ESP after, any other SPI               | the target                    |
//!
//! The target's IKE_AUTH response ends the move: from then on the peer
//! sends on its new CHILD_SA. The old entry stays [`Settings::linger`]
//! longer for the old SAs' last packets (the peer's DELETE), then goes. A
//! segw's frames go back to the peer from either entry, each found on its
//! own segw (no conflict counted).
//!
//! A move the peer did not follow within [`Settings::timeout`] (the hook
//! failed, the peer ignores redirects) ends as *timed out*: the tunnel
//! stays where it was, whole. A graceful move never breaks a tunnel.
//!
//! Paced: at most [`Settings::per_second`] moves are asked per second, so
//! the targets' IKE setup rate holds; the rest wait in a queue, in order.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Duration;

use super::affinity::{Tunnel, TunnelId, TunnelState};
use super::gateways::{GatewayError, GwId};
use super::rules::{Find, Keys, Placement};
use super::{key_of, tunnel_key, Balancer, DropReason, Steered};
use crate::packet::ike::IKE_AUTH;
use crate::packet::{IpPacket, Payload};
use crate::policy::Policy;
use crate::time::Timestamp;

/// How graceful moves are paced and timed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Moves asked per second, at most.
    pub per_second: f64,
    /// A move whose peer has not opened its new IKE SA on the target by
    /// then ends, the tunnel where it was.
    pub timeout: Duration,
    /// How long the old entry outlives the move's end.
    pub linger: Duration,
    /// Moves asked and not yet over, at most (the queue waits beyond).
    pub max_active: usize,
    /// Tunnels waiting to be asked, at most (a longer queue refuses more).
    pub max_queued: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            per_second: 20.0,
            timeout: Duration::from_secs(30),
            linger: Duration::from_secs(10),
            max_active: 1024,
            max_queued: 1 << 20,
        }
    }
}

/// What the hook is asked to do: make `from` send the peer at
/// `peer`/`peer_port` (its IKE SA `ike_spi`, `responder_spi`) to the VIP
/// again, whence the balancer takes it to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveRequest {
    pub peer: IpAddr,
    pub peer_port: u16,
    pub vip: IpAddr,
    pub ike_spi: Option<u64>,
    pub responder_spi: Option<u64>,
    pub from: GwId,
    pub to: GwId,
}

/// Graceful moves, counted since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Put in the queue.
    pub queued: u64,
    /// Refused: the queue was full.
    pub refused: u64,
    /// Asked of the old segw (the hook ran).
    pub asked: u64,
    /// The peer's new IKE SA reached the target, whose IKE_AUTH answer ended
    /// the move.
    pub moved: u64,
    /// The peer did not follow in time: the tunnel stayed.
    pub timed_out: u64,
    /// Not asked after all: the tunnel was gone, half-open, already moving,
    /// no longer on the segw it was queued on, or the policy kept it there.
    pub skipped: u64,
}

/// One move asked and not over.
#[derive(Debug, Clone)]
pub(super) struct Move {
    /// The entry that moves (its IKE SA and CHILD_SAs on `from`).
    pub old: TunnelId,
    pub old_since: Timestamp,
    pub to: GwId,
    pub asked: Timestamp,
    /// The peer's new IKE SA, on `to`, and when it was first seen (a slot
    /// is reused once its tunnel goes: the time says it is still this one).
    pub new: Option<TunnelId>,
    pub new_since: Option<Timestamp>,
    /// When `to` answered the new IKE SA's IKE_AUTH.
    pub done: Option<Timestamp>,
    /// ESP SPIs the peer sent on its old SAs while the move was under way.
    old_spis: [u32; OLD_SPIS],
    old_spi_count: usize,
}

/// The old SA's SPIs remembered per move (a CHILD_SA rekey mid-move makes
/// two; more is a peer with several CHILD_SAs).
const OLD_SPIS: usize = 8;

impl Move {
    pub fn note_old_spi(&mut self, spi: u32) {
        if self.old_spis[..self.old_spi_count].contains(&spi) {
            return;
        }
        if self.old_spi_count < OLD_SPIS {
            self.old_spis[self.old_spi_count] = spi;
            self.old_spi_count += 1;
        }
    }

    pub fn is_old_spi(&self, spi: u32) -> bool {
        self.old_spis[..self.old_spi_count].contains(&spi)
    }
}

#[derive(Debug, Clone, Copy)]
struct Queued {
    tunnel: TunnelId,
    since: Timestamp,
    /// Where it goes (a rebalance decided); `None`: the policy decides when
    /// it is asked, on the load then (a drain).
    to: Option<GwId>,
}

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
pub struct Moves {
    pub settings: Settings,
    queue: VecDeque<Queued>,
    /// By the old entry.
    active: HashMap<TunnelId, Move>,
    /// New entry → old entry.
    successors: HashMap<TunnelId, TunnelId>,
    /// Moves that may be asked now (a token bucket of one second's worth).
    tokens: f64,
    refilled: Option<Timestamp>,
    pub counters: Counters,
}

/// What the table and the queue hold now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub queued: usize,
    /// Asked, the peer's new IKE SA not opened yet.
    pub asked: usize,
    /// The new IKE SA opened on the target, its IKE_AUTH not answered yet.
    pub moving: usize,
    /// Over; the old entry lingers.
    pub lingering: usize,
}

impl Moves {
    pub fn new(settings: Settings) -> Self {
        Moves {
            settings,
            ..Moves::default()
        }
    }

    /// Nothing asked and nothing lingering: the data path has nothing to
    /// look up.
    #[inline]
    pub fn is_idle(&self) -> bool {
        self.active.is_empty()
    }

    /// Nothing queued, asked or lingering.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.active.is_empty()
    }

    /// Queue tunnel `tunnel` (first seen at `since`) to move to `to`, or
    /// where the policy says when its turn comes.
    pub fn enqueue(&mut self, tunnel: TunnelId, since: Timestamp, to: Option<GwId>) -> bool {
        if self.queue.len() >= self.settings.max_queued {
            self.counters.refused += 1;
            return false;
        }
        self.queue.push_back(Queued { tunnel, since, to });
        self.counters.queued += 1;
        true
    }

    /// Moves that may be asked now (whole tokens), the bucket refilled to
    /// `now`. At most one second's worth piles up.
    pub(super) fn budget(&mut self, now: Timestamp) -> usize {
        let rate = self.settings.per_second.max(0.0);
        let elapsed = self
            .refilled
            .map_or(1.0, |then| now.since(then).as_secs_f64());
        self.tokens = (self.tokens + elapsed * rate).min(rate.max(1.0));
        self.refilled = Some(now);
        let room = self.settings.max_active.saturating_sub(self.active.len());
        (self.tokens.floor() as usize)
            .min(room)
            .min(self.queue.len())
    }

    pub(super) fn pop(&mut self) -> Option<(TunnelId, Timestamp, Option<GwId>)> {
        let q = self.queue.pop_front()?;
        Some((q.tunnel, q.since, q.to))
    }

    pub(super) fn spend(&mut self) {
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    pub(super) fn is_moving(&self, id: TunnelId) -> bool {
        self.active.contains_key(&id) || self.successors.contains_key(&id)
    }

    pub(super) fn begin(&mut self, m: Move) {
        self.counters.asked += 1;
        self.active.insert(m.old, m);
    }

    /// The move `id` is the old or the new entry of.
    #[inline]
    pub(super) fn of(&mut self, id: TunnelId) -> Option<&mut Move> {
        let old = self.successors.get(&id).copied().unwrap_or(id);
        self.active.get_mut(&old)
    }

    pub(super) fn set_successor(&mut self, old: TunnelId, new: TunnelId, since: Timestamp) {
        if let Some(m) = self.active.get_mut(&old) {
            m.new = Some(new);
            m.new_since = Some(since);
            self.successors.insert(new, old);
        }
    }

    /// Every move, for the timers to end.
    pub(super) fn active(&self) -> impl Iterator<Item = &Move> {
        self.active.values()
    }

    pub(super) fn end(&mut self, old: TunnelId) -> Option<Move> {
        let m = self.active.remove(&old)?;
        if let Some(new) = m.new {
            self.successors.remove(&new);
        }
        Some(m)
    }

    pub fn progress(&self) -> Progress {
        let mut p = Progress {
            queued: self.queue.len(),
            ..Progress::default()
        };
        for m in self.active.values() {
            match (m.new, m.done) {
                (_, Some(_)) => p.lingering += 1,
                (Some(_), None) => p.moving += 1,
                (None, None) => p.asked += 1,
            }
        }
        p
    }
}

impl Move {
    pub(super) fn new(old: TunnelId, old_since: Timestamp, to: GwId, asked: Timestamp) -> Self {
        Move {
            old,
            old_since,
            to,
            asked,
            new: None,
            new_since: None,
            done: None,
            old_spis: [0; OLD_SPIS],
            old_spi_count: 0,
        }
    }
}

impl<P: Policy> Balancer<P> {
    /// Graceful moves: their settings, counters and progress.
    pub fn moves(&self) -> &Moves {
        &self.moves
    }

    pub fn set_move_settings(&mut self, settings: Settings) {
        self.moves.settings = settings;
    }

    /// Drain `name` and move its working tunnels off it gracefully: each
    /// is queued, and asked in turn ([`graceful_step`](Self::graceful_step))
    /// to go where the policy then places it. Returns how many were queued.
    pub fn drain_gracefully(&mut self, name: &str, now: Timestamp) -> Result<usize, GatewayError> {
        self.set_draining(name, true, now)?;
        let gw = self
            .gateways
            .by_name(name)
            .expect("set_draining found it")
            .id;
        let on_it: Vec<(TunnelId, Timestamp)> = self
            .table
            .iter()
            .filter(|(id, t)| {
                t.gateway == gw
                    && t.state() == TunnelState::Established
                    && !self.moves.is_moving(*id)
            })
            .map(|(id, t)| (id, t.since))
            .collect();
        Ok(on_it
            .into_iter()
            .filter(|&(id, since)| self.moves.enqueue(id, since, None))
            .count())
    }

    /// Put another policy in place and rebalance gracefully: the policy
    /// places every tunnel afresh ([`rebalance_step`](Self::rebalance_step)
    /// as usual), and each working tunnel it would move is queued as a
    /// graceful move instead of re-pointed.
    pub fn swap_policy_gracefully(&mut self, policy: P, now: Timestamp) -> P {
        let old = self.swap_policy(policy, true, now);
        if let Some(r) = &mut self.rebalancing {
            r.graceful = true;
        }
        old
    }

    /// The graceful moves' timers: end the moves that are over (the old
    /// entry dropped after its linger) or timed out, then ask the next
    /// ones the pace allows. Returns what the hook is to ask of the old
    /// segws.
    pub fn graceful_step(&mut self, now: Timestamp) -> Vec<MoveRequest> {
        if self.moves.is_empty() {
            return Vec::new();
        }
        let Settings {
            timeout, linger, ..
        } = self.moves.settings;
        let over: Vec<(TunnelId, bool)> = self
            .moves
            .active()
            .filter_map(|m| {
                let alive = self
                    .table
                    .get(m.old)
                    .is_some_and(|t| t.since == m.old_since);
                match m.done {
                    Some(done) => (now.since(done) >= linger).then_some((m.old, alive)),
                    None => (!alive || now.since(m.asked) >= timeout).then_some((m.old, alive)),
                }
            })
            .collect();
        for (old, alive) in over {
            let m = self.moves.end(old).expect("listed above");
            if let Some(new) = m.new {
                self.table.touch(new);
            }
            if !alive {
                continue;
            }
            self.table.touch(old);
            if m.done.is_some() {
                if let Some(gone) = self.table.remove(old) {
                    self.forget(&gone);
                }
            } else {
                self.moves.counters.timed_out += 1;
            }
        }
        let budget = self.moves.budget(now);
        let mut asks = Vec::with_capacity(budget);
        // Skipped entries cost a lookup each: a bounded number per call.
        let mut looks = budget + 1024;
        while asks.len() < budget && looks > 0 {
            looks -= 1;
            let Some((id, since, to)) = self.moves.pop() else {
                break;
            };
            match self.ask(id, since, to, now) {
                Some(request) => {
                    self.moves.spend();
                    asks.push(request);
                }
                None => self.moves.counters.skipped += 1,
            }
        }
        asks
    }

    /// Begin moving tunnel `id` to `to` (or where the policy places it),
    /// if it is still a working tunnel worth moving.
    fn ask(
        &mut self,
        id: TunnelId,
        since: Timestamp,
        to: Option<GwId>,
        now: Timestamp,
    ) -> Option<MoveRequest> {
        let t = self.table.get(id)?;
        if t.since != since || t.state() != TunnelState::Established || self.moves.is_moving(id) {
            return None;
        }
        let from = t.gateway;
        let to = match to {
            Some(to) => to,
            None => self.place(&key_of(t), now).ok()?,
        };
        if to == from || !self.is_up(to) || !self.is_up(from) {
            return None;
        }
        let t = self.table.get(id).expect("looked up above");
        let request = MoveRequest {
            peer: t.peer,
            peer_port: t.peer_port,
            vip: t.vip,
            ike_spi: t.ike_spi,
            responder_spi: t.responder_spi,
            from,
            to,
        };
        let mut m = Move::new(id, since, to, now);
        // The SA the peer sends on now is the old one, whether or not it
        // sends again before the move is over.
        if t.esp_spi != 0 {
            m.note_old_spi(t.esp_spi);
        }
        self.moves.begin(m);
        // Its frames are the core's while it moves.
        self.table.touch(id);
        Some(request)
    }

    /// The move tunnel `id` is the old or the new entry of, if the entry in
    /// that slot is still the one the move began with (a slot whose tunnel
    /// went, evicted or expired, may hold another tunnel by now).
    #[inline]
    fn moving(&mut self, id: TunnelId) -> Option<&mut Move> {
        let since = self.table.get(id)?.since;
        let m = self.moves.of(id)?;
        let same = if m.old == id {
            m.old_since == since
        } else {
            m.new_since == Some(since)
        };
        same.then_some(m)
    }

    /// An initiator's frame of a tunnel that is moving (see the module's
    /// table), or `None`: the usual rules decide.
    pub(super) fn steer_moving(
        &mut self,
        ip: &IpPacket,
        keys: &Keys,
        found: Option<(TunnelId, Find)>,
        now: Timestamp,
    ) -> Result<Option<Steered>, DropReason> {
        let Some((id, how)) = found else {
            return Ok(None);
        };
        let pick = match &ip.payload {
            Payload::Ike { header, .. } if header.is_sa_init_request() && how == Find::Endpoint => {
                let Some(m) = self.moving(id) else {
                    return Ok(None);
                };
                if m.old != id || m.new.is_some() {
                    return Ok(None);
                }
                let (old, to) = (m.old, m.to);
                if !self.is_up(to) {
                    return Ok(None);
                }
                // The peer's new IKE SA: on the target, decided, not guessed.
                let key = tunnel_key(ip.src, ip.dst, keys, &ip.payload);
                let new = self.insert(Tunnel::new(&key, to, Placement::Opened, now))?;
                self.moves.set_successor(old, new, now);
                self.table.touch(old);
                new
            }
            Payload::Esp { spi } | Payload::EspInUdp { spi, .. } => {
                let Some(m) = self.moving(id) else {
                    return Ok(None);
                };
                match (m.new, m.done) {
                    (Some(new), Some(_)) if !m.is_old_spi(*spi) => new,
                    _ => {
                        m.note_old_spi(*spi);
                        m.old
                    }
                }
            }
            _ => return Ok(None),
        };
        Ok(Some(Steered {
            gw: self.live_gateway(pick, now)?,
            tunnel: Some(pick),
            proven: false,
        }))
    }

    /// A segw's frame for a tunnel that is moving: the entry on that segw
    /// (the old segw still talks to the peer on the old SAs), and the
    /// target's IKE_AUTH answer for the new IKE SA ends the move.
    pub(super) fn segw_moving(
        &mut self,
        found: Option<(TunnelId, Find)>,
        gw: GwId,
        payload: &Payload,
        now: Timestamp,
    ) -> Option<(TunnelId, Find)> {
        let (id, how) = found?;
        let Some(m) = self.moving(id) else {
            return found;
        };
        let (old, new, to, over) = (m.old, m.new, m.to, m.done.is_some());
        let Some(new) = new else { return found };
        let member = if gw == to { new } else { old };
        let finished = !over
            && gw == to
            && matches!(payload, Payload::Ike { header, .. }
                if header.exchange == IKE_AUTH
                    && header.response
                    && self.table.get(new).and_then(|t| t.ike_spi) == Some(header.initiator_spi));
        if finished {
            if let Some(m) = self.moves.of(id) {
                m.done = Some(now);
            }
            self.moves.counters.moved += 1;
            self.table.touch(old);
            self.table.touch(new);
        }
        Some((member, how))
    }
}
