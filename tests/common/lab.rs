//! The strongSwan lab for the tests that build one (root): a lab file of
//! the test's own, `lab up` / `run` / `down` through the binary, cleaned up
//! whatever happens. Included by the lab tests as `mod lab`, beside
//! `mod common`.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use segwlb::lab::topology::{self, State};
use segwlb::lab::{netns, vrrp, LabConfig, Report};

use super::common;

/// One lab at a time: 2 cores, and 15 charons each.
pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether the lab can run here (`pair`: with keepalived for a pair of
/// balancers). Without what it needs it says so and skips, unless
/// SEGWLB_REQUIRE_NETNS is set: then it fails.
pub fn can_run(pair: bool) -> bool {
    let missing = if !netns::is_root() {
        Some("not root".to_string())
    } else if let Err(e) = topology::prerequisites() {
        Some(e.to_string())
    } else if pair {
        vrrp::prerequisites().err()
    } else {
        None
    };
    crate::common::runs_here(
        "the strongSwan lab (root, iproute2, ethtool, strongSwan; keepalived for a pair)",
        missing,
    )
}

/// A lab file of the test's own (own prefix and work dir); `lab down` on
/// drop, pass or fail.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub file: PathBuf,
    pub config: LabConfig,
    /// Charon, balancer and keepalived pids, read from the state file
    /// while up.
    pids: Vec<i32>,
}

impl Lab {
    /// A lab file: `initiators` tunnels, the last `nat` behind the NAT, the
    /// first `ipv6` over IPv6 (dual-stack when any).
    pub fn new(
        tag: &str,
        policy: &str,
        weights: &[u32],
        initiators: u32,
        nat: u32,
        ipv6: u32,
    ) -> Lab {
        Lab::with_balancers(tag, policy, weights, (initiators, nat, ipv6), 1)
    }

    /// [`Lab::new`] with an active/standby pair of balancers.
    pub fn pair(
        tag: &str,
        policy: &str,
        weights: &[u32],
        initiators: u32,
        nat: u32,
        ipv6: u32,
    ) -> Lab {
        Lab::with_balancers(tag, policy, weights, (initiators, nat, ipv6), 2)
    }

    fn with_balancers(
        tag: &str,
        policy: &str,
        weights: &[u32],
        (initiators, nat, ipv6): (u32, u32, u32),
        balancers: u32,
    ) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        // At most 8 characters: "sl" + tag + pid.
        let prefix = format!("sl{tag}{}", std::process::id() % 10_000);
        let mut text = format!(
            "[lab]\nprefix = \"{prefix}\"\nwork_dir = \"{}\"\ninitiators = {initiators}\nnat = {nat}\nipv6 = {ipv6}\npings = 3\nbalancers = {balancers}\n\
             [balancer]\npolicy = \"{policy}\"\npolicy_dir = \"{}\"\n",
            dir.path().join("work").display(),
            common::policies_dir().display()
        );
        if let Some(mode) = common::fast_path_under_test() {
            text += &format!("fast_path = \"{mode}\"\n");
        }
        for (n, w) in weights.iter().enumerate() {
            text += &format!("[[segw]]\nname = \"segw{}\"\nweight = {w}\n", n + 1);
        }
        let file = dir.path().join("lab.toml");
        std::fs::write(&file, text).unwrap();
        let config = LabConfig::load(&file).unwrap();
        Lab {
            dir,
            file,
            config,
            pids: Vec::new(),
        }
    }

    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        common::run(
            Command::new(env!("CARGO_BIN_EXE_segwlb"))
                .arg("lab")
                .arg("-c")
                .arg(&self.file)
                .args(args),
        )
    }

    /// `lab compare --scenario SCENARIO --policies POLICIES` into a report
    /// directory of the lab's own: its output, and the runs of its
    /// report.json, each checked to be predicted exactly and to have no
    /// problems.
    pub fn compare(&self, scenario: &str, policies: &str) -> (String, Vec<serde_json::Value>) {
        let out_dir = self.dir.path().join("report");
        let (ok, out, err) = self.cli(&[
            "compare",
            "--scenario",
            scenario,
            "--policies",
            policies,
            "--out",
            &out_dir.to_string_lossy(),
        ]);
        eprintln!("{out}\n{err}");
        assert!(ok, "lab compare failed:\n{out}\n{err}");
        let json = std::fs::read_to_string(out_dir.join("report.json")).unwrap();
        let runs: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
        assert_eq!(runs.len(), policies.split(',').count());
        for r in &runs {
            let p = r["policy"].as_str().unwrap();
            assert_eq!(r["prediction_differs"], serde_json::json!([]), "{p}");
            assert_eq!(r["problems"], serde_json::json!([]), "{p}");
        }
        (out, runs)
    }

    pub fn up(&mut self) {
        let (ok, out, err) = self.cli(&["up"]);
        assert!(ok, "lab up failed:\n{out}\n{err}");
        eprintln!("{}", out.trim_end());
        let state = State::load(&self.config.work_dir()).unwrap();
        self.pids = state
            .balancers
            .iter()
            .flat_map(|b| std::iter::once(b.pid).chain(b.vrrp.as_ref().map(|v| v.pid)))
            .chain(state.segws.iter().map(|s| s.pid))
            .chain(state.initiators.iter().map(|i| i.pid))
            .collect();
        assert!(self.pids.iter().all(|&p| topology::alive(p)));
    }

    pub fn run(&self) -> Report {
        let (_, text, err) = self.cli(&["run"]);
        eprintln!("{}", text.trim_end());
        let (ok, json, err2) = self.cli(&["run", "--json"]);
        let report: Report = serde_json::from_str(&json).unwrap_or_else(|e| {
            panic!(
                "lab run --json: {e}:\n{json}\n{err}\n{err2}\n{}",
                self.logs()
            )
        });
        assert!(
            ok && report.summary.ok,
            "lab run failed:\n{text}\n{err2}\n{}",
            self.logs()
        );
        report
    }

    /// The balancers' logs, and a pair's keepalived logs and
    /// transitions.
    pub fn logs(&self) -> String {
        let work = self.config.work_dir();
        let mut logs = String::new();
        for file in [
            "balancer.log",
            "balancer2.log",
            "lb/keepalived.log",
            "lb/transitions",
            "lb/told",
            "lb2/keepalived.log",
            "lb2/transitions",
            "lb2/told",
        ] {
            if let Ok(text) = std::fs::read_to_string(work.join(file)) {
                logs += &format!("--- {file} ---\n{text}");
            }
        }
        logs
    }

    /// `lab down`, then nothing of the lab is left.
    pub fn down_and_check(&mut self) {
        let (ok, out, err) = self.cli(&["down"]);
        assert!(ok, "lab down failed:\n{out}\n{err}");
        assert_nothing_left(&self.config, &self.pids);
        self.pids.clear();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        if let Err(e) = topology::down(&self.config) {
            eprintln!("warning: lab down: {e}");
        }
    }
}

pub fn assert_nothing_left(config: &LabConfig, pids: &[i32]) {
    let left = topology::lab_namespaces(&config.lab.prefix);
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let running: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|&p| topology::alive(p))
        .collect();
    assert!(running.is_empty(), "processes left: {running:?}");
    // The veths lived only in the lab's namespaces; none may have leaked
    // into ours under the lab's interface names.
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    for name in [
        "uplink@", " p1@", " i1@", " lb@", " lb2@", " sync@", " br0:",
    ] {
        assert!(
            !links.contains(name),
            "{name} in the host namespace:\n{links}"
        );
    }
    assert!(!config.work_dir().exists());
}

/// `segwlb ctl ARGS` against the lab's (active) balancer; its output
/// printed, its failure a panic.
pub fn ctl(state: &State, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_segwlb"))
        .arg("ctl")
        .arg("--socket")
        .arg(&state.balancer().unwrap().socket)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim_end());
}
