//! The affinity table: which segw each tunnel is on.
//!
//! A tunnel is one entry, found by any of three keys, most specific first:
//! its IKE initiator SPI, its outer (address, UDP port), its outer address.
//! Fragments have a table of their own (`fragments.rs`).
//!
//! Bounds, stated: at most `capacity` tunnels. A new tunnel that finds the
//! table full evicts the oldest entry that is *still* half-open (its segw
//! has not spoken for it yet); established tunnels are never evicted to
//! make room, they leave only by idle expiry. With no half-open entry to
//! evict, the new tunnel is refused (counted), so a flood from spoofed
//! sources (IKE_SA_INIT, IKE, ESP: whatever opens an entry) churns through
//! half-open slots and never displaces a tunnel that works. The half-open
//! entries are kept in arrival order by links beside the slots: no queue
//! grows apart from the table.

use std::net::IpAddr;
use std::time::Duration;

use super::endpoints::{EndpointIndex, EndpointKey};
use super::gateways::GwId;
use super::rules::{Find, Keys, Placement};
use crate::packet::Mac;
use crate::policy::{Opener, TunnelKey};
use crate::time::Timestamp;

/// Index of an entry in the table's slab.
pub type TunnelId = u32;

/// A tunnel's life as the table's bounds see it (from its [`Placement`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelState {
    /// No segw has spoken for it yet: an IKE_SA_INIT, or IKE or ESP of a
    /// tunnel a fresh balancer had not seen (or a spoof: anyone can send
    /// those from any address). Cheap to forget: evicted first when the
    /// table is full, and forgotten on the shorter half-open timeout.
    HalfOpen,
    /// A tunnel that works: its segw has sent to the peer, or the balancer
    /// moved a working tunnel.
    Established,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    pub peer: IpAddr,
    /// 0 for raw ESP. Follows the peer (the float to 4500, NAT rebinding).
    pub peer_port: u16,
    /// The port the tunnel opened from: with `peer`, the endpoint the policy
    /// placed it by, and places it by again (a rebalance, a failed segw).
    pub opened_port: u16,
    /// The address the peer talks to (the VIP).
    pub vip: IpAddr,
    pub ike_spi: Option<u64>,
    /// The IKE responder SPI its segw answered `ike_spi` with (learned from
    /// the segw's frames): with `ike_spi`, the pair that proves a frame from
    /// the initiator side belongs to the tunnel (a MOBIKE or NAT move, a new
    /// next hop). Unknown until the segw speaks IKE for this IKE SA.
    pub responder_spi: Option<u64>,
    pub opened_by: Opener,
    pub gateway: GwId,
    /// Still at the address it opened from, so `(peer, opened_port)` is
    /// where a new IKE SA of the same peer comes from (a DPD restart, a
    /// reauthentication): the table finds the tunnel there too.
    at_opening_address: bool,
    /// Changed through the table only ([`AffinityTable::set_placement`]):
    /// the table keeps half-open entries in order.
    placement: Placement,
    pub since: Timestamp,
    pub last_seen: Timestamp,
    /// The initiator-side next hop: the MAC its first frame came from, then
    /// that of the last frame that proved the tunnel (IKE with its SPI
    /// pair). A frame anyone could send never changes it.
    pub next_hop: Option<Mac>,
    /// Packets and IP bytes towards its segw ...
    pub frames: u64,
    pub bytes: u64,
    /// ... and back from it.
    pub frames_back: u64,
    pub bytes_back: u64,
    /// Its traffic as rates (see `Balancer::measure_tunnels`).
    pub rates: super::rates::TunnelRates,
    /// The SPI of the last ESP from the peer the core saw (0: none): which
    /// of the peer's SAs a graceful move leaves on the old segw.
    pub esp_spi: u32,
    /// Half-open past the handshake window (see [`Timeouts::handshake`]):
    /// it no longer holds a place on its segw. Set by the table only.
    stale: bool,
}

impl Tunnel {
    pub fn state(&self) -> TunnelState {
        if self.placement.is_established() {
            TunnelState::Established
        } else {
            TunnelState::HalfOpen
        }
    }

    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Whether it counts on its segw, for the policy's load and against
    /// the segw's capacity: established, or half-open for no longer than
    /// a handshake takes. A spoofed IKE_SA_INIT looks like a real one until
    /// then; past it, the initiator's IKE_AUTH (which only a peer that got
    /// the segw's answer can send) would have confirmed a real one, so a
    /// flood of spoofs holds places for one window, not for the half-open
    /// timeout.
    pub fn holds_place(&self) -> bool {
        !self.stale
    }

    /// Still at the address it opened from (see the field).
    pub fn at_opening_address(&self) -> bool {
        self.at_opening_address
    }

    /// Whether it is still at the address it opened from, as a saved
    /// table ([`super::saved`]) says.
    pub(super) fn restore_opening_address(&mut self, at: bool) {
        self.at_opening_address = at;
    }

    /// The tunnel `key` names, first seen at `now`, on `gateway`.
    pub fn new(key: &TunnelKey, gateway: GwId, placement: Placement, now: Timestamp) -> Self {
        Tunnel {
            peer: key.peer,
            peer_port: key.peer_port,
            opened_port: key.peer_port,
            vip: key.vip,
            ike_spi: key.ike_spi,
            responder_spi: None,
            opened_by: key.opened_by,
            gateway,
            at_opening_address: true,
            placement,
            since: now,
            last_seen: now,
            next_hop: None,
            frames: 0,
            bytes: 0,
            frames_back: 0,
            bytes_back: 0,
            rates: Default::default(),
            esp_spi: 0,
            stale: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Established tunnels idle this long are forgotten (well past DPD).
    pub idle: Duration,
    /// Half-open tunnels idle this long are forgotten.
    pub half_open: Duration,
    /// A half-open tunnel holds a place on its segw this long after it
    /// opened (see [`Tunnel::holds_place`]): long enough for a real
    /// initiator's IKE_SA_INIT and IKE_AUTH, retransmits of a slow segw
    /// included, and short against the half-open timeout.
    pub handshake: Duration,
    /// Where a first fragment went is remembered this long, for the
    /// pieces after it.
    pub fragment: Duration,
    /// A later fragment that came before its first waits this long for it.
    pub fragment_hold: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            idle: Duration::from_secs(600),
            half_open: Duration::from_secs(30),
            handshake: Duration::from_secs(5),
            fragment: Duration::from_secs(5),
            // Reordering on the way is microseconds to milliseconds; a first
            // fragment a second late is lost.
            fragment_hold: Duration::from_secs(1),
        }
    }
}

/// What the table did besides answering, for the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableCounters {
    pub inserted: u64,
    pub evicted_half_open: u64,
    pub refused_full: u64,
    pub expired: u64,
    pub rebound: u64,
    /// Moves to an endpoint another live tunnel is bound to, refused: the
    /// tunnel keeps its keys, the other keeps its endpoint.
    pub rebind_refused: u64,
}

/// A move onto an endpoint another established tunnel is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebindRefused;

/// The change log overflowed (see [`AffinityTable::take_changes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflowed;

/// Seeded per map (per process run), so spoofed keys cannot be chosen to
/// collide; several times faster than std's SipHash on these small keys.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// An address as one 128-bit word (IPv4 as its IPv4-mapped IPv6 form): a
/// key that hashes in one write and compares as plain integers. `IpAddr`'s
/// own `Hash` writes a discriminant, a length and the octets one call each,
/// and that was a sixth of a frame's time in the core benchmark. Stored as
/// four u32s: 4-byte alignment keeps an endpoint bucket at 24 bytes (a u128
/// would make it 48), which is what a million-tunnel table is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct AddrKey([u32; 4]);

impl AddrKey {
    pub const ZERO: AddrKey = AddrKey([0; 4]);

    pub fn word(self) -> u128 {
        self.0
            .iter()
            .fold(0u128, |w, &part| (w << 32) | u128::from(part))
    }
}

impl From<IpAddr> for AddrKey {
    fn from(a: IpAddr) -> Self {
        let bits = match a {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => u128::from(v6),
        };
        AddrKey([
            (bits >> 96) as u32,
            (bits >> 64) as u32,
            (bits >> 32) as u32,
            bits as u32,
        ])
    }
}

impl std::hash::Hash for AddrKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(self.word());
    }
}

/// Where a slot sits on a list threaded through the slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Link {
    prev: TunnelId,
    next: TunnelId,
}

/// No slot: the end of a list.
const END: TunnelId = TunnelId::MAX;

impl Link {
    const OFF: Link = Link {
        prev: END,
        next: END,
    };
}

/// Every tunnel at one address, in the order they were bound there, in two
/// lists: those a segw has spoken for (or the balancer moved) and the
/// half-open ones. The address finds the newest established one first, so
/// half-open entries a spoofer opens from a peer's address never take its
/// packets.
#[derive(Debug, Clone, Copy)]
struct AtAddr {
    established: Chain,
    half_open: Chain,
}

impl AtAddr {
    const EMPTY: AtAddr = AtAddr {
        established: Chain::EMPTY,
        half_open: Chain::EMPTY,
    };

    fn len(&self) -> u32 {
        self.established.len + self.half_open.len
    }

    fn newest(&self) -> TunnelId {
        match self.established.last {
            END => self.half_open.last,
            id => id,
        }
    }

    fn chain(&mut self, established: bool) -> &mut Chain {
        if established {
            &mut self.established
        } else {
            &mut self.half_open
        }
    }
}

/// A slot's places on the lists, beside the slot (same index).
#[derive(Debug, Clone, Copy)]
struct Links {
    half_open: Link,
    at_addr: Link,
}

impl Links {
    const OFF: Links = Links {
        half_open: Link::OFF,
        at_addr: Link::OFF,
    };
}

/// A doubly linked list of slots, oldest first: O(1) to append, unlink and
/// take the oldest, and no memory beyond the slots' links.
#[derive(Debug, Clone, Copy)]
struct Chain {
    first: TunnelId,
    last: TunnelId,
    /// At most the table's capacity, which fits a `TunnelId`.
    len: u32,
}

impl Chain {
    const EMPTY: Chain = Chain {
        first: END,
        last: END,
        len: 0,
    };

    fn push_back(&mut self, links: &mut [Links], id: TunnelId, of: fn(&mut Links) -> &mut Link) {
        *of(&mut links[id as usize]) = Link {
            prev: self.last,
            next: END,
        };
        match self.last {
            END => self.first = id,
            last => of(&mut links[last as usize]).next = id,
        }
        self.last = id;
        self.len += 1;
    }

    fn unlink(&mut self, links: &mut [Links], id: TunnelId, of: fn(&mut Links) -> &mut Link) {
        let Link { prev, next } = std::mem::replace(of(&mut links[id as usize]), Link::OFF);
        match prev {
            END => self.first = next,
            prev => of(&mut links[prev as usize]).next = next,
        }
        match next {
            END => self.last = prev,
            next => of(&mut links[next as usize]).prev = prev,
        }
        self.len -= 1;
    }
}

fn half_open(l: &mut Links) -> &mut Link {
    &mut l.half_open
}

fn at_addr(l: &mut Links) -> &mut Link {
    &mut l.at_addr
}

#[derive(Debug)]
pub struct AffinityTable {
    slots: Vec<Option<Tunnel>>,
    /// Each slot's places on the lists, by the same index.
    links: Vec<Links>,
    free: Vec<TunnelId>,
    len: usize,
    capacity: usize,
    by_spi: HashMap<u64, TunnelId>,
    by_endpoint: EndpointIndex,
    /// Every tunnel at each address: behind a NAT one address holds many,
    /// and when one goes the address still finds the others.
    by_addr: HashMap<AddrKey, AtAddr>,
    /// The half-open tunnels, in two lists: those no segw answered
    /// ([`UNANSWERED`], oldest first), which a full table evicts first, and
    /// those their segw answered ([`ANSWERED`], in the order answered),
    /// evicted only when no unanswered one is left: a flood from spoofed
    /// sources that no segw answers never evicts a real initiator between
    /// its segw's answer and its IKE_AUTH.
    half_open: [Chain; 2],
    /// In each half-open list, the oldest entry not yet looked at by
    /// [`age`](Self::age) (END: none); the entries before it have outlived
    /// the handshake window.
    young: [TunnelId; 2],
    timeouts: Timeouts,
    sweep_cursor: usize,
    pub counters: TableCounters,
    /// Moves on with every change to which tunnels there are, where the
    /// lookups find them, and how sure the table is of them: a copy of the
    /// lookups elsewhere (the XDP fast path) is current while it is the
    /// same. Ages and counters do not move it.
    epoch: u64,
    /// The endpoints (address and port; port 0: the address alone) whose
    /// lookups may have changed since [`take_touched`](Self::take_touched):
    /// a copy of the lookups is brought up to date by looking at these
    /// again. `None` once more than [`TOUCHED_MAX`] piled up: look at all.
    touched: Option<Vec<(IpAddr, u16)>>,
    /// What changed, slot by slot and in order, for a replica of the table
    /// (a standby balancer: see `balancer::replica`); off unless asked for.
    changes: ChangeLog,
}

/// A change to one slot, as a replica learns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The slot's tunnel changed (or is about to): read it again.
    Touched(TunnelId),
    /// The slot is empty now.
    Removed(TunnelId),
}

/// Changes kept before the log gives up and says "read everything".
pub const CHANGES_MAX: usize = 1 << 20;

/// [`AffinityTable`]'s record of changes for a replica.
#[derive(Debug, Default)]
enum ChangeLog {
    #[default]
    Off,
    On(Vec<Change>),
    /// More than [`CHANGES_MAX`] piled up before they were taken.
    Overflowed,
}

/// The half-open list of entries no segw answered ...
const UNANSWERED: usize = 0;
/// ... and of those it answered.
const ANSWERED: usize = 1;

/// The half-open list a placement is on; `None`: established.
fn half_open_list(p: Placement) -> Option<usize> {
    match p {
        _ if p.is_established() => None,
        Placement::Answered => Some(ANSWERED),
        _ => Some(UNANSWERED),
    }
}

/// Touched endpoints kept before the table gives up and says "all".
pub const TOUCHED_MAX: usize = 1 << 16;

impl AffinityTable {
    pub fn new(capacity: usize, timeouts: Timeouts) -> Self {
        AffinityTable {
            slots: Vec::new(),
            links: Vec::new(),
            free: Vec::new(),
            len: 0,
            // Slot ids are u32 and END marks the end of a list.
            capacity: capacity.min(END as usize),
            by_spi: HashMap::default(),
            by_endpoint: EndpointIndex::default(),
            by_addr: HashMap::default(),
            half_open: [Chain::EMPTY; 2],
            young: [END; 2],
            timeouts,
            sweep_cursor: 0,
            counters: TableCounters::default(),
            epoch: 0,
            touched: None,
            changes: ChangeLog::Off,
        }
    }

    /// Keep a log of changes for a replica from now on (`false`: stop).
    pub fn log_changes(&mut self, on: bool) {
        self.changes = if on {
            ChangeLog::On(Vec::new())
        } else {
            ChangeLog::Off
        };
    }

    /// The changes since the last call, in order; `Err` when more than
    /// [`CHANGES_MAX`] piled up (the log starts again, empty: a replica must
    /// then read the whole table).
    pub fn take_changes(&mut self) -> Result<Vec<Change>, Overflowed> {
        match &mut self.changes {
            ChangeLog::Off => Ok(Vec::new()),
            ChangeLog::On(log) => Ok(std::mem::take(log)),
            ChangeLog::Overflowed => {
                self.changes = ChangeLog::On(Vec::new());
                Err(Overflowed)
            }
        }
    }

    fn log(&mut self, change: Change) {
        if let ChangeLog::On(log) = &mut self.changes {
            if log.len() >= CHANGES_MAX {
                self.changes = ChangeLog::Overflowed;
            } else {
                log.push(change);
            }
        }
    }

    /// Tunnel `id` changed in a way no lookup depends on (its responder
    /// SPI): only a replica needs to know.
    pub fn note(&mut self, id: TunnelId) {
        self.log(Change::Touched(id));
    }

    /// See the field: compare two readings to know whether anything a
    /// lookup depends on changed in between.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Tunnel `id`'s lookups, or what it is, changed (or are about to):
    /// the epoch moves and its endpoints are touched.
    pub(super) fn touch(&mut self, id: TunnelId) {
        self.epoch += 1;
        self.log(Change::Touched(id));
        let Some(t) = self.slots.get(id as usize).and_then(Option::as_ref) else {
            return;
        };
        let keys = [(t.peer, t.peer_port), (t.peer, t.opened_port), (t.peer, 0)];
        if let Some(touched) = &mut self.touched {
            if touched.len() + keys.len() > TOUCHED_MAX {
                self.touched = None;
            } else {
                touched.extend(keys);
            }
        }
    }

    /// The endpoints touched since the last call (each may be listed more
    /// than once), or `None`: too many, or never asked before.
    pub fn take_touched(&mut self) -> Option<Vec<(IpAddr, u16)>> {
        self.touched.replace(Vec::new())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Make room for the table's whole capacity now. A table that grows
    /// does so by doubling, and each doubling moves or rehashes everything
    /// in it in one go (tens of milliseconds at a million tunnels, in the
    /// middle of the traffic that filled it); the live balancer reserves
    /// at start instead. Untouched reserved memory costs address space,
    /// not RAM, except the endpoint index's and the hash maps' control
    /// bytes (~50 MB at a million).
    pub fn reserve_all(&mut self) {
        let n = self.capacity.saturating_sub(self.len);
        self.slots.reserve(n);
        self.links.reserve(n);
        self.by_spi.reserve(n);
        self.by_addr.reserve(n);
        // Each tunnel's endpoint, and for floated ones the one it opened from.
        self.by_endpoint.reserve(self.capacity.saturating_mul(2));
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn get(&self, id: TunnelId) -> Option<&Tunnel> {
        self.slots.get(id as usize)?.as_ref()
    }

    /// For the balancer's counters, times and placement. The keys (`peer`,
    /// `peer_port`, `ike_spi`) change through [`rebind`](Self::rebind) and
    /// [`set_spi`](Self::set_spi) only: the indexes and lists follow them.
    pub(super) fn get_mut(&mut self, id: TunnelId) -> Option<&mut Tunnel> {
        self.slots.get_mut(id as usize)?.as_mut()
    }

    pub fn iter(&self) -> impl Iterator<Item = (TunnelId, &Tunnel)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, t)| Some((i as TunnelId, t.as_ref()?)))
    }

    /// Slots in the slab, used or free: what a walk over the table in
    /// slices ([`slots_in`](Self::slots_in)) covers.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// The tunnels in slots `range` (clamped to the slab).
    pub fn slots_in(
        &self,
        range: std::ops::Range<usize>,
    ) -> impl Iterator<Item = (TunnelId, &Tunnel)> {
        let end = range.end.min(self.slots.len());
        let start = range.start.min(end);
        self.slots[start..end]
            .iter()
            .enumerate()
            .filter_map(move |(i, t)| Some(((start + i) as TunnelId, t.as_ref()?)))
    }

    pub fn ids(&self) -> Vec<TunnelId> {
        self.iter().map(|(id, _)| id).collect()
    }

    pub fn by_spi(&self, spi: u64) -> Option<TunnelId> {
        self.by_spi.get(&spi).copied()
    }

    /// The tunnel bound to `(addr, port)`: its current endpoint, or the
    /// one it opened from (before the float to 4500).
    pub fn by_endpoint(&self, addr: IpAddr, port: u16) -> Option<TunnelId> {
        self.by_endpoint.get(&EndpointKey::new(addr, port))
    }

    /// A hint: start loading where `(addr, port)` is indexed.
    pub fn prefetch_endpoint(&self, addr: IpAddr, port: u16) {
        self.by_endpoint.prefetch(&EndpointKey::new(addr, port));
    }

    /// The most recently bound established tunnel at `addr`, else the most
    /// recently bound half-open one.
    pub fn by_addr(&self, addr: IpAddr) -> Option<TunnelId> {
        Some(self.by_addr.get(&AddrKey::from(addr))?.newest())
    }

    /// The tunnel at `addr` when it is the only one there: then the address
    /// alone says which tunnel a packet belongs to.
    pub fn sole_tunnel_at(&self, addr: IpAddr) -> Option<TunnelId> {
        self.by_addr
            .get(&AddrKey::from(addr))
            .filter(|at| at.len() == 1)
            .map(AtAddr::newest)
    }

    /// The first of `rules` that finds a tunnel by `keys`, and which it was
    /// (see [`rules`](super::rules)).
    pub fn find(&self, rules: &[Find], keys: &Keys) -> Option<(TunnelId, Find)> {
        rules.iter().find_map(|&rule| {
            let id = match rule {
                Find::Spi => self.by_spi(keys.spi?),
                Find::Endpoint => self.by_endpoint(keys.addr, keys.port?),
                Find::SoleAtAddress => self.sole_tunnel_at(keys.addr),
                Find::Address => self.by_addr(keys.addr),
            }?;
            Some((id, rule))
        })
    }

    /// Add a tunnel; `None` when the table is full of established tunnels.
    /// With it, the half-open tunnel evicted to make room, if one was.
    pub fn insert(&mut self, tunnel: Tunnel) -> Option<(TunnelId, Option<Tunnel>)> {
        let mut evicted = None;
        if self.len >= self.capacity {
            evicted = self.evict_one_half_open();
            if evicted.is_none() {
                self.counters.refused_full += 1;
                return None;
            }
        }
        let list = half_open_list(tunnel.placement);
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(tunnel);
                id
            }
            None => {
                self.slots.push(Some(tunnel));
                self.links.push(Links::OFF);
                (self.slots.len() - 1) as TunnelId
            }
        };
        self.len += 1;
        self.counters.inserted += 1;
        if let Some(list) = list {
            self.link_half_open(id, list);
        }
        self.index(id);
        self.touch(id);
        Some((id, evicted))
    }

    fn index(&mut self, id: TunnelId) {
        let t = self.slots[id as usize]
            .as_ref()
            .expect("indexing a live entry");
        if let Some(spi) = t.ike_spi {
            self.by_spi.insert(spi, id);
        }
        self.by_endpoint
            .insert(EndpointKey::new(t.peer, t.peer_port), id);
        if t.at_opening_address && t.opened_port != t.peer_port {
            // Never taken from another tunnel's current endpoint.
            self.by_endpoint
                .insert_if_absent(EndpointKey::new(t.peer, t.opened_port), id);
        }
        let established = t.placement.is_established();
        let at = self
            .by_addr
            .entry(AddrKey::from(t.peer))
            .or_insert(AtAddr::EMPTY);
        at.chain(established)
            .push_back(&mut self.links, id, at_addr);
    }

    /// Drop the index entries that still point at `id`.
    fn unindex(&mut self, id: TunnelId) {
        let t = self.slots[id as usize]
            .as_ref()
            .expect("unindexing a live entry");
        if let Some(spi) = t.ike_spi {
            if self.by_spi.get(&spi) == Some(&id) {
                self.by_spi.remove(&spi);
            }
        }
        for port in [t.peer_port, t.opened_port] {
            self.by_endpoint
                .remove_if(&EndpointKey::new(t.peer, port), id);
        }
        let (addr, established) = (AddrKey::from(t.peer), t.placement.is_established());
        if let Some(at) = self.by_addr.get_mut(&addr) {
            at.chain(established).unlink(&mut self.links, id, at_addr);
            if at.len() == 0 {
                self.by_addr.remove(&addr);
            }
        }
    }

    pub fn remove(&mut self, id: TunnelId) -> Option<Tunnel> {
        self.get(id)?;
        self.touch(id);
        if let Some(list) = half_open_list(self.get(id)?.placement) {
            self.unlink_half_open(id, list);
        }
        self.unindex(id);
        let t = self.slots[id as usize].take();
        self.free.push(id);
        self.len -= 1;
        self.log(Change::Removed(id));
        t
    }

    /// The tunnel now comes from another address or port (NAT-T float,
    /// MOBIKE, NAT rebinding): move its keys, keep its gateway.
    ///
    /// Onto an endpoint another established tunnel is at, only when
    /// `may_take_over` (the caller's rules say when: see
    /// `Balancer::ike_found`): then the endpoint is this tunnel's and the
    /// other keeps its other keys (its IKE SPI). Else that is refused
    /// (counted) and both keep their keys. A half-open tunnel there
    /// (nothing a segw spoke for; perhaps a spoof) is evicted: returned,
    /// for the caller's counts.
    pub fn rebind(
        &mut self,
        id: TunnelId,
        (peer, peer_port): (IpAddr, u16),
        may_take_over: bool,
    ) -> Result<Option<Tunnel>, RebindRefused> {
        let Some(t) = self.get(id) else {
            return Ok(None);
        };
        if (t.peer, t.peer_port) == (peer, peer_port) {
            return Ok(None);
        }
        let holder = self
            .by_endpoint(peer, peer_port)
            .filter(|&other| other != id)
            .and_then(|other| Some((other, self.get(other)?)))
            .filter(|(_, o)| (o.peer, o.peer_port) == (peer, peer_port));
        let evicted = match holder {
            Some((_, o)) if o.placement.is_established() && may_take_over => None,
            Some((_, o)) if o.placement.is_established() => {
                self.counters.rebind_refused += 1;
                return Err(RebindRefused);
            }
            Some((other, _)) => {
                self.counters.evicted_half_open += 1;
                self.remove(other)
            }
            None => None,
        };
        self.touch(id);
        self.unindex(id);
        let t = self.get_mut(id).expect("checked above");
        t.at_opening_address &= t.peer == peer;
        t.peer = peer;
        t.peer_port = peer_port;
        self.index(id);
        self.touch(id);
        self.counters.rebound += 1;
        Ok(evicted)
    }

    /// The tunnel's IKE SA is now `spi` (learned, or a rekeyed IKE SA):
    /// the old SPI stops pointing here, and the responder SPI of the new
    /// IKE SA is unknown until its segw speaks.
    pub fn set_spi(&mut self, id: TunnelId, spi: u64) {
        let Some(t) = self.get_mut(id) else { return };
        let old = t.ike_spi.replace(spi);
        if old == Some(spi) {
            return;
        }
        t.responder_spi = None;
        self.epoch += 1;
        self.log(Change::Touched(id));
        if let Some(old) = old {
            if self.by_spi.get(&old) == Some(&id) {
                self.by_spi.remove(&old);
            }
        }
        self.by_spi.insert(spi, id);
    }

    /// How sure the table now is of the tunnel's segw. An established
    /// tunnel is no longer evictable, expires on the idle timeout and is
    /// what its address finds first.
    pub fn set_placement(&mut self, id: TunnelId, placement: Placement) {
        let Some(t) = self.slots.get_mut(id as usize).and_then(Option::as_mut) else {
            return;
        };
        if t.placement == placement {
            return;
        }
        self.touch(id);
        let t = self.slots[id as usize].as_mut().expect("looked up above");
        let (was, now) = (t.placement.is_established(), placement.is_established());
        let lists = (half_open_list(t.placement), half_open_list(placement));
        t.placement = placement;
        t.stale &= !now;
        let addr = AddrKey::from(t.peer);
        if lists.0 != lists.1 {
            if let Some(list) = lists.0 {
                self.unlink_half_open(id, list);
            }
            if let Some(list) = lists.1 {
                self.link_half_open(id, list);
            }
        }
        if was == now {
            return;
        }
        let at = self
            .by_addr
            .get_mut(&addr)
            .expect("a live tunnel is at its address");
        at.chain(was).unlink(&mut self.links, id, at_addr);
        at.chain(now).push_back(&mut self.links, id, at_addr);
    }

    /// Half-open tunnels now; also the length of the eviction order, which
    /// lives in the slots and so is bounded by the table.
    pub fn half_open_len(&self) -> usize {
        self.half_open.iter().map(|c| c.len as usize).sum()
    }

    /// The oldest unanswered half-open entry, else the oldest answered one.
    fn evict_one_half_open(&mut self) -> Option<Tunnel> {
        let oldest = self
            .half_open
            .iter()
            .map(|c| c.first)
            .find(|&id| id != END)?;
        self.counters.evicted_half_open += 1;
        self.remove(oldest)
    }

    fn link_half_open(&mut self, id: TunnelId, list: usize) {
        self.half_open[list].push_back(&mut self.links, id, half_open);
        if self.young[list] == END {
            self.young[list] = id;
        }
    }

    fn unlink_half_open(&mut self, id: TunnelId, list: usize) {
        if self.young[list] == id {
            self.young[list] = self.links[id as usize].half_open.next;
        }
        self.half_open[list].unlink(&mut self.links, id, half_open);
    }

    /// Half-open entries opened more than the handshake window before `now`
    /// stop holding a place on their segw (see [`Tunnel::holds_place`]):
    /// `on_stale` hears each one's gateway. Looks at up to `budget` entries,
    /// each once in its life on a list (from where the last call stopped).
    pub fn age(&mut self, now: Timestamp, budget: usize, mut on_stale: impl FnMut(GwId)) {
        let mut budget = budget;
        for list in [UNANSWERED, ANSWERED] {
            while budget > 0 && self.young[list] != END {
                let id = self.young[list];
                let t = self.slots[id as usize]
                    .as_mut()
                    .expect("a half-open list holds live entries");
                if now.since(t.since) < self.timeouts.handshake {
                    break;
                }
                if !t.stale {
                    t.stale = true;
                    on_stale(t.gateway);
                }
                self.young[list] = self.links[id as usize].half_open.next;
                budget -= 1;
            }
        }
    }

    /// Forget up to `budget` slots' worth of idle tunnels, resuming where the
    /// last sweep stopped. Returns the removed tunnels. Call it regularly
    /// with a budget that keeps each call short.
    pub fn expire(&mut self, now: Timestamp, budget: usize) -> Vec<Tunnel> {
        let mut gone = Vec::new();
        let n = self.slots.len();
        for _ in 0..budget.min(n) {
            if self.sweep_cursor >= n {
                self.sweep_cursor = 0;
            }
            let id = self.sweep_cursor as TunnelId;
            self.sweep_cursor += 1;
            let Some(t) = self.get(id) else { continue };
            let limit = match t.state() {
                TunnelState::HalfOpen => self.timeouts.half_open,
                TunnelState::Established => self.timeouts.idle,
            };
            if now.since(t.last_seen) > limit {
                gone.extend(self.remove(id));
                self.counters.expired += 1;
            }
        }
        gone
    }

    /// Bytes held per tunnel at best, from the types: the slot and its
    /// links, and its share of the three indexes at their highest load (the
    /// endpoint index: 3/4; hashbrown: the entry + 1 control byte, 7/8),
    /// one address per tunnel. The real figure is higher by the slack of
    /// grown tables (they double, and so does the slab): the core benchmark
    /// measures it with a counting allocator.
    pub fn bytes_per_tunnel() -> usize {
        use std::mem::size_of;
        let slot = size_of::<Option<Tunnel>>() + size_of::<Links>();
        let hashbrown = |entry: usize| (entry + 1) * 8 / 7;
        slot + hashbrown(size_of::<(u64, TunnelId)>())
            + EndpointIndex::bytes_per_key()
            + hashbrown(size_of::<(AddrKey, AtAddr)>())
    }
}
