//! A pair of balancers (root): keepalived as the lab runs it, and the
//! failover of an active/standby pair of `segwlb run` on real strongSwan
//! tunnels.
//!
//! Without root (or without keepalived, or strongSwan) these tests say so
//! and pass, unless SEGWLB_REQUIRE_NETNS is set (CI sets it): then they
//! fail.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use segwlb::lab::netns::{self, Netns};
use segwlb::lab::vrrp::{self, Role};

/// Whether the pair can run here; `strongswan` for the tests with tunnels.
fn can_run(strongswan: bool) -> bool {
    let missing = if !netns::is_root() {
        Some("not root".to_string())
    } else if let Err(e) = netns::prerequisites() {
        Some(e)
    } else if let Err(e) = vrrp::prerequisites() {
        Some(e)
    } else if strongswan {
        segwlb::lab::topology::prerequisites()
            .err()
            .map(|e| e.to_string())
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) if std::env::var_os("SEGWLB_REQUIRE_NETNS").is_some() => {
            panic!("the pair cannot run: {why}")
        }
        Some(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

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
    if !can_run(false) {
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
