//! The Internet checksum (RFC 1071), and the IPv6 pseudo-header sums of
//! ICMPv6 and UDP.

use std::net::Ipv6Addr;

pub fn internet(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .fold(0u32, |a, x| a.wrapping_add(x));
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The checksum of an ICMPv6 message (checksum field zeroed) from `src` to `dst`.
pub fn icmpv6(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> u16 {
    over_ipv6(src, dst, 58, message)
}

/// The checksum of a UDP datagram over IPv6 (checksum field zeroed), never
/// 0: over IPv6 a zero means "none", which receivers drop (RFC 8200 §8.1).
pub fn udp6(src: Ipv6Addr, dst: Ipv6Addr, datagram: &[u8]) -> u16 {
    match over_ipv6(src, dst, 17, datagram) {
        0 => 0xffff,
        sum => sum,
    }
}

/// An upper-layer checksum with the IPv6 pseudo-header (RFC 8200 §8.1).
fn over_ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, message: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40 + message.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(message.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, next_header]);
    pseudo.extend_from_slice(message);
    internet(&pseudo)
}
