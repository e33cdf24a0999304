//! Each shipped wasm policy decides exactly as its native twin, on 100,000
//! keys across gateway-set changes. A difference is a bug in the contract's
//! plumbing (conversions, the glue), not in a policy.

mod common;

use std::net::{IpAddr, Ipv6Addr};

use segwlb::policy::load::{Rates, Sample};
use segwlb::policy::wasm::{Limits, Runtime};
use segwlb::policy::{native, Gateway, Load, Policy};
use segwlb::workload::{self, Mix};

fn set(weights: &[u32], down: &[u32], draining: &[u32]) -> Vec<Gateway> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| {
            let id = i as u32 + 1;
            Gateway {
                id,
                name: format!("segw{id}"),
                weight,
                healthy: !down.contains(&id),
                draining: draining.contains(&id),
                tunnels: 0,
                // Room for ~1/4 of a phase's tunnels on every third gateway:
                // load-aware policies take the "full" paths too.
                capacity: if id.is_multiple_of(3) { 4_000 } else { 0 },
                // Unequal throughputs, except where a tunnel capacity
                // stands alone: a traffic-aware policy weighs both kinds.
                throughput: match id % 3 {
                    0 => 0,
                    _ => u64::from(id % 5 + 1) * 250_000_000,
                },
            }
        })
        .collect()
}

/// The same sequence of set changes a segw farm lives through.
fn phases() -> Vec<Vec<Gateway>> {
    vec![
        set(&[1, 1, 1, 1], &[], &[]),
        set(&[1, 1, 1, 1, 1], &[], &[]),  // segw5 added
        set(&[1, 1, 1, 1, 1], &[2], &[]), // segw2 fails
        set(&[1, 1, 1, 1, 1], &[2], &[4]),
        set(&[2, 1, 1, 1, 3], &[], &[]), // recovered, reweighted
        set(
            &[5, 1, 9, 1, 2, 1, 1, 7, 1, 1, 1, 1, 1, 1, 1, 1, 4],
            &[3],
            &[],
        ),
    ]
}

/// A measurement of `g` as the balancer would take it: traffic that differs
/// by gateway, and a reported utilization on some.
fn traffic_of(g: &Gateway) -> Sample {
    let id = f64::from(g.id);
    Sample {
        rates: Rates {
            bytes_to: id * 1.5e6,
            bytes_from: id * 6.1e6,
            packets_to: id * 1.9e3,
            packets_from: id * 7.6e3,
        },
        tunnels: 100,
        throughput: g.throughput,
        capacity: g.capacity,
        reported: g.id.is_multiple_of(4).then_some(0.37),
    }
}

fn compare(name: &str, params: &[(String, String)]) {
    let runtime = Runtime::new().unwrap();
    let loaded = runtime
        .load(&common::shipped(name), params, Limits::default())
        .unwrap();
    let mut wasm = loaded.instantiate();
    let mut twin = native::shipped(name, params).unwrap();
    let mut keys = workload::tunnel_keys(
        42,
        100_000,
        Mix {
            nat: 0.3,
            raw_esp: 0.2,
            nat_addresses: 16,
        },
    );
    // A quarter over IPv6, so both halves of a v6 address cross the boundary.
    for (i, key) in keys.iter_mut().enumerate().filter(|(i, _)| i % 4 == 0) {
        let spread = (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
        key.peer = IpAddr::V6(Ipv6Addr::from((0x2001_0db8_u128 << 96) | (spread >> 32)));
        key.vip = IpAddr::V6(Ipv6Addr::from((0x2001_0db8_u128 << 96) | 1));
    }
    let phases = phases();
    let per_phase = keys.len() / phases.len() + 1;
    let mut compared = 0;
    for (phase, chunk) in phases.iter().zip(keys.chunks(per_phase)) {
        wasm.set_gateways(phase).unwrap();
        twin.set_gateways(phase).unwrap();
        // Each phase starts with a fresh load (as a rebalance would), which
        // each answer then adds to, as the balancer does.
        let mut load = Load::default();
        load.set_samples(phase.iter().map(|g| (g.id, traffic_of(g))));
        for key in chunk {
            let w = wasm.choose(key, &load).unwrap();
            let n = twin.choose(key, &load).unwrap();
            if let Some(id) = w {
                load.add(id, 1);
            }
            assert_eq!(
                w,
                n,
                "{name}: wasm and native differ for {key:?} with {} gateways",
                phase.len()
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 100_000);
    assert_eq!(wasm.restarts(), 0);
}

#[test]
fn round_robin_matches_its_twin() {
    compare("round-robin", &[]);
}

#[test]
fn consistent_hash_matches_its_twin() {
    compare("consistent-hash", &[]);
    compare("consistent-hash", &[("table-size".into(), "5003".into())]);
}

#[test]
fn weighted_matches_its_twin() {
    compare("weighted", &[]);
}

#[test]
fn least_tunnels_matches_its_twin() {
    compare("least-tunnels", &[]);
}

#[test]
fn two_choices_matches_its_twin() {
    compare("two-choices", &[]);
}

#[test]
fn least_utilization_matches_its_twin() {
    compare("least-utilization", &[]);
}

/// A policy built against contract 0.1.0, before `load` and `capacity`
/// existed (tests/fixtures/policies/round-robin-0.1.0.wasm, the shipped
/// round-robin as it was built then), loads and decides as the twin of
/// today's round-robin.
#[test]
fn a_contract_0_1_0_policy_loads_and_serves() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/policies/round-robin-0.1.0.wasm");
    let runtime = Runtime::new().unwrap();
    let loaded = runtime.load(&fixture, &[], Limits::default()).unwrap();
    assert_eq!(loaded.version().package(), "segwlb:policy@0.1.0");
    assert!(!loaded.reads_load());
    let mut old = loaded.instantiate();
    let mut twin = native::shipped("round-robin", &[]).unwrap();
    let load = Load::default();
    for phase in phases() {
        old.set_gateways(&phase).unwrap();
        twin.set_gateways(&phase).unwrap();
        for key in workload::tunnel_keys(3, 500, Mix::default()) {
            assert_eq!(old.choose(&key, &load), twin.choose(&key, &load));
        }
    }
    assert_eq!(old.restarts(), 0);
}

/// A policy built against contract 0.2.0, before traffic
/// (tests/fixtures/policies/least-tunnels-0.2.0.wasm, the shipped
/// least-tunnels as it was built then): it loads, reads the live tunnel
/// counts through 0.2.0's `load`, and decides as today's least-tunnels,
/// with the traffic samples of 0.3.0 in the load it never sees.
#[test]
fn a_contract_0_2_0_policy_loads_and_serves() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/policies/least-tunnels-0.2.0.wasm");
    let runtime = Runtime::new().unwrap();
    let loaded = runtime.load(&fixture, &[], Limits::default()).unwrap();
    assert_eq!(loaded.version().package(), "segwlb:policy@0.2.0");
    assert!(loaded.reads_load());
    let mut old = loaded.instantiate();
    let mut twin = native::shipped("least-tunnels", &[]).unwrap();
    for phase in phases() {
        old.set_gateways(&phase).unwrap();
        twin.set_gateways(&phase).unwrap();
        let mut load = Load::default();
        load.set_samples(phase.iter().map(|g| (g.id, traffic_of(g))));
        for key in workload::tunnel_keys(5, 2_000, Mix::default()) {
            let answer = old.choose(&key, &load).unwrap();
            assert_eq!(answer, twin.choose(&key, &load).unwrap());
            if let Some(id) = answer {
                load.add(id, 1);
            }
        }
    }
    assert_eq!(old.restarts(), 0);
}
