//! Rates as network engineers write them: `"4 Gbps"`, `"250 Mbit/s"`,
//! `"1.5 MB/s"`. Everything inside segwlb counts **bytes per second**; this
//! is the one place a written rate becomes a number and a number is shown.

/// A rate written with its unit, as bytes per second. Bit units (`bps`,
/// `kbps`, `Mbps`, `Gbps`, `Tbps`, or `bit/s`, `kbit/s`, …) are decimal
/// powers of ten, as link speeds are; byte units (`B/s`, `kB/s`, `MB/s`,
/// `GB/s`) too. The unit is required: a bare number is refused, since
/// bits and bytes differ by eight.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.replace('_', "").parse().map_err(|_| {
        format!("{text:?} is not a rate: write a number and a unit, e.g. \"4 Gbps\"")
    })?;
    let unit = unit.trim();
    let (scale, bits) = match unit {
        "bps" | "bit/s" => (1.0, true),
        "kbps" | "Kbps" | "kbit/s" => (1e3, true),
        "Mbps" | "mbps" | "Mbit/s" => (1e6, true),
        "Gbps" | "gbps" | "Gbit/s" => (1e9, true),
        "Tbps" | "tbps" | "Tbit/s" => (1e12, true),
        "B/s" => (1.0, false),
        "kB/s" | "KB/s" => (1e3, false),
        "MB/s" => (1e6, false),
        "GB/s" => (1e9, false),
        "" => {
            return Err(format!(
                "{text:?} has no unit: bits or bytes? (e.g. \"4 Gbps\" or \"500 MB/s\")"
            ))
        }
        _ => {
            return Err(format!(
            "{text:?}: unknown unit {unit:?} (bps, kbps, Mbps, Gbps, Tbps, B/s, kB/s, MB/s, GB/s)"
        ))
        }
    };
    let bytes = number * scale / if bits { 8.0 } else { 1.0 };
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes.round() as u64)
}

/// Bytes per second as a link speed: `"3.20 Gbit/s"`, `"640 Mbit/s"`.
pub fn show_rate(bytes_per_sec: f64) -> String {
    let bits = bytes_per_sec * 8.0;
    let (value, unit) = if bits >= 1e12 {
        (bits / 1e12, "Tbit/s")
    } else if bits >= 1e9 {
        (bits / 1e9, "Gbit/s")
    } else if bits >= 1e6 {
        (bits / 1e6, "Mbit/s")
    } else if bits >= 1e3 {
        (bits / 1e3, "kbit/s")
    } else {
        (bits, "bit/s")
    };
    if value >= 100.0 {
        format!("{value:.0} {unit}")
    } else {
        format!("{value:.2} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_and_byte_units_become_bytes_per_second() {
        assert_eq!(parse_rate("4 Gbps"), Ok(500_000_000));
        assert_eq!(parse_rate("4Gbps"), Ok(500_000_000));
        assert_eq!(parse_rate("250 Mbit/s"), Ok(31_250_000));
        assert_eq!(parse_rate("1.5 MB/s"), Ok(1_500_000));
        assert_eq!(parse_rate("10_000 bps"), Ok(1_250));
    }

    #[test]
    fn a_rate_without_a_known_unit_is_refused_naming_it() {
        assert!(parse_rate("4").unwrap_err().contains("no unit"));
        assert!(parse_rate("4 Gbpx")
            .unwrap_err()
            .contains("unknown unit \"Gbpx\""));
        assert!(parse_rate("fast").unwrap_err().contains("not a rate"));
    }

    #[test]
    fn rates_show_as_link_speeds() {
        assert_eq!(show_rate(500_000_000.0), "4.00 Gbit/s");
        assert_eq!(show_rate(80_000_000.0), "640 Mbit/s");
        assert_eq!(show_rate(0.0), "0.00 bit/s");
    }
}
