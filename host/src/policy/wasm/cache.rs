//! Compiled policies kept on disk, so a restart or a reload of an unchanged
//! policy deserializes machine code (milliseconds) instead of compiling an
//! 18 MB language runtime again (seconds).
//!
//! An entry is named by a SHA-256 of the component's bytes, the wasmtime
//! version and the engine's compatibility hash (compiler, target, tunables),
//! so any change to the file or to the engine's settings misses. An entry
//! holds wasmtime's own serialization behind a header and a SHA-256 of it;
//! it is used only when that checksum matches, and a corrupt, truncated or
//! mismatched entry is compiled afresh and overwritten, never trusted.
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

const MAGIC: &[u8; 8] = b"SEGWLBC1";
const HEADER: usize = MAGIC.len() + 32;

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

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Cache => "cache",
            Origin::Compiled => "compiled",
            Origin::Rebuilt => "rebuilt",
        }
    }
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

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The component for `bytes`, from the cache or compiled (then stored).
    /// Errors are the compiler's; cache trouble only costs a compile.
    pub fn component(
        &self,
        engine: &Engine,
        bytes: &[u8],
    ) -> wasmtime::Result<(Component, Origin)> {
        let entry = self.entry(engine, bytes);
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
        let bytes = match std::fs::read(entry) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        if bytes.len() < HEADER || &bytes[..MAGIC.len()] != MAGIC {
            return Err("not an entry of this cache".into());
        }
        let (sum, artifact) = bytes[MAGIC.len()..].split_at(32);
        if Sha256::digest(artifact).as_slice() != sum {
            return Err("checksum mismatch (corrupt or truncated)".into());
        }
        // SAFETY: the artifact is byte for byte what `Component::serialize`
        // wrote for this engine's settings (the checksum above, the key in
        // the name), in a directory only we can write; wasmtime checks its
        // own header and the engine's compatibility again.
        unsafe { Component::deserialize(engine, artifact) }
            .map(Some)
            .map_err(|e| format!("{e:#}"))
    }

    fn store(&self, entry: &Path, component: &Component) -> std::io::Result<()> {
        let artifact = component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        // Unique per writer: threads of one process may store one entry at once.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = entry.with_extension(format!("tmp{}-{n}", std::process::id()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(MAGIC)?;
        f.write_all(&Sha256::digest(&artifact))?;
        f.write_all(&artifact)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, entry)?;
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
