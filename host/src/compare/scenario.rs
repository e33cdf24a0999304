//! What `segwlb compare` runs: a gateway set, a tunnel population and timed
//! events, read from TOML (`config/scenarios/`). The built-in default is
//! `config/scenarios/default.toml`, compiled in.
//!
//! A bad file gets an error naming the file, the line and column, and the
//! field: `config/scenarios/x.toml:31:7: event[2].fail: no segw "segw9" at
//! step 4 (segws then: segw1, segw2)`.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::outage::{Stack, Timers};
use super::traffic::{RateDist, Shape, Traffic};
use crate::toml_at::{field_at, line_column};
use crate::units::parse_rate;

/// The built-in scenario's text.
pub const BUILTIN: &str = include_str!("../../../config/scenarios/default.toml");
/// The built-in scenario of `segwlb lab compare`: lab-sized.
pub const BUILTIN_LAB: &str = include_str!("../../../config/scenarios/lab.toml");
/// The built-in capacity scenario (`--scenario capacity`): a failure at peak.
pub const BUILTIN_CAPACITY: &str = include_str!("../../../config/scenarios/capacity.toml");
/// The built-in capacity scenario of `segwlb lab compare`: lab-sized.
pub const BUILTIN_LAB_CAPACITY: &str = include_str!("../../../config/scenarios/lab-capacity.toml");
/// A day of traffic (`--scenario diurnal`): cells of mixed daily shapes on
/// segws of unequal throughput, a failure at the busy hour.
pub const BUILTIN_DIURNAL: &str = include_str!("../../../config/scenarios/diurnal.toml");
/// The pair's failover (`--scenario failover`): the active balancer killed,
/// back as the standby, then the new active's uplink down.
pub const BUILTIN_FAILOVER: &str = include_str!("../../../config/scenarios/failover.toml");
/// The pair's failover at lab size (`lab compare --scenario lab-failover`,
/// on a lab with `lab.balancers = 2`).
pub const BUILTIN_LAB_FAILOVER: &str = include_str!("../../../config/scenarios/lab-failover.toml");

/// `--scenario NAME` for a built-in one (a file of that name wins).
pub const BUILTINS: [(&str, &str); 7] = [
    ("default", BUILTIN),
    ("capacity", BUILTIN_CAPACITY),
    ("diurnal", BUILTIN_DIURNAL),
    ("failover", BUILTIN_FAILOVER),
    ("lab", BUILTIN_LAB),
    ("lab-capacity", BUILTIN_LAB_CAPACITY),
    ("lab-failover", BUILTIN_LAB_FAILOVER),
];

/// Upper bounds, so a typo cannot ask for a run that never ends.
pub const MAX_TUNNELS: usize = 10_000_000;
pub const MAX_STEPS: u32 = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegwSpec {
    pub name: String,
    pub weight: u32,
    /// The most tunnels it may hold; 0 for no limit.
    pub capacity: u64,
    /// The traffic it can carry, bytes/s both directions together (what it
    /// can encrypt and decrypt); 0 for not given.
    pub throughput: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The segw stops answering: it is marked down, and its tunnels go
    /// elsewhere on their next packet.
    Fail(String),
    Recover(String),
    Add(SegwSpec),
    /// The segw leaves the set; its tunnels go elsewhere.
    Remove(String),
    Weight(String, u32),
    /// No new tunnels; existing ones stay.
    Drain(String),
    Undrain(String),
    /// The same policy, loaded again (a hot reload). With `rebalance`, every
    /// tunnel is placed afresh by it.
    Swap {
        rebalance: bool,
    },
    /// The active balancer of the pair fails; the standby takes over, with
    /// the table as replicated to it (see [`Pair`]).
    BalancerFail(Failure),
    /// The failed balancer is back, as the standby: it takes a snapshot of
    /// the table and forwards nothing, so no tunnel notices.
    BalancerRecover,
}

/// How the active balancer fails. The lab makes each real; to the model
/// they are the same: the active stops forwarding, and the standby takes
/// over once VRRP misses its adverts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Its process is killed (SIGKILL): nothing is saved, nothing said.
    Kill,
    /// Its uplink goes down: it still runs, but hears and sends nothing
    /// on the initiators' side.
    Uplink,
}

impl Event {
    pub fn label(&self) -> String {
        match self {
            Event::Fail(n) => format!("{n} fails"),
            Event::Recover(n) => format!("{n} recovers"),
            Event::Add(s) => format!("{} joins (weight {})", s.name, s.weight),
            Event::Remove(n) => format!("{n} removed"),
            Event::Weight(n, w) => format!("{n} weight → {w}"),
            Event::Drain(n) => format!("{n} drains"),
            Event::Undrain(n) => format!("{n} undrains"),
            Event::Swap { rebalance: false } => "policy hot-swap".into(),
            Event::Swap { rebalance: true } => "rebalance".into(),
            Event::BalancerFail(Failure::Kill) => "active balancer killed".into(),
            Event::BalancerFail(Failure::Uplink) => "active balancer's uplink down".into(),
            Event::BalancerRecover => "failed balancer back as standby".into(),
        }
    }
}

/// An event and the step at whose start it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedEvent {
    pub step: u32,
    pub event: Event,
    /// A drain or a rebalance whose moves are make-before-break
    /// (`balancer::moves`): the old segw redirects each peer, paced by the
    /// scenario's `moves_per_second`; nobody is dark.
    pub graceful: bool,
}

impl TimedEvent {
    pub fn label(&self) -> String {
        match (&self.event, self.graceful) {
            (Event::Drain(n), true) => format!("{n} drains gracefully"),
            (Event::Swap { rebalance: true }, true) => "graceful rebalance".into(),
            (e, _) => e.label(),
        }
    }
}

/// The tunnel population.
#[derive(Debug, Clone, PartialEq)]
pub struct Population {
    /// Tunnels alive at any time.
    pub count: usize,
    /// Steps over which the initial population arrives (evenly).
    pub arrive_over: u32,
    /// Share behind NAT.
    pub nat: f64,
    /// Public addresses the NAT'd share hides behind.
    pub nat_addresses: u32,
    /// Share of the non-NAT'd tunnels sending raw ESP (the rest: ESP in UDP).
    pub raw_esp: f64,
    /// Share of the non-NAT'd tunnels that come over IPv6 (to the VIP's
    /// IPv6 address).
    pub ipv6: f64,
    /// Share of live tunnels ending per step, replaced by new ones.
    pub churn: f64,
    pub packets_per_step: u32,
    pub esp_bytes: u32,
    /// A burst of arrivals on top of `count`, staying to the end.
    pub peak: Option<Peak>,
}

/// `[pair]`: the active/standby pair a `balancer_fail` event fails over.
///
/// The defaults: a replication stream a few milliseconds behind the active
/// (a delta crosses the sync link and is applied), and keepalived's VRRP
/// with `advert_int 0.2`: the standby declares the master down after
/// 3 × 0.2 s + skew (RFC 5798: (256 − priority) / 256 × 0.2 s, 0.12 s at
/// priority 100), 0.72 s, then runs its notify script (`segwlb ctl role
/// active`) and announces itself: about a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    /// How far the standby's table is behind the active's: tunnels opened
    /// within it before the failure are unknown to the standby.
    pub replication_lag: Duration,
    /// From the failure until the standby forwards: every tunnel is dark
    /// that long.
    pub detection: Duration,
}

impl Default for Pair {
    fn default() -> Self {
        Pair {
            replication_lag: Duration::from_millis(5),
            detection: Duration::from_millis(1000),
        }
    }
}

impl Pair {
    /// One line: what a failover costs in the model.
    pub fn describe(&self) -> String {
        format!(
            "the standby takes over {} ms after the active fails (VRRP detection); tunnels opened within {} ms before (the replication lag) are unknown to it and placed again by its policy",
            self.detection.as_millis(),
            self.replication_lag.as_millis()
        )
    }
}

/// `tunnels.peak`: `tunnels` more arrive in `step` (the population is
/// `count + tunnels` from then on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peak {
    pub step: u32,
    pub tunnels: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub name: String,
    pub step_secs: u64,
    pub steps: u32,
    pub segws: Vec<SegwSpec>,
    pub tunnels: Population,
    /// What each tunnel carries; without it every tunnel sends
    /// `packets_per_step` packets of `esp_bytes` each way.
    pub traffic: Option<Traffic>,
    /// The peers' timers: how long a moved tunnel stays dark.
    pub peers: Timers,
    /// Sorted by step (file order within a step).
    pub events: Vec<TimedEvent>,
    /// Graceful moves asked per second, at most (`[moves] per_second` of
    /// `segwlb run`).
    pub moves_per_second: f64,
    /// The balancers' pair, for `balancer_fail` events.
    pub pair: Pair,
}

/// A scenario file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {field}: {message}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        /// Dotted path of the field, e.g. `event[2].fail` or `tunnels.nat`.
        field: String,
        message: String,
    },
}

impl Scenario {
    /// The built-in default: ~10,000 tunnels over 4 segws (segw1 with double
    /// weight), 20% NAT'd, churn, one failure and recovery, one addition, a
    /// hot swap and a rebalance.
    pub fn builtin() -> Self {
        Scenario::parse(BUILTIN, "<built-in>").expect("the built-in scenario is valid")
    }

    /// The built-in scenario of `segwlb lab compare`: 12 tunnels over 3
    /// segws (segw1 with double weight), 3 behind a NAT, arriving over 6
    /// steps; a failure and recovery, an addition, a hot swap, a rebalance.
    pub fn builtin_lab() -> Self {
        Scenario::parse(BUILTIN_LAB, "<built-in lab>").expect("the built-in lab scenario is valid")
    }

    /// `--scenario ARG`: a file, or the name of a built-in scenario
    /// (`default`, `capacity`, `diurnal`, `failover`, `lab`, `lab-capacity`,
    /// `lab-failover`)
    /// when no such file exists.
    pub fn resolve(arg: &Path) -> Result<Self, ScenarioError> {
        let builtin = BUILTINS
            .iter()
            .find(|(name, _)| !arg.exists() && arg.as_os_str() == *name);
        match builtin {
            Some((name, text)) => Scenario::parse(text, &format!("<built-in {name}>")),
            None => Scenario::load(arg),
        }
    }

    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            file: file.clone(),
            source,
        })?;
        Scenario::parse(&text, &file)
    }

    /// Parse and validate `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ScenarioError> {
        let at = |span: Range<usize>, field: String, message: String| {
            let (line, column) = line_column(text, span.start);
            ScenarioError::Invalid {
                file: file.to_string(),
                line,
                column,
                field,
                message,
            }
        };
        let raw: RawScenario = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let field = field_at(text, span.start);
            at(span, field, e.message().to_string())
        })?;
        raw.validate(&at)
    }

    /// Tunnels that ever exist: the population, the peak, and every
    /// replacement.
    pub fn total_tunnels(&self) -> usize {
        let churned = (self.tunnels.count as f64 * self.tunnels.churn).round() as usize;
        let peak = self.tunnels.peak.map_or(0, |p| p.tunnels);
        self.tunnels.count + peak + churned * self.steps as usize
    }

    /// The population the arrivals keep up at `step`: the count, plus the
    /// peak once it came.
    pub fn population_at(&self, step: u32) -> usize {
        let peak = self.tunnels.peak.filter(|p| p.step <= step);
        self.tunnels.count + peak.map_or(0, |p| p.tunnels)
    }

    /// Does any segw have a capacity?
    pub fn has_capacities(&self) -> bool {
        self.all_segws().iter().any(|s| s.capacity > 0)
    }

    /// Does an event fail the pair's active balancer?
    pub fn has_failovers(&self) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e.event, Event::BalancerFail(_)))
    }

    /// Does any segw have a throughput capacity?
    pub fn has_throughputs(&self) -> bool {
        self.all_segws().iter().any(|s| s.throughput > 0)
    }

    /// Every segw that ever takes part: the initial set, then additions.
    pub fn all_segws(&self) -> Vec<SegwSpec> {
        let mut all = self.segws.clone();
        for e in &self.events {
            if let Event::Add(s) = &e.event {
                if !all.iter().any(|g| g.name == s.name) {
                    all.push(s.clone());
                }
            }
        }
        all
    }
}

impl fmt::Display for Scenario {
    /// One line: what the workload is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let segws: Vec<String> = self
            .segws
            .iter()
            .map(|g| {
                let mut tags = Vec::new();
                if g.weight != 1 {
                    tags.push(format!("w{}", g.weight));
                }
                if g.capacity > 0 {
                    tags.push(format!("cap {}", g.capacity));
                }
                if g.throughput > 0 {
                    tags.push(crate::units::show_rate(g.throughput as f64));
                }
                match tags.is_empty() {
                    true => g.name.clone(),
                    false => format!("{}({})", g.name, tags.join(", ")),
                }
            })
            .collect();
        let t = &self.tunnels;
        let peak = t.peak.map_or_else(String::new, |p| {
            format!(" (+{} at peak, step {})", p.tunnels, p.step)
        });
        write!(
            f,
            "{}: {} tunnels{peak} over {}; {:.0}% NAT'd, {:.0}% raw ESP, {:.0}% IPv6; {}% churn per step; {} steps of {} s",
            self.name,
            t.count,
            segws.join(" "),
            t.nat * 100.0,
            (1.0 - t.nat) * t.raw_esp * 100.0,
            (1.0 - t.nat) * t.ipv6 * 100.0,
            // Whole percent, or the first figure that is not zero.
            match t.churn * 100.0 {
                c if c == 0.0 || c >= 1.0 => format!("{c:.0}"),
                c => format!("{c:.1}"),
            },
            self.steps,
            self.step_secs,
        )
    }
}

// ----- the file as written ------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: Option<String>,
    step_secs: Spanned<u64>,
    steps: Spanned<u32>,
    #[serde(default)]
    segw: Vec<Spanned<RawSegw>>,
    tunnels: RawPopulation,
    traffic: Option<Spanned<RawTraffic>>,
    peers: Option<RawPeers>,
    moves_per_second: Option<Spanned<f64>>,
    pair: Option<RawPair>,
    #[serde(default)]
    event: Vec<Spanned<RawEvent>>,
}

/// `[pair]`: whole milliseconds, each optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPair {
    replication_lag_ms: Option<u64>,
    detection_ms: Option<u64>,
}

impl RawPair {
    fn pair(&self) -> Pair {
        let d = Pair::default();
        let ms = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_millis);
        Pair {
            replication_lag: ms(self.replication_lag_ms, d.replication_lag),
            detection: ms(self.detection_ms, d.detection),
        }
    }
}

/// `[peers]`: every field optional, the lab's strongSwan by default.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeers {
    /// `strongswan` (default) or `libreswan`: whose retransmissions.
    stack: Option<Spanned<String>>,
    /// libreswan's `retransmit-timeout` (default 60 s).
    retransmit_limit: Option<Spanned<f64>>,
    dpd_delay: Option<Spanned<f64>>,
    segw_dpd_delay: Option<Spanned<f64>>,
    retransmit_timeout: Option<Spanned<f64>>,
    retransmit_base: Option<Spanned<f64>>,
    retransmit_tries: Option<Spanned<u32>>,
    rekey_time: Option<Spanned<f64>>,
    inbound_suppresses_dpd: Option<bool>,
    /// `restart` or `clear`.
    dpd_action: Option<Spanned<String>>,
    setup: Option<Spanned<f64>>,
}

impl RawPeers {
    fn validate(&self, at: &At) -> Result<Timers, ScenarioError> {
        let stack = one_of(
            &self.stack,
            "peers.stack",
            [
                ("strongswan", Stack::StrongSwan),
                ("libreswan", Stack::Libreswan),
            ],
            at,
        )?
        .unwrap_or_default();
        // libreswan's own defaults: retransmit-interval 0.5 s.
        let d = match stack {
            Stack::StrongSwan => Timers::default(),
            Stack::Libreswan => Timers::libreswan(5.0, 0.5, 60.0),
        };
        let secs = |v: &Option<Spanned<f64>>, name: &str, default: f64, floor: f64| match v {
            None => Ok(default),
            Some(v) if v.get_ref().is_finite() && *v.get_ref() >= floor => Ok(*v.get_ref()),
            Some(v) => Err(at(
                v.span(),
                format!("peers.{name}"),
                format!("must be a number of at least {floor}, not {}", v.get_ref()),
            )),
        };
        let restart = one_of(
            &self.dpd_action,
            "peers.dpd_action",
            [("restart", true), ("clear", false)],
            at,
        )?
        .unwrap_or(d.restart);
        if let (Stack::StrongSwan, Some(v)) = (stack, &self.retransmit_limit) {
            return Err(at(
                v.span(),
                "peers.retransmit_limit".into(),
                "is libreswan's retransmit-timeout: only with `stack = \"libreswan\"` \
                 (strongSwan counts retransmit_tries)"
                    .into(),
            ));
        }
        Ok(Timers {
            stack,
            retransmit_limit: secs(
                &self.retransmit_limit,
                "retransmit_limit",
                d.retransmit_limit,
                0.001,
            )?,
            dpd_delay: secs(&self.dpd_delay, "dpd_delay", d.dpd_delay, 0.0)?,
            segw_dpd_delay: secs(
                &self.segw_dpd_delay,
                "segw_dpd_delay",
                d.segw_dpd_delay,
                0.0,
            )?,
            retransmit_timeout: secs(
                &self.retransmit_timeout,
                "retransmit_timeout",
                d.retransmit_timeout,
                0.001,
            )?,
            retransmit_base: secs(
                &self.retransmit_base,
                "retransmit_base",
                d.retransmit_base,
                1.0,
            )?,
            retransmit_tries: match &self.retransmit_tries {
                None => d.retransmit_tries,
                Some(t) if *t.get_ref() <= 20 => *t.get_ref(),
                Some(t) => {
                    return Err(at(
                        t.span(),
                        "peers.retransmit_tries".into(),
                        format!("{} is more than 20", t.get_ref()),
                    ))
                }
            },
            rekey_time: secs(&self.rekey_time, "rekey_time", d.rekey_time, 1.0)?,
            inbound_suppresses_dpd: self
                .inbound_suppresses_dpd
                .unwrap_or(d.inbound_suppresses_dpd),
            restart,
            setup: secs(&self.setup, "setup", d.setup, 0.0)?,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTraffic {
    /// `lognormal` (with `median`, `sigma`) or `pareto` (with `min`, `alpha`).
    distribution: Spanned<String>,
    median: Option<Spanned<String>>,
    sigma: Option<Spanned<f64>>,
    min: Option<Spanned<String>>,
    alpha: Option<Spanned<f64>>,
    #[serde(default = "downlink_ratio")]
    downlink_ratio: Spanned<f64>,
    #[serde(default = "packet_bytes")]
    packet_bytes: Spanned<u32>,
    #[serde(default = "zero")]
    start_hour: Spanned<f64>,
    /// Share of tunnels per daily shape, by name (built-in or `[[traffic.shape]]`).
    shares: Option<Spanned<std::collections::BTreeMap<String, f64>>>,
    #[serde(default)]
    shape: Vec<Spanned<RawShape>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShape {
    name: Spanned<String>,
    factors: Spanned<Vec<f64>>,
}

fn downlink_ratio() -> Spanned<f64> {
    Spanned::new(0..0, 4.0)
}
fn packet_bytes() -> Spanned<u32> {
    Spanned::new(0..0, 800)
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawSegw {
    name: Spanned<String>,
    #[serde(default = "one")]
    weight: Spanned<u32>,
    /// Tunnels it may hold; 0 = no limit.
    #[serde(default)]
    capacity: u64,
    /// Traffic it can carry, e.g. "4 Gbps".
    throughput: Option<Spanned<String>>,
}

fn one() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPopulation {
    count: Spanned<usize>,
    #[serde(default)]
    arrive_over: u32,
    #[serde(default = "zero")]
    nat: Spanned<f64>,
    #[serde(default = "nat_addresses")]
    nat_addresses: Spanned<u32>,
    #[serde(default = "zero")]
    raw_esp: Spanned<f64>,
    #[serde(default = "zero")]
    ipv6: Spanned<f64>,
    #[serde(default = "zero")]
    churn: Spanned<f64>,
    #[serde(default = "packets_per_step")]
    packets_per_step: u32,
    #[serde(default = "esp_bytes")]
    esp_bytes: Spanned<u32>,
    peak: Option<Spanned<RawPeak>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeak {
    step: Spanned<u32>,
    tunnels: Spanned<usize>,
}

fn zero() -> Spanned<f64> {
    Spanned::new(0..0, 0.0)
}
fn nat_addresses() -> Spanned<u32> {
    Spanned::new(0..0, 64)
}
fn packets_per_step() -> u32 {
    1
}
fn esp_bytes() -> Spanned<u32> {
    Spanned::new(0..0, 120)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    step: Spanned<u32>,
    fail: Option<Spanned<String>>,
    recover: Option<Spanned<String>>,
    add: Option<Spanned<RawSegw>>,
    remove: Option<Spanned<String>>,
    weight: Option<Spanned<RawWeight>>,
    drain: Option<Spanned<String>>,
    undrain: Option<Spanned<String>>,
    swap: Option<Spanned<RawSwap>>,
    balancer_fail: Option<Spanned<RawBalancerFail>>,
    balancer_recover: Option<Spanned<RawBalancerRecover>>,
    /// With drain, or swap with rebalance: make-before-break moves.
    #[serde(default)]
    graceful: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeight {
    segw: Spanned<String>,
    to: Spanned<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSwap {
    #[serde(default)]
    rebalance: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBalancerFail {
    /// `kill` (the default) or `uplink`.
    how: Option<Spanned<String>>,
}

/// `balancer_recover = {}`: nothing to say but that it happens.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBalancerRecover {}

type At<'a> = dyn Fn(Range<usize>, String, String) -> ScenarioError + 'a;

/// The value of `field` (given or not) as one of two named `choices`;
/// anything else is an error at its span naming both.
fn one_of<T: Copy>(
    value: &Option<Spanned<String>>,
    field: &str,
    choices: [(&str, T); 2],
    at: &At,
) -> Result<Option<T>, ScenarioError> {
    let Some(v) = value else { return Ok(None) };
    match choices.iter().find(|(name, _)| *name == v.get_ref()) {
        Some(&(_, chosen)) => Ok(Some(chosen)),
        None => Err(at(
            v.span(),
            field.into(),
            format!(
                "{:?} is not `{}` or `{}`",
                v.get_ref(),
                choices[0].0,
                choices[1].0
            ),
        )),
    }
}

impl RawScenario {
    fn validate(self, at: &At) -> Result<Scenario, ScenarioError> {
        let steps = *self.steps.get_ref();
        if steps == 0 || steps > MAX_STEPS {
            return Err(at(
                self.steps.span(),
                "steps".into(),
                format!("must be 1..={MAX_STEPS}, not {steps}"),
            ));
        }
        if *self.step_secs.get_ref() == 0 {
            return Err(at(
                self.step_secs.span(),
                "step_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if self.segw.is_empty() {
            return Err(at(
                0..0,
                "segw".into(),
                "no [[segw]]: name at least one".into(),
            ));
        }
        let mut segws = Vec::new();
        let mut names = BTreeSet::new();
        for (i, s) in self.segw.iter().enumerate() {
            let spec = segw_spec(s.get_ref(), &format!("segw[{}]", i + 1), at)?;
            if !names.insert(spec.name.clone()) {
                return Err(at(
                    s.get_ref().name.span(),
                    format!("segw[{}].name", i + 1),
                    format!("duplicate segw {:?}", spec.name),
                ));
            }
            segws.push(spec);
        }
        let tunnels = self.tunnels.validate(at)?;
        let traffic = match &self.traffic {
            Some(t) => Some(t.get_ref().validate(t.span(), at)?),
            None => None,
        };
        let peers = match &self.peers {
            Some(p) => p.validate(at)?,
            None => Timers::default(),
        };
        if let Some(peak) = &self.tunnels.peak {
            let step = peak.get_ref().step.clone();
            if *step.get_ref() >= steps {
                return Err(at(
                    step.span(),
                    "tunnels.peak.step".into(),
                    format!("{} is past the last step ({})", step.get_ref(), steps - 1),
                ));
            }
        }

        let mut events: Vec<TimedEvent> = Vec::new();
        let mut order: Vec<usize> = (0..self.event.len()).collect();
        order.sort_by_key(|&i| *self.event[i].get_ref().step.get_ref());
        // The step the pair's failed balancer failed at, until it is back:
        // a pair has one standby to fail over to.
        let mut failed_at: Option<u32> = None;
        // Check names against the set as it is when each event happens.
        for i in order {
            let raw = self.event[i].get_ref();
            let field = format!("event[{}]", i + 1);
            let step = *raw.step.get_ref();
            if step >= steps {
                return Err(at(
                    raw.step.span(),
                    format!("{field}.step"),
                    format!("{step} is past the last step ({})", steps - 1),
                ));
            }
            let event = raw.event(self.event[i].span(), &field, &names, at)?;
            match &event {
                Event::Add(s) => {
                    names.insert(s.name.clone());
                }
                Event::Remove(n) => {
                    names.remove(n);
                }
                Event::BalancerFail(_) => {
                    if let Some(then) = failed_at.replace(step) {
                        let span = raw.balancer_fail.as_ref().expect("parsed").span();
                        return Err(at(
                            span,
                            format!("{field}.balancer_fail"),
                            format!(
                                "no standby at step {step}: the other balancer failed at step {then} \
                                 and is not back (a balancer_recover first)"
                            ),
                        ));
                    }
                }
                Event::BalancerRecover => {
                    if failed_at.is_none() {
                        let span = raw.balancer_recover.as_ref().expect("parsed").span();
                        return Err(at(
                            span,
                            format!("{field}.balancer_recover"),
                            format!("no balancer is down at step {step} (a balancer_fail first)"),
                        ));
                    }
                    failed_at = None;
                }
                _ => {}
            }
            let graceful = match &raw.graceful {
                Some(g) if *g.get_ref() => {
                    if !matches!(event, Event::Drain(_) | Event::Swap { rebalance: true }) {
                        return Err(at(
                            g.span(),
                            format!("{field}.graceful"),
                            "only a drain or a swap with rebalance moves tunnels gracefully".into(),
                        ));
                    }
                    true
                }
                _ => false,
            };
            events.push(TimedEvent {
                step,
                event,
                graceful,
            });
        }
        let moves_per_second = match &self.moves_per_second {
            None => crate::balancer::moves::Settings::default().per_second,
            Some(m) if m.get_ref().is_finite() && *m.get_ref() > 0.0 => *m.get_ref(),
            Some(m) => {
                return Err(at(
                    m.span(),
                    "moves_per_second".into(),
                    "must be a number above 0".into(),
                ))
            }
        };
        Ok(Scenario {
            name: self.name.unwrap_or_else(|| "scenario".into()),
            step_secs: *self.step_secs.get_ref(),
            steps,
            segws,
            tunnels,
            traffic,
            peers,
            events,
            moves_per_second,
            pair: self.pair.as_ref().map(RawPair::pair).unwrap_or_default(),
        })
    }
}

impl RawTraffic {
    fn validate(&self, span: Range<usize>, at: &At) -> Result<Traffic, ScenarioError> {
        let rate = |r: &Option<Spanned<String>>, name: &str| -> Result<f64, ScenarioError> {
            match r {
                Some(r) => parse_rate(r.get_ref())
                    .map(|b| b as f64)
                    .map_err(|m| at(r.span(), format!("traffic.{name}"), m)),
                None => Err(at(
                    span.clone(),
                    format!("traffic.{name}"),
                    format!("{} needs `{name}`", self.distribution.get_ref()),
                )),
            }
        };
        let positive =
            |v: &Option<Spanned<f64>>, name: &str, default: Option<f64>, floor: f64| match (
                v, default,
            ) {
                (Some(v), _) if v.get_ref().is_finite() && *v.get_ref() >= floor => {
                    Ok(*v.get_ref())
                }
                (Some(v), _) => Err(at(
                    v.span(),
                    format!("traffic.{name}"),
                    format!("must be at least {floor}, not {}", v.get_ref()),
                )),
                (None, Some(d)) => Ok(d),
                (None, None) => Err(at(
                    span.clone(),
                    format!("traffic.{name}"),
                    format!("{} needs `{name}`", self.distribution.get_ref()),
                )),
            };
        let dist = match self.distribution.get_ref().as_str() {
            "lognormal" => RateDist::LogNormal {
                median: rate(&self.median, "median")?,
                sigma: positive(&self.sigma, "sigma", Some(1.0), 0.0)?,
            },
            "pareto" => RateDist::Pareto {
                min: rate(&self.min, "min")?,
                // alpha <= 1 has no mean: a scenario's load would not exist.
                alpha: positive(&self.alpha, "alpha", None, 1.01)?,
            },
            other => {
                return Err(at(
                    self.distribution.span(),
                    "traffic.distribution".into(),
                    format!("{other:?}: give \"lognormal\" or \"pareto\""),
                ))
            }
        };
        let ratio = *self.downlink_ratio.get_ref();
        if !(ratio.is_finite() && ratio >= 0.0) {
            return Err(at(
                self.downlink_ratio.span(),
                "traffic.downlink_ratio".into(),
                format!("must be >= 0 (downlink bytes per uplink byte), not {ratio}"),
            ));
        }
        let packet = *self.packet_bytes.get_ref();
        if !(40..=9000).contains(&packet) {
            return Err(at(
                self.packet_bytes.span(),
                "traffic.packet_bytes".into(),
                format!("must be 40..=9000 (one IP packet), not {packet}"),
            ));
        }
        let hour = *self.start_hour.get_ref();
        if !(0.0..24.0).contains(&hour) {
            return Err(at(
                self.start_hour.span(),
                "traffic.start_hour".into(),
                format!("must be 0..24, not {hour}"),
            ));
        }
        let mut custom = Vec::new();
        for (i, s) in self.shape.iter().enumerate() {
            let s = s.get_ref();
            let name = s.name.get_ref().trim();
            let field = format!("traffic.shape[{}]", i + 1);
            if Shape::builtin(name).is_some() || custom.iter().any(|c: &Shape| c.name == name) {
                return Err(at(
                    s.name.span(),
                    format!("{field}.name"),
                    format!("{name:?} is already a shape"),
                ));
            }
            let shape = Shape::new(name, s.factors.get_ref())
                .map_err(|m| at(s.factors.span(), format!("{field}.factors"), m))?;
            custom.push(shape);
        }
        let shapes = match &self.shares {
            None => vec![(Shape::builtin("flat").expect("built in"), 1.0)],
            Some(shares) => {
                let mut shapes = Vec::new();
                for (name, &share) in shares.get_ref() {
                    let shape = Shape::builtin(name)
                        .or_else(|| custom.iter().find(|c| &c.name == name).cloned())
                        .ok_or_else(|| {
                            let mut known: Vec<String> = super::traffic::BUILTIN_SHAPES
                                .iter()
                                .map(|(n, _)| n.to_string())
                                .collect();
                            known.extend(custom.iter().map(|c| c.name.clone()));
                            at(
                                shares.span(),
                                format!("traffic.shares.{name}"),
                                format!("no shape {name:?} (shapes: {})", known.join(", ")),
                            )
                        })?;
                    if !(share.is_finite() && share >= 0.0) {
                        return Err(at(
                            shares.span(),
                            format!("traffic.shares.{name}"),
                            format!("is a share: >= 0, not {share}"),
                        ));
                    }
                    shapes.push((shape, share));
                }
                let sum: f64 = shapes.iter().map(|(_, s)| s).sum();
                if (sum - 1.0).abs() > 1e-6 || shapes.len() > 255 {
                    return Err(at(
                        shares.span(),
                        "traffic.shares".into(),
                        format!("shares add up to 1, not {sum}"),
                    ));
                }
                shapes
            }
        };
        Ok(Traffic {
            rate: dist,
            downlink_ratio: ratio,
            packet_bytes: packet,
            start_hour: hour,
            shapes,
        })
    }
}

fn segw_spec(raw: &RawSegw, field: &str, at: &At) -> Result<SegwSpec, ScenarioError> {
    let name = raw.name.get_ref().trim();
    if name.is_empty() {
        return Err(at(
            raw.name.span(),
            format!("{field}.name"),
            "must not be empty".into(),
        ));
    }
    let weight = *raw.weight.get_ref();
    if weight == 0 {
        return Err(at(
            raw.weight.span(),
            format!("{field}.weight"),
            "must be at least 1 (drain a segw to stop new tunnels)".into(),
        ));
    }
    let throughput = match &raw.throughput {
        Some(t) => {
            parse_rate(t.get_ref()).map_err(|m| at(t.span(), format!("{field}.throughput"), m))?
        }
        None => 0,
    };
    Ok(SegwSpec {
        name: name.to_string(),
        weight,
        capacity: raw.capacity,
        throughput,
    })
}

impl RawPopulation {
    fn validate(&self, at: &At) -> Result<Population, ScenarioError> {
        let count = *self.count.get_ref();
        let peak = match &self.peak {
            None => None,
            Some(p) => {
                let tunnels = *p.get_ref().tunnels.get_ref();
                if tunnels == 0 || tunnels > MAX_TUNNELS {
                    return Err(at(
                        p.get_ref().tunnels.span(),
                        "tunnels.peak.tunnels".into(),
                        format!("must be 1..={MAX_TUNNELS}, not {tunnels}"),
                    ));
                }
                Some(Peak {
                    step: *p.get_ref().step.get_ref(),
                    tunnels,
                })
            }
        };
        if count == 0 || count > MAX_TUNNELS {
            return Err(at(
                self.count.span(),
                "tunnels.count".into(),
                format!("must be 1..={MAX_TUNNELS}, not {count}"),
            ));
        }
        for (name, share) in [
            ("nat", &self.nat),
            ("raw_esp", &self.raw_esp),
            ("ipv6", &self.ipv6),
            ("churn", &self.churn),
        ] {
            let v = *share.get_ref();
            if !(0.0..=1.0).contains(&v) {
                return Err(at(
                    share.span(),
                    format!("tunnels.{name}"),
                    format!("is a share: 0.0..=1.0, not {v}"),
                ));
            }
        }
        if *self.nat_addresses.get_ref() == 0 {
            return Err(at(
                self.nat_addresses.span(),
                "tunnels.nat_addresses".into(),
                "must be at least 1".into(),
            ));
        }
        let esp = *self.esp_bytes.get_ref();
        if !(8..=1400).contains(&esp) {
            return Err(at(
                self.esp_bytes.span(),
                "tunnels.esp_bytes".into(),
                format!("must be 8..=1400 (SPI and sequence number, at most one frame), not {esp}"),
            ));
        }
        Ok(Population {
            count,
            arrive_over: self.arrive_over,
            nat: *self.nat.get_ref(),
            nat_addresses: *self.nat_addresses.get_ref(),
            raw_esp: *self.raw_esp.get_ref(),
            ipv6: *self.ipv6.get_ref(),
            churn: *self.churn.get_ref(),
            packets_per_step: self.packets_per_step,
            esp_bytes: esp,
            peak,
        })
    }
}

impl RawEvent {
    fn event(
        &self,
        span: Range<usize>,
        field: &str,
        names: &BTreeSet<String>,
        at: &At,
    ) -> Result<Event, ScenarioError> {
        let step = *self.step.get_ref();
        let known = |n: &Spanned<String>, action: &str| -> Result<String, ScenarioError> {
            let name = n.get_ref().trim().to_string();
            if names.contains(&name) {
                Ok(name)
            } else {
                let then: Vec<&str> = names.iter().map(String::as_str).collect();
                Err(at(
                    n.span(),
                    format!("{field}.{action}"),
                    format!(
                        "no segw {name:?} at step {step} (segws then: {})",
                        then.join(", ")
                    ),
                ))
            }
        };
        let mut found: Vec<(&str, Event)> = Vec::new();
        if let Some(n) = &self.fail {
            found.push(("fail", Event::Fail(known(n, "fail")?)));
        }
        if let Some(n) = &self.recover {
            found.push(("recover", Event::Recover(known(n, "recover")?)));
        }
        if let Some(s) = &self.add {
            let spec = segw_spec(s.get_ref(), &format!("{field}.add"), at)?;
            if names.contains(&spec.name) {
                return Err(at(
                    s.get_ref().name.span(),
                    format!("{field}.add.name"),
                    format!("segw {:?} is already in the set at step {step}", spec.name),
                ));
            }
            found.push(("add", Event::Add(spec)));
        }
        if let Some(n) = &self.remove {
            found.push(("remove", Event::Remove(known(n, "remove")?)));
        }
        if let Some(w) = &self.weight {
            let w = w.get_ref();
            let name = known(&w.segw, "weight.segw")?;
            if *w.to.get_ref() == 0 {
                return Err(at(
                    w.to.span(),
                    format!("{field}.weight.to"),
                    "must be at least 1 (drain a segw to stop new tunnels)".into(),
                ));
            }
            found.push(("weight", Event::Weight(name, *w.to.get_ref())));
        }
        if let Some(n) = &self.drain {
            found.push(("drain", Event::Drain(known(n, "drain")?)));
        }
        if let Some(n) = &self.undrain {
            found.push(("undrain", Event::Undrain(known(n, "undrain")?)));
        }
        if let Some(s) = &self.swap {
            found.push((
                "swap",
                Event::Swap {
                    rebalance: s.get_ref().rebalance,
                },
            ));
        }
        if let Some(f) = &self.balancer_fail {
            let failure = one_of(
                &f.get_ref().how,
                &format!("{field}.balancer_fail.how"),
                [("kill", Failure::Kill), ("uplink", Failure::Uplink)],
                at,
            )?
            .unwrap_or(Failure::Kill);
            found.push(("balancer_fail", Event::BalancerFail(failure)));
        }
        if self.balancer_recover.is_some() {
            found.push(("balancer_recover", Event::BalancerRecover));
        }
        match found.len() {
            1 => Ok(found.pop().expect("one").1),
            0 => Err(at(
                span,
                field.to_string(),
                "no action: give one of fail, recover, add, remove, weight, drain, undrain, swap, \
                 balancer_fail, balancer_recover"
                    .into(),
            )),
            _ => {
                let names: Vec<&str> = found.iter().map(|f| f.0).collect();
                Err(at(
                    span,
                    field.to_string(),
                    format!(
                        "one action per event, found {} (split it into events at the same step)",
                        names.join(" and ")
                    ),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        Scenario::parse(text, "s.toml").unwrap_err().to_string()
    }

    const BASE: &str = "step_secs = 10\nsteps = 4\n[[segw]]\nname = \"a\"\n[[segw]]\nname = \"b\"\n[tunnels]\ncount = 12\n";

    #[test]
    fn the_builtin_is_the_default_file_and_holds_the_issue_s_workload() {
        let s = Scenario::builtin();
        assert_eq!(s.tunnels.count, 10_000);
        assert_eq!(
            s.segws.iter().map(|g| g.weight).collect::<Vec<_>>(),
            [2, 1, 1, 1]
        );
        assert!((s.tunnels.nat - 0.2).abs() < 1e-12);
        let events: Vec<&Event> = s.events.iter().map(|e| &e.event).collect();
        assert!(matches!(events[0], Event::Fail(n) if n == "segw3"));
        assert!(matches!(events[1], Event::Recover(n) if n == "segw3"));
        assert!(matches!(events[2], Event::Add(_)));
        assert_eq!(events[3], &Event::Swap { rebalance: false });
        assert_eq!(s.all_segws().len(), 5);
    }

    #[test]
    fn a_minimal_file_takes_defaults() {
        let s = Scenario::parse(BASE, "s.toml").unwrap();
        assert_eq!(
            s.segws[1],
            SegwSpec {
                name: "b".into(),
                weight: 1,
                capacity: 0,
                throughput: 0,
            }
        );
        assert_eq!(s.tunnels.esp_bytes, 120);
        assert!(s.events.is_empty());
    }

    #[test]
    fn a_typo_in_a_field_names_file_line_and_field() {
        let e = error(&format!("{BASE}natt = 0.2\n"));
        assert!(
            e.starts_with("s.toml:9:1: tunnels.natt: unknown field `natt`"),
            "{e}"
        );
    }

    #[test]
    fn a_wrong_type_names_the_field() {
        let e = error(&BASE.replace("count = 12", "count = \"many\""));
        assert!(
            e.starts_with("s.toml:8:9: tunnels.count: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn out_of_range_values_are_refused_with_the_allowed_range() {
        let e = error(&format!("{BASE}churn = 1.5\n"));
        assert_eq!(
            e,
            "s.toml:9:9: tunnels.churn: is a share: 0.0..=1.0, not 1.5"
        );
        let e = error(&BASE.replace("steps = 4", "steps = 0"));
        assert_eq!(e, "s.toml:2:9: steps: must be 1..=100000, not 0");
    }

    #[test]
    fn an_event_naming_an_unknown_segw_says_which_exist_then() {
        let e = error(&format!("{BASE}[[event]]\nstep = 1\nfail = \"c\"\n"));
        assert_eq!(
            e,
            "s.toml:11:8: event[1].fail: no segw \"c\" at step 1 (segws then: a, b)"
        );
        // Known once added, in step order whatever the file order.
        let ok = format!(
            "{BASE}[[event]]\nstep = 2\nfail = \"c\"\n[[event]]\nstep = 1\nadd = {{ name = \"c\" }}\n"
        );
        let s = Scenario::parse(&ok, "s.toml").unwrap();
        assert_eq!(s.events[0].step, 1);
        assert_eq!(s.events[1].event, Event::Fail("c".into()));
    }

    #[test]
    fn an_event_needs_exactly_one_action_within_the_run() {
        let e = error(&format!("{BASE}[[event]]\nstep = 1\n"));
        assert!(e.starts_with("s.toml:9:1: event[1]: no action"), "{e}");
        let e = error(&format!(
            "{BASE}[[event]]\nstep = 1\nfail = \"a\"\ndrain = \"b\"\n"
        ));
        assert!(
            e.contains("event[1]: one action per event, found fail and drain"),
            "{e}"
        );
        let e = error(&format!("{BASE}[[event]]\nstep = 4\nfail = \"a\"\n"));
        assert_eq!(e, "s.toml:10:8: event[1].step: 4 is past the last step (3)");
    }

    #[test]
    fn duplicate_segws_and_zero_weights_are_refused() {
        let e = error(&BASE.replace("name = \"b\"", "name = \"a\""));
        assert_eq!(e, "s.toml:6:8: segw[2].name: duplicate segw \"a\"");
        let e = error(&BASE.replace("name = \"b\"", "name = \"b\"\nweight = 0"));
        assert!(
            e.starts_with("s.toml:7:10: segw[2].weight: must be at least 1"),
            "{e}"
        );
    }

    #[test]
    fn traffic_and_throughput_are_read_with_their_units() {
        let text = format!(
            "{}\n[traffic]\ndistribution = \"pareto\"\nmin = \"500 kbps\"\nalpha = 1.5\n\
             shares = {{ business = 0.25, evening = 0.75 }}\n\
             [[traffic.shape]]\nname = \"evening\"\nfactors = [1, 2, 4, 2]\n",
            BASE.replace("name = \"b\"", "name = \"b\"\nthroughput = \"2.5 Gbps\"")
        );
        let s = Scenario::parse(&text, "s.toml").unwrap();
        assert_eq!(s.segws[1].throughput, 312_500_000);
        assert_eq!(s.segws[0].throughput, 0);
        let t = s.traffic.unwrap();
        assert_eq!(
            t.rate,
            RateDist::Pareto {
                min: 62_500.0,
                alpha: 1.5
            }
        );
        // Shares in name order; the custom shape scaled to peak at 1.
        assert_eq!(t.shapes[0].0.name, "business");
        assert_eq!(t.shapes[1].1, 0.75);
        assert_eq!(t.shapes[1].0.at(12.0 * 3600.0), 1.0);
        assert_eq!(t.downlink_ratio, 4.0);
    }

    #[test]
    fn bad_traffic_is_refused_naming_the_field() {
        let with = |traffic: &str| error(&format!("{BASE}[traffic]\n{traffic}\n"));
        let e = with("distribution = \"lognormal\"\nmedian = \"4 Gbpx\"");
        assert!(
            e.contains("traffic.median: \"4 Gbpx\": unknown unit"),
            "{e}"
        );
        let e = with("distribution = \"lognormal\"");
        assert!(
            e.contains("traffic.median: lognormal needs `median`"),
            "{e}"
        );
        let e = with("distribution = \"pareto\"\nmin = \"1 Mbps\"\nalpha = 0.9");
        assert!(
            e.contains("traffic.alpha: must be at least 1.01, not 0.9"),
            "{e}"
        );
        let e = with("distribution = \"zipf\"");
        assert!(e.contains("traffic.distribution: \"zipf\""), "{e}");
        let e = with(
            "distribution = \"lognormal\"\nmedian = \"1 Mbps\"\nshares = { business = 0.5, night = 0.5 }",
        );
        assert!(
            e.contains("traffic.shares.night: no shape \"night\" (shapes: residential, business, transport, flat)"),
            "{e}"
        );
        let e = with(
            "distribution = \"lognormal\"\nmedian = \"1 Mbps\"\nshares = { business = 0.5, flat = 0.4 }",
        );
        assert!(
            e.contains("traffic.shares: shares add up to 1, not 0.9"),
            "{e}"
        );
        let e = error(&BASE.replace("name = \"b\"", "name = \"b\"\nthroughput = \"4\""));
        assert!(e.contains("segw[2].throughput: \"4\" has no unit"), "{e}");
    }

    #[test]
    fn a_pair_fails_over_only_to_a_standby_it_has() {
        let fail =
            |step: u32, how: &str| format!("[[event]]\nstep = {step}\nbalancer_fail = {{{how}}}\n");
        let recover = |step: u32| format!("[[event]]\nstep = {step}\nbalancer_recover = {{}}\n");
        let s = Scenario::parse(
            &format!(
                "{BASE}[pair]\nreplication_lag_ms = 20\n{}{}{}",
                fail(1, ""),
                recover(2),
                fail(3, "how = \"uplink\"")
            ),
            "s.toml",
        )
        .unwrap();
        assert_eq!(s.pair.replication_lag, Duration::from_millis(20));
        assert_eq!(s.pair.detection, Duration::from_secs(1));
        let events: Vec<&Event> = s.events.iter().map(|e| &e.event).collect();
        assert_eq!(
            events,
            [
                &Event::BalancerFail(Failure::Kill),
                &Event::BalancerRecover,
                &Event::BalancerFail(Failure::Uplink)
            ]
        );
        let e = error(&format!("{BASE}{}{}", fail(1, ""), fail(2, "")));
        assert_eq!(
            e,
            "s.toml:14:17: event[2].balancer_fail: no standby at step 2: the other balancer failed \
             at step 1 and is not back (a balancer_recover first)"
        );
        let e = error(&format!("{BASE}{}", recover(1)));
        assert_eq!(
            e,
            "s.toml:11:20: event[1].balancer_recover: no balancer is down at step 1 (a balancer_fail first)"
        );
        let e = error(&format!("{BASE}{}", fail(1, "how = \"reboot\"")));
        assert!(
            e.contains("event[1].balancer_fail.how: \"reboot\" is not `kill` or `uplink`"),
            "{e}"
        );
        let e = error(&format!("{BASE}[pair]\nlag_ms = 5\n"));
        assert!(e.contains("pair.lag_ms: unknown field"), "{e}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = Scenario::load(Path::new("/nonexistent/x.toml")).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("/nonexistent/x.toml: cannot read"));
    }
}
