//! `segwlb policy check` as a policy author runs it.

mod common;

use std::process::Command;

fn check(args: &[&str]) -> (bool, String, String) {
    common::run(
        Command::new(env!("CARGO_BIN_EXE_segwlb"))
            .args(["policy", "check"])
            .args(args),
    )
}

fn max_over_mean(stdout: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("max/mean"))
        .expect("a max/mean line");
    line.split_whitespace().last().unwrap().parse().unwrap()
}

#[test]
fn consistent_hash_spreads_within_three_percent() {
    let file = common::shipped("consistent-hash");
    let (ok, out, err) = check(&[
        file.to_str().unwrap(),
        "--gateways",
        "4",
        "--tunnels",
        "100000",
    ]);
    assert!(ok, "{out}{err}");
    assert!(max_over_mean(&out) <= 1.03, "{out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.trim_start().starts_with("segw"))
            .count(),
        4,
        "{out}"
    );
    assert!(out.contains("contract: ok"), "{out}");
}

#[test]
fn every_shipped_policy_passes_its_own_check() {
    for name in ["round-robin", "consistent-hash", "weighted"] {
        let file = common::shipped(name);
        let (ok, out, err) = check(&[
            file.to_str().unwrap(),
            "--gateways",
            "5",
            "--tunnels",
            "5000",
        ]);
        assert!(ok && out.contains("contract: ok"), "{name}: {out}{err}");
    }
}

#[test]
fn a_violating_policy_fails_the_check_and_says_how() {
    let bogus = common::component(
        common::CONTRACT_WIT,
        &common::policy_wat(common::OK, &common::answers(77)),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bogus.wasm");
    std::fs::write(&file, bogus).unwrap();
    let (ok, out, _) = check(&[file.to_str().unwrap(), "--tunnels", "100"]);
    assert!(!ok);
    assert!(
        out.contains("VIOLATED") && out.contains("unknown_gateway"),
        "{out}"
    );
}

#[test]
fn bad_parameters_and_missing_files_are_clear_errors() {
    let file = common::shipped("consistent-hash");
    let (ok, _, err) = check(&[file.to_str().unwrap(), "--param", "table-size=100"]);
    assert!(
        !ok && err.contains("rejected its parameters") && err.contains("table-size"),
        "{err}"
    );
    let (ok, _, err) = check(&["/nonexistent/x.wasm"]);
    assert!(
        !ok && err.contains("/nonexistent/x.wasm: cannot read"),
        "{err}"
    );
    let (ok, _, err) = check(&[file.to_str().unwrap(), "--param", "oops"]);
    assert!(!ok && err.contains("KEY=VALUE"), "{err}");
}
