//! strongSwan for the lab: configuration files for one charon per
//! namespace (kernel-libipsec, a private vici socket and log), the charon
//! command line, `swanctl` against a private socket, and a parser for
//! `swanctl --list-sas --raw`.
//!
//! The recipe is the one verified in `tests/fixtures/LAB-NOTES.md`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Command;

/// Where Debian installs charon.
pub const CHARON: &str = "/usr/lib/ipsec/charon";
/// The plugin that gives userland ESP over TUN (the kernel has no ESP).
pub const KERNEL_LIBIPSEC: &str = "/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so";
/// The pre-shared key of every lab tunnel (it never leaves the lab).
pub(crate) const PSK: &str = "segwlb-lab-psk-not-a-secret";
/// The connection and child names of every initiator.
pub const CONN: &str = "lab";
pub const CHILD: &str = "net";

/// The `charon { }` lines of a segw refusing IKE SAs past `limit` (its
/// capacity; 0 for none): `ikesa_limit` counts every IKE SA, half-open
/// ones included, as the balancer counts tunnels.
pub fn segw_limit(limit: u64) -> String {
    match limit {
        0 => String::new(),
        n => format!(
            "    # The segw's own limit: the balancer's capacity for it.\n    ikesa_limit = {n}"
        ),
    }
}

/// `strongswan.conf` of the charon whose files live in `dir`: an explicit
/// plugin list (kernel-libipsec before kernel-netlink), the vici socket and
/// the log in `dir`, and `extra` lines inside `charon { }`.
pub fn strongswan_conf(dir: &Path, extra: &str) -> String {
    let d = dir.display();
    format!(
        "charon {{
    load = random nonce openssl pem pkcs1 x509 pubkey hmac sha1 sha2 aes gmp kdf kernel-libipsec kernel-netlink socket-default vici
    port = 500
    port_nat_t = 4500
    install_routes = yes
    # DPD gives up on a dead peer after about 1 + 1.8 + 3.2 s.
    retransmit_timeout = 1.0
    retransmit_tries = 2
    keep_alive = 2s
    # A swanctl command holds a thread until its exchange completes; the
    # lab runs several at once against a charon of 50 initiators, and the
    # packets that complete them need threads too (16, the default, ran
    # out: initiations waited for their 30 s timeout).
    threads = 32
    # A segw answers hundreds of initiators behind one NAT address (as
    # behind a carrier NAT). Its DoS protection allows 5 half-open IKE SAs
    # per address: after a failure, the DPD restarts of a NAT'd charon's
    # tunnels were dropped past the fifth (peer not responding), and
    # those tunnels stayed down.
    dos_protection = no
{extra}
    plugins {{
        vici {{
            socket = unix://{d}/charon.vici
        }}
    }}
    filelog {{
        log {{
            path = {d}/charon.log
            time_format = %H:%M:%S
            ike_name = yes
            flush_line = yes
            default = 1
            ike = 2
            cfg = 2
            knl = 2
            esp = 2
        }}
    }}
}}
"
    )
}

/// strongswan.conf for swanctl itself (else it warns about every plugin
/// Debian does not ship).
pub const SWANCTL_CONF: &str = "swanctl {\n    load = random openssl pem pkcs1 x509 pubkey\n}\n";

fn secrets() -> String {
    format!("secrets {{\n    ike-any {{\n        secret = \"{PSK}\"\n    }}\n}}\n")
}

/// How much slower the segws' DPD is than the initiators'.
///
/// A tunnel that a rebalance moved away leaves its SA behind on its old
/// segw, which keeps asking the initiator whether it is alive; each
/// request the initiator receives defers its own DPD, so it found its new
/// segw only once the old one had given up: ~30 s after a rebalance with
/// both at 5 s. With the segws 6× slower the initiator's DPD comes first
/// (within dpd_delay plus its retransmits, ~11 s), as it does where the
/// initiators are the ones that care.
pub const SEGW_DPD_SLOWER: u32 = 6;

/// The segw's `swanctl.conf`: the same in every segw. Segws run DPD too
/// ([`SEGW_DPD_SLOWER`] times the initiators' `dpd_delay_s`), as real ones
/// do: the SA a moved tunnel leaves behind on its old segw is cleared once
/// its peer no longer answers for it. In a dual-stack lab it answers on
/// both VIPs.
pub fn segw_swanctl(
    vip: Ipv4Addr,
    vip6: Option<Ipv6Addr>,
    service_ts: &str,
    inner_ts: &str,
    dpd_delay_s: u32,
) -> String {
    let dpd_delay_s = dpd_delay_s * SEGW_DPD_SLOWER;
    let vip = match vip6 {
        Some(vip6) => format!("{vip}, {vip6}"),
        None => vip.to_string(),
    };
    format!(
        "connections {{
    segw {{
        version = 2
        local_addrs = {vip}
        remote_addrs = %any
        proposals = aes128-sha256-modp2048
        dpd_delay = {dpd_delay_s}s
        local {{
            auth = psk
            id = segw.lab
        }}
        remote {{
            auth = psk
            id = %any
        }}
        children {{
            {CHILD} {{
                local_ts = {service_ts}
                remote_ts = {inner_ts}
                esp_proposals = aes128gcm16
            }}
        }}
    }}
}}
{}",
        secrets()
    )
}

/// The `swanctl.conf` of an initiator host: per initiator `(name, outer,
/// inner)`, a connection `name` from `outer` to the VIP of its family
/// (`vips`: IPv4, IPv6), its inner address `inner`/32 to `service_ts`.
///
/// Each child has its own fixed reqid (1, 2, … in this charon). With
/// dynamic ones, charon before 5.9.12 (Debian 12 ships 5.9.8) could give
/// a child that DPD restarted the reqid another child had taken meanwhile
/// (strongSwan issue #1855, fixed by its "maintain allocated reqid"
/// commits); the two then shared one outbound SA, and one tunnel stayed
/// up but passed nothing. In the lab that was 0–16 of 300 tunnels after a
/// failure or a rebalance, when many initiators of one charon restart at
/// once.
pub fn initiator_swanctl<'a>(
    initiators: impl IntoIterator<Item = (&'a str, IpAddr, Ipv4Addr)>,
    vips: (Ipv4Addr, Ipv6Addr),
    service_ts: &str,
    dpd_delay_s: u32,
) -> String {
    let mut conf = String::from("connections {\n");
    for (reqid, (name, outer, inner)) in (1..).zip(initiators) {
        let vip: IpAddr = match outer {
            IpAddr::V4(_) => vips.0.into(),
            IpAddr::V6(_) => vips.1.into(),
        };
        conf += &format!(
            "    {name} {{
        version = 2
        local_addrs = {outer}
        remote_addrs = {vip}
        proposals = aes128-sha256-modp2048
        dpd_delay = {dpd_delay_s}s
        local {{
            auth = psk
            id = {name}.lab
        }}
        remote {{
            auth = psk
            id = segw.lab
        }}
        children {{
            {CHILD} {{
                local_ts = {inner}/32
                remote_ts = {service_ts}
                esp_proposals = aes128gcm16
                reqid = {reqid}
                # A dead segw (DPD) means: establish the tunnel again.
                dpd_action = restart
            }}
        }}
    }}
"
        );
    }
    conf + "}\n" + &secrets()
}

/// The command that starts charon in namespace `ns` with its own `/run`
/// (a private mount namespace with a tmpfs there, for the pid file) and
/// the strongswan.conf `conf`. Every step execs, so the child's pid is
/// charon's.
pub fn charon_command(ns: &str, conf: &Path) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "unshare", "-m", "sh", "-c"]);
    cmd.arg(format!(
        "mount -t tmpfs tmpfs /run && STRONGSWAN_CONF='{}' exec {CHARON}",
        conf.display()
    ));
    cmd
}

/// `swanctl ARGS --uri unix://DIR/charon.vici`, with the lab's swanctl conf.
pub fn swanctl(swanctl_conf: &Path, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("swanctl");
    cmd.env("STRONGSWAN_CONF", swanctl_conf)
        .args(args)
        .arg("--uri")
        .arg(format!("unix://{}/charon.vici", dir.display()));
    cmd
}

/// The balancer's `[moves] hook` in the lab: `move-hook SEGW SPI VIP` asks
/// segw SEGW's charon (its directory is `by_name/SEGW`) to redirect the
/// peer of the IKE SA whose initiator SPI is SPI to VIP, i.e. to itself
/// through the balancer (RFC 5685; strongSwan builds the new IKE SA and its
/// CHILD_SAs before it deletes the old ones). The IKE SA is found by its
/// SPI, not the peer's address: behind a NAT one address holds many.
pub fn move_hook(swanctl_conf: &Path, by_name: &Path) -> String {
    format!(
        r#"#!/bin/sh
# Written by `segwlb lab up`: segwlb run's [moves] hook.
set -eu
[ $# -eq 3 ] || {{ echo "usage: $0 SEGW IKE_SPI VIP" >&2; exit 2; }}
export STRONGSWAN_CONF="{conf}"
uri="unix://{by_name}/$1/charon.vici"
id=$(swanctl --list-sas --uri "$uri" 2>/dev/null |
     awk -v spi="$2_i" '{{ for (f = 3; f <= NF; f++) if ($f == spi || $f == spi "*") {{
         sub(/^#/, "", $2); sub(/,$/, "", $2); print $2; exit }} }}')
[ -n "$id" ] || {{ echo "$1 holds no IKE SA with initiator SPI $2" >&2; exit 1; }}
swanctl --redirect --ike-id "$id" --gateway "$3" --uri "$uri" >/dev/null
"#,
        conf = swanctl_conf.display(),
        by_name = by_name.display(),
    )
}

/// A value of the vici tree as `--raw` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Str(String),
    List(Vec<String>),
    Section(Vec<(String, Value)>),
}

impl Value {
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Section(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn list(&self, key: &str) -> Vec<String> {
        match self.get(key) {
            Some(Value::List(l)) => l.clone(),
            _ => Vec::new(),
        }
    }

    /// The entries of a section, in order.
    pub fn entries(&self) -> &[(String, Value)] {
        match self {
            Value::Section(items) => items,
            _ => &[],
        }
    }
}

#[derive(Debug, PartialEq)]
enum Token {
    Open,
    Close,
    ListOpen,
    ListClose,
    Word(String),
}

fn tokens(text: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut Vec<Token>| {
        if !word.is_empty() {
            out.push(Token::Word(std::mem::take(word)));
        }
    };
    for c in text.chars() {
        let t = match c {
            '{' => Some(Token::Open),
            '}' => Some(Token::Close),
            '[' => Some(Token::ListOpen),
            ']' => Some(Token::ListClose),
            c if c.is_whitespace() => None,
            c => {
                word.push(c);
                continue;
            }
        };
        flush(&mut word, &mut out);
        out.extend(t);
    }
    flush(&mut word, &mut out);
    out
}

fn section(toks: &mut std::iter::Peekable<std::vec::IntoIter<Token>>) -> Result<Value, String> {
    let mut items = Vec::new();
    while let Some(t) = toks.next() {
        match t {
            Token::Close => return Ok(Value::Section(items)),
            Token::Word(w) => match w.split_once('=') {
                Some((k, "")) if toks.peek() == Some(&Token::ListOpen) => {
                    toks.next();
                    let mut list = Vec::new();
                    loop {
                        match toks.next() {
                            Some(Token::Word(x)) => list.push(x),
                            Some(Token::ListClose) => break,
                            other => return Err(format!("in list {k}: unexpected {other:?}")),
                        }
                    }
                    items.push((k.to_string(), Value::List(list)));
                }
                Some((k, v)) => items.push((k.to_string(), Value::Str(v.to_string()))),
                None => {
                    if toks.next() != Some(Token::Open) {
                        return Err(format!("section {w} without {{"));
                    }
                    items.push((w, section(toks)?));
                }
            },
            other => return Err(format!("unexpected {other:?}")),
        }
    }
    Err("unterminated section".into())
}

/// Parse one `--raw` message body (`{ … }`).
pub fn parse_raw(body: &str) -> Result<Value, String> {
    let mut toks = tokens(body).into_iter().peekable();
    if toks.next() != Some(Token::Open) {
        return Err("expected {".into());
    }
    section(&mut toks)
}

/// One IKE_SA from `swanctl --list-sas --raw`, what the lab needs of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IkeSa {
    pub conn: String,
    pub state: String,
    pub remote_host: String,
    pub remote_port: u16,
    pub initiator_spi: String,
    pub responder_spi: String,
    /// Seconds since it was established, when it is.
    #[serde(default)]
    pub established: Option<u64>,
    pub children: Vec<ChildSa>,
}

impl IkeSa {
    /// Established with a child installed: a tunnel that can carry traffic.
    pub fn is_up(&self) -> bool {
        self.state == "ESTABLISHED" && self.children.iter().any(|c| c.state == "INSTALLED")
    }

    /// The peer, `address:port` (`[address]:port` over IPv6), as the
    /// balancer's status writes it.
    pub fn remote(&self) -> String {
        match self.remote_host.parse::<IpAddr>() {
            Ok(ip) => std::net::SocketAddr::new(ip, self.remote_port).to_string(),
            Err(_) => format!("{}:{}", self.remote_host, self.remote_port),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChildSa {
    pub state: String,
    pub spi_in: String,
    pub spi_out: String,
    pub packets_in: u64,
    pub packets_out: u64,
    /// The inner packets' bytes (IP header on) it decrypted and encrypted.
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub bytes_out: u64,
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
}

/// Every IKE_SA in the output of `swanctl --list-sas --raw`.
pub fn parse_list_sas(text: &str) -> Result<Vec<IkeSa>, String> {
    let mut sas = Vec::new();
    for line in text.lines() {
        let Some(body) = line.trim().strip_prefix("list-sa event") else {
            continue;
        };
        let tree = parse_raw(body)?;
        for (conn, sa) in tree.entries() {
            let s = |k: &str| sa.str(k).unwrap_or("").to_string();
            let children = sa
                .get("child-sas")
                .map(|c| c.entries().to_vec())
                .unwrap_or_default()
                .iter()
                .map(|(_, c)| ChildSa {
                    state: c.str("state").unwrap_or("").into(),
                    spi_in: c.str("spi-in").unwrap_or("").into(),
                    spi_out: c.str("spi-out").unwrap_or("").into(),
                    packets_in: c
                        .str("packets-in")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0),
                    packets_out: c
                        .str("packets-out")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0),
                    bytes_in: c.str("bytes-in").and_then(|v| v.parse().ok()).unwrap_or(0),
                    bytes_out: c.str("bytes-out").and_then(|v| v.parse().ok()).unwrap_or(0),
                    local_ts: c.list("local-ts"),
                    remote_ts: c.list("remote-ts"),
                })
                .collect();
            sas.push(IkeSa {
                conn: conn.clone(),
                state: s("state"),
                remote_host: s("remote-host"),
                remote_port: sa
                    .str("remote-port")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0),
                initiator_spi: s("initiator-spi"),
                responder_spi: s("responder-spi"),
                established: sa.str("established").and_then(|v| v.parse().ok()),
                children,
            });
        }
    }
    Ok(sas)
}

#[cfg(test)]
mod tests {
    use super::*;

    // As printed by strongSwan 5.9.8 (LAB-NOTES.md).
    const RAW: &str = "list-sa event {segw {uniqueid=2 version=2 state=ESTABLISHED local-host=192.0.2.10 local-port=4500 local-id=segw.example remote-host=192.0.2.100 remote-port=4500 remote-id=c1.init.example initiator-spi=4e4e37654a823acb responder-spi=0356c530591cf825 nat-remote=yes nat-any=yes encr-alg=AES_CBC encr-keysize=128 integ-alg=HMAC_SHA2_256_128 prf-alg=PRF_HMAC_SHA2_256 dh-group=MODP_2048 established=7 rekey-time=14112 child-sas {net-2 {name=net uniqueid=2 reqid=1 state=INSTALLED mode=TUNNEL protocol=ESP encap=yes spi-in=c3340d08 spi-out=dd47eb40 encr-alg=AES_GCM_16 encr-keysize=128 bytes-in=336 packets-in=4 use-in=6 bytes-out=336 packets-out=4 use-out=6 rekey-time=3298 life-time=3952 install-time=8 local-ts=[10.201.0.0/24] remote-ts=[10.200.0.1/32]}}}}\nlist-sas reply {}\n";

    #[test]
    fn parses_raw_list_sas() {
        let sas = parse_list_sas(RAW).unwrap();
        assert_eq!(sas.len(), 1);
        let sa = &sas[0];
        assert_eq!(sa.conn, "segw");
        assert_eq!(sa.state, "ESTABLISHED");
        assert_eq!(sa.remote_host, "192.0.2.100");
        assert_eq!(sa.remote_port, 4500);
        assert_eq!(sa.initiator_spi, "4e4e37654a823acb");
        assert_eq!(sa.responder_spi, "0356c530591cf825");
        assert_eq!(sa.established, Some(7));
        assert_eq!(
            sa.children,
            vec![ChildSa {
                state: "INSTALLED".into(),
                spi_in: "c3340d08".into(),
                spi_out: "dd47eb40".into(),
                packets_in: 4,
                packets_out: 4,
                bytes_in: 336,
                bytes_out: 336,
                local_ts: vec!["10.201.0.0/24".into()],
                remote_ts: vec!["10.200.0.1/32".into()],
            }]
        );
    }

    #[test]
    fn empty_and_broken_output() {
        assert_eq!(parse_list_sas("list-sas reply {}\n").unwrap(), vec![]);
        assert!(parse_list_sas("list-sa event {segw {a=1").is_err());
        assert!(parse_list_sas("list-sa event {segw {l=[x }}}").is_err());
    }

    #[test]
    fn configs_name_their_files() {
        let c = strongswan_conf(Path::new("/tmp/x/s1"), "");
        assert!(c.contains("socket = unix:///tmp/x/s1/charon.vici"));
        assert!(c.contains("kernel-libipsec kernel-netlink"));
        assert!(c.contains("\n    dos_protection = no\n"), "{c}");
        let limited = strongswan_conf(Path::new("/tmp/x/s1"), &segw_limit(8));
        assert!(limited.contains("\n    ikesa_limit = 8\n"), "{limited}");
        assert!(!strongswan_conf(Path::new("/x"), &segw_limit(0)).contains("ikesa_limit"));
        let i = initiator_swanctl(
            [
                (
                    "i1",
                    Ipv4Addr::new(10, 1, 0, 1).into(),
                    Ipv4Addr::new(10, 200, 0, 1),
                ),
                (
                    "i2",
                    Ipv4Addr::new(10, 1, 0, 2).into(),
                    Ipv4Addr::new(10, 200, 0, 2),
                ),
                (
                    "i3",
                    "2001:db8:1::3".parse().unwrap(),
                    Ipv4Addr::new(10, 200, 0, 3),
                ),
            ],
            (Ipv4Addr::new(10, 2, 2, 1), "2001:db8:2::1".parse().unwrap()),
            "10.201.0.0/24",
            5,
        );
        // One connection per initiator, each from its own addresses, to
        // the VIP of its family.
        assert_eq!(i.matches("local_addrs = ").count(), 3, "{i}");
        let third = &i[i.find("    i3 {").expect("connection i3")..];
        assert!(third.contains("local_addrs = 2001:db8:1::3"), "{i}");
        assert!(third.contains("remote_addrs = 2001:db8:2::1"), "{i}");
        assert!(third.contains("local_ts = 10.200.0.3/32"), "{i}");
        let second = &i[i.find("    i2 {").expect("connection i2")..];
        assert!(second.contains("local_addrs = 10.1.0.2"), "{i}");
        assert!(second.contains("id = i2.lab"), "{i}");
        assert!(i.contains("local_ts = 10.200.0.1/32"));
        assert!(i.contains("local_ts = 10.200.0.2/32"));
        assert!(i.contains("remote_addrs = 10.2.2.1"));
        // Each child its own fixed reqid (strongSwan #1855).
        assert!(
            i.contains("reqid = 1\n") && second.contains("reqid = 2\n"),
            "{i}"
        );
        // The segws' DPD is the slower one.
        let segw = segw_swanctl(
            Ipv4Addr::new(10, 2, 2, 1),
            None,
            "10.201.0.0/24",
            "10.200.0.0/16",
            5,
        );
        assert!(segw.contains("dpd_delay = 30s"), "{segw}");
        assert!(segw.contains("local_addrs = 10.2.2.1\n"), "{segw}");
        let dual = segw_swanctl(
            Ipv4Addr::new(10, 2, 2, 1),
            Some("2001:db8:2::1".parse().unwrap()),
            "10.201.0.0/24",
            "10.200.0.0/16",
            5,
        );
        assert!(
            dual.contains("local_addrs = 10.2.2.1, 2001:db8:2::1\n"),
            "{dual}"
        );
    }
}
