//! The control plane of `segwlb run`: the configuration, what changes it at
//! runtime (the control socket, file changes), and what reports on it
//! (status, metrics). It talks to the data path only through
//! [`dataplane::Command`]s; it never touches a frame.
//!
//! The [`Supervisor`] holds what the control plane owns: the wasm runtime
//! (policies are compiled here, off the data path), the configuration in
//! force, and the ports (opening an interface and its reader thread for a
//! gateway added at runtime). The control socket and the file watcher
//! share it behind a mutex; the data path never takes that lock.

pub mod access;
pub mod bounded;
pub mod config;
pub mod ctl;
pub mod diff;
pub mod metrics;
pub mod reload;
pub mod state;
pub mod status;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};

use crate::balancer::{GatewaySpec, PortId};
use crate::dataplane::{Command, Reply};
use crate::io::{afpacket, Received};
use crate::policy::wasm::{Loaded, Runtime, WasmPolicy};
use config::{GatewayConfig, RunConfig};
use diff::Change;
use status::{Gathered, Status};

/// How long the control plane waits for the data path to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a swap with a rebalance is waited for: the worker re-places
/// the tunnels a slice at a time between frames, about a second per
/// million tunnels for a native policy, a few in wasm. (Under the 30 s
/// `segwlb ctl` waits for any answer.)
const REBALANCE_TIMEOUT: Duration = Duration::from_secs(25);

/// A port the control plane opened: its reader thread and how to stop it.
pub struct PortHandle {
    pub port: PortId,
    pub interface: String,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl PortHandle {
    pub fn new(
        port: PortId,
        interface: &str,
        stop: Arc<AtomicBool>,
        reader: JoinHandle<()>,
    ) -> Self {
        PortHandle {
            port,
            interface: interface.into(),
            stop,
            reader: Some(reader),
        }
    }

    pub fn close(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

pub struct Supervisor {
    runtime: Runtime,
    config: RunConfig,
    /// Gateway name → its port.
    ports: BTreeMap<String, PortHandle>,
    worker: Sender<Command>,
    frames: Sender<Received>,
    /// The policy serving now: its file and a hash of its bytes (a file
    /// event whose bytes did not change reloads nothing).
    policy_file: PathBuf,
    policy_hash: u64,
}

impl Supervisor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        runtime: Runtime,
        config: RunConfig,
        ports: BTreeMap<String, PortHandle>,
        worker: Sender<Command>,
        frames: Sender<Received>,
        policy_file: PathBuf,
        policy_bytes: &[u8],
    ) -> Self {
        Supervisor {
            runtime,
            config,
            ports,
            worker,
            frames,
            policy_file,
            policy_hash: hash(policy_bytes),
        }
    }

    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    /// `ctl save`: the table to the state file, now.
    pub fn save_state(&self) -> Result<String, String> {
        let path = self
            .config
            .state_file
            .as_ref()
            .ok_or("no balancer.state_file in the config: nowhere to save")?;
        state::save(path, &self.worker)
    }

    pub fn policy_file(&self) -> &Path {
        &self.policy_file
    }

    /// Ask the worker and wait for its answer.
    fn ask(&self, make: impl FnOnce(Sender<Reply>) -> Command) -> Reply {
        self.ask_within(ASK_TIMEOUT, make)
    }

    fn ask_within(&self, timeout: Duration, make: impl FnOnce(Sender<Reply>) -> Command) -> Reply {
        let (tx, rx) = bounded(1);
        self.worker
            .send(make(tx))
            .map_err(|_| "the data path has stopped".to_string())?;
        rx.recv_timeout(timeout)
            .map_err(|_| "the data path did not answer".to_string())?
    }

    /// The status, listing the `tunnels` oldest of each gateway and the
    /// `top` heaviest.
    pub fn status(&self, tunnels: usize, top: usize) -> Option<Status> {
        let (tx, rx) = bounded(1);
        self.worker
            .send(Command::Status {
                tunnels,
                top,
                reply: tx,
            })
            .ok()?;
        // Sorted and formatted here, off the data path.
        rx.recv_timeout(ASK_TIMEOUT).ok().map(Gathered::finish)
    }

    /// Where policy `name` lives: a name in the policy directory, or a path.
    fn resolve(&self, name: &str) -> PathBuf {
        if name.ends_with(".wasm") || name.contains('/') {
            PathBuf::from(name)
        } else {
            self.config.policy.file_of(name)
        }
    }

    /// Compile and check a policy here, then swap it in on the data path.
    /// A policy that does not load is refused and the old one keeps serving.
    /// With `graceful` (and `rebalance`), the tunnels the new policy moves
    /// do so gracefully (`balancer::moves`).
    pub fn use_policy(
        &mut self,
        name: &str,
        rebalance: bool,
        graceful: bool,
        noticed: Instant,
    ) -> Reply {
        let file = self.resolve(name);
        let configured = file == self.config.policy.file();
        self.swap(&file, configured, (rebalance, graceful), noticed)
    }

    fn swap(
        &mut self,
        file: &Path,
        configured: bool,
        (rebalance, graceful): (bool, bool),
        noticed: Instant,
    ) -> Reply {
        let compile = Instant::now();
        let loaded = match self.load(file, configured) {
            Ok(l) => l,
            Err((bytes_hash, e)) => {
                let _ = self.worker.send(Command::PolicyRejected);
                tracing::error!("policy refused, the current one keeps serving: {e}");
                if let Some(h) = bytes_hash {
                    // Do not retry the same broken bytes on the next event.
                    if file == self.policy_file {
                        self.policy_hash = h;
                    }
                }
                return Err(e);
            }
        };
        let (loaded, bytes_hash) = loaded;
        // Start the instance (and its spare) here, off the data path: for a
        // language runtime that is milliseconds the worker must not spend.
        let policy: WasmPolicy = match loaded.serve() {
            Ok(p) => p,
            Err(e) => {
                let _ = self.worker.send(Command::PolicyRejected);
                let e = format!("{}: could not start: {e}", file.display());
                tracing::error!("policy refused, the current one keeps serving: {e}");
                return Err(e);
            }
        };
        tracing::debug!(
            file = %file.display(),
            waited_ms = format!("{:.1}", (compile - noticed).as_secs_f64() * 1e3),
            compiled_ms = format!("{:.1}", compile.elapsed().as_secs_f64() * 1e3),
            "policy compiled, checked and started"
        );
        let timeout = if rebalance {
            REBALANCE_TIMEOUT
        } else {
            ASK_TIMEOUT
        };
        let r = self.ask_within(timeout, |reply| Command::UsePolicy {
            policy: Box::new(policy),
            rebalance,
            graceful,
            noticed,
            reply,
        });
        if r.is_ok() {
            self.policy_file = file.to_path_buf();
            self.policy_hash = bytes_hash;
        }
        r
    }

    /// Read and load `file`, with the configured parameters when it is the
    /// configured policy (another policy would reject them).
    #[allow(clippy::type_complexity)]
    fn load(&self, file: &Path, configured: bool) -> Result<(Loaded, u64), (Option<u64>, String)> {
        let bytes = std::fs::read(file).map_err(|e| {
            (
                None,
                format!("{}: cannot read the policy: {e}", file.display()),
            )
        })?;
        let h = hash(&bytes);
        let params: &[(String, String)] = if configured {
            &self.config.policy.params
        } else {
            &[]
        };
        let name = file.file_stem().unwrap_or_default().to_string_lossy();
        let limits = self.config.policy.limits_for(&name);
        self.runtime
            .load_bytes(file, &bytes, params, limits)
            .map(|l| (l, h))
            .map_err(|e| (Some(h), e.to_string()))
    }

    /// A policy file changed on disk: reload it if it is the one serving
    /// and its bytes differ.
    pub fn policy_file_changed(&mut self, file: &Path, noticed: Instant) -> Option<Reply> {
        if file != self.policy_file {
            return None;
        }
        let bytes = std::fs::read(file).ok()?;
        if hash(&bytes) == self.policy_hash {
            return None;
        }
        let configured = file == self.config.policy.file();
        Some(self.swap(file, configured, (false, false), noticed))
    }

    /// The config file changed: validate it, then apply what differs. A
    /// broken file changes nothing.
    pub fn config_changed(&mut self, noticed: Instant) -> Result<Vec<String>, String> {
        let new = RunConfig::load(&self.config.file).map_err(|e| e.to_string())?;
        let present = afpacket::interface_names();
        let changes = diff::diff(&self.config, &new);
        // Interfaces only matter for gateways being added.
        for change in &changes {
            if let Change::AddGateway(g) = change {
                if !present.contains(&g.interface.value) {
                    new.check_interfaces(&present).map_err(|e| e.to_string())?;
                }
            }
        }
        let mut done = Vec::new();
        // What runs from here on: the old config plus every change that
        // took. The policy swap reads its file from the new config.
        let mut running = self.config.clone();
        running.file = new.file.clone();
        for change in changes {
            let r = match change.clone() {
                Change::Proxy { uplink, gateways } => {
                    let _ = self.worker.send(Command::SetProxy { uplink, gateways });
                    Ok("proxied prefixes updated".to_string())
                }
                Change::Health(h) => {
                    let _ = self.worker.send(Command::SetHealth(h));
                    Ok("health probing updated".into())
                }
                Change::Policy => {
                    let previous = std::mem::replace(&mut self.config.policy, new.policy.clone());
                    let r = self.swap(&new.policy.file(), true, (false, false), noticed);
                    if r.is_err() {
                        self.config.policy = previous;
                    }
                    r
                }
                Change::AddGateway(g) => self.add_gateway(&g),
                Change::RemoveGateway(name) => self.remove_gateway(&name),
                Change::Weight(name, w) => self.weight(&name, w),
                Change::Capacity(name, c) => self.capacity(&name, c),
                Change::Throughput(name, t) => self.throughput(&name, t),
                Change::Drain(name, d) => self.drain(&name, d, false),
                Change::NeedsRestart(field) => {
                    Err(format!("{field} changed: takes effect after a restart"))
                }
            };
            match r {
                Ok(m) => {
                    diff::record(&mut running, &change, &new);
                    done.push(m);
                }
                Err(e) => {
                    tracing::warn!("config reload: {e}");
                    done.push(format!("not applied: {e}"));
                }
            }
        }
        self.config = running;
        Ok(done)
    }

    /// With `graceful` (and `draining`), its working tunnels move off it
    /// gracefully too (`balancer::moves`).
    pub fn drain(&self, name: &str, draining: bool, graceful: bool) -> Reply {
        self.ask(|reply| Command::Drain {
            name: name.into(),
            draining,
            graceful,
            reply,
        })
    }

    /// `ctl role`: become `role` ("active" or "standby"), or say which.
    pub fn role(&self, role: Option<&str>) -> Reply {
        let role = match role {
            None => None,
            Some(r) => Some(
                crate::pair::Role::parse(r)
                    .ok_or_else(|| format!("role `{r}`: \"active\" or \"standby\""))?,
            ),
        };
        self.ask(|reply| Command::Role { role, reply })
    }

    pub fn weight(&self, name: &str, weight: u32) -> Reply {
        self.ask(|reply| Command::Weight {
            name: name.into(),
            weight,
            reply,
        })
    }

    /// A gateway's capacity (0: no limit), from a config reload.
    pub fn capacity(&self, name: &str, capacity: u64) -> Reply {
        self.ask(|reply| Command::Capacity {
            name: name.into(),
            capacity,
            reply,
        })
    }

    /// A gateway's throughput capacity, bytes/s (0: not given): from a
    /// config reload or `ctl gateway throughput`.
    pub fn throughput(&self, name: &str, throughput: u64) -> Reply {
        self.ask(|reply| Command::Throughput {
            name: name.into(),
            throughput,
            reply,
        })
    }

    /// `ctl gateway report NAME utilization=U`: what the segw says of its
    /// own load (its CPU, say).
    pub fn report(&self, name: &str, utilization: f64) -> Reply {
        if !(utilization.is_finite() && (0.0..=100.0).contains(&utilization)) {
            return Err(format!(
                "utilization {utilization} is not a load: 0.0 (idle) to 1.0 (full), more for overload"
            ));
        }
        self.ask(|reply| Command::Report {
            name: name.into(),
            utilization,
            reply,
        })
    }

    /// `ctl gateway add`.
    pub fn add_gateway_by_hand(
        &mut self,
        name: &str,
        interface: &str,
        (weight, capacity, throughput): (u32, u64, u64),
        mac: Option<&str>,
    ) -> Reply {
        let mac = match mac {
            None => None,
            Some(m) => Some(
                config::parse_mac(m)
                    .ok_or_else(|| format!("`{m}` is not a MAC like 02:00:5e:00:00:01"))?,
            ),
        };
        let g = GatewayConfig {
            name: name.into(),
            interface: config::Located {
                value: interface.into(),
                line: 0,
                column: 0,
                field: "interface".into(),
            },
            weight,
            capacity,
            throughput,
            mac,
            drain: false,
            steering: Default::default(),
        };
        self.add_gateway(&g)
    }

    /// Open the gateway's interface, start its reader, and add it.
    pub fn add_gateway(&mut self, g: &GatewayConfig) -> Reply {
        if self.ports.contains_key(&g.name) {
            return Err(format!("a gateway named `{}` already exists", g.name));
        }
        if let Some(other) = self
            .ports
            .values()
            .find(|p| p.interface == g.interface.value)
        {
            return Err(format!(
                "interface `{}` already serves port {}",
                g.interface.value, other.port
            ));
        }
        let port = free_port(self.ports.values().map(|p| p.port))
            .ok_or("every port number (1..=65535) serves a gateway")?;
        let opened = afpacket::open(&g.interface).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let reader = afpacket::spawn_reader(
            &g.interface,
            port,
            opened.rx,
            self.frames.clone(),
            stop.clone(),
        )
        .map_err(|e| format!("cannot start the reader of {}: {e}", g.interface.value))?;
        let handle = PortHandle::new(port, &g.interface, stop, reader);
        let spec = GatewaySpec {
            name: g.name.clone(),
            port,
            mac: g.mac,
            weight: g.weight,
            capacity: g.capacity,
            throughput: g.throughput,
            steering: g.steering,
        };
        let r = self.ask(|reply| Command::AddGateway {
            spec,
            draining: g.drain,
            interface: g.interface.value.clone(),
            port_mac: opened.mac,
            tx: Box::new(opened.tx),
            reply,
        });
        match &r {
            Ok(_) => {
                self.ports.insert(g.name.clone(), handle);
            }
            Err(_) => handle.close(),
        }
        r
    }

    pub fn remove_gateway(&mut self, name: &str) -> Reply {
        let r = self.ask(|reply| Command::RemoveGateway {
            name: name.into(),
            reply,
        });
        if r.is_ok() {
            if let Some(p) = self.ports.remove(name) {
                p.close();
            }
        }
        r
    }

    /// Stop every reader (the worker has stopped or is stopping).
    pub fn close_ports(&mut self) {
        for (_, p) in std::mem::take(&mut self.ports) {
            p.close();
        }
    }
}

/// The lowest port number no gateway uses (0 is the uplink's): a removed
/// gateway's number is taken again, so add/remove cycles never run out of
/// numbers or wrap onto the uplink.
fn free_port(used: impl IntoIterator<Item = PortId>) -> Option<PortId> {
    let used: std::collections::BTreeSet<PortId> = used.into_iter().collect();
    (1..=PortId::MAX).find(|p| !used.contains(p))
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::free_port;

    #[test]
    fn port_numbers_are_reused_never_the_uplinks_and_refused_when_all_are_taken() {
        assert_eq!(free_port([]), Some(1));
        assert_eq!(free_port([1, 2, 3]), Some(4));
        assert_eq!(free_port([1, 3]), Some(2), "a removed gateway's number");
        // 70,000 add/remove cycles of one gateway beside two others.
        let mut used = vec![1, 2];
        for _ in 0..70_000 {
            let port = free_port(used.iter().copied()).unwrap();
            assert_ne!(port, 0);
            used.push(port);
            used.pop();
        }
        assert_eq!(free_port(1..=u16::MAX), None);
    }
}
