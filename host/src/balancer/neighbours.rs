//! What the balancer says on the links besides forwarding: answers to ARP
//! and neighbour solicitations for the addresses it proxies, the segws' MACs
//! learnt from what they send, the uplink's configured next hop (resolved
//! like a segw's MAC), health probe rounds, and announcements (gratuitous
//! ARP, unsolicited neighbour advertisements).

use std::net::IpAddr;

use crate::packet::{self, arp::Arp, IpPacket, Kind, Mac, Payload};
use crate::policy::Policy;
use crate::time::Timestamp;

use super::gateways::{GwId, PortId, UPLINK};
use super::health::{self, HealthConfig, ProbeRound};
use super::Balancer;

/// The largest proxied prefix whose every address is announced at a
/// takeover (a /24).
pub const ANNOUNCED_PREFIX: u128 = 256;
/// The most addresses the segws asked for that are remembered.
pub const ASKED_MAX: usize = 4_096;

/// Where return traffic goes when a tunnel's own next hop is not known yet
/// (a restart without a state file: until each initiator speaks again),
/// as configured, instead of the last next hop an initiator's frame came
/// from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkNextHop {
    /// This MAC, always: nothing on the segment can change it.
    Mac(Mac),
    /// The MAC of this address, asked for on the uplink with every probe
    /// round (ARP, or a neighbour solicitation) and taken from its answer
    /// (an ARP from it, or ICMPv6 from it), as segws' MACs are.
    Address(IpAddr),
}

impl<P: Policy> Balancer<P> {
    /// Configure the uplink's next hop (`None`: learned from initiators'
    /// frames, as without it).
    pub fn set_uplink_next_hop(&mut self, hop: Option<UplinkNextHop>) {
        self.uplink_next_hop = hop;
        let mac = match hop {
            Some(UplinkNextHop::Mac(mac)) => Some(mac),
            Some(UplinkNextHop::Address(_)) => None,
            None => return,
        };
        self.set_default_next_hop(mac);
    }

    pub(super) fn set_default_next_hop(&mut self, mac: Option<Mac>) {
        if self.default_next_hop.is_some() != mac.is_some() {
            // Only whether there is one is the fast path's business.
            self.fast_path_changed();
        }
        self.default_next_hop = mac;
    }

    /// Whether the default next hop is configured (frames from initiators
    /// do not set it then).
    pub(super) fn next_hop_configured(&self) -> bool {
        self.uplink_next_hop.is_some()
    }

    /// `from` on the uplink, at `mac`, is the configured next hop's
    /// address: its MAC is the next hop now.
    pub(super) fn heard_from_next_hop(&mut self, from: IpAddr, mac: Mac) -> bool {
        if self.uplink_next_hop != Some(UplinkNextHop::Address(from)) {
            return false;
        }
        if self.default_next_hop != Some(mac) {
            self.set_default_next_hop(Some(mac));
        }
        true
    }

    /// Ours: frames sent to the port's MAC, and the broadcast ARP and
    /// multicast neighbour solicitations that may be for an address we
    /// proxy.
    pub(super) fn addressed_to_us(&self, f: &packet::Frame, ingress: PortId) -> bool {
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
    pub(super) fn arp(&mut self, arp: &Arp, ingress: PortId) -> Option<Arp> {
        // Only a segw's own words teach its MAC. On a segment shared by a
        // pair the other balancer speaks too: its health probes (ARP
        // probes, sender 0.0.0.0) and, after a takeover, gratuitous ARPs
        // claiming the proxied addresses (no segw claims those).
        let probe = arp.op == packet::arp::REQUEST && arp.sender_ip.is_unspecified();
        let claim =
            arp.sender_ip == arp.target_ip && self.proxies(IpAddr::V4(arp.sender_ip), ingress);
        if !probe && !claim {
            self.heard_from_segw(ingress, arp.sender_mac);
        }
        if ingress == UPLINK {
            self.heard_from_next_hop(IpAddr::V4(arp.sender_ip), arp.sender_mac);
        }
        let proxied = self.proxies(IpAddr::V4(arp.target_ip), ingress);
        let answer = arp.op == packet::arp::REQUEST && proxied && arp.sender_ip != arp.target_ip;
        if answer {
            self.note_asked(IpAddr::V4(arp.target_ip), ingress);
        }
        answer.then(|| arp.reply(self.port_mac(ingress)))
    }

    /// A segw asked for proxied address `ip`: its neighbour cache holds
    /// our MAC for it, which a takeover must say again.
    pub(super) fn note_asked(&mut self, ip: IpAddr, ingress: PortId) {
        if ingress != UPLINK && self.asked.len() < ASKED_MAX {
            self.asked.insert(ip);
        }
    }

    /// What a standby learns from a frame it drops: the proxied addresses
    /// the segws ask the active for (their requests are broadcast).
    pub(super) fn overhear(&mut self, frame: &[u8], ingress: PortId) {
        if ingress == UPLINK {
            return;
        }
        let Ok(parsed) = packet::parse(frame) else {
            return;
        };
        let asked = match &parsed.kind {
            Kind::Arp(arp) if arp.op == packet::arp::REQUEST && arp.sender_ip != arp.target_ip => {
                IpAddr::V4(arp.target_ip)
            }
            Kind::Ip(IpPacket {
                payload: Payload::NeighborSolicit(ns),
                ..
            }) => IpAddr::V6(ns.target),
            _ => return,
        };
        if self.proxies(asked, ingress) {
            self.note_asked(asked, ingress);
        }
    }

    /// A segw spoke on its port (ARP, or a neighbour solicitation): it is
    /// alive, and at `mac` unless its MAC is configured.
    pub(super) fn heard_from_segw(&mut self, ingress: PortId, mac: Mac) {
        if ingress == UPLINK {
            return;
        }
        if let Some(gw) = self.gateways.on_port_mut(ingress) {
            if gw.spec.mac.is_none() && gw.mac != Some(mac) {
                gw.mac = Some(mac);
                self.epoch += 1; // the fast path's entries carry the MAC
            }
            gw.probe.heard = true;
        }
    }

    pub(super) fn proxies(&self, ip: IpAddr, ingress: PortId) -> bool {
        let prefixes = if ingress == UPLINK {
            &self.config.proxy
        } else {
            &self.config.proxy_gateways
        };
        prefixes.iter().any(|p| p.contains(ip))
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
        if let Some(UplinkNextHop::Address(hop)) = self.uplink_next_hop {
            let probe = health::probe_frame(self.port_mac(UPLINK), hop);
            round.frames.push((UPLINK, probe));
        }
        if !round.changes.is_empty() {
            self.fast_path_changed();
            self.push_set(now);
        }
        round
    }

    /// What a standby that takes over says on its links, so that every
    /// neighbour cache pointing at the failed balancer points here now: the
    /// VIPs on the uplink; on every segw port, the proxied addresses the
    /// segws asked for (a next hop they route the initiators through, say:
    /// overheard while standby), each address in a small proxied prefix
    /// (≤ [`ANNOUNCED_PREFIX`] addresses) and the address of each tunnel's
    /// peer that is proxied there (what a segw's cache holds when the
    /// initiators are on-link to it), at most `cap` addresses in all. A cache entry not announced to goes stale and is asked for
    /// again (broadcast, after its unicast probes to the old MAC fail).
    pub fn takeover_announcements(&self, vips: &[IpAddr], cap: usize) -> Vec<(PortId, Vec<u8>)> {
        let mut out: Vec<(PortId, Vec<u8>)> = vips
            .iter()
            .flat_map(|&vip| self.announce(vip))
            .filter(|(port, _)| *port == UPLINK)
            .collect();
        let small = self
            .config
            .proxy_gateways
            .iter()
            .filter(|p| p.size() <= ANNOUNCED_PREFIX)
            .flat_map(|p| p.addresses());
        let peers = self
            .table
            .iter()
            .map(|(_, t)| t.peer)
            .filter(|&ip| self.config.proxy_gateways.iter().any(|p| p.contains(ip)));
        let mut seen = std::collections::HashSet::new();
        for ip in self.asked.iter().copied().chain(small).chain(peers) {
            if seen.len() >= cap {
                break;
            }
            if seen.insert(ip) {
                out.extend(self.announce(ip).into_iter().filter(|(p, _)| *p != UPLINK));
            }
        }
        out
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
}
