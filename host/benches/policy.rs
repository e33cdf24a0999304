//! What a policy decision costs: wasm component against its native twin.
//!
//!     cargo bench -p segwlb --bench policy
//!
//! Prints ns per decision at 3 and 64 gateways for each shipped policy, the
//! wasm/native ratio, and the costs around a decision: pushing the gateway
//! set, loading (compiling) a component, and starting an instance. Figures,
//! not a pass/fail: the target (a wasm decision under 1 µs at any gateway
//! count) is for a person to read against.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use segwlb::policy::wasm::{Compiler, Limits, Runtime};
use segwlb::policy::{native, Gateway, Policy, TunnelKey};
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
        })
        .collect()
}

/// ns per `choose`, best of three passes over the same keys.
fn ns_per_decision(policy: &mut dyn Policy, keys: &[TunnelKey]) -> f64 {
    for key in keys.iter().take(10_000) {
        black_box(policy.choose(key).unwrap());
    }
    (0..3)
        .map(|_| {
            let started = Instant::now();
            for key in keys {
                black_box(policy.choose(black_box(key)).unwrap());
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
    let winch = Runtime::with_compiler(Compiler::Winch).expect("wasmtime starts");
    let cranelift = Runtime::with_compiler(Compiler::Cranelift).expect("wasmtime starts");
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
        let (_, start_time) = time(|| {
            let mut p = fast.instantiate();
            p.set_gateways(&gateways(3)).unwrap();
        });
        loads.push((name, fast_load, opt_load, start_time));
        for n in [3, 64] {
            let set = gateways(n);
            let mut twin = native::shipped(name, &[]).unwrap();
            twin.set_gateways(&set).unwrap();
            let native_ns = ns_per_decision(twin.as_mut(), &keys);
            let mut wasm = fast.instantiate();
            wasm.set_gateways(&set).unwrap();
            let winch_ns = ns_per_decision(&mut wasm, &keys);
            let mut optimised = opt.instantiate();
            optimised.set_gateways(&set).unwrap();
            let cranelift_ns = ns_per_decision(&mut optimised, &keys);
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
}
