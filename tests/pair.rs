//! A pair of `segwlb run`s on shared segments, in network namespaces each
//! test builds and tears down (root): the standby's silence, the
//! replication stream (its order, a link that breaks mid-stream, a standby
//! that stops reading, forged and replayed frames) and the takeover.
//!
//! ```text
//!                       ┌ sw: br-up ┐               ┌ sw: br-sN ┐
//!   ini(eth0) ── (i0) ──┤           ├── (a0) uplink lb1 pN (aN) ──┤           ├── (sN) eth0 sN
//!                       │           ├── (b0) uplink lb2 pN (bN) ──┤           │
//!                       └───────────┘        lb1 sync ── sync lb2       (N = 1..3)
//! ```
//!
//! The sync link is 10.255.0.1/30 (lb1) ↔ 10.255.0.2/30 (lb2). lb1 starts
//! active, lb2 standby; the tests say `ctl role` as keepalived would.
//! Without root these tests say so and pass, unless SEGWLB_REQUIRE_NETNS is
//! set (CI sets it): then they fail.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::netns_can_run as can_run;
use common::socket::Socket;
use segwlb::balancer::replica::Delta;
use segwlb::balancer::saved::SavedTunnel;
use segwlb::control::ctl::{request, Request};
use segwlb::control::status::Status;
use segwlb::lab::netns::{self, Netns};
use segwlb::packet::craft::{esp_body, frame, ike_body, udp_packet};
use segwlb::packet::ike::{IKE_AUTH, IKE_SA_INIT};
use segwlb::packet::{IkeHeader, Mac};
use segwlb::pair::wire::{self, Direction, Message, MAGIC, NONCE, TAG};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 2, 2, 1);
const SEGWS: usize = 3;
const KEY: &str = "the pair's key, for this test only";
const SYNC: [&str; 2] = ["10.255.0.1", "10.255.0.2"];
const PORT: u16 = 7400;

fn peer(n: u16) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 1, (n >> 8) as u8, n as u8))
}

/// One pair at a time: two balancers on two cores already share them.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// IPv4 from an initiator (10.1/16) in a frame.
fn from_initiator(f: &[u8]) -> bool {
    f.len() > 34 && f[12..14] == [0x08, 0x00] && f[26] == 10 && f[27] == 1
}

/// A gratuitous ARP's sender address, if `f` is one.
fn gratuitous(f: &[u8]) -> Option<Ipv4Addr> {
    let a = f.get(14..42)?;
    (f[12..14] == [0x08, 0x06] && a[14..18] == a[24..28])
        .then(|| Ipv4Addr::new(a[14], a[15], a[16], a[17]))
}

fn ike(spi: u64, exchange: u8, from_initiator: bool) -> IkeHeader {
    IkeHeader {
        initiator_spi: spi,
        responder_spi: if exchange == IKE_SA_INIT && from_initiator {
            0
        } else {
            0x77
        },
        exchange,
        from_initiator,
        response: !from_initiator,
        message_id: u32::from(exchange != IKE_SA_INIT),
    }
}

/// One balancer of the pair.
struct Balancer {
    ns: Netns,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    uplink_mac: Mac,
    port_macs: Vec<Mac>,
}

impl Balancer {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = self.ns.command(env!("CARGO_BIN_EXE_segwlb"));
        cmd.args(["run", "-c"])
            .arg(&self.config)
            .env("RUST_LOG", "segwlb=info")
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(cmd.spawn().unwrap());
        let until = Instant::now() + Duration::from_secs(20);
        while self.try_status().is_none() {
            assert!(Instant::now() < until, "not up:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&mut self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        if signal == "KILL" {
            let _ = self.child.take().unwrap().wait();
        }
    }

    fn try_status(&self) -> Option<Status> {
        let req = Request::Status {
            tunnels: 10_000,
            top: 0,
        };
        request(&self.socket, &req).ok()?.status
    }

    fn status(&self) -> Status {
        self.try_status()
            .unwrap_or_else(|| panic!("no status:\n{}", self.log_text()))
    }

    fn role(&self, role: &str) -> String {
        let r = request(
            &self.socket,
            &Request::Role {
                role: Some(role.into()),
            },
        )
        .unwrap();
        assert!(r.ok, "{}", r.message);
        r.message
    }

    /// Wait until `ok` holds of the status.
    fn wait(&self, what: &str, within: Duration, ok: impl Fn(&Status) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            if self.try_status().is_some_and(|s| ok(&s)) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "{what}: not within {within:?}; status {:?}\n{}",
                self.try_status().and_then(|s| s.pair),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Every tunnel in a status, as remote endpoint → segw.
fn tunnels(s: &Status) -> BTreeMap<String, String> {
    s.gateways
        .iter()
        .flat_map(|g| {
            g.tunnel_list
                .iter()
                .map(|t| (t.remote.clone(), g.name.clone()))
        })
        .collect()
}

struct Pair {
    _dir: tempfile::TempDir,
    lb: Vec<Balancer>,
    ini: Socket,
    segws: Vec<Socket>,
    // Dropped last: namespaces go after the processes in them.
    _ns: Vec<Netns>,
}

impl Pair {
    /// The topology, lb1 active and lb2 standby; `start`: which to run.
    fn up(tag: &str, start: [bool; 2]) -> Pair {
        let prefix = netns::unique_prefix(tag);
        let ns = |n: &str| Netns::new(&format!("{prefix}-{n}")).unwrap();
        let (ini_ns, sw) = (ns("ini"), ns("sw"));
        let lb_ns = [ns("lb1"), ns("lb2")];
        let segw_ns: Vec<Netns> = (1..=SEGWS).map(|n| ns(&format!("s{n}"))).collect();
        let bridge = |name: &str| {
            sw.ip(&["link", "add", "name", name, "type", "bridge"])
                .unwrap();
            sw.ip(&["link", "set", name, "up"]).unwrap();
        };
        let join = |ifname: &str, br: &str| {
            sw.ip(&["link", "set", ifname, "master", br]).unwrap();
        };
        bridge("br-up");
        netns::veth(&ini_ns, "eth0", &sw, "i0").unwrap();
        join("i0", "br-up");
        for (i, lb) in lb_ns.iter().enumerate() {
            let side = if i == 0 { 'a' } else { 'b' };
            netns::veth(lb, "uplink", &sw, &format!("{side}0")).unwrap();
            join(&format!("{side}0"), "br-up");
        }
        for (n, s) in segw_ns.iter().enumerate() {
            let n = n + 1;
            let br = format!("br-s{n}");
            bridge(&br);
            for (i, lb) in lb_ns.iter().enumerate() {
                let side = if i == 0 { 'a' } else { 'b' };
                netns::veth(lb, &format!("p{n}"), &sw, &format!("{side}{n}")).unwrap();
                join(&format!("{side}{n}"), &br);
            }
            netns::veth(s, "eth0", &sw, &format!("s{n}")).unwrap();
            join(&format!("s{n}"), &br);
            s.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "eth0"])
                .unwrap();
            s.ip(&["route", "add", "10.1.0.0/16", "dev", "eth0"])
                .unwrap();
        }
        netns::veth(&lb_ns[0], "sync", &lb_ns[1], "sync").unwrap();
        for (lb, addr) in lb_ns.iter().zip(SYNC) {
            lb.ip(&["addr", "add", &format!("{addr}/30"), "dev", "sync"])
                .unwrap();
        }

        let dir = tempfile::tempdir().unwrap();
        let mut lbs = Vec::new();
        for (i, ns) in lb_ns.into_iter().enumerate() {
            let d = dir.path().join(format!("lb{}", i + 1));
            std::fs::create_dir(&d).unwrap();
            let config = d.join("lb.toml");
            let mut text = format!(
                "[balancer]\nuplink = \"uplink\"\nvip = \"{VIP}\"\nproxy_uplink = [\"10.2.2.0/24\"]\n\
                 proxy_gateways = [\"10.1.0.0/16\"]\ncontrol_socket = \"segwlb.sock\"\n\
                 [policy]\nname = \"round-robin\"\ndir = \"{}\"\n\
                 [health]\ninterval_ms = 200\ndown_after = 3\nup_after = 1\n\
                 [pair]\nrole = \"{}\"\nlisten = \"{}:{PORT}\"\npeer = \"{}:{PORT}\"\nkey = \"{KEY}\"\n",
                common::policies_dir().display(),
                if i == 0 { "active" } else { "standby" },
                SYNC[i],
                SYNC[1 - i],
            );
            if let Some(mode) = common::fast_path_under_test() {
                text += &format!("[dataplane]\nfast_path = \"{mode}\"\n");
            }
            for n in 1..=SEGWS {
                text += &format!("[[gateway]]\nname = \"segw{n}\"\ninterface = \"p{n}\"\n");
            }
            std::fs::write(&config, text).unwrap();
            lbs.push(Balancer {
                uplink_mac: netns::mac_of(&ns, "uplink").unwrap(),
                port_macs: (1..=SEGWS)
                    .map(|n| netns::mac_of(&ns, &format!("p{n}")).unwrap())
                    .collect(),
                config,
                socket: d.join("segwlb.sock"),
                log: d.join("segwlb.log"),
                child: None,
                ns,
            });
        }
        let ini = Socket::open(&ini_ns, "eth0");
        let segws = segw_ns.iter().map(|s| Socket::open(s, "eth0")).collect();
        let mut ns = vec![ini_ns, sw];
        ns.extend(segw_ns);
        let mut pair = Pair {
            _dir: dir,
            lb: lbs,
            ini,
            segws,
            _ns: ns,
        };
        for (i, go) in start.into_iter().enumerate() {
            if go {
                pair.lb[i].start();
            }
        }
        if start[0] {
            pair.lb[0].wait("segw MACs learned", Duration::from_secs(5), |s| {
                s.gateways.iter().all(|g| g.mac.is_some())
            });
        }
        // Following the active: its ports (and their fast path, whose
        // attaching resets a veth) are up and settled.
        if start == [true, true] {
            pair.lb[1].wait("the standby in sync", Duration::from_secs(5), |s| {
                s.pair.as_ref().is_some_and(|p| p.in_sync)
            });
            std::thread::sleep(Duration::from_millis(200));
        }
        pair
    }

    /// Tunnels `from..to` opened through balancer `via` and confirmed by
    /// their segws (IKE_SA_INIT, its answer, the IKE_AUTH answer); each
    /// peer's segw index.
    fn open(&mut self, via: usize, from: u16, to: u16) -> BTreeMap<u16, usize> {
        let lb_mac = self.lb[via].uplink_mac;
        for n in from..to {
            let ip = udp_packet(
                peer(n),
                500,
                IpAddr::V4(VIP),
                500,
                &ike_body(&ike(u64::from(n), IKE_SA_INIT, true), false, 100),
            );
            self.ini.send(&frame(lb_mac, self.ini.mac, None, &ip));
        }
        let mut segw_of = BTreeMap::new();
        for (i, s) in self.segws.iter_mut().enumerate() {
            for f in s.drain(Duration::from_millis(300), from_initiator) {
                segw_of.insert(u16::from_be_bytes([f[28], f[29]]), i);
            }
        }
        assert_eq!(
            segw_of.len(),
            usize::from(to - from),
            "every IKE_SA_INIT reached a segw"
        );
        for (&n, &i) in &segw_of {
            let port_mac = self.lb[via].port_macs[i];
            for exchange in [IKE_SA_INIT, IKE_AUTH] {
                let ip = udp_packet(
                    IpAddr::V4(VIP),
                    500,
                    peer(n),
                    500,
                    &ike_body(&ike(u64::from(n), exchange, false), false, 100),
                );
                let mac = self.segws[i].mac;
                self.segws[i].send(&frame(port_mac, mac, None, &ip));
            }
        }
        segw_of
    }

    /// ESP of each peer in `segw_of` sent to `mac`; the segw index each
    /// reached (none: it reached no segw).
    fn esp(&mut self, mac: Mac, segw_of: &BTreeMap<u16, usize>) -> BTreeMap<u16, usize> {
        for &n in segw_of.keys() {
            let ip = udp_packet(
                peer(n),
                4500,
                IpAddr::V4(VIP),
                4500,
                &esp_body(0xc000_0000 | u32::from(n), 7, 100),
            );
            self.ini.send(&frame(mac, self.ini.mac, None, &ip));
        }
        let mut reached = BTreeMap::new();
        for (i, s) in self.segws.iter_mut().enumerate() {
            for f in s.drain(Duration::from_millis(300), from_initiator) {
                reached.insert(u16::from_be_bytes([f[28], f[29]]), i);
            }
        }
        reached
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for lb in &mut self.lb {
            if let Some(mut child) = lb.child.take() {
                let _ = Command::new("kill").arg(child.id().to_string()).status();
                let _ = Command::new("kill")
                    .args(["-CONT", &child.id().to_string()])
                    .status();
                let until = Instant::now() + Duration::from_secs(3);
                while child.try_wait().ok().flatten().is_none() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            if std::thread::panicking() {
                eprintln!("--- {} log ---\n{}", lb.ns.name(), lb.log_text());
            }
        }
    }
}

#[test]
fn the_standby_is_silent_and_takes_over_every_tunnel_where_it_was() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut pair = Pair::up("pair-take", [true, true]);
    let segw_of = pair.open(0, 1, 41);
    let (lb1, lb2) = (pair.lb[0].uplink_mac, pair.lb[1].uplink_mac);
    pair.lb[1].wait(
        "the standby holds the active's 40 tunnels",
        Duration::from_secs(5),
        |s| s.pair.as_ref().is_some_and(|p| p.in_sync) && tunnels(s).len() == 40,
    );
    assert_eq!(
        tunnels(&pair.lb[1].status()),
        tunnels(&pair.lb[0].status()),
        "the standby's table is the active's"
    );

    // Silent: frames sent to the standby's MAC go nowhere, and it answers
    // no ARP for the VIP.
    assert!(pair.esp(lb2, &segw_of).is_empty(), "the standby forwarded");
    let arp = segwlb::packet::arp::Arp::request(pair.ini.mac, Ipv4Addr::new(10, 1, 0, 1), VIP)
        .broadcast_frame(pair.ini.mac, None);
    pair.ini.send(&arp);
    let answers = pair.ini.drain(Duration::from_millis(300), |f| {
        f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2]
    });
    assert_eq!(answers.len(), 1, "one ARP answer, the active's");
    assert_eq!(&answers[0][6..12], &lb1);

    // The active dies; keepalived (here: the test) makes the standby active.
    pair.lb[0].signal("KILL");
    let said = pair.lb[1].role("active");
    assert!(said.contains("40 tunnels"), "{said}");
    // It announces the VIP upstream and each tunnel's peer to the segws.
    let upstream = pair
        .ini
        .drain(Duration::from_millis(200), |f| gratuitous(f) == Some(VIP));
    assert!(!upstream.is_empty() && upstream.iter().all(|f| f[6..12] == lb2));
    let to_segw1: Vec<Ipv4Addr> = pair.segws[0]
        .drain(Duration::from_millis(200), |f| gratuitous(f).is_some())
        .iter()
        .filter_map(|f| gratuitous(f))
        .collect();
    assert!(
        to_segw1.contains(&Ipv4Addr::new(10, 1, 0, 1)),
        "{to_segw1:?}"
    );

    // Every tunnel's next frame reaches the segw it was on; none was placed
    // again.
    assert_eq!(pair.esp(lb2, &segw_of), segw_of);
    let s = pair.lb[1].status();
    assert_eq!(s.counters.placed, 0);
    assert_eq!(s.pair.unwrap().role, "active");
}

#[test]
fn replication_survives_a_broken_link_and_a_standby_that_stops_reading() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut pair = Pair::up("pair-link", [true, true]);
    pair.open(0, 1, 21);
    let in_sync = |n: usize| {
        move |s: &Status| s.pair.as_ref().is_some_and(|p| p.in_sync) && tunnels(s).len() == n
    };
    pair.lb[1].wait("20 replicated", Duration::from_secs(5), in_sync(20));

    // The sync link breaks while tunnels open; when it comes back the
    // standby connects again and takes the table whole.
    pair.lb[1].ns.ip(&["link", "set", "sync", "down"]).unwrap();
    pair.open(0, 21, 41);
    std::thread::sleep(wire_silence());
    pair.lb[1].ns.ip(&["link", "set", "sync", "up"]).unwrap();
    pair.lb[1].wait(
        "40 after the link came back",
        Duration::from_secs(10),
        in_sync(40),
    );
    let standby = pair.lb[1].status();
    assert!(standby.pair.as_ref().unwrap().snapshots >= 2);
    assert_eq!(tunnels(&standby), tunnels(&pair.lb[0].status()));

    // A standby that stops reading: the active drops it and carries on.
    pair.lb[1].signal("STOP");
    let before = pair.lb[0].status();
    // Some 20 MB of deltas: more than both ends' socket buffers hold.
    let flood = 60_000u16;
    for n in 0..flood {
        let ip = udp_packet(
            IpAddr::V4(Ipv4Addr::new(10, 1, 16 + (n >> 8) as u8, n as u8)),
            500,
            IpAddr::V4(VIP),
            500,
            &ike_body(&ike(0x1_0000 + u64::from(n), IKE_SA_INIT, true), false, 300),
        );
        let f = frame(pair.lb[0].uplink_mac, pair.ini.mac, None, &ip);
        pair.ini.send(&f);
        // ~40,000 a second: what the socket queues take without a drop.
        if n % 400 == 399 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    pair.lb[0].wait(
        "the stopped standby dropped",
        Duration::from_secs(10),
        |s| {
            s.pair
                .as_ref()
                .is_some_and(|p| p.dropped_slow >= 1 && !p.connected)
        },
    );
    let after = pair.lb[0].status();
    assert!(
        after.counters.forwarded - before.counters.forwarded >= u64::from(flood) * 99 / 100,
        "the active's data path kept forwarding: {} of {flood}",
        after.counters.forwarded - before.counters.forwarded
    );
    pair.lb[1].signal("CONT");
    let n = tunnels(&pair.lb[0].status()).len();
    pair.lb[1].wait("in sync again", Duration::from_secs(20), in_sync(n));
}

/// Frames a balancer forwarded to the segws.
fn to_segws(s: &Status) -> u64 {
    s.gateways.iter().map(|g| g.frames_to).sum()
}

/// Longer than a standby waits for a heartbeat.
fn wire_silence() -> Duration {
    segwlb::pair::link::SILENT + Duration::from_millis(500)
}

/// The test plays the active: it accepts the standby's connection in
/// lb1's namespace, on lb1's address.
struct FakeActive {
    listener: TcpListener,
}

impl FakeActive {
    fn accept(&self, key: &[u8]) -> (std::net::TcpStream, [u8; TAG]) {
        let (mut s, _) = self.listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut hello = [0u8; MAGIC.len() + NONCE];
        s.read_exact(&mut hello).unwrap();
        let nonce_s = wire::read_hello(&hello).unwrap();
        let nonce_a = [0x5a; NONCE];
        s.write_all(&wire::answer(key, &nonce_s, &nonce_a)).unwrap();
        let mut proof = [0u8; TAG];
        // A standby that refused the answer sends no proof.
        let _ = s.read_exact(&mut proof);
        (s, wire::session_key(key, &nonce_s, &nonce_a))
    }
}

fn one_tunnel(slot: u32, n: u16) -> Message {
    let t = SavedTunnel {
        peer: peer(n),
        peer_port: 4500,
        opened_port: 500,
        vip: IpAddr::V4(VIP),
        ike_spi: Some(u64::from(n)),
        responder_spi: Some(0x77),
        opened_by: "ike".into(),
        gateway: "segw2".into(),
        at_opening_address: true,
        placement: "confirmed".into(),
        age_ms: 1_000,
        idle_ms: 0,
        next_hop: None,
        frames: 3,
        bytes: 300,
    };
    Message::Deltas(vec![Delta::Tunnel { slot, tunnel: t }])
}

#[test]
fn forged_replayed_and_reordered_frames_are_refused_and_change_nothing() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // lb1's namespace, without lb1: the test listens on its address.
    let pair = Pair::up("pair-forge", [false, true]);
    let fake = FakeActive {
        listener: pair.lb[0]
            .ns
            .enter(|| TcpListener::bind((SYNC[0], PORT)))
            .unwrap()
            .unwrap(),
    };
    let refused = |pair: &Pair| pair.lb[1].status().pair.unwrap().refused;

    // Without the key: the standby refuses the handshake.
    let _ = fake.accept(b"not the pair's key at all");
    pair.lb[1].wait("a wrong key refused", Duration::from_secs(5), |s| {
        s.pair.as_ref().is_some_and(|p| p.refused == 1)
    });

    // With the key: a snapshot of one tunnel is taken.
    let (mut s, session) = fake.accept(KEY.as_bytes());
    let seal = |seq, m: &Message| wire::seal(&session, Direction::ToStandby, seq, 0, m);
    let recorded = seal(2, &one_tunnel(0, 1));
    s.write_all(&seal(1, &Message::SnapshotBegin)).unwrap();
    s.write_all(&recorded).unwrap();
    s.write_all(&seal(3, &Message::SnapshotEnd)).unwrap();
    pair.lb[1].wait("the genuine snapshot", Duration::from_secs(5), |s| {
        s.pair.as_ref().is_some_and(|p| p.in_sync) && tunnels(s).len() == 1
    });
    // One byte of a delta changed: refused, the connection ends.
    let mut forged = seal(4, &one_tunnel(1, 2));
    let at = forged.len() - TAG - 5;
    forged[at] ^= 0x01;
    s.write_all(&forged).unwrap();
    pair.lb[1].wait("a forged delta refused", Duration::from_secs(5), |s| {
        s.pair
            .as_ref()
            .is_some_and(|p| p.refused == 2 && !p.connected)
    });

    // The next connection: a frame recorded from the last one is replayed,
    // then one out of order.
    let (mut s, session) = fake.accept(KEY.as_bytes());
    s.write_all(&recorded).unwrap();
    pair.lb[1].wait("a replayed frame refused", Duration::from_secs(5), |s| {
        s.pair.as_ref().is_some_and(|p| p.refused == 3)
    });
    let (mut s2, session2) = fake.accept(KEY.as_bytes());
    drop(s);
    let skipped = wire::seal(&session2, Direction::ToStandby, 2, 0, &one_tunnel(1, 2));
    s2.write_all(&skipped).unwrap();
    pair.lb[1].wait(
        "a frame out of order refused",
        Duration::from_secs(5),
        |s| s.pair.as_ref().is_some_and(|p| p.refused == 4),
    );
    let _ = session;
    // None of it reached the table: the one genuine tunnel is all it has.
    let held = tunnels(&pair.lb[1].status());
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held.contains_key("10.1.0.1:4500"), "{held:?}");
    assert_eq!(refused(&pair), 4);
}

#[test]
fn in_split_brain_each_frame_is_forwarded_once_and_nothing_loops() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut pair = Pair::up("pair-split", [true, true]);
    let segw_of = pair.open(0, 1, 13);
    pair.lb[1].wait("12 replicated", Duration::from_secs(5), |s| {
        s.pair.as_ref().is_some_and(|p| p.in_sync) && tunnels(s).len() == 12
    });
    // The sync link goes down and both become active (keepalived on each
    // side hears no adverts).
    pair.lb[1].ns.ip(&["link", "set", "sync", "down"]).unwrap();
    pair.lb[1].role("active");
    pair.lb[1].wait("segw MACs probed", Duration::from_secs(5), |s| {
        s.gateways.iter().all(|g| g.healthy && g.mac.is_some())
    });
    let before: Vec<u64> = pair.lb.iter().map(|lb| to_segws(&lb.status())).collect();
    // Each tunnel's ESP, once to each balancer's MAC: each copy reaches
    // its segw once, through the balancer it was sent to; neither forwards
    // the other's output (addressed to a segw's MAC, it is not theirs).
    let (lb1, lb2) = (pair.lb[0].uplink_mac, pair.lb[1].uplink_mac);
    for &n in segw_of.keys() {
        for mac in [lb1, lb2] {
            let ip = udp_packet(
                peer(n),
                4500,
                IpAddr::V4(VIP),
                4500,
                &esp_body(0xc000_0000 | u32::from(n), u32::from(mac[5]), 100),
            );
            pair.ini.send(&frame(mac, pair.ini.mac, None, &ip));
        }
    }
    let mut copies: BTreeMap<(u16, Mac), usize> = BTreeMap::new();
    for (i, s) in pair.segws.iter_mut().enumerate() {
        for f in s.drain(Duration::from_millis(500), from_initiator) {
            let n = u16::from_be_bytes([f[28], f[29]]);
            assert_eq!(segw_of[&n], i, "tunnel {n} reached another segw");
            let via: Mac = f[6..12].try_into().unwrap();
            *copies.entry((n, via)).or_default() += 1;
        }
    }
    let (p1, p2): (Vec<Mac>, Vec<Mac>) =
        (pair.lb[0].port_macs.clone(), pair.lb[1].port_macs.clone());
    for &n in segw_of.keys() {
        let i = segw_of[&n];
        assert_eq!(copies.get(&(n, p1[i])), Some(&1), "tunnel {n} via lb1");
        assert_eq!(copies.get(&(n, p2[i])), Some(&1), "tunnel {n} via lb2");
    }
    assert_eq!(copies.len(), 2 * segw_of.len(), "{copies:?}");
    let after: Vec<u64> = pair.lb.iter().map(|lb| to_segws(&lb.status())).collect();
    for k in 0..2 {
        assert_eq!(
            after[k] - before[k],
            segw_of.len() as u64,
            "lb{} forwarded",
            k + 1
        );
    }
    // The link heals; VRRP makes one of them the standby again, which
    // takes the active's table whole.
    pair.lb[1].ns.ip(&["link", "set", "sync", "up"]).unwrap();
    pair.lb[1].role("standby");
    pair.lb[1].wait("the active's table again", Duration::from_secs(10), |s| {
        s.pair.as_ref().is_some_and(|p| p.in_sync && p.connected)
    });
    assert_eq!(tunnels(&pair.lb[1].status()), tunnels(&pair.lb[0].status()));
}
