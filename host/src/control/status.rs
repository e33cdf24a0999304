//! What a running balancer reports: one snapshot type, taken by the worker
//! and read by `segwlb ctl status` (as text or `--json`) and by the
//! Prometheus endpoint. Plain data: it crosses threads and the control
//! socket as JSON.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt::Write;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::balancer::affinity::{Tunnel, TunnelState};
use crate::balancer::rates::ReportState;
use crate::balancer::{Balancer, DropReason, GatewayState, GwId};
use crate::control::config::format_mac;
use crate::packet::Malformed;
use crate::policy::{FallbackReason, Policy};
use crate::time::Timestamp;
use crate::units::show_rate;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub uptime_s: f64,
    pub policy: PolicyStatus,
    pub gateways: Vec<GatewayStatus>,
    pub counters: CounterStatus,
    /// Drops by reason (every reason, zeros included).
    pub drops: BTreeMap<String, u64>,
    /// Malformed frames by what was wrong (non-zero only).
    pub malformed: BTreeMap<String, u64>,
    pub table: TableStatus,
    /// Per port: frames sent and failed sends.
    pub ports: Vec<PortStatus>,
    /// How long the worker kept frames waiting.
    #[serde(default)]
    pub worker: WorkerStatus,
    /// The heaviest tunnels (bytes/s both ways), heaviest first, as many
    /// as asked for (`ctl status --top N`).
    #[serde(default)]
    pub top: Vec<TunnelStatus>,
    /// Graceful moves (`ctl gateway drain --graceful`, `ctl policy use
    /// --rebalance --graceful`).
    #[serde(default)]
    pub moves: MovesStatus,
    /// One of a pair of balancers (`[pair]`): its role and its sync link.
    #[serde(default)]
    pub pair: Option<crate::pair::PairStatus>,
}

/// Graceful moves: where those under way are, and how those over ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MovesStatus {
    pub per_second: f64,
    /// Waiting their turn.
    pub queued: usize,
    /// The old segw asked (the hook ran); the peer's new IKE SA not seen.
    pub asked: usize,
    /// The new IKE SA on its way up on the target.
    pub moving: usize,
    /// Over; the old entry kept a little longer for the old SAs' last packets.
    pub lingering: usize,
    /// Since start: moved (the target answered the new IKE SA's IKE_AUTH),
    /// timed out (the peer did not follow: the tunnel stayed, whole),
    /// skipped (gone, or no longer worth moving when its turn came).
    pub moved: u64,
    pub timed_out: u64,
    pub skipped: u64,
    /// The hook's runs, and those that failed or found its queue full.
    pub hook_ran: u64,
    pub hook_failed: u64,
}

impl MovesStatus {
    pub fn of(m: &crate::balancer::moves::Moves) -> Self {
        let p = m.progress();
        MovesStatus {
            per_second: m.settings.per_second,
            queued: p.queued,
            asked: p.asked,
            moving: p.moving,
            lingering: p.lingering,
            moved: m.counters.moved,
            timed_out: m.counters.timed_out,
            skipped: m.counters.skipped,
            hook_ran: 0,
            hook_failed: 0,
        }
    }

    fn render(&self) -> Option<String> {
        let m = self;
        (m.queued + m.asked + m.moving + m.lingering > 0 || m.moved + m.timed_out > 0).then(|| {
            format!(
                "graceful moves ({}/s): {} queued, {} asked, {} moving, {} lingering; {} moved, {} timed out (stayed), {} skipped; hook ran {}, failed {}",
                m.per_second, m.queued, m.asked, m.moving, m.lingering, m.moved, m.timed_out, m.skipped, m.hook_ran, m.hook_failed
            )
        })
    }
}

/// The worker's turns (see `dataplane::pauses`): busy time per turn of its
/// loop, in its CPU time, and the longest on the wall clock.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub turns: u64,
    pub busy_s: f64,
    pub longest_pause_us: f64,
    pub longest_pause_wall_us: f64,
    /// 99.9% of turns were shorter than this (a power of two µs).
    pub p999_pause_us: f64,
    /// Turns of 1.024 ms or more of work ...
    pub pauses_over_1ms: u64,
    /// ... and on the wall clock (preemption and blocked calls too).
    #[serde(default)]
    pub wall_pauses_over_1ms: u64,
    /// Entries in the XDP fast path's maps (both ways; 0 without it) ...
    #[serde(default)]
    pub fast_path_entries: u64,
    /// ... and whether a full resync of them is under way (the fast path
    /// passes every frame to the core meanwhile).
    #[serde(default)]
    pub fast_path_resyncing: bool,
    /// Cumulative: (upper bound in µs, turns shorter); the last bound is
    /// infinite (`None`).
    pub histogram: Vec<(Option<f64>, u64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub name: String,
    pub file: String,
    /// The contract version the policy file was built against.
    #[serde(default)]
    pub contract: String,
    /// Seconds since the Unix epoch.
    pub loaded_at: f64,
    /// Policies swapped in since start (file changes, config, ctl).
    pub reloads: u64,
    /// Reload attempts refused (a broken file); the old policy kept serving.
    pub rejected: u64,
    /// Last swap: from the change being noticed to the new policy serving.
    pub last_swap_ms: Option<f64>,
    pub decisions: u64,
    pub fallbacks: u64,
    pub fallbacks_by_reason: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub name: String,
    pub id: u32,
    pub interface: String,
    pub port: u16,
    pub mac: Option<String>,
    pub healthy: bool,
    pub draining: bool,
    pub weight: u32,
    pub tunnels: u64,
    /// The most tunnels it may hold; 0 for no limit.
    #[serde(default)]
    pub capacity: u64,
    pub frames_to: u64,
    pub bytes_to: u64,
    pub frames_from: u64,
    pub bytes_from: u64,
    pub moved_in: u64,
    /// Its traffic as rates and its utilization (absent from a balancer
    /// from before traffic).
    #[serde(default)]
    pub load: LoadStatus,
    /// Its tunnels, oldest first, up to the asked-for limit.
    pub tunnel_list: Vec<TunnelStatus>,
}

/// A gateway's load as last measured (every second; rates smoothed over
/// `balancer::rates::WINDOW`). "to" is towards the segw, "from" from it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadStatus {
    pub bytes_to_per_s: f64,
    pub bytes_from_per_s: f64,
    pub packets_to_per_s: f64,
    pub packets_from_per_s: f64,
    /// Its throughput capacity, bytes/s both ways; 0 for not given.
    pub throughput: u64,
    /// `policy::load::utilization` of what was measured.
    pub measured: f64,
    /// The last reported utilization, and whether it counts: `none`,
    /// `blackout` (reports too recent to count yet), `live`.
    pub reported: Option<f64>,
    pub reported_state: String,
    /// What policies balance on: the larger of measured and a live report.
    pub utilization: f64,
}

impl LoadStatus {
    fn of<P: Policy>(lb: &Balancer<P>, g: &GatewayState, now: Timestamp) -> LoadStatus {
        let view = lb.load().gateway(g.id);
        let rates = g.meter.rates;
        let (reported, reported_state) = match g.reported.state(now, lb.reporting()) {
            ReportState::None => (None, "none"),
            ReportState::Blackout { value } => (Some(value), "blackout"),
            ReportState::Live { value } => (Some(value), "live"),
        };
        LoadStatus {
            bytes_to_per_s: rates.bytes_to.round(),
            bytes_from_per_s: rates.bytes_from.round(),
            packets_to_per_s: rates.packets_to.round(),
            packets_from_per_s: rates.packets_from.round(),
            throughput: g.spec.throughput,
            measured: view.measured,
            reported,
            reported_state: reported_state.into(),
            // The report as it stands now (the load view takes it at the
            // next measurement, within a second).
            utilization: crate::policy::load::with_report(
                view.measured,
                reported.filter(|_| reported_state == "live"),
            ),
        }
    }

    /// `load 3.20 Gbit/s (to 640 Mbit/s, from 2.56 Gbit/s; 500 kpps) of
    /// 4.00 Gbit/s; utilization 80% (reported 75%, live)`.
    pub fn render(&self) -> String {
        let total = self.bytes_to_per_s + self.bytes_from_per_s;
        let pps = self.packets_to_per_s + self.packets_from_per_s;
        let mut line = format!(
            "load {} (to {}, from {}; {:.0} pps)",
            show_rate(total),
            show_rate(self.bytes_to_per_s),
            show_rate(self.bytes_from_per_s),
            pps
        );
        if self.throughput > 0 {
            let _ = write!(line, " of {}", show_rate(self.throughput as f64));
        }
        let _ = write!(line, "; utilization {:.0}%", self.utilization * 100.0);
        if let Some(r) = self.reported {
            let _ = write!(
                line,
                " (measured {:.0}%, reported {:.0}%, {})",
                self.measured * 100.0,
                r * 100.0,
                self.reported_state
            );
        }
        line
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TunnelStatus {
    /// The remote endpoint, `address:port` (port 0: raw ESP).
    pub remote: String,
    pub peer: String,
    pub peer_port: u16,
    /// The port it opened from: with `peer`, the key the policy placed it
    /// by (it differs from `peer_port` after the float to 4500).
    #[serde(default)]
    pub opened_port: u16,
    /// Seconds since the tunnel was first seen.
    pub age_s: f64,
    pub idle_s: f64,
    /// Packets and IP bytes towards its segw ...
    pub frames: u64,
    pub bytes: u64,
    /// ... and back (absent from a balancer from before traffic).
    #[serde(default)]
    pub frames_back: u64,
    #[serde(default)]
    pub bytes_back: u64,
    /// Its rates, smoothed over 5 s, updated about every second.
    #[serde(default)]
    pub packets_to_per_s: f64,
    #[serde(default)]
    pub bytes_to_per_s: f64,
    #[serde(default)]
    pub packets_from_per_s: f64,
    #[serde(default)]
    pub bytes_from_per_s: f64,
    /// The segw it is on.
    #[serde(default)]
    pub gateway: String,
    pub state: String,
    /// How sure the table is of its segw, and who said so: guessed,
    /// spi-range, opened, moved, confirmed (see `balancer::rules`).
    #[serde(default)]
    pub placement: String,
    pub ike_spi: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CounterStatus {
    pub forwarded: u64,
    /// Of those, by the XDP fast path.
    #[serde(default)]
    pub fast_path: u64,
    pub replies: u64,
    pub placed: u64,
    pub taught: u64,
    /// Return traffic from a segw for a tunnel placed on another: forwarded,
    /// nothing moved (a segw a rebalance or failure moved tunnels away from,
    /// still talking).
    #[serde(default)]
    pub conflicts: u64,
    pub moved: u64,
    pub steered: u64,
    /// Frames whose SPI range named another segw than a tunnel the table
    /// holds for sure: sent by the table.
    #[serde(default)]
    pub spi_overruled: u64,
    /// IKE from a new endpoint without the SPI pair its segw answered
    /// with: sent to the tunnel's segw, the binding not moved.
    #[serde(default)]
    pub unproven_moves: u64,
    /// First fragments' decisions evicted by newer ones (a flood of first
    /// fragments, or more fragmented packets than the map keeps).
    #[serde(default)]
    pub fragment_decisions_evicted: u64,
    /// Later fragments held for their first fragment, since start.
    #[serde(default)]
    pub fragments_held: u64,
    /// Later fragments waiting for their first fragment now.
    #[serde(default)]
    pub fragments_waiting: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableStatus {
    pub tunnels: usize,
    pub capacity: usize,
    pub inserted: u64,
    pub evicted_half_open: u64,
    pub refused_full: u64,
    pub expired: u64,
    /// Moves onto an endpoint another established tunnel is at, refused.
    #[serde(default)]
    pub rebind_refused: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortStatus {
    pub port: u16,
    pub interface: String,
    pub sent: u64,
    pub send_errors: u64,
}

/// What the worker knows about the policy besides the balancer.
#[derive(Debug, Clone, Default)]
pub struct PolicyRecord {
    pub name: String,
    pub file: String,
    /// `segwlb:policy@X.Y.Z`.
    pub contract: String,
    pub loaded_at: f64,
    pub reloads: u64,
    pub rejected: u64,
    pub last_swap_ms: Option<f64>,
}

/// The oldest tunnels of each gateway, up to a limit, gathered a slice of
/// the table at a time: at a million tunnels one pass is tens of
/// milliseconds, which the worker must not spend in one go. Each slice
/// visits up to a budget of the table's slots; tunnels that come, go or
/// move meanwhile may or may not be listed, as in any snapshot taken while
/// traffic flows. The counts beside the lists are exact (taken at the end).
#[derive(Debug)]
pub struct TunnelLists {
    limit: usize,
    /// How many of the heaviest tunnels, over every gateway.
    top: usize,
    cursor: usize,
    /// Per gateway, the `limit` oldest seen so far (see [`keep`]).
    oldest: BTreeMap<GwId, BinaryHeap<Ranked<OldestKey>>>,
    /// The `top` heaviest seen so far, by a reversed key: the lightest of
    /// them is the one to drop.
    heaviest: BinaryHeap<Ranked<Reverse<HeavyKey>>>,
}

/// The most `ctl status --top` lists.
pub const TOP_MAX: usize = 10_000;
/// The most tunnels `ctl status --tunnels` lists of each gateway: what a
/// person reads, and more than the lab's largest table. Anyone who may
/// ask for status may ask for this many; the whole table is the state
/// file's (`ctl save`).
pub const TUNNELS_MAX: usize = 10_000;

/// First seen, then the endpoint: oldest first.
type OldestKey = (Timestamp, IpAddr, u16);
/// Bytes/s both ways (the bits of a non-negative f32 order as its value),
/// then the endpoint.
type HeavyKey = (u32, IpAddr, u16);

/// A tunnel ordered by its key alone.
#[derive(Debug)]
struct Ranked<K>(K, Tunnel);

impl<K: Ord> PartialEq for Ranked<K> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl<K: Ord> Eq for Ranked<K> {}
impl<K: Ord> PartialOrd for Ranked<K> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<K: Ord> Ord for Ranked<K> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

/// Keep the `limit` tunnels of smallest key in `heap` (a max-heap: the
/// largest kept is the one to drop), `t` among them if it is one; the
/// tunnel is cloned only when kept.
fn keep<K: Ord>(heap: &mut BinaryHeap<Ranked<K>>, limit: usize, key: K, t: &Tunnel) {
    if heap.len() < limit {
        heap.push(Ranked(key, t.clone()));
    } else if heap.peek().is_some_and(|largest| key < largest.0) {
        heap.pop();
        heap.push(Ranked(key, t.clone()));
    }
}

impl TunnelLists {
    pub fn new(limit: usize) -> Self {
        Self::with_top(limit, 0)
    }

    /// The `limit` oldest tunnels of each gateway (at most
    /// [`TUNNELS_MAX`]), and the `top` heaviest (at most [`TOP_MAX`]).
    pub fn with_top(limit: usize, top: usize) -> Self {
        TunnelLists {
            limit: limit.min(TUNNELS_MAX),
            top: top.min(TOP_MAX),
            cursor: 0,
            oldest: BTreeMap::new(),
            heaviest: BinaryHeap::new(),
        }
    }

    /// Nothing to walk the table for.
    pub fn is_empty(&self) -> bool {
        self.limit == 0 && self.top == 0
    }

    /// Visit up to `budget` more slots of the table; `true` once every slot
    /// has been visited.
    pub fn advance<P: Policy>(&mut self, lb: &Balancer<P>, budget: usize) -> bool {
        let table = lb.table();
        if self.is_empty() {
            return true;
        }
        let end = table.slots().min(self.cursor.saturating_add(budget));
        for (_, t) in table.slots_in(self.cursor..end) {
            if self.top > 0 {
                let rate = t.rates.bytes_per_sec().to_bits();
                let key = Reverse((rate, t.peer, t.peer_port));
                keep(&mut self.heaviest, self.top, key, t);
            }
            if self.limit > 0 {
                let heap = self.oldest.entry(t.gateway).or_default();
                keep(heap, self.limit, (t.since, t.peer, t.peer_port), t);
            }
        }
        self.cursor = end;
        self.cursor >= table.slots()
    }

    /// The lists, oldest first, and the heaviest, heaviest first, as of
    /// `now`; `name` names a gateway.
    fn finish(
        self,
        now: Timestamp,
        name: &dyn Fn(GwId) -> String,
    ) -> (BTreeMap<GwId, Vec<TunnelStatus>>, Vec<TunnelStatus>) {
        let lists = self
            .oldest
            .into_iter()
            .map(|(gw, heap)| {
                let list = heap
                    .into_sorted_vec()
                    .iter()
                    .map(|r| tunnel_status(&r.1, &name(gw), now))
                    .collect();
                (gw, list)
            })
            .collect();
        // Sorted ascending by the reversed key: heaviest first.
        let top = self
            .heaviest
            .into_sorted_vec()
            .iter()
            .map(|r| tunnel_status(&r.1, &name(r.1.gateway), now))
            .collect();
        (lists, top)
    }
}

/// A status as the worker hands it over: everything but the tunnel lists,
/// which are gathered (bounded, unsorted) but not yet sorted or formatted:
/// that is [`Gathered::finish`]'s work, on the thread that asked, never
/// the worker's.
#[derive(Debug)]
pub struct Gathered {
    status: Status,
    lists: TunnelLists,
    now: Timestamp,
}

impl Gathered {
    /// A snapshot of `lb`, with the tunnels `lists` gathered (see
    /// [`TunnelLists`]; `TunnelLists::new(0)` lists none) to list.
    pub fn of<P: Policy>(
        lb: &Balancer<P>,
        policy: &PolicyRecord,
        ports: Vec<PortStatus>,
        now: Timestamp,
        uptime_s: f64,
        lists: TunnelLists,
    ) -> Gathered {
        Gathered {
            status: Status::of(lb, policy, ports, now, uptime_s),
            lists,
            now,
        }
    }

    /// The status, to be completed by the worker before it hands it over.
    pub fn status_mut(&mut self) -> &mut Status {
        &mut self.status
    }

    /// The status with its tunnel lists: oldest first per gateway, the
    /// heaviest first.
    pub fn finish(self) -> Status {
        let Gathered {
            mut status,
            lists,
            now,
        } = self;
        if lists.is_empty() {
            return status;
        }
        let names: BTreeMap<GwId, String> = status
            .gateways
            .iter()
            .map(|g| (g.id, g.name.clone()))
            .collect();
        let name = |gw: GwId| names.get(&gw).cloned().unwrap_or_else(|| format!("#{gw}"));
        let (mut lists, top) = lists.finish(now, &name);
        for g in &mut status.gateways {
            g.tunnel_list = lists.remove(&g.id).unwrap_or_default();
        }
        status.top = top;
        status
    }
}

impl Status {
    /// A snapshot of `lb`, listing no tunnels.
    fn of<P: Policy>(
        lb: &Balancer<P>,
        policy: &PolicyRecord,
        ports: Vec<PortStatus>,
        now: Timestamp,
        uptime_s: f64,
    ) -> Status {
        let interface_of = |port: u16| {
            ports
                .iter()
                .find(|p| p.port == port)
                .map_or_else(String::new, |p| p.interface.clone())
        };
        let gateways = lb
            .gateways()
            .map(|g| GatewayStatus {
                name: g.spec.name.clone(),
                id: g.id,
                interface: interface_of(g.spec.port),
                port: g.spec.port,
                mac: g.mac.as_ref().map(format_mac),
                healthy: g.healthy,
                draining: g.draining,
                weight: g.spec.weight,
                tunnels: g.counters.tunnels,
                capacity: g.spec.capacity,
                frames_to: g.counters.frames_to,
                bytes_to: g.counters.bytes_to,
                frames_from: g.counters.frames_from,
                bytes_from: g.counters.bytes_from,
                moved_in: g.counters.moved_in,
                load: LoadStatus::of(lb, g, now),
                tunnel_list: Vec::new(),
            })
            .collect();
        let c = lb.counters();
        let stats = lb.policy_stats();
        let t = &lb.table().counters;
        Status {
            uptime_s,
            policy: PolicyStatus {
                name: policy.name.clone(),
                file: policy.file.clone(),
                contract: policy.contract.clone(),
                loaded_at: policy.loaded_at,
                reloads: policy.reloads,
                rejected: policy.rejected,
                last_swap_ms: policy.last_swap_ms,
                decisions: stats.decisions,
                fallbacks: stats.fallbacks_total(),
                fallbacks_by_reason: FallbackReason::ALL
                    .iter()
                    .map(|&r| (r.as_str().to_string(), stats.fallbacks_for(r)))
                    .collect(),
            },
            gateways,
            counters: CounterStatus {
                forwarded: c.forwarded,
                fast_path: c.fast_path,
                replies: c.replies,
                placed: c.placed,
                taught: c.taught,
                conflicts: c.conflicts,
                moved: c.moved,
                steered: c.steered,
                spi_overruled: c.spi_overruled,
                unproven_moves: c.unproven_moves,
                fragment_decisions_evicted: lb.fragment_decisions().1,
                fragments_held: c.held,
                fragments_waiting: lb.held_fragments().1,
            },
            drops: DropReason::ALL
                .iter()
                .map(|&r| (r.as_str().to_string(), c.dropped(r)))
                .collect(),
            malformed: Malformed::ALL
                .iter()
                .filter(|&&m| c.malformed[m as usize] > 0)
                .map(|&m| (format!("{m:?}"), c.malformed[m as usize]))
                .collect(),
            table: TableStatus {
                tunnels: lb.table().len(),
                capacity: lb.table().capacity(),
                inserted: t.inserted,
                evicted_half_open: t.evicted_half_open,
                refused_full: t.refused_full,
                expired: t.expired,
                rebind_refused: t.rebind_refused,
            },
            ports,
            worker: WorkerStatus::default(),
            top: Vec::new(),
            moves: MovesStatus::of(lb.moves()),
            pair: None,
        }
    }

    pub fn gateway(&self, name: &str) -> Option<&GatewayStatus> {
        self.gateways.iter().find(|g| g.name == name)
    }

    /// The text `segwlb ctl status` prints: a router's
    /// `show ipsec gateway tunnel`, then the policy, drops and table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let p = &self.policy;
        let _ = writeln!(
            out,
            "policy {} ({}, contract {}), {} reload{}{}, {} decisions, {} fallbacks{}",
            p.name,
            p.file,
            if p.contract.is_empty() {
                "?"
            } else {
                &p.contract
            },
            p.reloads,
            if p.reloads == 1 { "" } else { "s" },
            p.last_swap_ms
                .map_or_else(String::new, |ms| format!(" (last swap {ms:.1} ms)")),
            p.decisions,
            p.fallbacks,
            if p.rejected > 0 {
                format!(", {} broken file(s) rejected", p.rejected)
            } else {
                String::new()
            },
        );
        for g in &self.gateways {
            let _ = writeln!(
                out,
                "\ngateway {}  {}  {}  {}{}  weight {}  tunnels {}  to-segw {} frames {} bytes  from-segw {} frames {} bytes",
                g.name,
                g.interface,
                g.mac.as_deref().unwrap_or("mac unknown"),
                if g.healthy { "up" } else { "DOWN" },
                if g.draining { " draining" } else { "" },
                g.weight,
                match g.capacity {
                    0 => g.tunnels.to_string(),
                    cap if g.tunnels >= cap => format!("{}/{cap} FULL", g.tunnels),
                    cap => format!("{}/{cap}", g.tunnels),
                },
                g.frames_to,
                g.bytes_to,
                g.frames_from,
                g.bytes_from,
            );
            let _ = writeln!(out, "  {}", g.load.render());
            if g.tunnel_list.is_empty() {
                continue;
            }
            let _ = writeln!(
                out,
                "  {:<40} {:>9} {:>9} {:>12} {:>14}  {:<12} {:<10} ike-spi",
                "remote endpoint", "age", "idle", "frames", "bytes", "state", "placed"
            );
            for t in &g.tunnel_list {
                let _ = writeln!(
                    out,
                    "  {:<40} {:>8.0}s {:>8.0}s {:>12} {:>14}  {:<12} {:<10} {}",
                    t.remote,
                    t.age_s,
                    t.idle_s,
                    t.frames,
                    t.bytes,
                    t.state,
                    t.placement,
                    t.ike_spi.as_deref().unwrap_or("-"),
                );
            }
            let listed = g.tunnel_list.len() as u64;
            if listed < g.tunnels {
                let _ = writeln!(out, "  … and {} more", g.tunnels - listed);
            }
        }
        if !self.top.is_empty() {
            let _ = writeln!(
                out,
                "\nheaviest tunnels (bytes/s both ways, over the last ~5 s)\n  {:<40} {:<10} {:>14} {:>14} {:>10} {:>10}",
                "remote endpoint", "segw", "to segw", "from segw", "pps to", "pps from"
            );
            for t in &self.top {
                let _ = writeln!(
                    out,
                    "  {:<40} {:<10} {:>14} {:>14} {:>10.0} {:>10.0}",
                    t.remote,
                    t.gateway,
                    show_rate(t.bytes_to_per_s),
                    show_rate(t.bytes_from_per_s),
                    t.packets_to_per_s,
                    t.packets_from_per_s
                );
            }
        }
        if let Some(moves) = self.moves.render() {
            let _ = writeln!(out, "\n{moves}");
        }
        if let Some(p) = &self.pair {
            let _ = writeln!(out, "\n{}", p.render());
        }
        let c = &self.counters;
        let _ = writeln!(
            out,
            "\nframes forwarded {}{}, ARP/NDP replies {}; tunnels placed {}, taught {}, moved {}, SPI-steered frames {}, segw conflicts {}",
            c.forwarded,
            if c.fast_path > 0 { format!(" ({} by the XDP fast path)", c.fast_path) } else { String::new() },
            c.replies, c.placed, c.taught, c.moved, c.steered, c.conflicts
        );
        if c.spi_overruled + c.unproven_moves + self.table.rebind_refused > 0 {
            let _ = writeln!(
                out,
                "refused to move: {} frames whose SPI range named another segw, {} IKE moves without the SPI pair, {} moves onto another tunnel's endpoint",
                c.spi_overruled, c.unproven_moves, self.table.rebind_refused
            );
        }
        let t = &self.table;
        let _ = writeln!(
            out,
            "table {} / {} tunnels; expired {}, half-open evicted {}, refused (full) {}",
            t.tunnels, t.capacity, t.expired, t.evicted_half_open, t.refused_full
        );
        let drops: Vec<String> = self
            .drops
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        let refused = self
            .drops
            .get(DropReason::AtCapacity.as_str())
            .copied()
            .unwrap_or(0);
        let full = p
            .fallbacks_by_reason
            .get(FallbackReason::GatewayFull.as_str())
            .copied()
            .unwrap_or(0);
        if refused > 0 || full > 0 {
            let _ = writeln!(
                out,
                "capacity: {refused} tunnel tries refused (every segw taking tunnels full); \
                 {full} policy answers of a full segw placed elsewhere"
            );
        }
        let w = &self.worker;
        let _ = writeln!(
            out,
            "worker: {} turns, longest {:.0} µs of work ({:.0} µs on the wall clock), 99.9% under {:.0} µs, {} over 1 ms ({} on the wall clock)",
            w.turns,
            w.longest_pause_us,
            w.longest_pause_wall_us,
            w.p999_pause_us,
            w.pauses_over_1ms,
            w.wall_pauses_over_1ms
        );
        if w.fast_path_entries > 0 || w.fast_path_resyncing {
            let _ = writeln!(
                out,
                "fast path: {} entries{}",
                w.fast_path_entries,
                if w.fast_path_resyncing {
                    " (a full resync under way: every frame goes to the core meanwhile)"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(
            out,
            "drops: {}",
            if drops.is_empty() {
                "none".into()
            } else {
                drops.join(", ")
            }
        );
        out
    }
}

fn tunnel_status(t: &Tunnel, gateway: &str, now: Timestamp) -> TunnelStatus {
    let peer = t.peer.to_string();
    let remote = match t.peer {
        std::net::IpAddr::V6(_) => format!("[{peer}]:{}", t.peer_port),
        std::net::IpAddr::V4(_) => format!("{peer}:{}", t.peer_port),
    };
    TunnelStatus {
        remote,
        peer,
        peer_port: t.peer_port,
        opened_port: t.opened_port,
        age_s: now.since(t.since).as_secs_f64(),
        idle_s: now.since(t.last_seen).as_secs_f64(),
        frames: t.frames,
        bytes: t.bytes,
        frames_back: t.frames_back,
        bytes_back: t.bytes_back,
        packets_to_per_s: f64::from(t.rates.per_sec[0]).round(),
        bytes_to_per_s: f64::from(t.rates.per_sec[1]).round(),
        packets_from_per_s: f64::from(t.rates.per_sec[2]).round(),
        bytes_from_per_s: f64::from(t.rates.per_sec[3]).round(),
        gateway: gateway.to_string(),
        state: match t.state() {
            TunnelState::HalfOpen => "half-open",
            TunnelState::Established => "established",
        }
        .into(),
        placement: t.placement().as_str().into(),
        ike_spi: t.ike_spi.map(|s| format!("{s:016x}")),
    }
}
