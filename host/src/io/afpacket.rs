//! A real interface as a port: one AF_PACKET socket (bound to the
//! interface, promiscuous, every EtherType) read by its own thread and
//! written by the worker, through pnet's datalink channel.
//!
//! We create the socket ourselves and hand it to pnet, to set what pnet
//! does not: `PACKET_IGNORE_OUTGOING` (frames this host sends on the
//! interface are not read back as if they had arrived) and larger socket
//! buffers (bursts queue in the kernel instead of being dropped).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use pnet_datalink::{Channel, DataLinkReceiver, DataLinkSender, NetworkInterface};

use super::{Received, Tx};
use crate::balancer::PortId;
use crate::packet::Mac;

/// How often a blocked reader looks at its stop flag.
const POLL: Duration = Duration::from_millis(100);
const SOCKET_BUFFER: libc::c_int = 4 << 20;
const MAX_FRAME: usize = 65_536;

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

/// The receiving half, with the socket's descriptor kept to clear a
/// pending error (a link going down leaves one, and pnet's poll then
/// reports it forever).
pub struct Reader {
    rx: Box<dyn DataLinkReceiver>,
    fd: libc::c_int,
}

impl Reader {
    pub fn recv(&mut self) -> io::Result<&[u8]> {
        self.rx.next()
    }

    /// Read and clear the socket's pending error.
    fn take_error(&self) -> Option<io::Error> {
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt(2) on our open descriptor into a live local.
        let r = unsafe {
            libc::getsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (r == 0 && err != 0).then(|| io::Error::from_raw_os_error(err))
    }
}

pub fn open(name: &str) -> Result<Opened, PortError> {
    let iface = find(name)?;
    let mac = iface
        .mac
        .map(|m| m.octets())
        .filter(|m| *m != [0; 6])
        .ok_or_else(|| PortError::NoMac(name.into()))?;
    let fd = socket().map_err(|e| PortError::Open(name.into(), e))?;
    let config = pnet_datalink::Config {
        read_buffer_size: MAX_FRAME,
        write_buffer_size: MAX_FRAME,
        read_timeout: Some(POLL),
        promiscuous: true,
        socket_fd: Some(fd),
        ..Default::default()
    };
    match pnet_datalink::channel(&iface, config) {
        Ok(Channel::Ethernet(tx, rx)) => Ok(Opened {
            name: name.into(),
            mac,
            tx: AfPacketTx { tx },
            rx: Reader { rx, fd },
        }),
        Ok(_) => Err(PortError::Open(
            name.into(),
            io::Error::other("not an Ethernet channel"),
        )),
        Err(e) => Err(PortError::Open(name.into(), e)),
    }
}

fn socket() -> io::Result<libc::c_int> {
    // SAFETY: plain socket(2) and setsockopt(2) calls on a descriptor we own;
    // every pointer passed points at a live local of the stated size.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as libc::c_int,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let set = |level, option, value: libc::c_int| {
            libc::setsockopt(
                fd,
                level,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // Best effort: older kernels lack PACKET_IGNORE_OUTGOING, and the
        // core drops what it does not recognise anyway.
        set(libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1);
        set(libc::SOL_SOCKET, libc::SO_RCVBUF, SOCKET_BUFFER);
        set(libc::SOL_SOCKET, libc::SO_SNDBUF, SOCKET_BUFFER);
        Ok(fd)
    }
}

/// The sending half: one `send` per frame.
pub struct AfPacketTx {
    tx: Box<dyn DataLinkSender>,
}

impl Tx for AfPacketTx {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.tx
            .send_to(frame, None)
            .unwrap_or_else(|| Err(io::Error::other("pnet refused the frame")))
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
                match rx.recv() {
                    Ok(frame) => {
                        let received = Received {
                            port,
                            frame: frame.to_vec(),
                        };
                        if to_worker.send(received).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
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
