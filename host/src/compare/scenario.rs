//! What `segwlb compare` runs: a gateway set, a tunnel population and timed
//! events. The built-in default is the workload the README's first command
//! shows.

use crate::workload::Mix;

#[derive(Debug, Clone, PartialEq)]
pub struct SegwSpec {
    pub name: String,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The segw stops answering: its tunnels must go elsewhere.
    Fail(String),
    Recover(String),
    Add(SegwSpec),
    Remove(String),
    Weight(String, u32),
    Drain(String),
    /// The same policy, loaded again (a hot swap). With `rebalance`, every
    /// live tunnel is placed afresh by it.
    Swap {
        rebalance: bool,
    },
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
            Event::Swap { rebalance: false } => "policy hot-swap".into(),
            Event::Swap { rebalance: true } => "rebalance".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub segws: Vec<SegwSpec>,
    pub tunnels: usize,
    pub mix: Mix,
    /// Share of live tunnels that end, and are replaced by new ones, before
    /// each event.
    pub churn: f64,
    pub events: Vec<Event>,
}

impl Scenario {
    /// ~10,000 tunnels over 4 segws (segw1 with double weight), 20% NAT'd,
    /// churn, one failure and recovery, one addition, a hot swap and a
    /// rebalance.
    pub fn builtin() -> Self {
        let segw = |name: &str, weight| SegwSpec {
            name: name.into(),
            weight,
        };
        Scenario {
            segws: vec![
                segw("segw1", 2),
                segw("segw2", 1),
                segw("segw3", 1),
                segw("segw4", 1),
            ],
            tunnels: 10_000,
            mix: Mix::default(),
            churn: 0.05,
            events: vec![
                Event::Fail("segw3".into()),
                Event::Recover("segw3".into()),
                Event::Add(segw("segw5", 1)),
                Event::Swap { rebalance: false },
                Event::Swap { rebalance: true },
            ],
        }
    }
}
