//! IP prefixes, for the addresses segwlb answers ARP/NDP for.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("prefix length /{len} is longer than {max}"));
        }
        Ok(Prefix { addr, len })
    }

    /// How many addresses it holds (saturating at `u128::MAX`).
    pub fn size(&self) -> u128 {
        let bits = if self.addr.is_ipv4() { 32 } else { 128 } - u32::from(self.len);
        1u128.checked_shl(bits).unwrap_or(u128::MAX)
    }

    /// Its addresses, lowest first (meant for small prefixes: see
    /// [`size`](Self::size)).
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> {
        let (first, v4) = match self.addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)), true),
            IpAddr::V6(a) => (u128::from(a), false),
        };
        let size = self.size();
        let first = first & !(size.wrapping_sub(1));
        (0..size).map(move |i| {
            let a = first.wrapping_add(i);
            if v4 {
                IpAddr::V4((a as u32).into())
            } else {
                IpAddr::V6(a.into())
            }
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let keep = |bits: u32| -> u128 {
            if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            }
        };
        match (self.addr, ip) {
            (IpAddr::V4(p), IpAddr::V4(a)) => {
                let mask = (keep(u32::from(self.len)) >> 96) as u32;
                u32::from(p) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(p), IpAddr::V6(a)) => {
                let mask = keep(u32::from(self.len));
                u128::from(p) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Prefix {
    type Err = String;
    /// `10.2.2.0/24`, `2001:db8::/64`, or a bare address (a host prefix).
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: not an IP address"))?;
        let len = match len {
            Some(l) => l
                .trim()
                .parse()
                .map_err(|_| format!("`{s}`: bad prefix length"))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Prefix::new(addr, len).map_err(|e| format!("`{s}`: {e}"))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains() {
        let p: Prefix = "10.2.2.0/24".parse().unwrap();
        assert!(p.contains("10.2.2.1".parse().unwrap()));
        assert!(!p.contains("10.2.3.1".parse().unwrap()));
        assert!(!p.contains("2001:db8::1".parse().unwrap()));
        let all: Prefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.9".parse().unwrap()));
        let host: Prefix = "10.2.2.1".parse().unwrap();
        assert!(
            host.contains("10.2.2.1".parse().unwrap())
                && !host.contains("10.2.2.2".parse().unwrap())
        );
        let v6: Prefix = "2001:db8:2::/48".parse().unwrap();
        assert!(v6.contains("2001:db8:2:ff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db8:3::1".parse().unwrap()));
    }

    #[test]
    fn bad_prefixes_say_why() {
        assert!("10.2.2.0/33"
            .parse::<Prefix>()
            .unwrap_err()
            .contains("longer than 32"));
        assert!("ten/8"
            .parse::<Prefix>()
            .unwrap_err()
            .contains("not an IP address"));
    }
}
