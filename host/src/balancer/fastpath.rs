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
