//! Traffic through a lab's real SAs, and what the segws counted of it.
//!
//! The lab's tunnels carry IPv4 inside: each initiator's inner address on
//! its `lo`, the service address on every segw's `lo`. A UDP datagram from
//! one to the other is encrypted by the sender's child SA and decrypted by
//! the receiver's, and both count it as its inner packet, IP header on
//! (`bytes-in` / `bytes-out` of `swanctl --list-sas`): what a segw counts
//! is what was sent, to the byte, unless something was lost on the way.
//!
//! Datagrams go to the discard port, where a socket of ours listens (and
//! never reads: a full buffer drops silently), so no ICMP port unreachable
//! comes back through the tunnel to blur the count.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use super::netns::Netns;
use super::topology::State;
use super::{Error, Result};

fn step(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::Step {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}

/// The port every datagram goes to.
pub const DISCARD: u16 = 9;
/// IP and UDP headers: what a datagram's inner packet adds to its payload.
const HEADERS: usize = 28;
/// Datagrams sent between two short pauses, so that userland ESP
/// (kernel-libipsec's TUN queue, charon's threads) keeps up.
const BURST: u32 = 20;
const PAUSE: Duration = Duration::from_millis(2);

/// What one segw's child SAs have counted, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counted {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
}

impl Counted {
    /// What was counted since `before` (of the same SAs).
    pub fn since(&self, before: &Counted) -> Counted {
        Counted {
            bytes_in: self.bytes_in.saturating_sub(before.bytes_in),
            bytes_out: self.bytes_out.saturating_sub(before.bytes_out),
            packets_in: self.packets_in.saturating_sub(before.packets_in),
            packets_out: self.packets_out.saturating_sub(before.packets_out),
        }
    }
}

/// Every present segw's child SAs' counters now, by segw name.
pub fn counted(state: &State) -> Result<BTreeMap<String, Counted>> {
    let mut all = BTreeMap::new();
    for s in state.segws.iter().filter(|s| s.present) {
        let mut c = Counted::default();
        for child in state.list_sas(&s.dir)?.iter().flat_map(|sa| &sa.children) {
            c.bytes_in += child.bytes_in;
            c.bytes_out += child.bytes_out;
            c.packets_in += child.packets_in;
            c.packets_out += child.packets_out;
        }
        all.insert(s.name.clone(), c);
    }
    Ok(all)
}

/// One tunnel's share of a burst of traffic: datagrams up (initiator →
/// service) and down (its segw → the initiator), `ip_bytes` each.
#[derive(Debug, Clone)]
pub struct Flow {
    /// Index into `state.initiators`.
    pub initiator: usize,
    /// The segw holding its tunnel (by name), which sends the downlink.
    pub segw: String,
    pub up: u32,
    pub down: u32,
}

/// Send `flows` through their tunnels: all the uplink (initiator namespace
/// after namespace), then all the downlink (segw after segw).
/// Returns the inner bytes offered, up and down.
pub fn send(state: &State, flows: &[Flow], ip_bytes: usize) -> Result<(u64, u64)> {
    let payload = vec![0x5a_u8; ip_bytes.saturating_sub(HEADERS).max(1)];
    let service = SocketAddr::new(IpAddr::V4(state.service), DISCARD);
    // Uplink: per initiator namespace, its initiators' flows.
    let mut by_ns: BTreeMap<&str, Vec<(Ipv4Addr, u32)>> = BTreeMap::new();
    for f in flows {
        let i = &state.initiators[f.initiator];
        by_ns.entry(&i.ns).or_default().push((i.inner, f.up));
    }
    // The segws listen on the service address for the whole run.
    let sinks = state
        .segws
        .iter()
        .filter(|s| s.present)
        .map(|s| listen(&s.ns, service))
        .collect::<Result<Vec<_>>>()?;
    // One namespace after the other: a segw's charon decrypts in userland
    // (kernel-libipsec), and every initiator at once overran it (a third
    // of the uplink lost at 12 tunnels, none of the downlink, which one
    // segw sends at a time).
    for (ns, each) in &by_ns {
        Netns::adopt(ns)?
            .enter(|| {
                for &(inner, n) in each {
                    let socket = UdpSocket::bind((inner, 0))?;
                    burst(&socket, service, &payload, n)?;
                }
                Ok::<_, std::io::Error>(())
            })?
            .map_err(|e| step(&format!("sending from {ns}"), e))?;
    }
    // Downlink: each segw to its tunnels' initiators, who listen too.
    let mut listening = Vec::new();
    for (ns, each) in &by_ns {
        for &(inner, _) in each {
            listening.push(listen(ns, SocketAddr::new(IpAddr::V4(inner), DISCARD))?);
        }
    }
    let mut by_segw: BTreeMap<&str, Vec<(Ipv4Addr, u32)>> = BTreeMap::new();
    for f in flows {
        by_segw
            .entry(f.segw.as_str())
            .or_default()
            .push((state.initiators[f.initiator].inner, f.down));
    }
    for (name, each) in &by_segw {
        let segw = state
            .segws
            .iter()
            .find(|s| s.name == *name)
            .ok_or_else(|| step("sending down", format!("no segw {name}")))?;
        Netns::adopt(&segw.ns)?
            .enter(|| {
                let socket = UdpSocket::bind((state.service, 0))?;
                for &(inner, n) in each {
                    burst(
                        &socket,
                        SocketAddr::new(IpAddr::V4(inner), DISCARD),
                        &payload,
                        n,
                    )?;
                }
                Ok::<_, std::io::Error>(())
            })?
            .map_err(|e| step(&format!("sending from {}", segw.ns), e))?;
    }
    // Let the last datagrams through userland ESP before anyone counts.
    std::thread::sleep(Duration::from_millis(300));
    drop((sinks, listening));
    let packet = (payload.len() + HEADERS) as u64;
    let up: u64 = flows.iter().map(|f| u64::from(f.up)).sum();
    let down: u64 = flows.iter().map(|f| u64::from(f.down)).sum();
    Ok((up * packet, down * packet))
}

/// A socket bound to `at` inside `ns` that never reads.
fn listen(ns: &str, at: SocketAddr) -> Result<UdpSocket> {
    Netns::adopt(ns)?
        .enter(|| UdpSocket::bind(at))?
        .map_err(|e| step(&format!("listening on {at} in {ns}"), e))
}

/// `n` datagrams of `payload` to `to`, paced.
fn burst(socket: &UdpSocket, to: SocketAddr, payload: &[u8], n: u32) -> std::io::Result<()> {
    for k in 0..n {
        socket.send_to(payload, to)?;
        if k % BURST == BURST - 1 {
            std::thread::sleep(PAUSE);
        }
    }
    Ok(())
}

/// Each present segw's charon: CPU seconds spent so far (user and system,
/// from `/proc/PID/stat`), by segw name. What the segws' own load is,
/// which the balancer's byte counts cannot see.
pub fn charon_cpu(state: &State) -> Result<BTreeMap<String, f64>> {
    // SAFETY: sysconf reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut all = BTreeMap::new();
    for s in state.segws.iter().filter(|s| s.present) {
        let path = format!("/proc/{}/stat", s.pid);
        let stat = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            what: format!("read {path}"),
            source,
        })?;
        // After the command name in parentheses: state is field 3, utime
        // and stime fields 14 and 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        let (Some(user), Some(system)) = (tick(11), tick(12)) else {
            return Err(step(&format!("reading {path}"), "no utime and stime"));
        };
        all.insert(s.name.clone(), (user + system) / ticks);
    }
    Ok(all)
}

/// Tell the balancer each segw's utilization as its charon's share of one
/// core between `before` and `after` ([`charon_cpu`] readings `seconds`
/// apart), the way an agent beside a segw would (`ctl gateway report`).
/// Returns what was reported, by segw name.
pub fn report_cpu(
    state: &State,
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    seconds: f64,
) -> Result<BTreeMap<String, f64>> {
    let mut reported = BTreeMap::new();
    for (name, &now) in after {
        let spent = now - before.get(name).copied().unwrap_or(now);
        let utilization = (spent / seconds.max(1e-3)).max(0.0);
        state.ctl(&crate::control::ctl::Request::GatewayReport {
            name: name.clone(),
            utilization,
        })?;
        reported.insert(name.clone(), utilization);
    }
    Ok(reported)
}
