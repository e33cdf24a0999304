//! The state file of a warm restart: the tunnel table written atomically
//! (at SIGTERM, on `segwlb ctl save`, every `state_interval_s`), and read
//! back at start. The format is [`crate::balancer::saved`]'s; here are the
//! file, the timing and the worker's part.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
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
    /// The file tells where each tunnel's return traffic goes (its next
    /// hop's MAC): one another user could have written is not trusted.
    #[error("{}: {why}; not read (the state file sets tunnels' return-path MACs, so only segwlb's user may write it: chown/chmod it, or remove it to start cold)", path.display())]
    Untrusted { path: PathBuf, why: String },
}

/// One writer of state files at a time: `ctl save`, the snapshot thread
/// and the save at exit each write a whole table, and a rename decides
/// which one stays; two writers in the same temporary file would mix
/// their bytes.
static WRITING: Mutex<()> = Mutex::new(());

/// Write `tunnels` to `path` atomically: a temporary file of our own beside
/// it (a new name, created exclusively, never through a symlink, 0600:
/// the file holds every tunnel's SPI pair), synced, then renamed over it.
/// A crash leaves the old file or the new one, never half of one. Returns
/// the bytes written.
pub fn write(path: &Path, tunnels: &[SavedTunnel]) -> io::Result<usize> {
    let bytes = saved::encode(tunnels);
    let _one_writer = WRITING.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let (tmp, mut f) = private_temporary(path)?;
    let written = f
        .write_all(&bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| bytes.len())
}

/// A new file beside `path`, `.NAME.PID.N.tmp`, opened `O_EXCL|O_NOFOLLOW`
/// with mode 0600: a name someone planted (a file, a symlink) is skipped,
/// never written through.
fn private_temporary(path: &Path) -> io::Result<(PathBuf, File)> {
    use std::os::unix::fs::OpenOptionsExt;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a file name", path.display()),
        )
    })?;
    let mut last = None;
    for _ in 0..16 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_file_name(format!(
            ".{}.{}.{n}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("tried at least once"))
}

/// The tunnels saved at `path`; `None` when there is no file (a first
/// start). A file not owned by segwlb's user (or root), or that its group
/// or others may write, is refused.
pub fn read(path: &Path) -> Result<Option<Vec<SavedTunnel>>, ReadError> {
    let io_error = |source| ReadError::Io {
        path: path.into(),
        source,
    };
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io_error(source)),
    };
    // Checked on the file opened, not the name: nothing can swap it between.
    let meta = file.metadata().map_err(io_error)?;
    if let Some(why) = untrusted(meta.uid(), meta.mode(), crate::control::access::own_uid()) {
        return Err(ReadError::Untrusted {
            path: path.into(),
            why,
        });
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io_error)?;
    saved::decode(&bytes)
        .map(Some)
        .map_err(|source| ReadError::Refused {
            path: path.into(),
            source,
        })
}

/// Why a file of owner `uid` and `mode` is not to be trusted by user `me`.
fn untrusted(uid: u32, mode: u32, me: u32) -> Option<String> {
    if uid != me && uid != 0 {
        return Some(format!("owned by uid {uid}, not segwlb's uid {me} or root"));
    }
    if mode & 0o022 != 0 {
        return Some(format!(
            "mode {:03o} is writable by others than its owner",
            mode & 0o777
        ));
    }
    None
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
        let t = tunnel(1);
        write(&path, &[t.clone(), t.clone()]).unwrap();
        write(&path, std::slice::from_ref(&t)).unwrap();
        assert_eq!(read(&path).unwrap(), Some(vec![t]));
        assert!(!path.with_extension("tmp").exists());
        std::fs::write(&path, b"segwlb-state 1 tunnels=1 fnv64=0\n{}\n").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("segwlb.state: checksum mismatch"), "{e}");
    }

    fn tunnel(n: u32) -> SavedTunnel {
        SavedTunnel {
            peer: std::net::Ipv4Addr::from(0x0a01_0000 + n).into(),
            peer_port: 4500,
            opened_port: 500,
            vip: "10.2.2.1".parse().unwrap(),
            ike_spi: Some(u64::from(n) + 1),
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
        }
    }

    #[test]
    fn the_file_is_private_and_a_symlink_at_the_old_temporary_name_is_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segwlb.state");
        // What another user who can write the directory could plant: the
        // temporary name the writer used to use, pointing at a file of ours.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, path.with_extension("tmp")).unwrap();
        write(&path, &[tunnel(1)]).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "SPI pairs are for the balancer's user only");
        assert_eq!(read(&path).unwrap(), Some(vec![tunnel(1)]));
        // Nothing left beside it but what was there.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["segwlb.state", "segwlb.tmp", "victim"]);
    }

    #[test]
    fn concurrent_saves_never_leave_a_torn_or_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segwlb.state");
        write(&path, &[tunnel(0)]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        // `ctl save` and the snapshot thread, each writing its own table.
        let writers: Vec<_> = (0..2u32)
            .map(|w| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let table: Vec<SavedTunnel> = (0..2_000 + w * 500).map(tunnel).collect();
                    for _ in 0..30 {
                        write(&path, &table).map_err(|e| e.to_string())?;
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        let reader = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(Ordering::Relaxed) {
                    match read(&path) {
                        Ok(Some(t)) => assert!(t.len() == 1 || t.len() >= 2_000),
                        other => panic!("read {reads}: {other:?}"),
                    }
                    reads += 1;
                }
                reads
            })
        };
        for w in writers {
            w.join().unwrap().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let reads = reader.join().unwrap();
        assert!(reads > 0);
        assert!(read(&path).unwrap().unwrap().len() >= 2_000);
    }

    #[test]
    fn a_file_another_user_could_have_written_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segwlb.state");
        write(&path, &[tunnel(1)]).unwrap();
        for mode in [0o620, 0o602, 0o666] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = read(&path).unwrap_err().to_string();
            assert!(
                e.contains("segwlb.state") && e.contains("writable by others"),
                "{mode:o}: {e}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read(&path).unwrap().is_some(), "a file from before 0600");
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let e = read(&path).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
        }
    }
}
