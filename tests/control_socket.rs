//! The control socket against other users and bad clients: its file mode,
//! the peer's credentials (`segwlb ctl` run as `nobody`; a thread of
//! another user connecting), clients served concurrently and bounded (in
//! all and per user), silent and slow ones cut. The server is
//! `ctl::serve` with a stand-in handler that counts what reaches it.
//!
//! Switching users needs root: without it these tests say so and pass,
//! unless SEGWLB_REQUIRE_NETNS is set (CI sets it): then they fail.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use segwlb::control::access::Groups;
use segwlb::control::ctl::{self, Request, Response, MAX_CLIENTS, REQUEST_WITHIN};

/// `nobody` and `nogroup` on Debian; any unprivileged ids do.
const NOBODY: u32 = 65534;
const STRANGER: u32 = 65533;

fn can_run() -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("SEGWLB_REQUIRE_NETNS").is_some() {
        panic!("control socket tests need root (to connect as other users)");
    }
    eprintln!("skipped: control socket tests need root");
    false
}

/// A control socket served by `ctl::serve` in a directory anyone may
/// enter; its handler counts the requests that reach it.
struct Server {
    dir: PathBuf,
    path: PathBuf,
    reached: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(tag: &str, groups: Groups) -> Server {
        let dir = std::env::temp_dir().join(format!("segwlb-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("segwlb.sock");
        let reached = Arc::new(AtomicUsize::new(0));
        let counted = reached.clone();
        let handler: ctl::Handler = Arc::new(move |req: Request| {
            counted.fetch_add(1, Ordering::SeqCst);
            Response {
                ok: true,
                message: format!("did {}", if req.changes() { "a change" } else { "status" }),
                status: None,
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = ctl::serve(&path, groups, handler, stop.clone()).unwrap();
        Server {
            dir,
            path,
            reached,
            stop,
            thread: Some(thread),
        }
    }

    /// `segwlb ctl ARGS` as `uid`/`gid` (no supplementary groups).
    fn ctl_as(&self, uid: u32, gid: u32, args: &[&str]) -> (bool, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_segwlb"));
        cmd.arg("ctl").arg("--socket").arg(&self.path).args(args);
        cmd.gid(gid).uid(uid);
        let (ok, out, err) = common::run(&mut cmd);
        (ok, format!("{out}{err}"))
    }

    fn mode(&self) -> (u32, u32) {
        let m = std::fs::metadata(&self.path).unwrap();
        (m.mode() & 0o777, m.gid())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn drain() -> [&'static str; 3] {
    ["gateway", "drain", "segw1"]
}

#[test]
fn by_default_only_root_and_the_owner_reach_the_socket() {
    if !can_run() {
        return;
    }
    let s = Server::start("default", Groups::default());
    assert_eq!(s.mode().0, 0o600, "the socket file whatever the umask");
    let (ok, out) = s.ctl_as(NOBODY, NOBODY, &["status"]);
    assert!(!ok && out.contains("Permission denied"), "{out}");
    let (ok, out) = s.ctl_as(0, 0, &drain());
    assert!(ok && out.contains("did a change"), "{out}");
    assert_eq!(s.reached.load(Ordering::SeqCst), 1);
}

#[test]
fn the_status_group_reads_and_changes_nothing() {
    if !can_run() {
        return;
    }
    let groups = Groups {
        control: None,
        status: Some(NOBODY),
    };
    let s = Server::start("status", groups);
    assert_eq!(s.mode(), (0o660, NOBODY));
    let (ok, out) = s.ctl_as(NOBODY, NOBODY, &["status"]);
    assert!(ok && out.contains("did status"), "{out}");
    let (ok, out) = s.ctl_as(NOBODY, NOBODY, &drain());
    assert!(!ok && out.contains("may ask for status only"), "{out}");
    assert_eq!(
        s.reached.load(Ordering::SeqCst),
        1,
        "the drain never reached it"
    );
}

#[test]
fn the_control_group_changes_and_a_stranger_is_refused_by_credentials() {
    if !can_run() {
        return;
    }
    // Two groups: the file must let both in (0666), so the credentials
    // alone keep a third user out.
    let groups = Groups {
        control: Some(NOBODY),
        status: Some(STRANGER - 1),
    };
    let s = Server::start("control", groups);
    assert_eq!(s.mode(), (0o666, NOBODY));
    let (ok, out) = s.ctl_as(NOBODY, NOBODY, &drain());
    assert!(ok && out.contains("did a change"), "{out}");
    let (ok, out) = s.ctl_as(STRANGER, STRANGER, &["status"]);
    assert!(!ok && out.contains("permission denied: uid 65533"), "{out}");
    assert_eq!(s.reached.load(Ordering::SeqCst), 1);
}

/// Send `line` and read the answer line.
fn ask(path: &Path, line: &str) -> Response {
    let mut c = UnixStream::connect(path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.write_all(line.as_bytes());
    let mut answer = String::new();
    BufReader::new(c).read_line(&mut answer).unwrap();
    serde_json::from_str(answer.trim_end()).unwrap()
}

const STATUS: &str = "{\"cmd\":\"status\",\"tunnels\":0}\n";

#[test]
fn silent_slow_and_flooding_clients_hold_up_no_one() {
    if !can_run() {
        return;
    }
    let s = Server::start("flood", Groups::default());

    // Clients that connect and say nothing: another is answered at once.
    let silent: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&s.path).unwrap())
        .collect();
    let t = Instant::now();
    assert!(ask(&s.path, STATUS).ok);
    let answered = t.elapsed();
    assert!(answered < Duration::from_millis(500), "{answered:?}");
    eprintln!("answered beside 3 silent clients in {answered:?}");

    // A client sending a byte every 100 ms is cut at the deadline.
    let mut slow = UnixStream::connect(&s.path).unwrap();
    let t = Instant::now();
    let mut cut = String::new();
    slow.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    for b in STATUS.bytes().take(STATUS.len() - 1) {
        let _ = slow.write_all(&[b]);
        if let Ok(n) = slow.read_to_string(&mut cut) {
            if n > 0 || !cut.is_empty() {
                break;
            }
        }
    }
    let took = t.elapsed();
    assert!(
        cut.contains("no request: request not complete within"),
        "{cut:?}"
    );
    assert!(
        took < REQUEST_WITHIN + Duration::from_millis(700),
        "{took:?}"
    );
    drop(silent);

    // A flood: MAX_CLIENTS silent connections, then one more is told the
    // balancer is busy, at once; once the silent ones are cut, requests
    // are served again.
    std::thread::sleep(Duration::from_millis(100));
    let flood: Vec<UnixStream> = (0..MAX_CLIENTS)
        .map(|_| UnixStream::connect(&s.path).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let busy = ask(&s.path, STATUS);
    assert!(!busy.ok && busy.message.starts_with("busy:"), "{busy:?}");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    std::thread::sleep(REQUEST_WITHIN + Duration::from_millis(300));
    assert!(ask(&s.path, STATUS).ok);
    drop(flood);

    // Garbage and an oversized line: an error each, nothing handled.
    let before = s.reached.load(Ordering::SeqCst);
    let garbage = ask(&s.path, "\x16\x03\x01 hello\n");
    assert!(
        !garbage.ok && garbage.message.starts_with("not a request"),
        "{garbage:?}"
    );
    let long = ask(&s.path, &format!("{}\n", "x".repeat(100_000)));
    assert!(
        !long.ok && long.message.contains("longer than 65536 bytes"),
        "{long:?}"
    );
    assert_eq!(s.reached.load(Ordering::SeqCst), before);
}

/// Run `f` on a thread of its own whose credentials alone are `uid`/`gid`
/// with no supplementary groups (raw system calls change the calling
/// thread only; glibc's wrappers would change the whole process). What
/// such a thread connects is, to the kernel, a connection of that user.
fn on_thread_as<T: Send + 'static>(
    uid: u32,
    gid: u32,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        // SAFETY: plain system calls on this thread's own credentials.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        f()
    })
    .join()
    .unwrap()
}

/// The process's supplementary groups, for the duration of a test.
struct ProcessGroups(Vec<libc::gid_t>);

impl ProcessGroups {
    fn add(gid: u32) -> Self {
        // SAFETY: buffers sized by the first call; setgroups as root.
        unsafe {
            let n = libc::getgroups(0, std::ptr::null_mut());
            let mut old = vec![0; n.max(0) as usize];
            libc::getgroups(n, old.as_mut_ptr());
            let mut new = old.clone();
            new.push(gid);
            assert_eq!(libc::setgroups(new.len(), new.as_ptr()), 0);
            ProcessGroups(old)
        }
    }
}

impl Drop for ProcessGroups {
    fn drop(&mut self) {
        // SAFETY: as root, the groups the process had.
        unsafe { libc::setgroups(self.0.len(), self.0.as_ptr()) };
    }
}

const DRAIN: &str = "{\"cmd\":\"gateway_drain\",\"name\":\"segw1\",\"draining\":true}\n";

#[test]
fn the_groups_that_count_are_the_connecting_clients_not_its_process_leaders() {
    if !can_run() {
        return;
    }
    // The control group is one the process's main thread has; the thread
    // that connects has dropped it (as a reused PID's new owner, or any
    // process whose leader differs from the caller, would show in
    // /proc/PID/status).
    const CONTROL: u32 = 65_531;
    let groups = Groups {
        control: Some(CONTROL),
        status: Some(65_530),
    };
    let s = Server::start("peergroups", groups);
    let _leader = ProcessGroups::add(CONTROL);
    let path = s.path.clone();
    let answer = on_thread_as(STRANGER, STRANGER, move || ask(&path, DRAIN));
    assert!(
        !answer.ok && answer.message.contains("permission denied: uid 65533"),
        "{answer:?}"
    );
    assert_eq!(
        s.reached.load(Ordering::SeqCst),
        0,
        "the drain never reached it"
    );
}

#[test]
fn status_only_users_and_strangers_cannot_take_every_client_slot() {
    if !can_run() {
        return;
    }
    let groups = Groups {
        control: Some(65_530),
        status: Some(NOBODY),
    };
    let s = Server::start("slots", groups);
    // A stranger and a status-only user each open more connections than
    // there are slots, and say nothing.
    let open = |uid: u32| {
        let path = s.path.clone();
        on_thread_as(uid, uid, move || {
            (0..MAX_CLIENTS + 2)
                .map(|_| UnixStream::connect(&path).unwrap())
                .collect::<Vec<_>>()
        })
    };
    let strangers = open(STRANGER);
    let status_only = open(NOBODY);
    std::thread::sleep(Duration::from_millis(200));
    // Root is still served, at once.
    let t = Instant::now();
    let answer = ask(&s.path, STATUS);
    assert!(answer.ok, "{answer:?}");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // The stranger was told no at once, without a slot; the status-only
    // user got a few slots and was told the rest were busy for it.
    let told = |conns: Vec<UnixStream>| {
        conns
            .into_iter()
            .filter_map(|c| {
                c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                let mut line = String::new();
                BufReader::new(c).read_line(&mut line).ok()?;
                Some(
                    serde_json::from_str::<Response>(line.trim_end())
                        .ok()?
                        .message,
                )
            })
            .collect::<Vec<String>>()
    };
    let refused = told(strangers);
    assert_eq!(refused.len(), MAX_CLIENTS + 2, "{refused:?}");
    assert!(
        refused.iter().all(|m| m.contains("permission denied")),
        "{refused:?}"
    );
    let busy = told(status_only);
    assert!(busy.len() >= MAX_CLIENTS + 2 - ctl::PER_USER, "{busy:?}");
    assert!(busy.iter().all(|m| m.starts_with("busy:")), "{busy:?}");
}
