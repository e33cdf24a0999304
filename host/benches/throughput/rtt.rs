//! Round-trip time of one tunnel through the middle, on an idle lab: the
//! generator sends a frame of a ping tunnel, a reflector on every segw
//! sends it straight back (MACs, addresses and ports swapped, as a segw's
//! answer on the same tunnel would be), and the generator waits for it
//! before the next. Both ends are AF_PACKET sockets in userspace, the same
//! in every mode, so differences between modes are the middle's.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use segwlb::packet::craft::EspFrame;

/// The ping tunnel: its own source address, off the data tunnels' ones.
pub const PING_FROM: Ipv4Addr = Ipv4Addr::new(10, 1, 255, 1);
pub const PING_SPI: u32 = 0x2000_0001;
/// Ethernet + IPv4 (no options) + UDP: where the SPI of ESP in UDP is.
const SPI_AT: usize = 14 + 20 + 8;
/// Pings before the measured ones: the tunnel is placed, its segw's first
/// answer confirms it (and the fast path takes it from there).
const WARM_UP: u32 = 50;
/// A ping not back by then is lost.
const WAIT: Duration = Duration::from_millis(100);
const SPACING: Duration = Duration::from_millis(1);

/// What the measured pings saw.
pub struct Rtt {
    /// Sorted round-trip times of the pings that came back.
    pub samples: Vec<Duration>,
    pub lost: u32,
}

impl Rtt {
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let n = self.samples.len();
        (n > 0).then(|| self.samples[((n - 1) as f64 * p).round() as usize])
    }

    /// `p50 212 µs  p99 405 µs` (and the lost ones, if any).
    pub fn summary(&self) -> String {
        let us = |p| {
            self.percentile(p).map_or("-".to_string(), |d| {
                format!("{:.0} µs", d.as_secs_f64() * 1e6)
            })
        };
        let mut s = format!("p50 {}  p99 {}", us(0.5), us(0.99));
        if self.lost > 0 {
            s += &format!(
                "  ({} of {} lost)",
                self.lost,
                self.lost as usize + self.samples.len()
            );
        }
        s
    }
}

/// Which frames a reflector answers.
#[derive(Clone, Copy)]
pub enum Answer {
    /// The ping tunnel's.
    Pings,
    /// Every tunnel's ESP, in UDP or raw: as a segw's first answer on each
    /// tunnel, which confirms its segw to the balancer.
    AllEsp,
}

/// IPv4 (no options) ESP in UDP on port 4500, or raw ESP.
fn esp_kind(frame: &[u8]) -> Option<u8> {
    let ipv4 = frame.len() >= SPI_AT + 8 && frame[12..14] == [0x08, 0x00] && frame[14] == 0x45;
    match frame.get(23) {
        Some(17) if ipv4 && frame[36..38] == 4500u16.to_be_bytes() => Some(17),
        Some(50) if ipv4 => Some(50),
        _ => None,
    }
}

/// `frame` is a ping of the ping tunnel (ESP in UDP, port 4500 to 4500).
fn is_ping(frame: &[u8]) -> bool {
    esp_kind(frame) == Some(17) && frame[SPI_AT..SPI_AT + 4] == PING_SPI.to_be_bytes()
}

/// The answer on the same tunnel: from `mac` back to whoever sent it,
/// addresses (and UDP ports) swapped. The IPv4 checksum is a sum, so it
/// stays right; the UDP checksum of IPv4 ESP in UDP is zero.
fn reflect(frame: &mut [u8], mac: [u8; 6]) {
    let (dst, src) = frame.split_at_mut(6);
    dst.copy_from_slice(&src[..6]);
    src[..6].copy_from_slice(&mac);
    let ip = &mut frame[14..];
    let (a, b) = ip[12..20].split_at_mut(4);
    a.swap_with_slice(b);
    if frame[23] == 17 {
        let udp = &mut frame[34..];
        let (a, b) = udp[..4].split_at_mut(2);
        a.swap_with_slice(b);
    }
}

/// Receive one frame that came in (not one we sent), waiting at most as
/// long as the socket's receive timeout; `None` on timeout.
fn recv_incoming(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: a zeroed sockaddr_ll is valid for recvfrom to fill.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` outlive the call, with their sizes.
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Ok(None),
                io::ErrorKind::Interrupted => continue,
                _ => Err(e),
            };
        }
        if from.sll_pkttype != libc::PACKET_OUTGOING {
            return Ok(Some(n as usize));
        }
    }
}

fn send(fd: RawFd, frame: &[u8]) -> io::Result<()> {
    // SAFETY: the frame outlives the call.
    if unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn set_receive_timeout(fd: &OwnedFd, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a timeval of the size we pass.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Answer what `answer` says that reaches `fd` (a segw's receiving
/// socket, with a short receive timeout) from `mac`, until `stop`.
pub fn reflector(fd: &OwnedFd, mac: [u8; 6], answer: Answer, stop: &AtomicBool) -> io::Result<()> {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Some(n) = recv_incoming(fd.as_raw_fd(), &mut buf)? {
            let frame = &buf[..n];
            let yes = match answer {
                Answer::Pings => is_ping(frame),
                Answer::AllEsp => esp_kind(frame).is_some(),
            };
            if yes {
                reflect(&mut buf[..n], mac);
                send(fd.as_raw_fd(), &buf[..n])?;
            }
        }
    }
    Ok(())
}

/// Ping `count` times from `fd` (the generator's receiving socket, with a
/// short receive timeout) through a middle whose MAC is `middle`.
pub fn ping(
    fd: &OwnedFd,
    gen: [u8; 6],
    middle: [u8; 6],
    vip: Ipv4Addr,
    count: u32,
) -> io::Result<Rtt> {
    let mut buf = [0u8; 2048];
    let mut rtt = Rtt {
        samples: Vec::with_capacity(count as usize),
        lost: 0,
    };
    for seq in 1..=WARM_UP + count {
        let mut frame = Vec::new();
        EspFrame {
            dst: middle,
            src: gen,
            from: PING_FROM.into(),
            to: vip.into(),
            ports: Some((4500, 4500)),
            spi: PING_SPI,
            seq,
            len: 100,
        }
        .write(&mut frame);
        let sent = Instant::now();
        send(fd.as_raw_fd(), &frame)?;
        let back = loop {
            if sent.elapsed() > WAIT {
                break None;
            }
            match recv_incoming(fd.as_raw_fd(), &mut buf)? {
                Some(n)
                    if is_ping(&buf[..n]) && buf[SPI_AT + 4..SPI_AT + 8] == seq.to_be_bytes() =>
                {
                    break Some(sent.elapsed())
                }
                _ => {}
            }
        };
        if seq > WARM_UP {
            match back {
                Some(d) => rtt.samples.push(d),
                None => rtt.lost += 1,
            }
        }
        std::thread::sleep(SPACING);
    }
    rtt.samples.sort_unstable();
    Ok(rtt)
}
