//! Time in the dark: how long a tunnel the balancer moved stays down.
//!
//! The balancer moves a tunnel by sending its next packets to another segw,
//! which has no SA for it. Nothing the balancer does brings it back: its
//! initiator must notice that its IKE SA is dead, and that is set by the
//! peers' timers. The initiator notices when a liveness check (DPD) or, with
//! DPD off, its next rekey goes unanswered through every retransmission;
//! then, with `dpd_action = restart`, it sets up a new IKE SA, which the
//! balancer sends to the new segw.
//!
//! What defers the initiator's DPD is anything it receives on the old SA:
//! strongSwan sends a DPD only once nothing came in for `dpd_delay`. A dead
//! segw (a failure) sends nothing. A live one (a rebalance, a segw removed
//! from the balancer) still holds the SA: it sends its own DPD requests
//! once it hears nothing from the peer (the peer's answers go to the new
//! segw, so it gives up after its retransmissions), and the downlink the
//! network still routes to it reaches the peer as ESP, which counts as
//! life where inbound traffic suppresses DPD (strongSwan before 6.0.1, and
//! NAT-T tunnels after). The model works out those times for one tunnel;
//! [`Summary`] is what the report shows per event.

use segwlb_policy_sdk::hash;

/// How an IKE stack spaces its retransmissions and when it gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stack {
    /// strongSwan: waits of `retransmit_timeout × retransmit_base^n`,
    /// `retransmit_tries` retransmissions, given up after the last wait.
    #[default]
    StrongSwan,
    /// libreswan (pluto): waits of `retransmit_timeout` (its
    /// `retransmit-interval`), the same again, then doubling; at each
    /// expiry it gives up once `retransmit_limit` (its
    /// `retransmit-timeout`) has passed since the first send. Seen in the
    /// lab: interval 0.5 s, limit 10 s: sends at 0, 0.5, 1, 2, 4 and 8 s,
    /// given up at 16 s.
    Libreswan,
}

/// The peers' timers, as a scenario's `[peers]` gives them. The defaults
/// are the lab's strongSwan: initiators' DPD every 5 s, the segws' 6×
/// slower, retransmissions after 1, 1.8 and 3.24 s (give up after 6.04 s),
/// child SAs rekeyed hourly, `dpd_action = restart`, strongSwan 5.9 (inbound
/// ESP defers DPD).
#[derive(Debug, Clone, PartialEq)]
pub struct Timers {
    /// Whose retransmission schedule the initiators follow.
    pub stack: Stack,
    /// libreswan's `retransmit-timeout`: seconds from a request's first send
    /// after which it is given up on (strongSwan counts tries instead).
    pub retransmit_limit: f64,
    /// The initiators' `dpd_delay`, seconds; 0 is off.
    pub dpd_delay: f64,
    /// The segws' `dpd_delay`; 0 is off.
    pub segw_dpd_delay: f64,
    /// A request is sent again after `timeout × base^n` (n = 0, 1, …),
    /// `tries` times; the peer is given up on after the last wait.
    pub retransmit_timeout: f64,
    pub retransmit_base: f64,
    pub retransmit_tries: u32,
    /// The child SA's rekey interval: with DPD off, the first request a
    /// moved tunnel's initiator sends.
    pub rekey_time: f64,
    /// Inbound ESP (the downlink the old segw still sends) defers DPD.
    pub inbound_suppresses_dpd: bool,
    /// Given up on its SA, the initiator sets up a new one (`restart`), or
    /// stays down (`clear`).
    pub restart: bool,
    /// Seconds from a new IKE_SA_INIT to its child installed on the new
    /// segw.
    pub setup: f64,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            stack: Stack::StrongSwan,
            retransmit_limit: 60.0,
            dpd_delay: 5.0,
            segw_dpd_delay: 30.0,
            retransmit_timeout: 1.0,
            retransmit_base: 1.8,
            retransmit_tries: 2,
            rekey_time: 3600.0,
            inbound_suppresses_dpd: true,
            restart: true,
            setup: 0.1,
        }
    }
}

/// One moved tunnel, as the model needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Move {
    /// Its old segw still holds its SA and speaks (a rebalance, a removal
    /// from the balancer), rather than dead (a failure).
    pub old_answers: bool,
    /// Seconds between its downlink packets (∞ for none): a tunnel that
    /// receives more often than `dpd_delay` has no DPD of its own running.
    pub downlink_every: f64,
    /// Where in its DPD or rekey cycle it was when moved, in [0, 1): an
    /// idle tunnel's last DPD exchange was `phase × dpd_delay` ago.
    pub phase: f64,
}

impl Move {
    /// A tunnel's phase, from its IKE SPI: fixed per tunnel, spread evenly.
    pub fn phase_of(ike_spi: u64) -> f64 {
        hash::unit_open(hash::mix(ike_spi ^ 0xda4c_0000_0000_0001))
    }
}

/// Why a moved tunnel came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Its initiator's DPD went unanswered.
    Dpd,
    /// Its next rekey went unanswered (DPD off).
    Rekey,
    /// It never moved: its balancer failed, and it was dark until the
    /// standby took over.
    Takeover,
}

/// How long one moved tunnel is dark.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dark {
    /// From the move until its new SA is up; `None` when it never comes
    /// back (`dpd_action = clear`).
    pub seconds: Option<f64>,
    pub found: Found,
}

impl Timers {
    /// One line: the timers that set the outage.
    pub fn describe(&self) -> String {
        let dpd = |d: f64| match d {
            0.0 => "off".to_string(),
            d => format!("{d} s"),
        };
        format!(
            "initiators' DPD {}, segws' {}; a request given up after {:.1} s; rekey {} s; inbound ESP {}; then {}",
            dpd(self.dpd_delay),
            dpd(self.segw_dpd_delay),
            self.give_up(),
            self.rekey_time,
            if self.inbound_suppresses_dpd { "defers DPD" } else { "does not defer DPD" },
            if self.restart { "restart" } else { "clear (the tunnel stays down)" },
        )
    }

    /// libreswan's timers: liveness every `dpd_delay` (its `dpddelay`),
    /// retransmissions from `interval` (`retransmit-interval`, 0.5 s by
    /// default) given up after `limit` (`retransmit-timeout`, 60 s by
    /// default); the rest as strongSwan's defaults.
    pub fn libreswan(dpd_delay: f64, interval: f64, limit: f64) -> Timers {
        Timers {
            stack: Stack::Libreswan,
            dpd_delay,
            retransmit_timeout: interval,
            retransmit_limit: limit,
            ..Timers::default()
        }
    }

    /// The waits after each send, in order, until the request is given up.
    fn waits(&self) -> Vec<f64> {
        match self.stack {
            Stack::StrongSwan => (0..=self.retransmit_tries)
                .map(|n| self.retransmit_timeout * self.retransmit_base.powi(n as i32))
                .collect(),
            Stack::Libreswan => {
                let mut waits = vec![self.retransmit_timeout];
                let mut elapsed = self.retransmit_timeout;
                // Bounded: the interval is at least 1 ms, the limit finite.
                while elapsed < self.retransmit_limit {
                    let w = self.retransmit_timeout * 2f64.powi(waits.len() as i32 - 1);
                    waits.push(w);
                    elapsed += w;
                }
                waits
            }
        }
    }

    /// From a request's first send until it is given up on.
    pub fn give_up(&self) -> f64 {
        self.waits().iter().sum()
    }

    /// When a prober that starts at `first` sends: the request, then each
    /// retransmission.
    fn sends(&self, first: f64) -> impl Iterator<Item = f64> {
        self.waits().into_iter().scan(first, |at, w| {
            let now = *at;
            *at += w;
            Some(now)
        })
    }

    /// How long the tunnel `m` is dark after its move (at 0).
    pub fn dark(&self, m: Move) -> Dark {
        // What the initiator still receives on its old SA: the old segw's
        // DPD requests, and its downlink until it gives the SA up.
        let mut requests = Vec::new();
        let mut life_until = None;
        if m.old_answers {
            let old_gone = if self.segw_dpd_delay > 0.0 {
                requests.extend(self.sends(self.segw_dpd_delay));
                self.segw_dpd_delay + self.give_up()
            } else {
                f64::INFINITY
            };
            if m.downlink_every.is_finite() && self.inbound_suppresses_dpd {
                life_until = Some(old_gone);
            }
        }
        let rekey = || (1.0 - m.phase) * self.rekey_time + self.give_up();
        let (noticed, found) = if self.dpd_delay > 0.0 {
            // DPD runs only when nothing came for dpd_delay: a tunnel with
            // downlink that often last heard from its segw at the move, an
            // idle one at its last DPD exchange.
            let mut last = if m.downlink_every < self.dpd_delay {
                life_until.unwrap_or(0.0)
            } else {
                -m.phase * self.dpd_delay
            };
            for at in requests {
                if at > last + self.dpd_delay {
                    break;
                }
                last = last.max(at);
            }
            match last + self.dpd_delay + self.give_up() {
                t if t.is_finite() => (t, Found::Dpd),
                _ => (rekey(), Found::Rekey),
            }
        } else {
            (rekey(), Found::Rekey)
        };
        Dark {
            seconds: self.restart.then_some(noticed + self.setup),
            found,
        }
    }
}

/// One event's moved tunnels in the dark.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Tunnels that came back, and their seconds dark, summed.
    pub back: u64,
    pub seconds: f64,
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
    /// Tunnels that never came back (`dpd_action = clear`).
    pub never: u64,
    /// Of those back: found by DPD, and by a rekey.
    pub by_dpd: u64,
    pub by_rekey: u64,
}

impl Summary {
    /// The summary of `darks` (one per moved tunnel).
    pub fn of(darks: &[Dark]) -> Summary {
        let mut secs: Vec<f64> = darks.iter().filter_map(|d| d.seconds).collect();
        secs.sort_by(f64::total_cmp);
        // Nearest rank: the smallest value with at least q of them at or
        // under it.
        let rank = |q: f64| {
            let k = ((q * secs.len() as f64).ceil() as usize).clamp(1, secs.len().max(1));
            secs.get(k - 1).copied().unwrap_or(0.0)
        };
        let back = darks.iter().filter(|d| d.seconds.is_some());
        Summary {
            back: secs.len() as u64,
            seconds: secs.iter().sum(),
            p50: rank(0.5),
            p95: rank(0.95),
            max: secs.last().copied().unwrap_or(0.0),
            never: (darks.len() - secs.len()) as u64,
            by_dpd: back.clone().filter(|d| d.found == Found::Dpd).count() as u64,
            by_rekey: back.filter(|d| d.found == Found::Rekey).count() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUSY: f64 = 0.01;
    const IDLE: f64 = f64::INFINITY;

    fn dark(t: &Timers, old_answers: bool, downlink_every: f64, phase: f64) -> f64 {
        let m = Move {
            old_answers,
            downlink_every,
            phase,
        };
        t.dark(m).seconds.expect("restarted")
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn strongswans_default_retransmissions_give_up_after_165_seconds() {
        let t = Timers {
            retransmit_timeout: 4.0,
            retransmit_tries: 5,
            ..Timers::default()
        };
        assert!((t.give_up() - 165.06).abs() < 0.01, "{}", t.give_up());
        let sends: Vec<f64> = t.sends(0.0).collect();
        let rounded: Vec<i64> = sends.iter().map(|s| s.round() as i64).collect();
        assert_eq!(rounded, [0, 4, 11, 24, 47, 89]);
        assert!(close(Timers::default().give_up(), 6.04));
    }

    #[test]
    fn libreswan_doubles_from_its_interval_and_gives_up_at_the_first_expiry_past_its_limit() {
        // As pluto 4.10 did in the lab (tests/lab_libreswan.rs): interval
        // 0.5 s, limit 10 s: sends at 0, 0.5, 1, 2, 4, 8, given up at 16.
        let t = Timers::libreswan(5.0, 0.5, 10.0);
        let sends: Vec<f64> = t.sends(0.0).collect();
        assert_eq!(sends, [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]);
        assert!(close(t.give_up(), 16.0));
        // Its defaults: 60 s is passed at 64.
        assert!(close(Timers::libreswan(5.0, 0.5, 60.0).give_up(), 64.0));
        // A limit on an expiry gives up there.
        assert!(close(Timers::libreswan(5.0, 0.5, 8.0).give_up(), 8.0));
        // Off a dead segw, an idle tunnel whose liveness was due at the
        // failure: dpd_delay, then the 16 s.
        assert!(close(dark(&t, false, IDLE, 0.0), 5.0 + 16.0 + 0.1));
        assert!(t.describe().contains("given up after 16.0 s"));
    }

    #[test]
    fn a_tunnel_off_a_dead_segw_is_dark_for_dpd_delay_and_the_retransmissions() {
        let t = Timers::default();
        // Busy: its last inbound was at the failure.
        assert!(close(dark(&t, false, BUSY, 0.3), 5.0 + 6.04 + 0.1));
        // Idle: its DPD cycle was 40% through, so it fires 3 s on.
        assert!(close(dark(&t, false, IDLE, 0.4), 3.0 + 6.04 + 0.1));
    }

    #[test]
    fn a_busy_tunnel_moved_off_a_live_segw_waits_for_the_old_segw_to_give_up() {
        let t = Timers::default();
        // The old segw's downlink keeps the initiator's DPD quiet until the
        // old segw's DPD gives up: 30 + 6.04 s; then its own 5 + 6.04 s.
        assert!(close(dark(&t, true, BUSY, 0.0), 36.04 + 11.04 + 0.1));
        // Where inbound ESP does not count, as after a failure.
        let quiet = Timers {
            inbound_suppresses_dpd: false,
            ..t.clone()
        };
        assert!(close(dark(&quiet, true, BUSY, 0.0), 11.04 + 0.1));
        // An idle one: the old segw's DPD comes after its own.
        assert!(close(dark(&t, true, IDLE, 0.0), 11.04 + 0.1));
    }

    #[test]
    fn the_old_segws_dpd_requests_defer_an_initiator_whose_dpd_is_slower() {
        // Segw probing at 5 s, initiator at 30 s: the requests at 5, 6,
        // 7.8 and 11.04 s each count as life, so its DPD fires 30 s after
        // the last one.
        let t = Timers {
            dpd_delay: 30.0,
            segw_dpd_delay: 5.0,
            ..Timers::default()
        };
        let last_request = 5.0 + 1.0 + 1.8;
        let want = last_request + 30.0 + 6.04 + 0.1;
        assert!(close(dark(&t, true, IDLE, 0.0), want));
    }

    #[test]
    fn without_dpd_a_moved_tunnel_is_found_at_its_next_rekey() {
        let t = Timers {
            dpd_delay: 0.0,
            ..Timers::default()
        };
        let d = t.dark(Move {
            old_answers: false,
            downlink_every: BUSY,
            phase: 0.75,
        });
        assert_eq!(d.found, Found::Rekey);
        assert!(close(d.seconds.unwrap(), 900.0 + 6.04 + 0.1));
        // A busy tunnel whose live old segw never gives up (no segw DPD)
        // is found at its rekey too.
        let t = Timers {
            segw_dpd_delay: 0.0,
            ..Timers::default()
        };
        let d = t.dark(Move {
            old_answers: true,
            downlink_every: BUSY,
            phase: 0.5,
        });
        assert_eq!(d.found, Found::Rekey);
        assert!(close(d.seconds.unwrap(), 1800.0 + 6.04 + 0.1));
    }

    #[test]
    fn with_dpd_action_clear_a_moved_tunnel_never_comes_back() {
        let t = Timers {
            restart: false,
            ..Timers::default()
        };
        let m = Move {
            old_answers: false,
            downlink_every: BUSY,
            phase: 0.0,
        };
        assert_eq!(t.dark(m).seconds, None);
        let s = Summary::of(&[t.dark(m), Timers::default().dark(m)]);
        assert_eq!((s.back, s.never), (1, 1));
    }

    #[test]
    fn a_summary_has_nearest_rank_percentiles() {
        let darks: Vec<Dark> = (1..=20)
            .map(|s| Dark {
                seconds: Some(f64::from(s)),
                found: Found::Dpd,
            })
            .collect();
        let s = Summary::of(&darks);
        assert_eq!((s.back, s.p50, s.p95, s.max), (20, 10.0, 19.0, 20.0));
        assert!(close(s.seconds, 210.0));
        assert_eq!(Summary::of(&[]), Summary::default());
    }
}
