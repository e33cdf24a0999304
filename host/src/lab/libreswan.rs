//! libreswan (pluto) for the lab, beside strongSwan: a pluto per namespace
//! with its own run, NSS and configuration directory, its `ipsec.conf` and
//! secrets, the command lines of `pluto`, `addconn` and `whack` against its
//! private control socket, and a parser for `whack --showstates`.
//!
//! Where pluto comes from. Debian's `libreswan` package conflicts with
//! strongSwan's (both ship an `ipsec` command), so `scripts/setup.sh`
//! unpacks its .deb into `.tools/libreswan` and installs only its
//! libraries. pluto starts `/usr/libexec/ipsec/addconn` by that absolute
//! path, so each pluto runs in a mount namespace of its own in which the
//! unpacked `usr/libexec` is bound over `/usr/libexec` (and a private
//! tmpfs is on `/run`, as for each charon).
//!
//! What this kernel lets pluto do. libreswan has no userland ESP: it
//! installs every CHILD SA through the kernel's XFRM, and a kernel without
//! ESP (`CONFIG_INET_ESP` unset, as on the machines this project is built
//! and tested on) refuses it: pluto establishes the IKE SA, fails the
//! CHILD SA ("netlink response for Add SA esp…: Function not implemented"),
//! deletes its IKE SA without telling the peer and starts again. On such a
//! kernel the lab's libreswan tunnels are childless IKE SAs (RFC 6023,
//! pluto's `omit-v2-ike-auth-child` impairment, which charon accepts):
//! everything of libreswan on the wire but ESP — its IKE_SA_INIT, float,
//! liveness, NAT keepalives, rekeys and deletes — through the balancer.
//! [`Pluto::childless`] says which the lab runs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::strongswan::PSK;

/// pluto in the unpacked tree.
const PLUTO: &str = "usr/libexec/ipsec/pluto";
const WHACK: &str = "usr/libexec/ipsec/whack";
const ADDCONN: &str = "usr/libexec/ipsec/addconn";
/// The segws' IKE identity (`segw_swanctl`'s `id`).
const SEGW_ID: &str = "segw.lab";

/// The unpacked libreswan: `$SEGWLB_LIBRESWAN`, else `.tools/libreswan`
/// of this source tree (where `scripts/setup.sh` puts it).
pub fn root() -> PathBuf {
    match std::env::var_os("SEGWLB_LIBRESWAN") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/libreswan"),
    }
}

/// Whether pluto can run from [`root`]: its version line, or what is
/// missing.
pub fn prerequisites() -> Result<String, String> {
    let root = root();
    let pluto = root.join(PLUTO);
    let out = Command::new(&pluto)
        .arg("--version")
        .output()
        .map_err(|e| {
            format!(
                "{}: {e} (scripts/setup.sh unpacks libreswan there, as root)",
                pluto.display()
            )
        })?;
    let version = String::from_utf8_lossy(&out.stdout);
    let version = version.lines().next().unwrap_or("").trim();
    if !out.status.success() || !version.starts_with("Libreswan") {
        return Err(format!(
            "{} does not run: {}",
            pluto.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    for tool in ["certutil", "unshare"] {
        if Command::new(tool).arg("--help").output().is_err() {
            return Err(format!("{tool} is missing (libnss3-tools, util-linux)"));
        }
    }
    // "Libreswan 4.10 IKEv2 IKEv1 XFRM ...": the name and the version.
    Ok(version
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" "))
}

/// One libreswan initiator: a connection `name` from `outer` to the VIP of
/// its family, with `inner`/32 as its own traffic selector.
#[derive(Debug, Clone, PartialEq)]
pub struct Conn {
    pub name: String,
    pub outer: IpAddr,
    pub inner: Ipv4Addr,
    /// Follow a segw's IKEv2 Redirect (RFC 5685) of the established SA, as
    /// a graceful move asks (`accept-redirect`; pluto's default is no).
    pub accept_redirect: bool,
}

/// Liveness as pluto is told it: a liveness exchange after `dpd_delay_s`
/// without traffic from the peer, retransmitted (500 ms, doubling) for
/// `retransmit_timeout_s`, then the IKE SA is given up and started again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Liveness {
    pub dpd_delay_s: u32,
    pub retransmit_timeout_s: u32,
}

/// `config setup` of a pluto whose files live in `dir`: its log there.
fn config_setup(dir: &Path) -> String {
    format!(
        "config setup
    logfile={}/pluto.log
    logtime=yes
    plutodebug=none
",
        dir.display()
    )
}

/// The `ipsec.conf` of a pluto whose files live in `dir`.
pub fn ipsec_conf(
    dir: &Path,
    vips: (Ipv4Addr, Option<Ipv6Addr>),
    service_ts: &str,
    conns: &[Conn],
    liveness: Liveness,
) -> String {
    let mut text = config_setup(dir);
    for c in conns {
        let vip = match (c.outer, vips.1) {
            (IpAddr::V6(_), Some(vip6)) => IpAddr::V6(vip6),
            _ => IpAddr::V4(vips.0),
        };
        text += &format!(
            "conn {name}
    ikev2=insist
    authby=secret
    left={outer}
    leftid=@{name}.lab
    leftsubnet={inner}/32
    right={vip}
    rightid=@{SEGW_ID}
    rightsubnet={service_ts}
    ike=aes128-sha2_256;modp2048
    esp=aes_gcm128
    dpddelay={dpd}
    dpdaction=restart
    retransmit-timeout={rt}s
    accept-redirect={redirect}
    auto=add
",
            name = c.name,
            outer = c.outer,
            inner = c.inner,
            dpd = liveness.dpd_delay_s,
            rt = liveness.retransmit_timeout_s,
            redirect = if c.accept_redirect { "yes" } else { "no" },
        );
    }
    text
}

/// The `ipsec.conf` of a libreswan segw whose files live in `dir`: the
/// lab's segw identity on the VIP (and on `vip6`, a connection of its
/// own), any initiator with the lab's PSK, `service_ts` to `inner_ts`.
pub fn segw_conf(
    dir: &Path,
    vips: (Ipv4Addr, Option<Ipv6Addr>),
    service_ts: &str,
    inner_ts: &str,
) -> String {
    let mut text = config_setup(dir);
    let vips = [Some(IpAddr::V4(vips.0)), vips.1.map(IpAddr::V6)];
    for (vip, name) in vips.into_iter().zip(["segw", "segw6"]) {
        let Some(vip) = vip else { continue };
        text += &format!(
            "conn {name}
    ikev2=insist
    authby=secret
    left={vip}
    leftid=@{SEGW_ID}
    leftsubnet={service_ts}
    right=%any
    rightid=%any
    rightsubnet={inner_ts}
    ike=aes128-sha2_256;modp2048
    esp=aes_gcm128
    auto=add
"
        );
    }
    text
}

/// A segw's secrets: the lab's PSK for any initiator.
pub fn segw_secrets() -> String {
    format!(": PSK \"{PSK}\"\n")
}

/// The secrets of `conns`: the lab's one PSK between each and the segws.
pub fn secrets(conns: &[Conn]) -> String {
    conns
        .iter()
        .map(|c| format!("@{}.lab @{SEGW_ID} : PSK \"{PSK}\"\n", c.name))
        .collect()
}

/// One pluto: its namespace and its directory (configuration, secrets,
/// `nss/`, `run/` with the control socket, `pluto.log`).
#[derive(Debug, Clone)]
pub struct Pluto {
    pub ns: String,
    pub dir: PathBuf,
    root: PathBuf,
}

impl Pluto {
    pub fn new(ns: &str, dir: &Path) -> Pluto {
        Pluto {
            ns: ns.to_string(),
            dir: dir.to_path_buf(),
            root: root(),
        }
    }

    /// Whether this kernel can install ESP SAs; without, the lab's
    /// libreswan tunnels are childless (see the module's text).
    pub fn childless() -> bool {
        static CHILDLESS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *CHILDLESS.get_or_init(|| !kernel_has_esp())
    }

    /// A fresh NSS database in `nss/` (no password), `run/`.
    pub fn prepare(&self) -> std::io::Result<()> {
        let nss = self.dir.join("nss");
        let _ = std::fs::remove_dir_all(&nss);
        std::fs::create_dir_all(&nss)?;
        std::fs::create_dir_all(self.dir.join("run"))?;
        let out = Command::new("certutil")
            .args(["-N", "-d"])
            .arg(format!("sql:{}", nss.display()))
            .arg("--empty-password")
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "certutil -N: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// `pluto --nofork` in its namespace and a mount namespace of its own.
    pub fn command(&self) -> Command {
        let d = self.dir.display();
        let r = self.root.display();
        let script = format!(
            "mount -t tmpfs tmpfs /run && mount --bind {r}/usr/libexec /usr/libexec && \
             exec {r}/{PLUTO} --nofork --config {d}/ipsec.conf --secretsfile {d}/ipsec.secrets \
             --rundir {d}/run --nssdir {d}/nss --ipsecdir {d} --dumpdir {d}/run"
        );
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns", "exec", &self.ns, "unshare", "-m", "sh", "-c", &script,
        ]);
        cmd
    }

    /// Its control socket.
    pub fn ctl(&self) -> PathBuf {
        self.dir.join("run/pluto.ctl")
    }

    /// `whack ARGS` against this pluto.
    pub fn whack(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(self.root.join(WHACK))
            .arg("--ctlsocket")
            .arg(self.ctl())
            .args(args);
        cmd
    }

    /// `addconn --autoall`: every connection of its `ipsec.conf`.
    pub fn addconn(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(self.root.join(ADDCONN))
            .arg("--config")
            .arg(self.dir.join("ipsec.conf"))
            .arg("--ctlsocket")
            .arg(self.ctl())
            .arg("--autoall");
        cmd
    }
}

/// Whether the kernel knows ESP: an SA added in a namespace of our own.
fn kernel_has_esp() -> bool {
    // /proc/net/xfrm_stat exists with XFRM alone; ESP registers no file,
    // so ask the kernel for an SA (in no namespace of anyone else's).
    let ns = format!("segwlb-esp-{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return false;
    }
    let added = Command::new("ip")
        .args([
            "-n",
            &ns,
            "xfrm",
            "state",
            "add",
            "src",
            "192.0.2.1",
            "dst",
            "192.0.2.2",
        ])
        .args(["proto", "esp", "spi", "0x100", "mode", "tunnel"])
        .args([
            "aead",
            "rfc4106(gcm(aes))",
            "0x0011223344556677889900112233445566778899",
            "128",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    added
}

/// One state of `whack --showstates`.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// `#N`: pluto's serial of the state.
    pub serial: u64,
    pub conn: String,
    /// The peer, where the line names it: a responder's instance of a
    /// `right=%any` connection does (`"segw"[2] 10.1.0.201:500`), an
    /// initiator's connection does not (`"l201":4500`).
    pub peer: Option<IpAddr>,
    /// The peer's port (4500 after the float).
    pub port: u16,
    /// `STATE_V2_ESTABLISHED_IKE_SA`, `STATE_V2_PARENT_I1`, ...
    pub state: String,
}

impl State {
    pub fn established_ike(&self) -> bool {
        self.state == "STATE_V2_ESTABLISHED_IKE_SA"
    }
}

/// Parse `whack --showstates`: lines like
/// `000 #5: "c1":4500 STATE_V2_ESTABLISHED_IKE_SA (established IKE SA); ...`
/// or, for an instance, `000 #1: "segw"[2] 192.0.2.100:500 STATE_...`.
/// Lines that are not states are skipped; a state line that does not parse
/// is an error naming it.
pub fn parse_showstates(text: &str) -> Result<Vec<State>, String> {
    let mut states = Vec::new();
    for line in text.lines() {
        let rest = line
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start();
        let Some(rest) = rest.strip_prefix('#') else {
            continue;
        };
        let bad = || format!("whack --showstates: cannot read `{line}`");
        let (serial, rest) = rest.split_once(": ").ok_or_else(bad)?;
        let serial = serial.parse().map_err(|_| bad())?;
        let rest = rest.strip_prefix('"').ok_or_else(bad)?;
        let (conn, rest) = rest.split_once('"').ok_or_else(bad)?;
        let mut words = rest.split_whitespace();
        // An instance carries `[N]` after its name, then its peer.
        let mut endpoint = words.next().ok_or_else(bad)?;
        if let Some(after) = endpoint.strip_prefix('[') {
            let (n, after) = after.split_once(']').ok_or_else(bad)?;
            n.parse::<u64>().map_err(|_| bad())?;
            endpoint = if after.is_empty() {
                words.next().ok_or_else(bad)?
            } else {
                after
            };
        }
        let (peer, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
        let peer = match peer.trim_start_matches('[').trim_end_matches(']') {
            "" => None,
            p => Some(p.parse().map_err(|_| bad())?),
        };
        let port = port.parse().map_err(|_| bad())?;
        let state = words.next().ok_or_else(bad)?;
        states.push(State {
            serial,
            conn: conn.to_string(),
            peer,
            port,
            state: state.to_string(),
        });
    }
    Ok(states)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn showstates_gives_each_state_its_connection_port_and_state() {
        // As pluto 4.10 printed it in the lab (childless IKE SAs, one
        // being rekeyed, one still in IKE_SA_INIT).
        let text = "\
000 #5: \"l1a\":4500 STATE_V2_ESTABLISHED_IKE_SA (established IKE SA); REKEY in 27973s; REPLACE in 28799s; newest; idle;
000 #7: \"l1b\":500 STATE_V2_PARENT_I1 (sent IKE_SA_INIT request); RETRANSMIT in 1s; idle;
000 #9: \"l1c\"[2]:4500 STATE_V2_ESTABLISHED_IKE_SA (established IKE SA); newest;
000 #1: \"segw\"[2] 192.0.2.100:500 STATE_V2_ESTABLISHED_IKE_SA (established IKE SA); idle;
000 #4: \"segw6\"[1] 2001:db8:1::cb:500 STATE_V2_ESTABLISHED_IKE_SA (established IKE SA); idle;
000  
";
        let states = parse_showstates(text).unwrap();
        assert_eq!(
            states,
            vec![
                State {
                    serial: 5,
                    conn: "l1a".into(),
                    peer: None,
                    port: 4500,
                    state: "STATE_V2_ESTABLISHED_IKE_SA".into()
                },
                State {
                    serial: 7,
                    conn: "l1b".into(),
                    peer: None,
                    port: 500,
                    state: "STATE_V2_PARENT_I1".into()
                },
                State {
                    serial: 9,
                    conn: "l1c".into(),
                    peer: None,
                    port: 4500,
                    state: "STATE_V2_ESTABLISHED_IKE_SA".into()
                },
                State {
                    serial: 1,
                    conn: "segw".into(),
                    peer: Some("192.0.2.100".parse().unwrap()),
                    port: 500,
                    state: "STATE_V2_ESTABLISHED_IKE_SA".into()
                },
                State {
                    serial: 4,
                    conn: "segw6".into(),
                    peer: Some("2001:db8:1::cb".parse().unwrap()),
                    port: 500,
                    state: "STATE_V2_ESTABLISHED_IKE_SA".into()
                },
            ]
        );
        assert!(states[0].established_ike() && !states[1].established_ike());
        let err = parse_showstates("000 #x: \"a\":500 S\n").unwrap_err();
        assert!(err.contains("#x"), "{err}");
    }

    #[test]
    fn each_connection_goes_to_the_vip_of_its_family_with_its_own_identity() {
        let conns = [
            Conn {
                name: "l1".into(),
                outer: "10.1.0.201".parse().unwrap(),
                inner: "10.200.0.201".parse().unwrap(),
                accept_redirect: true,
            },
            Conn {
                name: "l2".into(),
                outer: "2001:db8:1::ca".parse().unwrap(),
                inner: "10.200.0.202".parse().unwrap(),
                accept_redirect: false,
            },
        ];
        let vips = (
            "10.2.2.1".parse().unwrap(),
            Some("2001:db8:2::1".parse().unwrap()),
        );
        let live = Liveness {
            dpd_delay_s: 5,
            retransmit_timeout_s: 10,
        };
        let conf = ipsec_conf(Path::new("/w"), vips, "10.201.0.0/24", &conns, live);
        assert!(conf.contains("logfile=/w/pluto.log"));
        let l2 = &conf[conf.find("conn l2").unwrap()..];
        assert!(l2.contains("left=2001:db8:1::ca\n") && l2.contains("right=2001:db8:2::1\n"));
        assert!(l2.contains("leftid=@l2.lab") && l2.contains("retransmit-timeout=10s"));
        let l1 = &conf[conf.find("conn l1").unwrap()..conf.find("conn l2").unwrap()];
        assert!(l1.contains("right=10.2.2.1\n") && l1.contains("leftsubnet=10.200.0.201/32"));
        assert!(l1.contains("accept-redirect=yes") && l2.contains("accept-redirect=no"));
        let secrets = secrets(&conns);
        assert_eq!(secrets.lines().count(), 2);
        assert!(secrets.starts_with("@l1.lab @segw.lab : PSK \""));
    }
}
