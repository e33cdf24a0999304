//! Frames in, facts out: what the balancer needs to know about a frame.
//!
//! [`parse`] takes untrusted bytes and returns a [`Frame`] that borrows them,
//! or a [`Malformed`] naming what was wrong (the balancer counts it as a
//! drop; nothing here panics on any input). Ethernet with at most one 802.1Q
//! tag, ARP, IPv4 and IPv6 (with its fragment header) come from etherparse's
//! checked slices; IKE, NAT-T and ESP are ours ([`ike`]).
//!
//! This module owns no state and does no I/O. It never changes a byte:
//! building replies is [`arp`]'s, rewriting MACs is [`rewrite`]'s.

pub mod arp;
pub(crate) mod checksum;
pub mod craft;
pub mod ike;
pub mod ndp;
pub mod pcap;
pub mod rewrite;
pub mod wire;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{Ipv4Slice, Ipv6ExtensionSlice, Ipv6Slice};

pub use ike::IkeHeader;

/// An Ethernet address.
pub type Mac = [u8; 6];

pub const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;

use wire::{ESP_HEADER_LEN, ESP_SPI_LEN, NON_ESP_MARKER, PROTO_ESP, PROTO_UDP};
pub use wire::{PORT_IKE, PORT_NATT};

/// Why a frame could not be used. Each is a drop counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Malformed {
    #[error("shorter than an Ethernet header")]
    Ethernet,
    #[error("more than one VLAN tag")]
    VlanStack,
    #[error("truncated VLAN tag")]
    Vlan,
    #[error("bad ARP packet")]
    Arp,
    #[error("bad IPv4 header or length")]
    Ipv4,
    #[error("bad IPv6 header, extension or length")]
    Ipv6,
    #[error("truncated UDP header")]
    Udp,
    #[error("truncated IKE header")]
    Ike,
    #[error("truncated ESP header")]
    Esp,
}

impl Malformed {
    pub const ALL: [Malformed; 9] = [
        Malformed::Ethernet,
        Malformed::VlanStack,
        Malformed::Vlan,
        Malformed::Arp,
        Malformed::Ipv4,
        Malformed::Ipv6,
        Malformed::Udp,
        Malformed::Ike,
        Malformed::Esp,
    ];
}

/// A parsed frame, borrowing the bytes it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub dst: Mac,
    pub src: Mac,
    pub vlan: Option<u16>,
    /// Where the L3 packet starts (14, or 18 with a VLAN tag).
    pub l3_offset: usize,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Arp(arp::Arp),
    Ip(IpPacket),
    /// An EtherType we do not handle.
    Other(u16),
}

/// An IP packet, as far as tunnel affinity cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpPacket {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP packet length in bytes (from the header, not the frame).
    pub len: usize,
    pub fragment: Option<Fragment>,
    pub payload: Payload,
}

/// A piece of a fragmented IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fragment {
    /// IPv4's 16-bit ID or IPv6's 32-bit identification.
    pub id: u32,
    /// The first fragment (offset 0) carries the transport header.
    pub first: bool,
    /// The protocol of the packet it is a piece of (IPv4's protocol, the
    /// next header after IPv6's fragment header): with the addresses and
    /// the ID, what names the packet (RFC 791, RFC 8200).
    pub protocol: u8,
}

/// What an IP packet carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// IKE on UDP 500, or on 4500 behind the non-ESP marker (`nat_t`).
    Ike {
        udp: Udp,
        header: IkeHeader,
        nat_t: bool,
    },
    /// The one-byte 0xFF NAT keepalive on UDP 4500.
    NatKeepalive { udp: Udp },
    /// ESP in UDP on 4500.
    EspInUdp { udp: Udp, spi: u32 },
    /// ESP, IP protocol 50.
    Esp { spi: u32 },
    /// UDP on neither 500 nor 4500.
    OtherUdp { udp: Udp },
    /// A non-first fragment: no transport header to look at.
    LaterFragment { protocol: u8 },
    /// An IPv6 neighbour solicitation (proxy-NDP answers it).
    NeighborSolicit(ndp::Solicitation),
    /// ICMP/ICMPv6 error quoting a packet (destination unreachable,
    /// fragmentation needed, packet too big, time exceeded).
    IcmpError { quoted: Option<Quoted> },
    /// Anything else (including ICMP that is not an error, NDP).
    Other { protocol: u8 },
}

/// UDP ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Udp {
    pub src: u16,
    pub dst: u16,
}

/// The packet an ICMP error quotes: enough to find its tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quoted {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// UDP ports when the quote is UDP and long enough.
    pub udp: Option<Udp>,
    /// The ESP SPI when the quote is ESP (raw or in UDP) and long enough.
    pub spi: Option<u32>,
}

/// Parse one Ethernet frame (without FCS).
pub fn parse(frame: &[u8]) -> Result<Frame, Malformed> {
    if frame.len() < ETH_HEADER {
        return Err(Malformed::Ethernet);
    }
    let dst = mac_at(frame, 0);
    let src = mac_at(frame, 6);
    let mut ether_type = u16_at(frame, 12);
    let mut l3_offset = ETH_HEADER;
    let mut vlan = None;
    if matches!(ether_type, ETHERTYPE_VLAN | ETHERTYPE_QINQ) {
        if frame.len() < ETH_HEADER + 4 {
            return Err(Malformed::Vlan);
        }
        vlan = Some(u16_at(frame, 14) & 0x0fff);
        ether_type = u16_at(frame, 16);
        l3_offset += 4;
        if matches!(ether_type, ETHERTYPE_VLAN | ETHERTYPE_QINQ) {
            return Err(Malformed::VlanStack);
        }
    }
    let l3 = &frame[l3_offset..];
    let kind = match ether_type {
        ETHERTYPE_ARP => Kind::Arp(arp::Arp::parse(l3).ok_or(Malformed::Arp)?),
        ETHERTYPE_IPV4 => Kind::Ip(parse_ipv4(l3)?),
        ETHERTYPE_IPV6 => Kind::Ip(parse_ipv6(l3)?),
        other => Kind::Other(other),
    };
    Ok(Frame {
        dst,
        src,
        vlan,
        l3_offset,
        kind,
    })
}

fn parse_ipv4(l3: &[u8]) -> Result<IpPacket, Malformed> {
    let ip = Ipv4Slice::from_slice(l3).map_err(|_| Malformed::Ipv4)?;
    let h = ip.header();
    let offset = h.fragments_offset().value();
    let protocol = h.protocol().0;
    let fragment = (h.more_fragments() || offset != 0).then_some(Fragment {
        id: u32::from(h.identification()),
        first: offset == 0,
        protocol,
    });
    let (src, dst) = (
        IpAddr::V4(h.source_addr()),
        IpAddr::V4(h.destination_addr()),
    );
    let payload = classify(protocol, ip.payload().payload, fragment, false)?;
    Ok(IpPacket {
        src,
        dst,
        len: usize::from(h.total_len()),
        fragment,
        payload,
    })
}

fn parse_ipv6(l3: &[u8]) -> Result<IpPacket, Malformed> {
    let ip = Ipv6Slice::from_slice(l3).map_err(|_| Malformed::Ipv6)?;
    let h = ip.header();
    let payload = ip.payload();
    let fragment = ip
        .extensions()
        .clone()
        .into_iter()
        .find_map(|ext| match ext {
            Ipv6ExtensionSlice::Fragment(f) if f.is_fragmenting_payload() => Some(Fragment {
                id: f.identification(),
                first: f.fragment_offset().value() == 0,
                protocol: payload.ip_number.0,
            }),
            _ => None,
        });
    let (src, dst) = (
        IpAddr::V6(h.source_addr()),
        IpAddr::V6(h.destination_addr()),
    );
    let payload = classify(payload.ip_number.0, payload.payload, fragment, true)?;
    Ok(IpPacket {
        src,
        dst,
        len: 40 + usize::from(h.payload_length()),
        fragment,
        payload,
    })
}

/// What an IP payload is. `v6` tells ICMP from ICMPv6 semantics.
fn classify(
    protocol: u8,
    data: &[u8],
    fragment: Option<Fragment>,
    v6: bool,
) -> Result<Payload, Malformed> {
    if fragment.is_some_and(|f| !f.first) {
        return Ok(Payload::LaterFragment { protocol });
    }
    match protocol {
        PROTO_UDP => classify_udp(data),
        PROTO_ESP if data.len() >= ESP_SPI_LEN => Ok(Payload::Esp {
            spi: u32_at(data, 0),
        }),
        PROTO_ESP => Err(Malformed::Esp),
        PROTO_ICMP if !v6 => Ok(classify_icmp(data, &[3, 11], false)),
        PROTO_ICMPV6 if v6 => Ok(classify_icmp(data, &[1, 2, 3], true)),
        _ => Ok(Payload::Other { protocol }),
    }
}

fn classify_udp(data: &[u8]) -> Result<Payload, Malformed> {
    if data.len() < 8 {
        return Err(Malformed::Udp);
    }
    let udp = Udp {
        src: u16_at(data, 0),
        dst: u16_at(data, 2),
    };
    let body = &data[8..];
    // The IKE side's port: the destination on the way to a segw, the
    // source on the way back; read without knowing the way, so a peer on
    // 500 or 4500 can decide it (`wire`'s table: the XDP program reads it
    // alike).
    let ike_port = [udp.dst, udp.src]
        .into_iter()
        .find(|p| matches!(*p, PORT_IKE | PORT_NATT));
    Ok(match ike_port {
        Some(PORT_IKE) => Payload::Ike {
            udp,
            header: IkeHeader::parse(body).ok_or(Malformed::Ike)?,
            nat_t: false,
        },
        Some(_) => match body {
            [0xff] => Payload::NatKeepalive { udp },
            _ if u32_at_checked(body, 0) == Some(NON_ESP_MARKER) => Payload::Ike {
                udp,
                header: IkeHeader::parse(&body[4..]).ok_or(Malformed::Ike)?,
                nat_t: true,
            },
            _ if body.len() >= ESP_HEADER_LEN => Payload::EspInUdp {
                udp,
                spi: u32_at(body, 0),
            },
            _ => return Err(Malformed::Esp),
        },
        None => Payload::OtherUdp { udp },
    })
}

/// ICMP(v6) errors of the given types quote the offending packet after the
/// 8-byte ICMP header. The quote is often truncated, so it is parsed
/// leniently and whatever is missing stays `None`.
fn classify_icmp(data: &[u8], error_types: &[u8], v6: bool) -> Payload {
    if v6 && data.first() == Some(&ndp::SOLICITATION) {
        if let Some(s) = ndp::Solicitation::parse(data) {
            return Payload::NeighborSolicit(s);
        }
    }
    match data.first() {
        Some(t) if error_types.contains(t) && data.len() >= 8 => Payload::IcmpError {
            quoted: quoted(&data[8..], v6),
        },
        _ => Payload::Other {
            protocol: if v6 { PROTO_ICMPV6 } else { PROTO_ICMP },
        },
    }
}

fn quoted(q: &[u8], v6: bool) -> Option<Quoted> {
    let (src, dst, protocol, rest) = if v6 {
        if q.len() < 40 || q[0] >> 4 != 6 {
            return None;
        }
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&q[8..24]).ok()?);
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&q[24..40]).ok()?);
        (IpAddr::V6(src), IpAddr::V6(dst), q[6], &q[40..])
    } else {
        let ihl = usize::from(q.first()? & 0x0f) * 4;
        if q.len() < 20 || q[0] >> 4 != 4 || ihl < 20 || q.len() < ihl {
            return None;
        }
        let src = Ipv4Addr::new(q[12], q[13], q[14], q[15]);
        let dst = Ipv4Addr::new(q[16], q[17], q[18], q[19]);
        (IpAddr::V4(src), IpAddr::V4(dst), q[9], &q[ihl..])
    };
    let (udp, spi) = match protocol {
        PROTO_UDP if rest.len() >= 4 => {
            let udp = Udp {
                src: u16_at(rest, 0),
                dst: u16_at(rest, 2),
            };
            let natt = udp.src == PORT_NATT || udp.dst == PORT_NATT;
            // ESP-in-UDP: an SPI after the UDP header, unless the marker.
            let spi = u32_at_checked(rest, 8).filter(|&spi| natt && spi != 0);
            (Some(udp), spi)
        }
        PROTO_ESP => (None, u32_at_checked(rest, 0)),
        _ => (None, None),
    };
    Some(Quoted { src, dst, udp, spi })
}

fn mac_at(b: &[u8], at: usize) -> Mac {
    let mut mac = [0; 6];
    mac.copy_from_slice(&b[at..at + 6]);
    mac
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u32_at_checked(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests;

/// For tests elsewhere in the crate: does this ICMPv6 message's checksum
/// verify?
#[cfg(test)]
pub(crate) fn checksum_ok_for_test(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> bool {
    checksum::icmpv6(src, dst, icmp) == 0
}
