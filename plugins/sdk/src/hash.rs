//! The hashes every shipped policy agrees on.
//!
//! Pure integer arithmetic, so a wasm build and a native build give the same
//! bits: that is what the differential tests and the lab's predictions rely
//! on. Never change these without bumping the golden tests: a change moves
//! every consistent-hash tunnel.

/// SplitMix64's finaliser: a bijective, well-avalanched 64-bit mix.
pub const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hash a sequence of words.
pub fn words(words: &[u64]) -> u64 {
    words
        .iter()
        .fold(0x243f_6a88_85a3_08d3, |h, &w| mix(h ^ mix(w)))
}

/// Hash a string (a gateway name), FNV-1a then mixed, with a seed so one
/// name can give several independent hashes.
pub fn str_seeded(s: &str, seed: u64) -> u64 {
    let fnv = s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    mix(fnv ^ mix(seed))
}

/// A 64-bit hash as a float in the open interval (0, 1).
pub fn unit_open(h: u64) -> f64 {
    // 52 bits, so that the largest value, 1 - 2^-53, is representable.
    ((h >> 12) as f64 + 0.5) * (1.0 / (1u64 << 52) as f64)
}

/// Natural logarithm from basic IEEE operations only.
///
/// `f64::ln` calls the platform's libm, which may differ in the last bit
/// between a native build and a wasm one; a policy comparing scores must not.
/// Accurate to ~1e-10 relative, far below what placement can notice.
pub fn ln(x: f64) -> f64 {
    debug_assert!(x > 0.0 && x.is_finite());
    const LN2: f64 = core::f64::consts::LN_2;
    const SQRT2: f64 = core::f64::consts::SQRT_2;
    let bits = x.to_bits();
    let mut exp = ((bits >> 52) & 0x7ff) as i64 - 1023;
    // Mantissa as a float in [1, 2), then folded into [sqrt(1/2), sqrt(2)).
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > SQRT2 {
        m *= 0.5;
        exp += 1;
    }
    // ln(m) = 2·atanh(s), s = (m-1)/(m+1), |s| < 0.172.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = 1.0
        + s2 * (1.0 / 3.0
            + s2 * (1.0 / 5.0
                + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0 + s2 * (1.0 / 13.0))))));
    exp as f64 * LN2 + 2.0 * s * series
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_matches_std_closely() {
        for &x in &[
            1e-16,
            1e-9,
            0.001,
            0.25,
            0.5,
            core::f64::consts::FRAC_1_SQRT_2,
            1.0,
            1.5,
            2.0,
            3.0,
            0.999999,
        ] {
            let (ours, std) = (ln(x), x.ln());
            assert!(
                (ours - std).abs() <= 1e-10 * std.abs().max(1.0),
                "ln({x}) = {ours}, std {std}"
            );
        }
    }

    #[test]
    fn unit_open_never_reaches_the_ends() {
        assert!(unit_open(0) > 0.0);
        assert!(unit_open(u64::MAX) < 1.0);
    }

    #[test]
    fn hashes_are_pinned() {
        // Pinned so a change to the hash is a visible, deliberate act.
        assert_eq!(words(&[]), 0x243f_6a88_85a3_08d3);
        assert_eq!(mix(1), 0x5692_161d_100b_05e5);
    }
}
