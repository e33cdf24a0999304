//! The fast path's share of the rules: which frames a kernel program may
//! forward without asking the core, and where to. Pure: computed from the
//! table with the core's own lookups ([`AffinityTable::find`]), so a frame
//! the fast path forwards is one the core would have forwarded the same
//! way, with the same two MACs, and changes nothing the core keeps but
//! counters and ages (which the host reads back).
//!
//! Only a tunnel its segw has confirmed (`Placement::Confirmed`), on a
//! segw that is up and whose MAC is known, with a next hop back: every
//! other state can change on the next frame (a guess a segw corrects, a
//! failed segw's tunnels re-placed), so those frames go to the core. Per
//! such tunnel:
//!
//! - ESP in UDP both ways, by the tunnel's endpoint (address, port), when
//!   the endpoint index finds this tunnel there;
//! - raw ESP both ways, by the address, when the address lookup raw ESP
//!   uses finds this tunnel (a tunnel on IKE port 500 sends raw ESP).
//!
//! IKE never: from the initiator it can prove the tunnel (and move its next
//! hop), from the segw it teaches SPIs. Nor fragments, ICMP errors, NAT
//! keepalives, VLAN-tagged frames. With SPI-range steering configured on
//! any segw, nothing: the SPI may speak for another segw than the table.
//!
//! [`AffinityTable::find`]: super::affinity::AffinityTable::find

use std::net::IpAddr;

use super::affinity::TunnelId;
use super::rules::{Find, Keys, Placement};
use super::{Balancer, PortId, UPLINK};
use crate::packet::Mac;
use crate::policy::Policy;
use crate::time::Timestamp;

/// Which way a frame goes, and so which of its addresses is the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Initiator → segw, keyed by the source.
    Up,
    /// Segw → initiator, keyed by the destination.
    Down,
}

/// One entry of the fast path: a frame that comes in on `ingress` going
/// `direction`, whose peer is `addr` (and UDP `port`; 0 for raw ESP), goes
/// out of `egress` with these MACs, counted on `tunnel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FastEntry {
    pub direction: Direction,
    pub addr: IpAddr,
    pub port: u16,
    pub tunnel: TunnelId,
    pub ingress: PortId,
    pub egress: PortId,
    pub dst: Mac,
    pub src: Mac,
}

impl<P: Policy> Balancer<P> {
    /// Moves on whenever what [`fast_path`](Self::fast_path) returns may
    /// have changed (a tunnel added, removed, moved, rebound or confirmed; a
    /// next hop; a segw's health, MAC or the set); frames that only age
    /// and count tunnels leave it. A copy of the entries is current while
    /// this is the same as when it was taken.
    pub fn epoch(&self) -> u64 {
        self.table.epoch().wrapping_add(self.epoch)
    }

    /// The fast path forwarded `frames` and `bytes` of tunnel `id` ([0]
    /// towards its segw, [1] back), last at `now`: counted as the core
    /// counts what it forwards itself, and the tunnel is not idle.
    pub fn fast_path_forwarded(
        &mut self,
        id: TunnelId,
        frames: [u64; 2],
        bytes: [u64; 2],
        now: Timestamp,
    ) {
        let total = frames[0] + frames[1];
        self.counters.forwarded += total;
        self.counters.fast_path += total;
        let Some(t) = self.table.get_mut(id) else {
            return;
        };
        t.last_seen = t.last_seen.max(now);
        t.frames += frames[0];
        t.bytes += bytes[0];
        let gw = t.gateway;
        if let Some(g) = self.gateways.get_mut(gw) {
            g.counters.frames_to += frames[0];
            g.counters.bytes_to += bytes[0];
            g.counters.frames_from += frames[1];
            g.counters.bytes_from += bytes[1];
        }
    }

    /// Every entry the fast path may hold now (see the module's doc).
    pub fn fast_path(&self) -> Vec<FastEntry> {
        let steering = self
            .gateways
            .iter()
            .any(|g| g.spec.steering.esp_range.is_some() || g.spec.steering.ike_label.is_some());
        if steering {
            return Vec::new();
        }
        let mut entries = Vec::new();
        for (id, t) in self.table.iter() {
            if t.placement() != Placement::Confirmed || !self.is_up(t.gateway) {
                continue;
            }
            let Some(gw) = self.gateways.get(t.gateway) else {
                continue;
            };
            // A frame the core sees with no next hop (the tunnel's, or the
            // default) teaches one: such a tunnel stays the core's.
            let (Some(segw_mac), Some(next_hop), Some(_)) =
                (gw.mac, t.next_hop, self.default_next_hop)
            else {
                continue;
            };
            let found = |find: &[Find], port: Option<u16>| {
                let keys = Keys {
                    spi: None,
                    addr: t.peer,
                    port,
                };
                self.table.find(find, &keys).map(|(found, _)| found) == Some(id)
            };
            // ESP in UDP: the endpoint index, exactly. Raw ESP: the address
            // lookup. Both ways each; a tunnel may have both (the core
            // would send raw ESP from a NAT'd peer's address to it too).
            let udp = (t.peer_port != 0 && found(&[Find::Endpoint], Some(t.peer_port)))
                .then_some(t.peer_port);
            let raw = found(&[Find::Address], None).then_some(0);
            let port_of_gw = gw.spec.port;
            for port in udp.into_iter().chain(raw) {
                entries.push(FastEntry {
                    direction: Direction::Up,
                    addr: t.peer,
                    port,
                    tunnel: id,
                    ingress: UPLINK,
                    egress: port_of_gw,
                    dst: segw_mac,
                    src: self.port_mac(port_of_gw),
                });
                entries.push(FastEntry {
                    direction: Direction::Down,
                    addr: t.peer,
                    port,
                    tunnel: id,
                    ingress: port_of_gw,
                    egress: UPLINK,
                    dst: next_hop,
                    src: self.port_mac(UPLINK),
                });
            }
        }
        entries
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::balancer::farm::{self, port_mac, segw_mac};
    use crate::balancer::Verdict;
    use crate::packet::craft::{esp_body, frame, ike_body, udp_packet};
    use crate::packet::ike::IKE_SA_INIT;
    use crate::packet::IkeHeader;
    use crate::policy::native;

    const ROUTER: Mac = [2, 0xaa, 0, 0, 0, 1];

    #[test]
    fn traffic_leaves_the_epoch_alone_and_a_segw_going_down_takes_its_entries() {
        let policy = native::shipped("round-robin", &[]).unwrap();
        let mut lb = farm::balancer(policy, 2, vec![], 64);
        let vip = IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1));
        let now = Timestamp::ZERO;
        let mut on = Vec::new();
        for n in 1..=4u8 {
            let peer = IpAddr::V4(Ipv4Addr::new(10, 1, 0, n));
            let h = |response: bool| IkeHeader {
                initiator_spi: u64::from(n),
                responder_spi: if response { 0x77 } else { 0 },
                exchange: IKE_SA_INIT,
                from_initiator: !response,
                response,
                message_id: 0,
            };
            let ip = udp_packet(peer, 500, vip, 500, &ike_body(&h(false), false, 100));
            let mut f = frame(port_mac(UPLINK), ROUTER, None, &ip);
            let Verdict::Forward(gw) = lb.handle(&mut f, UPLINK, now) else {
                panic!()
            };
            let ip = udp_packet(vip, 500, peer, 500, &ike_body(&h(true), false, 100));
            let mut f = frame(port_mac(gw), segw_mac(gw as u8), None, &ip);
            lb.handle(&mut f, gw, now);
            on.push((peer, gw));
        }
        // Per tunnel both ways: by endpoint (ESP in UDP from its IKE port,
        // as the core would take it) and by address (raw ESP).
        let entries = lb.fast_path();
        assert_eq!(entries.len(), 16, "{entries:?}");
        let epoch = lb.epoch();
        for &(peer, gw) in &on {
            let ip = crate::packet::craft::ip_packet(peer, vip, 50, &esp_body(9, 1, 80), 1);
            let mut f = frame(port_mac(UPLINK), ROUTER, None, &ip);
            assert_eq!(lb.handle(&mut f, UPLINK, now), Verdict::Forward(gw));
        }
        assert_eq!(lb.epoch(), epoch, "ESP of known tunnels changes no entry");
        lb.set_healthy("segw1", false, now).unwrap();
        assert_ne!(lb.epoch(), epoch);
        let left = lb.fast_path();
        assert_eq!(left.len(), 8);
        assert!(
            left.iter().all(|e| e.egress == 2 || e.ingress == 2),
            "{left:?}"
        );
    }
}
