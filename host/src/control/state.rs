//! The state file of a warm restart: the tunnel table written atomically
//! (at SIGTERM, on `segwlb ctl save`, every `state_interval_s`), and read
//! back at start. The format is [`crate::balancer::saved`]'s; here are the
//! file, the timing and the worker's part.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};

use crate::balancer::saved::{self, SavedTunnel, StateError};
use crate::dataplane::Command;

/// How long the worker may take to hand over a table (a slice per turn:
/// about a second per million tunnels).
pub const SAVE_WITHIN: Duration = Duration::from_secs(20);

/// Why the state file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {source}", path.display())]
    Refused { path: PathBuf, source: StateError },
}

/// Write `tunnels` to `path` atomically: a temporary file beside it,
/// synced, then renamed over it. A crash leaves the old file or the new
/// one, never half of one. Returns the bytes written.
pub fn write(path: &Path, tunnels: &[SavedTunnel]) -> io::Result<usize> {
    let bytes = saved::encode(tunnels);
    let tmp = path.with_extension("tmp");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(bytes.len())
}

/// The tunnels saved at `path`; `None` when there is no file (a first
/// start).
pub fn read(path: &Path) -> Result<Option<Vec<SavedTunnel>>, ReadError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ReadError::Io {
                path: path.into(),
                source,
            })
        }
    };
    saved::decode(&bytes)
        .map(Some)
        .map_err(|source| ReadError::Refused {
            path: path.into(),
            source,
        })
}

/// Ask the worker for its table (saved a slice at a time between frames).
pub fn from_worker(commands: &Sender<Command>) -> Option<Vec<SavedTunnel>> {
    let (reply, answer) = bounded(1);
    commands.send(Command::Save { reply }).ok()?;
    answer.recv_timeout(SAVE_WITHIN).ok()
}

/// Ask the worker and write the file: what `ctl save` and the periodic
/// snapshot do. A line for the log.
pub fn save(path: &Path, commands: &Sender<Command>) -> Result<String, String> {
    let started = Instant::now();
    let tunnels = from_worker(commands).ok_or("the data path did not hand over its table")?;
    let bytes = write(path, &tunnels).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(format!(
        "{} tunnels saved to {} ({bytes} bytes) in {:.1} ms",
        tunnels.len(),
        path.display(),
        started.elapsed().as_secs_f64() * 1e3
    ))
}

/// Save to `path` every `interval` until `stop`, off the data path: what
/// a `kill -9` loses is bounded by the tunnels opened since the last one.
pub fn snapshots(
    path: PathBuf,
    interval: Duration,
    commands: Sender<Command>,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("snapshots".into())
        .spawn(move || {
            let mut next = Instant::now() + interval;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50).min(interval));
                if Instant::now() < next {
                    continue;
                }
                next = Instant::now() + interval;
                match save(&path, &commands) {
                    Ok(line) => tracing::debug!("snapshot: {line}"),
                    Err(e) => tracing::warn!("snapshot failed: {e}"),
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_replaced_whole_and_read_back_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/segwlb.state");
        assert!(read(&path).unwrap().is_none(), "no file: a first start");
        let t = SavedTunnel {
            peer: "10.1.0.1".parse().unwrap(),
            peer_port: 4500,
            opened_port: 500,
            vip: "10.2.2.1".parse().unwrap(),
            ike_spi: Some(0x1234),
            responder_spi: Some(0x5678),
            opened_by: "ike".into(),
            gateway: "segw1".into(),
            at_opening_address: true,
            placement: "confirmed".into(),
            age_ms: 1000,
            idle_ms: 10,
            next_hop: Some("02:aa:00:00:00:01".into()),
            frames: 3,
            bytes: 300,
        };
        write(&path, &[t.clone(), t.clone()]).unwrap();
        write(&path, std::slice::from_ref(&t)).unwrap();
        assert_eq!(read(&path).unwrap(), Some(vec![t]));
        assert!(!path.with_extension("tmp").exists());
        std::fs::write(&path, b"segwlb-state 1 tunnels=1 fnv64=0\n{}\n").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("segwlb.state: checksum mismatch"), "{e}");
    }
}
