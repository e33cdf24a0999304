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

use super::status::Status;
use super::Supervisor;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Everything, listing up to `tunnels` tunnels per gateway.
    Status {
        tunnels: usize,
    },
    /// Swap in policy NAME (in the policy directory) or a path to a .wasm.
    PolicyUse {
        name: String,
        rebalance: bool,
    },
    GatewayDrain {
        name: String,
        draining: bool,
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
        mac: Option<String>,
    },
    GatewayRemove {
        name: String,
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
    conn.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(conn).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| CtlError::Garbled {
        path: path.clone(),
        reason: e.to_string(),
    })
}

/// Listen on `path` (replacing a stale socket file, refusing a live one)
/// and answer requests with `supervisor` until `stop` is set.
pub fn serve(
    path: &Path,
    supervisor: Arc<Mutex<Supervisor>>,
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
    listener.set_nonblocking(true)?;
    let owned = path.to_path_buf();
    std::thread::Builder::new()
        .name("ctl".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        if let Err(e) = answer(conn, &supervisor) {
                            tracing::debug!("control request: {e}");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        wait_for_client(&listener, STOP_CHECK);
                    }
                    Err(e) => tracing::warn!("control socket: {e}"),
                }
            }
            let _ = std::fs::remove_file(&owned);
        })
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

fn answer(conn: UnixStream, supervisor: &Mutex<Supervisor>) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(conn.try_clone()?).read_line(&mut line)?;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::of(Err(format!("not a request: {e}"))),
        Ok(req) => {
            tracing::debug!(?req, "control request");
            let mut sup = supervisor.lock().unwrap_or_else(|p| p.into_inner());
            handle(&mut sup, req)
        }
    };
    let mut out = serde_json::to_string(&response).expect("responses serialise");
    out.push('\n');
    let mut conn = conn;
    conn.write_all(out.as_bytes())
}

fn handle(sup: &mut Supervisor, req: Request) -> Response {
    match req {
        Request::Status { tunnels } => match sup.status(tunnels) {
            Some(status) => Response {
                ok: true,
                message: String::new(),
                status: Some(status),
            },
            None => Response::of(Err("the data path is not answering".into())),
        },
        Request::PolicyUse { name, rebalance } => {
            Response::of(sup.use_policy(&name, rebalance, Instant::now()))
        }
        Request::GatewayDrain { name, draining } => Response::of(sup.drain(&name, draining)),
        Request::GatewayWeight { name, weight } => Response::of(sup.weight(&name, weight)),
        Request::GatewayAdd {
            name,
            interface,
            weight,
            capacity,
            mac,
        } => Response::of(sup.add_gateway_by_hand(
            &name,
            &interface,
            (weight, capacity),
            mac.as_deref(),
        )),
        Request::GatewayRemove { name } => Response::of(sup.remove_gateway(&name)),
    }
}
