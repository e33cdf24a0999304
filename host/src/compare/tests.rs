//! Hand-checked small scenarios for every metric, through the real core.

use super::*;
use crate::policy::native;

/// 3 segws a, b, c; 12 tunnels arriving at step 0 (half behind NAT, some
/// raw ESP); then `events`.
fn small(steps: u32, events: &str) -> Scenario {
    let text = format!(
        "name = \"small\"\nstep_secs = 10\nsteps = {steps}\n\
         [[segw]]\nname = \"a\"\n[[segw]]\nname = \"b\"\n[[segw]]\nname = \"c\"\n\
         [tunnels]\ncount = 12\nnat = 0.5\nnat_addresses = 2\nraw_esp = 0.5\n{events}"
    );
    Scenario::parse(&text, "small.toml").unwrap()
}

fn run_native(name: &str, scenario: &Scenario) -> PolicyRun {
    let options = Options {
        seed: 1,
        timing: false,
    };
    run(
        scenario,
        options,
        &mut || native::shipped(name, &[]).unwrap(),
        &mut |_| {},
    )
}

fn clean(r: &PolicyRun) {
    assert_eq!(r.split_tunnels, 0, "{}: split tunnels", r.policy);
    assert!(r.drops.is_empty(), "{}: drops {:?}", r.policy, r.drops);
    assert_eq!(r.returns_lost, 0, "{}: replies lost", r.policy);
    assert_eq!(r.fallbacks, 0, "{}: fallbacks", r.policy);
}

#[test]
fn tunnels_over_ipv6_are_carried_failed_over_and_counted_like_ipv4_ones() {
    // The 6 tunnels not behind the NAT all come over IPv6.
    let events = "[[event]]\nstep = 1\nfail = \"b\"\n[[event]]\nstep = 2\nrecover = \"b\"\n";
    let text = small(3, events).to_string();
    assert!(text.contains("50% NAT'd, 25% raw ESP, 0% IPv6"), "{text}");
    let mut v6 = small(3, events);
    v6.tunnels.ipv6 = 1.0;
    assert!(v6.to_string().contains("50% IPv6"), "{v6}");
    let r = run_native("round-robin", &v6);
    clean(&r);
    // Placement by arrival does not care about the family: as over IPv4.
    assert_eq!(r.tunnels_over_time[0], [4, 4, 4]);
    assert_eq!(r.tunnels_over_time[1], [6, 0, 6]);
    assert_eq!(r.moved_per_event, r.minimum_moved_per_event);
    for policy in [
        "consistent-hash",
        "weighted",
        "least-tunnels",
        "two-choices",
    ] {
        let r = run_native(policy, &v6);
        clean(&r);
        assert_eq!(r.moved_per_event, r.minimum_moved_per_event, "{policy}");
    }
    // A hash of the peer's address sees other addresses over IPv6 (seed 1:
    // the same draws, but six peers at other addresses).
    let v4 = run_native("consistent-hash", &small(3, events));
    let v6 = run_native("consistent-hash", &v6);
    assert_ne!(v4.tunnels_over_time, v6.tunnels_over_time);
}

#[test]
fn round_robin_twelve_over_three_then_one_fails_and_recovers() {
    let r = run_native(
        "round-robin",
        &small(
            3,
            "[[event]]\nstep = 1\nfail = \"b\"\n[[event]]\nstep = 2\nrecover = \"b\"\n",
        ),
    );
    clean(&r);
    assert_eq!(r.tunnels_over_time[0], [4, 4, 4]);
    // b's 4 tunnels go to a and c in turn on their next packet; nobody else
    // moves: exactly the minimum.
    assert_eq!(r.tunnels_over_time[1], [6, 0, 6]);
    assert_eq!(r.moved_per_event, [4, 0]);
    assert_eq!(r.minimum_moved_per_event, [4, 0]);
    // Recovery moves nothing back: affinity.
    assert_eq!(r.tunnels_over_time[2], [6, 0, 6]);
    assert_eq!(r.tunnels_per_segw["b"], 0);
    // Fair is 4 each: 6/4 = 1.5; ratios 1.5, 0, 1.5 have cov √0.5.
    assert_eq!(r.max_over_mean, 1.5);
    assert_eq!(r.cov, (std::f64::consts::FRAC_1_SQRT_2 * 1e4).round() / 1e4);
    // Twelve placements and four re-placements; the frames: per tunnel 4 IKE
    // and 2 ESP per step, 3 steps.
    assert_eq!(r.decisions, 16);
    assert_eq!(r.frames, 12 * (4 + 2 * 3));
}

#[test]
fn a_rebalance_is_measured_against_the_excess_over_fair_shares() {
    let r = run_native(
        "round-robin",
        &small(
            4,
            "[[event]]\nstep = 1\nfail = \"b\"\n[[event]]\nstep = 2\nrecover = \"b\"\n\
             [[event]]\nstep = 3\nswap = { rebalance = true }\n",
        ),
    );
    clean(&r);
    // 6/0/6 against a fair 4/4/4: at least two leave a and two leave c.
    assert_eq!(r.minimum_moved_per_event[2], 4);
    assert_eq!(r.tunnels_over_time[3], [4, 4, 4]);
    assert!(r.moved_per_event[2] >= 4, "{:?}", r.moved_per_event);
    assert_eq!(r.max_over_mean, 1.0);
}

#[test]
fn a_hot_swap_without_rebalance_moves_nothing() {
    let r = run_native(
        "consistent-hash",
        &small(2, "[[event]]\nstep = 1\nswap = { rebalance = false }\n"),
    );
    clean(&r);
    assert_eq!((r.moved_per_event[0], r.minimum_moved_per_event[0]), (0, 0));
    assert_eq!(r.tunnels_over_time[0], r.tunnels_over_time[1]);
}

#[test]
fn a_drained_segw_keeps_its_tunnels_and_gets_no_new_ones() {
    let mut s = small(6, "[[event]]\nstep = 1\ndrain = \"a\"\n");
    s.tunnels.churn = 0.25;
    let r = run_native("round-robin", &s);
    clean(&r);
    let a: Vec<u64> = r.tunnels_over_time.iter().map(|c| c[0]).collect();
    // a only loses tunnels (to churn), never gains.
    assert!(a.windows(2).all(|w| w[1] <= w[0]), "{a:?}");
    assert_eq!(r.moved_per_event, [0]);
    assert_eq!(r.weights_at_end, [0, 1, 1]);
    // The fair share ignores a: b and c split the whole population.
    assert!(r.tunnels_per_segw["b"] + r.tunnels_per_segw["c"] > 6);
}

#[test]
fn a_removed_segw_s_tunnels_all_move_and_an_added_one_takes_new_ones() {
    let mut s = small(
        5,
        "[[event]]\nstep = 1\nremove = \"c\"\n[[event]]\nstep = 2\nadd = { name = \"d\", weight = 2 }\n",
    );
    s.tunnels.churn = 0.25;
    let r = run_native("weighted", &s);
    clean(&r);
    // Churn ends some tunnels first; every one c still holds then moves.
    let on_c = r.minimum_moved_per_event[0];
    assert!(on_c > 0 && on_c <= r.tunnels_over_time[0][2]);
    assert_eq!(r.moved_per_event, [on_c, 0]);
    assert_eq!(r.minimum_moved_per_event[1], 0);
    assert_eq!(r.tunnels_per_segw["c"], 0);
    assert_eq!(r.segws, ["a", "b", "c", "d"]);
    assert_eq!(r.weights_at_end, [1, 1, 0, 2]);
    assert!(r.tunnels_per_segw["d"] > 0, "{:?}", r.tunnels_per_segw);
}

#[test]
fn the_builtin_shows_the_tradeoffs() {
    let s = Scenario::builtin();
    let ch = run_native("consistent-hash", &s);
    let rr = run_native("round-robin", &s);
    let w = run_native("weighted", &s);
    for r in [&ch, &rr, &w] {
        clean(r);
        // A failure moves the failed segw's tunnels and no others; a
        // recovery, an addition and a plain swap move nothing.
        assert_eq!(
            r.moved_per_event[..4],
            r.minimum_moved_per_event[..4],
            "{}",
            r.policy
        );
        assert!(r.minimum_moved_per_event[0] > 1_000);
    }
    let rebalance = s.events.len() - 1;
    let excess = |r: &PolicyRun| {
        r.moved_per_event[rebalance] as f64 / r.minimum_moved_per_event[rebalance] as f64
    };
    // On the rebalance consistent hashing stays near the minimum,
    // round-robin reshuffles far more.
    assert!(excess(&ch) < 1.5, "consistent-hash {}", excess(&ch));
    assert!(excess(&rr) > 2.0, "round-robin {}", excess(&rr));
    // Weighted honours 2:1:1:1(:1); the others cannot.
    assert!(w.max_over_mean < 1.05, "weighted {}", w.max_over_mean);
    assert!(rr.max_over_mean > 1.15 && ch.max_over_mean > 1.15);
}

#[test]
fn the_same_seed_gives_a_byte_identical_report_and_another_seed_does_not() {
    let s = small(
        4,
        "[[event]]\nstep = 1\nfail = \"b\"\n[[event]]\nstep = 3\nswap = { rebalance = true }\n",
    );
    let once = report::json(&[run_native("consistent-hash", &s)]);
    let again = report::json(&[run_native("consistent-hash", &s)]);
    assert_eq!(once, again);
    let other = report::json(&[run(
        &s,
        Options {
            seed: 2,
            timing: false,
        },
        &mut || native::shipped("consistent-hash", &[]).unwrap(),
        &mut |_| {},
    )]);
    assert_ne!(once, other);
}

#[test]
fn report_json_has_the_promised_keys() {
    let r = run_native("weighted", &small(2, ""));
    let v: serde_json::Value = serde_json::from_str(&report::json(&[r])).unwrap();
    let o = &v[0];
    for key in crate::compare::REPORT_KEYS {
        assert!(o.get(key).is_some(), "report.json lacks {key}");
    }
    assert_eq!(
        o["tunnels_per_segw"]["a"].as_u64().unwrap()
            + o["tunnels_per_segw"]["b"].as_u64().unwrap()
            + o["tunnels_per_segw"]["c"].as_u64().unwrap(),
        12
    );
}

#[test]
fn the_html_report_stands_alone_with_three_kinds_of_chart() {
    let s = small(3, "[[event]]\nstep = 1\nfail = \"b\"\n");
    let runs = [run_native("round-robin", &s), run_native("weighted", &s)];
    let page = report::html(&s, 1, &runs);
    // One load chart per policy, one disruption chart, one spread chart.
    assert_eq!(page.matches("<svg").count(), 4, "{page}");
    assert!(!page.contains("chart failed"));
    // Self-contained: nothing fetched.
    assert!(!page.contains("src=") && !page.contains("href="));
    assert!(page.contains("least disruption"));
}

/// Two segws, a with weight 2, b with 1; 9 tunnels at step 0; `events`.
fn two_to_one(steps: u32, events: &str) -> Scenario {
    let text = format!(
        "name = \"two-to-one\"\nstep_secs = 10\nsteps = {steps}\n\
         [[segw]]\nname = \"a\"\nweight = 2\n[[segw]]\nname = \"b\"\n\
         [tunnels]\ncount = 9\n{events}"
    );
    Scenario::parse(&text, "two-to-one.toml").unwrap()
}

#[test]
fn unequal_weights_are_judged_against_each_segws_fair_share() {
    // Fair shares of 9 at 2:1 are 6 and 3.
    let w = run_native("weighted", &two_to_one(1, ""));
    clean(&w);
    assert_eq!(w.tunnels_per_segw["a"], 6);
    assert_eq!((w.max_over_mean, w.cov), (1.0, 0.0));
    // Round-robin ignores weights: 5 and 4, i.e. 5/6 and 4/3 of fair.
    // Ratios 0.8333 and 1.3333: mean 1.0833, deviation 0.25, cov 0.2308.
    let r = run_native("round-robin", &two_to_one(1, ""));
    clean(&r);
    assert_eq!(r.tunnels_over_time[0], [5, 4]);
    assert_eq!(r.max_over_mean, 1.3333);
    assert_eq!(r.cov, 0.2308);
    // A weight change moves nothing (no rebalance asked) and its minimum
    // is 0; the judgement follows the new weights: 1:1 now, 5/4.5 = 1.1111.
    let r = run_native(
        "round-robin",
        &two_to_one(
            2,
            "[[event]]\nstep = 1\nweight = { segw = \"a\", to = 1 }\n",
        ),
    );
    clean(&r);
    assert_eq!(
        (r.moved_per_event.clone(), r.minimum_moved_per_event.clone()),
        (vec![0], vec![0])
    );
    assert_eq!(r.weights_at_end, [1, 1]);
    assert_eq!(r.max_over_mean, 1.1111);
}

/// Answers a gateway that does not exist: every decision falls back.
struct Liar;

impl Policy for Liar {
    fn name(&self) -> &str {
        "liar"
    }
    fn set_gateways(
        &mut self,
        _: &[crate::policy::Gateway],
    ) -> Result<(), crate::policy::CallError> {
        Ok(())
    }
    fn choose(
        &mut self,
        _: &crate::policy::TunnelKey,
        _: &crate::policy::Load,
    ) -> Result<Option<u32>, crate::policy::CallError> {
        Ok(Some(999))
    }
}

#[test]
fn a_lying_policy_costs_fallbacks_not_tunnels() {
    let options = Options {
        seed: 1,
        timing: true,
    };
    let r = run(
        &small(2, "[[event]]\nstep = 1\nfail = \"b\"\n"),
        options,
        &mut || Box::new(Liar),
        &mut |_| {},
    );
    assert_eq!((r.split_tunnels, r.returns_lost), (0, 0));
    assert!(r.drops.is_empty(), "{:?}", r.drops);
    // 12 placements and b's re-placements, every one a counted fallback;
    // every tunnel still lands, and the failure moves only b's.
    assert_eq!(r.fallbacks, r.decisions);
    assert!(r.decisions > 12);
    assert_eq!(r.tunnels_per_segw.values().sum::<u64>(), 12);
    assert_eq!(r.moved_per_event, r.minimum_moved_per_event);
    assert!(r.ns_per_decision.is_some_and(|ns| ns > 0.0));
}

/// a (weight 2, room for 4), b and c (room for 2 each): 8 places. 6 arrive
/// at step 0, 3 more at the peak (step 1), then b fails (step 2).
fn with_capacity(steps: u32, events: &str) -> Scenario {
    let text = format!(
        "name = \"cap\"\nstep_secs = 10\nsteps = {steps}\n\
         [[segw]]\nname = \"a\"\nweight = 2\ncapacity = 4\n\
         [[segw]]\nname = \"b\"\ncapacity = 2\n[[segw]]\nname = \"c\"\ncapacity = 2\n\
         [tunnels]\ncount = 6\npeak = {{ step = 1, tunnels = 3 }}\n{events}"
    );
    Scenario::parse(&text, "cap.toml").unwrap()
}

#[test]
fn refusals_for_capacity_are_counted_exactly() {
    let s = with_capacity(4, "[[event]]\nstep = 2\nfail = \"b\"\n");
    for policy in ["round-robin", "least-tunnels", "two-choices", "weighted"] {
        let r = run_native(policy, &s);
        // Step 0: 6 of 8 places. Step 1: 3 more for the last 2 places, so
        // 1 refused. Step 2: b (2 tunnels) fails with no room anywhere: its
        // 2 tunnels are refused too. Step 3: the same 3 try again.
        assert_eq!(r.tunnels_over_time[1].iter().sum::<u64>(), 8, "{policy}");
        assert_eq!(r.tunnels_over_time[2], [4, 0, 2], "{policy}");
        assert_eq!(r.refused_tunnels, 3, "{policy}");
        assert_eq!(r.refused_tries, 1 + 3 + 3, "{policy}");
        assert_eq!(r.refused_per_event, [6], "{policy}: steps 2 and 3");
        assert_eq!(r.peak_per_segw, [4, 2, 2], "{policy}");
        if policy == "round-robin" {
            // a, b, c, a, b, c at step 0: b and c full from the start, a
            // from the peak (step 1); b until it fails.
            assert_eq!(r.secs_above_90, [30, 20, 40]);
        }
        assert_eq!(r.split_tunnels, 0, "{policy}");
        assert_eq!(r.drops.keys().collect::<Vec<_>>(), ["at_capacity"]);
    }
}

#[test]
fn load_aware_policies_never_answer_a_full_segw_and_round_robin_does() {
    let s = with_capacity(2, "");
    let blind = run_native("round-robin", &s);
    // Round-robin ignores weights: b and c fill at 2 while a has room.
    assert!(blind.full_answers > 0);
    assert_eq!(blind.fallbacks, blind.full_answers);
    for policy in ["least-tunnels", "two-choices"] {
        let aware = run_native(policy, &s);
        assert_eq!(aware.full_answers, 0, "{policy}");
        assert_eq!(aware.refused_tunnels, blind.refused_tunnels, "{policy}");
        assert!(ranked(&[blind.clone(), aware.clone()])[0].policy == policy);
    }
}

#[test]
fn the_capacity_scenario_is_built_in() {
    let s = Scenario::resolve(std::path::Path::new("capacity")).unwrap();
    assert!(s.has_capacities());
    assert_eq!(s.tunnels.peak.map(|p| p.tunnels), Some(2000));
    let lab = Scenario::resolve(std::path::Path::new("lab-capacity")).unwrap();
    assert_eq!(lab.population_at(lab.steps), 14);
}

/// Given tunnels that close (`ends`) and a peer that comes back: the closed
/// one leaves its segw's count from its step on, and the peer initiating
/// afresh from the endpoint it opened from lands where its old tunnel was
/// (the balancer keeps the entry until idle expiry, and finds it by that
/// endpoint), without asking the policy.
#[test]
fn given_tunnels_close_and_a_returning_peer_finds_its_old_segw() {
    use sim::{run_with, Arrivals, GivenPeer};
    let scenario = small(4, "");
    let peer = |n: u8, step: u32, ends: Option<u32>, spi: u64| GivenPeer {
        step,
        addr: std::net::Ipv4Addr::new(10, 1, 0, n).into(),
        ike_port: 500,
        natt_port: Some(4500),
        ike_spi: spi,
        ends,
    };
    let given = [
        peer(1, 0, None, 0x11),
        peer(2, 0, Some(1), 0x22),
        peer(3, 0, None, 0x33),
        // Peer 2 again, a step after it closed: a new IKE SA.
        peer(2, 2, None, 0x2222),
    ];
    let out = run_with(
        &scenario,
        Arrivals::Given(&given),
        &mut || native::shipped("round-robin", &[]).unwrap(),
        &mut |_| {},
    );
    // Round-robin: a, b, c at step 0; b loses its tunnel at step 1; the
    // returning peer is on b again, and the policy decided only three.
    assert_eq!(
        out.per_step,
        [vec![1, 1, 1], vec![1, 0, 1], vec![1, 1, 1], vec![1, 1, 1]]
    );
    assert_eq!(out.placements, [Some(0), None, Some(2), Some(1)]);
    assert_eq!(out.decisions, 3);
    assert_eq!(out.split, 0);
}

/// `small` with `[traffic]`: every tunnel at exactly `rate` (sigma 0), the
/// same all day, downlink four times the uplink.
fn with_traffic(steps: u32, rate: &str, events: &str) -> Scenario {
    let traffic = format!(
        "[traffic]\ndistribution = \"lognormal\"\nmedian = \"{rate}\"\nsigma = 0.0\n\
         downlink_ratio = 4.0\npacket_bytes = 1000\nshares = {{ flat = 1.0 }}\n"
    );
    let mut s = small(steps, events);
    s.traffic = Scenario::parse(
        &format!(
            "step_secs = 10\nsteps = 1\n[[segw]]\nname = \"a\"\n[tunnels]\ncount = 1\n{traffic}"
        ),
        "t.toml",
    )
    .unwrap()
    .traffic;
    s
}

#[test]
fn the_bytes_each_segw_carried_are_what_its_tunnels_sent_as_the_core_counted_them() {
    // 12 tunnels at 1 Mbit/s (125,000 B/s, 1,250,000 B a step), 4 a segw.
    let r = run_native("round-robin", &with_traffic(3, "1 Mbps", ""));
    clean(&r);
    assert_eq!(r.tunnels_over_time[1], [4, 4, 4]);
    // Step 0 also carries the IKE that opened them; from step 1 on only
    // ESP: exactly 4 × 125,000 B/s on each segw.
    for step in 1..3 {
        assert_eq!(r.throughput_over_time[step], [500_000.0; 3], "step {step}");
    }
    let ike = r.throughput_over_time[0][0] - 500_000.0;
    assert!(ike > 0.0 && ike < 1_000.0, "IKE in step 0: {ike} B/s");
    // Each frame stood for 250 packets up and 1,000 down, not one.
    assert_eq!(r.frames, 12 * (4 + 2 * 3));
}

#[test]
fn a_failure_moves_the_failed_segw_s_traffic_onto_the_others() {
    let events = "[[event]]\nstep = 1\nfail = \"b\"\n";
    let mut s = with_traffic(3, "1 Mbps", events);
    for segw in &mut s.segws {
        segw.throughput = 1_000_000; // 8 Mbit/s: 4 tunnels are half of it
    }
    let r = run_native("round-robin", &s);
    clean(&r);
    assert_eq!(r.throughput_over_time[2], [750_000.0, 0.0, 750_000.0]);
    assert_eq!(r.peak_utilization["a"], 0.75);
    // b's peak was step 0: its 4 tunnels' ESP and the IKE that opened them.
    assert_eq!(r.peak_utilization["b"], 0.5005);
    // Nobody went over 80% (0.75 is not), so no second counts.
    assert_eq!((r.seconds_over_80, r.seconds_over_100), (0, 0));
    s.segws[0].throughput = 900_000;
    let r = run_native("round-robin", &s);
    // a at 750,000 / 900,000 = 83% in steps 1 and 2: 20 s over 80%.
    assert_eq!(r.seconds_over_80_per_segw, [20, 0, 0]);
    assert_eq!((r.seconds_over_80, r.seconds_over_100), (20, 0));
    // The busy hour is step 0 (the IKE on top); a and c carried the same.
    assert_eq!(r.busy_step, 0);
}

/// The built-in day, at 2,000 tunnels: the count-balancing policies put as
/// many tunnels on the 4 Gbit/s segws as on the 10 Gbit/s ones, which at
/// the busy hour (and more so with segw4 down) is more than they can
/// carry; least-utilization fills each to the same share of its own.
#[test]
fn on_the_diurnal_day_count_balancing_overloads_the_small_segws_and_least_utilization_does_not() {
    let mut day = Scenario::resolve(std::path::Path::new("diurnal")).unwrap();
    day.tunnels.count = 2_000;
    // The same total traffic as the built-in 10,000 tunnels.
    if let Some(t) = &mut day.traffic {
        t.rate = super::traffic::RateDist::LogNormal {
            median: 1.2e6 / 8.0 * 5.0,
            sigma: 1.1,
        };
    }
    for policy in ["round-robin", "least-tunnels", "consistent-hash"] {
        let r = run_native(policy, &day);
        clean(&r);
        assert!(
            r.seconds_over_100 >= 3600,
            "{policy}: {}",
            r.seconds_over_100
        );
        assert!(
            r.peak_utilization["segw3"] > 1.0,
            "{policy}: {:?}",
            r.peak_utilization
        );
        assert!(
            r.peak_utilization["segw1"] < 0.7,
            "{policy}: {:?}",
            r.peak_utilization
        );
    }
    let r = run_native("least-utilization", &day);
    clean(&r);
    assert_eq!(
        (r.seconds_over_80, r.seconds_over_100),
        (0, 0),
        "{:?}",
        r.peak_utilization
    );
    let peaks: Vec<f64> = r.peak_utilization.values().copied().collect();
    let (lo, hi) = peaks
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &p| (lo.min(p), hi.max(p)));
    assert!(hi < 0.8 && hi - lo < 0.15, "{peaks:?}");
    // It did so by putting fewer tunnels on the small segws, on purpose.
    assert!(r.max_over_mean > 1.2, "{}", r.max_over_mean);
}

/// Per event, every moved tunnel's time in the dark as the peers' timers
/// set it (the lab's strongSwan by default: DPD 5 s, segws' 30 s, a request
/// given up after 1 + 1.8 + 3.24 s, 0.1 s to set up again).
#[test]
fn moved_tunnels_are_dark_as_long_as_the_peers_timers_say() {
    let events = "[[event]]\nstep = 1\nfail = \"b\"\n[[event]]\nstep = 2\nrecover = \"b\"\n\
                  [[event]]\nstep = 3\nswap = { rebalance = true }\n";
    let busy = with_traffic(5, "1 Mbps", events);
    let r = run_native("round-robin", &busy);
    clean(&r);
    let moved = r.moved_per_event.clone();
    assert_eq!(moved[0], 4);
    assert!(moved[2] > 0, "{moved:?}");
    // Off the dead segw: DPD 5 s after the last packet it received, then
    // 6.04 s of retransmissions, then 0.1 s to set up: 11.14 s each.
    assert_eq!(r.outage_p50_per_event[0], 11.1);
    assert_eq!(r.outage_p95_per_event[0], 11.1);
    assert_eq!(r.outage_seconds_per_event[0], 44.6);
    // Nothing moved at the recovery: nothing dark.
    assert_eq!(r.outage_seconds_per_event[1], 0.0);
    // Rebalanced off a live segw whose downlink keeps the initiator's DPD
    // quiet until the old segw's own DPD gives up (30 + 6.04 s): 47.18 s.
    assert_eq!(r.outage_p95_per_event[2], 47.2);
    let each = r.outage_seconds_per_event[2] / moved[2] as f64;
    assert!((each - 47.18).abs() < 0.05, "{each}");
    // Where inbound ESP does not defer DPD, as after a failure.
    let mut quiet = busy.clone();
    quiet.peers.inbound_suppresses_dpd = false;
    let q = run_native("round-robin", &quiet);
    assert_eq!(q.moved_per_event, moved);
    assert_eq!(q.outage_p95_per_event[2], 11.1);
    // With dpd_action = clear nobody comes back.
    let mut clear = busy.clone();
    clear.peers.restart = false;
    let c = run_native("round-robin", &clear);
    assert_eq!(c.never_back_per_event, [4, 0, moved[2]]);
    assert_eq!(c.outage_seconds_per_event, [0.0, 0.0, 0.0]);
    // Idle tunnels (one packet a 10 s step: DPD runs between them) were
    // somewhere in their DPD cycle: 6.14 to 11.14 s, spread.
    let idle = run_native("round-robin", &small(5, events));
    assert_eq!(idle.moved_per_event[0], 4);
    let (p50, p95) = (idle.outage_p50_per_event[0], idle.outage_p95_per_event[0]);
    assert!((6.1..=11.2).contains(&p50) && (6.1..=11.2).contains(&p95));
    assert!(idle.outage_seconds_per_event[0] < 44.6);
}

#[test]
fn bad_peer_timers_are_named_in_the_error() {
    let bad = |peers: &str| {
        let text = format!(
            "step_secs = 10\nsteps = 1\n[[segw]]\nname = \"a\"\n[tunnels]\ncount = 1\n[peers]\n{peers}\n"
        );
        Scenario::parse(&text, "p.toml").unwrap_err().to_string()
    };
    let e = bad("dpd_delay = -1.0");
    assert!(
        e.starts_with("p.toml:8:") && e.contains("peers.dpd_delay"),
        "{e}"
    );
    let e = bad("dpd_action = \"hold\"");
    assert!(e.contains("peers.dpd_action") && e.contains("hold"), "{e}");
    let e = bad("retransmit_tries = 99");
    assert!(e.contains("peers.retransmit_tries"), "{e}");
    let e = bad("dpd = 5.0");
    assert!(e.contains("dpd"), "{e}");
    let e = bad("stack = \"racoon\"");
    assert!(e.contains("peers.stack") && e.contains("racoon"), "{e}");
    let e = bad("retransmit_limit = 10.0");
    assert!(
        e.contains("peers.retransmit_limit") && e.contains("libreswan"),
        "{e}"
    );
}

#[test]
fn libreswan_peers_take_its_retransmissions_and_its_defaults() {
    let timers = |peers: &str| {
        let text = format!(
            "step_secs = 10\nsteps = 1\n[[segw]]\nname = \"a\"\n[tunnels]\ncount = 1\n[peers]\n{peers}\n"
        );
        Scenario::parse(&text, "p.toml").unwrap().peers
    };
    let t = timers("stack = \"libreswan\"\nretransmit_limit = 10.0");
    assert_eq!(t.stack, crate::compare::outage::Stack::Libreswan);
    assert!((t.give_up() - 16.0).abs() < 1e-9, "{}", t.give_up());
    // Its defaults: interval 0.5 s, limit 60 s (given up at 64 s).
    let t = timers("stack = \"libreswan\"");
    assert!((t.give_up() - 64.0).abs() < 1e-9, "{}", t.give_up());
}

#[test]
fn graceful_moves_are_never_dark_and_cost_setups_at_the_pace() {
    // A graceful drain of a at step 1, a graceful rebalance at step 3; the
    // same without `graceful` beside it.
    let events = |graceful: bool| {
        format!(
            "[[event]]\nstep = 1\ndrain = \"a\"\ngraceful = {graceful}\n\
             [[event]]\nstep = 2\nundrain = \"a\"\n\
             [[event]]\nstep = 3\nweight = {{ segw = \"a\", to = 4 }}\n\
             [[event]]\nstep = 4\nswap = {{ rebalance = true }}\ngraceful = {graceful}\n"
        )
    };
    let scenario = |graceful: bool| {
        let mut s = small(6, &events(graceful));
        s.moves_per_second = 2.0;
        s
    };
    let graceful = run_native("weighted", &scenario(true));
    clean(&graceful);
    // a's 4 tunnels leave it, 2 a second: the step's first 2 seconds.
    assert_eq!(graceful.tunnels_over_time[0], [4, 4, 4]);
    assert_eq!(graceful.tunnels_over_time[1][0], 0);
    assert_eq!(graceful.moved_per_event[0], 4);
    assert_eq!(graceful.minimum_moved_per_event[0], 4);
    assert_eq!(graceful.graceful_moves_per_event[0], 4);
    assert_eq!(graceful.outage_seconds_per_event[0], 0.0);
    assert_eq!(graceful.outage_p95_per_event[0], 0.0);
    // Two a second, and a second's worth at the start: never more than
    // 2 new IKE SAs on one segw in a second.
    assert!(
        (1..=2).contains(&graceful.setups_per_second_peak_per_event[0]),
        "{:?}",
        graceful.setups_per_second_peak_per_event
    );
    // The rebalance onto a, now of weight 4: moved without a dark second.
    let rebalanced = graceful.moved_per_event[3];
    assert!(rebalanced > 0);
    assert_eq!(graceful.graceful_moves_per_event[3], rebalanced);
    assert_eq!(graceful.outage_seconds_per_event[3], 0.0);

    let broken = run_native("weighted", &scenario(false));
    clean(&broken);
    // A plain drain moves nothing; a plain rebalance darkens what it moves.
    assert_eq!(broken.moved_per_event[0], 0);
    assert_eq!(broken.graceful_moves_per_event, [0, 0, 0, 0]);
    assert!(broken.moved_per_event[3] > 0);
    assert!(
        broken.outage_p95_per_event[3] > 5.0,
        "{:?}",
        broken.outage_p95_per_event
    );
}

#[test]
fn graceful_is_refused_where_nothing_moves_gracefully() {
    for event in [
        "fail = \"a\"",
        "swap = { rebalance = false }",
        "undrain = \"a\"",
    ] {
        let t = format!(
            "name = \"x\"\nstep_secs = 10\nsteps = 3\n[[segw]]\nname = \"a\"\n[[segw]]\nname = \"b\"\n\
             [tunnels]\ncount = 4\n[[event]]\nstep = 1\n{event}\ngraceful = true\n"
        );
        let e = Scenario::parse(&t, "x.toml").unwrap_err().to_string();
        assert!(
            e.contains("event[1].graceful") && e.contains("only a drain or a swap with rebalance"),
            "{e}"
        );
    }
}

/// `small` with `[pair]` and a `balancer_fail` at step 1.
fn failover(steps: u32, pair: &str, events: &str) -> Scenario {
    small(
        steps,
        &format!("[pair]\n{pair}\n[[event]]\nstep = 1\nbalancer_fail = {{}}\n{events}"),
    )
}

#[test]
fn with_no_replication_lag_a_failover_moves_nothing_and_darkens_each_tunnel_for_the_detection() {
    let s = failover(3, "replication_lag_ms = 0\ndetection_ms = 800", "");
    for policy in native::SHIPPED {
        let r = run_native(policy, &s);
        clean(&r);
        let f = &r.failovers[0];
        assert_eq!(
            (f.event, f.tunnels, f.kept, f.replaced, f.moved),
            (0, 12, 12, 0, 0),
            "{policy}"
        );
        assert_eq!(r.moved_per_event, [0], "{policy}");
        assert_eq!(r.minimum_moved_per_event, [0], "{policy}");
        // The standby knew every tunnel: its policy was never asked.
        assert_eq!(r.decisions, 12, "{policy}");
        assert_eq!((f.dark_seconds, f.dark_p95, f.dark_max), (9.6, 0.8, 0.8));
        assert_eq!(r.outage_seconds_per_event, [9.6], "{policy}");
        assert_eq!(r.tunnels_over_time[0], r.tunnels_over_time[2], "{policy}");
    }
}

/// The 12 tunnels of `small` open in step 0, spread over its 10 s at the
/// middles of twelfths: the last two 1.25 s and 0.42 s before the failure
/// at step 1, the one before them 2.08 s. A lag of 1.5 s covers exactly
/// the last two.
#[test]
fn a_lag_covering_the_last_two_openings_re_places_exactly_those_two() {
    let s = failover(3, "replication_lag_ms = 1500", "");
    let out = sim::run(
        &s,
        1,
        &mut || native::shipped("round-robin", &[]).unwrap(),
        &mut |_| {},
    );
    // The active's round-robin placed them a, b, c in turn, so the last
    // two (10 and 11) on b and c. The standby's own round-robin starts its
    // turn afresh: a, then b. Both move; the ten it knew stay.
    let before: Vec<Option<usize>> = (0..12).map(|j| Some(j % 3)).collect();
    let mut after = before.clone();
    after[10] = Some(0);
    after[11] = Some(1);
    assert_eq!(out.placements, after);
    let r = PolicyRun::of(
        &s,
        Options {
            seed: 1,
            timing: false,
        },
        out,
    );
    clean(&r);
    let f = &r.failovers[0];
    assert_eq!((f.tunnels, f.kept, f.replaced, f.moved), (12, 10, 2, 2));
    assert_eq!(r.moved_per_event, [2]);
    assert_eq!(r.tunnels_over_time[1], [5, 4, 3]);
    assert_eq!(r.decisions, 12 + 2);
    // Ten tunnels dark for the detection (1 s by default); the two moved
    // off a live segw then until their DPD gave up (idle tunnels: 6 to
    // 11 s into their cycle) and they set up again.
    assert_eq!(f.dark_p95, f.dark_max);
    assert!((7.1..=12.2).contains(&f.dark_max), "{}", f.dark_max);
    assert!(f.dark_seconds > 10.0 + 2.0 * 7.1, "{}", f.dark_seconds);
    // Three tunnels within 2.5 s: the last three, which the active had
    // placed on a, b and c, and the standby's fresh turn too. None moves.
    let r = run_native("round-robin", &failover(3, "replication_lag_ms = 2500", ""));
    let f = &r.failovers[0];
    assert_eq!((f.kept, f.replaced, f.moved), (9, 3, 0));
}

/// A consistent hash gives every balancer the same answer for the same
/// key, but the standby does not see the key the tunnel opened with: it
/// sees an ESP packet from the port the tunnel floated to (4500), and the
/// hash of that endpoint is of another slot. So the re-placed tunnels land
/// where the ESP endpoint hashes, not where they were.
#[test]
fn a_consistent_hash_places_an_unknown_tunnel_by_the_endpoint_the_standby_sees_not_the_opening() {
    use crate::policy::{Gateway, Load, Opener, TunnelKey};
    use sim::{run_with, Arrivals, GivenPeer};
    let given: Vec<GivenPeer> = (1..=12u8)
        .map(|n| GivenPeer {
            step: 0,
            addr: std::net::Ipv4Addr::new(10, 1, 0, n).into(),
            ike_port: 500,
            natt_port: Some(4500),
            ike_spi: 0x1100 + u64::from(n),
            ends: None,
        })
        .collect();
    // A lag of the whole step: the standby knows none of them.
    let s = failover(3, "replication_lag_ms = 10000", "");
    let out = run_with(
        &s,
        Arrivals::Given(&given),
        &mut || native::shipped("consistent-hash", &[]).unwrap(),
        &mut |_| {},
    );
    // What consistent-hash answers for a port (ids 1..=3 are a, b, c).
    let mut policy = native::shipped("consistent-hash", &[]).unwrap();
    let set: Vec<Gateway> = ["a", "b", "c"]
        .iter()
        .zip(1..)
        .map(|(name, id)| Gateway::new(id, *name, 1))
        .collect();
    policy.set_gateways(&set).unwrap();
    let mut hashed = |p: &GivenPeer, port: u16| {
        let key = TunnelKey {
            peer: p.addr,
            peer_port: port,
            vip: crate::workload::vip_for(p.addr),
            ike_spi: None,
            opened_by: Opener::NatT,
        };
        let id = policy.choose(&key, &Load::default()).unwrap().unwrap();
        Some(id as usize - 1)
    };
    let opened: Vec<Option<usize>> = given.iter().map(|p| hashed(p, 500)).collect();
    let floated: Vec<Option<usize>> = given.iter().map(|p| hashed(p, 4500)).collect();
    assert_eq!(out.placements, floated);
    let takeover = out.takeovers[0].clone().unwrap();
    let moved = opened.iter().zip(&floated).filter(|(a, b)| a != b).count();
    assert_eq!((takeover.replaced, takeover.moved), (12, moved as u64));
    assert!(
        moved > 0,
        "every port hashed to the same segw: pick other peers"
    );
}

#[test]
fn a_failed_balancer_back_as_standby_moves_nothing_and_the_pair_fails_over_again() {
    let s = failover(
        5,
        "replication_lag_ms = 0",
        "[[event]]\nstep = 2\nbalancer_recover = {}\n\
         [[event]]\nstep = 3\nbalancer_fail = { how = \"uplink\" }\n",
    );
    let r = run_native("least-tunnels", &s);
    clean(&r);
    assert_eq!(r.moved_per_event, [0, 0, 0]);
    assert_eq!(r.outage_seconds_per_event, [12.0, 0.0, 12.0]);
    let events: Vec<usize> = r.failovers.iter().map(|f| f.event).collect();
    assert_eq!(events, [0, 2]);
    assert_eq!(r.events[1], "step 2: failed balancer back as standby");
    assert_eq!(r.events[2], "step 3: active balancer's uplink down");
    assert!(r.tunnels_over_time.windows(2).all(|w| w[0] == w[1]));
    // The terminal and the page say so, per failover.
    let runs = [r];
    let table = Table {
        scenario: &s,
        seed: 1,
        runs: &runs,
    }
    .to_string();
    assert!(
        table.contains(
            "least-tunnels      [1] 12 / 0 / 0, 0.2 (1.0 s)  [3] 12 / 0 / 0, 0.2 (1.0 s)"
        ),
        "{table}"
    );
    let page = report::html(&s, 1, &runs);
    assert!(page.contains("<h3>Balancer failover</h3>"), "{page}");
    assert!(page.contains("<td>12 kept, 0 re-placed, 0 moved; 0.2 min dark (p95 1.0 s)</td>"));
}

/// The built-in failover scenario without churn: a burst of 20,000
/// openings over step 3 (2,000 a second) leaves the last 10 within the
/// default 5 ms lag of the kill at step 4; at the uplink failure at step 8
/// nothing has opened for steps, and nothing is placed again.
#[test]
fn the_failover_scenario_re_places_the_burst_s_last_openings_only() {
    let mut s = Scenario::resolve(std::path::Path::new("failover")).unwrap();
    assert_eq!(s.pair, scenario::Pair::default());
    s.tunnels.count = 1_000;
    s.tunnels.churn = 0.0;
    let r = run_native("weighted", &s);
    clean(&r);
    let counts: Vec<(u64, u64, u64)> = (r.failovers.iter())
        .map(|f| (f.tunnels, f.kept, f.replaced))
        .collect();
    assert_eq!(counts, [(21_000, 20_990, 10), (21_000, 21_000, 0)]);
    assert_eq!(r.failovers[1].moved, 0);
    assert!(r.failovers[0].moved <= 10);
}
