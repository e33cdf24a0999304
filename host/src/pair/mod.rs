//! Two balancers, one table: an active/standby pair.
//!
//! Both run on the same L2 segments (the uplink and every segw segment)
//! and are joined by a sync link. The active answers ARP/NDP, forwards and
//! probes; the standby is silent on every segment (its core drops every
//! frame: `DropReason::Standby`) and keeps its table current from the
//! active's stream. Which one is active is not decided here: keepalived's
//! VRRP decides, and its notify scripts say `segwlb ctl role active` or
//! `role standby`.
//!
//! The stream (`link`, `wire`): the standby connects to the active's
//! `listen` address; both prove they hold the pair's key; the active sends
//! a snapshot of its table, then every change in order
//! (`balancer::replica`), each frame numbered and sealed; the standby
//! acknowledges what it applied. The active's worker never waits for it:
//! its changes go into a bounded queue, and a standby that falls behind
//! (the queue full) or stops reading (a write blocked for
//! [`link::WRITE_TIMEOUT`]) is dropped; it connects again and takes a new
//! snapshot.
//!
//! Takeover: the new active's table is the last one replicated; it
//! announces itself (gratuitous ARP / unsolicited NA for the VIPs on the
//! uplink and for the proxied addresses on the segw ports), probes at once
//! and serves every replicated tunnel where it was. A tunnel whose first
//! frames came within the replication lag before the failure is not in
//! its table: on its next frame the policy places it again (counted as
//! placed).
//!
//! Split brain (the sync link down, both active): each forwards only the
//! frames addressed to its own MACs (the core's `NotForUs` rule), so no
//! frame is forwarded twice and neither forwards the other's output: no
//! loop. Each neighbour sends to whichever balancer announced or answered
//! last. A tunnel both see placed by each policy may land on two segws;
//! when the link heals VRRP makes one standby, which drops its table and
//! takes the active's.

pub mod link;
pub mod wire;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Which of the pair this balancer is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Active,
    Standby,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [Role::Active, Role::Standby]
            .into_iter()
            .find(|r| r.name() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `[pair]`: this balancer is one of a pair.
#[derive(Clone, PartialEq)]
pub struct PairConfig {
    /// The role at start (keepalived's notify scripts change it).
    pub role: Role,
    /// This balancer's address on the sync link: while active it serves
    /// its table here.
    pub listen: SocketAddr,
    /// The peer's `listen`: while standby this balancer connects there,
    /// and as active it serves no other address.
    pub peer: SocketAddr,
    /// The pair's shared key (at least [`wire::MIN_KEY`] bytes).
    pub key: Vec<u8>,
}

impl std::fmt::Debug for PairConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairConfig")
            .field("role", &self.role)
            .field("listen", &self.listen)
            .field("peer", &self.peer)
            .field("key", &"(hidden)")
            .finish()
    }
}

/// The pair as `ctl status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PairStatus {
    /// "active" or "standby".
    pub role: String,
    pub peer: String,
    /// A standby is connected to us (active), or we to the active
    /// (standby).
    pub connected: bool,
    /// (Standby) the last snapshot was taken whole: the table is the
    /// active's as of the lag below.
    pub in_sync: bool,
    /// (Active) frames sent that the standby has not acknowledged yet;
    /// (standby) frames received and not applied yet.
    pub lag_frames: u64,
    /// (Active) the time from sending the last acknowledged frame to its
    /// acknowledgement; (standby) from the active's send to our apply, by
    /// the two wall clocks.
    pub lag_ms: f64,
    /// Snapshots: served (active) or taken (standby).
    pub snapshots: u64,
    /// (Active) standbys dropped for falling behind or not reading.
    pub dropped_slow: u64,
    /// Connections or frames refused: a wrong address, a failed proof, a
    /// forged or out-of-order frame.
    pub refused: u64,
    /// (Standby) deltas applied, and what they did.
    pub applied: crate::balancer::replica::ReplicaCounters,
    /// Role changes since start.
    pub role_changes: u64,
    /// The last thing that went wrong on the link, if any.
    pub last_error: Option<String>,
}

impl PairStatus {
    /// The pair in `ctl status`: two lines.
    pub fn render(&self) -> String {
        let link = match (self.role.as_str(), self.connected) {
            ("active", true) => format!("serving standby {}", self.peer),
            ("active", false) => format!("no standby connected (peer {})", self.peer),
            (_, true) => format!("following active {}", self.peer),
            (_, false) => format!("not connected to active {}", self.peer),
        };
        let sync = if self.in_sync {
            "in sync"
        } else {
            "not in sync"
        };
        let a = &self.applied;
        format!(
            "pair: {} · {link} · {sync} · lag {} frames, {:.1} ms · {} snapshots · {} standbys dropped slow · {} refused · {} role changes\n  \
             deltas applied {} (conflicts {}, unknown segw {}, invalid {}, table full {}){}",
            self.role,
            self.lag_frames,
            self.lag_ms,
            self.snapshots,
            self.dropped_slow,
            self.refused,
            self.role_changes,
            a.applied,
            a.conflicts,
            a.unknown_gateway,
            a.invalid,
            a.table_full,
            self.last_error
                .as_ref()
                .map_or_else(String::new, |e| format!("\n  last link error: {e}")),
        )
    }
}
