//! The balancer core: `handle(frame, ingress port, now) -> verdict`.
//!
//! One story per frame: classify (`packet::parse`) → steer (the affinity
//! table; the policy on a miss only) → rewrite the two MACs → tell the
//! caller which port to send it on. ARP requests for proxied addresses are
//! answered in place. A later fragment that comes before its first waits
//! for it (bounded, [`fragments`]). Everything else is a counted drop.
//!
//! This module owns the tunnel table, the gateway set and the counters. It
//! never touches a socket, a thread, wasmtime or the clock: time comes in
//! with each frame, the policy through the `Policy` trait, and the frame
//! goes back to the caller to send.

pub mod affinity;
mod endpoints;
pub mod farm;
pub mod fastpath;
pub mod fragments;
pub mod gateways;
pub mod health;
pub mod prefix;
pub mod rates;
pub mod rules;
pub mod saved;
#[cfg(test)]
mod tests;

use std::net::IpAddr;

use affinity::{AffinityTable, Timeouts, Tunnel, TunnelId};
use fragments::{FragmentKey, Fragments};
pub use gateways::{
    GatewayCounters, GatewayError, GatewaySpec, GatewayState, GwId, IkeSpiLabel, PortId,
    SpiSteering, UPLINK,
};
pub use health::{HealthConfig, ProbeRound};
pub use prefix::Prefix;
use rules::{Evidence, Find, Inbound, Keys, Miss, Outbound, Placement};

use crate::packet::{
    self, arp::Arp, rewrite, Fragment, IkeHeader, IpPacket, Kind, Mac, Malformed, Payload, Udp,
};
use crate::policy::{Guarded, Load, Opener, Policy, PolicyStats, Refusal, TunnelKey};
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
}

impl DropReason {
    pub const ALL: [DropReason; 17] = [
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
    /// Live tunnels per gateway id, as the policy reads it (kept with
    /// `GatewayCounters::tunnels` by `gateway_tunnels`, the one place
    /// either changes).
    load: Load,
    counters: Counters,
    /// The last initiator-side next hop seen on the uplink: where return
    /// traffic goes for a peer whose own next hop is not known.
    default_next_hop: Option<Mac>,
    rebalancing: Option<Rebalancing>,
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
            epoch: 0,
            rebalancing: None,
            reporting: rates::Reporting::default(),
            rate_cursor: 0,
            rate_pass_left: 0,
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
                self.heard_from_segw(ingress, parsed.src);
                let ours = ns.target == packet::ndp::link_local(self.port_mac(ingress));
                if ours || self.proxies(IpAddr::V6(ns.target), ingress) {
                    let our_mac = self.port_mac(ingress);
                    let solicitor_mac = ns.source_mac.unwrap_or(parsed.src);
                    let (to_mac, reply) = packet::ndp::answer(ns, *from, solicitor_mac, our_mac);
                    *frame = packet::craft::frame(to_mac, our_mac, parsed.vlan, &reply);
                    self.counters.replies += 1;
                    return Verdict::Reply;
                }
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

    /// Ours: frames sent to the port's MAC, and the broadcast ARP and
    /// multicast neighbour solicitations that may be for an address we
    /// proxy.
    fn addressed_to_us(&self, f: &packet::Frame, ingress: PortId) -> bool {
        if f.dst == self.port_mac(ingress) {
            return true;
        }
        match &f.kind {
            Kind::Arp(_) => f.dst == [0xff; 6],
            Kind::Ip(IpPacket {
                payload: Payload::NeighborSolicit(_),
                ..
            }) => f.dst[0] & 1 == 1,
            _ => false,
        }
    }

    /// Answer ARP requests for proxied addresses, on any port; learn a
    /// segw's MAC from any ARP it sends.
    fn arp(&mut self, arp: &Arp, ingress: PortId) -> Option<Arp> {
        self.heard_from_segw(ingress, arp.sender_mac);
        let proxied = self.proxies(IpAddr::V4(arp.target_ip), ingress);
        (arp.op == packet::arp::REQUEST && proxied && arp.sender_ip != arp.target_ip)
            .then(|| arp.reply(self.port_mac(ingress)))
    }

    /// A segw spoke on its port (ARP, or a neighbour solicitation): it is
    /// alive, and at `mac` unless its MAC is configured.
    fn heard_from_segw(&mut self, ingress: PortId, mac: Mac) {
        if ingress == UPLINK {
            return;
        }
        if let Some(gw) = self.gateways.on_port_mut(ingress) {
            if gw.spec.mac.is_none() && gw.mac != Some(mac) {
                gw.mac = Some(mac);
                self.epoch += 1;
            }
            gw.probe.heard = true;
        }
    }

    fn proxies(&self, ip: IpAddr, ingress: PortId) -> bool {
        let prefixes = if ingress == UPLINK {
            &self.config.proxy
        } else {
            &self.config.proxy_gateways
        };
        prefixes.iter().any(|p| p.contains(ip))
    }

    /// Initiator → segw, a whole packet.
    #[inline]
    fn initiator_to_segw(
        &mut self,
        ip: &IpPacket,
        src_mac: Mac,
        now: Timestamp,
        bulk: Option<Bulk>,
    ) -> Result<Egress, DropReason> {
        let steered = self.steer_in(ip, now)?;
        let Bulk { packets, bytes } = bulk.unwrap_or(Bulk::one(ip.len));
        self.deliver(&steered, packets, bytes, src_mac, now)
    }

    /// A piece of a fragmented packet from an initiator. The first piece
    /// is steered like a whole packet, always on its own merits (two peers
    /// behind one NAT may reuse an IP ID within the window); a later piece
    /// goes where its first went, or waits for it (see [`fragments`]).
    fn fragment_in(
        &mut self,
        ip: &IpPacket,
        piece: Fragment,
        frame: &mut Vec<u8>,
        src_mac: Mac,
        now: Timestamp,
    ) -> Verdict {
        let key = FragmentKey::of(ip, piece);
        let decided = if piece.first {
            None
        } else {
            self.fragments.decided(&key).filter(|&gw| self.is_up(gw))
        };
        let steered = match decided {
            Some(gw) => Ok(Steered::fragment(gw)),
            None if !piece.first => match self.hold(key, std::mem::take(frame), ip.len, now) {
                Ok(()) => {
                    self.counters.held += 1;
                    return Verdict::Held;
                }
                Err(back) => {
                    *frame = back;
                    // No room: the rules say what the address may decide.
                    self.steer_in(ip, now)
                }
            },
            None => self.steer_in(ip, now),
        };
        // Whatever waited for this packet goes, or is dropped, with it.
        let held = self.fragments.take(&key);
        let (more, more_bytes) = held
            .as_ref()
            .map_or((0, 0), |h| (h.frames.len(), h.ip_bytes));
        let egress = match steered {
            Ok(steered) => {
                self.fragments.decide(key, steered.gw, now);
                let (frames, bytes) = (1 + more as u64, ip.len as u64 + more_bytes);
                self.deliver(&steered, frames, bytes, src_mac, now)
            }
            Err(reason) => Err(reason),
        };
        match (egress, held) {
            (Ok(to), None) => self.forward(frame, to),
            (Ok(to), Some(held)) => {
                let mut frames = held.frames;
                let our_mac = self.port_mac(to.port());
                for f in &mut frames {
                    rewrite::set_macs(f, to.dst(), our_mac);
                }
                self.counters.forwarded += frames.len() as u64;
                self.forward(frame, to);
                Verdict::ForwardWithHeld(to.port(), frames)
            }
            (Err(reason), _) => self.count_drop(reason, 1 + more),
        }
    }

    /// Hold a later fragment for its first; the frame back when there is no
    /// room, even after dropping (counted) what waited too long.
    fn hold(
        &mut self,
        key: FragmentKey,
        frame: Vec<u8>,
        ip_len: usize,
        now: Timestamp,
    ) -> Result<(), Vec<u8>> {
        let frame = match self.fragments.hold(key, frame, ip_len, now) {
            Ok(()) => return Ok(()),
            Err(frame) => frame,
        };
        let stale = self
            .fragments
            .expire_held(now, self.config.timeouts.fragment_hold);
        self.counters.drops[DropReason::FragmentTimeout as usize] += stale as u64;
        if stale == 0 {
            return Err(frame);
        }
        self.fragments.hold(key, frame, ip_len, now)
    }

    /// `frames` of one packet, `bytes` in all, go where they were steered:
    /// count them on their tunnel and gateway, and say where they go.
    /// Frames that cannot go (the segw's MAC is not known yet) are counted
    /// as drops only.
    ///
    /// The next hop back to the peer is the MAC of the tunnel's first frame,
    /// then of the last frame that proved the tunnel; the default next hop
    /// (for peers with none yet, after a restart) the first frame's, then
    /// the last proof's. Anyone on the segment can send any other frame.
    #[inline]
    fn deliver(
        &mut self,
        s: &Steered,
        frames: u64,
        bytes: u64,
        src_mac: Mac,
        now: Timestamp,
    ) -> Result<Egress, DropReason> {
        let gateway = self
            .gateways
            .get_mut(s.gw)
            .expect("steered to a live gateway");
        let to = Egress::new(
            gateway.spec.port,
            gateway.mac.ok_or(DropReason::GatewayMacUnknown)?,
        );
        gateway.counters.frames_to += frames;
        gateway.counters.bytes_to += bytes;
        if let Some(id) = s.tunnel {
            let t = self
                .table
                .get_mut(id)
                .expect("steer_in returns live tunnels");
            t.last_seen = now;
            t.frames += frames;
            t.bytes += bytes;
            if (s.proven || t.next_hop.is_none()) && t.next_hop != Some(src_mac) {
                t.next_hop = Some(src_mac);
                self.table.touch(id);
            }
        }
        if (s.proven || self.default_next_hop.is_none()) && self.default_next_hop != Some(src_mac) {
            // Only whether there is one is the fast path's business.
            if self.default_next_hop.is_none() {
                self.epoch += 1;
            }
            self.default_next_hop = Some(src_mac);
        }
        Ok(to)
    }

    /// The gateway (and tunnel) for a packet from an initiator, by the
    /// rules (see [`rules`]): find its tunnel, let SPI-range steering have
    /// its say, else open a tunnel or drop as the rule says.
    #[inline]
    fn steer_in(&mut self, ip: &IpPacket, now: Timestamp) -> Result<Steered, DropReason> {
        let rule = Inbound::of(ip).ok_or(DropReason::NotIpsec)?;
        let found = self.table.find(rule.find, &rule.keys);
        let (found, proven) = match &ip.payload {
            Payload::Ike { udp, header, .. } => self.ike_found(ip.src, *udp, header, found)?,
            _ => (found.map(|(id, _)| id), false),
        };
        if let Some(owner) = self.spi_owner(&ip.payload) {
            return self.spi_steered(ip, &rule.keys, found, owner, proven, now);
        }
        let id = match (found, rule.miss) {
            (Some(id), _) => id,
            (None, Miss::Open(placement)) => {
                let key = tunnel_key(ip.src, ip.dst, &rule.keys, &ip.payload);
                self.open(key, placement, now)?
            }
            (None, Miss::Drop(reason)) => return Err(reason),
        };
        Ok(Steered {
            gw: self.live_gateway(id, now)?,
            tunnel: Some(id),
            proven,
        })
    }

    /// IKE from an initiator, as the rules found it. By SPI, so the float
    /// to 4500 and MOBIKE keep the segw; by endpoint, a new IKE SA of a
    /// known peer stays on its segw (and the tunnel takes its SPI).
    /// Returns the tunnel, and whether the frame proves it: it carries the
    /// tunnel's SPI pair, whose responder half only the segw's answer told.
    ///
    /// Only a proof moves a tunnel to a new endpoint. An IKE_SA_INIT needs
    /// nothing but the initiator SPI, which anyone on the path sees: from
    /// another endpoint it is dropped, not a new tunnel, because the SPI
    /// index and the segw's answers (found by SPI) would then mix the two
    /// up. A later message with another responder SPI goes to the tunnel's
    /// segw (which holds the SA and judges it) and moves nothing; when the
    /// segw answers it at the new endpoint, the pair is known and the next
    /// message moves the binding.
    fn ike_found(
        &mut self,
        src: IpAddr,
        udp: Udp,
        h: &IkeHeader,
        found: Option<(TunnelId, Find)>,
    ) -> Result<(Option<TunnelId>, bool), DropReason> {
        let (id, proven) = match found {
            None => return Ok((None, false)),
            Some((id, Find::Spi)) => {
                let t = self.table.get(id).expect("found tunnels are live");
                (
                    id,
                    h.responder_spi != 0 && t.responder_spi == Some(h.responder_spi),
                )
            }
            Some((id, _)) => {
                self.table.set_spi(id, h.initiator_spi);
                return Ok((Some(id), false));
            }
        };
        // Its own endpoints: where it is, and where it opened from (a
        // retransmitted IKE_SA_INIT of a new IKE SA, after the float).
        if self.table.by_endpoint(src, udp.src) != Some(id) {
            if h.responder_spi == 0 {
                return Err(DropReason::IkeSpiInUse);
            }
            if !proven {
                self.counters.unproven_moves += 1;
            } else {
                // Another port of its own address may be another tunnel's
                // endpoint: the peer re-established from behind the same
                // NAT, whose mapping the old tunnel had. The port is the new
                // IKE SA's now. From another address, it is never taken:
                // any initiator knows its own SPI pair, and could claim
                // anyone's endpoint with it.
                let same_address = self.table.get(id).is_some_and(|t| t.peer == src);
                if let Ok(Some(evicted)) = self.table.rebind(id, (src, udp.src), same_address) {
                    self.forget(&evicted);
                }
            }
        }
        Ok((Some(id), proven))
    }

    /// The healthy segw whose SPI marks this packet carries, if any segw is
    /// configured for SPI-range steering.
    fn spi_owner(&self, payload: &Payload) -> Option<GwId> {
        let owns: &dyn Fn(&SpiSteering) -> bool = match payload {
            Payload::Ike { header, .. } if header.responder_spi != 0 => {
                &|s| s.owns_ike_spi(header.responder_spi)
            }
            Payload::EspInUdp { spi, .. } | Payload::Esp { spi } => &|s| s.owns_esp_spi(*spi),
            _ => return None,
        };
        self.gateways
            .iter()
            .find(|g| g.healthy && owns(&g.spec.steering))
            .map(|g| g.id)
    }

    /// SPI-range steering named `owner`. The initiator side chose the SPI:
    /// it places a tunnel the table has only guessed (or does not know),
    /// and the table follows, so keepalives, fragments and return traffic
    /// agree; a placement the balancer decided or a segw confirmed, on a
    /// segw that is up, overrules it (counted). Never asks the policy.
    fn spi_steered(
        &mut self,
        ip: &IpPacket,
        keys: &Keys,
        found: Option<TunnelId>,
        owner: GwId,
        proven: bool,
        now: Timestamp,
    ) -> Result<Steered, DropReason> {
        if let Some(id) = found {
            let t = self.table.get(id).expect("found tunnels are live");
            if !t.placement().is_tentative() && t.gateway != owner {
                if self.is_up(t.gateway) {
                    self.counters.spi_overruled += 1;
                    let gw = t.gateway;
                    return Ok(Steered {
                        gw,
                        tunnel: Some(id),
                        proven,
                    });
                }
                self.move_tunnel(id, owner);
            }
        }
        let key = tunnel_key(ip.src, ip.dst, keys, &ip.payload);
        let tunnel = self.teach(found, key, owner, Evidence::SpiRange, now).ok();
        self.counters.steered += 1;
        Ok(Steered {
            gw: owner,
            tunnel,
            proven,
        })
    }

    /// A new tunnel: the only place the policy is asked. Half-open: only
    /// the initiator side has spoken, and anyone can send that from any
    /// address; its segw's answer establishes it.
    fn open(
        &mut self,
        key: TunnelKey,
        placement: Placement,
        now: Timestamp,
    ) -> Result<TunnelId, DropReason> {
        let gw = self.place(&key, now)?;
        let id = self.insert(Tunnel::new(&key, gw, placement, now))?;
        self.counters.placed += 1;
        Ok(id)
    }

    /// Into the table, counted on its gateway (and the half-open tunnel it
    /// evicted, if any, off its own).
    fn insert(&mut self, tunnel: Tunnel) -> Result<TunnelId, DropReason> {
        let gw = tunnel.gateway;
        let (id, evicted) = self.table.insert(tunnel).ok_or(DropReason::TableFull)?;
        if let Some(gone) = evicted {
            self.forget(&gone);
        }
        self.gateway_tunnels(gw, 1);
        Ok(id)
    }

    /// A tunnel the table let go of (evicted or expired): off its gateway.
    fn forget(&mut self, gone: &Tunnel) {
        self.gateway_tunnels(gone.gateway, -1);
    }

    /// The tunnel's gateway, re-placing the tunnel first if that gateway is
    /// down or gone (counted as moved).
    #[inline]
    fn live_gateway(&mut self, id: TunnelId, now: Timestamp) -> Result<GwId, DropReason> {
        let t = self.table.get(id).expect("live tunnel");
        let current = t.gateway;
        if self.is_up(current) {
            return Ok(current);
        }
        let key = key_of(t);
        let gw = self.place(&key, now)?;
        self.move_tunnel(id, gw);
        Ok(gw)
    }

    /// Ask the (guarded) policy where a tunnel goes, on the live load.
    fn place(&mut self, key: &TunnelKey, now: Timestamp) -> Result<GwId, DropReason> {
        match self.policy.choose(key, &self.load, now) {
            Ok(choice) => Ok(choice.gateway),
            Err(Refusal::NoGateway) => Err(DropReason::NoGateway),
            Err(Refusal::Full) => Err(DropReason::AtCapacity),
        }
    }

    /// Move a tunnel by decision (its segw failed or left, a rebalance, an
    /// SPI range, a corrected guess); see [`Placement::moved`].
    fn move_tunnel(&mut self, id: TunnelId, to: GwId) {
        let t = self.table.get_mut(id).expect("live tunnel");
        let from = std::mem::replace(&mut t.gateway, to);
        let placement = t.placement().moved();
        self.table.set_placement(id, placement);
        if from != to {
            self.gateway_tunnels(from, -1);
            self.gateway_tunnels(to, 1);
            if let Some(g) = self.gateways.get_mut(to) {
                g.counters.moved_in += 1;
            }
            self.counters.moved += 1;
        }
    }

    fn gateway_tunnels(&mut self, gw: GwId, delta: i64) {
        self.load.add(gw, delta);
        if let Some(g) = self.gateways.get_mut(gw) {
            g.counters.tunnels = g.counters.tunnels.saturating_add_signed(delta);
        }
    }

    #[inline]
    fn is_up(&self, gw: GwId) -> bool {
        self.gateways.get(gw).is_some_and(|g| g.healthy)
    }

    /// Segw → initiator: confirm or teach the peer's tunnel (see
    /// [`Outbound`]), then out the uplink to the peer's next hop.
    fn segw_to_initiator(
        &mut self,
        ip: &IpPacket,
        ingress: PortId,
        src_mac: Mac,
        now: Timestamp,
        bulk: Option<Bulk>,
    ) -> Result<Egress, DropReason> {
        let Bulk { packets, bytes } = bulk.unwrap_or(Bulk::one(ip.len));
        let gw = {
            let g = self
                .gateways
                .on_port_mut(ingress)
                .ok_or(DropReason::UnknownPort)?;
            if g.spec.mac.is_none() && g.mac != Some(src_mac) {
                g.mac = Some(src_mac);
                self.epoch += 1;
            }
            g.probe.heard = true;
            g.counters.frames_from += packets;
            g.counters.bytes_from += bytes;
            g.id
        };
        if link_scoped(ip.dst) {
            return Err(DropReason::LinkScoped);
        }
        let rule = Outbound::of(ip);
        let found = self.table.find(rule.find, &rule.keys);
        let tunnel = if rule.teaches {
            // The segw's own traffic to the peer: the tunnel works there.
            let key = tunnel_key(ip.dst, ip.src, &rule.keys, &ip.payload);
            let id = self.teach(found.map(|(id, _)| id), key, gw, Evidence::SegwSpoke, now)?;
            if let Payload::Ike { header, .. } = &ip.payload {
                if let Some((_, Find::Endpoint)) = found {
                    self.segw_names_ike_sa(id, gw, header);
                }
                self.learn_responder_spi(id, gw, header);
                if let Some((_, Find::Spi)) = found {
                    self.follow_segw(id, gw, &rule.keys);
                }
            }
            Some(id)
        } else {
            found.map(|(id, _)| id)
        };
        let next_hop = tunnel.and_then(|id| {
            let t = self.table.get_mut(id)?;
            t.frames_back += packets;
            t.bytes_back += bytes;
            t.next_hop
        });
        let dst = next_hop
            .or(self.default_next_hop)
            .ok_or(DropReason::NextHopUnknown)?;
        Ok(Egress::new(UPLINK, dst))
    }

    /// The tunnel's own segw sent IKE to the tunnel's endpoint for an IKE SA
    /// the entry does not name: the peer there has that IKE SA now (a
    /// rekeyed IKE SA, or one opened again after the table was saved and
    /// restored). The entry takes its SPI, as it does when the initiator
    /// speaks first, so the new SA's messages prove a later move.
    fn segw_names_ike_sa(&mut self, id: TunnelId, gw: GwId, h: &IkeHeader) {
        if self.table.get(id).is_some_and(|t| t.gateway == gw) {
            self.table.set_spi(id, h.initiator_spi);
        }
    }

    /// The tunnel's segw sent IKE for its IKE SA: the responder SPI it
    /// carries completes the pair that proves the initiator's later frames.
    fn learn_responder_spi(&mut self, id: TunnelId, gw: GwId, h: &IkeHeader) {
        let Some(t) = self.table.get_mut(id) else {
            return;
        };
        if t.gateway == gw && t.ike_spi == Some(h.initiator_spi) && h.responder_spi != 0 {
            t.responder_spi = Some(h.responder_spi);
        }
    }

    /// The tunnel's own segw sent its IKE SA to another endpoint: the segw
    /// accepted the peer's move there (a NAT-T float or MOBIKE it verified:
    /// it answers an IKE SA's messages only when their integrity checks,
    /// and to where they came from). The binding follows, also onto an
    /// endpoint another tunnel held.
    fn follow_segw(&mut self, id: TunnelId, gw: GwId, keys: &Keys) {
        let Some(port) = keys.port else { return };
        if self.table.get(id).is_some_and(|t| t.gateway == gw) {
            if let Ok(Some(evicted)) = self.table.rebind(id, (keys.addr, port), true) {
                self.forget(&evicted);
            }
        }
    }

    /// Evidence that segw `gw` holds the tunnel `key` describes: learn the
    /// tunnel (after a restart), confirm it, or move it there when its
    /// placement yields (see [`Placement::is_tentative`]); else a counted
    /// conflict, and the tunnel stays.
    fn teach(
        &mut self,
        found: Option<TunnelId>,
        key: TunnelKey,
        gw: GwId,
        evidence: Evidence,
        now: Timestamp,
    ) -> Result<TunnelId, DropReason> {
        let Some(id) = found else {
            let placement = Placement::Guessed.confirmed_by(evidence);
            let id = self.insert(Tunnel::new(&key, gw, placement, now))?;
            self.counters.taught += 1;
            return Ok(id);
        };
        let t = self.table.get(id).expect("found tunnels are live");
        if t.gateway != gw {
            if !t.placement().is_tentative() {
                // A segw the tunnel was moved away from (a rebalance, a
                // segw that came back), still talking to the peer: its
                // frame goes to the peer, the tunnel stays.
                self.counters.conflicts += 1;
                return Ok(id);
            }
            self.move_tunnel(id, gw);
            self.counters.taught += 1;
        }
        let t = self.table.get_mut(id).expect("found above");
        t.last_seen = now;
        let placement = t.placement().confirmed_by(evidence);
        self.table.set_placement(id, placement);
        Ok(id)
    }

    // ----- control -------------------------------------------------------

    pub fn add_gateway(&mut self, spec: GatewaySpec, now: Timestamp) -> Result<GwId, GatewayError> {
        let id = self.gateways.add(spec)?;
        self.push_set(now);
        Ok(id)
    }

    /// Remove a gateway; its tunnels are re-placed on their next packet.
    pub fn remove_gateway(&mut self, name: &str, now: Timestamp) -> Result<(), GatewayError> {
        self.gateways.remove(name)?;
        self.push_set(now);
        Ok(())
    }

    pub fn set_weight(
        &mut self,
        name: &str,
        weight: u32,
        now: Timestamp,
    ) -> Result<(), GatewayError> {
        self.update(name, now, |g| g.spec.weight = weight)
    }

    /// The most tunnels `name` may hold (0: no limit). Lowering it below
    /// what the gateway holds evicts nothing: it takes no new tunnels until
    /// it is under the limit again.
    pub fn set_capacity(
        &mut self,
        name: &str,
        capacity: u64,
        now: Timestamp,
    ) -> Result<(), GatewayError> {
        self.update(name, now, |g| g.spec.capacity = capacity)
    }

    /// The traffic `name` can carry, bytes/s both ways (0: not given):
    /// what its utilization is measured against. Refuses nothing.
    pub fn set_throughput(
        &mut self,
        name: &str,
        throughput: u64,
        now: Timestamp,
    ) -> Result<(), GatewayError> {
        self.update(name, now, |g| g.spec.throughput = throughput)
    }

    /// Draining: no new tunnels; existing ones stay.
    pub fn set_draining(
        &mut self,
        name: &str,
        draining: bool,
        now: Timestamp,
    ) -> Result<(), GatewayError> {
        self.update(name, now, |g| g.draining = draining)
    }

    /// Down: no new tunnels; its tunnels are re-placed on their next packet.
    pub fn set_healthy(
        &mut self,
        name: &str,
        healthy: bool,
        now: Timestamp,
    ) -> Result<(), GatewayError> {
        self.update(name, now, |g| g.healthy = healthy)
    }

    /// Change one gateway and tell the policy the new set.
    fn update(
        &mut self,
        name: &str,
        now: Timestamp,
        change: impl FnOnce(&mut GatewayState),
    ) -> Result<(), GatewayError> {
        change(self.gateways.by_name_mut(name)?);
        self.push_set(now);
        Ok(())
    }

    fn push_set(&mut self, now: Timestamp) {
        self.epoch += 1;
        self.policy.set_gateways(self.gateways.views(), now);
    }

    /// Our MAC on `port` (a port added at runtime, or a NIC replaced).
    pub fn set_port_mac(&mut self, port: PortId, mac: Mac) {
        let i = usize::from(port);
        if self.config.port_macs.len() <= i {
            self.config.port_macs.resize(i + 1, [0; 6]);
        }
        self.config.port_macs[i] = mac;
    }

    /// Replace the proxied prefixes (a config reload).
    pub fn set_proxy(&mut self, uplink: Vec<Prefix>, gateways: Vec<Prefix>) {
        self.config.proxy = uplink;
        self.config.proxy_gateways = gateways;
    }

    /// A health probe round (see [`health`]): judge the last round, mark
    /// gateways down or up, and return the probes for each of `targets`
    /// (the VIPs: ARP for IPv4, a neighbour solicitation for IPv6) to send
    /// on every gateway port.
    pub fn probe(
        &mut self,
        targets: &[IpAddr],
        health: &HealthConfig,
        now: Timestamp,
    ) -> ProbeRound {
        let mut round = ProbeRound::default();
        let ids: Vec<GwId> = self.gateways.iter().map(|g| g.id).collect();
        for id in ids {
            let g = self.gateways.get_mut(id).expect("listed");
            if let Some(healthy) = g.probe.judge(g.healthy, health) {
                g.healthy = healthy;
                round.changes.push((id, g.spec.name.clone(), healthy));
            }
            let port = g.spec.port;
            for &target in targets {
                round
                    .frames
                    .push((port, health::probe_frame(self.port_mac(port), target)));
            }
        }
        if !round.changes.is_empty() {
            self.push_set(now);
        }
        round
    }

    /// Put another policy in place. Without `rebalance` no tunnel moves;
    /// with it, every tunnel is placed afresh and the moves are counted
    /// (returned), all at once: for simulations and tests. The live
    /// balancer re-places a slice at a time ([`swap_policy`](Self::swap_policy),
    /// [`rebalance_step`](Self::rebalance_step)). Returns the old policy too.
    pub fn replace_policy(&mut self, policy: P, rebalance: bool, now: Timestamp) -> (P, u64) {
        let old = self.swap_policy(policy, rebalance, now);
        let moved = loop {
            if let Some(moved) = self.rebalance_step(usize::MAX, now) {
                break moved;
            }
        };
        (old, moved)
    }

    /// Put another policy in place; with `rebalance`, begin placing every
    /// tunnel afresh, which [`rebalance_step`](Self::rebalance_step) does a
    /// slice at a time (a rebalance still under way ends: its policy is
    /// gone). Returns the old policy.
    ///
    /// "Afresh" is what the policy is told: the set with every tunnel count
    /// at 0, then one `choose` per tunnel on the load it has placed so far,
    /// then the real counts. A policy that bounds loads (`weighted`) would
    /// otherwise see every gateway full before it placed the first tunnel.
    pub fn swap_policy(&mut self, policy: P, rebalance: bool, now: Timestamp) -> P {
        let old = self.policy.replace(policy);
        self.rebalancing = None;
        if rebalance {
            let mut empty = self.gateways.views();
            for g in &mut empty {
                g.tunnels = 0;
            }
            self.policy.set_gateways(empty, now);
            self.rebalancing = Some(Rebalancing {
                cursor: 0,
                began: now,
                fresh: Load::fresh_from(&self.load),
                moved: 0,
            });
        }
        old
    }

    /// Place up to `budget` more slots' tunnels afresh. `Some(moved)` once
    /// the rebalance is over (the policy is then told the real set), or
    /// when none is under way (`Some(0)`).
    ///
    /// A tunnel first seen after the rebalance began was placed by the new
    /// policy already, and is not visited. A tunnel with no room anywhere
    /// stays where it is (and counts there): a rebalance never evicts.
    pub fn rebalance_step(&mut self, budget: usize, now: Timestamp) -> Option<u64> {
        let Some(mut r) = self.rebalancing.take() else {
            return Some(0);
        };
        let end = self.table.slots().min(r.cursor.saturating_add(budget));
        for slot in r.cursor..end {
            let id = slot as TunnelId;
            let Some(t) = self.table.get(id) else {
                continue;
            };
            if t.since > r.began {
                continue;
            }
            let (key, current) = (key_of(t), t.gateway);
            let placed = match self.policy.choose(&key, &r.fresh, now) {
                Ok(choice) => {
                    let before = self.counters.moved;
                    self.move_tunnel(id, choice.gateway);
                    r.moved += self.counters.moved - before;
                    choice.gateway
                }
                Err(_) => current,
            };
            r.fresh.add(placed, 1);
        }
        r.cursor = end;
        if r.cursor < self.table.slots() {
            self.rebalancing = Some(r);
            return None;
        }
        self.push_set(now);
        Some(r.moved)
    }

    /// A rebalance is under way.
    pub fn is_rebalancing(&self) -> bool {
        self.rebalancing.is_some()
    }

    /// Forget idle tunnels (up to `budget` slots per call; see
    /// [`AffinityTable::expire`]), old fragment decisions, and held
    /// fragments whose first fragment did not come (counted as dropped).
    pub fn expire(&mut self, now: Timestamp, budget: usize) -> usize {
        let t = self.config.timeouts;
        let stale = self.fragments.expire(now, t.fragment_hold, t.fragment);
        self.counters.drops[DropReason::FragmentTimeout as usize] += stale as u64;
        let gone = self.table.expire(now, budget);
        for t in &gone {
            self.forget(t);
        }
        gone.len()
    }

    /// Announce `ip` on every port, from that port's MAC: a gratuitous ARP
    /// (IPv4) or an unsolicited neighbour advertisement (IPv6).
    pub fn announce(&self, ip: IpAddr) -> Vec<(PortId, Vec<u8>)> {
        (0..self.config.port_macs.len() as PortId)
            .map(|port| {
                let mac = self.port_mac(port);
                let frame = match ip {
                    IpAddr::V4(v4) => Arp::gratuitous(mac, v4).broadcast_frame(mac, None),
                    IpAddr::V6(v6) => packet::craft::frame(
                        packet::ndp::multicast_mac(packet::ndp::ALL_NODES),
                        mac,
                        None,
                        &packet::ndp::unsolicited(v6, mac),
                    ),
                };
                (port, frame)
            })
            .collect()
    }

    // ----- what it knows ---------------------------------------------------

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
