//! The worker's part of a pair (see `crate::pair`): the role, the
//! active's stream of its table to the standby (a snapshot a slice at a
//! time, then the changes of every turn), the standby's applying of it,
//! and the takeover.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};

use super::{Reply, Worker, STATUS_CHUNK};
use crate::balancer::replica::{Replica, Source};
use crate::pair::link::{now_us, Link, Outgoing, PairEvent};
use crate::pair::wire::Message;
use crate::pair::{PairConfig, PairStatus, Role};
use crate::time::Timestamp;

/// The most peer addresses announced on the segw ports at a takeover (see
/// `Balancer::takeover_announcements`) ...
pub const ANNOUNCE_MAX: usize = 4_096;
/// ... sent this many frames a turn (the VIPs upstream first): a NIC's
/// send queue takes a few hundred at once, not twelve thousand.
pub const ANNOUNCE_PER_TURN: usize = 256;

/// The worker's state of a pair.
pub struct Pair {
    link: Link,
    peer: String,
    role: Role,
    /// (Active) the standby being served.
    serving: Option<Serving>,
    /// (Standby) which of our tunnels stands for which of the active's.
    replica: Replica,
    /// (Standby) the last snapshot came whole.
    in_sync: bool,
    snapshots: u64,
    role_changes: u64,
    /// A takeover's announcements not sent yet.
    announcing: std::collections::VecDeque<(crate::balancer::PortId, Vec<u8>)>,
}

/// The active's stream to one standby.
struct Serving {
    out: Sender<Outgoing>,
    source: Source,
    /// The next slot of the snapshot under way, if one is.
    snapshot: Option<usize>,
}

impl Pair {
    pub fn new(link: Link, config: &PairConfig) -> Self {
        Pair {
            link,
            peer: config.peer.to_string(),
            role: config.role,
            serving: None,
            replica: Replica::default(),
            in_sync: false,
            snapshots: 0,
            role_changes: 0,
            announcing: Default::default(),
        }
    }

    /// The next slot of the snapshot under way, if there is room for it in
    /// the writer's queue.
    fn snapshot_ready(&self) -> Option<usize> {
        let s = self.serving.as_ref()?;
        (s.out.len() < crate::pair::link::QUEUE / 2)
            .then_some(s.snapshot)
            .flatten()
    }
}

impl Worker {
    /// Be one of a pair, in the role `config` starts in.
    pub fn use_pair(&mut self, link: Link, config: &PairConfig) {
        self.lb.set_standby(config.role == Role::Standby);
        tracing::info!(role = %config.role, peer = %config.peer, "one of a pair");
        self.pair = Some(Pair::new(link, config));
    }

    /// `ctl role`: become `role` (or, with `None`, say which it is).
    pub(super) fn set_role(&mut self, role: Option<Role>, now: Timestamp) -> Reply {
        let Some(pair) = &mut self.pair else {
            return Err("this balancer is not one of a pair (no [pair] in its config)".into());
        };
        let was = pair.role;
        let Some(role) = role else {
            return Ok(format!("role: {was}"));
        };
        if role == was {
            return Ok(format!("role: {was} (unchanged)"));
        }
        pair.role = role;
        pair.role_changes += 1;
        pair.link.shared.set_role(role);
        match role {
            Role::Standby => {
                // Nothing more goes out; the table stays until the active's
                // snapshot replaces it.
                pair.serving = None;
                pair.announcing.clear();
                pair.in_sync = false;
                self.lb.replicate(false);
                self.lb.set_standby(true);
                tracing::warn!("role: active -> standby: answering and forwarding nothing");
                Ok("role: active -> standby".into())
            }
            Role::Active => {
                let in_sync = pair.in_sync;
                self.lb.take_over(&mut pair.replica, now);
                let tunnels = self.lb.table().len();
                let frames = self.lb.takeover_announcements(&self.vips, ANNOUNCE_MAX);
                let announced = frames.len();
                pair.announcing = frames.into();
                self.announce_some();
                // Probe now: segws marked down while we were standby, and
                // MACs the stream did not bring.
                self.next_probe = now;
                let partial = if in_sync {
                    ""
                } else {
                    " (the last snapshot had not come whole: tunnels missing are placed again)"
                };
                tracing::warn!(
                    tunnels,
                    announced,
                    "role: standby -> active: serving the replicated table{partial}"
                );
                Ok(format!(
                    "role: standby -> active; {tunnels} tunnels in the table{partial}; {announced} announcements sent"
                ))
            }
        }
    }

    /// What the sync link's threads say.
    pub(super) fn pair_event(&mut self, event: PairEvent, now: Timestamp) {
        let Some(pair) = &mut self.pair else { return };
        match event {
            PairEvent::Serve { out } => {
                if pair.role != Role::Active {
                    return; // dropping `out` closes the connection
                }
                // A new standby (or the same one again) takes it all.
                self.lb.replicate(true);
                pair.snapshots += 1;
                let began = Outgoing {
                    message: Message::SnapshotBegin,
                    made_us: now_us(),
                };
                if out.try_send(began).is_ok() {
                    tracing::info!(peer = %pair.peer, "pair: the standby connected: sending the table");
                    pair.serving = Some(Serving {
                        out,
                        source: Source::default(),
                        snapshot: Some(0),
                    });
                }
            }
            PairEvent::Received {
                seq,
                sent_us,
                message,
            } => {
                if pair.role == Role::Standby {
                    match message {
                        Message::SnapshotBegin => {
                            self.lb.clear_replica(&mut pair.replica);
                            pair.in_sync = false;
                            pair.snapshots += 1;
                        }
                        Message::Deltas(deltas) => {
                            for d in deltas {
                                self.lb.apply(&mut pair.replica, d, now);
                            }
                        }
                        Message::SnapshotEnd => {
                            pair.in_sync = true;
                            tracing::info!(
                                tunnels = self.lb.table().len(),
                                "pair: in sync with the active"
                            );
                        }
                        Message::Heartbeat | Message::Ack(_) => {}
                    }
                }
                let shared = &pair.link.shared;
                shared.done.store(seq, Ordering::Relaxed);
                shared
                    .lag_us
                    .store(now_us().saturating_sub(sent_us), Ordering::Relaxed);
            }
        }
    }

    /// Work without input: a snapshot being sent (see
    /// [`Worker::pair_background`]), or a takeover's announcements.
    pub(super) fn pair_has_background(&self) -> bool {
        self.pair
            .as_ref()
            .is_some_and(|p| !p.announcing.is_empty() || p.snapshot_ready().is_some())
    }

    /// A slice of the snapshot under way, while the writer keeps up (the
    /// queue at most half full): a large table is paced by the link, not
    /// dropped for filling the queue.
    pub(super) fn pair_background(&mut self, now: Timestamp) -> bool {
        let Some(pair) = &mut self.pair else {
            return false;
        };
        let Some(from) = pair.snapshot_ready() else {
            return false;
        };
        let Some(s) = &mut pair.serving else {
            return false;
        };
        let mut deltas = Vec::with_capacity(STATUS_CHUNK + 1);
        s.snapshot = self
            .lb
            .snapshot_slice(&mut s.source, from, STATUS_CHUNK, now, &mut deltas);
        let mut sent = send(&s.out, Message::Deltas(deltas));
        if sent.is_ok() && s.snapshot.is_none() {
            sent = send(&s.out, Message::SnapshotEnd);
        }
        if let Err(why) = sent {
            self.drop_standby(why);
        }
        true
    }

    /// The next [`ANNOUNCE_PER_TURN`] of a takeover's announcements.
    fn announce_some(&mut self) {
        let Some(pair) = &mut self.pair else { return };
        let n = pair.announcing.len().min(ANNOUNCE_PER_TURN);
        let batch: Vec<_> = pair.announcing.drain(..n).collect();
        for (port, frame) in batch {
            self.queue(port, frame);
        }
        self.flush();
    }

    /// After a turn: the takeover's announcements still to send, and what
    /// changed in the table, to the standby.
    pub(super) fn pair_turn(&mut self, now: Timestamp) {
        if self.pair.as_ref().is_some_and(|p| !p.announcing.is_empty()) {
            self.announce_some();
        }
        let Some(pair) = &mut self.pair else { return };
        let Some(s) = &mut pair.serving else { return };
        let mut deltas = Vec::new();
        if self
            .lb
            .replica_deltas(&mut s.source, now, &mut deltas)
            .is_err()
        {
            return self.drop_standby("more changes piled up than the log keeps");
        }
        if deltas.is_empty() {
            return;
        }
        if let Err(why) = send(&s.out, Message::Deltas(deltas)) {
            self.drop_standby(why);
        }
    }

    /// Stop serving the standby: it went, or fell behind (counted); it
    /// connects again and takes a new snapshot.
    fn drop_standby(&mut self, why: &str) {
        let Some(pair) = &mut self.pair else { return };
        let Some(s) = pair.serving.take() else { return };
        self.lb.replicate(false);
        if s.out.is_full() {
            pair.link
                .shared
                .dropped_slow
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(peer = %pair.peer, "pair: standby dropped: {why}");
    }

    pub(super) fn pair_status(&self) -> Option<PairStatus> {
        let pair = self.pair.as_ref()?;
        let shared = &pair.link.shared;
        let (seq, done) = (
            shared.seq.load(Ordering::Relaxed),
            shared.done.load(Ordering::Relaxed),
        );
        Some(PairStatus {
            role: pair.role.name().into(),
            peer: pair.peer.clone(),
            connected: shared.connected.load(Ordering::Relaxed),
            in_sync: match pair.role {
                Role::Active => pair.serving.as_ref().is_some_and(|s| s.snapshot.is_none()),
                Role::Standby => pair.in_sync,
            },
            lag_frames: seq.saturating_sub(done),
            lag_ms: Duration::from_micros(shared.lag_us.load(Ordering::Relaxed)).as_secs_f64()
                * 1e3,
            snapshots: pair.snapshots,
            dropped_slow: shared.dropped_slow.load(Ordering::Relaxed),
            refused: shared.refused.load(Ordering::Relaxed),
            applied: pair.replica.counters,
            role_changes: pair.role_changes,
            last_error: shared.last_error(),
        })
    }
}

/// `message` into the writer's queue.
fn send(out: &Sender<Outgoing>, message: Message) -> Result<(), &'static str> {
    out.try_send(Outgoing {
        message,
        made_us: now_us(),
    })
    .map_err(|e| match e {
        TrySendError::Full(_) => "its queue is full: it does not keep up",
        TrySendError::Disconnected(_) => "its connection ended",
    })
}
