//! Health probing of the segws, as a pure state machine.
//!
//! Every `interval` the caller asks for a probe round: the round first
//! judges the one before it (did the segw answer since?), then returns an
//! ARP request (IPv4) or neighbour solicitation (IPv6) for each VIP on each
//! gateway port. A segw that
//! misses `down_after` rounds in a row is marked down (no new tunnels; its
//! tunnels are re-placed on their next packet); a down segw that answers
//! `up_after` rounds in a row is marked up. Any frame from a segw's port
//! counts as an answer: a segw busy carrying tunnels is alive.
//!
//! IPv4 probes are RFC 5227 ARP probes (sender address 0.0.0.0): they ask
//! without claiming any address, and Linux answers them. IPv6 probes are
//! neighbour solicitations from the port's link-local address with its MAC
//! in the source link-layer option, so the segw answers unicast to us
//! (from the unspecified address they would be DAD probes, answered to all
//! nodes).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use super::GwId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    pub interval: Duration,
    /// Rounds without an answer before a healthy segw is marked down.
    pub down_after: u32,
    /// Rounds with an answer before a down segw is marked up.
    pub up_after: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(1),
            down_after: 3,
            up_after: 2,
        }
    }
}

impl HealthConfig {
    /// The longest a dead segw stays marked up.
    pub fn detection_time(&self) -> Duration {
        self.interval * (self.down_after + 1)
    }
}

/// Per-gateway probe bookkeeping, kept in the gateway's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeState {
    /// Something came from the segw since the last round.
    pub heard: bool,
    /// Consecutive rounds without an answer.
    pub missed: u32,
    /// Consecutive rounds with an answer.
    pub answered: u32,
    /// Rounds judged so far (the first round has nothing to judge).
    pub rounds: u64,
}

impl ProbeState {
    /// Judge the round that just ended; `Some(healthy)` when the verdict
    /// changes the gateway's health.
    pub fn judge(&mut self, healthy: bool, config: &HealthConfig) -> Option<bool> {
        self.rounds += 1;
        if self.rounds == 1 {
            // No probe was out yet: nothing to judge.
            self.heard = false;
            return None;
        }
        if std::mem::take(&mut self.heard) {
            self.answered = self.answered.saturating_add(1);
            self.missed = 0;
        } else {
            self.missed = self.missed.saturating_add(1);
            self.answered = 0;
        }
        if healthy && self.missed >= config.down_after.max(1) {
            Some(false)
        } else if !healthy && self.answered >= config.up_after.max(1) {
            Some(true)
        } else {
            None
        }
    }
}

/// What a probe round did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ProbeRound {
    /// Probes to send: (port, frame).
    pub frames: Vec<(super::PortId, Vec<u8>)>,
    /// Gateways whose health changed: (id, name, now healthy).
    pub changes: Vec<(GwId, String, bool)>,
}

/// The probe the balancer sends on a segw port: who has `target`?
pub fn probe_frame(our_mac: crate::packet::Mac, target: IpAddr) -> Vec<u8> {
    use crate::packet::{craft, ndp};
    match target {
        IpAddr::V4(v4) => crate::packet::arp::Arp::request(our_mac, Ipv4Addr::UNSPECIFIED, v4)
            .broadcast_frame(our_mac, None),
        IpAddr::V6(v6) => craft::frame(
            ndp::multicast_mac(ndp::solicited_node(v6)),
            our_mac,
            None,
            &ndp::solicitation(ndp::link_local(our_mac), our_mac, v6),
        ),
    }
}
