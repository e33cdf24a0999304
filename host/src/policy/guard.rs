//! Every policy answer passes through here before the core acts on it.

use std::time::Duration;

use super::breaker::{Breaker, Gate, Outcome};
use super::{CallError, Gateway, Load, Policy, TunnelKey};
use crate::time::Timestamp;

/// Why the host answered instead of the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FallbackReason {
    Trap,
    Timeout,
    MemoryCap,
    /// The policy could not be brought back after an earlier failure.
    Unavailable,
    /// Its fresh instance after a failure is still being started off the
    /// data path (a language runtime's start is too long to wait for).
    Restarting,
    /// It answered an id that is not in the set.
    UnknownGateway,
    /// It answered a gateway that is down, draining or of weight 0.
    GatewayNotTakingTunnels,
    /// It answered a gateway at its capacity (a load-blind policy does;
    /// a capacity-blind balancer would have lost the tunnel there).
    GatewayFull,
    /// It answered `none` although some gateway takes tunnels.
    NoAnswer,
    /// Not asked: it ran to its deadline, failed again and again or took
    /// too much of the worker recently, and the breaker keeps it off the
    /// data path for a while (see [`super::breaker`]).
    BreakerOpen,
}

impl FallbackReason {
    pub const ALL: [FallbackReason; 10] = [
        FallbackReason::Trap,
        FallbackReason::Timeout,
        FallbackReason::MemoryCap,
        FallbackReason::Unavailable,
        FallbackReason::Restarting,
        FallbackReason::UnknownGateway,
        FallbackReason::GatewayNotTakingTunnels,
        FallbackReason::GatewayFull,
        FallbackReason::NoAnswer,
        FallbackReason::BreakerOpen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::Trap => "trap",
            FallbackReason::Timeout => "timeout",
            FallbackReason::MemoryCap => "memory_cap",
            FallbackReason::Unavailable => "unavailable",
            FallbackReason::Restarting => "restarting",
            FallbackReason::UnknownGateway => "unknown_gateway",
            FallbackReason::GatewayNotTakingTunnels => "gateway_not_taking_tunnels",
            FallbackReason::GatewayFull => "gateway_full",
            FallbackReason::NoAnswer => "no_answer",
            FallbackReason::BreakerOpen => "breaker_open",
        }
    }

    fn of(err: &CallError) -> Self {
        match err {
            CallError::Trap(_) => FallbackReason::Trap,
            CallError::Timeout(_) => FallbackReason::Timeout,
            CallError::MemoryCap(_) => FallbackReason::MemoryCap,
            CallError::Unavailable(_) => FallbackReason::Unavailable,
            CallError::Restarting => FallbackReason::Restarting,
        }
    }
}

/// Why a new tunnel has no gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No gateway takes new tunnels (none healthy, all draining or weight 0).
    NoGateway,
    /// Every gateway that takes new tunnels is at its capacity.
    Full,
}

/// The gateway for one new tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub gateway: u32,
    /// `Some` when the host's fallback chose instead of the policy.
    pub fallback: Option<FallbackReason>,
}

/// What the policy did, for status and reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyStats {
    /// Calls to `choose`.
    pub decisions: u64,
    /// Fallbacks, indexed like [`FallbackReason::ALL`].
    pub fallbacks: [u64; FallbackReason::ALL.len()],
    /// Failed `set-gateways` pushes (the policy then answers from a fresh
    /// instance or falls back).
    pub failed_pushes: u64,
    /// Times the breaker opened (a call ran to its deadline, calls failed
    /// in a row, or the policy took too much of the worker).
    pub breaker_trips: u64,
}

impl PolicyStats {
    pub fn fallbacks_total(&self) -> u64 {
        self.fallbacks.iter().sum()
    }

    pub fn fallbacks_for(&self, reason: FallbackReason) -> u64 {
        self.fallbacks[reason as usize]
    }
}

/// A policy with its answers checked and a deterministic fallback.
///
/// The fallback is weighted rendezvous hashing over the gateways that take
/// new tunnels (`weighted::Rendezvous`, per key, no table): it honours
/// weights, keeps no state, and gives the same answer for the same key and
/// set every time.
pub struct Guarded<P = Box<dyn Policy>> {
    policy: P,
    gateways: Vec<Gateway>,
    fallback: weighted::Rendezvous,
    stats: PolicyStats,
    burst: BurstLog,
    breaker: Breaker,
    /// The set changed while the breaker was open (or a policy was put in
    /// place): it is pushed before the policy is next asked.
    unpushed: bool,
}

impl<P: Policy> Guarded<P> {
    pub fn new(policy: P) -> Self {
        Guarded {
            policy,
            gateways: Vec::new(),
            fallback: weighted::Rendezvous::default(),
            stats: PolicyStats::default(),
            burst: BurstLog::new(Duration::from_secs(10)),
            breaker: Breaker::default(),
            unpushed: false,
        }
    }

    pub fn policy(&self) -> &P {
        &self.policy
    }

    pub fn stats(&self) -> &PolicyStats {
        &self.stats
    }

    pub fn gateways(&self) -> &[Gateway] {
        &self.gateways
    }

    /// Tell the policy (and the fallback) the new gateway set. While the
    /// breaker is open the push waits for the next call let through.
    pub fn set_gateways(&mut self, gateways: Vec<Gateway>, now: Timestamp) {
        self.fallback = weighted::Rendezvous::new(&gateways);
        self.gateways = gateways;
        self.unpushed = true;
        if !self.breaker.is_open(now) {
            self.push(now);
        }
    }

    /// Put another policy in place; it is told the current set before it
    /// is first asked. Returns the old one. Existing tunnels are the
    /// caller's; nothing moves here.
    pub fn replace(&mut self, policy: P) -> P {
        self.breaker.reset();
        self.unpushed = true;
        std::mem::replace(&mut self.policy, policy)
    }

    /// Push the set to the policy, through the breaker's accounts.
    fn push(&mut self, now: Timestamp) {
        self.unpushed = false;
        let pushed = self.policy.set_gateways(&self.gateways);
        let outcome = outcome(&pushed);
        match pushed {
            // Not a failure: the fresh instance starting takes the set.
            Ok(()) | Err(CallError::Restarting) => {}
            Err(err) => {
                self.stats.failed_pushes += 1;
                tracing::warn!(
                    policy = self.policy.name(),
                    "policy failed to take the gateway set: {err}"
                );
                self.burst.reset(now);
            }
        }
        // Its failures and deadline count, its time does not: a push comes
        // with a change of the set (rare, and bounded by its own deadline),
        // and a table-building policy in an interpreted guest (consistent
        // hashing in JavaScript) may spend the whole share in one push —
        // which would hand the tunnels of the next second to the fallback
        // at every segw event. A restarted instance takes the set on its
        // own thread (`policy::wasm`), never here.
        self.record(outcome, now, false);
    }

    /// Feed the breaker how a call ended and (when `timed`) the worker
    /// time it took.
    fn record(&mut self, outcome: Outcome, now: Timestamp, timed: bool) {
        let spent = self.policy.spent();
        let spent = if timed { spent } else { Duration::ZERO };
        if let Some((period, why)) = self.breaker.record(outcome, spent, now) {
            self.stats.breaker_trips += 1;
            tracing::warn!(
                policy = self.policy.name(),
                "{why}: the policy is not asked for {period:?}, the built-in fallback answers (breaker_open)"
            );
        }
    }

    /// The gateway for a new tunnel, given the live `load`: the policy's
    /// answer when it takes new tunnels and has room, else the fallback's
    /// choice among those with room. Refused only when no gateway takes new
    /// tunnels, or all that do are full. While the breaker is open the
    /// policy is not asked.
    pub fn choose(
        &mut self,
        key: &TunnelKey,
        load: &Load,
        now: Timestamp,
    ) -> Result<Choice, Refusal> {
        self.choose_timed(key, load, now, true)
    }

    /// As [`choose`](Self::choose), for background work the caller already
    /// paces (a rebalance, a slice at a time): the guest's time on it does
    /// not count against its share of the worker (a rebalance of 10,000
    /// tunnels by a Python policy takes a second of it, by design), while
    /// deadlines and failures still open the breaker.
    pub fn choose_in_background(
        &mut self,
        key: &TunnelKey,
        load: &Load,
        now: Timestamp,
    ) -> Result<Choice, Refusal> {
        self.choose_timed(key, load, now, false)
    }

    fn choose_timed(
        &mut self,
        key: &TunnelKey,
        load: &Load,
        now: Timestamp,
        timed: bool,
    ) -> Result<Choice, Refusal> {
        self.stats.decisions += 1;
        let mut gate = self.breaker.gate(now);
        if gate == Gate::Call && self.unpushed {
            self.push(now);
            gate = self.breaker.gate(now);
        }
        let answer = match gate {
            Gate::Open => Err(FallbackReason::BreakerOpen),
            Gate::Call => {
                let answer = self.policy.choose(key, load);
                self.record(outcome(&answer), now, timed);
                Ok(answer)
            }
        };
        let (reason, error) = match answer {
            Err(breaker) => (breaker, None),
            Ok(Ok(Some(id))) => match self.gateways.iter().find(|g| g.id == id) {
                Some(g) if !g.takes_new_tunnels() => {
                    (FallbackReason::GatewayNotTakingTunnels, None)
                }
                Some(g) if !g.has_room(load.tunnels(id)) => (FallbackReason::GatewayFull, None),
                Some(_) => {
                    return Ok(Choice {
                        gateway: id,
                        fallback: None,
                    })
                }
                None => (FallbackReason::UnknownGateway, None),
            },
            Ok(Ok(None)) => (FallbackReason::NoAnswer, None),
            Ok(Err(err)) => (FallbackReason::of(&err), Some(err)),
        };
        // With no gateway taking tunnels, or every one full, there is
        // nothing to fall back to, and "none" was the right answer.
        let gateways = &self.gateways;
        let has_room = |id: u32| {
            gateways
                .iter()
                .find(|g| g.id == id)
                .is_some_and(|g| g.has_room(load.tunnels(id)))
        };
        let Some(gateway) = self.fallback.winner_where(key.endpoint_hash(), has_room) else {
            return Err(if self.fallback.members() == 0 {
                Refusal::NoGateway
            } else {
                Refusal::Full
            });
        };
        self.stats.fallbacks[reason as usize] += 1;
        if self.burst.should_log(now) {
            let policy = self.policy.name();
            let suppressed = self.burst.suppressed_before;
            match error {
                Some(err) => tracing::warn!(
                    policy,
                    suppressed,
                    "policy {err}; the built-in fallback answers"
                ),
                // The host's own rule, not a policy fault: a load-blind
                // policy does this by design; the breaker said so when it
                // opened.
                None if matches!(
                    reason,
                    FallbackReason::GatewayFull | FallbackReason::BreakerOpen
                ) =>
                {
                    tracing::debug!(
                        policy,
                        reason = reason.as_str(),
                        suppressed,
                        "the built-in fallback places the tunnel"
                    )
                }
                None => tracing::warn!(
                    policy,
                    reason = reason.as_str(),
                    suppressed,
                    "policy answer not usable; the built-in fallback answers"
                ),
            }
        }
        Ok(Choice {
            gateway,
            fallback: Some(reason),
        })
    }
}

/// What the breaker makes of a call's result.
fn outcome<T>(result: &Result<T, CallError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Returned,
        Err(CallError::Timeout(_)) => Outcome::TimedOut,
        Err(CallError::Restarting) => Outcome::NotRun,
        Err(CallError::Trap(_) | CallError::MemoryCap(_) | CallError::Unavailable(_)) => {
            Outcome::Failed
        }
    }
}

/// Log the first event of a burst, then at most once per window, so a broken
/// policy facing a flood of new tunnels does not flood the log too.
#[derive(Debug)]
struct BurstLog {
    window: Duration,
    last_logged: Option<Timestamp>,
    suppressed: u64,
    /// How many were kept quiet before the last one that was logged.
    suppressed_before: u64,
}

impl BurstLog {
    fn new(window: Duration) -> Self {
        BurstLog {
            window,
            last_logged: None,
            suppressed: 0,
            suppressed_before: 0,
        }
    }

    fn should_log(&mut self, now: Timestamp) -> bool {
        match self.last_logged {
            Some(at) if now.since(at) < self.window => {
                self.suppressed += 1;
                false
            }
            _ => {
                self.last_logged = Some(now);
                self.suppressed_before = std::mem::take(&mut self.suppressed);
                true
            }
        }
    }

    fn reset(&mut self, now: Timestamp) {
        self.last_logged = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Opener;
    use std::net::{IpAddr, Ipv4Addr};

    /// A policy that answers whatever it is told to.
    struct Scripted(Result<Option<u32>, CallError>);

    impl Policy for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn set_gateways(&mut self, _: &[Gateway]) -> Result<(), CallError> {
            Ok(())
        }
        fn choose(&mut self, _: &TunnelKey, _: &Load) -> Result<Option<u32>, CallError> {
            self.0.clone()
        }
    }

    fn set() -> Vec<Gateway> {
        let gw = |id: u32, healthy, draining| Gateway {
            id,
            name: format!("segw{id}"),
            weight: 1,
            healthy,
            draining,
            tunnels: 0,
            capacity: 0,
            throughput: 0,
        };
        vec![
            gw(1, true, false),
            gw(2, false, false),
            gw(3, true, true),
            gw(4, true, false),
        ]
    }

    fn key(n: u32) -> TunnelKey {
        TunnelKey {
            peer: IpAddr::V4(Ipv4Addr::from(0xc000_0200 + n)),
            peer_port: 500,
            vip: IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1)),
            ike_spi: Some(7),
            opened_by: Opener::Ike,
        }
    }

    fn guarded(answer: Result<Option<u32>, CallError>) -> Guarded<Scripted> {
        let mut g = Guarded::new(Scripted(answer));
        g.set_gateways(set(), Timestamp::ZERO);
        g
    }

    #[test]
    fn a_good_answer_passes_through() {
        let mut g = guarded(Ok(Some(4)));
        assert_eq!(
            g.choose(&key(1), &Load::default(), Timestamp::ZERO),
            Ok(Choice {
                gateway: 4,
                fallback: None
            })
        );
        assert_eq!(g.stats().fallbacks_total(), 0);
    }

    #[test]
    fn every_bad_answer_falls_back_to_a_gateway_taking_tunnels() {
        let cases = [
            (Ok(Some(99)), FallbackReason::UnknownGateway),
            (Ok(Some(2)), FallbackReason::GatewayNotTakingTunnels),
            (Ok(Some(3)), FallbackReason::GatewayNotTakingTunnels),
            (Ok(None), FallbackReason::NoAnswer),
            (
                Err(CallError::Trap("unreachable".into())),
                FallbackReason::Trap,
            ),
            (
                Err(CallError::MemoryCap(1 << 20)),
                FallbackReason::MemoryCap,
            ),
        ];
        for (answer, reason) in cases {
            let mut g = guarded(answer);
            for n in 0..50 {
                let choice = g
                    .choose(
                        &key(n),
                        &Load::default(),
                        Timestamp::from_secs(u64::from(n)),
                    )
                    .unwrap();
                assert!(
                    [1, 4].contains(&choice.gateway),
                    "{reason:?} chose {}",
                    choice.gateway
                );
                let failure = matches!(reason, FallbackReason::Trap | FallbackReason::MemoryCap);
                assert!(
                    choice.fallback == Some(reason)
                        || (failure && choice.fallback == Some(FallbackReason::BreakerOpen)),
                    "{reason:?}: {:?}",
                    choice.fallback
                );
            }
            // A call that fails opens the breaker at the third in a row:
            // asked at 0, 1, 2 s, then once per period (3, 5, 9, 17, 33 s).
            let asked = if matches!(reason, FallbackReason::Trap | FallbackReason::MemoryCap) {
                8
            } else {
                50
            };
            assert_eq!(g.stats().fallbacks_for(reason), asked, "{reason:?}");
            assert_eq!(g.stats().fallbacks_total(), 50);
        }
    }

    /// Answers 4, taking 100 ms of the worker a call; counts its pushes.
    struct Slow {
        pushes: u32,
        spent: Duration,
    }

    impl Policy for Slow {
        fn name(&self) -> &str {
            "slow"
        }
        fn set_gateways(&mut self, _: &[Gateway]) -> Result<(), CallError> {
            self.pushes += 1;
            self.spent += Duration::from_millis(100);
            Ok(())
        }
        fn choose(&mut self, _: &TunnelKey, _: &Load) -> Result<Option<u32>, CallError> {
            self.spent += Duration::from_millis(100);
            Ok(Some(4))
        }
        fn spent(&mut self) -> Duration {
            std::mem::take(&mut self.spent)
        }
    }

    #[test]
    fn a_rebalance_paced_by_the_caller_is_not_cut_short_by_the_guests_time() {
        let mut g = Guarded::new(Slow {
            pushes: 0,
            spent: Duration::ZERO,
        });
        g.set_gateways(set(), Timestamp::ZERO);
        // 100 placements of 100 ms each within a second: all the policy's.
        for n in 0..100 {
            let now = Timestamp::from_millis(u64::from(n));
            let c = g.choose_in_background(&key(n), &Load::default(), now);
            assert_eq!(c.unwrap().fallback, None, "placement {n}");
        }
        assert_eq!(g.stats().breaker_trips, 0);
    }

    #[test]
    fn a_policy_taking_the_workers_time_is_not_asked_nor_pushed_sets_until_the_probe() {
        let mut g = Guarded::new(Slow {
            pushes: 0,
            spent: Duration::ZERO,
        });
        let at = Timestamp::from_millis;
        g.set_gateways(set(), at(0));
        // 100 ms each: three answers take 300 ms in a second (the push's
        // time is not counted).
        for n in 1..=3 {
            assert_eq!(
                g.choose(&key(n), &Load::default(), at(u64::from(n)))
                    .unwrap()
                    .fallback,
                None
            );
        }
        assert_eq!(g.stats().breaker_trips, 1);
        let open = g.choose(&key(3), &Load::default(), at(3)).unwrap();
        assert_eq!(open.fallback, Some(FallbackReason::BreakerOpen));
        // A set change while open waits for the probe.
        g.set_gateways(set(), at(10));
        assert_eq!(g.policy().pushes, 1);
        let probe = g.choose(&key(4), &Load::default(), at(1004)).unwrap();
        assert_eq!((probe.gateway, probe.fallback), (4, None));
        assert_eq!(g.policy().pushes, 2);
    }

    #[test]
    fn a_policy_that_runs_to_its_deadline_is_asked_once_per_breaker_period() {
        // Every call times out; a new tunnel every 100 ms for 100 s.
        let mut g = guarded(Err(CallError::Timeout(Duration::from_millis(20))));
        for n in 0..1000u32 {
            let now = Timestamp::ZERO + Duration::from_millis(100 * u64::from(n));
            let choice = g.choose(&key(n), &Load::default(), now).unwrap();
            assert!([1, 4].contains(&choice.gateway), "every tunnel placed");
        }
        // Asked at 0, 1, 3, 7, 15, 31 and 63 s (the period doubles while
        // the probes time out): seven deadlines in 100 s, not a thousand.
        let s = g.stats();
        assert_eq!(s.fallbacks_for(FallbackReason::Timeout), 7);
        assert_eq!(s.fallbacks_for(FallbackReason::BreakerOpen), 993);
        assert_eq!(s.breaker_trips, 7);
        // A policy swapped in starts with the breaker closed.
        g.replace(Scripted(Ok(Some(4))));
        let now = Timestamp::from_secs(101);
        assert_eq!(
            g.choose(&key(0), &Load::default(), now).unwrap().fallback,
            None
        );
    }

    #[test]
    fn fallback_is_deterministic() {
        let mut a = guarded(Ok(None));
        let mut b = guarded(Err(CallError::Trap("x".into())));
        for n in 0..100 {
            let (ca, cb) = (
                a.choose(&key(n), &Load::default(), Timestamp::ZERO),
                b.choose(&key(n), &Load::default(), Timestamp::ZERO),
            );
            assert_eq!(ca.map(|c| c.gateway), cb.map(|c| c.gateway));
        }
    }

    #[test]
    fn no_gateway_means_no_choice_and_no_fallback_count() {
        let mut g = Guarded::new(Scripted(Ok(None)));
        let mut down = set();
        down.iter_mut().for_each(|gw| gw.healthy = false);
        g.set_gateways(down, Timestamp::ZERO);
        assert_eq!(
            g.choose(&key(1), &Load::default(), Timestamp::ZERO),
            Err(Refusal::NoGateway)
        );
        assert_eq!(g.stats().fallbacks_total(), 0);
        assert_eq!(g.stats().decisions, 1);
    }

    /// Gateways 1 and 4 take tunnels, with room for 2 and 3.
    fn with_capacity(answer: Result<Option<u32>, CallError>) -> Guarded<Scripted> {
        let mut g = Guarded::new(Scripted(answer));
        let mut gateways = set();
        gateways[0].capacity = 2;
        gateways[3].capacity = 3;
        g.set_gateways(gateways, Timestamp::ZERO);
        g
    }

    #[test]
    fn an_answer_of_a_full_gateway_falls_back_to_one_with_room() {
        let mut g = with_capacity(Ok(Some(1)));
        let mut load = Load::default();
        load.add(1, 2);
        for n in 0..20 {
            let c = g.choose(&key(n), &load, Timestamp::ZERO).unwrap();
            assert_eq!(c.gateway, 4);
            assert_eq!(c.fallback, Some(FallbackReason::GatewayFull));
        }
        assert_eq!(g.stats().fallbacks_for(FallbackReason::GatewayFull), 20);
        // With room again, the answer stands.
        load.add(1, -1);
        assert_eq!(
            g.choose(&key(0), &load, Timestamp::ZERO).unwrap().fallback,
            None
        );
    }

    #[test]
    fn every_gateway_full_is_a_refusal_not_a_fallback() {
        let mut g = with_capacity(Ok(Some(1)));
        let mut load = Load::default();
        load.add(1, 2);
        load.add(4, 3);
        assert_eq!(
            g.choose(&key(0), &load, Timestamp::ZERO),
            Err(Refusal::Full)
        );
        // A policy that sees the load answers none: right, and not counted.
        let mut aware = with_capacity(Ok(None));
        assert_eq!(
            aware.choose(&key(0), &load, Timestamp::ZERO),
            Err(Refusal::Full)
        );
        assert_eq!(
            g.stats().fallbacks_total() + aware.stats().fallbacks_total(),
            0
        );
    }

    #[test]
    fn burst_log_speaks_once_per_window() {
        let mut log = BurstLog::new(Duration::from_secs(10));
        let spoke: Vec<bool> = [0, 1, 5, 9, 10, 11, 30]
            .iter()
            .map(|&s| log.should_log(Timestamp::from_secs(s)))
            .collect();
        assert_eq!(spoke, [true, false, false, false, true, false, true]);
    }
}
