//! How long `segwlb compare` takes on a million tunnels, per policy, and
//! how much memory it holds at its peak.
//!
//!     cargo bench -p segwlb --bench compare [-- TUNNELS]
//!
//! The built-in scenario (4 segws, a failure and recovery, an addition, a
//! hot swap, a rebalance; 14 steps) with its tunnel count raised to
//! 1,000,000: every tunnel opens with IKE_SA_INIT and IKE_AUTH and sends
//! ESP both ways every step, through the real core and the real wasm
//! policy. Baselines in the same run: the same scenario with the native
//! twin of each policy, so the ratio is what the wasm boundary costs; and
//! the same scenario without its `[traffic]` (one 120-byte ESP packet a
//! step each way instead of a frame standing for the step's traffic), so
//! the last column is what carrying traffic as load costs.
//! Target: under 10 s per policy on one core.

use std::path::Path;
use std::time::Instant;

use segwlb::compare::{self, Scenario};
use segwlb::policy::native;
use segwlb::policy::wasm::{Limits, Runtime};
use segwlb::policy::Policy;

/// Peak resident memory since the last reset, in MiB (Linux).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Start a new peak (writing 5 to clear_refs resets VmHWM).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() {
    let tunnels: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let mut scenario = Scenario::builtin();
    scenario.tunnels.count = tunnels;
    let options = compare::Options {
        seed: 1,
        timing: true,
    };
    println!("{scenario}");
    let mut countless = scenario.clone();
    countless.traffic = None;
    println!(
        "{:<18} {:>10} {:>10} {:>8} {:>12} {:>10} {:>10} {:>14} {:>9}",
        "policy",
        "wasm s",
        "native s",
        "ratio",
        "frames/s",
        "peak MiB",
        "max/fair",
        "no traffic s",
        "traffic"
    );
    let runtime = Runtime::new().expect("a wasm engine");
    for name in native::SHIPPED {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../policies")
            .join(format!("{name}.wasm"));
        let loaded = match runtime.load(&path, &[], Limits::default()) {
            Ok(l) => l,
            Err(e) => {
                println!("{name:<18} skipped: {e}");
                continue;
            }
        };
        reset_peak();
        let started = Instant::now();
        let run = compare::run(
            &scenario,
            options,
            &mut || Box::new(loaded.instantiate()) as Box<dyn Policy>,
            &mut |_| {},
        );
        let wasm = started.elapsed().as_secs_f64();
        let peak = peak_rss_mib();

        let started = Instant::now();
        compare::run(
            &scenario,
            options,
            &mut || native::shipped(name, &[]).expect("a shipped policy"),
            &mut |_| {},
        );
        let native = started.elapsed().as_secs_f64();

        let started = Instant::now();
        compare::run(
            &countless,
            options,
            &mut || Box::new(loaded.instantiate()) as Box<dyn Policy>,
            &mut |_| {},
        );
        let without = started.elapsed().as_secs_f64();
        println!(
            "{:<18} {:>10.2} {:>10.2} {:>7.2}x {:>12.0} {:>10.0} {:>10.3} {:>14.2} {:>+8.1}%",
            name,
            wasm,
            native,
            wasm / native,
            run.frames as f64 / wasm,
            peak,
            run.max_over_mean,
            without,
            (wasm / without - 1.0) * 100.0
        );
    }
}
