//! The worker never stalls: its turns (the busy time of one turn of its
//! loop, in its own CPU time: what it makes frames wait, whatever else the
//! machine runs) stay under a millisecond under what used to stall it, at a
//! million tunnels:
//!
//! - `ctl status` listing tunnels (it walked and sorted the whole table);
//! - a rebalance (it re-placed every tunnel in one go; what remains over a
//!   millisecond is pushing the set to the policy, a single policy call);
//! - a policy that runs to its deadline on every call (each new tunnel
//!   held the worker for the whole call budget);
//! - a flood of new sources (a batch of new tunnels, each a policy call).
//!
//! These run the real `Worker` loop on in-memory ports, one test at a time,
//! in a debug build of our crate on a shared VM: a vCPU the host takes away
//! for a moment shows up in the thread's CPU time too (here, ~0.1% of turns
//! get 1–4 ms that way). So each asserts that 99% of turns are under a
//! millisecond ([`calm`]) and that none reaches 5 ms, where the stalls were 0.1–3 s (status, rebalance), 20 ms per new
//! tunnel (a slow policy) and 34 ms (a flood, as the table grew). Release
//! figures: the closing note of issue 18.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use common::{component, policy_wat, CONTRACT_WIT, OK};
use segwlb::balancer::affinity::Timeouts;
use segwlb::balancer::farm::{port_mac, segw_mac};
use segwlb::balancer::{Balancer, Config, GatewaySpec, PortId, UPLINK};
use segwlb::control::status::{PolicyRecord, Status};
use segwlb::dataplane::{Clock, Command, Worker};
use segwlb::io::memory;
use segwlb::io::xdp::FastPath;
use segwlb::io::Received;
use segwlb::lab::netns::{self, Netns};
use segwlb::packet::craft::{esp_body, frame, ike_body, ip_packet, udp_packet};
use segwlb::packet::ike::IKE_SA_INIT;
use segwlb::packet::{IkeHeader, Mac};
use segwlb::policy::wasm::{Limits, Runtime};
use segwlb::policy::{native, Policy};
use segwlb::time::Timestamp;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 2, 2, 1);
const ROUTER: Mac = [2, 0xaa, 0, 0, 0, 1];
const MILLION: u32 = 1_000_000;
/// The bound on a turn that is not a single policy call.
const ONE_MS: Duration = Duration::from_millis(1);

/// Where the worker's clock starts (see `Clock`): the tunnels are opened
/// then, so that they are new when it runs.
const START: Timestamp = Timestamp::from_duration(Clock::HISTORY);

/// One at a time: each fills a core and most of a gigabyte.
static SERIAL: Mutex<()> = Mutex::new(());

fn peer(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn sa_init(i: u32) -> Vec<u8> {
    let h = IkeHeader {
        initiator_spi: u64::from(i) + 1,
        responder_spi: 0,
        exchange: IKE_SA_INIT,
        from_initiator: true,
        response: false,
        message_id: 0,
    };
    let ip = udp_packet(peer(i), 500, IpAddr::V4(VIP), 500, &ike_body(&h, false, 0));
    frame(port_mac(UPLINK), ROUTER, None, &ip)
}

/// ESP in UDP from a source nobody has seen: a new tunnel.
fn esp_from_new_source(i: u32) -> Vec<u8> {
    let from = IpAddr::V4(Ipv4Addr::from(0xcb00_0000 + i));
    let ip = udp_packet(from, 4500, IpAddr::V4(VIP), 4500, &esp_body(i, 1, 100));
    frame(port_mac(UPLINK), ROUTER, None, &ip)
}

/// Three segws and `tunnels` tunnels opened through the core (one
/// IKE_SA_INIT each, all at the start of time), placed by `policy`.
fn balancer(policy: Box<dyn Policy>, tunnels: u32) -> Balancer {
    let config = Config {
        port_macs: (0..=3).map(port_mac).collect(),
        proxy: vec!["10.2.2.1/32".parse().unwrap()],
        proxy_gateways: vec!["10.0.0.0/8".parse().unwrap()],
        max_tunnels: 1_300_000,
        // Nothing expires while a test runs.
        timeouts: Timeouts {
            half_open: Duration::from_secs(3600),
            ..Timeouts::default()
        },
    };
    let mut lb = Balancer::new(config, policy);
    for n in 1..=3u8 {
        let spec = GatewaySpec {
            name: format!("segw{n}"),
            port: PortId::from(n),
            mac: Some(segw_mac(n)),
            weight: 1,
            ..Default::default()
        };
        lb.add_gateway(spec, START).unwrap();
    }
    // As `segwlb run` does: the table never grows under traffic.
    lb.reserve_table();
    for i in 0..tunnels {
        lb.handle(&mut sa_init(i), UPLINK, START);
    }
    assert_eq!(lb.table().len(), tunnels as usize);
    lb
}

/// The worker loop on its own thread, as `segwlb run` has it.
struct Running {
    frames: Sender<Received>,
    commands: Sender<Command>,
    out: Receiver<(PortId, Vec<u8>)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    fn start(lb: Balancer) -> Self {
        Self::start_with(lb, None)
    }

    /// With the XDP fast path on the interfaces named as the memory ports
    /// (if0 .. if3), which the caller's namespace must have.
    fn start_with(lb: Balancer, fast: Option<FastPath>) -> Self {
        let (out_tx, out) = unbounded();
        let ports = memory::ports(3, &out_tx);
        let record = PolicyRecord {
            name: "test".into(),
            ..Default::default()
        };
        let mut worker = Worker::new(lb, ports, vec![VIP.into()], None, record, Clock::start());
        if let Some(path) = fast {
            worker.use_fast_path(path);
        }
        let (frames, frames_rx) = bounded(4096);
        let (commands, commands_rx) = unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                worker.run(frames_rx, commands_rx, &stop);
            })
        };
        Running {
            frames,
            commands,
            out,
            stop,
            thread: Some(thread),
        }
    }

    fn status(&self, tunnels: usize) -> Status {
        let (reply, answer) = bounded(1);
        self.commands
            .send(Command::Status {
                tunnels,
                top: 0,
                reply,
            })
            .unwrap();
        answer
            .recv_timeout(Duration::from_secs(120))
            .unwrap()
            .finish()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn longest(s: &Status) -> Duration {
    Duration::from_secs_f64(s.worker.longest_pause_us / 1e6)
}

/// 99% of the worker's turns under a millisecond, and none of 5 ms, in
/// its CPU time; on the wall clock (which also sees a call that blocks),
/// 98% under a millisecond and none of 50 ms: the OS lends the core to
/// others now and then (the test's own threads among them).
fn calm(s: &Status) {
    let w = &s.worker;
    assert!(
        w.pauses_over_1ms <= (w.turns / 100).max(1),
        "{} of {} turns of a millisecond or more",
        w.pauses_over_1ms,
        w.turns
    );
    assert!(longest(s) < 5 * ONE_MS, "longest turn {:?}", longest(s));
    wall_calm(s, 0);
}

/// On the wall clock: at most 2% of turns (and `extra` more) of a
/// millisecond or more, none of 50 ms.
fn wall_calm(s: &Status, extra: u64) {
    let w = &s.worker;
    assert!(
        w.wall_pauses_over_1ms <= (w.turns / 50).max(3) + extra,
        "{} of {} turns of a millisecond or more on the wall clock",
        w.wall_pauses_over_1ms,
        w.turns
    );
    let wall = Duration::from_secs_f64(w.longest_pause_wall_us / 1e6);
    assert!(
        wall < 50 * ONE_MS,
        "longest turn on the wall clock {wall:?}"
    );
}

#[test]
fn ctl_status_at_a_million_tunnels_lists_the_oldest_without_a_long_turn() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let lb = balancer(native::shipped("round-robin", &[]).unwrap(), MILLION);
    let w = Running::start(lb);
    let started = Instant::now();
    let s = w.status(5);
    let took = started.elapsed();
    // Round-robin placed tunnel i on segw (i mod 3) + 1, all at once:
    // oldest first, then by address, each segw's first five.
    for (g, gw) in s.gateways.iter().enumerate() {
        let listed: Vec<&str> = gw.tunnel_list.iter().map(|t| t.remote.as_str()).collect();
        let want: Vec<String> = (0..5u32)
            .map(|k| format!("{}:500", peer(3 * k + g as u32)))
            .collect();
        assert_eq!(listed, want, "{}", gw.name);
        assert!(gw.tunnels > 333_000);
    }
    let s = w.status(0);
    eprintln!(
        "status of 1M tunnels: {took:?}, {} turns, longest {:.0} µs ({:.0} µs wall)",
        s.worker.turns, s.worker.longest_pause_us, s.worker.longest_pause_wall_us
    );
    calm(&s);
    assert!(
        s.worker.turns > 10,
        "the walk took {} turns",
        s.worker.turns
    );
}

#[test]
fn a_rebalance_at_a_million_tunnels_moves_them_without_a_long_turn() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = Runtime::new().unwrap();
    let hash = runtime
        .load(&common::shipped("consistent-hash"), &[], Limits::default())
        .expect("policies/consistent-hash.wasm (built by cargo build)");
    let lb = balancer(native::shipped("round-robin", &[]).unwrap(), MILLION);
    let w = Running::start(lb);
    let (reply, answer) = bounded(1);
    let started = Instant::now();
    w.commands
        .send(Command::UsePolicy {
            policy: Box::new(hash.serve().unwrap()),
            rebalance: true,
            graceful: false,
            noticed: Instant::now(),
            reply,
        })
        .unwrap();
    // Frames keep flowing meanwhile: a tunnel of the table, and new ones.
    for i in 0..200u32 {
        w.frames
            .send(Received {
                port: UPLINK,
                frame: sa_init(i * 1000),
            })
            .unwrap();
        w.frames
            .send(Received {
                port: UPLINK,
                frame: esp_from_new_source(i),
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let said = answer
        .recv_timeout(Duration::from_secs(300))
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    // Consistent hashing over 3 segws keeps about a third where
    // round-robin put it.
    let moved: u64 = said
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap();
    assert!(moved > 500_000 && moved < 800_000, "{said}");
    let ipv4 = |f: &[u8]| f[12..14] == [0x08, 0x00];
    let to_segws = w.out.try_iter().filter(|(p, f)| *p != UPLINK && ipv4(f));
    assert_eq!(to_segws.count(), 400, "every frame meanwhile forwarded");
    let s = w.status(0);
    eprintln!(
        "rebalance of 1M tunnels: {took:?} ({moved} moved), {} turns, longest {:.0} µs ({:.0} µs wall)",
        s.worker.turns, s.worker.longest_pause_us, s.worker.longest_pause_wall_us
    );
    assert_eq!(s.counters.moved, moved);
    // Re-placing is calm. The swap and the end of the rebalance each push
    // the set to the policy: one call, in which consistent-hash builds its
    // Maglev table (a few ms here).
    let w = &s.worker;
    assert!(
        w.pauses_over_1ms <= (w.turns / 100).max(1) + 2,
        "{} of {} turns of a millisecond or more",
        w.pauses_over_1ms,
        w.turns
    );
    assert!(
        longest(&s) < Duration::from_millis(50),
        "longest turn {:?}",
        longest(&s)
    );
    wall_calm(&s, 2);
}

#[test]
fn a_policy_that_runs_to_its_deadline_costs_one_deadline_per_breaker_period() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = Runtime::new().unwrap();
    let spin = component(
        CONTRACT_WIT,
        &policy_wat(OK, "(loop $spin (br $spin)) (unreachable)"),
    );
    let limits = Limits {
        call: Duration::from_millis(20),
        setup: Duration::from_millis(200),
        memory: 1 << 20,
    };
    let slow = runtime
        .load_bytes(Path::new("spin.wasm"), &spin, &[], limits)
        .unwrap();
    let lb = balancer(Box::new(slow.instantiate()), 0);
    let w = Running::start(lb);
    // A new tunnel every millisecond for 2.5 s, each a call that would run
    // its 20 ms: without a breaker the worker would need 50 s for them.
    let started = Instant::now();
    let n = 2500u32;
    for i in 0..n {
        w.frames
            .send(Received {
                port: UPLINK,
                frame: esp_from_new_source(i),
            })
            .unwrap();
        std::thread::sleep(Duration::from_micros(1000));
    }
    let s = loop {
        let s = w.status(0);
        if s.counters.forwarded == u64::from(n) || started.elapsed() > Duration::from_secs(60) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    let f = &s.policy.fallbacks_by_reason;
    let long_turns = s
        .worker
        .histogram
        .iter()
        .find(|(bound, _)| bound.is_some_and(|us| us >= 1024.0))
        .map(|&(_, under)| s.worker.turns - under)
        .unwrap();
    eprintln!(
        "{n} new tunnels in {took:?}: {} timeouts, {} breaker_open; {long_turns} turns of 1 ms or more",
        f["timeout"], f["breaker_open"]
    );
    assert_eq!(s.counters.forwarded, u64::from(n), "every tunnel placed");
    // Asked at the start, then once after 1 s and after 3 s (the period
    // doubles): at most three deadlines in the ~3 s this takes.
    assert!(f["timeout"] <= 3, "{f:?}");
    assert!(f["breaker_open"] >= u64::from(n) - 3, "{f:?}");
    // Each deadline is a long turn, and so may be the call after it, which
    // restarts the instance (a single policy call too); little else.
    assert!(
        long_turns <= 2 * f["timeout"] + 1,
        "{long_turns} turns of a millisecond or more"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn a_flood_of_new_sources_does_not_hold_the_worker() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = Runtime::new().unwrap();
    let rr = runtime
        .load(&common::shipped("round-robin"), &[], Limits::default())
        .expect("policies/round-robin.wasm (built by cargo build)");
    // A million tunnels there already (the table's memory in use, as in
    // steady state), then new ones go by the wasm policy.
    let mut lb = balancer(native::shipped("round-robin", &[]).unwrap(), MILLION);
    lb.replace_policy(Box::new(rr.serve().unwrap()), false, START);
    let w = Running::start(lb);
    // As fast as the channel takes them: every frame a new tunnel, a
    // wasm policy call each.
    let n = 200_000u32;
    let sender = {
        let frames = w.frames.clone();
        std::thread::spawn(move || {
            for i in 0..n {
                frames
                    .send(Received {
                        port: UPLINK,
                        frame: esp_from_new_source(i),
                    })
                    .unwrap();
            }
        })
    };
    sender.join().unwrap();
    let started = Instant::now();
    let s = loop {
        let s = w.status(0);
        if s.counters.placed == u64::from(MILLION + n)
            || started.elapsed() > Duration::from_secs(120)
        {
            break s;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!(
        "{n} new sources: {} turns, longest {:.0} µs ({:.0} µs wall), 99.9% under {:.0} µs",
        s.worker.turns,
        s.worker.longest_pause_us,
        s.worker.longest_pause_wall_us,
        s.worker.p999_pause_us
    );
    assert_eq!(s.counters.placed, u64::from(MILLION + n));
    calm(&s);
}

/// Each of `tunnels` tunnels confirmed too: its segw's ESP to the peer
/// (the fast path carries only what a segw confirmed).
fn confirmed(tunnels: u32) -> Balancer {
    let mut lb = balancer(native::shipped("round-robin", &[]).unwrap(), tunnels);
    for i in 0..tunnels {
        // Round-robin placed tunnel i on segw (i mod 3) + 1.
        let gw = (i % 3 + 1) as u8;
        let ip = ip_packet(IpAddr::V4(VIP), peer(i), 50, &esp_body(i + 1, 1, 60), 1);
        let mut f = frame(port_mac(PortId::from(gw)), segw_mac(gw), None, &ip);
        lb.handle(&mut f, PortId::from(gw), START);
    }
    lb
}

impl Running {
    /// Status once no full resync of the fast path is under way: twice in
    /// a row (a status is answered before the turn's fast-path work, which
    /// may only then begin a resync).
    fn settled(&self) -> Status {
        let started = Instant::now();
        let mut calm = false;
        loop {
            let s = self.status(0);
            if !s.worker.fast_path_resyncing && calm {
                return s;
            }
            calm = !s.worker.fast_path_resyncing;
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "never settled"
            );
            // A status is a turn of its own (a few ms in a debug build at a
            // million tunnels): asked as often as a watchful operator would.
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn ask(&self, command: impl FnOnce(Sender<segwlb::dataplane::Reply>) -> Command) -> String {
        let (reply, answer) = bounded(1);
        self.commands.send(command(reply)).unwrap();
        answer
            .recv_timeout(Duration::from_secs(300))
            .unwrap()
            .unwrap()
    }
}

/// With the XDP fast path on (its program on veths of a namespace of this
/// test's own), a million confirmed tunnels: its first sync (4M map
/// entries), a weight change, a segw removed, `status --tunnels 1000000`,
/// a metrics scrape and a rebalance each leave every turn that is not a
/// single policy call short, on the CPU and on the wall clock. A full
/// resync was one turn of seconds at this size.
#[test]
fn with_the_fast_path_a_million_tunnels_change_without_a_long_turn() {
    if !common::xdp_can_run("the fast-path stall test") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let lb = confirmed(MILLION);
    let ns = Netns::new(&netns::unique_prefix("ws")).unwrap();
    for n in 0..=3 {
        netns::veth(&ns, &format!("if{n}"), &ns, &format!("jf{n}")).unwrap();
        for name in [format!("if{n}"), format!("jf{n}")] {
            ns.ip(&["link", "set", &name, "up"]).unwrap();
        }
    }
    let report = ns
        .enter(move || {
            let path = FastPath::load(1_300_000, false).unwrap();
            let w = Running::start_with(lb, Some(path));
            let mut report = Vec::new();
            let mut step = |w: &Running, what: &str, started: Instant| {
                let s = w.settled();
                report.push(format!(
                    "{what}: {:?}, {} entries, {} turns so far, longest {:.0} µs ({:.0} µs wall)",
                    started.elapsed(),
                    s.worker.fast_path_entries,
                    s.worker.turns,
                    s.worker.longest_pause_us,
                    s.worker.longest_pause_wall_us
                ));
                s
            };
            let s = step(&w, "first sync", Instant::now());
            // Each tunnel: its endpoint (port 500) and its address, each way.
            assert_eq!(s.worker.fast_path_entries, 4 * u64::from(MILLION));
            let t = Instant::now();
            w.ask(|reply| Command::Weight {
                name: "segw2".into(),
                weight: 3,
                reply,
            });
            let s = step(&w, "weight change", t);
            assert_eq!(s.worker.fast_path_entries, 4 * u64::from(MILLION));
            let t = Instant::now();
            w.ask(|reply| Command::RemoveGateway {
                name: "segw1".into(),
                reply,
            });
            let s = step(&w, "segw1 removed", t);
            let left = 4 * u64::from(MILLION - MILLION.div_ceil(3));
            assert_eq!(s.worker.fast_path_entries, left);
            let t = Instant::now();
            let listed = w.status(1_000_000);
            assert!(listed.gateways.iter().all(|g| !g.tunnel_list.is_empty()));
            step(&w, "status --tunnels 1000000", t);
            let t = Instant::now();
            for _ in 0..5 {
                w.status(0); // what a metrics scrape asks
            }
            step(&w, "5 scrapes", t);
            let runtime = Runtime::new().unwrap();
            let hash = runtime
                .load(&common::shipped("consistent-hash"), &[], Limits::default())
                .unwrap();
            let t = Instant::now();
            w.ask(|reply| Command::UsePolicy {
                policy: Box::new(hash.serve().unwrap()),
                rebalance: true,
                graceful: false,
                noticed: Instant::now(),
                reply,
            });
            let s = step(&w, "rebalance", t);
            // Resync turns keep to their half-millisecond slice. The turns
            // the timers run in (the sweep, the tunnels' rates, a slice of
            // the counters: every 6 ms, so one turn in ten or so while a
            // resync keeps the worker busy) take 1-4 ms in a debug build
            // at a million tunnels, and the set pushed to a policy (single
            // calls) more; a whole resync was one turn of 20 s here.
            let c = &s.worker;
            eprintln!(
                "{}\nturns by bound (µs, shorter): {:?}",
                report.join("\n"),
                c.histogram
            );
            assert!(
                c.pauses_over_1ms <= c.turns / 6,
                "{} of {} turns of a millisecond or more\n{}",
                c.pauses_over_1ms,
                c.turns,
                report.join("\n")
            );
            let over_8ms = c.turns
                - c.histogram
                    .iter()
                    .find(|(bound, _)| bound.is_some_and(|us| us >= 8192.0))
                    .map_or(0, |&(_, under)| under);
            assert!(
                over_8ms <= 4,
                "{over_8ms} turns of 8 ms or more\n{}",
                report.join("\n")
            );
            assert!(
                longest(&s) < Duration::from_millis(50),
                "{}",
                report.join("\n")
            );
            let wall = Duration::from_secs_f64(c.longest_pause_wall_us / 1e6);
            assert!(
                wall < Duration::from_millis(100),
                "{wall:?} on the wall clock"
            );
            report.join("\n")
        })
        .unwrap();
    eprintln!("{report}");
}
