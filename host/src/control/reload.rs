//! Hot reload: a notify watcher on the policy directory and the config
//! file's directory, on its own thread, talking over a channel.
//!
//! Editors and build tools save in several steps (write a temp file, rename
//! it over; or truncate, then write in chunks), each an event. Events are
//! gathered until the files have been quiet for [`QUIET`], then each
//! changed file is acted on once; a policy whose bytes did not change is not
//! reloaded at all (the supervisor compares hashes). The time of the first
//! event is when the change was "noticed": swap latency is measured from it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, RecvTimeoutError};
use notify::{RecursiveMode, Watcher};

use super::Supervisor;

/// How long the files must be quiet before a change is acted on.
pub const QUIET: Duration = Duration::from_millis(10);

/// Watch `policy_dir` and `config_file`; act through `supervisor` until
/// `stop` is set.
pub fn watch(
    policy_dir: &Path,
    config_file: &Path,
    supervisor: Arc<Mutex<Supervisor>>,
    stop: Arc<AtomicBool>,
) -> notify::Result<JoinHandle<()>> {
    let (tx, rx) = unbounded();
    let policy_dir = canonical(policy_dir);
    let config_file = canonical(config_file);
    // Only our files count: anything else in these directories (a log
    // written on every request, an editor's swap file) must not keep the
    // quiet period from ever ending.
    let ours = {
        let (policy_dir, config_file) = (policy_dir.clone(), config_file.clone());
        move |p: &PathBuf| {
            *p == config_file
                || (p.parent() == Some(policy_dir.as_path())
                    && p.extension().is_some_and(|e| e == "wasm"))
        }
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if !event.kind.is_access() {
                let paths: Vec<PathBuf> = event.paths.into_iter().filter(&ours).collect();
                if !paths.is_empty() {
                    let _ = tx.send(paths);
                }
            }
        }
    })?;
    watcher.watch(&policy_dir, RecursiveMode::NonRecursive)?;
    let config_dir = config_file
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    if config_dir != policy_dir {
        watcher.watch(&config_dir, RecursiveMode::NonRecursive)?;
    }
    std::thread::Builder::new()
        .name("reload".into())
        .spawn(move || {
            let _watcher = watcher; // dropped (and unwatched) with the thread
            while !stop.load(Ordering::Relaxed) {
                let first = match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(paths) => paths,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                let noticed = Instant::now();
                let mut changed: BTreeSet<PathBuf> = first.into_iter().collect();
                while let Ok(more) = rx.recv_timeout(QUIET) {
                    changed.extend(more);
                }
                let mut sup = supervisor.lock().unwrap_or_else(|p| p.into_inner());
                let serving = sup.policy_file().to_path_buf();
                let policy_file = canonical(&serving);
                for path in &changed {
                    if *path == config_file {
                        match sup.config_changed(noticed) {
                            Ok(done) if done.is_empty() => {
                                tracing::debug!("config file touched, nothing changed")
                            }
                            Ok(done) => tracing::info!(
                                file = %config_file.display(),
                                "config reloaded: {}",
                                done.join("; ")
                            ),
                            Err(e) => tracing::error!(
                                "config reload refused, the running config stays: {e}"
                            ),
                        }
                    } else if *path == policy_file {
                        if let Some(Err(e)) = sup.policy_file_changed(&serving, noticed) {
                            tracing::debug!("policy reload failed: {e}");
                        }
                    }
                }
            }
        })
        .map_err(notify::Error::io)
}

/// Paths as notify reports them (absolute, symlinks resolved).
fn canonical(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    // A file being replaced may be missing for a moment: resolve its
    // directory instead.
    match (p.parent(), p.file_name()) {
        (Some(dir), Some(name)) => dir
            .canonicalize()
            .map_or_else(|_| p.to_path_buf(), |d| d.join(name)),
        _ => p.to_path_buf(),
    }
}
