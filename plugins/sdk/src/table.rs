//! Sizing for lookup-table policies (Maglev and friends).

use crate::log;

/// The default table size: prime, and > 100·N up to 655 gateways.
pub const DEFAULT_SIZE: u32 = 65_537;

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

pub fn next_prime(from: u32) -> u32 {
    (from..).find(|&n| is_prime(n)).unwrap_or(DEFAULT_SIZE)
}

/// Check a configured size: a prime ≥ 101.
pub fn validate(size: u32) -> Result<u32, String> {
    if size < 101 || !is_prime(size) {
        return Err(format!(
            "parameter `table-size` = {size}: must be a prime ≥ 101"
        ));
    }
    Ok(size)
}

/// The size to build for `members` gateways: the configured one while it is
/// over 100 per gateway (shares then differ by under 1%), else the next
/// prime above 100·N, said in the log rather than silently spreading worse.
pub fn size_for(configured: u32, members: usize) -> usize {
    if u64::from(configured) > 100 * members as u64 {
        return configured as usize;
    }
    let grown = next_prime(100 * members as u32 + 1);
    log::warn(&format!(
        "{members} gateways outgrow table-size {configured}: using {grown}"
    ));
    grown as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes() {
        assert!(is_prime(65_537) && is_prime(101) && !is_prime(65_536) && !is_prime(1));
        assert_eq!(next_prime(401), 401);
        assert_eq!(next_prime(402), 409);
    }

    #[test]
    fn sizes() {
        assert!(validate(100).unwrap_err().contains("prime"));
        assert_eq!(validate(65_537), Ok(65_537));
        assert_eq!(size_for(65_537, 64), 65_537);
        assert_eq!(size_for(101, 3), 307);
    }
}
