//! `segwlb lab compare`: a scenario's segw set and tunnels through the
//! strongSwan lab, once per policy, reported with the same keys as
//! `segwlb compare`, and each run predicted by the simulation from the
//! tunnels' own keys in their own arrival order. Where the prediction and
//! the lab differ, the report says so, tunnel by tunnel.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::churn::Plan;
use super::config::LabConfig;
use super::drive::{self, Driven};
use super::topology::{self, State};
use super::{Error, Result};
use crate::compare::sim::{self, Arrivals};
use crate::compare::{round1, Options, PolicyRun, Scenario, SegwSpec};
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
    /// The simulation's time in the dark per event (tunnel-seconds, and
    /// one tunnel's p50 and p95), beside the lab's measured
    /// `outage_*_per_event`.
    pub predicted_outage_seconds_per_event: Vec<f64>,
    pub predicted_outage_p50_per_event: Vec<f64>,
    pub predicted_outage_p95_per_event: Vec<f64>,
    /// Events whose measured p50 or p95 is more than [`OUTAGE_AGREE`] off
    /// the prediction.
    pub outage_differs: Vec<String>,
    /// Per event: how its moved tunnels came back.
    pub came_back_per_event: Vec<drive::CameBack>,
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
    /// The scenario's traffic through the real SAs beside the simulation's
    /// (absent without `[traffic]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic: Option<LabTraffic>,
    /// Churn on real tunnels: closed by their initiators (IKE DELETE), and
    /// opened afresh by peers that had closed one.
    pub tunnels_closed: usize,
    pub peers_returned: usize,
    pub seconds: f64,
}

/// How far a measured p50 or p95 outage may be from the predicted one.
pub const OUTAGE_AGREE: f64 = 0.2;

/// How far a segw's counted bytes in a step may be from the simulation's
/// (scaled) before the report calls it a difference: the packets of a lab
/// step are sent to the byte, so what is left is loss on the way.
pub const BYTES_AGREE: f64 = 0.02;

/// A run's traffic per step and segw (the scenario's order of `segws`),
/// in lab bytes: the simulation's bytes times `scale`, beside what the
/// segws and the balancer counted of the step's traffic.
#[derive(Debug, Clone, Serialize)]
pub struct LabTraffic {
    /// Lab bytes per simulated byte (the busiest step sends about
    /// `traffic::DATAGRAMS_PER_TUNNEL` full datagrams per tunnel).
    pub scale: f64,
    /// The largest datagram, IP header on.
    pub datagram_bytes: u32,
    pub segws: Vec<String>,
    pub predicted_bytes_per_step: Vec<Vec<u64>>,
    /// What each segw's child SAs counted: the inner packets, both ways.
    pub counted_bytes_per_step: Vec<Vec<u64>>,
    /// What the balancer counted to and from each segw meanwhile: the same
    /// packets as ESP in UDP, and any IKE or keepalive that passed.
    pub balancer_bytes_per_step: Vec<Vec<u64>>,
    /// The largest |counted − predicted| / predicted over steps and segws.
    pub worst_difference: f64,
    /// Each segw's charon's CPU over each step, a share of one core, as
    /// reported to the balancer; null while it was dead.
    pub charon_cpu_per_step: Vec<Vec<Option<f64>>>,
}

/// How far `counted` bytes are from `predicted`, as a fraction of them
/// (infinite where nothing was predicted and something counted).
fn off_by(predicted: u64, counted: u64) -> f64 {
    match (predicted, counted) {
        (0, 0) => 0.0,
        (0, _) => f64::INFINITY,
        (p, c) => c as f64 / p as f64 - 1.0,
    }
}

impl LabTraffic {
    /// The lab's traffic beside the prediction; the cells further apart
    /// than [`BYTES_AGREE`], as differences.
    fn of(
        carried: &drive::Carried,
        predicted: &sim::Outcome,
        segws: &[SegwSpec],
    ) -> (LabTraffic, Vec<String>) {
        let scaled: Vec<Vec<u64>> = (predicted.bytes_per_step.iter())
            .map(|step| {
                step.iter()
                    .map(|&b| (b as f64 * carried.scale).round() as u64)
                    .collect()
            })
            .collect();
        let mut worst: f64 = 0.0;
        let mut differs = Vec::new();
        for (step, (p, c)) in scaled.iter().zip(&carried.segws).enumerate() {
            for (g, (&p, &c)) in p.iter().zip(c).enumerate() {
                let off = off_by(p, c);
                worst = worst.max(off.abs());
                if off.abs() > BYTES_AGREE {
                    differs.push(format!(
                        "step {step}: {} counted {c} B of the traffic, the simulation predicted {p} B ({:+.1}%)",
                        segws[g].name,
                        off * 100.0
                    ));
                }
            }
        }
        let traffic = LabTraffic {
            scale: carried.scale,
            datagram_bytes: carried.ip_bytes,
            segws: segws.iter().map(|s| s.name.clone()).collect(),
            predicted_bytes_per_step: scaled,
            counted_bytes_per_step: carried.segws.clone(),
            balancer_bytes_per_step: carried.balancer.clone(),
            worst_difference: worst,
            charon_cpu_per_step: carried.cpu.clone(),
        };
        (traffic, differs)
    }
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
/// IPv6 shares rounded to whole initiators, one NAT address, no raw ESP,
/// no inbound ESP deferring DPD during a move; its churn as [`Plan`] lays
/// it out. Returns the scenario and how many
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
    // The lab sends its traffic at the end of a step: while a move
    // settles, nothing from a tunnel's old segw reaches its initiator that
    // could defer its DPD, whatever the scenario's peers would do.
    s.peers.inbound_suppresses_dpd = false;
    // The shares of the initiators the churn adds, too.
    let all = Plan::of(&s).initiators;
    let nat = (all as f64 * s.tunnels.nat).round() as u32;
    let ipv6 = (f64::from(all as u32 - nat) * s.tunnels.ipv6).round() as u32;
    (s, LabShares { nat, ipv6 })
}

/// `scenario` made lab-sized with as many tunnels as fit `initiators`
/// with its churn (`lab up --scenario S --tunnels N` brings up N tunnels'
/// initiators and those its churn adds: the same N is found again).
fn fitting(scenario: &Scenario, initiators: usize) -> Scenario {
    let mut n = initiators.max(1);
    loop {
        let (s, _) = lab_scenario(scenario, n);
        if n == 1 || Plan::of(&s).initiators <= initiators {
            return s;
        }
        n -= 1;
    }
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

/// What `lab compare` did: the terminal report, where the files went, and
/// whether every run was predicted exactly with no problem.
pub struct Compared {
    pub text: String,
    pub json: PathBuf,
    pub html: PathBuf,
    pub exact: bool,
}

/// `segwlb lab compare`: `scenario` made lab-sized (at most `tunnels`), a
/// fresh lab per policy from `base`, the report printed and written into
/// `out`.
pub fn compare(
    base: &LabConfig,
    scenario: &Scenario,
    tunnels: usize,
    policies: &[String],
    exe: &Path,
    out: &Path,
    say: &mut dyn FnMut(&str),
) -> Result<Compared> {
    if tunnels == 0 || tunnels > super::config::MAX_INITIATORS as usize {
        return Err(Error::State(format!(
            "--tunnels must be 1..={}",
            super::config::MAX_INITIATORS
        )));
    }
    let (scenario, shares) = lab_scenario(scenario, tunnels);
    let runs = run(base, &scenario, shares, policies, exe, say)?;
    let plain: Vec<PolicyRun> = runs.iter().map(|r| r.run.clone()).collect();
    let table = crate::compare::Table {
        scenario: &scenario,
        seed: 0,
        runs: &plain,
    };
    let text = format!("{table}\n{}", render_predictions(&runs));
    let (json, html) = write(out, &scenario, &runs).map_err(|source| Error::Io {
        what: format!("write the report into {}", out.display()),
        source,
    })?;
    let exact = runs
        .iter()
        .all(|r| r.prediction_differs.is_empty() && r.problems.is_empty());
    Ok(Compared {
        text,
        json,
        html,
        exact,
    })
}

/// `segwlb lab run --scenario`: play `scenario` (made lab-sized for the
/// lab's initiators) on the lab `state`, which is up with its segws;
/// returns its problems and the measured run as `compare`'s table.
pub fn play(state: &mut State, scenario: &Scenario, say: &mut dyn FnMut(&str)) -> Result<String> {
    let s = fitting(scenario, state.initiators.len());
    let driven = drive::drive(state, &s, say)?;
    let mut text = String::new();
    for p in &driven.problems {
        let _ = writeln!(text, "! {p}");
    }
    for (step, name) in &driven.silent {
        let _ = writeln!(text, "! step {step}: {name} was up but answered no ping");
    }
    let options = Options {
        seed: 0,
        timing: false,
    };
    let run = PolicyRun::of(&s, options, driven.outcome);
    let table = crate::compare::Table {
        scenario: &s,
        seed: 0,
        runs: std::slice::from_ref(&run),
    };
    let _ = write!(text, "{table}");
    Ok(text)
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
        let traffic = driven.carried.as_ref().map(|carried| {
            let (traffic, off) = LabTraffic::of(carried, &predicted, &lab.segws);
            differs.extend(off);
            traffic
        });
        let end = |o: &sim::Outcome| -> BTreeMap<String, u64> {
            let last = o.per_step.last().cloned().unwrap_or_default();
            o.segws.iter().map(|s| s.name.clone()).zip(last).collect()
        };
        LabRun {
            predicted_tunnels_per_segw: end(&predicted),
            predicted_tunnels_over_time: predicted.per_step.clone(),
            predicted_moved_per_event: predicted.moved.clone(),
            predicted_outage_seconds_per_event: (predicted.outage.iter())
                .map(|o| round1(o.seconds))
                .collect(),
            predicted_outage_p50_per_event: (predicted.outage.iter())
                .map(|o| round1(o.p50))
                .collect(),
            predicted_outage_p95_per_event: (predicted.outage.iter())
                .map(|o| round1(o.p95))
                .collect(),
            outage_differs: outage_differs(&driven.outcome, &predicted),
            came_back_per_event: driven.came_back.clone(),
            prediction_differs: differs,
            tunnels,
            problems: driven.problems,
            silent_tunnels: driven
                .silent
                .iter()
                .map(|(step, name)| format!("step {step}: {name}"))
                .collect(),
            traffic,
            tunnels_closed: driven.closed,
            peers_returned: driven.returned,
            seconds: round1(driven.seconds),
            source: "lab",
            run: PolicyRun::of(scenario, options, driven.outcome),
        }
    }
}

/// The events whose measured p50 or p95 outage is further than
/// [`OUTAGE_AGREE`] from the prediction, or whose moved tunnels did not all
/// come back.
fn outage_differs(lab: &sim::Outcome, predicted: &sim::Outcome) -> Vec<String> {
    let mut differs = Vec::new();
    for (e, (l, p)) in lab.outage.iter().zip(&predicted.outage).enumerate() {
        if l.back + l.never == 0 {
            continue;
        }
        for (what, l, p) in [("p50", l.p50, p.p50), ("p95", l.p95, p.p95)] {
            if p > 0.0 && (l / p - 1.0).abs() > OUTAGE_AGREE {
                differs.push(format!(
                    "event {}: {what} outage {l:.1} s in the lab, {p:.1} s in the simulation",
                    e + 1
                ));
            }
        }
        if l.never > p.never {
            differs.push(format!(
                "event {}: {} moved tunnels not back in the lab when the step settled",
                e + 1,
                l.never
            ));
        }
    }
    differs
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
        if let Some(t) = &r.traffic {
            out.push_str(&t.render());
        }
        let moved = |e: usize| r.run.moved_per_event.get(e).is_some_and(|&m| m > 0);
        let at = |v: &Vec<f64>, e: usize| v.get(e).copied().unwrap_or(0.0);
        for e in (0..r.predicted_outage_seconds_per_event.len()).filter(|&e| moved(e)) {
            let never = r.run.never_back_per_event.get(e).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "    time in the dark at [{}], lab / simulation: {:.1} / {:.1} tunnel-minutes, p50 {:.1} / {:.1} s, p95 {:.1} / {:.1} s{}",
                e + 1,
                at(&r.run.outage_seconds_per_event, e) / 60.0,
                at(&r.predicted_outage_seconds_per_event, e) / 60.0,
                at(&r.run.outage_p50_per_event, e),
                at(&r.predicted_outage_p50_per_event, e),
                at(&r.run.outage_p95_per_event, e),
                at(&r.predicted_outage_p95_per_event, e),
                match never {
                    0 => String::new(),
                    n => format!("; {n} not back when the step settled"),
                }
            );
            if let Some(c) = r.came_back_per_event.get(e) {
                let _ = writeln!(
                    out,
                    "      came back: {} on a new IKE SA (DPD restart){}{}",
                    c.new_sa + c.new_sa_unanswered,
                    match c.new_sa_unanswered {
                        0 => String::new(),
                        n => format!(", {n} of them answering no probe before the step settled (timed by the SA)"),
                    },
                    match c.same_sa {
                        0 => String::new(),
                        n => format!(", {n} on the IKE SA from before"),
                    },
                );
            }
        }
        for d in &r.outage_differs {
            let _ = writeln!(out, "    ~ {d}");
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

impl LabTraffic {
    /// Per step and segw: predicted / counted by the segw (by the
    /// balancer), in kB of the lab; the worst difference; each charon's
    /// CPU at the busiest step.
    fn render(&self) -> String {
        let kb = |b: u64| format!("{:.1}", b as f64 / 1000.0);
        let mut out = format!(
            "    traffic through the real SAs, kB: predicted / counted by the segw (by the balancer, ESP in UDP);\n    \
             the simulation's bytes × {:.3e}, datagrams up to {} B\n      step  {}\n",
            self.scale,
            self.datagram_bytes,
            self.segws
                .iter()
                .map(|s| format!("{s:<26}"))
                .collect::<String>()
                .trim_end()
        );
        for (step, p) in self.predicted_bytes_per_step.iter().enumerate() {
            let cells: String = (0..self.segws.len())
                .map(|g| {
                    let at = |v: &Vec<Vec<u64>>| v.get(step).and_then(|s| s.get(g)).copied();
                    let cell = format!(
                        "{}/{} ({})",
                        kb(p[g]),
                        at(&self.counted_bytes_per_step).map_or("-".into(), kb),
                        at(&self.balancer_bytes_per_step).map_or("-".into(), kb),
                    );
                    format!("{cell:<26}")
                })
                .collect();
            let _ = writeln!(out, "      {step:<5} {}", cells.trim_end());
        }
        let busiest = (self.counted_bytes_per_step.iter().enumerate())
            .max_by_key(|(i, s)| (s.iter().sum::<u64>(), std::cmp::Reverse(*i)))
            .map_or(0, |(i, _)| i);
        let cpu: Vec<String> = (self.segws.iter())
            .zip(self.charon_cpu_per_step.get(busiest).into_iter().flatten())
            .map(|(s, c)| match c {
                Some(c) => format!("{s} {:.0}%", c * 100.0),
                None => format!("{s} not running"),
            })
            .collect();
        let _ = writeln!(
            out,
            "      worst difference {:.2}% (within {:.0}% agrees); charon CPU over step {busiest}, reported to the balancer: {}",
            self.worst_difference * 100.0,
            BYTES_AGREE * 100.0,
            cpu.join(", ")
        );
        out
    }

    /// The same as a table of `report.html`.
    fn html(&self) -> String {
        let kb = |b: u64| format!("{:.1}", b as f64 / 1000.0);
        let mut out = format!(
            "<p>Traffic through the real SAs, kB of the lab (the simulation's bytes × {:.3e}): predicted / counted by the segw's child SAs (counted by the balancer, ESP in UDP). Worst difference {:.2}%.</p>\n<table><tr><th>step</th>",
            self.scale,
            self.worst_difference * 100.0
        );
        for s in &self.segws {
            let _ = write!(out, "<th>{s}</th>");
        }
        out.push_str("</tr>\n");
        for (step, p) in self.predicted_bytes_per_step.iter().enumerate() {
            let _ = write!(out, "<tr><td>{step}</td>");
            for (g, &p) in p.iter().enumerate() {
                let at = |v: &Vec<Vec<u64>>| v.get(step).and_then(|s| s.get(g)).copied();
                let c = at(&self.counted_bytes_per_step).unwrap_or(0);
                let off = off_by(p, c).abs() > BYTES_AGREE;
                let _ = write!(
                    out,
                    "<td{}>{} / {} ({})</td>",
                    if off { " class=\"bad\"" } else { "" },
                    kb(p),
                    kb(c),
                    kb(at(&self.balancer_bytes_per_step).unwrap_or(0))
                );
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</table>\n");
        out
    }
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
        if let Some(t) = &r.traffic {
            out.push_str(&t.html());
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lab_brought_up_for_n_tunnels_plays_the_scenario_with_n_again() {
        // `lab up --scenario default --tunnels 2000` brings up the 2,000
        // tunnels' initiators and those the churn adds; `lab run
        // --scenario default` on that lab must find the same 2,000.
        let s = Scenario::builtin();
        for n in [12, 300, 2000] {
            let (up, _) = lab_scenario(&s, n);
            let initiators = Plan::of(&up).initiators;
            assert!(initiators >= n);
            let played = fitting(&s, initiators);
            assert_eq!(played.tunnels.count, n);
            assert_eq!(Plan::of(&played).initiators, initiators);
        }
    }
}
