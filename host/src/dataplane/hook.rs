//! The graceful-move hook: the command `segwlb run` runs to ask a segw to
//! send a peer away (`[moves] hook`), since the balancer cannot speak IKE
//! for a segw. The worker hands each [`MoveRequest`] over a bounded
//! channel; a few threads run the command, never the worker. A request
//! that finds the channel full is counted and dropped: its move times out
//! and the tunnel stays where it was.
//!
//! The command is a list of words; each word's placeholders are replaced:
//! `{peer}` `{peer_port}` `{vip}` `{ike_spi}` `{responder_spi}` (16 hex
//! digits, empty when not known) `{from}` `{to}` (gateway names).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};

use crate::balancer::moves::MoveRequest;

/// The words a hook may use.
pub const PLACEHOLDERS: [&str; 7] = [
    "peer",
    "peer_port",
    "vip",
    "ike_spi",
    "responder_spi",
    "from",
    "to",
];

/// Requests waiting for a runner, at most.
const QUEUE: usize = 4096;
/// Hook commands running at once.
const RUNNERS: usize = 4;
/// A hook that runs longer is killed (counted as failed).
const HOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the hooks did, since start.
#[derive(Debug, Default)]
pub struct HookCounters {
    pub ran: AtomicU64,
    pub failed: AtomicU64,
    /// Dropped: the queue was full.
    pub dropped: AtomicU64,
}

/// One request, with the gateways named.
struct Job {
    request: MoveRequest,
    from: String,
    to: String,
}

pub struct Hook {
    jobs: Sender<Job>,
    pub counters: Arc<HookCounters>,
}

/// Check a hook's words: not empty, and only known placeholders.
pub fn check(words: &[String]) -> Result<(), String> {
    if words.is_empty() {
        return Err("an empty command".into());
    }
    for w in words {
        let mut rest = w.as_str();
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("`{w}`: a `{{` without its `}}`"));
            };
            let name = &rest[open + 1..open + close];
            if !PLACEHOLDERS.contains(&name) {
                return Err(format!(
                    "`{w}`: no placeholder `{{{name}}}` (there are: {})",
                    PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(" ")
                ));
            }
            rest = &rest[open + close + 1..];
        }
    }
    Ok(())
}

/// The command's words for one request.
fn expand(words: &[String], job: &Job) -> Vec<String> {
    let r = &job.request;
    let hex = |s: Option<u64>| s.map_or(String::new(), |s| format!("{s:016x}"));
    words
        .iter()
        .map(|w| {
            w.replace("{peer}", &r.peer.to_string())
                .replace("{peer_port}", &r.peer_port.to_string())
                .replace("{vip}", &r.vip.to_string())
                .replace("{ike_spi}", &hex(r.ike_spi))
                .replace("{responder_spi}", &hex(r.responder_spi))
                .replace("{from}", &job.from)
                .replace("{to}", &job.to)
        })
        .collect()
}

impl Hook {
    /// Start the runners for command `words` (checked by [`check`]).
    pub fn start(words: Vec<String>) -> Hook {
        let (jobs, rx) = crossbeam_channel::bounded::<Job>(QUEUE);
        let counters = Arc::new(HookCounters::default());
        for n in 0..RUNNERS {
            let (rx, words, counters) = (rx.clone(), words.clone(), counters.clone());
            std::thread::Builder::new()
                .name(format!("move-hook-{n}"))
                .spawn(move || {
                    for job in rx {
                        let ok = run(&expand(&words, &job));
                        counters.ran.fetch_add(1, Ordering::Relaxed);
                        if !ok {
                            counters.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
                .expect("spawn a hook runner");
        }
        Hook { jobs, counters }
    }

    /// Hand a request to the runners; never blocks.
    pub fn ask(&self, request: MoveRequest, from: String, to: String) {
        match self.jobs.try_send(Job { request, from, to }) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Run one hook command to its end (or [`HOOK_TIMEOUT`]); whether it
/// succeeded. Failures are logged with what the command said.
fn run(argv: &[String]) -> bool {
    use std::process::{Command, Stdio};
    let started = Instant::now();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(command = %argv.join(" "), "move hook did not start: {e}");
            return false;
        }
    };
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return true,
            Ok(Some(status)) => {
                let mut said = String::new();
                if let Some(mut err) = child.stderr.take() {
                    use std::io::Read;
                    let _ = err.read_to_string(&mut said);
                }
                tracing::warn!(command = %argv.join(" "), "move hook failed ({status}): {}", said.trim());
                return false;
            }
            Ok(None) if started.elapsed() > HOOK_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(command = %argv.join(" "), "move hook killed after {HOOK_TIMEOUT:?}");
                return false;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                tracing::warn!(command = %argv.join(" "), "move hook: {e}");
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn placeholders_are_checked_and_filled() {
        assert!(check(&[]).is_err());
        let e = check(&words(&["x", "{peer}", "{gateway}"])).unwrap_err();
        assert!(e.contains("{gateway}"), "{e}");
        assert!(check(&words(&["x", "{peer"])).is_err());
        let w = words(&[
            "redirect",
            "--on={from}",
            "{ike_spi}_i",
            "{peer}:{peer_port}",
            "{responder_spi}",
        ]);
        check(&w).unwrap();
        let job = Job {
            request: MoveRequest {
                peer: "198.51.100.7".parse().unwrap(),
                peer_port: 4500,
                vip: "10.2.2.1".parse().unwrap(),
                ike_spi: Some(0xab),
                responder_spi: None,
                from: 1,
                to: 2,
            },
            from: "segw1".into(),
            to: "segw2".into(),
        };
        assert_eq!(
            expand(&w, &job),
            words(&[
                "redirect",
                "--on=segw1",
                "00000000000000ab_i",
                "198.51.100.7:4500",
                ""
            ])
        );
    }

    #[test]
    fn a_hook_runs_off_the_caller_and_failures_are_counted() {
        let dir = std::env::temp_dir().join(format!("segwlb-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("asked");
        let hook = Hook::start(words(&[
            "sh",
            "-c",
            &format!(
                "echo {{from}} {{peer}} >> {}; test {{to}} = segw2",
                out.display()
            ),
        ]));
        let request = |to| MoveRequest {
            peer: "198.51.100.7".parse().unwrap(),
            peer_port: 500,
            vip: "10.2.2.1".parse().unwrap(),
            ike_spi: None,
            responder_spi: None,
            from: 1,
            to,
        };
        hook.ask(request(2), "segw1".into(), "segw2".into());
        hook.ask(request(3), "segw1".into(), "segw3".into());
        let deadline = Instant::now() + Duration::from_secs(10);
        while hook.counters.ran.load(Ordering::Relaxed) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(hook.counters.ran.load(Ordering::Relaxed), 2);
        assert_eq!(hook.counters.failed.load(Ordering::Relaxed), 1);
        let asked = std::fs::read_to_string(&out).unwrap();
        assert_eq!(asked.lines().count(), 2);
        assert!(asked.lines().all(|l| l == "segw1 198.51.100.7"), "{asked}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
