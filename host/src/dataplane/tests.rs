//! The worker on in-memory ports: what `segwlb run` does between its
//! sockets, with no sockets, and (where it matters) simulated time.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crossbeam_channel::{bounded, unbounded, Receiver};

use super::*;
use crate::balancer::farm::{port_mac, segw_mac};
use crate::io::memory::MemoryTx;
use crate::packet::craft::{esp_body, frame, udp_packet};
use crate::policy::native;
use crate::policy::wasm::{Limits, Runtime};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 2, 2, 1);
const ROUTER: Mac = [2, 0xaa, 0, 0, 0, 1];

/// A worker with a native round-robin policy over three segws, and the
/// channel every port sends into.
fn worker(health: Option<HealthConfig>) -> (Worker, Receiver<(PortId, Vec<u8>)>) {
    let lb = crate::balancer::farm::balancer(
        native::shipped("round-robin", &[]).unwrap(),
        3,
        vec!["10.2.2.1/32".parse().unwrap()],
        1 << 16,
    );
    let (out_tx, out_rx) = unbounded();
    let ports = crate::io::memory::ports(3, &out_tx);
    let record = PolicyRecord {
        name: "round-robin".into(),
        ..Default::default()
    };
    (
        Worker::new(lb, ports, vec![VIP.into()], health, record, Clock::start()),
        out_rx,
    )
}

fn esp_from(peer: u8, port: u16) -> Vec<u8> {
    let ip = udp_packet(
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, peer)),
        port,
        IpAddr::V4(VIP),
        4500,
        &esp_body(0x1000 + u32::from(peer), 1, 120),
    );
    frame(port_mac(UPLINK), ROUTER, None, &ip)
}

/// The status of the worker running behind `commands` (no tunnels listed).
fn status_of(commands: &crossbeam_channel::Sender<Command>) -> crate::control::status::Status {
    let (reply, answer) = bounded(1);
    commands
        .send(Command::Status {
            tunnels: 0,
            top: 0,
            reply,
        })
        .unwrap();
    answer
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .finish()
}

fn policies() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

#[test]
fn frames_from_the_uplink_leave_on_the_segw_port_with_only_the_macs_changed() {
    let (mut w, out) = worker(None);
    for peer in 1..=6u8 {
        let f = esp_from(peer, 4500);
        w.frame(
            Received {
                port: UPLINK,
                frame: f.clone(),
            },
            Timestamp::ZERO,
        );
        let (port, sent) = out.try_recv().expect("forwarded");
        // Round-robin: 1, 2, 3, 1, 2, 3.
        assert_eq!(port, PortId::from((peer - 1) % 3 + 1));
        assert_eq!(&sent[0..6], &segw_mac(port as u8));
        assert_eq!(&sent[6..12], &port_mac(port));
        assert_eq!(&sent[12..], &f[12..]);
    }
    // The segw's answer goes back out the uplink to the router it came from.
    let back = udp_packet(
        IpAddr::V4(VIP),
        4500,
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)),
        4500,
        &esp_body(0x99, 1, 120),
    );
    w.frame(
        Received {
            port: 2,
            frame: frame(port_mac(2), segw_mac(2), None, &back),
        },
        Timestamp::ZERO,
    );
    let (port, sent) = out.try_recv().expect("returned");
    assert_eq!((port, &sent[0..6]), (UPLINK, &ROUTER[..]));
    let s = w.status(10, Timestamp::ZERO);
    assert_eq!(s.counters.forwarded, 7);
    assert_eq!(s.gateway("segw2").unwrap().tunnels, 2);
    assert_eq!(
        s.gateway("segw2").unwrap().tunnel_list[0].remote,
        "198.51.100.2:4500"
    );
    assert_eq!(s.ports.iter().map(|p| p.sent).sum::<u64>(), 7);
}

#[test]
fn later_fragments_that_come_first_leave_with_their_first_on_its_port() {
    let (mut w, out) = worker(None);
    // Two tunnels behind one NAT address, on segw1 and segw2.
    let nat = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 100));
    let esp = udp_packet(nat, 40_001, IpAddr::V4(VIP), 4500, &esp_body(0x77, 1, 3000));
    for port in [40_001, 40_002] {
        // IKE_AUTH on 4500 with a new SPI: a tunnel of its own each.
        let header = crate::packet::IkeHeader {
            initiator_spi: u64::from(port),
            responder_spi: 0x77,
            exchange: crate::packet::ike::IKE_AUTH,
            from_initiator: true,
            response: false,
            message_id: 1,
        };
        let body = crate::packet::craft::ike_body(&header, true, 200);
        let ip = udp_packet(nat, port, IpAddr::V4(VIP), 4500, &body);
        let f = frame(port_mac(UPLINK), ROUTER, None, &ip);
        w.frame(
            Received {
                port: UPLINK,
                frame: f,
            },
            Timestamp::ZERO,
        );
    }
    assert_eq!(out.try_iter().map(|(p, _)| p).collect::<Vec<_>>(), [1, 2]);
    // A big packet of the first tunnel, its pieces in reverse.
    let pieces = crate::packet::craft::fragments(&esp, 1400, 0x4242);
    for ip in pieces.iter().rev() {
        let f = frame(port_mac(UPLINK), ROUTER, None, ip);
        w.frame(
            Received {
                port: UPLINK,
                frame: f,
            },
            Timestamp::ZERO,
        );
    }
    let sent: Vec<(PortId, Vec<u8>)> = out.try_iter().collect();
    assert_eq!(sent.len(), pieces.len(), "every piece went out once");
    for (port, f) in &sent {
        assert_eq!(*port, 1, "a piece went to segw{port}");
        assert_eq!(&f[0..6], &segw_mac(1));
        assert!(pieces.iter().any(|ip| f[14..] == ip[..]));
    }
    let c = w.status(0, Timestamp::ZERO).counters;
    assert_eq!((c.fragments_held, c.fragments_waiting), (2, 0));
}

#[test]
fn arp_for_the_vip_is_answered_on_the_port_it_came_in_on() {
    let (mut w, out) = worker(None);
    let ask = crate::packet::arp::Arp::request(ROUTER, Ipv4Addr::new(198, 51, 100, 1), VIP)
        .broadcast_frame(ROUTER, None);
    w.frame(
        Received {
            port: UPLINK,
            frame: ask,
        },
        Timestamp::ZERO,
    );
    let (port, reply) = out.try_recv().unwrap();
    assert_eq!(port, UPLINK);
    assert_eq!(&reply[0..6], &ROUTER);
    assert_eq!(
        &reply[22..28],
        &port_mac(UPLINK),
        "sender MAC: the uplink's"
    );
}

#[test]
fn a_silent_segw_is_marked_down_after_the_threshold_and_new_tunnels_avoid_it() {
    let health = HealthConfig {
        interval: Duration::from_millis(100),
        down_after: 3,
        up_after: 1,
    };
    let (mut w, out) = worker(Some(health));
    let mut now = Timestamp::ZERO;
    // Three rounds: segw1 and segw3 answer every probe, segw2 never. The
    // first round judges nothing; the next two are segw2's first misses.
    for _ in 0..3 {
        w.timers(now);
        for (port, probe) in out.try_iter().collect::<Vec<_>>() {
            assert_eq!(&probe[0..6], &[0xff; 6], "probes are broadcast");
            if port == 2 {
                continue;
            }
            let answer = crate::packet::arp::Arp {
                op: crate::packet::arp::REPLY,
                sender_mac: segw_mac(port as u8),
                sender_ip: VIP,
                target_mac: port_mac(port),
                target_ip: Ipv4Addr::UNSPECIFIED,
            }
            .to_frame(port_mac(port), segw_mac(port as u8), None);
            w.frame(
                Received {
                    port,
                    frame: answer,
                },
                now,
            );
        }
        assert!(
            w.status(0, now).gateway("segw2").unwrap().healthy,
            "too early"
        );
        now = now + health.interval;
    }
    w.timers(now);
    let s = w.status(0, now);
    assert!(!s.gateway("segw2").unwrap().healthy);
    assert!(s.gateway("segw1").unwrap().healthy && s.gateway("segw3").unwrap().healthy);
    out.try_iter().count();
    for peer in 1..=6u8 {
        w.frame(
            Received {
                port: UPLINK,
                frame: esp_from(peer, 4500),
            },
            now,
        );
        let (port, _) = out.try_recv().unwrap();
        assert_ne!(port, 2, "a new tunnel went to the down segw");
    }
}

/// The swap as `segwlb run` does it: the policy compiled elsewhere, handed
/// over as a command while frames stream in. No frame lost, no tunnel moved.
#[test]
fn a_policy_swap_under_a_stream_loses_no_frame_and_moves_no_tunnel() {
    let runtime = Runtime::new().unwrap();
    let weighted = runtime
        .load(&policies().join("weighted.wasm"), &[], Limits::default())
        .expect("policies/weighted.wasm (built by cargo build)");
    let (w, out) = worker(None);
    let (frames_tx, frames_rx) = bounded(64);
    let (commands_tx, commands_rx) = unbounded();
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || w.run(frames_rx, commands_rx, &stop))
    };
    let tunnels = 60u8;
    let rounds = 50;
    let mut placed: std::collections::HashMap<u8, PortId> = Default::default();
    let (reply_tx, reply_rx) = bounded(1);
    for round in 0..rounds {
        if round == rounds / 2 {
            commands_tx
                .send(Command::UsePolicy {
                    policy: Box::new(weighted.serve().unwrap()),
                    rebalance: false,
                    graceful: false,
                    noticed: Instant::now(),
                    reply: reply_tx.clone(),
                })
                .unwrap();
        }
        for peer in 1..=tunnels {
            frames_tx
                .send(Received {
                    port: UPLINK,
                    frame: esp_from(peer, 4500),
                })
                .unwrap();
        }
        let mut got = 0;
        while got < tunnels {
            let (port, sent) = out
                .recv_timeout(Duration::from_secs(5))
                .expect("a frame was lost");
            if sent[12..14] != [0x08, 0x00] {
                continue; // an ARP probe
            }
            got += 1;
            let peer = sent[14 + 15]; // last byte of the IPv4 source
            let first = *placed.entry(peer).or_insert(port);
            assert_eq!(port, first, "tunnel {peer} moved in round {round}");
        }
    }
    let reply = reply_rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap();
    assert!(reply.contains("round-robin -> weighted"), "{reply}");
    assert!(reply.contains("no tunnel moved"), "{reply}");
    let s = status_of(&commands_tx);
    assert_eq!(s.policy.name, "weighted");
    assert_eq!(s.policy.reloads, 1);
    assert_eq!(s.counters.moved, 0);
    assert_eq!(s.counters.forwarded, u64::from(tunnels) * rounds);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    thread.join().unwrap();
}

#[test]
fn metrics_expose_per_gateway_counters_drops_and_the_policy() {
    use crate::control::metrics;
    let (mut w, _out) = worker(None);
    for peer in 1..=4u8 {
        w.frame(
            Received {
                port: UPLINK,
                frame: esp_from(peer, 4500),
            },
            Timestamp::ZERO,
        );
    }
    w.frame(
        Received {
            port: UPLINK,
            frame: vec![1, 2, 3],
        },
        Timestamp::ZERO,
    );
    let text = metrics::render(&w.status(0, Timestamp::ZERO));
    for line in [
        "segwlb_gateway_tunnels{gateway=\"segw1\"} 2",
        "segwlb_gateway_tunnels{gateway=\"segw3\"} 1",
        "segwlb_gateway_frames_total{gateway=\"segw2\",direction=\"to_segw\"} 1",
        "segwlb_gateway_up{gateway=\"segw2\"} 1",
        "segwlb_drops_total{reason=\"malformed\"} 1",
        "segwlb_policy_decisions_total 4",
        "segwlb_policy_info{policy=\"round-robin\"} 1",
        "segwlb_table_tunnels 4",
        "# TYPE segwlb_gateway_frames_total counter",
        "segwlb_moves_refused_total{by=\"spi_range\"} 0",
        "# TYPE segwlb_worker_pause_seconds histogram",
        "segwlb_worker_pause_seconds_bucket{le=\"0.001024\"} 0",
        "segwlb_worker_pause_seconds_bucket{le=\"+Inf\"} 0",
        "segwlb_worker_pause_seconds_count 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
    // Served over HTTP: a scrape gets the same text.
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let status = w.status(0, Timestamp::ZERO);
    let stop = Arc::new(AtomicBool::new(false));
    let server = metrics::serve(addr, move || Some(status.clone()), stop.clone()).unwrap();
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with(&text), "{answer}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap();
}

#[test]
fn a_gateway_refused_on_a_taken_port_changes_nothing_of_that_port() {
    let (mut w, out) = worker(None);
    let (reply, answer) = bounded(1);
    let spec = GatewaySpec {
        name: "intruder".into(),
        port: 2,
        mac: Some(segw_mac(9)),
        weight: 1,
        capacity: 0,
        throughput: 0,
        steering: Default::default(),
    };
    let (drop_tx, _) = unbounded();
    w.command(
        Command::AddGateway {
            spec,
            draining: false,
            interface: "if9".into(),
            port_mac: [2, 9, 9, 9, 9, 9],
            tx: Box::new(MemoryTx::new(9, drop_tx)),
            reply,
        },
        Timestamp::ZERO,
    );
    let refused = answer.recv().unwrap().unwrap_err();
    assert!(refused.contains("port 2"), "{refused}");
    // segw2's frames still leave port 2 from port 2's own MAC.
    for peer in 1..=3 {
        w.frame(
            Received {
                port: UPLINK,
                frame: esp_from(peer, 4500),
            },
            Timestamp::ZERO,
        );
    }
    let sent: Vec<(PortId, Vec<u8>)> = out.try_iter().collect();
    let on_2: Vec<_> = sent.iter().filter(|(p, _)| *p == 2).collect();
    assert_eq!(on_2.len(), 1);
    assert_eq!(&on_2[0].1[6..12], &port_mac(2));
}

/// Per-tunnel rates (issue 28): the worker's timers advance every tunnel's
/// rates about once a second, and `ctl status --top N` lists the N
/// heaviest over every segw, heaviest first, with their rates each way.
#[test]
fn status_top_lists_the_heaviest_tunnels_with_their_rates() {
    let (mut w, out) = worker(None);
    let at = Timestamp::from_millis;
    let send = |w: &mut Worker, peer: u8, times: usize, now: Timestamp| {
        for _ in 0..times {
            w.frame(
                Received {
                    port: UPLINK,
                    frame: esp_from(peer, 4500),
                },
                now,
            );
        }
    };
    for peer in 1..=3 {
        send(&mut w, peer, 1, at(0));
    }
    // The first pass sees each tunnel once: no rate yet.
    w.timers(at(10));
    send(&mut w, 1, 100, at(500));
    send(&mut w, 2, 10, at(500));
    send(&mut w, 3, 1, at(500));
    // A second later every tunnel has been visited again.
    w.timers(at(1_010));
    while out.try_recv().is_ok() {}
    let (reply, answer) = bounded(1);
    w.command(
        Command::Status {
            tunnels: 0,
            top: 2,
            reply,
        },
        at(1_010),
    );
    let status = loop {
        if let Ok(s) = answer.try_recv() {
            break s.finish();
        }
        w.background(at(1_010));
    };
    let ip_len = esp_from(1, 4500).len() as f64 - 14.0;
    let top: Vec<(&str, &str, f64, f64)> = status
        .top
        .iter()
        .map(|t| {
            (
                t.remote.as_str(),
                t.gateway.as_str(),
                t.packets_to_per_s,
                t.bytes_to_per_s,
            )
        })
        .collect();
    assert_eq!(
        top,
        [
            ("198.51.100.1:4500", "segw1", 100.0, 100.0 * ip_len),
            ("198.51.100.2:4500", "segw2", 10.0, 10.0 * ip_len),
        ]
    );
    let text = status.render();
    assert!(text.contains("heaviest tunnels"), "{text}");
    assert!(text.contains("198.51.100.1:4500"), "{text}");
}

/// A port whose send blocks (a full socket buffer, say) for 40 ms.
struct Blocking(MemoryTx);

impl crate::io::Tx for Blocking {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        std::thread::sleep(Duration::from_millis(40));
        self.0.send(frame)
    }
}

/// A blocked call costs the worker no CPU, so its CPU clock does not see
/// it; frames wait all the same, and the wall clock's histogram counts it.
#[test]
fn a_send_that_blocks_shows_as_a_wall_clock_pause_not_as_work() {
    let lb = crate::balancer::farm::balancer(
        native::shipped("round-robin", &[]).unwrap(),
        3,
        vec!["10.2.2.1/32".parse().unwrap()],
        1 << 16,
    );
    let (out_tx, out) = unbounded();
    let mut ports = crate::io::memory::ports(3, &out_tx);
    ports[1].2 = Box::new(Blocking(MemoryTx::new(1, out_tx.clone())));
    let w = Worker::new(
        lb,
        ports,
        vec![VIP.into()],
        None,
        PolicyRecord::default(),
        Clock::start(),
    );
    let (frames_tx, frames_rx) = bounded(64);
    let (commands_tx, commands_rx) = unbounded();
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || w.run(frames_rx, commands_rx, &stop))
    };
    // Round-robin: the first new tunnel goes to port 1.
    frames_tx
        .send(Received {
            port: UPLINK,
            frame: esp_from(1, 4500),
        })
        .unwrap();
    // The ESP on port 1 (not a probe: those go there too, and block too).
    loop {
        let (port, f) = out.recv_timeout(Duration::from_secs(5)).unwrap();
        if port == 1 && f[12..14] == [0x08, 0x00] {
            break;
        }
    }
    // A status is answered inside a turn, before that turn is recorded:
    // ask until the turns that blocked are in.
    let asked = Instant::now();
    let s = loop {
        let s = status_of(&commands_tx);
        if s.worker.longest_pause_wall_us >= 40_000.0 || asked.elapsed() > Duration::from_secs(10) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    thread.join().unwrap();
    let w = &s.worker;
    assert!(w.wall_pauses_over_1ms >= 1, "{w:?}");
    assert!(w.longest_pause_wall_us >= 40_000.0, "{w:?}");
    assert!(w.longest_pause_us < 20_000.0, "{w:?}");
}

/// `ctl status --tunnels N` with N as large as a status-only user may ask:
/// the worker gathers a bounded list a slice at a time; sorting and
/// formatting it is not the worker's (it was: one turn of the whole list).
#[test]
fn a_status_listing_every_tunnel_is_capped_and_finished_off_the_worker() {
    const TUNNELS: u32 = 60_000;
    let lb = crate::balancer::farm::balancer(
        native::shipped("round-robin", &[]).unwrap(),
        3,
        vec!["10.2.2.1/32".parse().unwrap()],
        1 << 17,
    );
    let (out_tx, _out) = unbounded();
    let ports = crate::io::memory::ports(3, &out_tx);
    let mut w = Worker::new(
        lb,
        ports,
        vec![VIP.into()],
        None,
        PolicyRecord::default(),
        Clock::start(),
    );
    for i in 0..TUNNELS {
        let from = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        let ip = udp_packet(from, 4500, IpAddr::V4(VIP), 4500, &esp_body(i + 1, 1, 100));
        let mut f = frame(port_mac(UPLINK), ROUTER, None, &ip);
        w.lb.handle(&mut f, UPLINK, Timestamp::ZERO);
    }
    assert_eq!(w.lb.table().len(), TUNNELS as usize);
    let (reply, answer) = bounded(1);
    w.command(
        Command::Status {
            tunnels: usize::MAX,
            top: 0,
            reply,
        },
        Timestamp::ZERO,
    );
    let mut longest = Duration::ZERO;
    let gathered = loop {
        if let Ok(g) = answer.try_recv() {
            break g;
        }
        // The worker's own measure of a turn: its thread's CPU time.
        let turn = Turn::start();
        w.background(Timestamp::ZERO);
        longest = longest.max(turn.elapsed().0);
    };
    let status = crate::control::status::Gathered::finish(gathered);
    eprintln!("longest turn of the listing: {longest:?}");
    for g in &status.gateways {
        assert_eq!(
            g.tunnel_list.len(),
            crate::control::status::TUNNELS_MAX,
            "{}",
            g.name
        );
    }
    // A slice is about SLICE (300 µs) plus a chunk; a debug build on a
    // shared machine, some milliseconds. The whole listing was ~10 times that.
    assert!(longest < Duration::from_millis(25), "a turn of {longest:?}");
}

/// Statuses and saves as fast as clients can ask (a status-only user in a
/// loop): the fast path's counters, a walk of every tunnel slot it has
/// written (64 MB at a million), are folded at most once a second for
/// them, not once each.
#[test]
fn a_storm_of_statuses_folds_the_fast_paths_counters_at_most_once_a_second() {
    let path = match crate::io::xdp::FastPath::load(1 << 16, false) {
        Ok(path) => path,
        Err(e) if std::env::var_os("SEGWLB_REQUIRE_NETNS").is_none() => {
            eprintln!("skipped: no XDP fast path here ({e})");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let (mut w, _out) = worker(None);
    // The program on no port: its counters are there to fold all the same.
    w.fast = Some(fast::Fast::new(path));
    let at = |ms: u64| Timestamp::from_duration(Duration::from_millis(ms));
    for i in 0..50u64 {
        let (reply, _answer) = bounded(1);
        w.command(
            Command::Status {
                tunnels: 0,
                top: 0,
                reply,
            },
            at(i * 10),
        );
        let (reply, _answer) = bounded(1);
        w.command(Command::Save { reply }, at(i * 10 + 5));
    }
    assert_eq!(w.folds, 1, "folds for 100 requests in half a second");
    let (reply, _answer) = bounded(1);
    w.command(
        Command::Status {
            tunnels: 0,
            top: 0,
            reply,
        },
        at(1_100),
    );
    assert_eq!(w.folds, 2, "a second later, the next status folds again");
}
