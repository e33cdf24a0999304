//! Synthetic tunnel populations, seeded and reproducible.
//!
//! The mix follows what a segw farm sees: most initiators on their own
//! address opening with IKE on 500, a share behind carrier NATs (a few
//! addresses, many ports), a share opening with raw ESP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::policy::{Opener, TunnelKey};

/// The VIP all examples use ...
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 2, 2, 1);
/// ... and its IPv6 twin, for peers that come over IPv6.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);

/// The VIP of `peer`'s family.
pub fn vip_for(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => IpAddr::V4(VIP),
        IpAddr::V6(_) => IpAddr::V6(VIP6),
    }
}

/// SplitMix64: tiny, fast, and the same sequence everywhere for a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        segwlb_policy_sdk::hash::mix(self.0)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        segwlb_policy_sdk::hash::unit_open(self.next_u64()) < p
    }
}

/// Shares of the synthetic mix.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    /// Behind a NAT (shared address, own port).
    pub nat: f64,
    /// Opening with raw ESP (no port, no IKE SPI).
    pub raw_esp: f64,
    /// How many NAT addresses the NAT'd share hides behind.
    pub nat_addresses: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            nat: 0.2,
            raw_esp: 0.1,
            nat_addresses: 64,
        }
    }
}

/// `count` new-tunnel keys.
pub fn tunnel_keys(seed: u64, count: usize, mix: Mix) -> Vec<TunnelKey> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let spi = rng.next_u64() | 1;
            if rng.chance(mix.nat) {
                // 100.64.0.0/10: carrier-grade NAT space.
                let nat =
                    Ipv4Addr::from(0x6440_0000 + rng.below(u64::from(mix.nat_addresses)) as u32);
                let port = 1024 + rng.below(64_512) as u16;
                key(nat, port, Some(spi), Opener::Ike)
            } else {
                let peer = Ipv4Addr::from(0x0a00_0000 | (rng.next_u64() as u32 & 0x00ff_ffff));
                if rng.chance(mix.raw_esp) {
                    key(peer, 0, None, Opener::Esp)
                } else {
                    key(peer, 500, Some(spi), Opener::Ike)
                }
            }
        })
        .collect()
}

fn key(peer: Ipv4Addr, peer_port: u16, ike_spi: Option<u64>, opened_by: Opener) -> TunnelKey {
    TunnelKey {
        peer: IpAddr::V4(peer),
        peer_port,
        vip: IpAddr::V4(VIP),
        ike_spi,
        opened_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_keys_and_the_mix_holds() {
        let a = tunnel_keys(7, 20_000, Mix::default());
        assert_eq!(a, tunnel_keys(7, 20_000, Mix::default()));
        assert_ne!(a, tunnel_keys(8, 20_000, Mix::default()));
        let share = |o: Opener| a.iter().filter(|k| k.opened_by == o).count() as f64 / 20_000.0;
        let nat = a.iter().filter(|k| k.peer_port > 1023).count() as f64 / 20_000.0;
        assert!((nat - 0.2).abs() < 0.015, "nat {nat}");
        assert!(
            (share(Opener::Esp) - 0.08).abs() < 0.015,
            "esp {}",
            share(Opener::Esp)
        );
    }

    #[test]
    fn below_stays_below() {
        let mut rng = Rng::new(1);
        assert!((0..10_000).all(|_| rng.below(3) < 3));
    }
}
