//! ARP for IPv4 over Ethernet: parse, and build the frames segwlb sends
//! (proxy replies, gratuitous announcements, probes).

use std::net::Ipv4Addr;

use super::Mac;

pub const REQUEST: u16 = 1;
pub const REPLY: u16 = 2;
const LEN: usize = 28;
const BROADCAST: Mac = [0xff; 6];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sender_mac: Mac,
    pub sender_ip: Ipv4Addr,
    pub target_mac: Mac,
    pub target_ip: Ipv4Addr,
}

impl Arp {
    /// Ethernet/IPv4 ARP only; anything else is `None`.
    pub fn parse(b: &[u8]) -> Option<Arp> {
        let b = b.get(..LEN)?;
        let is_ether_ipv4 = b[0..2] == [0, 1] && b[2..4] == [0x08, 0x00] && b[4] == 6 && b[5] == 4;
        if !is_ether_ipv4 {
            return None;
        }
        let mac = |at: usize| -> Mac { b[at..at + 6].try_into().expect("6 bytes") };
        let ip = |at: usize| Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]);
        Some(Arp {
            op: u16::from_be_bytes([b[6], b[7]]),
            sender_mac: mac(8),
            sender_ip: ip(14),
            target_mac: mac(18),
            target_ip: ip(24),
        })
    }

    /// The ARP packet as a frame from `src` to `dst`, keeping a VLAN tag.
    pub fn to_frame(&self, dst: Mac, src: Mac, vlan: Option<u16>) -> Vec<u8> {
        let mut f = Vec::with_capacity(18 + LEN);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        if let Some(id) = vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&(id & 0x0fff).to_be_bytes());
        }
        f.extend_from_slice(&0x0806u16.to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
        f.extend_from_slice(&self.op.to_be_bytes());
        f.extend_from_slice(&self.sender_mac);
        f.extend_from_slice(&self.sender_ip.octets());
        f.extend_from_slice(&self.target_mac);
        f.extend_from_slice(&self.target_ip.octets());
        f
    }

    /// Our answer to this request: `target_ip` is at `our_mac`.
    pub fn reply(&self, our_mac: Mac) -> Arp {
        Arp {
            op: REPLY,
            sender_mac: our_mac,
            sender_ip: self.target_ip,
            target_mac: self.sender_mac,
            target_ip: self.sender_ip,
        }
    }

    /// A request for `target` from `(our_ip, our_mac)`.
    pub fn request(our_mac: Mac, our_ip: Ipv4Addr, target: Ipv4Addr) -> Arp {
        Arp {
            op: REQUEST,
            sender_mac: our_mac,
            sender_ip: our_ip,
            target_mac: [0; 6],
            target_ip: target,
        }
    }

    /// A gratuitous ARP announcing `ip` at `mac` (a request for itself,
    /// which every Linux neighbour table takes).
    pub fn gratuitous(mac: Mac, ip: Ipv4Addr) -> Arp {
        Arp {
            op: REQUEST,
            sender_mac: mac,
            sender_ip: ip,
            target_mac: [0; 6],
            target_ip: ip,
        }
    }

    /// Frames for a request or announcement go to everybody.
    pub fn broadcast_frame(&self, src: Mac, vlan: Option<u16>) -> Vec<u8> {
        self.to_frame(BROADCAST, src, vlan)
    }
}
