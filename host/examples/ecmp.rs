//! Print the figures of `docs/balancers.md`'s "Beyond two": N active
//! balancers behind ECMP, sharing nothing, SPI labels or their tables, and
//! one of them leaving.
//!
//!     cargo run --release -p segwlb --example ecmp [TUNNELS]

fn main() {
    let tunnels = std::env::args()
        .nth(1)
        .map_or(10_000, |n| n.parse().expect("TUNNELS is a number"));
    print!("{}", segwlb::compare::ecmp::report(tunnels));
}
