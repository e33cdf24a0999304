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
//! Deserializing is loading native code: the directory must be ours and
//! writable by nobody else, or the cache is not used (said once in the log).
//! Writes go to a temporary file renamed into place, so a reader never sees
//! half an entry. The directory holds at most [`KEEP`] entries; the least
//! recently used go first.

use std::hash::Hasher;
use std::io::Write;
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
        let entry = self.entry(engine, bytes);
        tracing::debug!(
            bytes = bytes.len(),
            key_ms = t.elapsed().as_secs_f64() * 1e3,
            "compiled-policy cache key"
        );
        let usable = self.usable();
        let mut origin = Origin::Compiled;
        if usable {
            match self.read(engine, &entry) {
                Ok(Some(component)) => {
                    // Recently used: the last to be pruned.
                    if let Ok(f) = std::fs::File::options().append(true).open(&entry) {
                        let _ = f.set_modified(SystemTime::now());
                    }
                    return Ok((component, Origin::Cache));
                }
                Ok(None) => {}
                Err(why) => {
                    tracing::warn!(entry = %entry.display(), "compiled-policy cache entry not used: {why}; compiling again");
                    origin = Origin::Rebuilt;
                }
            }
        }
        let component = Component::new(engine, bytes)?;
        if usable {
            if let Err(e) = self.store(&entry, &component) {
                tracing::warn!(dir = %self.dir.display(), "cannot write the compiled-policy cache: {e}");
            }
        }
        Ok((component, origin))
    }

    fn entry(&self, engine: &Engine, bytes: &[u8]) -> PathBuf {
        let mut key = ShaHasher(Sha256::new());
        key.0.update(b"segwlb compiled policy\0");
        key.0.update(env!("CARGO_PKG_VERSION").as_bytes());
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut key);
        key.0.update(Sha256::digest(bytes));
        let name: String = key.0.finalize()[..20]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.dir.join(format!("{name}.cwasm"))
    }

    /// Create the directory if needed; trust it only when it is ours and
    /// nobody else can write to it.
    fn usable(&self) -> bool {
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir);
        match std::fs::metadata(&self.dir) {
            Ok(m)
                if m.is_dir() && m.uid() == unsafe { libc::geteuid() } && m.mode() & 0o022 == 0 =>
            {
                true
            }
            Ok(_) => {
                warn_once(
                    &self.dir,
                    "not a directory of ours that only we can write to",
                );
                false
            }
            Err(e) => {
                warn_once(&self.dir, &e.to_string());
                false
            }
        }
    }

    /// `Ok(None)`: no entry. `Err`: an entry that must not be used.
    fn read(&self, engine: &Engine, entry: &Path) -> Result<Option<Component>, String> {
        let t = std::time::Instant::now();
        let sum = match std::fs::read(entry.with_extension("sum")) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return match entry.exists() {
                    false => Ok(None),
                    true => Err("no checksum beside it".into()),
                };
            }
            Err(e) => return Err(e.to_string()),
        };
        if sum.len() != MAGIC.len() + 32 || &sum[..MAGIC.len()] != MAGIC {
            return Err("its checksum file is not one of this cache".into());
        }
        match sha256_of(entry) {
            Ok(digest) if digest.as_slice() == &sum[MAGIC.len()..] => {}
            Ok(_) => return Err("checksum mismatch (corrupt or truncated)".into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        }
        let checked = t.elapsed();
        // SAFETY: the file is byte for byte what `Component::serialize`
        // wrote for this engine's settings (the checksum above, the key in
        // the name), in a directory only we can write, and entries are only
        // ever replaced by rename, never changed in place; wasmtime checks
        // its own header and the engine's compatibility again.
        let component =
            unsafe { Component::deserialize_file(engine, entry) }.map_err(|e| format!("{e:#}"))?;
        tracing::debug!(
            entry = %entry.display(),
            checksum_ms = checked.as_secs_f64() * 1e3,
            deserialize_ms = (t.elapsed() - checked).as_secs_f64() * 1e3,
            "compiled policy from the cache"
        );
        Ok(Some(component))
    }

    fn store(&self, entry: &Path, component: &Component) -> std::io::Result<()> {
        let artifact = component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        let mut sum = MAGIC.to_vec();
        sum.extend_from_slice(&Sha256::digest(&artifact));
        // The artifact first: a reader between the two renames sees a sum
        // that does not match (a rebuild), never a wrong match.
        write_atomic(entry, &artifact)?;
        write_atomic(&entry.with_extension("sum"), &sum)?;
        self.prune();
        Ok(())
    }

    /// Keep the [`KEEP`] most recently used entries.
    fn prune(&self) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut entries: Vec<(SystemTime, PathBuf)> = dir
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if entries.len() <= KEEP {
            return;
        }
        entries.sort();
        for (_, path) in &entries[..entries.len() - KEEP] {
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_file(path.with_extension("sum"));
        }
    }
}

/// Write `bytes` to `path` by a temporary file renamed over it.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Unique per writer: threads of one process may store one entry at once.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// SHA-256 of a file, read in pieces (a compiled CPython is ~45 MB: no
/// buffer of its size).
fn sha256_of(path: &Path) -> std::io::Result<[u8; 32]> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        match f.read(&mut buf)? {
            0 => return Ok(h.finalize().into()),
            n => h.update(&buf[..n]),
        }
    }
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
