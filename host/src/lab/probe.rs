//! Per-tunnel probes: how long a moved tunnel was dark, measured.
//!
//! While an event settles, every tunnel live at the event sends a small UDP
//! datagram through its SA every [`PERIOD`] (5 a second) from its inner
//! address to an echo socket of ours on each segw's service address, which
//! answers back through the tunnel. A reply can only come once the tunnel
//! works both ways on the segw the balancer sends it to: a moved tunnel's
//! first reply is when it came back. The probes are outbound from the
//! initiator and the echo answers only what arrived, so nothing a probe
//! does keeps a dead SA's DPD quiet.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::topology::{alive, State};
use super::traffic::listen;
use super::{Error, Result};

/// One probe per tunnel this often.
pub const PERIOD: Duration = Duration::from_millis(200);
/// After the stop, replies are still collected this long (none is sent):
/// the last round's answers are not counted lost.
const LAST_REPLIES: Duration = Duration::from_millis(400);
/// The port of the echo sockets on the segws' service address.
const ECHO: u16 = 7;

/// What the probes of one tunnel saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    pub sent: u32,
    pub replies: u32,
    /// Its first reply, and the longest time between two replies (from
    /// the start for the first), with the reply that ended it: after an
    /// event, when the tunnel came back.
    pub first: Option<Instant>,
    pub longest_gap: Duration,
    pub longest_gap_end: Option<Instant>,
    last: Option<Instant>,
    /// When the first [`LOST_KEPT`] probes that got no answer were sent.
    pub lost_at: [Option<SystemTime>; LOST_KEPT],
}

/// Unanswered probes whose send time a [`Seen`] keeps.
pub const LOST_KEPT: usize = 4;

/// Probes running: [`Prober::stop`] ends them and says what each tunnel saw.
pub struct Prober {
    stop: Arc<AtomicBool>,
    probing: JoinHandle<std::io::Result<Vec<Seen>>>,
    echoes: Vec<JoinHandle<()>>,
    echoes_stop: Arc<AtomicBool>,
}

impl Prober {
    /// Probe `initiators` (indexes into `state.initiators`), each through
    /// its tunnel, until stopped; echo on every segw whose charon runs.
    pub fn start(state: &State, initiators: &[usize]) -> Result<Prober> {
        let (stop, echoes_stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let service = SocketAddr::new(IpAddr::V4(state.service), ECHO);
        let mut echoes = Vec::new();
        for s in state.segws.iter().filter(|s| s.present && alive(s.pid)) {
            let socket = listen(&s.ns, service)?;
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .map_err(|e| io("a read timeout", e))?;
            let stop = echoes_stop.clone();
            echoes.push(std::thread::spawn(move || echo(&socket, &stop)));
        }
        let sockets = initiators
            .iter()
            .map(|&i| {
                let init = &state.initiators[i];
                let socket = listen(&init.ns, SocketAddr::new(IpAddr::V4(init.inner), 0))?;
                socket
                    .set_nonblocking(true)
                    .map_err(|e| io("a non-blocking socket", e))?;
                Ok(socket)
            })
            .collect::<Result<Vec<_>>>()?;
        let probing = {
            let stop = stop.clone();
            std::thread::spawn(move || probe(&sockets, service, &stop))
        };
        Ok(Prober {
            stop,
            probing,
            echoes,
            echoes_stop,
        })
    }

    /// Stop probing (the last round's replies still come in); what each
    /// tunnel (in the order given) saw.
    pub fn stop(self) -> Result<Vec<Seen>> {
        self.stop.store(true, Ordering::Relaxed);
        // The prober waits for its last round's answers: the echoes answer
        // until it is done (stopped with it, they left the last round
        // unanswered, and it counted as lost).
        let seen = self.probing.join();
        self.echoes_stop.store(true, Ordering::Relaxed);
        for e in self.echoes {
            let _ = e.join();
        }
        seen.map_err(|_| Error::State("the prober panicked".into()))?
            .map_err(|e| io("probing the tunnels", e))
    }
}

fn io(what: &str, source: std::io::Error) -> Error {
    Error::Io {
        what: what.to_string(),
        source,
    }
}

/// Answer every datagram to where it came from, until `stop`.
fn echo(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    }
}

/// Every [`PERIOD`], one datagram through each socket; between, collect
/// the replies (each carries its tunnel's index).
fn probe(sockets: &[UdpSocket], to: SocketAddr, stop: &AtomicBool) -> std::io::Result<Vec<Seen>> {
    let started = Instant::now();
    let mut seen = vec![Seen::default(); sockets.len()];
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut next = Instant::now();
    let mut buf = [0u8; 64];
    let mut until = None;
    // When each round went out, and per tunnel which of its probes (by
    // round) were answered: a probe that failed to send has no entry.
    let mut rounds: Vec<SystemTime> = Vec::new();
    let mut answered: Vec<Vec<bool>> = vec![Vec::new(); sockets.len()];
    let mut round_of: Vec<Vec<u32>> = vec![Vec::new(); sockets.len()];
    loop {
        match until {
            None if stop.load(Ordering::Relaxed) => {
                until = Some(Instant::now() + LAST_REPLIES);
                next = Instant::now() + LAST_REPLIES;
            }
            Some(end) if Instant::now() >= end => break,
            _ => {}
        }
        if until.is_none() && Instant::now() >= next {
            let round = rounds.len() as u32;
            rounds.push(SystemTime::now());
            for (k, s) in sockets.iter().enumerate() {
                // A send can fail while a route or SA is being replaced:
                // that probe is lost, as a packet would be.
                let mut probe = [0u8; 8];
                probe[..4].copy_from_slice(&(k as u32).to_be_bytes());
                probe[4..].copy_from_slice(&round.to_be_bytes());
                if s.send_to(&probe, to).is_ok() {
                    seen[k].sent += 1;
                    answered[k].push(false);
                    round_of[k].push(round);
                }
            }
            // Behind (a busy machine): the next round a period from now,
            // not a burst of the rounds missed.
            next = (next + PERIOD).max(Instant::now() + PERIOD / 2);
        }
        let wait = next.saturating_duration_since(Instant::now());
        // SAFETY: `fds` points at `fds.len()` valid pollfd entries whose
        // descriptors `sockets` keeps open.
        let ready = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                wait.as_millis() as i32,
            )
        };
        if ready <= 0 {
            continue;
        }
        let now = Instant::now();
        for (fd, s) in fds.iter_mut().zip(sockets) {
            if fd.revents & libc::POLLIN == 0 {
                continue;
            }
            fd.revents = 0;
            while let Ok(n) = s.recv(&mut buf) {
                let Some((k, round)) = buf[..n]
                    .try_into()
                    .ok()
                    .map(|b: [u8; 8]| {
                        let word =
                            |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4"));
                        (word(0) as usize, word(4))
                    })
                    .filter(|&(k, _)| k < seen.len())
                else {
                    continue;
                };
                if let Ok(at) = round_of[k].binary_search(&round) {
                    answered[k][at] = true;
                }
                let t = &mut seen[k];
                t.replies += 1;
                t.first.get_or_insert(now);
                let gap = now.duration_since(t.last.unwrap_or(started));
                if gap > t.longest_gap {
                    t.longest_gap = gap;
                    t.longest_gap_end = Some(now);
                }
                t.last = Some(now);
            }
        }
    }
    for (k, t) in seen.iter_mut().enumerate() {
        let lost = round_of[k]
            .iter()
            .zip(&answered[k])
            .filter(|(_, &a)| !a)
            .map(|(&r, _)| rounds[r as usize]);
        for (slot, at) in t.lost_at.iter_mut().zip(lost) {
            *slot = Some(at);
        }
    }
    Ok(seen)
}
