//! The sync link's threads: the active's listener and, per standby, a
//! writer and an acknowledgement reader; the standby's connector. They
//! move bytes and check them (`wire`); what the bytes mean is the
//! worker's (`dataplane::pair`), reached by commands.
//!
//! Bounds: the active's worker puts messages into a queue of
//! [`QUEUE`] and never waits (a full queue drops the standby); the writer
//! gives up on a standby whose socket took nothing for [`WRITE_TIMEOUT`];
//! the standby reads no further while [`PENDING`] frames wait for its
//! worker (TCP then holds the active back, and the active drops it); a
//! link silent for [`SILENT`] (no heartbeat) is closed. Either end that
//! gives up makes the standby connect again and take a new snapshot.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

use super::wire::{self, Direction, Message, WireError, MAGIC, NONCE, TAG};
use super::{PairConfig, Role};
use crate::dataplane::Command;

/// Messages the active's worker may have queued for the writer.
pub const QUEUE: usize = 1_024;
/// A standby whose socket takes nothing for this long is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// The active says it is alive at least this often ...
pub const HEARTBEAT: Duration = Duration::from_millis(200);
/// ... and a standby that heard nothing for this long closes the link.
pub const SILENT: Duration = Duration::from_secs(2);
/// Frames a standby reads ahead of its worker.
pub const PENDING: u64 = 64;
/// The handshake's time limit.
const HANDSHAKE: Duration = Duration::from_secs(2);
/// Between two tries to connect (or to bind) again.
const RETRY: Duration = Duration::from_millis(100);
/// How often the standby acknowledges what its worker applied.
const ACK_EVERY: Duration = Duration::from_millis(20);
/// Send times kept for measuring acknowledgement lag, by sequence number.
const SENT_TIMES: usize = 4_096;

/// What the link threads tell the worker (as `Command::Pair`).
pub enum PairEvent {
    /// (Active) a standby connected and proved the key: serve it through
    /// `out`. Dropping `out` closes the connection.
    Serve { out: Sender<Outgoing> },
    /// (Standby) a frame from the active, checked and in order.
    Received {
        seq: u64,
        sent_us: u64,
        message: Message,
    },
}

/// A message for the standby and when the active's worker made it (µs
/// since the Unix epoch).
pub struct Outgoing {
    pub message: Message,
    pub made_us: u64,
}

/// What the link threads and the worker share: counters and the role.
#[derive(Debug)]
pub struct Shared {
    role: AtomicU8,
    pub connected: AtomicBool,
    /// (Active) which standby connection is the current one: a connection
    /// the worker replaced may still be closing, and must not overwrite
    /// the new one's figures.
    serving: AtomicU64,
    /// (Active) the last frame written; (standby) the last frame received.
    pub seq: AtomicU64,
    /// (Active) the last frame the standby acknowledged; (standby) the
    /// last frame the worker applied.
    pub done: AtomicU64,
    /// The lag in µs, as `PairStatus::lag_ms` says.
    pub lag_us: AtomicU64,
    pub refused: AtomicU64,
    /// (Active) standbys dropped for not keeping up: the worker's queue
    /// full, or a write that took nothing for [`WRITE_TIMEOUT`].
    pub dropped_slow: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// When each recent frame was written (active), by seq % SENT_TIMES.
    sent_at: Vec<AtomicU64>,
}

impl Shared {
    fn new(role: Role) -> Self {
        Shared {
            role: AtomicU8::new(role as u8),
            connected: AtomicBool::new(false),
            serving: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            done: AtomicU64::new(0),
            lag_us: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            dropped_slow: AtomicU64::new(0),
            last_error: Mutex::new(None),
            sent_at: (0..SENT_TIMES).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn role(&self) -> Role {
        if self.role.load(Ordering::Relaxed) == Role::Active as u8 {
            Role::Active
        } else {
            Role::Standby
        }
    }

    /// The worker's role, for the threads (the worker decides it).
    pub fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::Relaxed);
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn error(&self, what: String, refused: bool) {
        if refused {
            self.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("pair: {what}");
        } else {
            tracing::info!("pair: {what}");
        }
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(what);
    }
}

/// The sync link of a running balancer.
pub struct Link {
    pub shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Link {
    /// Listen on `config.listen` and connect to `config.peer` whenever
    /// the role is standby; talk to the worker through `commands`.
    pub fn start(config: &PairConfig, commands: Sender<Command>) -> io::Result<Link> {
        let shared = Arc::new(Shared::new(config.role));
        let stop = Arc::new(AtomicBool::new(false));
        let listener = TcpListener::bind(config.listen).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("pair: listening on {}: {e}", config.listen),
            )
        })?;
        listener.set_nonblocking(true)?;
        let serve = {
            let (shared, stop, commands, config) = (
                shared.clone(),
                stop.clone(),
                commands.clone(),
                config.clone(),
            );
            std::thread::Builder::new()
                .name("pair-listen".into())
                .spawn(move || listen(listener, &config, &shared, &stop, &commands))?
        };
        let connect = {
            let (shared, stop, config) = (shared.clone(), stop.clone(), config.clone());
            std::thread::Builder::new()
                .name("pair-connect".into())
                .spawn(move || connect(&config, &shared, &stop, &commands))?
        };
        Ok(Link {
            shared,
            stop,
            threads: vec![serve, connect],
        })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The wall clock in µs since the Unix epoch: a frame's send time, which
/// the standby's lag is measured against.
pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Sixteen bytes no one can guess.
fn nonce() -> io::Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

// ----- the active ---------------------------------------------------------

fn listen(
    listener: TcpListener,
    config: &PairConfig,
    shared: &Arc<Shared>,
    stop: &AtomicBool,
    commands: &Sender<Command>,
) {
    while !stop.load(Ordering::Relaxed) {
        let (stream, from) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(RETRY / 2);
                continue;
            }
            Err(e) => {
                shared.error(format!("accepting on {}: {e}", config.listen), false);
                std::thread::sleep(RETRY);
                continue;
            }
        };
        if from.ip() != config.peer.ip() {
            shared.error(
                format!(
                    "refused a connection from {from}: the peer is {}",
                    config.peer.ip()
                ),
                true,
            );
            continue;
        }
        // A standby serves nothing: the peer tries again until one of us
        // is active.
        if shared.role() != Role::Active {
            continue;
        }
        match accept(stream, &config.key) {
            Ok((stream, session)) => {
                let (out, queued) = bounded(QUEUE);
                if commands
                    .send(Command::Pair(PairEvent::Serve { out }))
                    .is_err()
                {
                    return;
                }
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("pair-serve".into())
                    .spawn(move || serve(stream, session, &queued, &shared));
                if let Err(e) = spawned {
                    tracing::error!("pair: no thread to serve the standby: {e}");
                }
            }
            Err(e) => shared.error(format!("standby {from}: {e}"), true),
        }
    }
}

/// The active's half of the handshake.
fn accept(mut s: TcpStream, key: &[u8]) -> Result<(TcpStream, [u8; TAG]), String> {
    let io = |e: io::Error| e.to_string();
    s.set_nonblocking(false).map_err(io)?;
    s.set_read_timeout(Some(HANDSHAKE)).map_err(io)?;
    s.set_write_timeout(Some(HANDSHAKE)).map_err(io)?;
    let _ = s.set_nodelay(true);
    let mut hello = [0u8; MAGIC.len() + NONCE];
    s.read_exact(&mut hello).map_err(io)?;
    let nonce_s = wire::read_hello(&hello).map_err(|e| e.to_string())?;
    let nonce_a = nonce().map_err(io)?;
    s.write_all(&wire::answer(key, &nonce_s, &nonce_a))
        .map_err(io)?;
    let mut proof = [0u8; TAG];
    s.read_exact(&mut proof).map_err(io)?;
    wire::check_proof(key, &nonce_s, &nonce_a, &proof).map_err(|e| e.to_string())?;
    Ok((s, wire::session_key(key, &nonce_s, &nonce_a)))
}

/// Write what the worker queues to one standby until the worker drops the
/// queue or the standby stops taking it; read its acknowledgements beside.
fn serve(stream: TcpStream, session: [u8; TAG], queued: &Receiver<Outgoing>, shared: &Shared) {
    let acks = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => return shared.error(format!("serving the standby: {e}"), false),
    };
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let me = shared.serving.fetch_add(1, Ordering::Relaxed) + 1;
    let current = || shared.serving.load(Ordering::Relaxed) == me;
    shared.connected.store(true, Ordering::Relaxed);
    shared.seq.store(0, Ordering::Relaxed);
    shared.done.store(0, Ordering::Relaxed);
    std::thread::scope(|scope| {
        scope.spawn(|| read_acks(acks, session, shared, &current));
        let mut stream = stream;
        let mut seq = 0u64;
        let why = loop {
            let message = match queued.recv_timeout(HEARTBEAT) {
                Ok(out) => out,
                Err(RecvTimeoutError::Timeout) => Outgoing {
                    message: Message::Heartbeat,
                    made_us: now_us(),
                },
                Err(RecvTimeoutError::Disconnected) => break None,
            };
            seq += 1;
            let frame = wire::seal(
                &session,
                Direction::ToStandby,
                seq,
                message.made_us,
                &message.message,
            );
            if let Err(e) = stream.write_all(&frame) {
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    shared.dropped_slow.fetch_add(1, Ordering::Relaxed);
                    break Some(format!(
                        "the standby took nothing for {WRITE_TIMEOUT:?}: dropped; it will take a new snapshot"
                    ));
                }
                break Some(format!("the standby went ({e})"));
            }
            if current() {
                shared.sent_at[seq as usize % SENT_TIMES].store(now_us(), Ordering::Relaxed);
                shared.seq.store(seq, Ordering::Relaxed);
            }
        };
        if let Some(why) = why {
            shared.error(why, false);
        }
        if current() {
            shared.connected.store(false, Ordering::Relaxed);
        }
        let _ = stream.shutdown(Shutdown::Both);
    });
}

fn read_acks(
    mut stream: TcpStream,
    session: [u8; TAG],
    shared: &Shared,
    current: &dyn Fn() -> bool,
) {
    let _ = stream.set_read_timeout(None);
    let mut frames = Frames::default();
    let mut expected = 1;
    loop {
        match frames.next(&mut stream, &session, Direction::ToActive, expected) {
            Ok(Some((_, Message::Ack(_)))) if !current() => expected += 1,
            Ok(Some((_, Message::Ack(seq)))) => {
                expected += 1;
                shared.done.store(seq, Ordering::Relaxed);
                let sent = shared.sent_at[seq as usize % SENT_TIMES].load(Ordering::Relaxed);
                shared
                    .lag_us
                    .store(now_us().saturating_sub(sent), Ordering::Relaxed);
            }
            Ok(Some(_)) => expected += 1,
            Ok(None) => {}
            Err(Ended::Closed | Ended::Silent) => return,
            Err(Ended::Refused(e)) => {
                shared.error(format!("the standby's acknowledgement: {e}"), true);
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

// ----- the standby --------------------------------------------------------

fn connect(config: &PairConfig, shared: &Shared, stop: &AtomicBool, commands: &Sender<Command>) {
    while !stop.load(Ordering::Relaxed) {
        if shared.role() != Role::Standby {
            std::thread::sleep(RETRY);
            continue;
        }
        let stream = match TcpStream::connect_timeout(&config.peer, HANDSHAKE) {
            Ok(s) => s,
            Err(_) => {
                std::thread::sleep(RETRY);
                continue;
            }
        };
        match greet(stream, &config.key) {
            Ok((stream, session)) => {
                shared.connected.store(true, Ordering::Relaxed);
                let why = follow(stream, &session, shared, stop, commands);
                shared.connected.store(false, Ordering::Relaxed);
                match why {
                    Ended::Closed => {}
                    Ended::Silent => shared.error(
                        format!("nothing from the active for {SILENT:?}: connecting again"),
                        false,
                    ),
                    Ended::Refused(e) => shared.error(format!("the active's stream: {e}"), true),
                }
            }
            // A standby peer closes at once: not an error worth a count.
            Err(Ended::Closed | Ended::Silent) => {}
            Err(Ended::Refused(e)) => shared.error(format!("active {}: {e}", config.peer), true),
        }
        std::thread::sleep(RETRY);
    }
}

/// The standby's half of the handshake.
fn greet(mut s: TcpStream, key: &[u8]) -> Result<(TcpStream, [u8; TAG]), Ended> {
    let closed = |_| Ended::Closed;
    s.set_read_timeout(Some(HANDSHAKE)).map_err(closed)?;
    s.set_write_timeout(Some(HANDSHAKE)).map_err(closed)?;
    let _ = s.set_nodelay(true);
    let nonce_s = nonce().map_err(closed)?;
    s.write_all(&wire::hello(&nonce_s)).map_err(closed)?;
    let mut answer = [0u8; MAGIC.len() + NONCE + TAG];
    s.read_exact(&mut answer).map_err(closed)?;
    let nonce_a = wire::read_answer(key, &nonce_s, &answer).map_err(Ended::Refused)?;
    s.write_all(&wire::proof(key, &nonce_s, &nonce_a))
        .map_err(closed)?;
    Ok((s, wire::session_key(key, &nonce_s, &nonce_a)))
}

/// Read the active's frames into the worker until the link ends, the
/// role changes or the balancer stops; acknowledge what the worker applied.
fn follow(
    mut stream: TcpStream,
    session: &[u8; TAG],
    shared: &Shared,
    stop: &AtomicBool,
    commands: &Sender<Command>,
) -> Ended {
    let _ = stream.set_read_timeout(Some(ACK_EVERY));
    shared.seq.store(0, Ordering::Relaxed);
    shared.done.store(0, Ordering::Relaxed);
    let mut frames = Frames::default();
    let (mut expected, mut acks, mut acked) = (1u64, 0u64, 0u64);
    let mut heard = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) || shared.role() != Role::Standby {
            return Ended::Closed;
        }
        if heard.elapsed() > SILENT {
            return Ended::Silent;
        }
        let applied = shared.done.load(Ordering::Relaxed);
        if applied != acked {
            acks += 1;
            let ack = wire::seal(
                session,
                Direction::ToActive,
                acks,
                now_us(),
                &Message::Ack(applied),
            );
            if stream.write_all(&ack).is_err() {
                return Ended::Closed;
            }
            acked = applied;
        }
        // The worker is behind: let TCP hold the active back.
        if expected > applied + PENDING {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        match frames.next(&mut stream, session, Direction::ToStandby, expected) {
            Ok(Some((sent_us, message))) => {
                heard = Instant::now();
                let seq = expected;
                expected += 1;
                shared.seq.store(seq, Ordering::Relaxed);
                let event = PairEvent::Received {
                    seq,
                    sent_us,
                    message,
                };
                if commands.send(Command::Pair(event)).is_err() {
                    return Ended::Closed;
                }
            }
            Ok(None) => {}
            Err(e) => return e,
        }
    }
}

/// How a link ended.
#[derive(Debug)]
enum Ended {
    /// Closed, timed out, or the peer went: connect again.
    Closed,
    /// No heartbeat for [`SILENT`]: connect again.
    Silent,
    /// The peer sent something refused.
    Refused(WireError),
}

/// Frames off a stream whose reads may time out part way.
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
}

impl Frames {
    /// The next frame if a whole one is in; `None` if the read timed out
    /// first (what was read is kept).
    fn next(
        &mut self,
        stream: &mut TcpStream,
        session: &[u8; TAG],
        dir: Direction,
        expected: u64,
    ) -> Result<Option<(u64, Message)>, Ended> {
        loop {
            if self.buf.len() >= 4 {
                let len = wire::frame_len(self.buf[..4].try_into().expect("4 bytes"))
                    .map_err(Ended::Refused)?;
                if self.buf.len() >= 4 + len {
                    let opened = wire::open(session, dir, expected, &self.buf[4..4 + len]);
                    self.buf.drain(..4 + len);
                    return opened.map(Some).map_err(Ended::Refused);
                }
            }
            let mut chunk = [0u8; 64 * 1024];
            match stream.read(&mut chunk) {
                Ok(0) => return Err(Ended::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Ended::Closed),
            }
        }
    }
}
