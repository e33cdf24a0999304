//! keepalived for a pair of balancers: its configuration, the scripts it
//! runs, its command line, and the log of its transitions.
//!
//! keepalived's VRRP (version 3, RFC 5798) is the election; segwlb only
//! follows it. Each balancer's namespace runs a keepalived of its own,
//! advertising on the sync link; a transition runs this module's notify
//! script, which tells the node's balancer its role (`segwlb ctl role
//! active|standby` in the lab). Nothing here decides a role.
//!
//! What makes a node fail over:
//! - its balancer stops answering (the check script, every second: the
//!   shortest interval keepalived 2.2 takes), and the node goes to FAULT;
//! - its uplink goes down (`track_interface`, from netlink: at once);
//! - its keepalived stops advertising (the node died): the peer takes over
//!   after 3 adverts and a skew ([`ADVERT_INT`]).
//!
//! A node leaving MASTER for FAULT advertises priority 0, so its peer takes
//! over after the skew alone. `nopreempt`: a node that comes back stays
//! standby however high its priority; a failover happens once, not twice.

use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use super::netns::Netns;

/// Where Debian installs keepalived.
pub const KEEPALIVED: &str = "/usr/sbin/keepalived";

/// Between two adverts of the master. A backup declares the master dead
/// after 3 of them plus a skew of (256 − priority)/256 of one: 0.68 s at
/// priority 150, 0.72 s at 100. Measured on 2 shared cores with 300
/// tunnels' charons busy beside it (tests/lab_pair.rs): no false takeover
/// at 0.2 s, keepalived running at the balancer's nice value.
pub const ADVERT_INT: Duration = Duration::from_millis(200);

/// The pair's VRRP instance: the same on both nodes, alone on its sync link.
const INSTANCE: &str = "segwlb";
const VIRTUAL_ROUTER_ID: u8 = 51;

/// One node's keepalived.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its files: `keepalived.conf`, the scripts, the pid files, its log
    /// and the log of its transitions.
    pub dir: PathBuf,
    /// The sync link: adverts go there, and keepalived's address (ours
    /// only while master) sits there.
    pub sync: String,
    pub address: (Ipv4Addr, u8),
    /// The interface whose loss faults the node: the balancer's uplink.
    pub track: String,
    /// The higher of two backups starting together becomes master.
    pub priority: u8,
    /// A shell command that exits 0 while the node's balancer serves.
    pub check: String,
    /// A shell command the role (`active` or `standby`) is appended to.
    pub tell: String,
}

/// A node's role as keepalived announced it, with when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// MASTER.
    Active,
    /// BACKUP.
    Standby,
    /// FAULT: its check failed or its uplink is down (told `standby`).
    Fault,
}

impl Role {
    fn parse(word: &str) -> Option<Role> {
        match word {
            "active" => Some(Role::Active),
            "standby" => Some(Role::Standby),
            "fault" => Some(Role::Fault),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Active => "active",
            Role::Standby => "standby",
            Role::Fault => "fault",
        })
    }
}

/// A line of the transitions log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub at: SystemTime,
    pub to: Role,
}

const CONF: &str = "keepalived.conf";
const CHECK: &str = "check";
const NOTIFY: &str = "notify";
const TRANSITIONS: &str = "transitions";
/// What `tell` answered, a line per transition.
pub const TOLD: &str = "told";
pub const LOG: &str = "keepalived.log";

impl Node {
    /// `keepalived.conf`.
    pub fn conf(&self) -> String {
        let dir = self.dir.display();
        let (address, len) = self.address;
        let advert = ADVERT_INT.as_secs_f64();
        format!(
            "# Written by `segwlb lab up`: this balancer's keepalived.
global_defs {{
    # Scripts run as root, as the balancer they ask and tell does. (No
    # enable_script_security: it refuses a segwlb built in a directory its
    # user owns, and root runs that binary anyway.)
    script_user root
}}
vrrp_script balancer {{
    script \"{dir}/{CHECK}\"
    # keepalived's shortest interval, whole seconds.
    interval 1
    timeout 2
    fall 1
    rise 1
}}
vrrp_instance {INSTANCE} {{
    version 3
    # Both nodes start as backups; nopreempt keeps a node that comes back
    # a backup, whatever its priority.
    state BACKUP
    nopreempt
    interface {sync}
    virtual_router_id {VIRTUAL_ROUTER_ID}
    priority {priority}
    advert_int {advert}
    # VRRP needs an address to own: this one only marks the master on the
    # sync link.
    virtual_ipaddress {{
        {address}/{len} dev {sync}
    }}
    track_interface {{
        {track}
    }}
    track_script {{
        balancer
    }}
    notify_master \"{dir}/{NOTIFY} active\"
    notify_backup \"{dir}/{NOTIFY} standby\"
    notify_fault \"{dir}/{NOTIFY} fault\"
}}
",
            sync = self.sync,
            priority = self.priority,
            track = self.track,
        )
    }

    /// The script keepalived runs on a transition, with `active`,
    /// `standby` or `fault`: it logs the transition, then tells the
    /// balancer.
    pub fn notify_script(&self) -> String {
        let dir = self.dir.display();
        format!(
            r#"#!/bin/sh
# Written by `segwlb lab up`: keepalived runs this on each transition of the
# pair's VRRP instance, with active (MASTER), standby (BACKUP) or fault.
echo "$(date +%s.%N) $1" >> "{dir}/{TRANSITIONS}"
# keepalived does not wait for a notify script, so those of two quick
# transitions can run at once: under the lock the balancer is told the last
# transition logged, whichever script gets there last.
exec 9>"{dir}/notify.lock"
flock 9
case $(tail -n 1 "{dir}/{TRANSITIONS}") in
    *" active") role=active ;;
    *) role=standby ;;
esac
if out=$({tell} "$role" 2>&1); then result=ok; else result="failed: $out"; fi
echo "$(date +%s.%N) $role $result" >> "{dir}/{TOLD}"
"#,
            tell = self.tell,
        )
    }

    /// The check keepalived runs every second.
    pub fn check_script(&self) -> String {
        format!(
            "#!/bin/sh\n# Written by `segwlb lab up`: exits 0 while this node's balancer serves.\nexec {} >/dev/null 2>&1\n",
            self.check
        )
    }

    /// Write the configuration and the scripts into [`Node::dir`].
    pub fn write(&self) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(self.dir.join(CONF), self.conf())?;
        for (name, text) in [(NOTIFY, self.notify_script()), (CHECK, self.check_script())] {
            let path = self.dir.join(name);
            std::fs::write(&path, text)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// keepalived in `ns` on the files of [`Node::write`]: VRRP only, in
    /// the foreground (its pid is the one to stop), its log on stdout.
    pub fn command(&self, ns: &Netns) -> Command {
        let mut cmd = ns.command(KEEPALIVED);
        let file = |name: &str| self.dir.join(name);
        cmd.args(["--vrrp", "--dont-fork", "--log-console", "--log-detail"])
            .arg("--no-syslog")
            .arg("--use-file")
            .arg(file(CONF))
            .arg("--pid")
            .arg(file("keepalived.pid"))
            .arg("--vrrp_pid")
            .arg(file("vrrp.pid"));
        cmd
    }
}

/// The transitions keepalived announced in `dir`, oldest first.
pub fn transitions(dir: &Path) -> Vec<Transition> {
    let text = std::fs::read_to_string(dir.join(TRANSITIONS)).unwrap_or_default();
    text.lines().filter_map(parse_transition).collect()
}

fn parse_transition(line: &str) -> Option<Transition> {
    let (at, role) = line.split_once(' ')?;
    let (secs, nanos) = at.split_once('.')?;
    let at = SystemTime::UNIX_EPOCH + Duration::new(secs.parse().ok()?, nanos.parse().ok()?);
    Some(Transition {
        at,
        to: Role::parse(role)?,
    })
}

/// What a pair needs beyond the lab's prerequisites: `Err` names what is
/// missing and the `apt-get` line that installs it.
pub fn prerequisites() -> Result<(), String> {
    let mut missing = Vec::new();
    if !Path::new(KEEPALIVED).is_file() {
        missing.push(("keepalived", "keepalived"));
    }
    let flock = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("flock").is_file()));
    if !flock {
        missing.push(("`flock`", "util-linux"));
    }
    if missing.is_empty() {
        return Ok(());
    }
    let what: Vec<String> = missing
        .iter()
        .map(|(thing, package)| format!("{thing} (package {package})"))
        .collect();
    let packages: Vec<&str> = missing.iter().map(|&(_, p)| p).collect();
    Err(format!(
        "a pair of balancers needs {}; install with: apt-get install -y {}",
        what.join(", "),
        packages.join(" ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        Node {
            dir: PathBuf::from("/w/lb"),
            sync: "sync".into(),
            address: (Ipv4Addr::new(10, 255, 0, 3), 29),
            track: "uplink".into(),
            priority: 150,
            check: "\"/bin/segwlb\" ctl --socket \"/w/segwlb.sock\" status".into(),
            tell: "\"/bin/segwlb\" ctl --socket \"/w/segwlb.sock\" role".into(),
        }
    }

    #[test]
    fn the_configuration_elects_by_vrrp3_on_the_sync_link_and_never_preempts() {
        let conf = node().conf();
        for line in [
            "    version 3\n",
            "    state BACKUP\n    nopreempt\n",
            "    interface sync\n",
            "    priority 150\n",
            "    advert_int 0.2\n",
            "        10.255.0.3/29 dev sync\n",
            "    track_interface {\n        uplink\n    }\n",
            "    script \"/w/lb/check\"\n    # keepalived's shortest interval, whole seconds.\n    interval 1\n",
            "    notify_master \"/w/lb/notify active\"\n",
            "    notify_backup \"/w/lb/notify standby\"\n",
            "    notify_fault \"/w/lb/notify fault\"\n",
        ] {
            assert!(conf.contains(line), "{line:?} not in\n{conf}");
        }
    }

    #[test]
    fn the_notify_script_tells_the_last_role_logged_and_a_fault_is_standby() {
        let script = node().notify_script();
        assert!(script.contains("echo \"$(date +%s.%N) $1\" >> \"/w/lb/transitions\""));
        assert!(script.contains("flock 9"));
        assert!(script.contains("*\" active\") role=active ;;\n    *) role=standby ;;"));
        assert!(script.contains(
            "if out=$(\"/bin/segwlb\" ctl --socket \"/w/segwlb.sock\" role \"$role\" 2>&1)"
        ));
        assert!(node()
            .check_script()
            .contains("exec \"/bin/segwlb\" ctl --socket \"/w/segwlb.sock\" status >/dev/null"));
    }

    #[test]
    fn transitions_are_read_back_with_their_time() {
        let t = parse_transition("1700000000.250000000 fault").unwrap();
        assert_eq!(t.to, Role::Fault);
        assert_eq!(
            t.at,
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250)
        );
        assert_eq!(parse_transition("1700000000.25 master"), None);
        assert_eq!(parse_transition("garbage"), None);
    }
}
