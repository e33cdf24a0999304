//! `lab run`: initiate every tunnel (one after the other, so the arrival
//! order at the balancer is the initiators' order), ping through each,
//! read every segw's SAs and the balancer's table, and say where each
//! tunnel landed and whether the two views agree.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::initiate;
use super::strongswan::IkeSa;
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
    /// A dual-stack lab's IPv6 VIP (initiators over IPv6 reach it).
    #[serde(default)]
    pub vip6: Option<String>,
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

/// Initiate (what is not up yet), ping, collect, compare.
pub fn run(state: &State) -> Result<Report> {
    let mut tunnels = Vec::new();
    let t0 = Instant::now();
    let sas = state.initiator_sas();
    let was_up: Vec<bool> = sas
        .iter()
        .map(|mine| mine.iter().any(IkeSa::is_up))
        .collect();
    let down: Vec<usize> = (0..state.initiators.len())
        .filter(|&i| !was_up[i])
        .collect();
    let mut initiated = initiate::in_order(state, &down)?.into_iter();
    for (i, &up) in state.initiators.iter().zip(&was_up) {
        let (result, seconds) = match up {
            true => (Ok(String::new()), 0.0),
            false => {
                let done = initiated.next().expect("one result per initiator down");
                (done.result, done.seconds)
            }
        };
        tunnels.push(TunnelReport {
            initiator: i.name.clone(),
            outer: i.outer.to_string(),
            inner: i.inner.to_string(),
            nat: i.nat,
            remote: None,
            initiated: result.is_ok(),
            was_up: up,
            initiate_ms: seconds * 1000.0,
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

    // Pings, many tunnels at once.
    let t1 = Instant::now();
    let all: Vec<usize> = (0..state.initiators.len()).collect();
    let answered = ping_each(state, &all, state.pings, "0.2", "2")?;
    for (t, (sent, received)) in tunnels.iter_mut().zip(answered) {
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
            sas.sort_by_key(|sa| sa.remote_host.parse::<std::net::IpAddr>().ok());
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
    let segw_sas: Vec<HashMap<&str, &IkeSa>> = segws.iter().map(|s| by_inner(&s.sas)).collect();
    // The balancer's gateways by the IKE SPIs and peers of their tunnels.
    let mut by_spi: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut by_peer: HashMap<&str, Vec<&str>> = HashMap::new();
    for g in &status.gateways {
        for x in &g.tunnel_list {
            if let Some(spi) = &x.ike_spi {
                by_spi.entry(spi).or_default().push(&g.name);
            }
            by_peer.entry(&x.peer).or_default().push(&g.name);
        }
    }
    for t in &mut tunnels {
        for (s, sas) in segws.iter().zip(&segw_sas) {
            // By the inner address: behind a NAT the outer one is the NAT's.
            if let Some(sa) = sas.get(t.inner.as_str()) {
                t.segws.push(s.name.clone());
                t.ike_spi_i = Some(sa.initiator_spi.clone());
                t.remote = Some(sa.remote());
                *per_segw.entry(s.name.clone()).or_default() += 1;
            }
        }
        // The balancer's entry for the tunnel: by its IKE initiator SPI,
        // which the balancer keeps across the 500 → 4500 float.
        let held = match &t.ike_spi_i {
            Some(spi) => by_spi.get(spi.as_str()),
            None => by_peer.get(t.outer.as_str()),
        };
        let mut held: Vec<String> = held.into_iter().flatten().map(|g| g.to_string()).collect();
        // Once per gateway, in the balancer's order.
        held.dedup();
        t.balancer = held;
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
        vip6: state.vip6.map(|v| v.to_string()),
        service: state.service.to_string(),
        tunnels,
        segws,
        summary,
        balancer_moved: status.counters.moved,
        initiate_s,
        ping_s,
    })
}

/// `lab run` lists every segw's SAs up to this many tunnels (beyond, with
/// `--sas`).
pub const FULL_TABLE_UP_TO: usize = 50;

/// Pings at once at most: each is an `ip netns exec` and a `ping`
/// process (~1 MB), and a thousand of them at once only queue for 2 cores.
const PINGS_AT_ONCE: usize = 128;

/// `ping -c COUNT -i INTERVAL -W WAIT` from the inner address of each
/// initiator in `which` (indexes) to the service, up to [`PINGS_AT_ONCE`]
/// at a time: (sent, received) for each, in `which`'s order.
pub(crate) fn ping_each(
    state: &State,
    which: &[usize],
    count: u32,
    interval: &str,
    wait: &str,
) -> Result<Vec<(u32, u32)>> {
    let (count, service) = (count.to_string(), state.service.to_string());
    let mut answered = Vec::with_capacity(which.len());
    for batch in which.chunks(PINGS_AT_ONCE) {
        let mut children = Vec::with_capacity(batch.len());
        for &i in batch {
            let init = &state.initiators[i];
            let mut cmd = std::process::Command::new("ip");
            cmd.args(["netns", "exec", &init.ns, "ping", "-n", "-q", "-c", &count])
                .args(["-i", interval, "-W", wait, "-I"])
                .arg(init.inner.to_string())
                .arg(&service)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            children.push(cmd.spawn().map_err(|source| Error::Io {
                what: "start ping".into(),
                source,
            })?);
        }
        for child in children {
            let out = child.wait_with_output().map_err(|source| Error::Io {
                what: "wait for ping".into(),
                source,
            })?;
            answered.push(parse_ping(&String::from_utf8_lossy(&out.stdout)));
        }
    }
    Ok(answered)
}

/// Each established SA with an installed child by the inner address its
/// child reaches (`remote_ts` a /32): how a segw's SAs are matched to
/// initiators. Charon lists newest first; the first is kept.
pub(crate) fn by_inner(sas: &[IkeSa]) -> HashMap<&str, &IkeSa> {
    let mut map = HashMap::new();
    for sa in sas.iter().filter(|sa| sa.state == "ESTABLISHED") {
        for c in sa.children.iter().filter(|c| c.state == "INSTALLED") {
            for ts in &c.remote_ts {
                if let Some(inner) = ts.strip_suffix("/32") {
                    map.entry(inner).or_insert(sa);
                }
            }
        }
    }
    map
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
        self.render_with(self.tunnels.len() <= FULL_TABLE_UP_TO)
    }

    /// With `sas`, every segw's SAs, one line each; without, a line per
    /// segw and the summary.
    pub fn render_with(&self, sas: bool) -> String {
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
            if !sas {
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
            // Wide enough for `[IPv6]:port` peers.
            let w = s
                .sas
                .iter()
                .map(|sa| sa.remote().len())
                .max()
                .unwrap_or(0)
                .max(16);
            let _ = writeln!(
                out,
                "  {:<w$} {:<33} {:<15} {:<17} {:>9}  {}",
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
                    "  {:<w$} {:<33} {:<15} {:<17} {:>9}  {}/{}",
                    sa.remote(),
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

    #[test]
    fn sas_are_found_by_the_inner_address_of_an_installed_child() {
        use crate::lab::strongswan::ChildSa;
        let sa = |spi: &str, state: &str, child: &str, inner: &str| IkeSa {
            conn: "segw".into(),
            state: state.into(),
            remote_host: "10.1.0.1".into(),
            remote_port: 4500,
            initiator_spi: spi.into(),
            responder_spi: "1".into(),
            established: Some(7),
            children: vec![ChildSa {
                state: child.into(),
                spi_in: "c1".into(),
                spi_out: "c2".into(),
                packets_in: 0,
                packets_out: 0,
                bytes_in: 0,
                bytes_out: 0,
                local_ts: vec!["10.201.0.0/24".into()],
                remote_ts: vec![format!("{inner}/32")],
            }],
        };
        let sas = [
            sa("a1", "ESTABLISHED", "INSTALLED", "10.200.0.1"),
            // An older SA of the same tunnel: charon lists newest first.
            sa("a0", "ESTABLISHED", "INSTALLED", "10.200.0.1"),
            sa("b1", "CONNECTING", "INSTALLED", "10.200.0.2"),
            sa("c1", "ESTABLISHED", "DELETING", "10.200.0.3"),
            sa("d1", "ESTABLISHED", "INSTALLED", "10.200.0.4"),
        ];
        let found = by_inner(&sas);
        assert_eq!(found["10.200.0.1"].initiator_spi, "a1");
        assert_eq!(found["10.200.0.4"].initiator_spi, "d1");
        assert!(!found.contains_key("10.200.0.2"), "not established");
        assert!(!found.contains_key("10.200.0.3"), "no installed child");
        assert!(!found.contains_key("10.200.0.40"), "whole addresses only");
    }
}
