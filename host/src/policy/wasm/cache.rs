//! Compiled policies kept on disk, so a restart or a reload of an unchanged
//! policy deserializes machine code (milliseconds) instead of compiling an
//! 18 MB language runtime again (seconds).
//!
//! An entry is named by a SHA-256 of the component's bytes, segwlb's version
//! (which pins wasmtime's) and the engine's compatibility hash (compiler,
//! target, tunables), so any change to the file, an upgrade or a change of
//! the engine's settings misses. An entry is
//! wasmtime's own serialization (`NAME.cwasm`, which wasmtime maps from the
//! file without copying it) and its SHA-256 (`NAME.sum`); it is used only
//! when that checksum matches, and a corrupt, truncated or mismatched entry
//! is compiled afresh and overwritten, never trusted.
//!
//! Deserializing is loading native code, so an entry is used only from a
//! directory nobody else could have put it in: the directory is ours and
//! writable by nobody else, and so is every directory above it up to `/`
//! (each owned by us or root, and writable by nobody else unless sticky, as
//! `/tmp` is: there nobody can move another's entries), as ssh's StrictModes
//! checks a key's path. The directory is opened once, its path walked
//! without following a link (after resolving the configured path once), and
//! every entry is read and written through that descriptor: the directory
//! checked is the one used, even if a path component is swapped meanwhile.
//! An entry is read into memory once, and those bytes are hashed and
//! deserialized: what was checked is what runs. (The checksum is unkeyed on
//! purpose: it detects a corrupt or truncated entry; whoever could forge it
//! could write the entries and any key kept beside them, so the directory's
//! ownership is what keeps others out.) Anything else leaves the cache
//! unused, said once in the log. Writes go to a temporary file renamed into
//! place, so a reader never sees half an entry. The directory holds at most
//! [`KEEP`] entries; the least recently used go first.

use std::ffi::CString;
use std::hash::Hasher;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// Entries kept; older ones are removed when a new one is written.
pub const KEEP: usize = 32;

/// A `.sum` file: this magic, then the SHA-256 of the `.cwasm` beside it.
const MAGIC: &[u8; 8] = b"SEGWLBC2";

/// Where a component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Deserialized from a cache entry.
    Cache,
    /// Compiled now (and stored, when the cache could be written).
    Compiled,
    /// Compiled now because the entry found was corrupt or mismatched;
    /// the entry was replaced.
    Rebuilt,
}

/// A directory of compiled components.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Cache { dir: dir.into() }
    }

    /// `$SEGWLB_CACHE_DIR`, else `$XDG_CACHE_HOME/segwlb/policies`, else
    /// `$HOME/.cache/segwlb/policies`.
    pub fn default_dir() -> Option<PathBuf> {
        let env = |k| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        env("SEGWLB_CACHE_DIR")
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("segwlb/policies")))
            .or_else(|| env("HOME").map(|d| d.join(".cache/segwlb/policies")))
    }

    /// The component for `bytes`, from the cache or compiled (then stored).
    /// Errors are the compiler's; cache trouble only costs a compile.
    pub fn component(
        &self,
        engine: &Engine,
        bytes: &[u8],
    ) -> wasmtime::Result<(Component, Origin)> {
        let t = std::time::Instant::now();
        let name = entry_name(engine, bytes);
        tracing::debug!(
            bytes = bytes.len(),
            key_ms = t.elapsed().as_secs_f64() * 1e3,
            "compiled-policy cache key"
        );
        let dir = match self.open() {
            Ok(dir) => Some(dir),
            Err(why) => {
                warn_once(&self.dir, &why);
                None
            }
        };
        let mut origin = Origin::Compiled;
        if let Some(dir) = &dir {
            match dir.read(engine, &name) {
                Ok(Some(component)) => return Ok((component, Origin::Cache)),
                Ok(None) => {}
                Err(why) => {
                    tracing::warn!(entry = %self.dir.join(&name).display(), "compiled-policy cache entry not used: {why}; compiling again");
                    origin = Origin::Rebuilt;
                }
            }
        }
        let component = Component::new(engine, bytes)?;
        if let Some(dir) = &dir {
            if let Err(e) = dir.store(&name, &component) {
                tracing::warn!(dir = %self.dir.display(), "cannot write the compiled-policy cache: {e}");
            }
        }
        Ok((component, origin))
    }

    /// Create the directory if needed and open it, when it and every
    /// directory above it pass [`trusted`]; else why not.
    fn open(&self) -> Result<Dir, String> {
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir);
        let real = std::fs::canonicalize(&self.dir).map_err(|e| e.to_string())?;
        let mut fd = open_dir(None, Path::new("/"))?;
        let mut walked = PathBuf::from("/");
        trusted(&fd, &walked, false)?;
        let parts: Vec<_> = real.components().skip(1).collect();
        for (i, part) in parts.iter().enumerate() {
            walked.push(part);
            fd = open_dir(Some(&fd), Path::new(part.as_os_str()))
                .map_err(|e| format!("{}: {e}", walked.display()))?;
            trusted(&fd, &walked, i + 1 == parts.len())?;
        }
        Ok(Dir { fd })
    }
}

/// An entry's file name (without extension): a SHA-256 of the component,
/// segwlb's version and the engine's compatibility hash.
fn entry_name(engine: &Engine, bytes: &[u8]) -> String {
    let mut key = ShaHasher(Sha256::new());
    key.0.update(b"segwlb compiled policy\0");
    key.0.update(env!("CARGO_PKG_VERSION").as_bytes());
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut key);
    key.0.update(Sha256::digest(bytes));
    key.0.finalize()[..20]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// May entries be taken from under the directory open as `fd` (at `path`)?
/// The cache directory itself (`last`) must be ours and writable by nobody
/// else; a directory above it may also be root's, and writable by others
/// when sticky (they can add to it, not move what is ours).
fn trusted(fd: &OwnedFd, path: &Path, last: bool) -> Result<(), String> {
    let m = std::fs::File::from(fd.try_clone().map_err(|e| e.to_string())?)
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let sticky = m.mode() & libc::S_ISVTX != 0;
    let why = if !m.is_dir() {
        Some("not a directory".to_string())
    } else if last && m.uid() != me {
        Some(format!("owned by uid {}, not by us (uid {me})", m.uid()))
    } else if m.uid() != me && m.uid() != 0 {
        Some(format!("owned by uid {}, neither us nor root", m.uid()))
    } else if m.mode() & 0o022 != 0 && (last || !sticky) {
        Some(format!("writable by others (mode {:o})", m.mode() & 0o7777))
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(format!(
            "{}: {why}; another user could put machine code there",
            path.display()
        )),
    }
}

/// `name` under the directory `at` (or the path itself), as a directory,
/// never through a symbolic link.
fn open_dir(at: Option<&OwnedFd>, name: &Path) -> Result<OwnedFd, String> {
    open_at(at, name, libc::O_RDONLY | libc::O_DIRECTORY, 0).map_err(|e| e.to_string())
}

/// `openat(2)` with `O_NOFOLLOW | O_CLOEXEC` added.
fn open_at(
    at: Option<&OwnedFd>,
    name: &Path,
    flags: libc::c_int,
    mode: libc::c_uint,
) -> std::io::Result<OwnedFd> {
    let c = CString::new(name.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let dirfd = at.map_or(libc::AT_FDCWD, |fd| fd.as_raw_fd());
    // SAFETY: a NUL-terminated name and a directory descriptor we own (or
    // AT_FDCWD); on success the returned descriptor is ours alone.
    let fd = unsafe {
        libc::openat(
            dirfd,
            c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The cache directory, opened once and checked: every entry is read and
/// written through it.
struct Dir {
    fd: OwnedFd,
}

impl Dir {
    fn open_file(&self, name: &str) -> std::io::Result<std::fs::File> {
        open_at(Some(&self.fd), Path::new(name), libc::O_RDONLY, 0).map(std::fs::File::from)
    }

    /// `Ok(None)`: no entry. `Err`: an entry that must not be used.
    fn read(&self, engine: &Engine, name: &str) -> Result<Option<Component>, String> {
        let t = std::time::Instant::now();
        let (cwasm, sum) = (format!("{name}.cwasm"), format!("{name}.sum"));
        let sum = match self.open_file(&sum) {
            Ok(f) => read_bounded(f, (MAGIC.len() + 32) as u64).map_err(|e| e.to_string())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return match self.open_file(&cwasm) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    _ => Err("no checksum beside it".into()),
                };
            }
            Err(e) => return Err(e.to_string()),
        };
        if sum.len() != MAGIC.len() + 32 || &sum[..MAGIC.len()] != MAGIC {
            return Err("its checksum file is not one of this cache".into());
        }
        let file = match self.open_file(&cwasm) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let meta = file.metadata().map_err(|e| e.to_string())?;
        if !meta.is_file() {
            return Err("not a regular file".into());
        }
        // Read once: these bytes are hashed and these bytes deserialized,
        // whatever happens to the file meanwhile.
        let artifact = read_bounded(&file, MAX_ENTRY).map_err(|e| e.to_string())?;
        if Sha256::digest(&artifact).as_slice() != &sum[MAGIC.len()..] {
            return Err("checksum mismatch (corrupt or truncated)".into());
        }
        let checked = t.elapsed();
        // SAFETY: `artifact` is byte for byte what `Component::serialize`
        // wrote for this engine's settings (the checksum above, the key in
        // the name), read from a directory only we (or root) could write
        // to; wasmtime checks its own header and the engine's
        // compatibility again.
        let component =
            unsafe { Component::deserialize(engine, &artifact) }.map_err(|e| format!("{e:#}"))?;
        // Recently used: the last to be pruned.
        let _ = file.set_modified(SystemTime::now());
        tracing::debug!(
            entry = name,
            checksum_ms = checked.as_secs_f64() * 1e3,
            deserialize_ms = (t.elapsed() - checked).as_secs_f64() * 1e3,
            "compiled policy from the cache"
        );
        Ok(Some(component))
    }

    fn store(&self, name: &str, component: &Component) -> std::io::Result<()> {
        let artifact = component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        let mut sum = MAGIC.to_vec();
        sum.extend_from_slice(&Sha256::digest(&artifact));
        // The artifact first: a reader between the two renames sees a sum
        // that does not match (a rebuild), never a wrong match.
        self.write_atomic(&format!("{name}.cwasm"), &artifact)?;
        self.write_atomic(&format!("{name}.sum"), &sum)?;
        self.prune();
        Ok(())
    }

    /// Write `bytes` to `name` by a temporary file renamed over it.
    fn write_atomic(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        // Unique per writer: threads of one process may store one entry at once.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = format!("{name}.tmp{}-{n}", std::process::id());
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        let mut f = std::fs::File::from(open_at(Some(&self.fd), Path::new(&tmp), flags, 0o600)?);
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        let (from, to) = (cstring(&tmp)?, cstring(name)?);
        let at = self.fd.as_raw_fd();
        // SAFETY: NUL-terminated names in the directory we hold open.
        if unsafe { libc::renameat(at, from.as_ptr(), at, to.as_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Keep the [`KEEP`] most recently used entries.
    fn prune(&self) {
        // The directory we hold, listed through its descriptor.
        let Ok(list) = std::fs::read_dir(format!("/proc/self/fd/{}", self.fd.as_raw_fd())) else {
            return;
        };
        let mut entries: Vec<(SystemTime, String)> = list
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let stem = name.strip_suffix(".cwasm")?.to_string();
                Some((e.metadata().ok()?.modified().ok()?, stem))
            })
            .collect();
        if entries.len() <= KEEP {
            return;
        }
        entries.sort();
        for (_, stem) in &entries[..entries.len() - KEEP] {
            for name in [format!("{stem}.cwasm"), format!("{stem}.sum")] {
                if let Ok(c) = cstring(&name) {
                    // SAFETY: a NUL-terminated name in the directory we hold.
                    unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) };
                }
            }
        }
    }
}

fn cstring(name: &str) -> std::io::Result<CString> {
    CString::new(name).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// Largest entry read: a compiled CPython is ~45 MB.
const MAX_ENTRY: u64 = 1 << 30;

/// All of `file`, refusing more than `max` bytes.
fn read_bounded(file: impl std::io::Read, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(bytes)
}

fn warn_once(dir: &Path, why: &str) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        tracing::warn!(dir = %dir.display(), "compiled-policy cache not used: {why}");
    });
}

/// Feeds `Hash` output into SHA-256, for the engine's compatibility hash.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        // Never asked: the digest is taken from the SHA-256 state.
        0
    }
}
