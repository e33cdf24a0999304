//! Tunnels brought up and closed through their initiators'
//! charons, many `swanctl` commands in flight at once:
//! - in arrival order where the balancer decides ([`in_order`]): the next
//!   initiator starts as soon as the balancer has decided the previous
//!   one's IKE_SA_INIT, so the balancer sees them in this order (the order the
//!   simulation replays) while the rest of each exchange (IKE_AUTH, the
//!   child SA) overlaps the next ones;
//! - all together where the order does not matter ([`together`]): closes
//!   (the balancer keeps a closed tunnel's entry, as the simulation does).
//!
//! `swanctl` waits for its command to complete, and so does the charon
//! thread that serves it: a charon has 16, and a few must stay free to
//! handle the packets that complete the commands (with 32 waiting on one
//! charon, initiations took 30 s, their timeout). Hence [`AT_ONCE`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::topology::{Initiator, State};
use super::Result;
use crate::balancer::DropReason;
use crate::control::status::Status;

/// `swanctl` commands in flight at once.
const AT_ONCE: usize = 8;
/// How long an initiation may take to reach the balancer's decision before
/// the next one starts anyway: past a lost IKE_SA_INIT's retransmits.
const DECIDE: Duration = Duration::from_secs(5);

/// One tunnel's `swanctl`: what it printed or why it failed, and how long
/// it ran (as first seen finished: to within a millisecond or two).
#[derive(Debug)]
pub struct Done {
    pub result: Result<String>,
    pub seconds: f64,
}

/// Initiate each of `which` (indexes of `state.initiators`), in this
/// order: each starts once the balancer has decided the one before it (a
/// tunnel placed, moved or refused), or once that one's `swanctl` has
/// finished (a returning peer whose entry and segw are still there asks
/// the balancer nothing). In `which`'s order.
pub fn in_order(state: &State, which: &[usize]) -> Result<Vec<Done>> {
    let mut flight = Flight::new(which.len());
    for (k, &i) in which.iter().enumerate() {
        flight.make_room(AT_ONCE - 1);
        let init = &state.initiators[i];
        let before = decided(&state.balancer_counters()?);
        let started = Instant::now();
        match state.swanctl_spawn(&init.dir, &init.initiate_args()) {
            Ok(mut child) => {
                while !child.exited()
                    && started.elapsed() < DECIDE
                    && decided(&state.balancer_counters()?) == before
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                flight.add(k, child, started);
            }
            Err(e) => flight.failed(k, e),
        }
    }
    Ok(flight.land())
}

/// `swanctl ARGS(initiator)` for each of `which`, all at once (up to
/// [`AT_ONCE`]): for what the balancer's order does not see. In `which`'s
/// order.
pub fn together<'a>(
    state: &'a State,
    which: &[usize],
    args: impl Fn(&'a Initiator) -> Vec<&'a str>,
) -> Vec<Done> {
    let mut flight = Flight::new(which.len());
    for (k, &i) in which.iter().enumerate() {
        flight.make_room(AT_ONCE - 1);
        let init = &state.initiators[i];
        match state.swanctl_spawn(&init.dir, &args(init)) {
            Ok(child) => flight.add(k, child, Instant::now()),
            Err(e) => flight.failed(k, e),
        }
    }
    flight.land()
}

/// Close each of `which`'s tunnel as its initiator does: IKE DELETE, which
/// the segw answers.
pub fn close(state: &State, which: &[usize]) -> Vec<Done> {
    together(state, which, |i| {
        vec!["--terminate", "--ike", &i.conn, "--timeout", "10"]
    })
}

/// What the balancer has decided so far: tunnels placed by the policy,
/// moved, learned from a segw, or refused at capacity. Changes when an
/// IKE_SA_INIT of a new tunnel reaches it.
fn decided(s: &Status) -> u64 {
    let refused = s
        .drops
        .get(DropReason::AtCapacity.as_str())
        .copied()
        .unwrap_or(0);
    s.counters.placed + s.counters.moved + s.counters.taught + refused
}

/// `swanctl` commands started and not yet landed, and what landed, by
/// position.
struct Flight {
    running: VecDeque<(usize, super::netns::Running, Instant)>,
    done: Vec<Option<Done>>,
}

impl Flight {
    fn new(n: usize) -> Self {
        Flight {
            running: VecDeque::new(),
            done: (0..n).map(|_| None).collect(),
        }
    }

    fn add(&mut self, k: usize, child: super::netns::Running, started: Instant) {
        self.running.push_back((k, child, started));
    }

    fn failed(&mut self, k: usize, e: super::Error) {
        self.done[k] = Some(Done {
            result: Err(e),
            seconds: 0.0,
        });
    }

    /// Land what has finished; then, while more than `most` are running,
    /// wait for them (a millisecond at a time).
    fn make_room(&mut self, most: usize) {
        loop {
            let mut still = VecDeque::with_capacity(self.running.len());
            for (k, mut child, started) in self.running.drain(..) {
                if child.exited() {
                    let seconds = started.elapsed().as_secs_f64();
                    let result = child.finish().map_err(Into::into);
                    self.done[k] = Some(Done { result, seconds });
                } else {
                    still.push_back((k, child, started));
                }
            }
            self.running = still;
            if self.running.len() <= most {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Wait for everything; each one's [`Done`], by position.
    fn land(mut self) -> Vec<Done> {
        self.make_room(0);
        self.done
            .into_iter()
            .map(|d| d.expect("every position started or failed"))
            .collect()
    }
}
