//! Reading a request from a client that may be slow, silent or hostile:
//! up to a terminator, within a size and a deadline for the whole request
//! (a per-read timeout alone lets a client that sends a byte a second hold
//! the reader for ever).

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Why a request was not read whole.
#[derive(Debug, thiserror::Error)]
pub enum Cut {
    #[error("request longer than {0} bytes")]
    TooLong(usize),
    #[error("request not complete within {0:?}")]
    TooSlow(Duration),
    #[error("connection closed before the request was complete")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A stream whose reads can be given a timeout.
pub trait TimedRead: Read {
    fn read_timeout(&self, t: Duration) -> io::Result<()>;
}

impl TimedRead for UnixStream {
    fn read_timeout(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))
    }
}

impl TimedRead for TcpStream {
    fn read_timeout(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))
    }
}

/// Read from `conn` until `end` has arrived, at most `cap` bytes, all of it
/// within `within`: what was read, `end` included (and anything after it
/// in the same read, which a one-request protocol ignores).
pub fn read_until(
    conn: &mut impl TimedRead,
    end: &[u8],
    cap: usize,
    within: Duration,
) -> Result<Vec<u8>, Cut> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Cut::TooSlow(within));
        }
        conn.read_timeout(left)?;
        let n = match conn.read(&mut chunk) {
            Ok(0) => return Err(Cut::Closed),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Cut::TooSlow(within))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        // Look for the end where it may straddle the last chunk.
        let from = got.len().saturating_sub(end.len() - 1);
        got.extend_from_slice(&chunk[..n]);
        if got[from..].windows(end.len()).any(|w| w == end) {
            return Ok(got);
        }
        if got.len() > cap {
            return Err(Cut::TooLong(cap));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_request_is_read_whole_or_cut_with_the_reason() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(b"{\"cmd\":\"status\"}\nrest").unwrap();
        let got = read_until(&mut b, b"\n", 100, Duration::from_secs(1)).unwrap();
        assert!(got.starts_with(b"{\"cmd\":\"status\"}\n"));

        // The end split across two writes.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(b"GET / HTTP/1.0\r\n\r").unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            a.write_all(b"\n").unwrap();
            a
        });
        let got = read_until(&mut b, b"\r\n\r\n", 100, Duration::from_secs(1)).unwrap();
        assert!(got.ends_with(b"\r\n\r\n"));
        drop(writer.join());

        // Too long: cut at the cap, not read on.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&[b'x'; 5000]).unwrap();
        assert!(matches!(
            read_until(&mut b, b"\n", 1000, Duration::from_secs(1)),
            Err(Cut::TooLong(1000))
        ));

        // A byte every 30 ms never completes: cut at the deadline, not at
        // a read timeout it keeps resetting.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let dribble = std::thread::spawn(move || {
            for _ in 0..20 {
                if a.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(30));
            }
        });
        let t = Instant::now();
        assert!(matches!(
            read_until(&mut b, b"\n", 1000, Duration::from_millis(200)),
            Err(Cut::TooSlow(_))
        ));
        assert!(
            t.elapsed() < Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
        drop(b);
        dribble.join().unwrap();

        // Closed early.
        let (a, mut b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(matches!(
            read_until(&mut b, b"\n", 10, Duration::from_secs(1)),
            Err(Cut::Closed)
        ));
    }
}
