//! `segwlb lab compare`: a scenario's segw set and tunnels through the
//! strongSwan lab, once per policy, reported with the same keys as
//! `segwlb compare`, and each run predicted by the simulation from the
//! tunnels' own keys in their own arrival order. Where the prediction and
//! the lab differ, the report says so, tunnel by tunnel.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::churn::Plan;
use super::config::LabConfig;
use super::drive::{self, Driven};
use super::{topology, Error, Result};
use crate::compare::sim::{self, Arrivals};
use crate::compare::{Options, PolicyRun, Scenario, SegwSpec};
use crate::policy::wasm::{Limits, Runtime};
use crate::policy::Policy;

/// One policy in the lab: what `report.json` holds per policy. The keys of
/// `segwlb compare` (flattened), measured on real tunnels, then the
/// simulation's prediction of the same run and where the two differ.
#[derive(Debug, Clone, Serialize)]
pub struct LabRun {
    #[serde(flatten)]
    pub run: PolicyRun,
    /// "lab": these figures are measured (beside a simulated report).
    pub source: &'static str,
    /// The simulation, fed the lab's tunnels (keys as the balancer saw
    /// them, arrival order, steps) and the scenario's events.
    pub predicted_tunnels_per_segw: BTreeMap<String, u64>,
    pub predicted_tunnels_over_time: Vec<Vec<u64>>,
    pub predicted_moved_per_event: Vec<u64>,
    /// Every difference between the lab and its prediction; empty when the
    /// simulation predicted the lab exactly.
    pub prediction_differs: Vec<String>,
    /// Tunnel by tunnel, in arrival order.
    pub tunnels: Vec<TunnelPlacement>,
    /// Tunnels that failed to come up, came up twice, did not answer a
    /// ping, or that the balancer and the segws place apart.
    pub problems: Vec<String>,
    /// `step: initiator` of each tunnel that was up but answered none of
    /// its pings in a step: measured, not predicted (see the README).
    pub silent_tunnels: Vec<String>,
    /// Churn on real tunnels: closed by their initiators (IKE DELETE), and
    /// opened afresh by peers that had closed one.
    pub tunnels_closed: usize,
    pub peers_returned: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TunnelPlacement {
    pub initiator: String,
    /// The key the policy saw: `address:port` it opened from.
    pub key: String,
    pub lab: Option<String>,
    pub simulation: Option<String>,
}

/// How many of a lab's initiators sit behind its NAT (the last ones), and
/// how many come over IPv6 (the first ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabShares {
    pub nat: u32,
    pub ipv6: u32,
}

/// The scenario as the lab runs it: at most `tunnels` of them, the NAT and
/// IPv6 shares rounded to whole initiators, one NAT address, no raw ESP;
/// its churn as [`Plan`] lays it out. Returns the scenario and how many
/// initiators sit behind the NAT and come over IPv6.
///
/// [`Plan`]: super::churn::Plan
pub fn lab_scenario(scenario: &Scenario, tunnels: usize) -> (Scenario, LabShares) {
    let mut s = scenario.clone();
    let n = scenario.tunnels.count.min(tunnels).max(1);
    let nat = (n as f64 * scenario.tunnels.nat).round() as u32;
    s.tunnels.count = n;
    s.tunnels.nat = f64::from(nat) / n as f64;
    s.tunnels.nat_addresses = 1;
    s.tunnels.raw_esp = 0.0;
    // The shares of the initiators the churn adds, too.
    let all = Plan::of(&s).initiators;
    let nat = (all as f64 * s.tunnels.nat).round() as u32;
    let ipv6 = (f64::from(all as u32 - nat) * s.tunnels.ipv6).round() as u32;
    (s, LabShares { nat, ipv6 })
}

/// The lab file for one policy's run: `base`'s addressing and prefix, the
/// scenario's segws and tunnels.
pub fn lab_config(
    base: &LabConfig,
    scenario: &Scenario,
    shares: LabShares,
    policy: &str,
) -> LabConfig {
    let mut c = base.clone();
    c.lab.initiators = Plan::of(scenario).initiators as u32;
    c.lab.nat = shares.nat;
    c.lab.ipv6 = shares.ipv6;
    c.balancer.policy = policy.to_string();
    c.segw = scenario
        .segws
        .iter()
        .map(|s| super::config::SegwSection {
            name: s.name.clone(),
            weight: s.weight,
            capacity: s.capacity,
            throughput: (s.throughput > 0).then(|| format!("{} B/s", s.throughput)),
        })
        .collect();
    c
}

/// Run `scenario` (already made lab-sized by [`lab_scenario`]) in a fresh
/// lab per policy. `exe` is the segwlb binary the balancer runs as.
pub fn run(
    base: &LabConfig,
    scenario: &Scenario,
    shares: LabShares,
    policies: &[String],
    exe: &Path,
    say: &mut dyn FnMut(&str),
) -> Result<Vec<LabRun>> {
    let runtime = Runtime::new().map_err(|e| Error::State(format!("the wasm runtime: {e}")))?;
    let mut runs = Vec::new();
    for policy in policies {
        let config = lab_config(base, scenario, shares, policy);
        config.check().map_err(|msg| Error::Config {
            path: "<lab compare>".into(),
            msg,
        })?;
        let path = config.balancer.policy_dir.join(format!("{policy}.wasm"));
        let loaded = runtime
            .load(&path, &[], Limits::default())
            .map_err(|e| Error::State(format!("{}: {e}", path.display())))?;
        say(&format!("{policy}: lab up"));
        let (mut state, _) = topology::up(&config, exe)?;
        let driven = drive::drive(&mut state, scenario, say);
        // Down whatever happened: the next policy gets a fresh lab.
        let down = topology::down(&config);
        let driven = driven?;
        down?;
        let predicted = sim::run_with(
            scenario,
            Arrivals::Given(&driven.peers),
            &mut || Box::new(loaded.instantiate()) as Box<dyn Policy>,
            &mut |_| {},
        );
        let run = LabRun::of(scenario, driven, predicted);
        say(&format!(
            "{policy}: {:.1} s; {}",
            run.seconds,
            if run.prediction_differs.is_empty() {
                "the simulation predicted it exactly".to_string()
            } else {
                format!(
                    "{} differences from the simulation",
                    run.prediction_differs.len()
                )
            }
        ));
        runs.push(run);
    }
    Ok(runs)
}

impl LabRun {
    /// The measured run beside its prediction.
    pub fn of(scenario: &Scenario, driven: Driven, predicted: sim::Outcome) -> LabRun {
        let options = Options {
            seed: 0,
            timing: false,
        };
        let names = |segws: &[SegwSpec], at: Option<usize>| at.map(|i| segws[i].name.clone());
        let tunnels: Vec<TunnelPlacement> = driven
            .initiators
            .iter()
            .zip(&driven.peers)
            .enumerate()
            .map(|(i, (initiator, key))| TunnelPlacement {
                initiator: initiator.clone(),
                key: format!("{}:{}", key.addr, key.ike_port),
                lab: names(
                    &driven.outcome.segws,
                    driven.outcome.placements.get(i).copied().flatten(),
                ),
                simulation: names(
                    &predicted.segws,
                    predicted.placements.get(i).copied().flatten(),
                ),
            })
            .collect();
        let lab = &driven.outcome;
        let mut differs = Vec::new();
        for (step, (l, p)) in lab.per_step.iter().zip(&predicted.per_step).enumerate() {
            for (g, (a, b)) in l.iter().zip(p).enumerate() {
                if a != b {
                    differs.push(format!(
                        "step {step}: {} holds {a} in the lab, {b} in the simulation",
                        lab.segws[g].name
                    ));
                }
            }
        }
        for (e, (a, b)) in lab.moved.iter().zip(&predicted.moved).enumerate() {
            if a != b {
                differs.push(format!(
                    "event {}: {a} tunnels moved in the lab, {b} in the simulation",
                    e + 1
                ));
            }
        }
        if lab.refused_tunnels != predicted.refused_tunnels {
            differs.push(format!(
                "{} tunnels refused (every segw full) in the lab, {} in the simulation",
                lab.refused_tunnels, predicted.refused_tunnels
            ));
        }
        for t in tunnels.iter().filter(|t| t.lab != t.simulation) {
            differs.push(format!(
                "{} ({}): on {} in the lab, {} in the simulation",
                t.initiator,
                t.key,
                t.lab.as_deref().unwrap_or("none"),
                t.simulation.as_deref().unwrap_or("none")
            ));
        }
        let end = |o: &sim::Outcome| -> BTreeMap<String, u64> {
            let last = o.per_step.last().cloned().unwrap_or_default();
            o.segws.iter().map(|s| s.name.clone()).zip(last).collect()
        };
        LabRun {
            predicted_tunnels_per_segw: end(&predicted),
            predicted_tunnels_over_time: predicted.per_step.clone(),
            predicted_moved_per_event: predicted.moved.clone(),
            prediction_differs: differs,
            tunnels,
            problems: driven.problems,
            silent_tunnels: driven
                .silent
                .iter()
                .map(|(step, name)| format!("step {step}: {name}"))
                .collect(),
            tunnels_closed: driven.closed,
            peers_returned: driven.returned,
            seconds: (driven.seconds * 10.0).round() / 10.0,
            source: "lab",
            run: PolicyRun::of(scenario, options, driven.outcome),
        }
    }
}

/// The lab-versus-simulation part of the terminal report.
pub fn render_predictions(runs: &[LabRun]) -> String {
    let mut out = String::from("lab vs simulation (same tunnels, same arrival order):\n");
    for r in runs {
        let lab: Vec<String> = r
            .run
            .tunnels_per_segw
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "  {:<18} lab {}; {}",
            r.run.policy,
            lab.join(", "),
            if r.prediction_differs.is_empty() {
                "predicted exactly".to_string()
            } else {
                format!("{} differences:", r.prediction_differs.len())
            }
        );
        for d in &r.prediction_differs {
            let _ = writeln!(out, "      {d}");
        }
        for p in &r.problems {
            let _ = writeln!(out, "    ! {p}");
        }
        if !r.silent_tunnels.is_empty() {
            let _ = writeln!(
                out,
                "    up but silent (no ping answered in a step): {}",
                r.silent_tunnels.join(", ")
            );
        }
    }
    out
}

/// The lab-versus-simulation section of `report.html`.
pub fn html_section(runs: &[LabRun]) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut out = String::from(
        "<h2>Lab against simulation</h2>\n<p class=\"note\">The figures above are measured on real strongSwan tunnels. \
         The simulation was given the same tunnels (keys as the balancer saw them), in the same arrival order, \
         with the same events: where it predicts another placement, it is listed here.</p>\n",
    );
    for r in runs {
        let _ = write!(
            out,
            "<h3>{}</h3>\n<table><tr><th>segw</th><th>lab</th><th>simulation</th></tr>\n",
            esc(&r.run.policy)
        );
        for (s, n) in &r.run.tunnels_per_segw {
            let p = r.predicted_tunnels_per_segw.get(s).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "<tr{}><td>{}</td><td>{n}</td><td>{p}</td></tr>",
                if *n == p { "" } else { " class=\"bad\"" },
                esc(s)
            );
        }
        out.push_str("</table>\n");
        if r.prediction_differs.is_empty() {
            out.push_str("<p>Predicted exactly, tunnel by tunnel.</p>\n");
        } else {
            out.push_str("<ul>\n");
            for d in &r.prediction_differs {
                let _ = writeln!(out, "<li>{}</li>", esc(d));
            }
            out.push_str("</ul>\n");
        }
    }
    out
}

/// Write `report.json` (one object per policy: the keys of `segwlb
/// compare`, then the prediction) and `report.html` into `dir`.
pub fn write(
    dir: &Path,
    scenario: &Scenario,
    runs: &[LabRun],
) -> std::io::Result<(std::path::PathBuf, std::path::PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let json_path = dir.join("report.json");
    let html_path = dir.join("report.html");
    let mut json = serde_json::to_string_pretty(runs).expect("plain data serialises");
    json.push('\n');
    std::fs::write(&json_path, json)?;
    let policy_runs: Vec<PolicyRun> = runs.iter().map(|r| r.run.clone()).collect();
    let page = crate::compare::report::page(
        scenario,
        &format!("segwlb lab compare: {}", scenario.name),
        &format!("{scenario}; on real strongSwan tunnels in network namespaces"),
        &policy_runs,
        &html_section(runs),
    );
    std::fs::write(&html_path, page)?;
    Ok((json_path, html_path))
}
