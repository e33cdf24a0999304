//! What a standby costs its active, and how far behind it runs: an active
//! balancer's worker fed new tunnels at a fixed rate, once with no
//! standby and once with one following it over TCP (loopback), in one
//! program run. In-process: the worker loop of `segwlb run` on memory
//! ports, a thread playing the segws, the sync link's real threads.
//!
//!     cargo bench -p segwlb --bench pair
//!
//! Each new tunnel is three table changes on the active, as on the wire:
//! its IKE_SA_INIT (placed, half-open), its segw's answer (answered), its
//! segw's IKE_AUTH answer (established). The segw thread answers every
//! IKE_SA_INIT the worker forwards to it.
//!
//! Printed per run: tunnels opened and what the active's worker spent
//! (CPU time busy per second of run and per tunnel; its longest turn);
//! with the standby, the replication lag sampled every 20 ms from the
//! standby's status (from the active's send to the standby's apply, µs:
//! median, p99, max) and the standby's table against the active's at the
//! end. Then the cost as a ratio: busy with a standby / busy without.
//!
//! Environment: `SEGWLB_BENCH_RATE` (new tunnels/s, default 10000),
//! `SEGWLB_BENCH_SECS` (default 5).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use segwlb::balancer::farm::{self, port_mac, segw_mac};
use segwlb::balancer::replica::Source;
use segwlb::balancer::{Balancer, PortId, Verdict, UPLINK};
use segwlb::control::status::{PolicyRecord, Status};
use segwlb::dataplane::{Clock, Command, Worker};
use segwlb::io::{memory, Received};
use segwlb::packet::craft::{frame, ike_body, udp_packet};
use segwlb::packet::ike::{IKE_AUTH, IKE_SA_INIT};
use segwlb::packet::{self, IkeHeader, Mac, Payload};
use segwlb::pair::link::Link;
use segwlb::pair::{PairConfig, Role};
use segwlb::policy::native;
use segwlb::time::Timestamp;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 2, 2, 1);
const ROUTER: Mac = [2, 0xaa, 0, 0, 0, 1];
const SEGWS: u8 = 3;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peer(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn ike(spi: u64, exchange: u8, from_initiator: bool) -> IkeHeader {
    IkeHeader {
        initiator_spi: spi,
        responder_spi: if from_initiator { 0 } else { 0x77 },
        exchange,
        from_initiator,
        response: !from_initiator,
        message_id: u32::from(exchange != IKE_SA_INIT),
    }
}

fn sa_init(i: u32) -> Received {
    let ip = udp_packet(
        peer(i),
        500,
        IpAddr::V4(VIP),
        500,
        &ike_body(&ike(u64::from(i) + 1, IKE_SA_INIT, true), false, 200),
    );
    Received {
        port: UPLINK,
        frame: frame(port_mac(UPLINK), ROUTER, None, &ip),
    }
}

fn balancer() -> Balancer {
    let mut lb = farm::balancer(
        native::shipped("round-robin", &[]).expect("shipped"),
        SEGWS,
        vec!["10.0.0.0/8".parse().expect("a prefix")],
        2_000_000,
    );
    lb.reserve_table();
    lb
}

/// A worker loop on its own thread, as `segwlb run` has it.
struct Running {
    frames: Sender<Received>,
    commands: Sender<Command>,
    out: Receiver<(PortId, Vec<u8>)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    fn start(lb: Balancer, pair: Option<&PairConfig>) -> Self {
        let (out_tx, out) = unbounded();
        let record = PolicyRecord {
            name: "round-robin".into(),
            ..Default::default()
        };
        let ports = memory::ports(PortId::from(SEGWS), &out_tx);
        let mut worker = Worker::new(lb, ports, vec![VIP.into()], None, record, Clock::start());
        let (frames, frames_rx) = bounded(4096);
        let (commands, commands_rx) = unbounded();
        if let Some(config) = pair {
            let link = Link::start(config, commands.clone()).expect("the sync link");
            worker.use_pair(link, config);
        }
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

    fn status(&self) -> Status {
        let (reply, answer) = bounded(1);
        self.commands
            .send(Command::Status {
                tunnels: 0,
                top: 0,
                reply,
            })
            .expect("the worker runs");
        answer
            .recv_timeout(Duration::from_secs(30))
            .expect("a status")
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

/// The segws: every IKE_SA_INIT forwarded to one is answered, then its
/// IKE_AUTH answer follows (what establishes the tunnel).
fn segws(out: Receiver<(PortId, Vec<u8>)>, frames: Sender<Received>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for (port, f) in out {
            if port == UPLINK {
                continue;
            }
            let Ok(p) = packet::parse(&f) else { continue };
            let packet::Kind::Ip(ip) = &p.kind else {
                continue;
            };
            let Payload::Ike { header: h, .. } = &ip.payload else {
                continue;
            };
            if h.exchange != IKE_SA_INIT || !h.from_initiator {
                continue;
            }
            let n = port as u8;
            for exchange in [IKE_SA_INIT, IKE_AUTH] {
                let answer = udp_packet(
                    IpAddr::V4(VIP),
                    500,
                    ip.src,
                    500,
                    &ike_body(&ike(h.initiator_spi, exchange, false), false, 200),
                );
                let f = frame(port_mac(port), segw_mac(n), None, &answer);
                if frames.send(Received { port, frame: f }).is_err() {
                    return;
                }
            }
        }
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// What one run measured.
struct Run {
    opened: usize,
    secs: f64,
    busy_s: f64,
    longest_ms: f64,
    lag_us: Vec<u64>,
    standby_tunnels: Option<usize>,
}

fn run(rate: u64, secs: u64, with_standby: bool) -> Run {
    let (a, s) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let key = b"a key for the pair benchmark".to_vec();
    let config = |role, listen, peer| PairConfig {
        role,
        listen,
        peer,
        key: key.clone(),
    };
    let (active_config, standby_config) = (config(Role::Active, a, s), config(Role::Standby, s, a));
    let active = Running::start(balancer(), with_standby.then_some(&active_config));
    let standby = with_standby.then(|| Running::start(balancer(), Some(&standby_config)));
    if let Some(standby) = &standby {
        let until = Instant::now() + Duration::from_secs(10);
        while !standby.status().pair.is_some_and(|p| p.in_sync) {
            assert!(Instant::now() < until, "the standby never came in sync");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let responder = segws(active.out.clone(), active.frames.clone());
    let before = active.status();

    let total = (rate * secs) as u32;
    let started = Instant::now();
    let mut lag_us = Vec::new();
    let mut next_sample = started;
    for i in 0..total {
        // Paced: tunnel i leaves at i / rate seconds.
        let due = started + Duration::from_secs_f64(f64::from(i) / rate as f64);
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        active.frames.send(sa_init(i)).expect("the worker runs");
        if let Some(standby) = &standby {
            if Instant::now() >= next_sample {
                if let Some(p) = standby.status().pair {
                    lag_us.push((p.lag_ms * 1e3) as u64);
                }
                next_sample += Duration::from_millis(20);
            }
        }
    }
    // Every tunnel established on the active (its segw answered twice).
    let until = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let s = active.status();
        if s.gateways.iter().map(|g| g.tunnels).sum::<u64>() == u64::from(total) {
            break s;
        }
        assert!(Instant::now() < until, "the active never opened them all");
        std::thread::sleep(Duration::from_millis(5));
    };
    let secs = started.elapsed().as_secs_f64();
    let standby_tunnels = standby.as_ref().map(|standby| {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let n: u64 = standby.status().gateways.iter().map(|g| g.tunnels).sum();
            if n == u64::from(total) || Instant::now() > until {
                break n as usize;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    drop(standby);
    drop(active);
    let _ = responder.join();
    lag_us.sort_unstable();
    Run {
        opened: total as usize,
        secs,
        busy_s: after.worker.busy_s - before.worker.busy_s,
        longest_ms: after.worker.longest_pause_us / 1e3,
        lag_us,
        standby_tunnels,
    }
}

/// `n` handshakes through the core on this thread (IKE_SA_INIT, its
/// segw's two answers), with the change log on and drained every 32
/// tunnels or off: the time taken, best of 5.
fn core_cost(n: u32, replicate: bool) -> Duration {
    let answers = |i: u32, port: PortId| -> Vec<Vec<u8>> {
        [IKE_SA_INIT, IKE_AUTH]
            .into_iter()
            .map(|exchange| {
                let ip = udp_packet(
                    IpAddr::V4(VIP),
                    500,
                    peer(i),
                    500,
                    &ike_body(&ike(u64::from(i) + 1, exchange, false), false, 200),
                );
                frame(port_mac(port), segw_mac(port as u8), None, &ip)
            })
            .collect()
    };
    (0..5)
        .map(|_| {
            let mut lb = balancer();
            lb.replicate(replicate);
            let mut source = Source::default();
            let mut deltas = Vec::with_capacity(128);
            let frames: Vec<Vec<u8>> = (0..n).map(|i| sa_init(i).frame).collect();
            let started = Instant::now();
            for (i, f) in frames.into_iter().enumerate() {
                let mut f = f;
                let Verdict::Forward(port) = lb.handle(&mut f, UPLINK, Timestamp::ZERO) else {
                    panic!("tunnel {i} not placed");
                };
                for mut a in answers(i as u32, port) {
                    lb.handle(&mut a, port, Timestamp::ZERO);
                }
                if replicate && i % 32 == 31 {
                    lb.replica_deltas(&mut source, Timestamp::ZERO, &mut deltas)
                        .expect("the log keeps 32 tunnels' changes");
                    std::hint::black_box(&deltas);
                    deltas.clear();
                }
            }
            started.elapsed()
        })
        .min()
        .expect("five runs")
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let rate = env("SEGWLB_BENCH_RATE", 10_000);
    let secs = env("SEGWLB_BENCH_SECS", 5);
    println!("pair: {rate} new tunnels/s for {secs} s (3 table changes each), round-robin over {SEGWS} segws");
    let alone = run(rate, secs, false);
    let paired = run(rate, secs, true);
    for (name, r) in [("no standby", &alone), ("with a standby", &paired)] {
        println!(
            "  {name:<15} {} tunnels in {:.2} s · active worker busy {:.1} ms/s, {:.2} µs a tunnel · longest turn {:.2} ms",
            r.opened,
            r.secs,
            r.busy_s / r.secs * 1e3,
            r.busy_s / r.opened as f64 * 1e6,
            r.longest_ms
        );
    }
    println!(
        "  replication lag (active's send → standby's apply), {} samples: median {} µs, p99 {} µs, max {} µs",
        paired.lag_us.len(),
        quantile(&paired.lag_us, 0.5),
        quantile(&paired.lag_us, 0.99),
        paired.lag_us.last().copied().unwrap_or(0)
    );
    println!(
        "  standby's table at the end: {} of {} tunnels",
        paired.standby_tunnels.unwrap_or(0),
        paired.opened
    );
    println!(
        "  cost of the standby to the active's worker: ×{:.2} busy time per tunnel",
        (paired.busy_s / paired.opened as f64) / (alone.busy_s / alone.opened as f64)
    );
    let n = 50_000;
    let (off, on) = (core_cost(n, false), core_cost(n, true));
    let per = |d: Duration| d.as_secs_f64() / f64::from(n) * 1e9;
    println!(
        "  the core alone, {n} handshakes (3 frames each): {:.0} ns a tunnel without the change log, {:.0} ns with it and its deltas (×{:.2})",
        per(off),
        per(on),
        per(on) / per(off)
    );
}
