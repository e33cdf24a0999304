//! `lab run`: initiate every tunnel (one after the other, so the arrival
//! order at the balancer is the initiators' order), ping through each,
//! read every segw's SAs and the balancer's table, and say where each
//! tunnel landed and whether the two views agree.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::strongswan::{self as sw, IkeSa};
use super::topology::State;
use super::{Error, Result};

/// One tunnel: one initiator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TunnelReport {
    pub initiator: String,
    pub outer: String,
    pub inner: String,
    /// Behind the lab's NAT.
    pub nat: bool,
    /// The peer as the segw holding the tunnel sees it, `address:port`
    /// (the NAT's address and a rewritten port behind the NAT).
    pub remote: Option<String>,
    /// `swanctl --initiate` succeeded (or the tunnel was up already).
    pub initiated: bool,
    /// It was up already: not initiated again.
    pub was_up: bool,
    pub initiate_ms: f64,
    pub error: Option<String>,
    /// The IKE initiator SPI (hex), as the segw holding it reports it.
    pub ike_spi_i: Option<String>,
    /// Segws holding an ESTABLISHED IKE_SA with an INSTALLED child for it.
    pub segws: Vec<String>,
    /// Gateways the balancer's table binds this peer to.
    pub balancer: Vec<String>,
    pub pings_sent: u32,
    pub pings_received: u32,
    /// Established, passing every ping, and both views name one segw.
    pub ok: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegwReport {
    pub name: String,
    pub ns: String,
    /// The balancer's gateway id and weight.
    pub id: u32,
    pub weight: u32,
    pub sas: Vec<IkeSa>,
    /// Its charon did not answer (stopped, crashed).
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub tunnels: usize,
    pub established: usize,
    pub passing: usize,
    /// Segw name → tunnels held (segw view / balancer view).
    pub per_segw: BTreeMap<String, usize>,
    pub balancer_per_segw: BTreeMap<String, usize>,
    pub agree: usize,
    pub disagree: Vec<String>,
    pub failed: Vec<String>,
    pub ok: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub policy: String,
    pub vip: String,
    pub service: String,
    /// In initiation (arrival) order.
    pub tunnels: Vec<TunnelReport>,
    pub segws: Vec<SegwReport>,
    pub summary: Summary,
    /// Tunnels the balancer moved between segws (re-placements).
    pub balancer_moved: u64,
    pub initiate_s: f64,
    pub ping_s: f64,
}

/// `sa` is up with a child for the tunnel whose inner address is `inner`.
pub(crate) fn established(sa: &IkeSa, inner: &str) -> bool {
    let want = format!("{inner}/32");
    sa.state == "ESTABLISHED"
        && sa
            .children
            .iter()
            .any(|c| c.state == "INSTALLED" && c.remote_ts.contains(&want))
}

/// Initiate (what is not up yet), ping, collect, compare.
pub fn run(state: &State) -> Result<Report> {
    let mut tunnels = Vec::new();
    let t0 = Instant::now();
    for i in &state.initiators {
        let mine = state.list_sas(&i.dir).unwrap_or_default();
        let up = mine.iter().any(|sa| {
            sa.state == "ESTABLISHED" && sa.children.iter().any(|c| c.state == "INSTALLED")
        });
        let start = Instant::now();
        let result = if up {
            Ok(String::new())
        } else {
            state.swanctl(
                &i.dir,
                &["--initiate", "--child", sw::CHILD, "--timeout", "30"],
            )
        };
        tunnels.push(TunnelReport {
            initiator: i.name.clone(),
            outer: i.outer.to_string(),
            inner: i.inner.to_string(),
            nat: i.nat,
            remote: None,
            initiated: result.is_ok(),
            was_up: up,
            initiate_ms: start.elapsed().as_secs_f64() * 1000.0,
            error: result.err().map(|e| e.to_string()),
            ike_spi_i: None,
            segws: Vec::new(),
            balancer: Vec::new(),
            pings_sent: 0,
            pings_received: 0,
            ok: false,
        });
    }
    let initiate_s = t0.elapsed().as_secs_f64();

    // Pings, all tunnels at once.
    let t1 = Instant::now();
    let count = state.pings.to_string();
    let service = state.service.to_string();
    let mut children = Vec::new();
    for i in &state.initiators {
        let mut cmd = std::process::Command::new("ip");
        let inner = i.inner.to_string();
        cmd.args(["netns", "exec", &i.ns, "ping", "-n", "-q", "-c", &count])
            .args(["-i", "0.2", "-W", "2", "-I", &inner, &service])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        children.push(cmd.spawn().map_err(|source| Error::Io {
            what: "start ping".into(),
            source,
        })?);
    }
    for (t, child) in tunnels.iter_mut().zip(children) {
        let out = child.wait_with_output().map_err(|source| Error::Io {
            what: "wait for ping".into(),
            source,
        })?;
        let (sent, received) = parse_ping(&String::from_utf8_lossy(&out.stdout));
        t.pings_sent = sent;
        t.pings_received = received;
    }
    let ping_s = t1.elapsed().as_secs_f64();
    // Let the last replies' counters settle in the SAs.
    std::thread::sleep(Duration::from_millis(100));
    collect(state, tunnels, initiate_s, ping_s)
}

/// The segws' and the balancer's view of `tunnels`, and the summary.
pub fn collect(
    state: &State,
    mut tunnels: Vec<TunnelReport>,
    initiate_s: f64,
    ping_s: f64,
) -> Result<Report> {
    let status = state.balancer_status()?;
    let mut segws = Vec::new();
    for s in &state.segws {
        let g = status.gateways.iter().find(|g| g.name == s.name);
        let sas = state.list_sas(&s.dir).map(|mut sas| {
            // By peer address (charon lists newest first).
            sas.sort_by_key(|sa| sa.remote_host.parse::<std::net::Ipv4Addr>().ok());
            sas
        });
        segws.push(SegwReport {
            name: s.name.clone(),
            ns: s.ns.clone(),
            id: g.map_or(0, |g| g.id),
            weight: g.map_or(s.weight, |g| g.weight),
            error: sas
                .as_ref()
                .err()
                .map(|e| e.to_string().lines().next().unwrap_or("").to_string()),
            sas: sas.unwrap_or_default(),
        });
    }
    let mut balancer_per_segw = BTreeMap::new();
    let mut per_segw = BTreeMap::new();
    for g in &status.gateways {
        balancer_per_segw.insert(g.name.clone(), g.tunnel_list.len());
    }
    for s in &segws {
        per_segw.insert(s.name.clone(), 0);
    }
    let (mut agree, mut disagree, mut failed) = (0, Vec::new(), Vec::new());
    for t in &mut tunnels {
        for s in &segws {
            // By the inner address: behind a NAT the outer one is the NAT's.
            if let Some(sa) = s.sas.iter().find(|sa| established(sa, &t.inner)) {
                t.segws.push(s.name.clone());
                t.ike_spi_i = Some(sa.initiator_spi.clone());
                t.remote = Some(format!("{}:{}", sa.remote_host, sa.remote_port));
                *per_segw.entry(s.name.clone()).or_default() += 1;
            }
        }
        // The balancer's entry for the tunnel: by its IKE initiator SPI,
        // which the balancer keeps across the 500 → 4500 float.
        for g in &status.gateways {
            let held = g.tunnel_list.iter().any(|x| match &t.ike_spi_i {
                Some(spi) => x.ike_spi.as_deref() == Some(spi.as_str()),
                None => x.peer == t.outer,
            });
            if held {
                t.balancer.push(g.name.clone());
            }
        }
        let agrees = t.segws.len() == 1 && t.segws == t.balancer;
        if agrees {
            agree += 1;
        } else {
            disagree.push(format!(
                "{} ({}): segws {:?}, balancer {:?}",
                t.initiator, t.outer, t.segws, t.balancer
            ));
        }
        t.ok = agrees && t.pings_sent > 0 && t.pings_received == t.pings_sent;
        if !t.ok {
            failed.push(format!(
                "{} ({}): {}",
                t.initiator,
                t.outer,
                t.error.clone().unwrap_or_else(|| {
                    if t.segws.is_empty() {
                        "no segw holds an established SA".into()
                    } else {
                        format!("{}/{} pings answered", t.pings_received, t.pings_sent)
                    }
                })
            ));
        }
    }
    let summary = Summary {
        tunnels: tunnels.len(),
        established: tunnels.iter().filter(|t| !t.segws.is_empty()).count(),
        passing: tunnels
            .iter()
            .filter(|t| t.pings_sent > 0 && t.pings_received == t.pings_sent)
            .count(),
        per_segw,
        balancer_per_segw,
        agree,
        ok: failed.is_empty() && disagree.is_empty(),
        disagree,
        failed,
    };
    Ok(Report {
        policy: status.policy.name.clone(),
        vip: state.vip.to_string(),
        service: state.service.to_string(),
        tunnels,
        segws,
        summary,
        balancer_moved: status.counters.moved,
        initiate_s,
        ping_s,
    })
}

/// (transmitted, received) from `ping -q`'s summary line.
fn parse_ping(out: &str) -> (u32, u32) {
    for line in out.lines() {
        if line.contains("packets transmitted") {
            let nums: Vec<u32> = line
                .split(',')
                .filter_map(|part| part.split_whitespace().next()?.parse().ok())
                .collect();
            if let [sent, received, ..] = nums[..] {
                return (sent, received);
            }
        }
    }
    (0, 0)
}

impl Report {
    /// Per segw its tunnels, in the spirit of `show ipsec gateway tunnel`,
    /// then the summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in &self.segws {
            let _ = writeln!(
                out,
                "{} ({}, weight {}): {} IKE_SAs",
                s.name,
                s.ns,
                s.weight,
                s.sas.len()
            );
            if let Some(e) = &s.error {
                let _ = writeln!(out, "  no answer: {e}\n");
                continue;
            }
            if s.sas.is_empty() {
                let _ = writeln!(out);
                continue;
            }
            let h = [
                "peer",
                "IKE SPI initiator/responder",
                "inner",
                "ESP SPI in/out",
                "pkts i/o",
                "state",
            ];
            let _ = writeln!(
                out,
                "  {:<16} {:<33} {:<15} {:<17} {:>9}  {}",
                h[0], h[1], h[2], h[3], h[4], h[5]
            );
            for sa in &s.sas {
                // The child that carries the traffic: after a MOBIKE update
                // charon lists the SA it replaced (DELETED) first.
                let child = sa
                    .children
                    .iter()
                    .find(|c| c.state == "INSTALLED")
                    .or(sa.children.first());
                let _ = writeln!(
                    out,
                    "  {:<16} {:<33} {:<15} {:<17} {:>9}  {}/{}",
                    format!("{}:{}", sa.remote_host, sa.remote_port),
                    format!("{}/{}", sa.initiator_spi, sa.responder_spi),
                    child.map_or("-".into(), |c| c.remote_ts.join(",")),
                    child.map_or("-".into(), |c| format!("{}/{}", c.spi_in, c.spi_out)),
                    child.map_or("-".into(), |c| format!(
                        "{}/{}",
                        c.packets_in, c.packets_out
                    )),
                    sa.state,
                    child.map_or("-", |c| c.state.as_str()),
                );
            }
            let _ = writeln!(out);
        }
        let s = &self.summary;
        let _ = writeln!(
            out,
            "policy {}: {} tunnels, {} established, {} passing traffic (initiate {:.2} s, ping {:.2} s)",
            self.policy, s.tunnels, s.established, s.passing, self.initiate_s, self.ping_s
        );
        let _ = writeln!(out, "  {:<10} {:>6} {:>9}", "segw", "segw", "balancer");
        for (name, n) in &s.per_segw {
            let b = s.balancer_per_segw.get(name).copied().unwrap_or(0);
            let _ = writeln!(out, "  {name:<10} {n:>6} {b:>9}");
        }
        let _ = writeln!(
            out,
            "balancer vs segws: {}/{} tunnels agree{}",
            s.agree,
            s.tunnels,
            if s.disagree.is_empty() { "" } else { ":" }
        );
        for d in &s.disagree {
            let _ = writeln!(out, "  {d}");
        }
        if s.failed.is_empty() {
            let _ = writeln!(out, "failed: none");
        } else {
            let _ = writeln!(out, "failed: {}", s.failed.len());
            for f in &s.failed {
                let _ = writeln!(out, "  {f}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summary() {
        let out = "PING 10.201.0.1 (10.201.0.1) from 10.200.0.1 : 56(84) bytes of data.\n\n\
                   --- 10.201.0.1 ping statistics ---\n\
                   3 packets transmitted, 2 received, 33.3333% packet loss, time 404ms\n";
        assert_eq!(parse_ping(out), (3, 2));
        assert_eq!(parse_ping(""), (0, 0));
    }
}
