//! The balancer core: `handle(frame, ingress port, now) -> verdict`.
//!
//! One story per frame: classify (`packet::parse`) → steer (the affinity
//! table; the policy on a miss only) → rewrite the two MACs → tell the
//! caller which port to send it on. ARP requests for proxied addresses are
//! answered in place. A later fragment that comes before its first waits
//! for it (bounded, [`fragments`]). Everything else is a counted drop.
//!
//! The story of a frame is here; its parts are split by concern:
//! `uplink.rs` (initiator → segw), `downlink.rs` (segw → initiator),
//! `neighbours.rs` (ARP/NDP answers, probes, announcements), `operations.rs`
//! (the gateway set, the policy, rebalance, expiry) and [`rates`].
//!
//! This module owns the tunnel table, the gateway set and the counters. It
//! never touches a socket, a thread, wasmtime or the clock: time comes in
//! with each frame, the policy through the `Policy` trait, and the frame
//! goes back to the caller to send.

pub mod affinity;
mod downlink;
mod endpoints;
pub mod farm;
pub mod fastpath;
pub mod fragments;
pub mod gateways;
pub mod health;
pub mod moves;
mod neighbours;
mod operations;
pub mod prefix;
pub mod rates;
pub mod replica;
pub mod rules;
pub mod saved;
#[cfg(test)]
mod tests;
mod uplink;

use std::net::IpAddr;

use affinity::{AffinityTable, Timeouts, Tunnel, TunnelId};
use fragments::Fragments;
pub use gateways::{
    GatewayCounters, GatewayError, GatewaySpec, GatewayState, GwId, IkeSpiLabel, PortId,
    SpiSteering, UPLINK,
};
pub use health::{HealthConfig, ProbeRound};
pub use neighbours::UplinkNextHop;
pub use prefix::Prefix;
use rules::Keys;

use crate::packet::{self, rewrite, IpPacket, Kind, Mac, Malformed, Payload};
use crate::policy::{Guarded, Load, Opener, Policy, PolicyStats, TunnelKey};
use crate::time::Timestamp;

/// What the caller does with the frame after `handle`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send the (rewritten) frame on this port.
    Forward(PortId),
    /// Send the (rewritten) frame on this port, then these frames: the
    /// later fragments of its packet that came before it and were held
    /// (rewritten too, in the order they came).
    ForwardWithHeld(PortId, Vec<Vec<u8>>),
    /// The frame was taken (the caller's buffer is left empty): a later
    /// fragment that came before its first, held until the first says where
    /// the packet goes. It leaves with a later verdict, or is dropped
    /// (counted) after `Timeouts::fragment_hold`.
    Held,
    /// The frame now holds a reply: send it back on the ingress port.
    Reply,
    Drop(DropReason),
}

impl Verdict {
    /// The port the frame goes out on, if it is forwarded.
    pub fn forwarded_to(&self) -> Option<PortId> {
        match self {
            Verdict::Forward(port) | Verdict::ForwardWithHeld(port, _) => Some(*port),
            _ => None,
        }
    }
}

/// Why a frame was dropped. Each is a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    Malformed,
    /// Not IKE, NAT-T or ESP (nor an ICMP error about them).
    NotIpsec,
    /// An ARP we do not answer (not a request, or not for a proxied address).
    ArpIgnored,
    /// A neighbour solicitation for an address we do not proxy.
    NeighborIgnored,
    /// An EtherType we do not handle.
    OtherEtherType,
    /// A frame sent to another MAC than the port's (ports are promiscuous:
    /// on a switched segment other hosts' flooded frames come in too), or
    /// a broadcast or multicast that is not an ARP request or neighbour
    /// solicitation.
    NotForUs,
    /// A keepalive, later fragment or ICMP error for a tunnel we do not know.
    UnknownTunnel,
    /// No gateway takes new tunnels.
    NoGateway,
    /// Every gateway that takes new tunnels is at its capacity: a new
    /// tunnel (or one re-placed off a failed segw) refused.
    AtCapacity,
    /// The chosen segw's MAC is not known yet.
    GatewayMacUnknown,
    /// Return traffic for a peer whose next hop is not known yet.
    NextHopUnknown,
    /// The table is full of established tunnels (none half-open to evict).
    TableFull,
    /// A frame on a port with no gateway behind it.
    UnknownPort,
    /// An IKE_SA_INIT (responder SPI 0) from a new endpoint carrying the
    /// initiator SPI of a tunnel bound elsewhere: a spoof or a replay. Only
    /// messages past IKE_SA_INIT may move a tunnel.
    IkeSpiInUse,
    /// A later fragment that came before its first and found the hold full,
    /// from an address that does not name one tunnel.
    FragmentHoldFull,
    /// A held later fragment whose first fragment did not come in time.
    FragmentTimeout,
    /// A segw's packet to a link-local, multicast or broadcast address
    /// (its answers to our IPv6 probes, router solicitations, multicast
    /// listener reports): it belongs to the segw's link and never crosses.
    LinkScoped,
    /// This balancer is the standby of a pair: its peer carries the
    /// traffic, and it answers and forwards nothing (see `crate::pair`).
    Standby,
}

impl DropReason {
    pub const ALL: [DropReason; 18] = [
        DropReason::Malformed,
        DropReason::NotIpsec,
        DropReason::ArpIgnored,
        DropReason::NeighborIgnored,
        DropReason::OtherEtherType,
        DropReason::NotForUs,
        DropReason::UnknownTunnel,
        DropReason::NoGateway,
        DropReason::AtCapacity,
        DropReason::GatewayMacUnknown,
        DropReason::NextHopUnknown,
        DropReason::TableFull,
        DropReason::UnknownPort,
        DropReason::IkeSpiInUse,
        DropReason::FragmentHoldFull,
        DropReason::FragmentTimeout,
        DropReason::LinkScoped,
        DropReason::Standby,
    ];

    /// Traffic that is not the balancer's to carry (ARP and neighbour
    /// solicitations for addresses it does not proxy, non-IPsec packets,
    /// other EtherTypes): on a real link some is always there. Every other
    /// reason is a frame of a tunnel, or of an attack on one.
    pub fn is_foreign(self) -> bool {
        matches!(
            self,
            DropReason::NotIpsec
                | DropReason::ArpIgnored
                | DropReason::NeighborIgnored
                | DropReason::OtherEtherType
                | DropReason::NotForUs
                | DropReason::LinkScoped
                | DropReason::Standby
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NotIpsec => "not_ipsec",
            DropReason::ArpIgnored => "arp_ignored",
            DropReason::NeighborIgnored => "neighbor_ignored",
            DropReason::OtherEtherType => "other_ethertype",
            DropReason::NotForUs => "not_for_us",
            DropReason::UnknownTunnel => "unknown_tunnel",
            DropReason::NoGateway => "no_gateway",
            DropReason::AtCapacity => "at_capacity",
            DropReason::GatewayMacUnknown => "gateway_mac_unknown",
            DropReason::NextHopUnknown => "next_hop_unknown",
            DropReason::TableFull => "table_full",
            DropReason::UnknownPort => "unknown_port",
            DropReason::IkeSpiInUse => "ike_spi_in_use",
            DropReason::FragmentHoldFull => "fragment_hold_full",
            DropReason::FragmentTimeout => "fragment_timeout",
            DropReason::LinkScoped => "link_scoped",
            DropReason::Standby => "standby",
        }
    }
}

/// Everything the balancer decides, counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames forwarded, the fast path's among them.
    pub forwarded: u64,
    /// Of those, forwarded by the kernel fast path (see [`fastpath`]).
    pub fast_path: u64,
    /// ARP replies and neighbour advertisements sent for proxied addresses.
    pub replies: u64,
    /// By [`DropReason::ALL`] index.
    pub drops: [u64; DropReason::ALL.len()],
    /// Later fragments held for their first fragment. Each is forwarded or
    /// dropped later, and counted there too.
    pub held: u64,
    /// Malformed frames by what was wrong, indexed like [`Malformed::ALL`].
    pub malformed: [u64; 9],
    /// Return traffic from a segw for a tunnel the balancer placed on
    /// another (a segw a rebalance or a failure moved the tunnel away
    /// from, still talking): forwarded to the peer, the tunnel not moved.
    pub conflicts: u64,
    /// New tunnels placed by the policy.
    pub placed: u64,
    /// Tunnels learned from a segw's return traffic (no policy call).
    pub taught: u64,
    /// Tunnels moved off a down or removed gateway, or by a rebalance.
    pub moved: u64,
    /// Packets sent by SPI-range steering (no table state needed).
    pub steered: u64,
    /// Packets whose SPI named another segw than a tunnel the balancer
    /// placed (or a segw confirmed): sent by the table (a spoof, or SPI
    /// ranges that overlap).
    pub spi_overruled: u64,
    /// IKE from a new endpoint with a known initiator SPI and a responder
    /// SPI that is not the one its segw answered with (or not known yet):
    /// sent to the tunnel's segw, the binding not moved.
    pub unproven_moves: u64,
}

impl Counters {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }
}

/// The core's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Our MAC on each port, indexed by port id (0 is the uplink).
    pub port_macs: Vec<Mac>,
    /// Addresses answered for (ARP, NDP) on the uplink: what initiators ask
    /// for, the VIP.
    pub proxy: Vec<Prefix>,
    /// Addresses answered for on gateway ports: what segws ask for, the
    /// initiators (or their next hop). Kept apart so that one initiator
    /// asking for another on the uplink is never answered.
    pub proxy_gateways: Vec<Prefix>,
    /// Hard bound on the tunnel table.
    pub max_tunnels: usize,
    pub timeouts: Timeouts,
}

pub struct Balancer<P: Policy = Box<dyn Policy>> {
    config: Config,
    gateways: gateways::Gateways,
    table: AffinityTable,
    fragments: Fragments,
    policy: Guarded<P>,
    /// The tunnels holding a place on each gateway id (established, or
    /// half-open within the handshake window: see `Tunnel::holds_place`):
    /// what the policy reads and capacity counts. Kept with
    /// `GatewayCounters::tunnels` (every tunnel) by `gateway_tunnels`, and
    /// as entries age or are confirmed.
    load: Load,
    counters: Counters,
    /// The last initiator-side next hop seen on the uplink: where return
    /// traffic goes for a peer whose own next hop is not known.
    default_next_hop: Option<Mac>,
    /// The default next hop as configured, if it is.
    uplink_next_hop: Option<neighbours::UplinkNextHop>,
    rebalancing: Option<Rebalancing>,
    /// Graceful moves queued and under way (see [`moves`]).
    moves: moves::Moves,
    /// Moves on with the changes the table's epoch does not see, which
    /// concern every tunnel: the first default next hop, the gateway set
    /// and health, a segw's MAC (see [`Balancer::epoch`]).
    epoch: u64,
    /// When reported utilization counts (see [`rates`]).
    reporting: rates::Reporting,
    /// The next slot whose tunnel's rates are updated, and how many slots
    /// the pass under way has yet to visit.
    rate_cursor: usize,
    rate_pass_left: usize,
    /// The standby of a pair: every frame is dropped (see [`replica`]).
    standby: bool,
    /// Proxied addresses the segws asked for (ARP, neighbour solicitation),
    /// answered or, by a standby, overheard: what a takeover announces to
    /// them (bounded, see `neighbours::ASKED_MAX`).
    asked: std::collections::HashSet<IpAddr>,
}

/// A rebalance under way (see [`Balancer::rebalance_step`]).
#[derive(Debug)]
struct Rebalancing {
    /// The next slot to visit.
    cursor: usize,
    /// Tunnels first seen after this were placed by the new policy.
    began: Timestamp,
    /// The load as the policy sees it while re-placing: what it has placed
    /// so far. (Tunnels that expire or move meanwhile are not taken off:
    /// the policy's view drifts by those until the rebalance ends.)
    fresh: Load,
    moved: u64,
    /// Working tunnels the policy moves are queued as graceful moves
    /// (see [`moves`]), not re-pointed.
    graceful: bool,
}

/// What one frame handed to [`Balancer::handle_bulk`] stands for: `packets`
/// packets of `bytes` IP bytes in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bulk {
    pub packets: u64,
    pub bytes: u64,
}

impl Bulk {
    /// The frame itself: one packet of `ip_len` bytes.
    #[inline]
    fn one(ip_len: usize) -> Bulk {
        Bulk {
            packets: 1,
            bytes: ip_len as u64,
        }
    }
}

/// Where a frame goes, before the rewrite: the egress port and the next
/// hop's MAC, packed in one word. `handle`'s branches meet on the stack; a
/// struct of a u16 and six bytes was stored there in pieces and loaded
/// whole, and a load that spans several pending stores cannot be forwarded
/// from them: it waits for them to retire. That wait was a sixth of
/// `handle`'s samples in the core benchmark at 1,000 tunnels.
#[derive(Clone, Copy)]
struct Egress(u64);

impl Egress {
    #[inline]
    fn new(port: PortId, dst: Mac) -> Egress {
        let mut mac = [0; 8];
        mac[..6].copy_from_slice(&dst);
        Egress(u64::from(port) | u64::from_le_bytes(mac) << 16)
    }

    #[inline]
    fn port(self) -> PortId {
        self.0 as PortId
    }

    #[inline]
    fn dst(self) -> Mac {
        let bytes = (self.0 >> 16).to_le_bytes();
        [bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5]]
    }
}

/// Where a packet from an initiator was steered.
struct Steered {
    gw: GwId,
    /// Its tunnel (none for a later fragment sent after its first, or a
    /// packet SPI steering sent when the table had no room to learn it).
    tunnel: Option<TunnelId>,
    /// It carried its tunnel's IKE SPI pair (see `ike_found`).
    proven: bool,
}

impl Steered {
    fn fragment(gw: GwId) -> Self {
        Steered {
            gw,
            tunnel: None,
            proven: false,
        }
    }
}

impl<P: Policy> Balancer<P> {
    pub fn new(config: Config, policy: P) -> Self {
        let table = AffinityTable::new(config.max_tunnels, config.timeouts);
        Balancer {
            config,
            gateways: gateways::Gateways::default(),
            table,
            fragments: Fragments::default(),
            policy: Guarded::new(policy),
            load: Load::default(),
            counters: Counters::default(),
            default_next_hop: None,
            uplink_next_hop: None,
            epoch: 0,
            rebalancing: None,
            moves: moves::Moves::default(),
            reporting: rates::Reporting::default(),
            rate_cursor: 0,
            rate_pass_left: 0,
            standby: false,
            asked: Default::default(),
        }
    }

    /// Reserve the tunnel table's whole capacity now, so it never grows
    /// (and never rehashes a million keys) under traffic: what the live
    /// balancer does at start (see [`AffinityTable::reserve_all`]).
    pub fn reserve_table(&mut self) {
        self.table.reserve_all();
    }

    // ----- the data path -------------------------------------------------

    /// A hint for a caller that knows its next frames: start loading the
    /// table slot where a UDP frame (IKE, ESP in UDP) from `(peer, port)`
    /// will be looked up, so handling it later waits less on memory.
    /// Changes nothing.
    pub fn prefetch(&self, peer: IpAddr, port: u16) {
        self.table.prefetch_endpoint(peer, port);
    }

    /// Decide what happens to one frame that arrived on `ingress` at `now`.
    /// On `Forward` the frame's MACs are rewritten in place; on `Reply` the
    /// frame has been replaced by the reply; on `Held` it has been taken.
    pub fn handle(&mut self, frame: &mut Vec<u8>, ingress: PortId, now: Timestamp) -> Verdict {
        self.handle_frame(frame, ingress, now, None)
    }

    /// [`handle`](Self::handle) a frame that stands for `bulk`: packets of
    /// the same tunnel, the same way, counted (on the tunnel, its gateway
    /// and the forwarded total) as the balancer would count them had they
    /// come one by one. The simulation's traffic: a step's ESP of a tunnel
    /// as one frame. A fragment is never bulk (it counts as itself).
    pub fn handle_bulk(
        &mut self,
        frame: &mut Vec<u8>,
        ingress: PortId,
        now: Timestamp,
        bulk: Bulk,
    ) -> Verdict {
        let verdict = self.handle_frame(frame, ingress, now, Some(bulk));
        if let Verdict::Forward(_) = verdict {
            self.counters.forwarded += bulk.packets.saturating_sub(1);
        }
        verdict
    }

    #[inline(always)]
    fn handle_frame(
        &mut self,
        frame: &mut Vec<u8>,
        ingress: PortId,
        now: Timestamp,
        bulk: Option<Bulk>,
    ) -> Verdict {
        // Borrowed where `parse` wrote it: moving it out of the `Result`
        // copied it in wide loads over parse's narrow stores, which stall
        // (see `Egress`); a fifth of `handle`'s samples at 1,000 tunnels.
        if self.standby {
            self.overhear(frame, ingress);
            return self.count_drop(DropReason::Standby, 1);
        }
        let parsed = packet::parse(frame);
        let parsed = match &parsed {
            Ok(p) => p,
            Err(m) => return self.malformed(*m),
        };
        if !self.addressed_to_us(parsed, ingress) {
            return self.count_drop(DropReason::NotForUs, 1);
        }
        let step = match &parsed.kind {
            Kind::Arp(arp) => match self.arp(arp, ingress) {
                Some(reply) => {
                    *frame = reply.to_frame(arp.sender_mac, self.port_mac(ingress), parsed.vlan);
                    self.counters.replies += 1;
                    return Verdict::Reply;
                }
                None => Err(DropReason::ArpIgnored),
            },
            Kind::Ip(IpPacket {
                src: IpAddr::V6(from),
                payload: Payload::NeighborSolicit(ns),
                ..
            }) => {
                let ours = ns.target == packet::ndp::link_local(self.port_mac(ingress));
                if ours || self.proxies(IpAddr::V6(ns.target), ingress) {
                    // Only a solicitation we answer is a segw's: another
                    // balancer's probe asks for the VIP.
                    self.heard_from_segw(ingress, parsed.src);
                    if !ours {
                        self.note_asked(IpAddr::V6(ns.target), ingress);
                    }
                    let our_mac = self.port_mac(ingress);
                    let solicitor_mac = ns.source_mac.unwrap_or(parsed.src);
                    let (to_mac, reply) = packet::ndp::answer(ns, *from, solicitor_mac, our_mac);
                    *frame = packet::craft::frame(to_mac, our_mac, parsed.vlan, &reply);
                    self.counters.replies += 1;
                    return Verdict::Reply;
                }
                Err(DropReason::NeighborIgnored)
            }
            Kind::Ip(IpPacket {
                src,
                payload: Payload::Other { protocol: 58 },
                ..
            }) if ingress == UPLINK && self.heard_from_next_hop(*src, parsed.src) => {
                // The configured next hop's answer to our solicitation.
                Err(DropReason::NeighborIgnored)
            }
            Kind::Ip(ip) if ingress == UPLINK => match ip.fragment {
                Some(piece) => return self.fragment_in(ip, piece, frame, parsed.src, now),
                None => self.initiator_to_segw(ip, parsed.src, now, bulk),
            },
            Kind::Ip(ip) => self.segw_to_initiator(ip, ingress, parsed.src, now, bulk),
            Kind::Other(_) => Err(DropReason::OtherEtherType),
        };
        match step {
            Ok(egress) => self.forward(frame, egress),
            Err(reason) => self.count_drop(reason, 1),
        }
    }

    fn forward(&mut self, frame: &mut [u8], to: Egress) -> Verdict {
        rewrite::set_macs(frame, to.dst(), self.port_mac(to.port()));
        self.counters.forwarded += 1;
        Verdict::Forward(to.port())
    }

    fn count_drop(&mut self, reason: DropReason, frames: usize) -> Verdict {
        self.counters.drops[reason as usize] += frames as u64;
        Verdict::Drop(reason)
    }

    fn malformed(&mut self, m: Malformed) -> Verdict {
        self.counters.drops[DropReason::Malformed as usize] += 1;
        self.counters.malformed[m as usize] += 1;
        Verdict::Drop(DropReason::Malformed)
    }

    /// Our own MAC on `port`.
    pub fn port_mac(&self, port: PortId) -> Mac {
        self.config
            .port_macs
            .get(usize::from(port))
            .copied()
            .unwrap_or([0; 6])
    }

    /// Established tunnels idle this long are forgotten.
    pub fn idle_timeout(&self) -> std::time::Duration {
        self.config.timeouts.idle
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn policy_stats(&self) -> &PolicyStats {
        self.policy.stats()
    }

    /// Live tunnels per gateway id, as policies read it.
    pub fn load(&self) -> &Load {
        &self.load
    }

    pub fn table(&self) -> &AffinityTable {
        &self.table
    }

    /// First fragments' decisions kept now, and those evicted by newer ones.
    pub fn fragment_decisions(&self) -> (usize, u64) {
        (self.fragments.decisions(), self.fragments.evicted)
    }

    /// Later fragments waiting for their first: (packets, frames, bytes).
    pub fn held_fragments(&self) -> (usize, usize, usize) {
        self.fragments.held()
    }

    pub fn gateways(&self) -> impl Iterator<Item = &GatewayState> {
        self.gateways.iter()
    }

    pub fn gateway(&self, name: &str) -> Option<&GatewayState> {
        self.gateways.by_name(name)
    }

    pub fn gateway_by_id(&self, id: GwId) -> Option<&GatewayState> {
        self.gateways.get(id)
    }
}

/// The key of the tunnel a packet between `peer` and `vip` belongs to, as
/// the policy sees it, from the keys its rule looked it up by.
/// An address that names something on one link only: link-local,
/// multicast, broadcast.
fn link_scoped(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_multicast() || v6.is_unicast_link_local(),
    }
}

fn tunnel_key(peer: IpAddr, vip: IpAddr, keys: &Keys, payload: &Payload) -> TunnelKey {
    TunnelKey {
        peer,
        peer_port: keys.port.unwrap_or(0),
        vip,
        ike_spi: keys.spi,
        opened_by: match payload {
            Payload::Ike { nat_t: false, .. } => Opener::Ike,
            Payload::Esp { .. } => Opener::Esp,
            _ => Opener::NatT,
        },
    }
}

fn key_of(t: &Tunnel) -> TunnelKey {
    TunnelKey {
        peer: t.peer,
        peer_port: t.opened_port,
        vip: t.vip,
        ike_spi: t.ike_spi,
        opened_by: t.opened_by,
    }
}
