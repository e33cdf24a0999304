//! A real interface as a port: one AF_PACKET socket (bound to the
//! interface, promiscuous, every EtherType) read by its own thread and
//! written by the worker, in batches: `recvmmsg` and `sendmmsg` move up to
//! [`BATCH`] frames per system call. pnet finds the interfaces.
//!
//! Measured (`cargo bench --bench throughput`): through pnet's datalink
//! channel each frame cost a `poll` and a `recvfrom` to read, a `poll` and
//! a `sendto` to write, and `segwlb run` delivered 0.45× what a kernel
//! bridge did in the same lab. Also set here: `PACKET_IGNORE_OUTGOING`
//! (frames this host sends are not read back as if they had arrived) and
//! larger socket buffers (bursts queue in the kernel instead of being
//! dropped).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use pnet_datalink::NetworkInterface;

use super::{Received, Tx};
use crate::balancer::PortId;
use crate::packet::Mac;

/// How often a blocked reader looks at its stop flag.
const POLL: Duration = Duration::from_millis(100);
const SOCKET_BUFFER: libc::c_int = 4 << 20;
/// Largest frame read whole (a longer one is cut: counted malformed later).
const MAX_FRAME: usize = 65_536;
/// Frames per system call, each way.
pub const BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("no interface `{0}` here (interfaces: {1})")]
    NoSuchInterface(String, String),
    #[error("interface `{0}` has no MAC address (not Ethernet?)")]
    NoMac(String),
    #[error(
        "cannot open an AF_PACKET socket on `{0}`: {1} (segwlb run needs root or CAP_NET_RAW)"
    )]
    Open(String, io::Error),
}

/// Names of this host's interfaces.
pub fn interface_names() -> Vec<String> {
    pnet_datalink::interfaces()
        .into_iter()
        .map(|i| i.name)
        .collect()
}

fn find(name: &str) -> Result<NetworkInterface, PortError> {
    let all = pnet_datalink::interfaces();
    all.iter().find(|i| i.name == name).cloned().ok_or_else(|| {
        let names: Vec<String> = all.into_iter().map(|i| i.name).collect();
        PortError::NoSuchInterface(name.into(), names.join(", "))
    })
}

/// An opened interface: its MAC, and the two halves of its socket.
pub struct Opened {
    pub name: String,
    pub mac: Mac,
    pub tx: AfPacketTx,
    pub rx: Reader,
}

/// The receiving half: `recvmmsg` into buffers kept for the socket's life,
/// up to [`BATCH`] frames per system call.
pub struct Reader {
    fd: Arc<OwnedFd>,
    /// BATCH buffers of MAX_FRAME bytes, back to back.
    bufs: Vec<u8>,
    /// Lengths of the frames the last call returned.
    lens: Vec<usize>,
    /// The next of them [`Reader::recv`] hands out.
    next: usize,
}

impl Reader {
    fn new(fd: Arc<OwnedFd>) -> Self {
        Reader {
            fd,
            bufs: vec![0; BATCH * MAX_FRAME],
            lens: Vec::with_capacity(BATCH),
            next: 0,
        }
    }

    /// Wait (up to the socket's receive timeout, [`POLL`]) for at least
    /// one frame, then take every frame already queued, up to [`BATCH`]:
    /// one system call. `TimedOut` when none came.
    pub fn recv_batch(&mut self) -> io::Result<impl Iterator<Item = &[u8]>> {
        self.fill()?;
        Ok(self
            .bufs
            .chunks_exact(MAX_FRAME)
            .zip(&self.lens)
            .map(|(b, &len)| &b[..len]))
    }

    /// One `recvmmsg` into the buffers; the frames' lengths into `lens`.
    fn fill(&mut self) -> io::Result<()> {
        let mut iov: Vec<libc::iovec> = self
            .bufs
            .chunks_exact_mut(MAX_FRAME)
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut msgs = headers(&mut iov);
        // SAFETY: `msgs` and the iovecs and buffers they point to live
        // until the call returns; the kernel writes at most iov_len bytes
        // into each buffer and the lengths into `msg_len`.
        let n = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.kind() {
                io::ErrorKind::WouldBlock => io::Error::from(io::ErrorKind::TimedOut),
                _ => e,
            });
        }
        self.lens.clear();
        self.lens.extend(
            msgs[..n as usize]
                .iter()
                .map(|m| (m.msg_len as usize).min(MAX_FRAME)),
        );
        self.next = self.lens.len();
        Ok(())
    }

    /// One frame: the rest of the last batch, else a new one.
    pub fn recv(&mut self) -> io::Result<&[u8]> {
        if self.next >= self.lens.len() {
            self.fill()?;
            self.next = 0;
        }
        let i = self.next;
        self.next += 1;
        Ok(&self.bufs[i * MAX_FRAME..i * MAX_FRAME + self.lens[i]])
    }

    /// Read and clear the socket's pending error.
    fn take_error(&self) -> Option<io::Error> {
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt(2) on our open descriptor into a live local.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (r == 0 && err != 0).then(|| io::Error::from_raw_os_error(err))
    }
}

/// One message header per iovec, for `recvmmsg`/`sendmmsg`: no address,
/// no control data. The headers point into `iov`, which must outlive them.
pub fn headers(iov: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iov.iter_mut()
        .map(|v| {
            // SAFETY: a zeroed mmsghdr is valid (null name and control, no
            // flags); it then points at one iovec.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect()
}

/// Open `name` as a port: an AF_PACKET socket bound to it, promiscuous.
pub fn open(name: &str) -> Result<Opened, PortError> {
    let iface = find(name)?;
    let mac = iface
        .mac
        .map(|m| m.octets())
        .filter(|m| *m != [0; 6])
        .ok_or_else(|| PortError::NoMac(name.into()))?;
    let fd = socket(iface.index).map_err(|e| PortError::Open(name.into(), e))?;
    let fd = Arc::new(fd);
    Ok(Opened {
        name: name.into(),
        mac,
        tx: AfPacketTx { fd: fd.clone() },
        rx: Reader::new(fd),
    })
}

/// An AF_PACKET socket for every EtherType, bound to interface `ifindex`,
/// promiscuous, not reading back what this host sends, with large buffers
/// (bursts queue in the kernel instead of being dropped) and a receive
/// timeout (the reader looks at its stop flag that often).
///
/// Opened with protocol 0, which receives nothing (packet(7)); `bind` then
/// names the interface and ETH_P_ALL together, so no frame of another
/// interface ever reaches the socket. Opened with ETH_P_ALL, it would take
/// every interface's frames until the bind.
fn socket(ifindex: u32) -> io::Result<OwnedFd> {
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) with constant arguments; a non-negative result is
    // a descriptor we now own.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let set = |level, option, value: &[u8]| {
        // SAFETY: setsockopt(2) on our descriptor with a live buffer and its length.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                option,
                value.as_ptr().cast(),
                value.len() as libc::socklen_t,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let int = |v: libc::c_int| v.to_ne_bytes();
    set(libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &int(1))?;
    set(libc::SOL_SOCKET, libc::SO_RCVBUF, &int(SOCKET_BUFFER))?;
    set(libc::SOL_SOCKET, libc::SO_SNDBUF, &int(SOCKET_BUFFER))?;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: POLL.as_micros() as libc::suseconds_t,
    };
    // SAFETY: timeval is plain data; viewed as its bytes for setsockopt.
    set(libc::SOL_SOCKET, libc::SO_RCVTIMEO, unsafe {
        std::slice::from_raw_parts(
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>(),
        )
    })?;
    // SAFETY: a zeroed sockaddr_ll is valid; we fill family, protocol and
    // interface, and bind(2) reads exactly its size.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = ifindex as libc::c_int;
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: packet_mreq is plain data; a zeroed one with the interface
    // and type filled in asks for promiscuous mode on it.
    let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mreq.mr_ifindex = ifindex as libc::c_int;
    mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
    set(libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, unsafe {
        std::slice::from_raw_parts(
            (&mreq as *const libc::packet_mreq).cast(),
            std::mem::size_of::<libc::packet_mreq>(),
        )
    })?;
    Ok(fd)
}

/// The sending half: `send` for one frame, `sendmmsg` for a batch. Never
/// waits: with the socket's send buffer full (the interface's queue is
/// slower than what we send) a frame fails with `WouldBlock` at once, and
/// the worker counts it (`send_errors`) instead of stopping every port.
pub struct AfPacketTx {
    fd: Arc<OwnedFd>,
}

impl Tx for AfPacketTx {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: send(2) on our bound socket with a live buffer.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn send_batch(&mut self, frames: &[&[u8]]) -> (usize, Option<io::Error>) {
        let mut iov: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        let mut msgs = headers(&mut iov);
        let mut sent = 0;
        while sent < msgs.len() {
            // SAFETY: the headers, iovecs and frames live across the call.
            let n = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs[sent..].as_mut_ptr(),
                    (msgs.len() - sent) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                let e = io::Error::last_os_error();
                // No room: none of the rest would fit either.
                if e.kind() == io::ErrorKind::WouldBlock {
                    return (sent, Some(e));
                }
                // The frame at `sent` failed; say why, and go on with the
                // rest (one bad frame must not cost the batch).
                let (more, _) = self.send_batch(&frames[sent + 1..]);
                return (sent + more, Some(e));
            }
            sent += n as usize;
        }
        (sent, None)
    }
}

/// Read frames from `rx` until `stop` is set, handing each to the worker
/// as received on `port`. Returns when the worker has gone.
pub fn spawn_reader(
    name: &str,
    port: PortId,
    mut rx: Reader,
    to_worker: Sender<Received>,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    let iface = name.to_string();
    std::thread::Builder::new()
        .name(format!("rx-{name}"))
        .spawn(move || {
            let mut last_log: Option<std::time::Instant> = None;
            while !stop.load(Ordering::Relaxed) {
                let failed = match rx.recv_batch() {
                    Ok(frames) => {
                        for frame in frames {
                            let received = Received {
                                port,
                                frame: frame.to_vec(),
                            };
                            if to_worker.send(received).is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    Err(e) => e,
                };
                match failed {
                    e if e.kind() == io::ErrorKind::TimedOut => {}
                    e if e.kind() == io::ErrorKind::Interrupted => {}
                    e => {
                        let cause = rx.take_error().unwrap_or(e);
                        if last_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            tracing::warn!(interface = %iface, "read failed: {cause}; retrying (logged every 10 s)");
                            last_log = Some(std::time::Instant::now());
                        }
                        std::thread::sleep(POLL);
                    }
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::netns::{self, Netns};

    /// A port whose interface lets a frame out a second (a token bucket
    /// queue: each frame it holds stays charged to our socket's send
    /// buffer until it leaves): the worker's sends must not wait for room.
    #[test]
    fn a_full_send_buffer_is_a_counted_drop_not_a_wait() {
        if let Err(why) = netns::prerequisites() {
            if std::env::var_os("SEGWLB_REQUIRE_NETNS").is_some() {
                panic!("{why}");
            }
            eprintln!("skipped: {why}");
            return;
        }
        let prefix = netns::unique_prefix("afp");
        let a = Netns::new(&format!("{prefix}-a")).unwrap();
        let b = Netns::new(&format!("{prefix}-b")).unwrap();
        netns::veth(&a, "tx0", &b, "rx0").unwrap();
        a.exec(&[
            "tc",
            "qdisc",
            "add",
            "dev",
            "tx0",
            "root",
            "tbf",
            "rate",
            "8kbit",
            "burst",
            "1600",
            "limit",
            "100000000",
        ])
        .unwrap();
        let mut port = a.enter(|| open("tx0")).unwrap().unwrap();
        let (done, finished) = crossbeam_channel::bounded(1);
        // On its own thread: a send that blocks would block it for good.
        std::thread::spawn(move || {
            let mut frame = vec![0u8; 1500];
            frame[..6].copy_from_slice(&[0xff; 6]);
            frame[6..12].copy_from_slice(&port.mac);
            frame[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental
            let batch = vec![frame.as_slice(); BATCH];
            let (mut sent, mut dropped, mut error) = (0, 0, None);
            // 12 MB: more than any send buffer the kernel allows us.
            for _ in 0..128 {
                let (n, e) = port.tx.send_batch(&batch);
                sent += n;
                dropped += BATCH - n;
                error = error.or(e);
            }
            let _ = done.send((sent, dropped, error));
        });
        let (sent, dropped, error) = finished
            .recv_timeout(Duration::from_secs(5))
            .expect("a send waited for room in a full send buffer");
        eprintln!("sent {sent}, dropped {dropped}: {error:?}");
        assert!(sent > 0 && dropped > 0, "sent {sent}, dropped {dropped}");
        assert_eq!(error.map(|e| e.kind()), Some(io::ErrorKind::WouldBlock));
    }
}
