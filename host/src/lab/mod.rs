//! Network-namespace plumbing shared by the live tests, the throughput
//! benchmark and `segwlb lab`: namespaces and veth pairs that clean up after
//! themselves, and running code inside a namespace ([`netns`]); and the lab
//! itself: real strongSwan initiators and segws in namespaces with
//! `segwlb run` balancing between them ([`topology`] builds and removes it,
//! [`report`] drives the tunnels and says where they landed), or a pair of
//! them with keepalived deciding which one is active ([`vrrp`]).

pub mod churn;
pub mod compare;
pub mod config;
pub mod drive;
pub mod initiate;
pub mod libreswan;
pub mod netns;
pub mod probe;
pub mod report;
pub mod strongswan;
pub mod topology;
pub mod traffic;
pub mod vrrp;

use std::path::{Path, PathBuf};

pub use config::LabConfig;
pub use report::Report;

/// What went wrong in the lab, naming the step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the lab cannot run here: {0}")]
    Prerequisites(String),
    #[error("{0}")]
    State(String),
    #[error("{what} failed: {detail}")]
    Step { what: String, detail: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Make `dir`, the lab's work dir, private to us (mode 0700), or check
/// that it already is. By default it is `/tmp/segwlb-lab-PREFIX`, a name
/// anyone can take first, and root trusts what it holds: the pids `lab
/// down` stops, the configurations charon and the balancer load.
pub fn private_work_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|source| Error::Io {
            what: format!("create {}", parent.display()),
            source,
        })?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => check_private(dir),
        Err(source) => Err(Error::Io {
            what: format!("create {}", dir.display()),
            source,
        }),
    }
}

/// Refuse a work dir that is not ours alone: a symbolic link, not a
/// directory, owned by another user, or one others may enter or write.
pub fn check_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir).map_err(|source| Error::Io {
        what: format!("look at {}", dir.display()),
        source,
    })?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let why = if meta.file_type().is_symlink() {
        "is a symbolic link".to_string()
    } else if !meta.is_dir() {
        "is not a directory".to_string()
    } else if meta.uid() != me {
        format!("is owned by uid {}, not {me}", meta.uid())
    } else if meta.mode() & 0o077 != 0 {
        format!("has mode {:03o}, not 0700", meta.mode() & 0o777)
    } else {
        return Ok(());
    };
    Err(Error::State(format!(
        "the lab's work dir {} {why}: another user may have made it or written in it, so the lab does not trust it (remove it, or set lab.work_dir)",
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use super::*;

    /// A lab config whose work dir is the default one in /tmp.
    fn config(prefix: &str) -> LabConfig {
        LabConfig::parse(&format!("[lab]\nprefix = \"{prefix}\"\ninitiators = 1\n")).unwrap()
    }

    /// What another user can do before root's `lab up`: make the lab's
    /// predictable work dir, open to all, with a state file naming a
    /// process of someone else's for `lab down` to stop.
    fn plant(dir: &std::path::Path, victim: u32) {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        let state = serde_json::json!({
            "prefix": "x", "work": dir, "vip": "10.2.2.1", "service": "10.201.0.1",
            "pings": 1, "policy": "round-robin", "namespaces": [], "initiators": [],
            "segws": [], "swanctl_conf": dir.join("c"),
            "balancers": [{
                "name": "lb", "ns": "x-lb", "pid": victim, "config": dir.join("lb.toml"),
                "socket": dir.join("s"), "log": dir.join("l"), "state_file": dir.join("t"),
            }],
        });
        std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    }

    #[test]
    fn lab_down_does_not_trust_a_work_dir_others_could_write() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: the lab runs as root");
            return;
        }
        let prefix = format!("wdt{}", std::process::id());
        let c = config(&prefix);
        let mut victim = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        plant(&c.work_dir(), victim.id());
        let down = topology::down(&c);
        std::thread::sleep(Duration::from_millis(100));
        let killed = victim.try_wait().unwrap();
        let _ = victim.kill();
        let _ = victim.wait();
        let _ = std::fs::remove_dir_all(c.work_dir());
        assert_eq!(
            killed, None,
            "lab down stopped a process a planted state file named"
        );
        down.unwrap();
    }

    #[test]
    fn the_work_dir_is_made_private_and_one_that_is_not_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("lab");
        private_work_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        private_work_dir(&dir).unwrap();

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = private_work_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("has mode 755, not 0700"), "{e}");

        let link = base.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let e = private_work_dir(&link).unwrap_err().to_string();
        assert!(e.contains("is a symbolic link"), "{e}");

        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
            let e = private_work_dir(&dir).unwrap_err().to_string();
            assert!(e.contains("is owned by uid 65534"), "{e}");
        }
    }
}
