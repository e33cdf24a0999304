//! `lab up`, `lab down`, `lab status`: the namespaces, links, charons and
//! the balancer of a lab, and a state file that says what is up.
//!
//! ```text
//!   PREFIX-iN (eth0) ── (iN) PREFIX-sw br0 (lb) ── (uplink) PREFIX-lb (pK) ── (eth0) PREFIX-sK
//! ```
//!
//! With a pair (`lab.balancers = 2`) both balancers sit on the same
//! segments, and each segw's `eth0` is a bridge with a port to each:
//!
//! ```text
//!                        ┌ (lb)  ── (uplink) PREFIX-lb  (pK) ── (lb)  ┐
//!   PREFIX-iN ── PREFIX-sw br0          (sync)│                      eth0 (bridge) PREFIX-sK
//!                        └ (lb2) ── (uplink) PREFIX-lb2 (pK) ── (lb2) ┘
//! ```
//!
//! keepalived in each balancer's namespace (`vrrp`) decides which one is
//! active; the state file keeps both balancers and their keepalived.
//!
//! Processes started by `up` outlive it (they run in their namespaces in
//! their own process groups); their pids go into the state file. `down`
//! ends every process in every namespace named `PREFIX-*` and deletes
//! those namespaces, so it also cleans up after an `up` that failed half
//! way or was interrupted.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::config::{LabConfig, SYNC_VRRP};
use super::netns::{self, Netns};
use super::strongswan as sw;
use super::vrrp;
use super::{Error, Result};
use crate::control::ctl::{request, Request};
use crate::control::status::Status;

/// Where `ip netns` keeps namespaces.
const NETNS_DIR: &str = "/run/netns";
const STATE: &str = "state.json";
/// A lab of one balancer saves its table for a warm restart (in the work
/// dir) ...
const BALANCER_STATE: &str = "balancer.state";
/// ... at SIGTERM, and every this many seconds.
const STATE_INTERVAL_S: u32 = 2;
/// The graceful-move hook, and the segws' directories by name it finds
/// their charons by.
const MOVE_HOOK: &str = "move-hook";
const SEGW_BY_NAME: &str = "segw-by-name";
/// The balancer's nice value in the lab (charons run at 0): under CFS a
/// thread at -15 gets ~30 times the share of one at 0 when both want the
/// core.
const BALANCER_NICE: i32 = -15;
/// Graceful moves per second in the lab: what two shared cores' charons
/// set up beside everything else.
const MOVES_PER_SECOND: u32 = 25;
/// Every balancer's interface on the initiators' bridge.
const UPLINK: &str = "uplink";
/// A pair's link between its two balancers, in both namespaces, and the
/// port replication listens on there.
const SYNC: &str = "sync";
const SYNC_PORT: u16 = 7400;

/// Balancer `k`'s address on a pair's sync link.
fn sync_address(config: &LabConfig, k: usize) -> Ipv4Addr {
    config
        .addresses
        .sync_prefix
        .host(k as u32 + 1)
        .expect("checked: room for the pair")
}

/// The pair's shared key: 128 random bits, as hex. It lives in the two
/// balancers' configurations in the private work dir.
fn pair_key() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io("read /dev/urandom".into()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `work/segw-by-name/NAME` → the segw's directory, for the move hook.
fn name_segw(work: &Path, name: &str, dir: &Path) -> Result<()> {
    let by_name = work.join(SEGW_BY_NAME);
    std::fs::create_dir_all(&by_name).map_err(|e| Error::Io {
        what: format!("creating {}", by_name.display()),
        source: e,
    })?;
    let link = by_name.join(name);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(dir, &link).map_err(|e| Error::Io {
        what: format!("linking {}", link.display()),
        source: e,
    })
}

/// An initiator as the state file records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Initiator {
    pub name: String,
    pub ns: String,
    /// Its address on the initiators' side: IPv4, or IPv6 for the first
    /// `lab.ipv6` initiators.
    pub outer: IpAddr,
    pub inner: Ipv4Addr,
    pub dir: PathBuf,
    pub pid: i32,
    /// Behind the lab's NAT.
    #[serde(default)]
    pub nat: bool,
    /// Its connection in its charon (which `per_charon` initiators share:
    /// `ns`, `dir` and `pid` are then the same for all of them).
    #[serde(default = "lab_conn")]
    pub conn: String,
}

fn lab_conn() -> String {
    sw::CONN.to_string()
}

impl Initiator {
    /// `swanctl` arguments that bring its tunnel up.
    pub fn initiate_args(&self) -> [&str; 7] {
        [
            "--initiate",
            "--ike",
            &self.conn,
            "--child",
            sw::CHILD,
            "--timeout",
            "30",
        ]
    }
}

/// The namespaces initiators live in: `per_charon` to one (one charon
/// each), NAT'd and direct ones never mixed. With one initiator per host
/// the host is named after it (`iN`), else `hN`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostPlan {
    pub name: String,
    /// Initiator numbers (1-based).
    pub members: std::ops::RangeInclusive<u32>,
    pub nat: bool,
}

pub fn host_plan(initiators: u32, nat: u32, per_charon: u32) -> Vec<HostPlan> {
    let first_natted = initiators - nat + 1;
    let mut hosts = Vec::new();
    for (from, to, natted) in [
        (1, first_natted - 1, false),
        (first_natted, initiators, true),
    ] {
        let mut n = from;
        while n <= to {
            let last = (n + per_charon - 1).min(to);
            let name = if per_charon == 1 {
                format!("i{n}")
            } else {
                format!("h{}", hosts.len() + 1)
            };
            hosts.push(HostPlan {
                name,
                members: n..=last,
                nat: natted,
            });
            n = last + 1;
        }
    }
    hosts
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segw {
    pub name: String,
    pub ns: String,
    pub weight: u32,
    /// Its capacity: the balancer's and its charon's `ikesa_limit` (0: none).
    #[serde(default)]
    pub capacity: u64,
    /// What it can carry, bytes/s both ways (0: not given): the balancer's.
    #[serde(default)]
    pub throughput: u64,
    /// Its port on the balancer.
    pub port: String,
    pub dir: PathBuf,
    pub pid: i32,
    /// In the balancer's set (false after `remove_segw`; its namespace
    /// stays until `lab down`).
    #[serde(default = "yes")]
    pub present: bool,
}

fn yes() -> bool {
    true
}

/// A `segwlb run` of the lab: the only one, or one of a pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Balancer {
    /// `lb`, and `lb2` for a pair's second: its namespace is
    /// `PREFIX-NAME`.
    pub name: String,
    pub ns: String,
    pub pid: i32,
    /// Its configuration, control socket and log, in the work dir.
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// A pair's: its keepalived.
    #[serde(default)]
    pub vrrp: Option<Vrrp>,
    /// A pair's balancer failed by [`State::fail_active_balancer`], until
    /// [`State::recover_balancer`].
    #[serde(default)]
    pub failed: Option<BalancerFailure>,
}

/// How a pair's active balancer fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BalancerFailure {
    /// `segwlb run` SIGKILLed, its table with it: its keepalived faults
    /// the node at its next check (within a second).
    Killed,
    /// Its uplink down: its keepalived faults the node at once.
    UplinkDown,
}

/// A pair's balancer's keepalived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vrrp {
    pub pid: i32,
    /// Its files (`WORK/NAME/`): configuration, scripts, log, transitions.
    pub dir: PathBuf,
}

impl Balancer {
    /// The lab's `k`-th balancer (from 0). The first has the names a lab
    /// of one always had (`lb.toml`, `segwlb.sock`, `balancer.log`); the
    /// second's carry a 2.
    fn new(prefix: &str, work: &Path, k: usize) -> Balancer {
        let n = if k == 0 {
            String::new()
        } else {
            (k + 1).to_string()
        };
        let name = format!("lb{n}");
        Balancer {
            ns: format!("{prefix}-{name}"),
            pid: 0,
            config: work.join(format!("{name}.toml")),
            socket: work.join(format!("segwlb{n}.sock")),
            log: work.join(format!("balancer{n}.log")),
            vrrp: None,
            failed: None,
            name,
        }
    }

    /// A pair's balancer's role as its keepalived announced it last.
    pub fn role(&self) -> Option<vrrp::Role> {
        let v = self.vrrp.as_ref()?;
        vrrp::transitions(&v.dir).last().map(|t| t.to)
    }

    /// Its status, listing `tunnels` tunnels at most.
    pub fn status(&self, tunnels: usize) -> Result<Status> {
        let r = request(&self.socket, &Request::Status { tunnels, top: 0 })
            .map_err(|e| step(&format!("asking balancer {}", self.name), e))?;
        r.status
            .ok_or_else(|| step(&format!("asking balancer {}", self.name), r.message))
    }
}

/// What `lab up` built: read by `run`, `status` and `down`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub prefix: String,
    pub work: PathBuf,
    pub vip: Ipv4Addr,
    pub service: Ipv4Addr,
    pub pings: u32,
    pub policy: String,
    pub namespaces: Vec<String>,
    pub initiators: Vec<Initiator>,
    pub segws: Vec<Segw>,
    /// One, or a pair.
    pub balancers: Vec<Balancer>,
    pub swanctl_conf: PathBuf,
    /// The NAT's outside address, when some initiators are behind it.
    #[serde(default)]
    pub nat_outside: Option<Ipv4Addr>,
    /// Routed from every segw towards the initiators.
    #[serde(default)]
    pub outer_prefix: String,
    /// The `swanctl.conf` every segw loads (also one added at runtime).
    #[serde(default)]
    pub segw_swanctl: PathBuf,
    /// A dual-stack lab: the VIP's IPv6 address, and the prefix of the
    /// initiators that come over IPv6.
    #[serde(default)]
    pub vip6: Option<Ipv6Addr>,
    #[serde(default)]
    pub outer6_prefix: Option<String>,
}

impl State {
    pub fn load(work: &Path) -> Result<State> {
        // A work dir others could write is not read (a planted state file
        // names the processes `down` stops); none at all: no lab is up.
        if fs::symlink_metadata(work).is_ok() {
            super::check_private(work)?;
        }
        let path = work.join(STATE);
        let text = fs::read_to_string(&path).map_err(|_| {
            Error::State(format!(
                "no lab is up ({} not found; `segwlb lab up` first)",
                path.display()
            ))
        })?;
        serde_json::from_str(&text).map_err(|e| Error::State(format!("{}: {e}", path.display())))
    }

    fn save(&self) -> Result<()> {
        let path = self.work.join(STATE);
        let text = serde_json::to_string_pretty(self).expect("state serialises");
        fs::write(&path, text).map_err(|source| Error::Io {
            what: format!("write {}", path.display()),
            source,
        })
    }

    /// Whether the lab runs an active/standby pair of balancers.
    pub fn pair(&self) -> bool {
        self.balancers.len() == 2
    }

    /// Which balancer serves (its index in `balancers`): the only one, or
    /// the pair's whose keepalived was announced master last. While one
    /// has failed and the other not yet taken over: none, an error.
    pub fn active(&self) -> Result<usize> {
        if !self.pair() {
            return Ok(0);
        }
        let roles: Vec<Option<vrrp::Role>> = self.balancers.iter().map(Balancer::role).collect();
        // A node whose keepalived has logged no transition yet (just
        // started, as a backup) is not the active one.
        let active = |r: &Option<vrrp::Role>| *r == Some(vrrp::Role::Active);
        match (active(&roles[0]), active(&roles[1])) {
            (true, false) => Ok(0),
            (false, true) => Ok(1),
            _ => Err(Error::State(format!(
                "not one balancer of the pair is active: {}",
                self.balancers
                    .iter()
                    .zip(&roles)
                    .map(|(b, r)| format!(
                        "{} {}",
                        b.name,
                        r.map_or("(no transition yet)".into(), |r| r.to_string())
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The balancer that serves ([`State::active`]).
    pub fn balancer(&self) -> Result<&Balancer> {
        Ok(&self.balancers[self.active()?])
    }

    /// The pair's active balancer fails `how`; which one it was. The other
    /// takes over once keepalived notices ([`State::wait_active`] waits for
    /// it). What a scenario's balancer failure plays.
    pub fn fail_active_balancer(&mut self, how: BalancerFailure) -> Result<usize> {
        if !self.pair() {
            return Err(Error::State(
                "a lab of one balancer has no standby to take over: `lab.balancers = 2`".into(),
            ));
        }
        let k = self.active()?;
        match how {
            BalancerFailure::Killed => self.kill_balancer(k)?,
            BalancerFailure::UplinkDown => self.set_uplink(k, false)?,
        }
        self.balancers[k].failed = Some(how);
        self.save()?;
        Ok(k)
    }

    /// A pair's balancer `k` failed by [`State::fail_active_balancer`]
    /// comes back: started again (`exe`), or its uplink up. Either way it
    /// is a standby (keepalived's `nopreempt`: no second failover) holding
    /// the active's table when this returns; how long that took. What a
    /// scenario's balancer recovery plays.
    pub fn recover_balancer(&mut self, k: usize, exe: &Path) -> Result<Duration> {
        let started = Instant::now();
        match self.balancers[k].failed {
            Some(BalancerFailure::Killed) => self.start_balancer(k, exe, Ready::Following)?,
            Some(BalancerFailure::UplinkDown) => {
                self.set_uplink(k, true)?;
                self.wait_until(k, Ready::Following)?;
            }
            None => {
                return Err(Error::State(format!(
                    "balancer {} has not failed",
                    self.balancers[k].name
                )))
            }
        }
        self.balancers[k].failed = None;
        self.save()?;
        Ok(started.elapsed())
    }

    /// Balancer `k` dies: SIGKILL, its table with it.
    fn kill_balancer(&mut self, k: usize) -> Result<()> {
        let pid = self.balancers[k].pid;
        kill(pid, libc::SIGKILL);
        let until = Instant::now() + Duration::from_secs(5);
        while alive(pid) {
            if Instant::now() > until {
                return Err(step("killing segwlb run", format!("pid {pid} lives on")));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Balancer `k`'s uplink goes down, or up again.
    fn set_uplink(&self, k: usize, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        Netns::adopt(&self.balancers[k].ns)?.ip(&["link", "set", UPLINK, state])?;
        Ok(())
    }

    /// Wait until a pair's balancer `k` is active and serves: after the
    /// other one failed, its takeover.
    pub fn wait_active(&self, k: usize) -> Result<()> {
        self.wait_until(k, Ready::Active)
    }

    /// The balancer's status, listing every tunnel.
    pub fn balancer_status(&self) -> Result<Status> {
        self.balancer()?.status(usize::MAX)
    }

    /// The balancer's status without its tunnel lists: its counters, cheap
    /// to ask for many times a second.
    pub fn balancer_counters(&self) -> Result<Status> {
        self.balancer()?.status(0)
    }

    /// `swanctl ARGS` against the charon whose files are in `dir`.
    pub fn swanctl(&self, dir: &Path, args: &[&str]) -> Result<String> {
        Ok(netns::run(sw::swanctl(&self.swanctl_conf, dir, args))?)
    }

    /// [`State::swanctl`], started and left running.
    pub fn swanctl_spawn(&self, dir: &Path, args: &[&str]) -> Result<netns::Running> {
        Ok(netns::spawn(sw::swanctl(&self.swanctl_conf, dir, args))?)
    }

    /// Every IKE_SA of the charon in `dir`.
    pub fn list_sas(&self, dir: &Path) -> Result<Vec<sw::IkeSa>> {
        let out = self.swanctl(dir, &["--list-sas", "--raw"])?;
        sw::parse_list_sas(&out).map_err(|e| step(&format!("parsing SAs of {}", dir.display()), e))
    }

    /// While `on`, the initiators' bridge drops what they send on UDP 4500
    /// other than ESP: IKE (DPD) and NAT keepalives. Either would make the
    /// balancer re-place its tunnel off a failed segw out of turn; with
    /// them quiet, the lab re-places in arrival order as the simulation
    /// does (see `drive`). DPD retransmits, so it only comes later.
    pub fn quiet_control(&self, on: bool) -> Result<()> {
        let ns = Netns::adopt(&format!("{}-sw", self.prefix))?;
        if on {
            let rules = self.work.join("quiet.nft");
            write(
                &rules,
                "table bridge segwlb_quiet {\n    chain forward {\n        \
                 type filter hook forward priority filter; policy accept;\n        \
                 udp dport 4500 udp length 9 drop\n        \
                 udp dport 4500 @th,64,32 0 drop\n    }\n}\n",
            )?;
            ns.exec(&["nft", "-f", &rules.to_string_lossy()])?;
        } else {
            ns.exec(&["nft", "delete", "table", "bridge", "segwlb_quiet"])?;
        }
        Ok(())
    }

    /// Charons: one per segw and one per initiator host.
    pub fn charons(&self) -> usize {
        self.segws.len() + self.initiators.chunk_by(|a, b| a.dir == b.dir).count()
    }

    /// Every initiator's IKE SAs, in initiator order: each charon asked
    /// once (a host's charon holds the SAs of all its initiators), an SA
    /// its initiator's by its connection. A charon that does not answer
    /// holds nothing.
    pub fn initiator_sas(&self) -> Vec<Vec<sw::IkeSa>> {
        self.initiator_sas_known()
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect()
    }

    /// [`initiator_sas`](Self::initiator_sas), `None` for the initiators of
    /// a charon that did not answer (a busy one can time out): unknown,
    /// not "no SA".
    pub fn initiator_sas_known(&self) -> Vec<Option<Vec<sw::IkeSa>>> {
        let mut all = Vec::with_capacity(self.initiators.len());
        for host in self.initiators.chunk_by(|a, b| a.dir == b.dir) {
            let sas = self.list_sas(&host[0].dir).ok();
            for i in host {
                all.push(
                    sas.as_ref()
                        .map(|sas| sas.iter().filter(|sa| sa.conn == i.conn).cloned().collect()),
                );
            }
        }
        all
    }

    /// Wait until the charon `pid` with its files in `dir` answers on its
    /// vici socket, then load its swanctl.conf.
    fn load_charon(&self, dir: &Path, pid: i32) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(10);
        while self.swanctl(dir, &["--stats"]).is_err() {
            if !alive(pid) || Instant::now() > until {
                let out = fs::read_to_string(dir.join("charon.out")).unwrap_or_default();
                return Err(step(
                    &format!("starting charon in {}", dir.display()),
                    format!("no answer on its vici socket; it said: {out}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let file = dir.join("swanctl.conf");
        self.swanctl(dir, &["--load-all", "--file", &file.to_string_lossy()])?;
        Ok(())
    }

    /// Ask the balancer `req`; its answer, or an error with its message.
    pub fn ctl(&self, req: &Request) -> Result<String> {
        let what = format!("segwlb ctl {req:?}");
        let r = request(&self.balancer()?.socket, req).map_err(|e| step(&what, e))?;
        if r.ok {
            Ok(r.message)
        } else {
            Err(step(&what, r.message))
        }
    }

    /// Ask every balancer `req`, a change of the gateway set: each of a
    /// pair has its own (its configuration's), and the standby's must be
    /// the active's when it takes over.
    fn ctl_every(&self, req: &Request) -> Result<()> {
        for b in &self.balancers {
            let what = format!("segwlb ctl {req:?} ({})", b.name);
            let r = request(&b.socket, req).map_err(|e| step(&what, e))?;
            if !r.ok {
                return Err(step(&what, r.message));
            }
        }
        Ok(())
    }

    fn segw_index(&self, name: &str) -> Result<usize> {
        self.segws
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| Error::State(format!("the lab has no segw {name:?}")))
    }

    /// The segw dies: its charon is killed (no goodbye to its peers) and
    /// its link goes down, so the balancer's health probes go unanswered.
    pub fn fail_segw(&mut self, name: &str) -> Result<()> {
        let s = &self.segws[self.segw_index(name)?];
        // SIGKILL, not SIGTERM: a charon told to stop says goodbye to its
        // peers (DELETE), and a failure is the absence of goodbyes.
        kill(s.pid, libc::SIGKILL);
        Netns::adopt(&s.ns)?.ip(&["link", "set", "eth0", "down"])?;
        Ok(())
    }

    /// The segw comes back empty: link up, a fresh charon with the segws'
    /// configuration and no SAs.
    pub fn recover_segw(&mut self, name: &str) -> Result<()> {
        let k = self.segw_index(name)?;
        let s = &self.segws[k];
        let ns = Netns::adopt(&s.ns)?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        // Link down flushed the routes back to the initiators.
        routes_to_initiators(&ns, &self.segw_side())?;
        let conf = self.segw_conf()?;
        let pid = start_charon(&s.dir, &s.ns, &conf, s.capacity)?;
        self.segws[k].pid = pid;
        self.save()?;
        self.load_charon(&self.segws[k].dir.clone(), pid)
    }

    /// Start balancer `k`'s `segwlb run` (`exe`) on its configuration, its
    /// log appended to, and wait until it is `ready`.
    fn start_balancer(&mut self, k: usize, exe: &Path, ready: Ready) -> Result<()> {
        let b = &self.balancers[k];
        let mut cmd = Netns::adopt(&b.ns)?.command(&exe.to_string_lossy());
        cmd.arg("run").arg("-c").arg(&b.config).env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "segwlb=info".into()),
        );
        let log = b.log.clone();
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(format!("open {}", log.display())))?;
        let child = spawn_detached(ahead_of_the_charons(cmd), out)?;
        self.balancers[k].pid = child.id() as i32;
        self.save()?;
        self.wait_until(k, ready)
    }

    /// Wait until balancer `k` is `ready` (at most a minute); an error
    /// with its log if it exits first.
    fn wait_until(&self, k: usize, ready: Ready) -> Result<()> {
        let b = &self.balancers[k];
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if b.status(0).is_ok_and(|s| ready.is(&s)) {
                return Ok(());
            }
            let running = alive(b.pid);
            if !running || Instant::now() > until {
                let log = fs::read_to_string(&b.log).unwrap_or_default();
                let why = if running {
                    "in a minute"
                } else {
                    "before it exited"
                };
                return Err(step(
                    &format!("starting segwlb run ({})", b.name),
                    format!("not {ready} {why}; its log:\n{log}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start a pair: both balancers as standbys; keepalived on the first,
    /// which elects it (alone, it hears no master); then on the second,
    /// which hears the first's adverts and stays a backup (and with
    /// `nopreempt`, would stay one even at a higher priority). So every
    /// `lab up` ends the same: the first active, the second following it.
    fn start_pair(&mut self, exe: &Path, nodes: [vrrp::Node; 2]) -> Result<()> {
        for k in 0..2 {
            self.start_balancer(k, exe, Ready::Answering)?;
        }
        for (k, (node, ready)) in nodes
            .into_iter()
            .zip([Ready::Active, Ready::Following])
            .enumerate()
        {
            node.write().map_err(io(format!(
                "write keepalived's files in {}",
                node.dir.display()
            )))?;
            let log = node.dir.join(vrrp::LOG);
            let out = fs::File::create(&log).map_err(io(format!("create {}", log.display())))?;
            let b = &self.balancers[k];
            let cmd = ahead_of_the_charons(node.command(&Netns::adopt(&b.ns)?));
            let pid = spawn_detached(cmd, out)?.id() as i32;
            self.balancers[k].vrrp = Some(Vrrp { pid, dir: node.dir });
            self.save()?;
            self.wait_until(k, ready)?;
        }
        Ok(())
    }

    /// Stop the balancer with `signal` (SIGTERM: it saves its table;
    /// SIGKILL: the last snapshot is what the next one finds), start it
    /// again (`exe`), and return the time from the signal until it serves
    /// again.
    pub fn restart_balancer(&mut self, exe: &Path, signal: i32) -> Result<Duration> {
        if self.pair() {
            return Err(Error::State(
                "a pair's balancers fail and come back one at a time \
                 (fail_active_balancer, recover_balancer): the other serves meanwhile"
                    .into(),
            ));
        }
        let started = Instant::now();
        let pid = self.balancer()?.pid;
        kill(pid, signal);
        while alive(pid) {
            if started.elapsed() > Duration::from_secs(10) {
                return Err(step(
                    "stopping segwlb run",
                    format!("pid {pid} ignored signal {signal}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.start_balancer(0, exe, Ready::Serving)?;
        Ok(started.elapsed())
    }

    fn segw_side(&self) -> SegwSide<'_> {
        SegwSide {
            vip: self.vip,
            service: self.service,
            outer_prefix: &self.outer_prefix,
            v6: self.vip6.zip(self.outer6_prefix.as_deref()),
        }
    }

    fn segw_conf(&self) -> Result<String> {
        fs::read_to_string(&self.segw_swanctl).map_err(io(format!(
            "read {} (a lab from an older segwlb? `lab down` and `up` again)",
            self.segw_swanctl.display()
        )))
    }

    /// A new segw joins: its namespace, a new balancer port (`pK`), a
    /// charon with the segws' configuration, then `ctl gateway add`.
    pub fn add_segw(
        &mut self,
        name: &str,
        weight: u32,
        capacity: u64,
        throughput: u64,
    ) -> Result<()> {
        if self.segws.iter().any(|s| s.name == name) {
            return Err(Error::State(format!("the lab has a segw {name:?} already")));
        }
        let k = self.segws.len() + 1;
        let ns = Netns::new(&format!("{}-s{k}", self.prefix))?;
        let port = format!("p{k}");
        let lb_ns = self
            .balancers
            .iter()
            .map(|b| Netns::adopt(&b.ns))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let ends: Vec<(&Netns, &str)> = lb_ns
            .iter()
            .zip(&self.balancers)
            .map(|(ns, b)| (ns, b.name.as_str()))
            .collect();
        link_segw(&ends, &port, &ns, &self.segw_side())?;
        let dir = self.work.join(format!("s{k}"));
        name_segw(&self.work, name, &dir)?;
        let pid = start_charon(&dir, ns.name(), &self.segw_conf()?, capacity)?;
        self.namespaces.push(ns.name().to_string());
        self.segws.push(Segw {
            name: name.to_string(),
            ns: ns.name().to_string(),
            weight,
            capacity,
            throughput,
            port: port.clone(),
            dir: dir.clone(),
            pid,
            present: true,
        });
        ns.keep();
        self.save()?;
        self.load_charon(&dir, pid)?;
        self.ctl_every(&Request::GatewayAdd {
            name: name.to_string(),
            interface: port,
            weight,
            capacity,
            throughput,
            mac: None,
        })?;
        Ok(())
    }

    /// The segw leaves the balancer's set (`ctl gateway remove`) and its
    /// charon stops; the namespace stays until `lab down`.
    pub fn remove_segw(&mut self, name: &str) -> Result<()> {
        let k = self.segw_index(name)?;
        self.ctl_every(&Request::GatewayRemove {
            name: name.to_string(),
        })?;
        stop(&[self.segws[k].pid], Duration::from_secs(1));
        self.segws[k].present = false;
        self.save()
    }
}

fn step(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::Step {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

fn find_in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// Everything the lab needs: `Err` names exactly what is missing and the
/// `apt-get` line that installs it.
pub fn prerequisites() -> Result<()> {
    let mut problems = Vec::new();
    if let Err(e) = netns::prerequisites() {
        problems.push(e);
    }
    let mut packages = Vec::new();
    let mut what = Vec::new();
    let mut need = |ok: bool, thing: &str, package: &'static str| {
        if !ok {
            what.push(format!("{thing} (package {package})"));
            if !packages.contains(&package) {
                packages.push(package);
            }
        }
    };
    need(
        Path::new(sw::CHARON).is_file(),
        sw::CHARON,
        "strongswan-charon",
    );
    need(find_in_path("swanctl"), "`swanctl`", "strongswan-swanctl");
    need(
        Path::new(sw::KERNEL_LIBIPSEC).is_file(),
        "the kernel-libipsec plugin",
        "libcharon-extra-plugins",
    );
    need(find_in_path("ping"), "`ping`", "iputils-ping");
    need(find_in_path("unshare"), "`unshare`", "util-linux");
    need(find_in_path("nft"), "`nft`", "nftables");
    if !what.is_empty() {
        problems.push(format!(
            "missing {}; install with: apt-get install -y {}",
            what.join(", "),
            packages.join(" ")
        ));
    }
    if !Path::new("/dev/net/tun").exists() {
        problems.push("no /dev/net/tun (kernel-libipsec needs TUN)".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Prerequisites(problems.join("; ")))
    }
}

/// Namespaces whose names start with `PREFIX-`.
pub fn lab_namespaces(prefix: &str) -> Vec<String> {
    let start = format!("{prefix}-");
    let mut names: Vec<String> = fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&start))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Is `pid` a live process (not a zombie)?
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        // "PID (COMM) STATE ...": the state follows the last ')'.
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X")
    })
}

fn kill(pid: i32, signal: i32) {
    if pid > 1 && pid != std::process::id() as i32 {
        // SAFETY: kill(2) on a pid we started or found in our namespace.
        unsafe { libc::kill(pid, signal) };
    }
}

/// SIGTERM `pids`, SIGKILL whatever is left after `grace`.
fn stop(pids: &[i32], grace: Duration) {
    for &p in pids {
        kill(p, libc::SIGTERM);
    }
    let until = Instant::now() + grace;
    while pids.iter().any(|&p| alive(p)) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &p in pids {
        if alive(p) {
            kill(p, libc::SIGKILL);
        }
    }
}

fn ns_pids(ns: &str) -> Vec<i32> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "pids", ns]);
    netns::run(cmd)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// What `down` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub processes: usize,
    pub namespaces: Vec<String>,
    pub work_dir: Option<PathBuf>,
}

/// Remove every process, namespace and file of the lab `config` names,
/// whether or not its `up` finished.
pub fn down(config: &LabConfig) -> Result<Removed> {
    let work = config.work_dir();
    let mut removed = Removed::default();
    let mut pids = Vec::new();
    if fs::symlink_metadata(&work).is_ok() {
        if let Err(e) = super::check_private(&work) {
            eprintln!("warning: {e}; its processes are found by namespace only");
        }
    }
    if let Ok(state) = State::load(&work) {
        for b in &state.balancers {
            pids.push(b.pid);
            pids.extend(b.vrrp.as_ref().map(|v| v.pid));
        }
        pids.extend(state.initiators.iter().map(|i| i.pid));
        pids.extend(state.segws.iter().map(|s| s.pid));
    }
    let namespaces = lab_namespaces(&config.lab.prefix);
    for ns in &namespaces {
        pids.extend(ns_pids(ns));
    }
    pids.retain(|&p| p > 1 && alive(p));
    pids.sort_unstable();
    pids.dedup();
    removed.processes = pids.len();
    stop(&pids, Duration::from_secs(2));
    for ns in &namespaces {
        // Anything that appeared meanwhile (a ping) goes too.
        let left: Vec<i32> = ns_pids(ns);
        stop(&left, Duration::from_millis(300));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "del", ns]);
        netns::run(cmd)?;
        removed.namespaces.push(ns.clone());
    }
    if work.exists() {
        fs::remove_dir_all(&work).map_err(io(format!("remove {}", work.display())))?;
        removed.work_dir = Some(work);
    }
    Ok(removed)
}

/// Timings of `up`, for the report.
#[derive(Debug, Clone, Copy)]
pub struct UpTimes {
    pub topology: Duration,
    pub charons: Duration,
    pub balancer: Duration,
}

/// Build the lab. On failure everything built so far is removed again.
pub fn up(config: &LabConfig, exe: &Path) -> Result<(State, UpTimes)> {
    prerequisites()?;
    let work = config.work_dir();
    let existing = lab_namespaces(&config.lab.prefix);
    if !existing.is_empty() || work.join(STATE).exists() {
        return Err(Error::State(format!(
            "a lab with prefix {:?} is up already ({} namespaces, work dir {}): `segwlb lab down` first",
            config.lab.prefix,
            existing.len(),
            work.display()
        )));
    }
    match build(config, exe, &work) {
        Ok(r) => Ok(r),
        Err(e) => {
            if let Err(d) = down(config) {
                eprintln!("warning: cleaning up after a failed `lab up`: {d}");
            }
            Err(e)
        }
    }
}

/// First port of the NAT's mappings: the j-th NAT'd initiator (from 0)
/// gets `NAT_PORTS + 2j` for IKE on 500 and the next for 4500.
pub const NAT_PORTS: u16 = 40_000;

/// The NAT's nftables rules: a fixed pair of outside ports per initiator
/// behind it (deterministic NAT, as carrier-grade NATs allocate port
/// blocks, RFC 7422), so a peer that initiates again after its tunnel
/// closed, or after DPD restarted it, comes from the endpoint it opened
/// from, as the simulation's peers do. (A masquerade picks a new random
/// port once the old mapping timed out: the balancer then sees a new
/// tunnel, which no replay can predict.) Anything else is masqueraded.
fn nat_rules(natted: u32, inside: super::config::Prefix, outside: Ipv4Addr) -> String {
    let mut rules = String::from(
        "table ip nat {\n    chain post {\n        type nat hook postrouting priority srcnat; policy accept;\n",
    );
    for j in 0..natted {
        let private = inside.host(j + 2).expect("checked");
        let port = NAT_PORTS + 2 * j as u16;
        for (sport, to) in [(500, port), (4500, port + 1)] {
            rules += &format!(
                "        oifname \"out\" ip saddr {private} udp sport {sport} snat to {outside}:{to}\n"
            );
        }
    }
    rules + "        oifname \"out\" masquerade\n    }\n}\n"
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(io(format!("write {}", path.display())))
}

/// `cmd` at [`BALANCER_NICE`]: ahead of the charons. At a few thousand
/// initiators a hundred charons share the cores, and a balancer that waits
/// its turn behind them holds every tunnel's packets (its worker paused
/// 808 ms at 5,000); a pair's keepalived that waits misses adverts and
/// takes over from a live master. Every thread and child inherits it.
fn ahead_of_the_charons(mut cmd: Command) -> Command {
    // SAFETY: setpriority is async-signal-safe; nothing else runs between
    // fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setpriority(libc::PRIO_PROCESS, 0, BALANCER_NICE) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// When a balancer is ready, by its status. A standby probes nothing, so
/// it knows no segw's health or MAC: each role has its own condition.
#[derive(Debug, Clone, Copy)]
enum Ready {
    /// Every segw healthy, its MAC known: a lab's only balancer.
    Serving,
    /// Its control socket answers: a pair's balancer before keepalived has
    /// told it its role.
    Answering,
    /// Active, and serving.
    Active,
    /// Standby, connected to the active and holding its whole table.
    Following,
}

impl Ready {
    fn is(self, s: &Status) -> bool {
        let serving = s.gateways.iter().all(|g| g.healthy && g.mac.is_some());
        let pair = s.pair.as_ref();
        match self {
            Ready::Serving => serving,
            Ready::Answering => true,
            Ready::Active => serving && pair.is_some_and(|p| p.role == "active"),
            Ready::Following => {
                pair.is_some_and(|p| p.role == "standby" && p.connected && p.in_sync)
            }
        }
    }
}

impl std::fmt::Display for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ready::Serving => "up with every segw healthy",
            Ready::Answering => "answering on its control socket",
            Ready::Active => "active with every segw healthy",
            Ready::Following => "a standby holding the active's table",
        })
    }
}

/// Spawn `cmd` detached from us (own process group, no stdin), its output
/// into `out`.
fn spawn_detached(mut cmd: Command, out: fs::File) -> Result<Child> {
    let err = out.try_clone().map_err(io("dup a log file".into()))?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    cmd.spawn().map_err(io(format!("start {cmd:?}")))
}

/// What a segw's namespace is given of the lab's addressing.
struct SegwSide<'a> {
    vip: Ipv4Addr,
    service: Ipv4Addr,
    outer_prefix: &'a str,
    /// A dual-stack lab: the VIP's IPv6 address and the prefix of the
    /// initiators over IPv6.
    v6: Option<(Ipv6Addr, &'a str)>,
}

/// The segws' route towards the initiators goes via the outer prefix's last
/// host, which the balancer answers ARP for like any initiator address: one
/// neighbour entry in a segw, where a route on the link took one per peer,
/// and the kernel's neighbour table (gc_thresh3 = 1024, global, not
/// settable in a namespace) overflowed past a thousand initiators. Over
/// IPv6 the same, via host [`NEXT_HOP6`](super::config::NEXT_HOP6) of the
/// IPv6 prefix (answered by proxy-NDP).
fn segws_next_hop(outer_prefix: &str) -> Result<Ipv4Addr> {
    super::config::Prefix::try_from(outer_prefix.to_string())
        .ok()
        .and_then(|p| p.last_host())
        .ok_or_else(|| Error::State(format!("outer prefix {outer_prefix:?} has no last host")))
}

fn segws_next_hop6(outer6_prefix: &str) -> Result<Ipv6Addr> {
    super::config::Prefix6::try_from(outer6_prefix.to_string())
        .ok()
        .and_then(|p| p.host(super::config::NEXT_HOP6))
        .ok_or_else(|| Error::State(format!("IPv6 prefix {outer6_prefix:?} has no next hop")))
}

/// A segw's routes to the initiators, via [`segws_next_hop`] (added, or
/// put back after its link went down).
fn routes_to_initiators(ns: &Netns, side: &SegwSide) -> Result<()> {
    let via = segws_next_hop(side.outer_prefix)?.to_string();
    ns.ip(&[
        "route",
        "replace",
        side.outer_prefix,
        "via",
        &via,
        "dev",
        "eth0",
        "onlink",
    ])?;
    if let Some((_, outer6)) = side.v6 {
        let via = segws_next_hop6(outer6)?.to_string();
        ns.ip(&[
            "-6", "route", "replace", outer6, "via", &via, "dev", "eth0", "onlink",
        ])?;
    }
    Ok(())
}

/// A segw's namespace `ns` linked to port `port` of every balancer
/// (namespace, name): the VIP (both, in a dual-stack lab) on its link,
/// routes back to the initiators, the service address on its `lo`.
///
/// Its link is `eth0` either way. With one balancer it is a veth to the
/// balancer's port; with a pair, a bridge named `eth0` whose ports are
/// veths to both balancers' ports (named after the balancers): the
/// segment the two share, as a switch between them and the segw would be.
fn link_segw(balancers: &[(&Netns, &str)], port: &str, ns: &Netns, side: &SegwSide) -> Result<()> {
    match balancers {
        [(lb, _)] => netns::veth(lb, port, ns, "eth0")?,
        pair => {
            netns::bridge(ns, "eth0")?;
            for (lb, name) in pair {
                netns::veth(lb, port, ns, name)?;
                ns.ip(&["link", "set", name, "master", "eth0"])?;
            }
        }
    }
    ns.ip(&["addr", "add", &format!("{}/32", side.vip), "dev", "eth0"])?;
    if let Some((vip6, _)) = side.v6 {
        netns::enable_ipv6(ns, "eth0")?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{vip6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
    }
    routes_to_initiators(ns, side)?;
    ns.ip(&["addr", "add", &format!("{}/32", side.service), "dev", "lo"])?;
    Ok(())
}

/// Start a charon in namespace `ns` with its files in `dir` and `conf` as
/// its swanctl.conf, refusing IKE SAs past `ikesa_limit` (0: no limit);
/// its pid. [`State::load_charon`] waits for it.
fn start_charon(dir: &Path, ns: &str, conf: &str, ikesa_limit: u64) -> Result<i32> {
    for sub in ["", "x509", "x509ca", "private", "rsa", "ecdsa", "pkcs8"] {
        let d = dir.join(sub);
        fs::create_dir_all(&d).map_err(io(format!("create {}", d.display())))?;
    }
    let ss_conf = dir.join("strongswan.conf");
    write(
        &ss_conf,
        &sw::strongswan_conf(dir, &sw::segw_limit(ikesa_limit)),
    )?;
    write(&dir.join("swanctl.conf"), conf)?;
    let log = dir.join("charon.out");
    let out = fs::File::create(&log).map_err(io(format!("create {}", log.display())))?;
    let child = spawn_detached(sw::charon_command(ns, &ss_conf), out)?;
    Ok(child.id() as i32)
}

fn build(config: &LabConfig, exe: &Path, work: &Path) -> Result<(State, UpTimes)> {
    let t0 = Instant::now();
    let prefix = &config.lab.prefix;
    let a = &config.addresses;
    super::private_work_dir(work)?;
    let swanctl_conf = work.join("swanctl-strongswan.conf");
    write(&swanctl_conf, sw::SWANCTL_CONF)?;

    // Namespaces: kept (forgotten) once everything is up; on an error
    // their guards delete them, and `up` runs `down` for the rest.
    let sw_ns = Netns::new(&format!("{prefix}-sw"))?;
    let balancers: Vec<Balancer> = (0..config.lab.balancers as usize)
        .map(|k| Balancer::new(prefix, work, k))
        .collect();
    let lb_ns = balancers
        .iter()
        .map(|b| Netns::new(&b.ns))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let segw_ns = (1..=config.segw.len())
        .map(|k| Netns::new(&format!("{prefix}-s{k}")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let plan = host_plan(config.lab.initiators, config.lab.nat, config.lab.packing());
    let ini_ns = plan
        .iter()
        .map(|h| Netns::new(&format!("{prefix}-{}", h.name)))
        .collect::<std::result::Result<Vec<_>, _>>()?;

    // The initiators' side: one bridge, every balancer's uplink on it.
    netns::bridge(&sw_ns, "br0")?;
    for (b, ns) in balancers.iter().zip(&lb_ns) {
        netns::veth(ns, UPLINK, &sw_ns, &b.name)?;
        sw_ns.ip(&["link", "set", &b.name, "master", "br0"])?;
    }
    // A pair's sync link: replication and VRRP.
    if let [lb, lb2] = lb_ns.as_slice() {
        netns::veth(lb, SYNC, lb2, SYNC)?;
        for (k, ns) in [lb, lb2].into_iter().enumerate() {
            let address = sync_address(config, k);
            let with_len = format!("{address}/{}", a.sync_prefix.len);
            ns.ip(&["addr", "add", &with_len, "dev", SYNC])?;
        }
    }
    // The NAT: its own bridge for the initiators behind it, masquerade
    // (with UDP source ports rewritten) out to the initiators' bridge.
    let first_natted = config.lab.initiators - config.lab.nat + 1;
    let nat = if config.lab.nat > 0 {
        let ns = Netns::new(&format!("{prefix}-nat"))?;
        ns.ip(&["link", "add", "br0", "type", "bridge", "forward_delay", "0"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        let inside = a.nat_prefix.host(1).expect("checked");
        ns.ip(&[
            "addr",
            "add",
            &format!("{inside}/{}", a.nat_prefix.len),
            "dev",
            "br0",
        ])?;
        netns::veth(&ns, "out", &sw_ns, "nat")?;
        sw_ns.ip(&["link", "set", "nat", "master", "br0"])?;
        let outside = a
            .outer_prefix
            .host(config.lab.initiators + 1)
            .expect("checked");
        ns.ip(&[
            "addr",
            "add",
            &format!("{outside}/{}", a.outer_prefix.len),
            "dev",
            "out",
        ])?;
        ns.ip(&["route", "add", &a.vip_prefix.to_string(), "dev", "out"])?;
        netns::sysctl(&ns, "net/ipv4/ip_forward", "1")?;
        let rules = work.join("nat.nft");
        write(&rules, &nat_rules(config.lab.nat, a.nat_prefix, outside))?;
        ns.exec(&["nft", "-f", &rules.to_string_lossy()])?;
        Some((ns, inside, outside))
    } else {
        None
    };
    let mut initiators = Vec::new();
    for (host, ns) in plan.iter().zip(&ini_ns) {
        let port = &host.name;
        match &nat {
            Some((nat_ns, _, _)) if host.nat => {
                netns::veth(ns, "eth0", nat_ns, port)?;
                nat_ns.ip(&["link", "set", port, "master", "br0"])?;
            }
            _ => {
                netns::veth(ns, "eth0", &sw_ns, port)?;
                sw_ns.ip(&["link", "set", port, "master", "br0"])?;
            }
        }
        if host.members.clone().count() > 1 {
            // Another initiator's address going (MOBIKE) must not take the
            // rest of the host's with it when it was the primary.
            netns::sysctl(ns, "net/ipv4/conf/all/promote_secondaries", "1")?;
        }
        let over_ipv6 = |n: u32| n <= config.lab.ipv6;
        let some_v6 = host.members.clone().any(over_ipv6);
        if some_v6 {
            netns::enable_ipv6(ns, "eth0")?;
        }
        for n in host.members.clone() {
            let inner = a.inner_prefix.host(n).expect("checked");
            ns.ip(&["addr", "add", &format!("{inner}/32"), "dev", "lo"])?;
            let (outer, len): (IpAddr, u8) = if host.nat {
                let j = n - first_natted + 1;
                (
                    a.nat_prefix.host(j + 1).expect("checked").into(),
                    a.nat_prefix.len,
                )
            } else if over_ipv6(n) {
                (
                    a.outer6_prefix.host(n).expect("checked").into(),
                    a.outer6_prefix.len,
                )
            } else {
                (
                    a.outer_prefix.host(n).expect("checked").into(),
                    a.outer_prefix.len,
                )
            };
            // Each initiator's own outer address; the host's first is its
            // primary, the rest secondaries (charon binds each connection
            // to its own with local_addrs).
            let mut add = vec!["addr", "add"];
            let with_len = format!("{outer}/{len}");
            add.extend([with_len.as_str(), "dev", "eth0"]);
            if outer.is_ipv6() {
                add.push("nodad");
            }
            ns.ip(&add)?;
            initiators.push(Initiator {
                name: format!("i{n}"),
                ns: ns.name().to_string(),
                outer,
                inner,
                dir: work.join(&host.name),
                pid: 0,
                nat: host.nat,
                conn: format!("i{n}"),
            });
        }
        match &nat {
            Some((_, inside, _)) if host.nat => {
                ns.ip(&["route", "add", "default", "via", &inside.to_string()])?;
            }
            _ => {
                ns.ip(&["route", "add", &a.vip_prefix.to_string(), "dev", "eth0"])?;
                if some_v6 {
                    let vip6 = format!("{}/128", a.vip6);
                    ns.ip(&["-6", "route", "add", &vip6, "dev", "eth0"])?;
                }
            }
        }
    }
    // The segws: the same VIP everywhere, the service address on lo.
    let dual = config.lab.ipv6 > 0;
    let outer_prefix = a.outer_prefix.to_string();
    let outer6_prefix = a.outer6_prefix.to_string();
    let side = SegwSide {
        vip: a.vip,
        service: a.service,
        outer_prefix: &outer_prefix,
        v6: dual.then_some((a.vip6, outer6_prefix.as_str())),
    };
    let balancer_ends: Vec<(&Netns, &str)> = lb_ns
        .iter()
        .zip(&balancers)
        .map(|(ns, b)| (ns, b.name.as_str()))
        .collect();
    let mut segws = Vec::new();
    for (k, (ns, spec)) in segw_ns.iter().zip(&config.segw).enumerate() {
        let port = format!("p{}", k + 1);
        link_segw(&balancer_ends, &port, ns, &side)?;
        name_segw(work, &spec.name, &work.join(format!("s{}", k + 1)))?;
        segws.push(Segw {
            name: spec.name.clone(),
            ns: ns.name().to_string(),
            weight: spec.weight,
            capacity: spec.capacity,
            throughput: spec.throughput_bytes(),
            port,
            dir: work.join(format!("s{}", k + 1)),
            pid: 0,
            present: true,
        });
    }
    let topology = t0.elapsed();

    // Charons: all started at once, then each waited for.
    let t1 = Instant::now();
    let segw_conf = sw::segw_swanctl(
        a.vip,
        dual.then_some(a.vip6),
        &a.service_prefix.to_string(),
        &a.inner_prefix.to_string(),
        config.lab.dpd_delay_s,
    );
    let segw_swanctl = work.join("segw-swanctl.conf");
    write(&segw_swanctl, &segw_conf)?;
    // dir, ns, swanctl.conf, ikesa_limit
    let mut charons: Vec<(PathBuf, String, String, u64)> = Vec::new();
    for s in &segws {
        charons.push((s.dir.clone(), s.ns.clone(), segw_conf.clone(), s.capacity));
    }
    // One charon per host, one connection per initiator in it.
    for host in initiators.chunk_by(|a, b| a.dir == b.dir) {
        let conf = sw::initiator_swanctl(
            host.iter().map(|i| (i.conn.as_str(), i.outer, i.inner)),
            (a.vip, a.vip6),
            &a.service_prefix.to_string(),
            config.lab.dpd_delay_s,
        );
        charons.push((host[0].dir.clone(), host[0].ns.clone(), conf, 0));
    }
    let mut pids = Vec::new();
    for (dir, ns, conf, limit) in &charons {
        pids.push(start_charon(dir, ns, conf, *limit)?);
    }
    for (s, &pid) in segws.iter_mut().zip(&pids) {
        s.pid = pid;
    }
    let mut host_pids = pids[segws.len()..].iter();
    for host in initiators.chunk_by_mut(|a, b| a.dir == b.dir) {
        let pid = *host_pids.next().expect("a charon per host");
        for i in host {
            i.pid = pid;
        }
    }
    let mut state = State {
        prefix: prefix.clone(),
        work: work.to_path_buf(),
        vip: a.vip,
        service: a.service,
        pings: config.lab.pings,
        policy: config.balancer.policy.clone(),
        namespaces: std::iter::once(&sw_ns)
            .chain(&lb_ns)
            .chain(nat.as_ref().map(|n| &n.0))
            .chain(&segw_ns)
            .chain(&ini_ns)
            .map(|n| n.name().to_string())
            .collect(),
        initiators,
        segws,
        balancers,
        swanctl_conf,
        nat_outside: nat.as_ref().map(|n| n.2),
        outer_prefix: a.outer_prefix.to_string(),
        segw_swanctl,
        vip6: dual.then_some(a.vip6),
        outer6_prefix: dual.then(|| a.outer6_prefix.to_string()),
    };
    state.save()?;
    for ((dir, _, _, _), &pid) in charons.iter().zip(&pids) {
        state.load_charon(dir, pid)?;
    }
    let charons_took = t1.elapsed();

    // The balancer.
    let t2 = Instant::now();
    // A dual-stack lab's balancer serves both VIPs.
    let (vips, proxy_uplink, proxy_gateways) = if dual {
        (
            format!("[\"{}\", \"{}\"]", a.vip, a.vip6),
            format!("\"{}\", \"{}/128\"", a.vip_prefix, a.vip6),
            format!("\"{}\", \"{}\"", a.outer_prefix, a.outer6_prefix),
        )
    } else {
        (
            format!("\"{}\"", a.vip),
            format!("\"{}\"", a.vip_prefix),
            format!("\"{}\"", a.outer_prefix),
        )
    };
    // A pair's: the segws' next hops also as prefixes of their own. A
    // balancer taking over announces every address of a small proxied
    // prefix on the segw ports: the segws' one neighbour entry towards the
    // initiators then points at it at once, where the outer prefix alone
    // (too large to announce) left it on the dead balancer's MAC until
    // the entry went stale and failed (tens of seconds).
    let proxy_gateways = if config.lab.pair() {
        let mut next_hops = format!(", \"{}/32\"", segws_next_hop(&a.outer_prefix.to_string())?);
        if dual {
            next_hops += &format!(
                ", \"{}/128\"",
                segws_next_hop6(&a.outer6_prefix.to_string())?
            );
        }
        proxy_gateways + &next_hops
    } else {
        proxy_gateways
    };
    let mut text = format!(
        "[policy]\nname = \"{}\"\ndir = \"{}\"\n\
         [health]\ninterval_ms = {}\ndown_after = {}\nup_after = 1\n",
        config.balancer.policy,
        config.balancer.policy_dir.display(),
        config.balancer.health_interval_ms,
        config.balancer.health_down_after,
    );
    if let Some(mode) = config.balancer.fast_path {
        text += &format!("[dataplane]\nfast_path = \"{}\"\n", mode.name());
    }
    // Graceful moves ask the old segw's charon to redirect the peer.
    let hook = work.join(MOVE_HOOK);
    write(
        &hook,
        &sw::move_hook(&state.swanctl_conf, &work.join(SEGW_BY_NAME)),
    )?;
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).map_err(
        |e| Error::Io {
            what: format!("making {} executable", hook.display()),
            source: e,
        },
    )?;
    text += &format!(
        "[moves]\nper_second = {MOVES_PER_SECOND}\nhook = [\"{}\", \"{{from}}\", \"{{ike_spi}}\", \"{{vip}}\"]\n",
        hook.display()
    );
    let mut gateways = String::new();
    for s in &state.segws {
        gateways += &format!(
            "\n[[gateway]]\nname = \"{}\"\ninterface = \"{}\"\nweight = {}\ncapacity = {}\n",
            s.name, s.port, s.weight, s.capacity
        );
        if s.throughput > 0 {
            gateways += &format!("throughput = \"{} B/s\"\n", s.throughput);
        }
    }
    let key = config.lab.pair().then(pair_key).transpose()?;
    for (k, b) in state.balancers.iter().enumerate() {
        let mut head = format!(
            "# Written by `segwlb lab up`.\n[balancer]\nuplink = \"{UPLINK}\"\nvip = {vips}\n\
             proxy_uplink = [{proxy_uplink}]\nproxy_gateways = [{proxy_gateways}]\n\
             control_socket = \"{}\"\n",
            b.socket.display(),
        );
        if config.lab.pair() {
            // Both start as standbys; keepalived makes one active. A node
            // started again gets the table from the active, not a file.
            head += &text;
            head += &format!(
                "[pair]\nrole = \"standby\"\nlisten = \"{}:{SYNC_PORT}\"\npeer = \"{}:{SYNC_PORT}\"\nkey = \"{}\"\n",
                sync_address(config, k),
                sync_address(config, 1 - k),
                key.as_deref().unwrap_or_default(),
            );
        } else {
            // The table is saved at SIGTERM and every few seconds, and read
            // at start: a restarted balancer moves no tunnel
            // (`State::restart_balancer`).
            head += &format!(
                "state_file = \"{}\"\nstate_interval_s = {STATE_INTERVAL_S}\n{text}",
                work.join(BALANCER_STATE).display()
            );
        }
        write(&b.config, &(head + &gateways))?;
    }
    if config.lab.pair() {
        let nodes = [0, 1].map(|k| {
            let b = &state.balancers[k];
            let ctl = format!(
                "\"{}\" ctl --socket \"{}\"",
                exe.display(),
                b.socket.display()
            );
            vrrp::Node {
                dir: work.join(&b.name),
                sync: SYNC.into(),
                address: (
                    a.sync_prefix.host(SYNC_VRRP).expect("checked"),
                    a.sync_prefix.len,
                ),
                track: UPLINK.into(),
                // The first is elected at `up`.
                priority: [150, 100][k],
                check: format!("{ctl} status"),
                tell: format!("{ctl} role"),
            }
        });
        state.start_pair(exe, nodes)?;
    } else {
        state.start_balancer(0, exe, Ready::Serving)?;
    }
    let balancer = t2.elapsed();
    // Up: the namespaces stay (`down` removes them).
    for ns in std::iter::once(sw_ns)
        .chain(lb_ns)
        .chain(nat.map(|n| n.0))
        .chain(segw_ns)
        .chain(ini_ns)
    {
        ns.keep();
    }
    Ok((
        state,
        UpTimes {
            topology,
            charons: charons_took,
            balancer,
        },
    ))
}

/// `lab status`: what is up, as text.
pub fn status(config: &LabConfig) -> Result<String> {
    use std::fmt::Write;
    let work = config.work_dir();
    let namespaces = lab_namespaces(&config.lab.prefix);
    let mut out = String::new();
    let state = match State::load(&work) {
        Ok(s) => s,
        Err(_) if namespaces.is_empty() => {
            return Ok(format!(
                "no lab with prefix {:?} is up\n",
                config.lab.prefix
            ));
        }
        Err(_) => {
            return Ok(format!(
                "a broken lab: namespaces {} but no state file; `segwlb lab down` removes them\n",
                namespaces.join(" ")
            ));
        }
    };
    let up = |pid: i32| if alive(pid) { "running" } else { "NOT RUNNING" };
    let _ = writeln!(
        out,
        "lab {:?}: {} namespaces, work dir {}",
        state.prefix,
        namespaces.len(),
        state.work.display()
    );
    for b in &state.balancers {
        let mut line = format!("balancer  {:<12} pid {:<8} {:<11}", b.ns, b.pid, up(b.pid));
        // A pair's: what keepalived announced, and the role the balancer
        // says it has.
        if let Some(v) = &b.vrrp {
            let said = b
                .role()
                .map_or("no transition yet".into(), |r| r.to_string());
            let own = match b.status(0).map(|s| s.pair) {
                Ok(Some(p)) => format!(
                    "{}, {}",
                    p.role,
                    if p.connected {
                        "connected"
                    } else {
                        "not connected"
                    }
                ),
                Ok(None) => "not one of a pair".into(),
                Err(e) => format!("no answer ({e})"),
            };
            line += &format!(
                " keepalived pid {} {}: {said}; segwlb: {own}",
                v.pid,
                up(v.pid)
            );
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    for s in &state.segws {
        let sas = state
            .list_sas(&s.dir)
            .map(|v| format!("{} IKE_SAs", v.len()))
            .unwrap_or_else(|e| format!("(no answer: {e})"));
        let _ = writeln!(
            out,
            "{:<9} {:<12} pid {:<8} {:<11} {sas}",
            s.name,
            s.ns,
            s.pid,
            up(s.pid)
        );
    }
    let running = state.initiators.iter().filter(|i| alive(i.pid)).count();
    let _ = writeln!(
        out,
        "initiators: {} of {} charons running",
        running,
        state.initiators.len()
    );
    match state.balancer_status() {
        Ok(s) => {
            let _ = writeln!(out, "\n{}", s.render().trim_end());
        }
        Err(e) => {
            let _ = writeln!(out, "balancer: {e}");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_pack_initiators_and_never_mix_nat_and_direct() {
        // One each: named after the initiator.
        let own = host_plan(3, 1, 1);
        let names: Vec<&str> = own.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["i1", "i2", "i3"]);
        assert_eq!(
            own.iter().map(|h| h.nat).collect::<Vec<_>>(),
            [false, false, true]
        );
        // 300 with 60 NAT'd, 50 to a host: 4 × 50 + 40 direct, 50 + 10 NAT'd.
        let packed = host_plan(300, 60, 50);
        let sizes: Vec<(usize, bool)> = packed
            .iter()
            .map(|h| (h.members.clone().count(), h.nat))
            .collect();
        assert_eq!(
            sizes,
            [
                (50, false),
                (50, false),
                (50, false),
                (50, false),
                (40, false),
                (50, true),
                (10, true)
            ]
        );
        assert_eq!(packed[5].members, 241..=290);
        assert_eq!(packed[6].name, "h7");
        // Nobody NAT'd, nobody direct.
        assert_eq!(host_plan(10, 0, 4).len(), 3);
        assert!(host_plan(10, 10, 4).iter().all(|h| h.nat));
    }

    #[test]
    fn the_nat_maps_each_initiator_to_its_own_pair_of_ports() {
        let inside = super::super::config::Prefix::try_from("100.64.0.0/16".to_string()).unwrap();
        let rules = nat_rules(2, inside, Ipv4Addr::new(10, 1, 1, 61));
        for line in [
            "ip saddr 100.64.0.2 udp sport 500 snat to 10.1.1.61:40000",
            "ip saddr 100.64.0.2 udp sport 4500 snat to 10.1.1.61:40001",
            "ip saddr 100.64.0.3 udp sport 500 snat to 10.1.1.61:40002",
            "ip saddr 100.64.0.3 udp sport 4500 snat to 10.1.1.61:40003",
        ] {
            assert!(rules.contains(line), "{line}\n{rules}");
        }
        assert!(
            rules.trim_end().ends_with("masquerade\n    }\n}"),
            "{rules}"
        );
    }
}
