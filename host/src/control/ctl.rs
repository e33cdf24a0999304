//! The control socket: a Unix stream socket, one JSON request line in, one
//! JSON response line out. `segwlb ctl` is its client; tools can speak it
//! too (`socat - UNIX-CONNECT:/run/segwlb.sock`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::access::{self, Grant, Groups};
use super::bounded;
use super::status::Status;
use super::Supervisor;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Everything, listing up to `tunnels` tunnels per gateway and the
    /// `top` heaviest tunnels (absent: none).
    Status {
        tunnels: usize,
        #[serde(default)]
        top: usize,
    },
    /// Swap in policy NAME (in the policy directory) or a path to a .wasm.
    PolicyUse {
        name: String,
        rebalance: bool,
        /// Absent in requests from before graceful moves.
        #[serde(default)]
        graceful: bool,
    },
    GatewayDrain {
        name: String,
        draining: bool,
        #[serde(default)]
        graceful: bool,
    },
    GatewayWeight {
        name: String,
        weight: u32,
    },
    GatewayAdd {
        name: String,
        interface: String,
        weight: u32,
        /// 0: no limit. Absent in requests from before capacities.
        #[serde(default)]
        capacity: u64,
        /// Bytes/s; 0: not given. Absent in requests from before traffic.
        #[serde(default)]
        throughput: u64,
        mac: Option<String>,
    },
    /// A gateway's throughput capacity, bytes/s (0: none).
    GatewayThroughput {
        name: String,
        throughput: u64,
    },
    /// A gateway's utilization, as it reports it (its CPU, say).
    GatewayReport {
        name: String,
        utilization: f64,
    },
    GatewayRemove {
        name: String,
    },
    /// Write the table to the state file now.
    Save,
    /// Become "active" or "standby" (one of a pair: keepalived's notify
    /// scripts say it); absent: say which it is.
    Role {
        role: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// What changed, or what was wrong.
    pub message: String,
    pub status: Option<Status>,
}

impl Response {
    fn of(r: Result<String, String>) -> Self {
        match r {
            Ok(message) => Response {
                ok: true,
                message,
                status: None,
            },
            Err(message) => Response {
                ok: false,
                message,
                status: None,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach segwlb at {}: {source} (is `segwlb run` running? its config's balancer.control_socket, or --socket, names the socket)", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to segwlb at {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("segwlb at {} answered something unreadable: {reason}", path.display())]
    Garbled { path: PathBuf, reason: String },
}

/// `ctl gateway remove NAME --graceful`: drain `name` gracefully (its
/// tunnels move make-before-break, at the balancer's pace), wait until
/// every graceful move is over, then remove it: what timed out (a peer that
/// did not follow) moves the plain way then, on its next packet. `say`
/// hears the drain's answer and the progress every few seconds. The
/// orchestration is the client's: the balancer's worker never waits, and
/// a port is closed by the control plane that opened it.
pub fn remove_gracefully(
    socket: &Path,
    name: &str,
    say: &mut dyn FnMut(&str),
) -> Result<Result<String, String>, CtlError> {
    let drained = request(
        socket,
        &Request::GatewayDrain {
            name: name.into(),
            draining: true,
            graceful: true,
        },
    )?;
    if !drained.ok {
        return Ok(Err(drained.message));
    }
    say(&drained.message);
    let (started, mut told) = (Instant::now(), Instant::now());
    loop {
        let status = request(socket, &Request::Status { tunnels: 0, top: 0 })?;
        let Some(m) = status.status.map(|s| s.moves) else {
            return Ok(Err(status.message));
        };
        let left = m.queued + m.asked + m.moving + m.lingering;
        if left == 0 {
            break;
        }
        if told.elapsed() >= Duration::from_secs(5) {
            say(&format!(
                "{:.0} s: {} queued, {} asked, {} moving, {} lingering",
                started.elapsed().as_secs_f64(),
                m.queued,
                m.asked,
                m.moving,
                m.lingering
            ));
            told = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let removed = request(socket, &Request::GatewayRemove { name: name.into() })?;
    Ok(if removed.ok {
        Ok(removed.message)
    } else {
        Err(removed.message)
    })
}

/// Send one request and read the answer.
pub fn request(socket: &Path, req: &Request) -> Result<Response, CtlError> {
    let path = socket.to_path_buf();
    let mut conn = UnixStream::connect(socket).map_err(|source| CtlError::Connect {
        path: path.clone(),
        source,
    })?;
    let io = |source| CtlError::Io {
        path: path.clone(),
        source,
    };
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = serde_json::to_string(req).expect("requests serialise");
    line.push('\n');
    // A balancer that is busy answers without reading the request and
    // closes: the write may then fail (broken pipe) with its answer
    // already here to read.
    let wrote = conn.write_all(line.as_bytes());
    let mut answer = String::new();
    let read = BufReader::new(&conn).read_line(&mut answer);
    match (wrote, read) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) | (Ok(()), Err(e)) => return Err(io(e)),
        (Ok(()), Ok(_)) => {}
    }
    serde_json::from_str(&answer).map_err(|e| CtlError::Garbled {
        path: path.clone(),
        reason: e.to_string(),
    })
}

/// Clients served at once; one more is answered "busy" and closed.
pub const MAX_CLIENTS: usize = 16;
/// Clients of one user served at once (root and the balancer's own user
/// aside: the lab asks 8 at a time), so one user cannot take every slot.
pub const PER_USER: usize = 4;
/// Clients that may ask for status only, served at once: the other half
/// of the slots is always there for those who may change things.
pub const STATUS_ONLY: usize = MAX_CLIENTS / 2;
/// A client has this long to send its request line, however it sends it.
pub const REQUEST_WITHIN: Duration = Duration::from_secs(2);
/// The longest request line.
const MAX_REQUEST: usize = 64 * 1024;
/// How long an answer may take to write before the client is dropped.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// The clients being served: in all, of each user, and those with
/// status only.
#[derive(Debug, Default)]
struct Slots {
    total: usize,
    status_only: usize,
    per_user: std::collections::HashMap<u32, usize>,
}

/// A client's place among those served, given back when it is dropped.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    uid: u32,
    status_only: bool,
}

impl Slots {
    /// A slot for a client of user `uid` granted `grant`, or why not (`privileged`: root
    /// or the balancer's own user, bound only by [`MAX_CLIENTS`]).
    fn take(
        slots: &Arc<Mutex<Slots>>,
        uid: u32,
        grant: Grant,
        privileged: bool,
    ) -> Result<Slot, String> {
        let mut s = slots.lock().unwrap_or_else(|p| p.into_inner());
        let status_only = grant == Grant::Status;
        let mine = s.per_user.get(&uid).copied().unwrap_or(0);
        if s.total >= MAX_CLIENTS {
            return Err(format!(
                "busy: {MAX_CLIENTS} control clients are being served; try again"
            ));
        }
        if !privileged && mine >= PER_USER {
            return Err(format!(
                "busy: uid {uid} has {PER_USER} control requests in progress; try again"
            ));
        }
        if status_only && s.status_only >= STATUS_ONLY {
            return Err(format!(
                "busy: {STATUS_ONLY} status-only clients are being served; try again"
            ));
        }
        s.total += 1;
        s.status_only += usize::from(status_only);
        *s.per_user.entry(uid).or_default() += 1;
        Ok(Slot {
            slots: slots.clone(),
            uid,
            status_only,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        s.total -= 1;
        s.status_only -= usize::from(self.status_only);
        if let Some(n) = s.per_user.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                s.per_user.remove(&self.uid);
            }
        }
    }
}

/// What answers a request (the supervisor, in `segwlb run`).
pub type Handler = Arc<dyn Fn(Request) -> Response + Send + Sync>;

impl Request {
    /// Whether it changes anything (everything but `status` does).
    pub fn changes(&self) -> bool {
        !matches!(self, Request::Status { .. })
    }
}

/// Listen on `path` (replacing a stale socket file, refusing a live one),
/// its mode and group as `groups` says ([`access`]), and answer requests
/// with `handler` until `stop` is set: each client its credentials checked
/// as it is accepted ([`admit`]), then on its own thread, up to
/// [`MAX_CLIENTS`] ([`PER_USER`] of one user, [`STATUS_ONLY`] that may
/// only ask for status), each with [`REQUEST_WITHIN`] to send its request,
/// so a silent or slow client holds up nobody else.
pub fn serve(
    path: &Path,
    groups: Groups,
    handler: Handler,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    if UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "{}: another segwlb is serving this control socket",
                path.display()
            ),
        ));
    }
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    groups.apply(path)?;
    listener.set_nonblocking(true)?;
    let owned = path.to_path_buf();
    let owner = access::own_uid();
    let slots = Arc::new(Mutex::new(Slots::default()));
    std::thread::Builder::new()
        .name("ctl".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => admit(conn, groups, owner, &slots, &handler),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        wait_for_client(&listener, STOP_CHECK);
                    }
                    Err(e) => tracing::warn!("control socket: {e}"),
                }
            }
            let _ = std::fs::remove_file(&owned);
        })
}

/// A client just connected: who it is and what it may do first (a
/// stranger is told no at once and takes no slot), then a slot (within
/// [`MAX_CLIENTS`], [`PER_USER`], [`STATUS_ONLY`]; past them it is told
/// it is busy, at once) and a thread of its own.
fn admit(
    conn: UnixStream,
    groups: Groups,
    owner: u32,
    slots: &Arc<Mutex<Slots>>,
    handler: &Handler,
) {
    let peer = match access::peer_of(&conn) {
        Ok(peer) => peer,
        Err(e) => {
            tracing::warn!("control socket: a client's credentials: {e}");
            return;
        }
    };
    let grant = groups.grant(owner, &peer);
    if grant == Grant::Nothing {
        let no = format!(
            "permission denied: uid {} may not use this socket (root, its owner uid {owner}, \
             and members of balancer.control_group may; balancer.status_group may ask for status)",
            peer.uid
        );
        refuse(conn, no);
        return;
    }
    let privileged = peer.uid == 0 || peer.uid == owner;
    let slot = match Slots::take(slots, peer.uid, grant, privileged) {
        Ok(slot) => slot,
        Err(busy) => {
            tracing::debug!("control socket: {busy}");
            refuse(conn, busy);
            return;
        }
    };
    let handler = handler.clone();
    let spawned = std::thread::Builder::new()
        .name("ctl-client".into())
        .spawn(move || {
            let _slot = slot;
            if let Err(e) = answer(conn, grant, peer.uid, &*handler) {
                tracing::debug!("control request: {e}");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("control socket: no thread for a client: {e}");
    }
}

/// A client refused before its request: told why, at once, and closed.
fn refuse(conn: UnixStream, why: String) {
    let _ = send(conn, &Response::of(Err(why)), Duration::from_millis(100));
}

/// How often the control thread looks at its stop flag while no client
/// connects.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Sleep until a client connects to `listener` or `most` has passed. A
/// client is answered at once: the thread used to look every 20 ms, which
/// a tool asking many times a second (the lab's re-placement turns) paid
/// ~10 ms a request for.
fn wait_for_client(listener: &UnixListener, most: Duration) {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call. An error
    // (EINTR) only ends the wait early: the caller tries accept again.
    unsafe { libc::poll(&mut fd, 1, most.as_millis() as libc::c_int) };
}

/// One client admitted with `grant`: its request within
/// [`REQUEST_WITHIN`], whether the grant covers it, the answer.
fn answer(
    conn: UnixStream,
    grant: Grant,
    uid: u32,
    handler: &(dyn Fn(Request) -> Response + Send + Sync),
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    let mut reader = conn.try_clone()?;
    let response = match bounded::read_until(&mut reader, b"\n", MAX_REQUEST, REQUEST_WITHIN) {
        Err(e) => Response::of(Err(format!("no request: {e}"))),
        Ok(line) => match serde_json::from_slice::<Request>(first_line(&line)) {
            Err(e) => Response::of(Err(format!("not a request: {e}"))),
            Ok(req) if req.changes() && grant != Grant::Change => Response::of(Err(format!(
                "permission denied: uid {uid} may ask for status only (balancer.status_group); \
                 changing the balancer takes root or balancer.control_group"
            ))),
            Ok(req) => {
                tracing::debug!(?req, uid, "control request");
                handler(req)
            }
        },
    };
    send(conn, &response, ANSWER_WITHIN)
}

/// `bytes` up to its first newline.
fn first_line(bytes: &[u8]) -> &[u8] {
    bytes.split(|&b| b == b'\n').next().unwrap_or(bytes)
}

/// Write `response` as one line, within `within`, and close. What the
/// client sent and was not read (a request refused unread) is discarded
/// first: closing over unread bytes makes the client's next read fail
/// with a reset rather than end.
fn send(mut conn: UnixStream, response: &Response, within: Duration) -> std::io::Result<()> {
    conn.set_write_timeout(Some(within))?;
    let mut out = serde_json::to_string(response).expect("responses serialise");
    out.push('\n');
    conn.write_all(out.as_bytes())?;
    conn.set_nonblocking(true)?;
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        if !matches!(std::io::Read::read(&mut conn, &mut sink), Ok(n) if n > 0) {
            break;
        }
    }
    Ok(())
}

/// Answer `req` with the supervisor: what [`serve`] is given in `segwlb run`.
pub fn handler(supervisor: Arc<Mutex<Supervisor>>) -> Handler {
    Arc::new(move |req| {
        let mut sup = supervisor.lock().unwrap_or_else(|p| p.into_inner());
        handle(&mut sup, req)
    })
}

fn handle(sup: &mut Supervisor, req: Request) -> Response {
    match req {
        Request::Status { tunnels, top } => match sup.status(tunnels, top) {
            Some(status) => Response {
                ok: true,
                message: String::new(),
                status: Some(status),
            },
            None => Response::of(Err("the data path is not answering".into())),
        },
        Request::PolicyUse {
            name,
            rebalance,
            graceful,
        } => Response::of(sup.use_policy(&name, rebalance, graceful, Instant::now())),
        Request::GatewayDrain {
            name,
            draining,
            graceful,
        } => Response::of(sup.drain(&name, draining, graceful)),
        Request::GatewayWeight { name, weight } => Response::of(sup.weight(&name, weight)),
        Request::GatewayAdd {
            name,
            interface,
            weight,
            capacity,
            throughput,
            mac,
        } => Response::of(sup.add_gateway_by_hand(
            &name,
            &interface,
            (weight, capacity, throughput),
            mac.as_deref(),
        )),
        Request::GatewayThroughput { name, throughput } => {
            Response::of(sup.throughput(&name, throughput))
        }
        Request::GatewayReport { name, utilization } => {
            Response::of(sup.report(&name, utilization))
        }
        Request::GatewayRemove { name } => Response::of(sup.remove_gateway(&name)),
        Request::Save => Response::of(sup.save_state()),
        Request::Role { role } => Response::of(sup.role(role.as_deref())),
    }
}
