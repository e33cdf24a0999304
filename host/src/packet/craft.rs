//! Build the frames IPsec peers send: IKE on 500 and 4500, ESP in UDP, raw
//! ESP, NAT keepalives, IP fragments, ICMP errors. Used by the tests and by
//! the simulation, which drive the balancer with real frames.
//!
//! Checksums are computed (IPv4 header, UDP, ICMP), so a frame built here
//! is what a capture would show.

use std::net::IpAddr;

use etherparse::{IpNumber, Ipv4Header, Ipv6FragmentHeader, Ipv6Header, UdpHeader};

use super::{checksum, IkeHeader, Mac};

/// The 28-byte IKE header, then `extra` bytes of payload; with `nat_t`,
/// behind the 4-byte non-ESP marker.
pub fn ike_body(h: &IkeHeader, nat_t: bool, extra: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + IkeHeader::LEN + extra);
    if nat_t {
        b.extend_from_slice(&[0; 4]);
    }
    b.extend_from_slice(&h.initiator_spi.to_be_bytes());
    b.extend_from_slice(&h.responder_spi.to_be_bytes());
    let flags = if h.from_initiator { 0x08 } else { 0 } | if h.response { 0x20 } else { 0 };
    b.extend_from_slice(&[33, 0x20, h.exchange, flags]);
    b.extend_from_slice(&h.message_id.to_be_bytes());
    b.extend_from_slice(&((IkeHeader::LEN + extra) as u32).to_be_bytes());
    b.resize(b.len() + extra, 0x5a);
    b
}

/// An ESP packet: SPI, sequence number, then `len - 8` bytes of ciphertext.
pub fn esp_body(spi: u32, seq: u32, len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(len.max(8));
    b.extend_from_slice(&spi.to_be_bytes());
    b.extend_from_slice(&seq.to_be_bytes());
    b.resize(len.max(8), 0xe5);
    b
}

/// The NAT keepalive (RFC 3948): one 0xFF byte on UDP 4500.
pub fn keepalive_body() -> Vec<u8> {
    vec![0xff]
}

/// A UDP datagram in an IP packet, checksums included.
pub fn udp_packet(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, body: &[u8]) -> Vec<u8> {
    let mut udp = Vec::with_capacity(8 + body.len());
    let header = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => UdpHeader::with_ipv4_checksum(
            sport,
            dport,
            &ipv4_header(s.octets(), d.octets(), 17, 8 + body.len(), 1),
            body,
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => UdpHeader::with_ipv6_checksum(
            sport,
            dport,
            &ipv6_header(s.octets(), d.octets(), 17, 8 + body.len()),
            body,
        ),
        _ => panic!("udp_packet: mixed address families"),
    }
    .expect("UDP length fits");
    udp.extend_from_slice(&header.to_bytes());
    udp.extend_from_slice(body);
    ip_packet(src, dst, 17, &udp, 1)
}

/// An IP packet around `payload` (IPv4 with identification `id`).
pub fn ip_packet(src: IpAddr, dst: IpAddr, protocol: u8, payload: &[u8], id: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(40 + payload.len());
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            ipv4_header(s.octets(), d.octets(), protocol, payload.len(), id)
                .write(&mut p)
                .expect("write to a Vec");
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            ipv6_header(s.octets(), d.octets(), protocol, payload.len())
                .write(&mut p)
                .expect("write to a Vec");
        }
        _ => panic!("ip_packet: mixed address families"),
    }
    p.extend_from_slice(payload);
    p
}

fn ipv4_header(
    src: [u8; 4],
    dst: [u8; 4],
    protocol: u8,
    payload_len: usize,
    id: u16,
) -> Ipv4Header {
    let mut h =
        Ipv4Header::new(payload_len as u16, 64, IpNumber(protocol), src, dst).expect("length fits");
    h.identification = id;
    h.header_checksum = h.calc_header_checksum();
    h
}

fn ipv6_header(src: [u8; 16], dst: [u8; 16], next: u8, payload_len: usize) -> Ipv6Header {
    Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: payload_len as u16,
        next_header: IpNumber(next),
        hop_limit: 64,
        source: src,
        destination: dst,
    }
}

/// An Ethernet frame around an IP packet (EtherType from its version).
pub fn frame(dst: Mac, src: Mac, vlan: Option<u16>, ip: &[u8]) -> Vec<u8> {
    let ether_type: u16 = if ip.first().is_some_and(|b| b >> 4 == 6) {
        0x86dd
    } else {
        0x0800
    };
    let mut f = Vec::with_capacity(18 + ip.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(id) = vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&(id & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

/// Split an IP packet (as built above: IPv4 without options, or IPv6 with
/// no extension headers) into fragments carrying at most `chunk` bytes of
/// payload each (rounded down to a multiple of 8), with identification `id`.
pub fn fragments(packet: &[u8], chunk: usize, id: u32) -> Vec<Vec<u8>> {
    let chunk = (chunk / 8).max(1) * 8;
    let v6 = packet[0] >> 4 == 6;
    let header_len = if v6 { 40 } else { 20 };
    let (header, payload) = packet.split_at(header_len);
    let pieces: Vec<&[u8]> = payload.chunks(chunk).collect();
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let offset = (i * chunk) as u16;
            let more = i + 1 < pieces.len();
            let mut out = Vec::with_capacity(header_len + 8 + piece.len());
            if v6 {
                let mut h = Ipv6Header::from_slice(header).expect("an IPv6 header").0;
                let next = h.next_header;
                h.next_header = IpNumber::IPV6_FRAGMENTATION_HEADER;
                h.payload_length = (8 + piece.len()) as u16;
                h.write(&mut out).expect("write to a Vec");
                let frag = Ipv6FragmentHeader::new(
                    next,
                    etherparse::IpFragOffset::try_new(offset / 8).expect("fits"),
                    more,
                    id,
                );
                frag.write(&mut out).expect("write to a Vec");
            } else {
                let mut h = Ipv4Header::from_slice(header).expect("an IPv4 header").0;
                h.identification = id as u16;
                h.more_fragments = more;
                h.fragment_offset = etherparse::IpFragOffset::try_new(offset / 8).expect("fits");
                h.total_len = (20 + piece.len()) as u16;
                h.header_checksum = h.calc_header_checksum();
                h.write(&mut out).expect("write to a Vec");
            }
            out.extend_from_slice(piece);
            out
        })
        .collect()
}

/// An ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6) error
/// from `from` to `to`, quoting the first bytes of `offending` (an IP packet)
/// as routers do.
pub fn icmp_too_big(from: IpAddr, to: IpAddr, offending: &[u8], mtu: u32) -> Vec<u8> {
    let v6 = from.is_ipv6();
    let quote = &offending[..offending.len().min(if v6 { 1232 } else { 548 })];
    let mut icmp = Vec::with_capacity(8 + quote.len());
    if v6 {
        icmp.extend_from_slice(&[2, 0, 0, 0]);
        icmp.extend_from_slice(&mtu.to_be_bytes());
    } else {
        icmp.extend_from_slice(&[3, 4, 0, 0, 0, 0]);
        icmp.extend_from_slice(&(mtu as u16).to_be_bytes());
    }
    icmp.extend_from_slice(quote);
    let sum = match (from, to) {
        (IpAddr::V6(s), IpAddr::V6(d)) => checksum::icmpv6(s, d, &icmp),
        _ => checksum::internet(&icmp),
    };
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    ip_packet(from, to, if v6 { 58 } else { 1 }, &icmp, 7)
}

/// One ESP packet over IPv4 or IPv6 in an Ethernet frame, written into
/// `buf` (cleared first) without allocating: what the simulation sends
/// millions of. With ports it is ESP in UDP (RFC 3948), whose UDP checksum
/// senders leave at zero over IPv4 as strongSwan does (over IPv6 it is
/// required, and computed); without, raw ESP (protocol 50). `from` and `to`
/// are of one family.
pub struct EspFrame {
    pub dst: Mac,
    pub src: Mac,
    pub from: IpAddr,
    pub to: IpAddr,
    /// (source port, destination port) for ESP in UDP.
    pub ports: Option<(u16, u16)>,
    pub spi: u32,
    pub seq: u32,
    /// ESP bytes: SPI, sequence number, then ciphertext (at least 8).
    pub len: usize,
}

impl EspFrame {
    pub fn write(&self, buf: &mut Vec<u8>) {
        let esp_len = self.len.max(8);
        let udp_len = if self.ports.is_some() { 8 } else { 0 };
        let protocol = if self.ports.is_some() { 17 } else { 50 };
        buf.clear();
        buf.extend_from_slice(&self.dst);
        buf.extend_from_slice(&self.src);
        let header_len = match (self.from, self.to) {
            (IpAddr::V6(from), IpAddr::V6(to)) => {
                buf.extend_from_slice(&[0x86, 0xdd]);
                let mut ip = [0u8; 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&((udp_len + esp_len) as u16).to_be_bytes());
                ip[6] = protocol;
                ip[7] = 64;
                ip[8..24].copy_from_slice(&from.octets());
                ip[24..40].copy_from_slice(&to.octets());
                buf.extend_from_slice(&ip);
                40
            }
            (from, to) => {
                let octets = |a: IpAddr| match a {
                    IpAddr::V4(v4) => v4.octets(),
                    IpAddr::V6(_) => [0; 4],
                };
                buf.extend_from_slice(&[0x08, 0x00]);
                let ip_len = 20 + udp_len + esp_len;
                let mut ip = [0u8; 20];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
                ip[4..6].copy_from_slice(&(self.seq as u16).to_be_bytes());
                ip[8] = 64;
                ip[9] = protocol;
                ip[12..16].copy_from_slice(&octets(from));
                ip[16..20].copy_from_slice(&octets(to));
                let sum = checksum::internet(&ip);
                ip[10..12].copy_from_slice(&sum.to_be_bytes());
                buf.extend_from_slice(&ip);
                20
            }
        };
        if let Some((sport, dport)) = self.ports {
            buf.extend_from_slice(&sport.to_be_bytes());
            buf.extend_from_slice(&dport.to_be_bytes());
            buf.extend_from_slice(&((8 + esp_len) as u16).to_be_bytes());
            buf.extend_from_slice(&[0, 0]);
        }
        buf.extend_from_slice(&self.spi.to_be_bytes());
        buf.extend_from_slice(&self.seq.to_be_bytes());
        let udp_at = 14 + header_len;
        buf.resize(udp_at + udp_len + esp_len, 0xe5);
        if let (Some(_), IpAddr::V6(from), IpAddr::V6(to)) = (self.ports, self.from, self.to) {
            let sum = checksum::udp6(from, to, &buf[udp_at..]);
            buf[udp_at + 6..udp_at + 8].copy_from_slice(&sum.to_be_bytes());
        }
    }
}
