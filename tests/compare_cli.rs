//! `segwlb compare` as a user runs it: the real binary, the wasm policies.

mod common;

use std::process::Command;

fn compare(args: &[&str]) -> (bool, String, String) {
    common::run(
        Command::new(env!("CARGO_BIN_EXE_segwlb"))
            .arg("compare")
            .arg("--policy-dir")
            .arg(common::policies_dir())
            .args(args),
    )
}

#[test]
fn the_same_seed_writes_the_same_report_byte_for_byte() {
    common::shipped("weighted");
    let dir = tempfile::tempdir().unwrap();
    let run = |seed: &str, out: &str| {
        let out = dir.path().join(out);
        let (ok, stdout, stderr) = compare(&[
            "--tunnels",
            "300",
            "--no-timing",
            "--seed",
            seed,
            "--out",
            &out.to_string_lossy(),
        ]);
        assert!(ok, "{stdout}{stderr}");
        (stdout, std::fs::read(out.join("report.json")).unwrap(), out)
    };
    let (table, first, out) = run("7", "a");
    let (_, again, _) = run("7", "b");
    let (_, other, _) = run("8", "c");
    assert_eq!(first, again, "same seed, different report.json");
    assert_ne!(first, other, "another seed, the same report.json");
    for p in ["round-robin", "consistent-hash", "weighted"] {
        assert!(
            table
                .lines()
                .any(|l| l.contains(p) && l.starts_with(char::is_numeric)),
            "{p} ranked:\n{table}"
        );
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.matches("<svg").count() >= 5, "charts in report.html");
}

#[test]
fn a_broken_scenario_is_refused_with_its_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/scenarios/lab.toml"),
    )
    .unwrap()
    .replace("fail = \"segw2\"", "fail = \"segw9\"");
    std::fs::write(&file, &text).unwrap();
    let line = text.lines().position(|l| l.contains("segw9")).unwrap() + 1;
    let (ok, _, err) = compare(&["--scenario", &file.to_string_lossy()]);
    assert!(!ok);
    let want = format!("bad.toml:{line}:");
    assert!(
        err.contains(&want) && err.contains("event[1].fail") && err.contains("segw9"),
        "{err}"
    );
}
