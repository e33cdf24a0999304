//! libreswan beside strongSwan (root): pluto initiators, each pluto in a
//! namespace of its own on the lab's initiator bridge, next to the lab's
//! charon initiators, through `segwlb run` to the lab's charon segws.
//!
//! Where the kernel has no ESP (these machines), pluto cannot install a
//! CHILD SA and its tunnels are childless IKE SAs (`lab::libreswan`): what
//! is tested is libreswan's IKE on the wire through the balancer — its
//! placement, its float to 4500, its liveness and its restart after a
//! segw failure, timed beside strongSwan's.
//!
//! Without root, strongSwan or the unpacked libreswan these tests say so
//! and pass, unless SEGWLB_REQUIRE_NETNS is set (CI sets it): then they
//! fail.

mod common;
#[path = "common/lab.rs"]
mod lab;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use lab::{can_run, ctl, Lab, SERIAL};
use segwlb::compare::outage::{Move, Timers};
use segwlb::lab::config::Addresses;
use segwlb::lab::libreswan::{self, Conn, Liveness, Pluto};
use segwlb::lab::netns::{self, Netns};
use segwlb::lab::topology::State;

/// pluto's liveness in this lab: a liveness exchange after 5 s without
/// word from the segw (the lab's charons use `dpd_delay = 5s` too),
/// retransmitted for 10 s (pluto's default is 60 s).
const LIVENESS: Liveness = Liveness {
    dpd_delay_s: 5,
    retransmit_timeout_s: 10,
};

fn libreswan_can_run() -> bool {
    common::runs_here(
        "libreswan's pluto (scripts/setup.sh unpacks it into .tools/libreswan)",
        libreswan::prerequisites().err(),
    )
}

/// The plutos started, killed on drop (the lab's `down` would too: they
/// live in the lab's namespaces).
struct Plutos {
    running: Vec<(Pluto, Child, Netns)>,
}

impl Drop for Plutos {
    fn drop(&mut self) {
        for (p, child, _) in &mut self.running {
            if std::thread::panicking() {
                let log = std::fs::read_to_string(p.dir.join("pluto.log")).unwrap_or_default();
                let _ = std::fs::write(format!("/tmp/{}-pluto.log", p.ns), &log);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- {} pluto.log (last lines) ---", p.ns);
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run(cmd: &mut std::process::Command) -> String {
    let (ok, out, err) = common::run(cmd);
    assert!(ok, "{cmd:?} failed:\n{out}\n{err}");
    out
}

/// A namespace `PREFIX-NAME` on the initiators' bridge holding `conns`'
/// outer and inner addresses, with a pluto for them that initiates each.
fn start_pluto(lab: &Lab, name: &str, conns: &[Conn]) -> (Pluto, Child, Netns) {
    let prefix = &lab.config.lab.prefix;
    let a = &lab.config.addresses;
    let ns = Netns::new(&format!("{prefix}-{name}")).unwrap();
    let sw = Netns::adopt(&format!("{prefix}-sw")).unwrap();
    netns::veth(&ns, "eth0", &sw, name).unwrap();
    sw.ip(&["link", "set", name, "master", "br0"]).unwrap();
    if conns.iter().any(|c| c.outer.is_ipv6()) {
        netns::enable_ipv6(&ns, "eth0").unwrap();
    }
    for c in conns {
        ns.ip(&["addr", "add", &format!("{}/32", c.inner), "dev", "lo"])
            .unwrap();
        let with_len = match c.outer {
            IpAddr::V4(v4) => format!("{v4}/{}", a.outer_prefix.len),
            IpAddr::V6(v6) => format!("{v6}/{}", a.outer6_prefix.len),
        };
        let mut add = vec!["addr", "add", &with_len, "dev", "eth0"];
        if c.outer.is_ipv6() {
            add.push("nodad");
        }
        ns.ip(&add).unwrap();
    }
    // As the lab's direct initiators: the VIPs are on the link.
    ns.ip(&["route", "add", &a.vip_prefix.to_string(), "dev", "eth0"])
        .unwrap();
    if conns.iter().any(|c| c.outer.is_ipv6()) {
        ns.ip(&[
            "-6",
            "route",
            "add",
            &format!("{}/128", a.vip6),
            "dev",
            "eth0",
        ])
        .unwrap();
    }
    let dir = lab.dir.path().join(name);
    let conf = libreswan::ipsec_conf(
        &dir,
        (a.vip, Some(a.vip6)),
        &a.service_prefix.to_string(),
        conns,
        LIVENESS,
    );
    let started = launch(ns, &dir, &conf, &libreswan::secrets(conns));
    for c in conns {
        run(&mut started
            .0
            .whack(&["--initiate", "--asynchronous", "--name", &c.name]));
    }
    started
}

/// pluto in `ns` on `conf` and `secrets` (files in `dir`), its
/// connections added; childless where the kernel has no ESP.
fn launch(ns: Netns, dir: &Path, conf: &str, secrets: &str) -> (Pluto, Child, Netns) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ipsec.conf"), conf).unwrap();
    std::fs::write(dir.join("ipsec.secrets"), secrets).unwrap();
    let pluto = Pluto::new(ns.name(), dir);
    pluto.prepare().unwrap();
    let out = std::fs::File::create(dir.join("pluto.out")).unwrap();
    let child = pluto
        .command()
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !pluto.ctl().exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "pluto in {} made no control socket:\n{}",
            ns.name(),
            std::fs::read_to_string(dir.join("pluto.out")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    run(&mut pluto.addconn());
    if Pluto::childless() {
        run(&mut pluto.whack(&["--impair", "omit-v2-ike-auth-child"]));
    }
    (pluto, child, ns)
}

/// The tests' two plutos and their connections: `l1` with l201 and l202,
/// `l2` with l203 (over IPv6) and l204, each from host 201.. of the lab's
/// prefixes; l1's follow a redirect when `l1_accepts_redirect`.
fn pluto_hosts(a: &Addresses, l1_accepts_redirect: bool) -> [(&'static str, Vec<Conn>); 2] {
    let conn = |name: &str, n: u32, v6: bool| Conn {
        accept_redirect: l1_accepts_redirect && n <= 202,
        name: name.to_string(),
        outer: if v6 {
            a.outer6_prefix.host(n).unwrap().into()
        } else {
            a.outer_prefix.host(n).unwrap().into()
        },
        inner: a.inner_prefix.host(n).unwrap(),
    };
    [
        (
            "l1",
            vec![conn("l201", 201, false), conn("l202", 202, false)],
        ),
        (
            "l2",
            vec![conn("l203", 203, true), conn("l204", 204, false)],
        ),
    ]
}

/// Where each of `peers` (outer addresses) has an established IKE SA: the
/// segws holding one (failed ones skipped) and the initiator SPI of the
/// newest.
fn held_by(state: &State, peers: &[IpAddr], skip: &str) -> BTreeMap<IpAddr, (Vec<String>, String)> {
    let mut held: BTreeMap<IpAddr, (Vec<String>, String)> = BTreeMap::new();
    for s in state.segws.iter().filter(|s| s.name != skip) {
        for sa in state.list_sas(&s.dir).unwrap() {
            let Ok(remote) = sa.remote_host.parse::<IpAddr>() else {
                continue;
            };
            if sa.state == "ESTABLISHED" && peers.contains(&remote) {
                let e = held.entry(remote).or_default();
                e.0.push(s.name.clone());
                e.1 = sa.initiator_spi.clone();
            }
        }
    }
    held
}

/// The balancer's segw for each IKE initiator SPI it holds.
fn balancer_by_spi(state: &State) -> BTreeMap<String, Vec<String>> {
    let status = state.balancer_status().unwrap();
    let mut by_spi: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for g in &status.gateways {
        for t in &g.tunnel_list {
            if let Some(spi) = &t.ike_spi {
                by_spi.entry(spi.clone()).or_default().push(g.name.clone());
            }
        }
    }
    by_spi
}

/// Every peer on exactly one segw, and the balancer holds its IKE SA there.
fn agreement(
    state: &State,
    peers: &[IpAddr],
    skip: &str,
) -> Result<BTreeMap<IpAddr, (String, String)>, String> {
    let held = held_by(state, peers, skip);
    let by_spi = balancer_by_spi(state);
    let mut placed = BTreeMap::new();
    for p in peers {
        let Some((segws, spi)) = held.get(p) else {
            return Err(format!("{p}: no segw holds an established IKE SA"));
        };
        if segws.len() != 1 {
            return Err(format!("{p}: established on {segws:?}"));
        }
        let balancer = by_spi.get(spi).cloned().unwrap_or_default();
        if balancer != *segws {
            return Err(format!(
                "{p}: segws {segws:?}, balancer {balancer:?} (IKE SPI {spi})"
            ));
        }
        placed.insert(*p, (segws[0].clone(), spi.clone()));
    }
    Ok(placed)
}

fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let t = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if t.elapsed() > within => panic!("after {within:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[test]
fn libreswan_initiators_beside_strongswan_are_placed_agree_and_come_back_after_a_segw_failure_by_their_own_liveness(
) {
    if !can_run(false) || !libreswan_can_run() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 4 strongSwan initiators (the first over IPv6), 2 segws, round robin.
    let mut lab = Lab::new("lw", "round-robin", &[1, 1], 4, 0, 1);
    lab.up();
    // The strongSwan initiators' tunnels up, passing pings, agreeing.
    lab.run();
    let mut state = State::load(&lab.config.work_dir()).unwrap();
    let a = lab.config.addresses.clone();
    // Two plutos, two connections each, one over IPv6; l1's follows a
    // segw's redirect, l2's does not (pluto's default).
    let hosts = pluto_hosts(&a, true);
    let t_up = Instant::now();
    let mut plutos = Plutos {
        running: Vec::new(),
    };
    for (name, conns) in &hosts {
        plutos.running.push(start_pluto(&lab, name, conns));
    }
    let peers: Vec<IpAddr> = hosts
        .iter()
        .flat_map(|(_, c)| c.iter().map(|c| c.outer))
        .collect();
    let before = wait_for(Duration::from_secs(30), || agreement(&state, &peers, ""));
    eprintln!(
        "libreswan ({}, {}): {} tunnels up and agreeing in {:.1} s: {before:?}",
        libreswan::prerequisites().unwrap(),
        if Pluto::childless() {
            "childless: this kernel has no ESP"
        } else {
            "with CHILD SAs"
        },
        peers.len(),
        t_up.elapsed().as_secs_f64()
    );
    for (p, _, _) in &plutos.running {
        let states = libreswan::parse_showstates(&run(&mut p.whack(&["--showstates"]))).unwrap();
        let up: Vec<_> = states.iter().filter(|s| s.established_ike()).collect();
        assert_eq!(up.len(), 2, "{}: {states:?}", p.ns);
        // Floated: IKE_AUTH and everything after on 4500, also without a NAT.
        assert!(up.iter().all(|s| s.port == 4500), "{states:?}");
    }
    // The strongSwan initiators are where the balancer says too.
    let ss_peers: Vec<IpAddr> = state.initiators.iter().map(|i| i.outer).collect();
    let all: Vec<IpAddr> = peers.iter().chain(&ss_peers).copied().collect();
    let start = agreement(&state, &all, "").unwrap();

    // A graceful drain of the segw holding the first libreswan tunnel: the
    // balancer asks that segw to redirect each of its peers to the VIP
    // (RFC 5685). strongSwan follows; pluto only with accept-redirect=yes,
    // and the moves of the others time out and leave them where they were.
    let drained = start[&peers[0]].0.clone();
    let on_drained: Vec<IpAddr> = all
        .iter()
        .copied()
        .filter(|p| start[p].0 == drained)
        .collect();
    let refusing: Vec<IpAddr> = hosts
        .iter()
        .flat_map(|(_, c)| c)
        .filter(|c| !c.accept_redirect && start[&c.outer].0 == drained)
        .map(|c| c.outer)
        .collect();
    assert!(
        !refusing.is_empty() && refusing.len() < on_drained.len(),
        "{start:?}"
    );
    let t = Instant::now();
    ctl(&state, &["gateway", "drain", &drained, "--graceful"]);
    let m = wait_for(Duration::from_secs(60), || {
        let m = state.balancer_status().map_err(|e| e.to_string())?.moves;
        match m.queued + m.asked + m.moving + m.lingering {
            0 => Ok(m),
            n => Err(format!("{n} moves under way: {m:?}")),
        }
    });
    eprintln!(
        "graceful drain of {drained}: {} moved, {} timed out in {:.1} s",
        m.moved,
        m.timed_out,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        (m.moved, m.timed_out, m.hook_failed),
        (
            (on_drained.len() - refusing.len()) as u64,
            refusing.len() as u64,
            0
        )
    );
    let after_drain = agreement(&state, &all, "").unwrap();
    for p in &on_drained {
        if refusing.contains(p) {
            assert_eq!(
                after_drain[p], start[p],
                "{p}: refused the redirect, stayed whole"
            );
        } else {
            assert_ne!(after_drain[p].0, drained, "{p}: followed the redirect");
            assert_ne!(after_drain[p].1, start[p].1, "{p}: on a new IKE SA");
        }
    }
    ctl(&state, &["gateway", "undrain", &drained]);

    // The segw holding the most libreswan tunnels now dies.
    let before = after_drain;
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &peers {
        *count.entry(before[p].0.as_str()).or_default() += 1;
    }
    let victim = count.iter().max_by_key(|(_, n)| **n).unwrap().0.to_string();
    let moved: Vec<IpAddr> = peers
        .iter()
        .copied()
        .filter(|p| before[p].0 == victim)
        .collect();
    let stayed: Vec<IpAddr> = peers
        .iter()
        .copied()
        .filter(|p| before[p].0 != victim)
        .collect();
    let ss_moved: Vec<IpAddr> = ss_peers
        .iter()
        .copied()
        .filter(|p| before[p].0 == victim)
        .collect();
    let t0 = Instant::now();
    state.fail_segw(&victim).unwrap();
    let mut back: BTreeMap<IpAddr, f64> = BTreeMap::new();
    // pluto gives up 16 s after its first liveness request (see below).
    let bound = Duration::from_secs(u64::from(LIVENESS.dpd_delay_s) + 16 + 10);
    // pluto schedules its liveness exchange per CHILD SA (it asks the
    // kernel when the SA last carried traffic): a childless IKE SA has
    // none, and would sit on the dead segw until its rekey hours later.
    // Here the test keeps the lab's DPD interval for it, through pluto's
    // own liveness exchange; what follows (retransmits, giving up,
    // starting again) is pluto's.
    let mut whacks = Vec::new();
    let mut next_liveness = Duration::from_secs(LIVENESS.dpd_delay_s.into());
    let after = wait_for(bound, || {
        if Pluto::childless() && t0.elapsed() >= next_liveness {
            next_liveness += Duration::from_secs(LIVENESS.dpd_delay_s.into());
            for (p, _, _) in &plutos.running {
                let states = libreswan::parse_showstates(&run(&mut p.whack(&["--showstates"])))?;
                for st in states.iter().filter(|st| st.established_ike()) {
                    // whack waits for the exchange (retransmits
                    // included): not here.
                    let arg = format!("initiate-v2-liveness:{}", st.serial);
                    let whack = p
                        .whack(&["--impair", &arg])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn();
                    whacks.push(whack.map_err(|e| e.to_string())?);
                }
            }
        }
        let held = held_by(&state, &all, &victim);
        for p in moved.iter().chain(&ss_moved) {
            if held.contains_key(p) {
                back.entry(*p).or_insert(t0.elapsed().as_secs_f64());
            }
        }
        agreement(&state, &all, &victim)
    });
    for mut w in whacks {
        let _ = w.kill();
        let _ = w.wait();
    }
    let dark = |ps: &[IpAddr]| -> Vec<String> {
        ps.iter()
            .map(|p| format!("{p} {:.1} s", back.get(p).copied().unwrap_or(f64::NAN)))
            .collect()
    };
    eprintln!("{victim} failed: libreswan dark {:?}", dark(&moved));
    eprintln!("{victim} failed: strongSwan dark {:?}", dark(&ss_moved));
    // The outage model's timers for each stack (compare's `[peers]`): a
    // dead segw, an idle tunnel. pluto's liveness is due `dpd_delay` after
    // the failure (the test drives it so); a charon's DPD at some point of
    // its 5 s cycle.
    let pluto = Timers::libreswan(
        LIVENESS.dpd_delay_s.into(),
        0.5,
        LIVENESS.retransmit_timeout_s.into(),
    );
    let charon = Timers::default();
    let idle = |phase: f64| Move {
        old_answers: false,
        downlink_every: f64::INFINITY,
        phase,
    };
    let model = |t: &Timers, phase: f64| t.dark(idle(phase)).seconds.unwrap();
    let (lsw, ss) = (
        model(&pluto, 0.0),
        (model(&charon, 0.999), model(&charon, 0.0)),
    );
    eprintln!(
        "the outage model: libreswan {lsw:.1} s; strongSwan {:.1}..{:.1} s",
        ss.0, ss.1
    );
    // Polled every 200 ms, each poll a few swanctl and whack calls.
    let slack = 1.5;
    for p in &moved {
        assert_ne!(after[p].0, victim);
        assert_ne!(
            after[p].1, before[p].1,
            "{p}: a new IKE SA after the failure"
        );
        let s = back[p];
        assert!(
            (s - lsw).abs() < slack,
            "{p}: back after {s:.1} s, the model says {lsw:.1} s"
        );
    }
    for p in &ss_moved {
        let s = back[p];
        assert!(
            s > ss.0 - slack && s < ss.1 + slack,
            "{p}: back after {s:.1} s"
        );
    }
    for p in &stayed {
        assert_eq!(
            after[p], before[p],
            "{p}: on the surviving segw, kept its IKE SA"
        );
    }
    drop(plutos);
    lab.down_and_check();
}

/// A libreswan segw beside a charon one: pluto initiators (IPv4 and IPv6)
/// through the balancer to both, placed by round robin, each held by the
/// segw the balancer says. Against the pluto segw nothing fakes a NAT, so
/// a direct pluto keeps all of IKE on 500 (a charon segw with
/// kernel-libipsec fakes one, and pluto floats to 4500).
#[test]
fn a_libreswan_segw_beside_a_charon_one_serves_pluto_initiators_through_the_balancer() {
    if !can_run(false) || !libreswan_can_run() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // One strongSwan initiator, over IPv6: round robin puts it on segw1.
    let mut lab = Lab::new("lx", "round-robin", &[1, 1], 1, 0, 1);
    lab.up();
    lab.run();
    let state = State::load(&lab.config.work_dir()).unwrap();
    let a = lab.config.addresses.clone();
    // segw2, holding nothing, becomes a libreswan segw.
    let s2 = state.segws[1].clone();
    assert!(state.list_sas(&s2.dir).unwrap().is_empty());
    run(std::process::Command::new("kill").arg(s2.pid.to_string()));
    let t = Instant::now();
    while segwlb::lab::topology::alive(s2.pid) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "charon of segw2 still up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dir = lab.dir.path().join("segw2-pluto");
    let conf = libreswan::segw_conf(
        &dir,
        (a.vip, Some(a.vip6)),
        &a.service_prefix.to_string(),
        &a.inner_prefix.to_string(),
    );
    let segw = launch(
        Netns::adopt(&s2.ns).unwrap(),
        &dir,
        &conf,
        &libreswan::segw_secrets(),
    );
    let hosts = pluto_hosts(&a, false);
    let mut plutos = Plutos {
        running: vec![segw],
    };
    for (name, conns) in &hosts {
        plutos.running.push(start_pluto(&lab, name, conns));
    }
    let conns: Vec<&Conn> = hosts.iter().flat_map(|(_, c)| c).collect();
    let placed = wait_for(Duration::from_secs(30), || {
        // Who holds each: segw1's charon by remote address, segw2's pluto
        // by the peer of each established state.
        let mut held: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
        for sa in state
            .list_sas(&state.segws[0].dir)
            .map_err(|e| e.to_string())?
        {
            if let (Ok(peer), "ESTABLISHED") = (sa.remote_host.parse(), sa.state.as_str()) {
                held.entry(peer).or_default().push("segw1".into());
            }
        }
        let (segw2, _, _) = &plutos.running[0];
        let shown = segw2
            .whack(&["--showstates"])
            .output()
            .map_err(|e| e.to_string())?;
        for st in libreswan::parse_showstates(&String::from_utf8_lossy(&shown.stdout))? {
            if let (Some(peer), true) = (st.peer, st.established_ike()) {
                held.entry(peer).or_default().push("segw2".into());
            }
        }
        let status = state.balancer_status().map_err(|e| e.to_string())?;
        let mut placed = BTreeMap::new();
        for c in &conns {
            let on = held.get(&c.outer).cloned().unwrap_or_default();
            let balancer: Vec<String> = status
                .gateways
                .iter()
                .filter(|g| g.tunnel_list.iter().any(|t| t.peer.parse() == Ok(c.outer)))
                .map(|g| g.name.clone())
                .collect();
            if on.len() != 1 || on != balancer {
                return Err(format!("{}: segws {on:?}, balancer {balancer:?}", c.outer));
            }
            placed.insert(c.name.clone(), on[0].clone());
        }
        Ok(placed)
    });
    eprintln!("pluto initiators to a charon and a pluto segw: {placed:?}");
    let on = |segw: &str| placed.values().filter(|s| *s == segw).count();
    assert_eq!((on("segw1"), on("segw2")), (2, 2), "{placed:?}");
    // The IPv6 one too, on either.
    assert!(placed.contains_key("l203"));
    // Each initiator's port: 500 to the pluto segw, 4500 to the charon.
    for (p, _, _) in &plutos.running[1..] {
        let shown = run(&mut p.whack(&["--showstates"]));
        for st in libreswan::parse_showstates(&shown).unwrap() {
            let want = if placed[&st.conn] == "segw2" {
                500
            } else {
                4500
            };
            assert_eq!(st.port, want, "{st:?}");
        }
    }
    drop(plutos);
    lab.down_and_check();
}
