//! Proxy-NDP: neighbour solicitations in, neighbour advertisements out
//! (RFC 4861 §4.3, §4.4), for IPv6 what proxy-ARP is for IPv4.

use std::net::{IpAddr, Ipv6Addr};

use super::{checksum, craft, Mac};

pub const SOLICITATION: u8 = 135;
pub const ADVERTISEMENT: u8 = 136;
const OPT_SOURCE_LL: u8 = 1;
const OPT_TARGET_LL: u8 = 2;
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// A neighbour solicitation: who has `target`?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Solicitation {
    pub target: Ipv6Addr,
    /// The solicitor's MAC, from its source link-layer address option.
    pub source_mac: Option<Mac>,
}

impl Solicitation {
    /// From an ICMPv6 message (type 135 checked by the caller).
    pub fn parse(icmp: &[u8]) -> Option<Solicitation> {
        let target: [u8; 16] = icmp.get(8..24)?.try_into().ok()?;
        let mut source_mac = None;
        let mut options = &icmp[24..];
        // Options are (type, length in 8-byte units, …); a zero length is
        // invalid and would loop forever.
        while let [kind, len, ..] = *options {
            let len = usize::from(len) * 8;
            if len == 0 || options.len() < len {
                break;
            }
            if kind == OPT_SOURCE_LL && len >= 8 {
                source_mac = options[2..8].try_into().ok();
            }
            options = &options[len..];
        }
        Some(Solicitation {
            target: Ipv6Addr::from(target),
            source_mac,
        })
    }
}

/// A neighbour advertisement of `target` at `mac`, as an IPv6 packet from
/// `target` to `to`: solicited (S) when `to` asked, override (O) always.
pub fn advertisement(target: Ipv6Addr, mac: Mac, to: Ipv6Addr, solicited: bool) -> Vec<u8> {
    let flags: u32 = if solicited { 0x6000_0000 } else { 0x2000_0000 };
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[ADVERTISEMENT, 0, 0, 0]);
    icmp.extend_from_slice(&flags.to_be_bytes());
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[OPT_TARGET_LL, 1]);
    icmp.extend_from_slice(&mac);
    let sum = checksum::icmpv6(target, to, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut packet = craft::ip_packet(IpAddr::V6(target), IpAddr::V6(to), 58, &icmp, 0);
    packet[7] = 255; // hop limit: receivers drop NDP that crossed a router
    packet
}

/// The answer to a solicitation that came from `from` at `from_mac`, with
/// the Ethernet destination to send it to: the solicitor, or all nodes when
/// it asked from the unspecified address (DAD).
pub fn answer(s: &Solicitation, from: Ipv6Addr, from_mac: Mac, our_mac: Mac) -> (Mac, Vec<u8>) {
    if from.is_unspecified() {
        (
            multicast_mac(ALL_NODES),
            advertisement(s.target, our_mac, ALL_NODES, false),
        )
    } else {
        (from_mac, advertisement(s.target, our_mac, from, true))
    }
}

/// An unsolicited advertisement to all nodes, to announce `ip` at `mac`.
pub fn unsolicited(ip: Ipv6Addr, mac: Mac) -> Vec<u8> {
    advertisement(ip, mac, ALL_NODES, false)
}

/// The Ethernet multicast address of an IPv6 multicast group (RFC 2464).
pub fn multicast_mac(group: Ipv6Addr) -> Mac {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The solicited-node multicast group of an address.
pub fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The link-local address a port with `mac` uses (modified EUI-64, RFC
/// 4291 §2.5.1): the source of our neighbour solicitations, and an address
/// we answer for on that port.
pub fn link_local(mac: Mac) -> Ipv6Addr {
    let m = mac;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 0x02,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

/// A solicitation for `target`, from `src` at `mac`, as an IPv6 packet.
pub fn solicitation(src: Ipv6Addr, mac: Mac, target: Ipv6Addr) -> Vec<u8> {
    let dst = solicited_node(target);
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[SOLICITATION, 0, 0, 0, 0, 0, 0, 0]);
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[OPT_SOURCE_LL, 1]);
    icmp.extend_from_slice(&mac);
    let sum = checksum::icmpv6(src, dst, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut packet = craft::ip_packet(IpAddr::V6(src), IpAddr::V6(dst), 58, &icmp, 0);
    packet[7] = 255;
    packet
}
