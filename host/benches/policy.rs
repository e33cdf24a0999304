//! What a policy decision costs: wasm component against its native twin.
//!
//!     cargo bench -p segwlb --bench policy
//!
//! Prints ns per decision at 3 and 64 gateways for each shipped policy, the
//! wasm/native ratio, and the costs around a decision: pushing the gateway
//! set, loading (compiling) a component, and starting an instance. Then the
//! same for the Python and JavaScript examples, when scripts/build-polyglot.sh
//! built them, beside their Rust twins in the same run: size, compile time
//! cold and from the compiled-policy cache, start time, linear memory, ns per
//! decision. Figures, not a pass/fail: the target (a wasm decision under
//! 1 µs at any gateway count) is for a person to read against.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use segwlb::policy::load::{Rates, Sample};
use segwlb::policy::wasm::{Cache, Compiler, Limits, Runtime};
use segwlb::policy::{native, Gateway, Load, Policy, TunnelKey};
use segwlb::workload::{self, Mix};

const DECISIONS: usize = 200_000;

fn gateways(n: u32) -> Vec<Gateway> {
    (1..=n)
        .map(|id| Gateway {
            id,
            name: format!("segw{id}"),
            weight: 1 + id % 3,
            healthy: true,
            draining: false,
            tunnels: 0,
            capacity: 0,
            // Unequal boxes, as traffic-aware policies meet them.
            throughput: u64::from(1 + id % 4) * 250_000_000,
        })
        .collect()
}

/// ns per `choose`, best of three passes over the same keys. Each answer
/// is counted in the live load the next call reads, as the balancer does.
fn ns_per_decision(policy: &mut dyn Policy, set: &[Gateway], keys: &[TunnelKey]) -> f64 {
    // A measurement of every gateway, as `Balancer::measure` takes one each
    // second: what traffic-aware policies read.
    let mut load = Load::default();
    load.set_samples(set.iter().map(|g| {
        let rates = Rates {
            bytes_to: f64::from(g.id) * 1e6,
            bytes_from: f64::from(g.id) * 4e6,
            packets_to: f64::from(g.id) * 1e3,
            packets_from: f64::from(g.id) * 4e3,
        };
        let sample = Sample {
            rates,
            tunnels: 100,
            throughput: g.throughput,
            capacity: g.capacity,
            reported: None,
        };
        (g.id, sample)
    }));
    let mut place = |policy: &mut dyn Policy, key| {
        if let Some(id) = black_box(policy.choose(key, &load).unwrap()) {
            load.add(id, 1);
        }
    };
    for key in keys.iter().take(10_000) {
        place(policy, key);
    }
    (0..3)
        .map(|_| {
            let started = Instant::now();
            for key in keys {
                place(policy, black_box(key));
            }
            started.elapsed().as_nanos() as f64 / keys.len() as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn time<R>(f: impl FnOnce() -> R) -> (R, Duration) {
    let started = Instant::now();
    let r = f();
    (r, started.elapsed())
}

fn main() {
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    // Both of wasmtime's compilers, measured in the same run: Winch is the
    // default (fast to compile, for hot swaps), Cranelift optimises.
    // No cache here: the load columns are compile times.
    let mut winch = Runtime::with_compiler(Compiler::Winch).expect("wasmtime starts");
    let mut cranelift = Runtime::with_compiler(Compiler::Cranelift).expect("wasmtime starts");
    winch.set_cache(None);
    cranelift.set_cache(None);
    let keys = workload::tunnel_keys(7, DECISIONS, Mix::default());

    println!("policy decision cost, {DECISIONS} distinct tunnels per pass, best of 3");
    println!(
        "{:<16} {:>8} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "policy", "gateways", "native ns", "winch ns", "crane. ns", "winch/native", "push set µs"
    );
    let mut loads = Vec::new();
    for name in native::SHIPPED {
        let path = policies.join(format!("{name}.wasm"));
        let load = |runtime: &Runtime| {
            let (loaded, took) = time(|| runtime.load(&path, &[], Limits::default()));
            let loaded =
                loaded.unwrap_or_else(|e| panic!("{e} (build the policies with `cargo build`)"));
            (loaded, took)
        };
        let (fast, fast_load) = load(&winch);
        let (opt, opt_load) = load(&cranelift);
        let start_time = fast.time_start().unwrap();
        loads.push((name, fast_load, opt_load, start_time));
        for n in [3, 64] {
            let set = gateways(n);
            let mut twin = native::shipped(name, &[]).unwrap();
            twin.set_gateways(&set).unwrap();
            let native_ns = ns_per_decision(twin.as_mut(), &set, &keys);
            let mut wasm = fast.instantiate();
            wasm.set_gateways(&set).unwrap();
            let winch_ns = ns_per_decision(&mut wasm, &set, &keys);
            let mut optimised = opt.instantiate();
            optimised.set_gateways(&set).unwrap();
            let cranelift_ns = ns_per_decision(&mut optimised, &set, &keys);
            let pushes = 50;
            let (_, push) = time(|| (0..pushes).for_each(|_| wasm.set_gateways(&set).unwrap()));
            println!(
                "{name:<16} {n:>8} {native_ns:>10.1} {winch_ns:>10.1} {cranelift_ns:>10.1} {:>11.1}x {:>12.1}",
                winch_ns / native_ns,
                push.as_secs_f64() * 1e6 / f64::from(pushes),
            );
        }
    }
    println!();
    println!(
        "{:<16} {:>16} {:>20} {:>26}",
        "policy", "load winch ms", "load cranelift ms", "instantiate+configure µs"
    );
    for (name, fast, opt, start) in loads {
        println!(
            "{name:<16} {:>16.1} {:>20.1} {:>26.0}",
            fast.as_secs_f64() * 1e3,
            opt.as_secs_f64() * 1e3,
            start.as_secs_f64() * 1e6
        );
    }
    guests(&policies, &keys);
}

/// The Python and JavaScript examples beside their Rust twins.
fn guests(policies: &std::path::Path, keys: &[TunnelKey]) {
    let built: Vec<(&str, &str)> = [
        ("py-round-robin", "round-robin"),
        ("js-consistent-hash", "consistent-hash"),
    ]
    .into_iter()
    .filter(|(g, _)| policies.join(format!("{g}.wasm")).exists())
    .collect();
    if built.is_empty() {
        println!("\n(no Python or JavaScript policies: scripts/build-polyglot.sh builds them)");
        return;
    }
    let mut runtime = Runtime::new().expect("wasmtime starts");
    let cache = tempfile_dir();
    runtime.set_cache(Some(Cache::at(&cache)));
    let keys = &keys[..20_000];
    // Room to run: the JavaScript engine's heap grows with every call (its
    // garbage is not reclaimed between calls), past the default 32 MiB cap
    // after ~100k decisions. "mem MiB" is its linear memory after the run.
    let limits = Limits {
        memory: 512 << 20,
        ..Limits::default()
    };
    println!();
    println!(
        "guests in other languages (winch), beside their Rust twins in wasm; {} keys per pass",
        keys.len()
    );
    println!(
        "{:<20} {:>8} {:>11} {:>10} {:>9} {:>8} {:>9} {:>11} {:>11} {:>8}",
        "policy",
        "MB",
        "compile ms",
        "cached ms",
        "start ms",
        "mem MiB",
        "gateways",
        "guest ns",
        "rust ns",
        "ratio"
    );
    for (guest, twin) in built {
        let path = policies.join(format!("{guest}.wasm"));
        let bytes = std::fs::read(&path).unwrap();
        let load = || runtime.load_timed(&path, &bytes, &[], limits).unwrap();
        let (_, cold) = load();
        let (loaded, warm) = load();
        let start = loaded.time_start().unwrap();
        let rust = runtime
            .load(
                &policies.join(format!("{twin}.wasm")),
                &[],
                Limits::default(),
            )
            .unwrap();
        for n in [3, 64] {
            let set = gateways(n);
            let mut g = loaded.instantiate();
            g.set_gateways(&set).unwrap();
            let guest_ns = ns_per_decision(&mut g, &set, keys);
            let mut r = rust.instantiate();
            r.set_gateways(&set).unwrap();
            let rust_ns = ns_per_decision(&mut r, &set, keys);
            println!(
                "{guest:<20} {:>8.1} {:>11.0} {:>10.1} {:>9.2} {:>8.1} {n:>9} {guest_ns:>11.0} {rust_ns:>11.0} {:>7.0}x{}",
                bytes.len() as f64 / 1e6,
                cold.compile.as_secs_f64() * 1e3,
                warm.compile.as_secs_f64() * 1e3,
                start.as_secs_f64() * 1e3,
                g.memory_bytes() as f64 / f64::from(1 << 20),
                guest_ns / rust_ns,
                if g.restarts() > 0 { "  (restarted)" } else { "" },
            );
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("segwlb-bench-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
