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

use super::churn::Plan;
use super::netns::Netns;
use super::topology::{alive, State};
use super::{Error, Result};
use crate::compare::sim::GIVEN_SEED;
use crate::compare::traffic::{Step, Traffic};
use crate::compare::Scenario;

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
const BURST: u32 = 10;
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

impl std::ops::AddAssign for Counted {
    fn add_assign(&mut self, other: Counted) {
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.packets_in += other.packets_in;
        self.packets_out += other.packets_out;
    }
}

/// One segw's child SAs' counters, by inbound SPI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reading(BTreeMap<String, Counted>);

impl Reading {
    /// What the segw counted between `before` and this reading, SA by SA:
    /// an SA new since counts whole, one gone since (deleted: its tunnel
    /// moved or closed) counts nothing, rather than its totals taken off.
    pub fn since(&self, before: &Reading) -> Counted {
        let mut sum = Counted::default();
        for (spi, now) in &self.0 {
            sum += before.0.get(spi).map_or(*now, |b| now.since(b));
        }
        sum
    }
}

/// Every present segw's child SAs' counters now, by segw name; a segw
/// whose charon is dead (failed) counts nothing.
pub fn counted(state: &State) -> Result<BTreeMap<String, Reading>> {
    let mut all = BTreeMap::new();
    for s in state.segws.iter().filter(|s| s.present) {
        let mut reading = Reading::default();
        if alive(s.pid) {
            for child in state.list_sas(&s.dir)?.iter().flat_map(|sa| &sa.children) {
                let c = Counted {
                    bytes_in: child.bytes_in,
                    bytes_out: child.bytes_out,
                    packets_in: child.packets_in,
                    packets_out: child.packets_out,
                };
                *reading.0.entry(child.spi_in.clone()).or_default() += c;
            }
        }
        all.insert(s.name.clone(), reading);
    }
    Ok(all)
}

/// One tunnel's share of a burst of traffic: inner bytes up (initiator →
/// service) and down (its segw → the initiator), in datagrams of at most
/// the size [`send`] is given.
#[derive(Debug, Clone)]
pub struct Flow {
    /// Index into `state.initiators`.
    pub initiator: usize,
    /// The segw holding its tunnel (by name), which sends the downlink.
    pub segw: String,
    pub up: u64,
    pub down: u64,
}

/// The smallest datagram: IP and UDP headers and one byte.
const SMALLEST: u64 = HEADERS as u64 + 1;

/// The IP sizes of the datagrams that carry `bytes` exactly in datagrams
/// of `most` bytes: full ones, then what is left; a remainder too short
/// for a datagram is taken from the one before it. Only a tunnel with less
/// than [`SMALLEST`] to send at all sends a little more.
pub fn datagrams(bytes: u64, most: usize) -> impl Iterator<Item = usize> {
    let most = (most as u64).max(2 * SMALLEST);
    let (full, rest) = (bytes / most, bytes % most);
    let sizes: Vec<u64> = match (full, rest) {
        (_, 0) => vec![most; full as usize],
        (0, r) => vec![r.max(SMALLEST)],
        (f, r) if r < SMALLEST => {
            let mut v = vec![most; f as usize - 1];
            v.extend([most + r - SMALLEST, SMALLEST]);
            v
        }
        (f, r) => {
            let mut v = vec![most; f as usize];
            v.push(r);
            v
        }
    };
    sizes.into_iter().map(|b| b as usize)
}

/// Send `flows` through their tunnels: all the uplink (initiator namespace
/// after namespace), then all the downlink (segw after segw), in datagrams
/// of at most `ip_bytes` ([`datagrams`]). Returns the inner bytes offered,
/// up and down.
pub fn send(state: &State, flows: &[Flow], ip_bytes: usize) -> Result<(u64, u64)> {
    let payload = vec![0x5a_u8; ip_bytes.max(2 * SMALLEST as usize)];
    let service = SocketAddr::new(IpAddr::V4(state.service), DISCARD);
    // Uplink: per initiator namespace, its initiators' flows.
    let mut by_ns: BTreeMap<&str, Vec<(Ipv4Addr, u64)>> = BTreeMap::new();
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
    let (mut up, mut down) = (0, 0);
    // One namespace after the other: a segw's charon decrypts in userland
    // (kernel-libipsec), and every initiator at once overran it (a third
    // of the uplink lost at 12 tunnels, none of the downlink, which one
    // segw sends at a time).
    for (ns, each) in &by_ns {
        up += Netns::adopt(ns)?
            .enter(|| {
                let mut sent = 0;
                for &(inner, bytes) in each {
                    let socket = UdpSocket::bind((inner, 0))?;
                    sent += burst(&socket, service, &payload, bytes, ip_bytes)?;
                }
                Ok::<_, std::io::Error>(sent)
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
    let mut by_segw: BTreeMap<&str, Vec<(Ipv4Addr, u64)>> = BTreeMap::new();
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
        down += Netns::adopt(&segw.ns)?
            .enter(|| {
                let socket = UdpSocket::bind((state.service, 0))?;
                let mut sent = 0;
                for &(inner, bytes) in each {
                    let to = SocketAddr::new(IpAddr::V4(inner), DISCARD);
                    sent += burst(&socket, to, &payload, bytes, ip_bytes)?;
                }
                Ok::<_, std::io::Error>(sent)
            })?
            .map_err(|e| step(&format!("sending from {}", segw.ns), e))?;
    }
    // Let the last datagrams through userland ESP before anyone counts.
    std::thread::sleep(Duration::from_millis(300));
    drop((sinks, listening));
    Ok((up, down))
}

/// A UDP socket bound to `at` inside `ns` (usable from any thread after).
pub(super) fn listen(ns: &str, at: SocketAddr) -> Result<UdpSocket> {
    Netns::adopt(ns)?
        .enter(|| UdpSocket::bind(at))?
        .map_err(|e| step(&format!("listening on {at} in {ns}"), e))
}

/// `bytes` to `to` in [`datagrams`] of at most `most` (IP size) cut from
/// `payload`, paced. Returns the IP bytes sent.
fn burst(
    socket: &UdpSocket,
    to: SocketAddr,
    payload: &[u8],
    bytes: u64,
    most: usize,
) -> std::io::Result<u64> {
    let mut sent = 0;
    for (k, size) in datagrams(bytes, most).enumerate() {
        socket.send_to(&payload[..size - HEADERS], to)?;
        sent += size as u64;
        if k as u32 % BURST == BURST - 1 {
            std::thread::sleep(PAUSE);
        }
    }
    Ok(sent)
}

/// Full datagrams per live tunnel the lab sends in the busiest step of a
/// scenario, on average, both ways: few enough that a step of 300 tunnels
/// sends in about a second.
pub const DATAGRAMS_PER_TUNNEL: f64 = 16.0;
/// The largest datagram the lab sends, IP bytes: the scenario's `packet_bytes`,
/// within what ESP in UDP over IPv6 fits in the lab's 1500-byte links.
const IP_BYTES: std::ops::RangeInclusive<u32> = 64..=1400;

/// A scenario's `[traffic]` as the lab carries it: each tunnel's bytes of
/// a step as the simulation draws them (profile by arrival number, seeded
/// as [`GIVEN_SEED`]), times one scale for the whole run, to the byte
/// ([`datagrams`]). The scale depends only on the scenario and the
/// plan, so every policy's run sends the same bytes per tunnel and step.
#[derive(Debug, Clone)]
pub struct Scaled {
    traffic: Traffic,
    step_secs: f64,
    /// Lab bytes per simulated byte.
    pub scale: f64,
    /// The largest datagram, IP header on.
    pub ip_bytes: u32,
}

impl Scaled {
    /// `None` without `[traffic]`, or when it carries nothing.
    pub fn of(scenario: &Scenario, plan: &Plan) -> Option<Scaled> {
        let traffic = scenario.traffic.clone()?;
        let ip_bytes = traffic
            .packet_bytes
            .clamp(*IP_BYTES.start(), *IP_BYTES.end());
        let mut scaled = Scaled {
            traffic,
            step_secs: scenario.step_secs as f64,
            scale: 1.0,
            ip_bytes,
        };
        // The busiest step's bytes per live tunnel.
        let busiest = (0..scenario.steps)
            .map(|step| {
                let at = scaled.step(step);
                let (bytes, live) = (plan.lives.iter().enumerate())
                    .filter(|(_, life)| life.live_in(step))
                    .fold((0.0, 0_usize), |(bytes, n), (l, _)| {
                        let (up, down) = at.sent(scaled.traffic.profile(GIVEN_SEED, l as u64));
                        (bytes + (up.bytes + down.bytes) as f64, n + 1)
                    });
                bytes / live.max(1) as f64
            })
            .fold(0.0, f64::max);
        if busiest <= 0.0 {
            return None;
        }
        scaled.scale = DATAGRAMS_PER_TUNNEL * f64::from(ip_bytes) / busiest;
        Some(scaled)
    }

    /// The traffic of `step`, worked out once for its tunnels.
    pub fn step(&self, step: u32) -> Step {
        self.traffic
            .step(f64::from(step) * self.step_secs, self.step_secs)
    }

    /// What tunnel `life` (arrival number) sends in `at`, lab bytes:
    /// (up, down).
    pub fn bytes(&self, at: &Step, life: usize) -> (u64, u64) {
        let (up, down) = at.sent(self.traffic.profile(GIVEN_SEED, life as u64));
        let lab = |bytes: u64| (bytes as f64 * self.scale).round() as u64;
        (lab(up.bytes), lab(down.bytes))
    }
}

/// Each present segw's charon: CPU seconds spent so far (user and system,
/// from `/proc/PID/stat`), by segw name; a dead (failed) one is absent.
/// What the segws' own load is,
/// which the balancer's byte counts cannot see.
pub fn charon_cpu(state: &State) -> Result<BTreeMap<String, f64>> {
    // SAFETY: sysconf reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut all = BTreeMap::new();
    for s in state.segws.iter().filter(|s| s.present && alive(s.pid)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_carry_every_byte_and_none_is_too_short() {
        for most in [64, 1000, 1400] {
            for bytes in (0..5000).chain([29 * 1400, 1400 * 3 + 28, 1400 + 1]) {
                let sizes: Vec<usize> = datagrams(bytes, most).collect();
                let sum: u64 = sizes.iter().map(|&s| s as u64).sum();
                let floor = if bytes == 0 { 0 } else { SMALLEST };
                assert_eq!(sum, bytes.max(floor), "{bytes} in {most}: {sizes:?}");
                assert!(
                    sizes.iter().all(|&s| (29..=most).contains(&s)),
                    "{bytes} in {most}: {sizes:?}"
                );
            }
        }
    }
}
