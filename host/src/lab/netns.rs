//! Network namespaces and veth pairs that clean up after themselves.
//!
//! Everything here drives iproute2 (`ip`) and `ethtool` as commands and
//! needs root. A [`Netns`] owns its namespace: dropping it (also while
//! unwinding from a panic) ends every process left inside and deletes the
//! namespace, which destroys the veth ends in it and so their peers.
//! Nothing is ever created in the caller's own namespace: a veth pair is
//! made with each end directly in its namespace, so names like `eth0` used
//! inside namespaces never meet the host's.
//!
//! Names: a namespace name is a file name under `/run/netns`; interface
//! names are at most 15 bytes ([`IFNAMSIZ`] - 1). [`unique_prefix`] gives a
//! short per-process prefix to put in front of namespace names, so that a
//! leftover (after a `kill -9`) says whose it was.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest interface name Linux takes, in bytes.
pub const IFNAMSIZ: usize = 15;

/// Where `ip netns` keeps its namespaces (bind mounts of `/proc/PID/ns/net`).
const NETNS_DIR: &str = "/run/netns";

/// How long processes left in a dropped namespace get between SIGTERM and
/// SIGKILL.
const GRACE: Duration = Duration::from_millis(500);

/// What went wrong, naming the command and what it printed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the output of `{command}`: {detail}")]
    Output { command: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("interface name {0:?} is longer than {IFNAMSIZ} bytes")]
    NameTooLong(String),
    #[error("name {0:?} is empty or has characters other than [A-Za-z0-9_.-]")]
    BadName(String),
    #[error("empty command line")]
    EmptyCommand,
}

pub type Result<T> = std::result::Result<T, Error>;

/// True when running with effective uid 0 (namespaces need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The tools this module runs and the Debian packages that ship them.
const TOOLS: [(&str, &str); 2] = [("ip", "iproute2"), ("ethtool", "ethtool")];

/// Whether this process can build namespaces: `Err` says which of `ip`
/// and `ethtool` are missing, the `apt-get` line that installs them, and
/// whether root is missing.
pub fn prerequisites() -> std::result::Result<(), String> {
    let missing: Vec<(&str, &str)> = TOOLS
        .iter()
        .copied()
        .filter(|(tool, _)| find_in_path(tool).is_none())
        .collect();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        let names: Vec<String> = missing
            .iter()
            .map(|(tool, package)| format!("`{tool}` (package {package})"))
            .collect();
        let packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
        problems.push(format!(
            "missing {}; install with: apt-get install -y {}",
            names.join(" and "),
            packages.join(" ")
        ));
    }
    if !is_root() {
        problems.push("not root: network namespaces need root (run as root or with sudo)".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn find_in_path(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// A short prefix unique to this process for namespace names:
/// `sg{tag}{pid % 100000}`, with `tag` cut to its first 3 alphanumeric
/// characters, so the prefix is at most 10 bytes and leaves at least 5 for
/// a suffix within [`IFNAMSIZ`].
pub fn unique_prefix(tag: &str) -> String {
    let tag: String = tag
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(3)
        .collect();
    format!("sg{tag}{}", std::process::id() % 100_000)
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

fn check_ifname(name: &str) -> Result<()> {
    check_name(name)?;
    if name.len() > IFNAMSIZ {
        return Err(Error::NameTooLong(name.to_string()));
    }
    Ok(())
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run `cmd` to completion; its stdout, or an error with its stderr.
pub fn run(cmd: Command) -> Result<String> {
    spawn(cmd)?.finish()
}

/// Start `cmd` (stdin closed, stdout and stderr kept) and go on: for
/// commands that overlap, each finished with [`Running::finish`].
pub fn spawn(mut cmd: Command) -> Result<Running> {
    let command = command_line(&cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    Ok(Running { command, child })
}

/// A command started by [`spawn`].
#[derive(Debug)]
pub struct Running {
    command: String,
    child: std::process::Child,
}

impl Running {
    /// Whether it has exited (without reaping its output yet).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait for it: its stdout, or an error with its stderr.
    pub fn finish(self) -> Result<String> {
        let Running { command, child } = self;
        let out = child.wait_with_output().map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
        if !out.status.success() {
            return Err(Error::Failed {
                command,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        String::from_utf8(out.stdout).map_err(|e| Error::Output {
            command,
            detail: e.to_string(),
        })
    }
}

fn ip(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run(cmd)
}

/// A network namespace; deleted on drop when this process owns it (made it
/// with [`Netns::new`] and did not [`Netns::keep`] it).
#[derive(Debug)]
pub struct Netns {
    name: String,
    owned: bool,
}

impl Netns {
    /// `ip netns add NAME` (after removing a stale namespace of the same
    /// name and whatever runs in it), then bring `lo` up.
    pub fn new(name: &str) -> Result<Netns> {
        check_name(name)?;
        if Path::new(NETNS_DIR).join(name).exists() {
            // A leftover of an earlier run with the same name: ours to
            // replace, as the name carries our prefix.
            drop(Netns {
                name: name.to_string(),
                owned: true,
            });
        }
        ip(&["netns", "add", name])?;
        // From here on, Drop cleans up if anything below fails.
        let ns = Netns {
            name: name.to_string(),
            owned: true,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle on a namespace that exists and that someone else removes
    /// (`segwlb lab down`): dropping it leaves the namespace alone.
    pub fn adopt(name: &str) -> Result<Netns> {
        check_name(name)?;
        if !Path::new(NETNS_DIR).join(name).exists() {
            return Err(Error::Io {
                what: format!("open namespace {name}"),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        Ok(Netns {
            name: name.to_string(),
            owned: false,
        })
    }

    /// Leave the namespace in place when this handle drops.
    pub fn keep(mut self) {
        self.owned = false;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME PROGRAM`, ready for more arguments.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Run `argv` inside the namespace; its stdout, or an error naming the
    /// command line and carrying its stderr.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        let (program, args) = argv.split_first().ok_or(Error::EmptyCommand)?;
        let mut cmd = self.command(program);
        cmd.args(args);
        run(cmd)
    }

    /// `ip -n NAME ARGS...`: iproute2 acting inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        run(cmd)
    }

    /// Run `f` on a fresh thread that has joined this namespace first
    /// (`setns(2)` with `CLONE_NEWNET`; only that thread moves). Sockets
    /// opened in `f` belong to the namespace for their whole life, also
    /// after the thread has ended: this is how the test process opens an
    /// AF_PACKET socket on an interface inside a namespace. A panic in `f`
    /// is resumed in the caller.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = Path::new(NETNS_DIR).join(&self.name);
        let file = File::open(&path).map_err(|source| Error::Io {
            what: format!("open {}", path.display()),
            source,
        })?;
        let fd = file.as_raw_fd();
        let joined = std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: `fd` is an open namespace file kept alive by
                    // `file` for the whole scope; setns affects only this
                    // thread.
                    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(f())
                })
                .join()
        });
        match joined {
            Ok(result) => result.map_err(|source| Error::Io {
                what: format!("setns into {}", self.name),
                source,
            }),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Pids of the processes whose network namespace this is.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let out = ip(&["netns", "pids", &self.name])?;
        Ok(parse_pids(&out))
    }

    /// SIGTERM everything in the namespace, SIGKILL what is left after a
    /// grace period. Never this process.
    fn kill_all(&self) {
        let me = std::process::id() as i32;
        let pids = |ns: &Netns| -> Vec<i32> {
            ns.pids()
                .unwrap_or_default()
                .into_iter()
                .filter(|&p| p != me && p > 1)
                .collect()
        };
        let mut left = pids(self);
        if left.is_empty() {
            return;
        }
        for &pid in &left {
            // SAFETY: kill(2) with a pid we read just now; at worst ESRCH.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + GRACE;
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            left = pids(self);
        }
        for &pid in &left {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        self.kill_all();
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            // Drop cannot fail; say so, since a leftover namespace is
            // something the user has to remove by hand.
            eprintln!("warning: {e}");
        }
    }
}

fn parse_pids(out: &str) -> Vec<i32> {
    out.split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// A veth pair: `a_if` in `a`, `b_if` in `b`, both up, TX checksum
/// offload off on both ends and IPv6 off on both (see [`enable_ipv6`]).
///
/// Checksum offload: veth leaves TX checksums to "hardware" that is never
/// there, so a frame the kernel sends and a userspace packet socket relays
/// would arrive with a bad UDP checksum. IPv6: the kernel's own neighbour
/// discovery and MLD chatter would show up in frame counts.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    check_ifname(a_if)?;
    check_ifname(b_if)?;
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])?;
    for (ns, ifname) in [(a, a_if), (b, b_if)] {
        ns.exec(&["ethtool", "-K", ifname, "tx", "off"])?;
        disable_ipv6(ns, ifname)?;
    }
    for (ns, ifname) in [(a, a_if), (b, b_if)] {
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// A bridge `name` in `ns`, up, forwarding at once (no STP delay), with no
/// multicast snooping and IPv6 off ([`enable_ipv6`] turns it on).
///
/// Snooping: nothing on a lab segment reports listening to a
/// solicited-node group (a balancer answers neighbour solicitations for
/// addresses it does not own), so a snooping bridge could keep those
/// solicitations from it.
pub fn bridge(ns: &Netns, name: &str) -> Result<()> {
    check_ifname(name)?;
    ns.ip(&[
        "link",
        "add",
        name,
        "type",
        "bridge",
        "forward_delay",
        "0",
        "mcast_snooping",
        "0",
    ])?;
    disable_ipv6(ns, name)?;
    ns.ip(&["link", "set", name, "up"])?;
    Ok(())
}

/// Write a sysctl of `ns`: `key` is its path under `/proc/sys`, with
/// slashes (`net/ipv4/neigh/eth0/mcast_solicit`), so interface names with
/// dots need no escaping. The write happens from a thread inside the
/// namespace, where `/proc/sys/net` is that namespace's.
pub fn sysctl(ns: &Netns, key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    ns.enter(|| std::fs::write(&path, value))?
        .map_err(|source| Error::Io {
            what: format!("set {} to {value} in {}", path.display(), ns.name),
            source,
        })
}

/// Turn IPv6 back on for `ifname` (a [`veth`] end), without duplicate
/// address detection (an address is usable at once, and the kernel sends
/// no DAD probes into frame counts), and keeping its addresses while the
/// link is down, as IPv4 does (a test that takes a link down and up again
/// finds its segw as it was).
pub fn enable_ipv6(ns: &Netns, ifname: &str) -> Result<()> {
    sysctl(ns, &format!("net/ipv6/conf/{ifname}/accept_dad"), "0")?;
    sysctl(
        ns,
        &format!("net/ipv6/conf/{ifname}/keep_addr_on_down"),
        "1",
    )?;
    sysctl(ns, &format!("net/ipv6/conf/{ifname}/disable_ipv6"), "0")
}

fn disable_ipv6(ns: &Netns, ifname: &str) -> Result<()> {
    if !Path::new("/proc/sys/net/ipv6").exists() {
        return Ok(()); // no IPv6 in this kernel: nothing to silence
    }
    sysctl(ns, &format!("net/ipv6/conf/{ifname}/disable_ipv6"), "1")
}

/// An interface's counters as the kernel reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
}

impl LinkStats {
    /// What changed since `earlier` (counters only grow; a reset reads 0).
    pub fn since(&self, earlier: &LinkStats) -> LinkStats {
        LinkStats {
            rx_packets: self.rx_packets.saturating_sub(earlier.rx_packets),
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
            rx_dropped: self.rx_dropped.saturating_sub(earlier.rx_dropped),
            tx_packets: self.tx_packets.saturating_sub(earlier.tx_packets),
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
            tx_dropped: self.tx_dropped.saturating_sub(earlier.tx_dropped),
        }
    }
}

/// What `ip -s -j link show dev IF` says about one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LinkInfo {
    mac: [u8; 6],
    stats: LinkStats,
}

fn link_info(ns: &Netns, ifname: &str) -> Result<LinkInfo> {
    check_ifname(ifname)?;
    let args = ["-s", "-j", "link", "show", "dev", ifname];
    let out = ns.ip(&args)?;
    parse_link_show(&out).map_err(|detail| Error::Output {
        command: format!("ip -n {} {}", ns.name, args.join(" ")),
        detail,
    })
}

/// Counters of `ifname` in `ns`.
pub fn link_stats(ns: &Netns, ifname: &str) -> Result<LinkStats> {
    Ok(link_info(ns, ifname)?.stats)
}

/// The MAC address of `ifname` in `ns`.
pub fn mac_of(ns: &Netns, ifname: &str) -> Result<[u8; 6]> {
    Ok(link_info(ns, ifname)?.mac)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Parse the JSON of `ip -s -j link show dev IF` (a one-element array).
fn parse_link_show(json: &str) -> std::result::Result<LinkInfo, String> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let link = match value.as_array().map(Vec::as_slice) {
        Some([link]) => link,
        _ => return Err("expected an array of exactly one interface".into()),
    };
    let address = link["address"].as_str().ok_or("no \"address\" field")?;
    let mac = parse_mac(address).ok_or_else(|| format!("bad MAC address {address:?}"))?;
    let stats = if link["stats64"].is_object() {
        &link["stats64"]
    } else {
        &link["stats"]
    };
    let counter = |dir: &str, name: &str| {
        stats[dir][name]
            .as_u64()
            .ok_or_else(|| format!("no counter stats64.{dir}.{name} (was -s given?)"))
    };
    Ok(LinkInfo {
        mac,
        stats: LinkStats {
            rx_packets: counter("rx", "packets")?,
            rx_bytes: counter("rx", "bytes")?,
            rx_dropped: counter("rx", "dropped")?,
            tx_packets: counter("tx", "packets")?,
            tx_bytes: counter("tx", "bytes")?,
            tx_dropped: counter("tx", "dropped")?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // As printed by iproute2 6.1 for a veth end.
    const VETH: &str = concat!(
        r#"[{"ifindex":5,"link_index":4,"ifname":"eth0","#,
        r#""flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1500,"#,
        r#""qdisc":"noqueue","operstate":"UP","linkmode":"DEFAULT","#,
        r#""group":"default","txqlen":1000,"link_type":"ether","#,
        r#""address":"5a:0b:3c:de:f0:12","broadcast":"ff:ff:ff:ff:ff:ff","#,
        r#""link_netnsid":0,"stats64":{"#,
        r#""rx":{"bytes":150000,"packets":1000,"errors":0,"dropped":7,"#,
        r#""over_errors":0,"multicast":0},"#,
        r#""tx":{"bytes":3000,"packets":20,"errors":0,"dropped":2,"#,
        r#""carrier_errors":0,"collisions":0}}}]"#,
    );

    #[test]
    fn parses_link_show() {
        let info = parse_link_show(VETH).unwrap();
        assert_eq!(info.mac, [0x5a, 0x0b, 0x3c, 0xde, 0xf0, 0x12]);
        assert_eq!(
            info.stats,
            LinkStats {
                rx_packets: 1000,
                rx_bytes: 150_000,
                rx_dropped: 7,
                tx_packets: 20,
                tx_bytes: 3000,
                tx_dropped: 2,
            }
        );
    }

    #[test]
    fn link_show_errors_say_what_is_missing() {
        let no_stats = r#"[{"ifname":"eth0","address":"5a:0b:3c:de:f0:12"}]"#;
        assert!(parse_link_show(no_stats)
            .unwrap_err()
            .contains("stats64.rx.packets"));
        assert!(parse_link_show("[]").unwrap_err().contains("exactly one"));
        assert!(parse_link_show("not json").is_err());
        let bad_mac = r#"[{"address":"5a:0b:3c"}]"#;
        assert!(parse_link_show(bad_mac).unwrap_err().contains("5a:0b:3c"));
    }

    #[test]
    fn stats_since_subtracts_and_saturates() {
        let before = LinkStats {
            rx_packets: 10,
            tx_bytes: 5,
            ..Default::default()
        };
        let after = LinkStats {
            rx_packets: 25,
            tx_bytes: 1,
            ..Default::default()
        };
        let d = after.since(&before);
        assert_eq!((d.rx_packets, d.tx_bytes), (15, 0));
    }

    #[test]
    fn macs_round_trip() {
        let mac = [0, 0x1b, 0x21, 0xaa, 0xff, 0x09];
        assert_eq!(format_mac(&mac), "00:1b:21:aa:ff:09");
        assert_eq!(parse_mac(&format_mac(&mac)), Some(mac));
        assert_eq!(parse_mac("00:1b:21:aa:ff"), None);
        assert_eq!(parse_mac("00:1b:21:aa:ff:09:00"), None);
        assert_eq!(parse_mac("00:1b:21:aa:ff:g9"), None);
        assert_eq!(parse_mac("0:1b:21:aa:ff:09"), None);
    }

    #[test]
    fn pids_are_one_per_line() {
        assert_eq!(parse_pids("12\n345\n\n"), vec![12, 345]);
        assert_eq!(parse_pids(""), Vec::<i32>::new());
    }

    #[test]
    fn prefixes_leave_room_for_a_suffix() {
        let p = unique_prefix("throughput!");
        assert!(p.starts_with("sgthr"), "{p}");
        assert!(p.len() <= 10, "{p}");
        assert!(unique_prefix("").starts_with("sg"));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("sgtp12345gw1").is_ok());
        assert!(matches!(
            check_ifname("sixteen-bytes-xx"),
            Err(Error::NameTooLong(_))
        ));
        assert!(matches!(check_name("a b"), Err(Error::BadName(_))));
        assert!(matches!(check_name(""), Err(Error::BadName(_))));
        assert!(matches!(check_name(".."), Err(Error::BadName(_))));
    }
}
