//! A pair of balancers (root): keepalived as the lab runs it, and the
//! failover of an active/standby pair of `segwlb run` on real strongSwan
//! tunnels.
//!
//! Without root (or without keepalived, or strongSwan) these tests say so
//! and pass, unless SEGWLB_REQUIRE_NETNS is set (CI sets it): then they
//! fail.

mod common;
#[path = "common/lab.rs"]
mod lab;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use lab::{can_run, Lab, SERIAL};
use segwlb::lab::netns::{self, Netns};
use segwlb::lab::probe::{Prober, Seen, PERIOD};
use segwlb::lab::topology::{BalancerFailure, State};
use segwlb::lab::vrrp::{self, Role};
use segwlb::lab::{initiate, report};

/// The last role keepalived announced in `dir`, and when.
fn last(dir: &Path) -> Option<(Role, SystemTime)> {
    vrrp::transitions(dir).last().map(|t| (t.to, t.at))
}

/// Wait until `done`, at most `within`; how long it took.
fn wait(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

/// When `dir`'s node last became `role`, after `since`: the time from
/// `since` to that transition.
fn became(dir: &Path, role: Role, since: SystemTime) -> Duration {
    let t = vrrp::transitions(dir)
        .into_iter()
        .rfind(|t| t.to == role && t.at >= since)
        .unwrap_or_else(|| panic!("{} never became {role}", dir.display()));
    t.at.duration_since(since).unwrap()
}

/// A process of the test's, stopped and reaped on drop (also while a
/// failed test unwinds).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// keepalived exactly as the lab configures it, on two namespaces with a
/// sync link and an uplink each; the balancers are stood in for by a file
/// (the check passes while it exists) and `echo` (told the role). Each
/// way a node fails: its check, its uplink, the whole node (every process
/// SIGKILLed). Each time the other takes over, once; a node that comes
/// back stays standby; and the roles told follow keepalived's.
#[test]
fn keepalived_elects_one_node_fails_over_once_and_never_back() {
    if !can_run(true) {
        return;
    }
    let prefix = netns::unique_prefix("vrrp");
    let files = tempfile::tempdir().unwrap();
    let sw = Netns::new(&format!("{prefix}-sw")).unwrap();
    let names = ["lb", "lb2"];
    let nodes: Vec<(Netns, vrrp::Node, std::path::PathBuf)> = names
        .iter()
        .zip([150, 100])
        .map(|(&name, priority)| {
            let ns = Netns::new(&format!("{prefix}-{name}")).unwrap();
            netns::veth(&ns, "uplink", &sw, name).unwrap();
            let dir = files.path().join(name);
            let serving = files.path().join(format!("{name}.serving"));
            std::fs::write(&serving, "").unwrap();
            let node = vrrp::Node {
                dir,
                sync: "sync".into(),
                address: ([10, 255, 0, 3].into(), 29),
                track: "uplink".into(),
                priority,
                check: format!("test -e \"{}\"", serving.display()),
                tell: "echo".into(),
            };
            node.write().unwrap();
            (ns, node, serving)
        })
        .collect();
    let (a, b) = (&nodes[0], &nodes[1]);
    netns::veth(&a.0, "sync", &b.0, "sync").unwrap();
    a.0.ip(&["addr", "add", "10.255.0.1/29", "dev", "sync"])
        .unwrap();
    b.0.ip(&["addr", "add", "10.255.0.2/29", "dev", "sync"])
        .unwrap();
    let start = |(ns, node, _): &(Netns, vrrp::Node, std::path::PathBuf)| {
        let log = std::fs::File::create(node.dir.join(vrrp::LOG)).unwrap();
        Reaped(
            node.command(ns)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let (da, db) = (&a.1.dir, &b.1.dir);
    let role = |dir: &Path| last(dir).map(|(r, _)| r);

    // Both start as backups: the higher priority is elected.
    let _a = start(a);
    let _b = start(b);
    let took = wait("an election", Duration::from_secs(5), || {
        role(da) == Some(Role::Active) && role(db) == Some(Role::Standby)
    });
    eprintln!("elected lb in {:.0} ms", took.as_secs_f64() * 1e3);

    // lb's balancer stops answering: lb faults, lb2 takes over.
    let t = SystemTime::now();
    std::fs::remove_file(&a.2).unwrap();
    wait(
        "lb2 taking over a failed check",
        Duration::from_secs(3),
        || role(db) == Some(Role::Active),
    );
    let (fault, active) = (became(da, Role::Fault, t), became(db, Role::Active, t));
    eprintln!(
        "a failed check: lb faulted after {:.0} ms, lb2 active after {:.0} ms",
        fault.as_secs_f64() * 1e3,
        active.as_secs_f64() * 1e3
    );
    assert!(active < Duration::from_millis(2_500), "{active:?}");

    // lb's balancer is back: lb is a backup, and stays one.
    std::fs::write(&a.2, "").unwrap();
    wait("lb back as a backup", Duration::from_secs(3), || {
        role(da) == Some(Role::Standby)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        (role(da), role(db)),
        (Some(Role::Standby), Some(Role::Active)),
        "a node that came back took over again"
    );

    // lb2's uplink goes down: lb takes over at once.
    let t = SystemTime::now();
    b.0.ip(&["link", "set", "uplink", "down"]).unwrap();
    wait(
        "lb taking over a lost uplink",
        Duration::from_secs(3),
        || role(da) == Some(Role::Active),
    );
    let active = became(da, Role::Active, t);
    eprintln!(
        "a lost uplink: lb2 faulted after {:.0} ms, lb active after {:.0} ms",
        became(db, Role::Fault, t).as_secs_f64() * 1e3,
        active.as_secs_f64() * 1e3
    );
    assert!(active < Duration::from_millis(1_000), "{active:?}");
    b.0.ip(&["link", "set", "uplink", "up"]).unwrap();
    wait("lb2 back as a backup", Duration::from_secs(3), || {
        role(db) == Some(Role::Standby)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        (role(da), role(db)),
        (Some(Role::Active), Some(Role::Standby))
    );

    // Each was told the last role keepalived announced (fault: standby).
    for (dir, told) in [(da, "active ok"), (db, "standby ok")] {
        let log = std::fs::read_to_string(dir.join(vrrp::TOLD)).unwrap();
        assert!(log.trim_end().ends_with(told), "{log}");
    }

    // lb dies whole (keepalived too): lb2 takes over once lb's adverts
    // stop, 3 adverts and the skew after the last one it heard (sent up to
    // an advert before the kill).
    let t = SystemTime::now();
    for pid in a.0.pids().unwrap() {
        // SAFETY: a process of the namespace this test made.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    wait(
        "lb2 taking over a dead node",
        Duration::from_secs(3),
        || role(db) == Some(Role::Active),
    );
    let active = became(db, Role::Active, t);
    let master_down = vrrp::ADVERT_INT * 3 + vrrp::ADVERT_INT * (256 - 100) / 256;
    eprintln!(
        "a dead node: lb2 active after {:.0} ms (master down interval {:.0} ms)",
        active.as_secs_f64() * 1e3,
        master_down.as_secs_f64() * 1e3
    );
    assert!(
        active >= master_down - vrrp::ADVERT_INT && active < Duration::from_millis(1_500),
        "{active:?}"
    );
}

/// Every tunnel's IKE SAs as the segws hold them (segw, initiator SPI),
/// by initiator: the same list before and after an event is a tunnel not
/// re-established (a new SA has a new SPI, and the old one lingers until
/// the segw's DPD clears it).
fn held(state: &State) -> Vec<Vec<(String, String)>> {
    let mut by_inner: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for s in &state.segws {
        for sa in state.list_sas(&s.dir).unwrap() {
            let inner = sa
                .children
                .iter()
                .flat_map(|c| &c.remote_ts)
                .find_map(|ts| ts.strip_suffix("/32"));
            if let (true, Some(inner)) = (sa.is_up(), inner) {
                by_inner
                    .entry(inner.to_string())
                    .or_default()
                    .push((s.name.clone(), sa.initiator_spi.clone()));
            }
        }
    }
    state
        .initiators
        .iter()
        .map(|i| by_inner.remove(&i.inner.to_string()).unwrap_or_default())
        .collect()
}

/// What the probes of one failover saw: probes lost per tunnel (those
/// sent from `since` on), and, for each tunnel that lost any across
/// `event` (its longest silence spans it), when it answered again, from
/// `event`. (A tunnel that lost none has a longest gap too, a period or
/// so, which may span the event by chance.)
fn failover(seen: &[Seen], since: SystemTime, event: Instant) -> (Vec<u32>, Vec<Duration>) {
    let lost: Vec<u32> = seen
        .iter()
        .map(|t| {
            let early = t.lost_at.iter().flatten().filter(|&&at| at < since).count() as u32;
            t.sent - t.replies - early
        })
        .collect();
    let back = seen
        .iter()
        .zip(&lost)
        .filter(|&(_, &n)| n > 0)
        .filter_map(|(t, _)| {
            let end = t.longest_gap_end?;
            (end > event && end - t.longest_gap < event).then(|| end - event)
        })
        .collect();
    (lost, back)
}

/// min / median / max.
fn spread<T: Ord + Copy>(mut v: Vec<T>) -> Option<(T, T, T)> {
    v.sort_unstable();
    Some((*v.first()?, v[v.len() / 2], *v.last()?))
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// Probes lost and takeover times of one failover, printed; the worst
/// tunnel's losses.
fn print_failover(what: &str, seen: &[Seen], since: SystemTime, event: Instant) -> u32 {
    let (lost, back) = failover(seen, since, event);
    let lossy = lost.iter().filter(|&&n| n > 0).count();
    let (lo, mid, hi) = spread(lost).expect("probed tunnels");
    eprintln!(
        "{what}: probes lost per tunnel min {lo} / median {mid} / max {hi} \
         ({lossy} of {} tunnels lost any; a probe every {})",
        seen.len(),
        ms(PERIOD)
    );
    match spread(back) {
        Some((first, median, last)) => eprintln!(
            "{what}: takeover, from the event to a tunnel's first probe answered again: \
             first {} / median {} / last {}",
            ms(first),
            ms(median),
            ms(last)
        ),
        None => eprintln!("{what}: no tunnel went dark"),
    }
    hi
}

/// When balancer `k`'s keepalived was announced master after `since`:
/// the election's part of a takeover.
fn elected(state: &State, k: usize, since: SystemTime) -> Duration {
    let dir = &state.balancers[k].vrrp.as_ref().expect("a pair").dir;
    became(dir, Role::Active, since)
}

/// The pair on real tunnels (issue 31): 300 strongSwan tunnels (60 behind
/// the NAT, 60 over IPv6, 50 to a charon), each probed 5 times a second.
/// (a) The active balancer (lb) is SIGKILLed: lb2 takes over. (b) lb starts
/// again (a standby: it takes lb2's table), then lb2's uplink goes down: lb
/// takes over back. Each time no tunnel is re-established (the same IKE SA,
/// by SPI, on the same segw), the new active's table agrees with the segws
/// tunnel by tunnel, every tunnel passes traffic afterwards, and a tunnel
/// loses only the probes sent while no balancer served (keepalived's
/// detection: its check every second for a dead balancer; at once for a
/// lost uplink). 10 tunnels open in the last second before the kill: the
/// new active serves them where they opened too.
#[test]
fn a_pair_fails_over_and_back_under_probes_and_reestablishes_no_tunnel() {
    if !can_run(true) {
        return;
    }
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let exe = Path::new(env!("CARGO_BIN_EXE_segwlb"));
    let mut lab = Lab::pair("f", "round-robin", &[1, 1, 1], 300, 60, 60);
    lab.up();
    let mut state = State::load(&lab.config.work_dir()).unwrap();
    assert_eq!(state.active().unwrap(), 0, "lab up makes the first active");
    let all: Vec<usize> = (0..300).collect();
    let (early, late) = all.split_at(290);
    for done in initiate::in_order(&state, early).unwrap() {
        done.result.unwrap();
    }

    // (a) lb dies, under probes. The last 10 tunnels open just before.
    let probes = Prober::start(&state, early).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let since = SystemTime::now();
    std::thread::sleep(Duration::from_secs(2));
    let lb2_before = state.balancers[1].status(0).unwrap().counters;
    let opening = Instant::now();
    for done in initiate::in_order(&state, late).unwrap() {
        done.result.unwrap();
    }
    let opened_within = opening.elapsed();
    let following = state.balancers[1].status(0).unwrap().pair.expect("a pair");
    let (kill_at, kill_wall) = (Instant::now(), SystemTime::now());
    assert_eq!(
        state.fail_active_balancer(BalancerFailure::Killed).unwrap(),
        0
    );
    // As they were: nothing re-establishes within a second.
    let before = held(&state);
    state.wait_active(1).unwrap();
    let serving = kill_at.elapsed();
    std::thread::sleep(Duration::from_secs(6).saturating_sub(kill_at.elapsed()));
    let seen = probes.stop().unwrap();
    eprintln!(
        "(a) lb killed: lb2 elected after {}, active and serving after {}; the 10 late \
         tunnels opened within {} before the kill, lb2 then {} frames and {:.1} ms behind",
        ms(elected(&state, 1, kill_wall)),
        ms(serving),
        ms(opened_within),
        following.lag_frames,
        following.lag_ms
    );
    let worst_a = print_failover("(a) lb killed", &seen, since, kill_at);
    let after = report::run(&state).unwrap();
    let lb2_after = state.balancer_status().unwrap().counters;
    eprintln!(
        "(a) lb2 since the kill: placed {}, taught {}, moved {}, conflicts {}",
        lb2_after.placed - lb2_before.placed,
        lb2_after.taught - lb2_before.taught,
        lb2_after.moved - lb2_before.moved,
        lb2_after.conflicts - lb2_before.conflicts,
    );
    assert_eq!(held(&state), before, "(a): tunnels re-established");
    assert!(before.iter().all(|h| h.len() == 1), "{before:?}");
    let s = &after.summary;
    assert_eq!((s.passing, s.agree), (300, 300), "(a): {s:?}");
    assert_eq!(after.balancer_moved, 0);
    // The late tunnels were in lb2's table when it took over: replicated
    // in time, nothing placed again.
    assert_eq!(
        (
            lb2_after.placed - lb2_before.placed,
            lb2_after.moved - lb2_before.moved
        ),
        (0, 0)
    );

    // (b) lb starts again and follows lb2; then lb2's uplink goes down.
    let following = state.recover_balancer(0, exe).unwrap();
    eprintln!(
        "(b) lb started again: a standby holding lb2's table after {}",
        ms(following)
    );
    let probes = Prober::start(&state, &all).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let since = SystemTime::now();
    std::thread::sleep(Duration::from_secs(2));
    let (down_at, down_wall) = (Instant::now(), SystemTime::now());
    assert_eq!(
        state
            .fail_active_balancer(BalancerFailure::UplinkDown)
            .unwrap(),
        1
    );
    state.wait_active(0).unwrap();
    let serving = down_at.elapsed();
    std::thread::sleep(Duration::from_secs(5).saturating_sub(down_at.elapsed()));
    let seen = probes.stop().unwrap();
    eprintln!(
        "(b) lb2's uplink down: lb elected after {}, active and serving after {}",
        ms(elected(&state, 0, down_wall)),
        ms(serving)
    );
    let worst_b = print_failover("(b) lb2's uplink down", &seen, since, down_at);
    state.recover_balancer(1, exe).unwrap();
    let back = report::run(&state).unwrap();
    assert_eq!(held(&state), before, "(b): tunnels re-established");
    let s = &back.summary;
    assert_eq!((s.passing, s.agree), (300, 300), "(b): {s:?}");
    assert_eq!(state.active().unwrap(), 0);

    // Lost only while no balancer served: a dead balancer is seen by the
    // check within its second, then the skew, the notify, the
    // announcements; a lost uplink at once.
    assert!(worst_a <= 10, "(a): a tunnel lost {worst_a} probes");
    assert!(worst_b <= 5, "(b): a tunnel lost {worst_b} probes");
    lab.down_and_check();
    eprintln!("the test took {:.0} s", started.elapsed().as_secs_f64());
}

/// `lab compare --scenario lab-failover` on a pair (issue 31): 24 tunnels;
/// the active balancer SIGKILLed, back as the standby, then the new
/// active's uplink down. The lab plays both failures for real and reports
/// them as the simulation predicts them: every tunnel kept where it was,
/// none placed again, none moved; each dark only while no balancer
/// served (a probe every 200 ms: at most keepalived's check interval and
/// the election).
#[test]
fn lab_compare_plays_a_pairs_failovers_as_the_simulation_predicts() {
    if !can_run(true) {
        return;
    }
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let lab = Lab::pair("fc", "round-robin", &[1, 1, 1], 1, 0, 0);
    let (_, runs) = lab.compare("lab-failover", "round-robin,consistent-hash");
    for r in &runs {
        let p = r["policy"].as_str().unwrap();
        let failovers = r["failovers"].as_array().unwrap();
        assert_eq!(failovers.len(), 2, "{p}: {failovers:?}");
        for f in failovers {
            assert_eq!(f["tunnels"], 24, "{p}: {f}");
            assert_eq!(f["kept"], 24, "{p}: {f}");
            assert_eq!(f["replaced"], 0, "{p}: {f}");
            assert_eq!(f["moved"], 0, "{p}: {f}");
            let max = f["dark_max"].as_f64().unwrap();
            assert!(max <= 2.0, "{p}: a tunnel dark for {max} s: {f}");
        }
    }
    lab::assert_nothing_left(&lab.config, &[]);
}
