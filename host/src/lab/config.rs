//! The lab file (`config/lab.toml`): how many initiators and segws, the
//! addressing, the balancer's policy. Every address it names exists only
//! inside the lab's namespaces.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::control::config::FastPathMode;

use super::Error;

/// An IPv4 prefix `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Prefix {
    fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.network())
    }

    pub fn overlaps(&self, other: &Prefix) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }

    /// The last host address (before the broadcast address).
    pub fn last_host(&self) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.len));
        self.host(u32::try_from(size.checked_sub(2)?).ok()?)
    }

    /// The `n`th host address (1 = the first after the network address),
    /// if it is inside the prefix and not its broadcast address.
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.len));
        (u64::from(n) + 1 < size).then(|| Ipv4Addr::from(u32::from(self.network()) + n))
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network(), self.len)
    }
}

impl TryFrom<String> for Prefix {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IPv4 prefix like 10.1.0.0/16");
        let (a, l) = s.split_once('/').ok_or_else(bad)?;
        let addr = a.parse().map_err(|_| bad())?;
        let len: u8 = l.parse().map_err(|_| bad())?;
        if len > 32 {
            return Err(bad());
        }
        Ok(Prefix { addr, len })
    }
}

impl From<Prefix> for String {
    fn from(p: Prefix) -> String {
        p.to_string()
    }
}

/// An IPv6 prefix `2001:db8:1::/64`, for the initiators that come over
/// IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Prefix6 {
    pub addr: Ipv6Addr,
    pub len: u8,
}

impl Prefix6 {
    fn mask(&self) -> u128 {
        u128::MAX
            .checked_shl(128 - u32::from(self.len))
            .unwrap_or(0)
    }

    pub fn network(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr) & self.mask())
    }

    pub fn contains(&self, a: Ipv6Addr) -> bool {
        u128::from(a) & self.mask() == u128::from(self.network())
    }

    /// The `n`th address after the network address, if inside the prefix.
    pub fn host(&self, n: u32) -> Option<Ipv6Addr> {
        let size_bits = 128 - u32::from(self.len);
        let fits = size_bits >= 32 || u128::from(n) < (1u128 << size_bits);
        fits.then(|| Ipv6Addr::from(u128::from(self.network()) + u128::from(n)))
    }
}

impl std::fmt::Display for Prefix6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network(), self.len)
    }
}

impl TryFrom<String> for Prefix6 {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IPv6 prefix like 2001:db8:1::/64");
        let (a, l) = s.split_once('/').ok_or_else(bad)?;
        let addr = a.parse().map_err(|_| bad())?;
        let len: u8 = l.parse().map_err(|_| bad())?;
        if len > 128 {
            return Err(bad());
        }
        Ok(Prefix6 { addr, len })
    }
}

impl From<Prefix6> for String {
    fn from(p: Prefix6) -> String {
        p.to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabConfig {
    pub lab: LabSection,
    #[serde(default)]
    pub addresses: Addresses,
    #[serde(default)]
    pub balancer: BalancerSection,
    #[serde(default = "default_segws")]
    pub segw: Vec<SegwSection>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabSection {
    /// Namespace names start with `PREFIX-`; `lab down` removes every
    /// namespace that does.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Configurations, logs, sockets, the state file. Not under /run: every
    /// charon gets a private /run.
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    /// Tunnels: one initiator each, with its own outer and inner address.
    pub initiators: u32,
    /// Initiators per namespace and charon: 1 gives each its own (a host
    /// per initiator); K packs K of them into one charon, one connection
    /// each, every one from its own outer and inner address. Unset: see
    /// [`LabSection::packing`].
    #[serde(default)]
    pub per_charon: Option<u32>,
    #[serde(default = "default_dpd")]
    pub dpd_delay_s: u32,
    /// Pings through each tunnel in `lab run`.
    #[serde(default = "default_pings")]
    pub pings: u32,
    /// The last `nat` initiators sit behind one NAT namespace (nftables
    /// source NAT, a fixed pair of UDP ports per initiator from 40000 up).
    #[serde(default)]
    pub nat: u32,
    /// The first `ipv6` initiators come over IPv6 (their outer address in
    /// `outer6_prefix`, to `vip6`); the lab is then dual-stack: the segws
    /// own both VIPs, the balancer serves both. Not behind the NAT.
    #[serde(default)]
    pub ipv6: u32,
    /// `segwlb run` instances in front of the segws: 1, or 2 for an
    /// active/standby pair on the same segments (keepalived's VRRP decides
    /// which one is active; see `topology`).
    #[serde(default = "one")]
    pub balancers: u32,
}

impl LabSection {
    /// Whether the lab runs an active/standby pair of balancers.
    pub fn pair(&self) -> bool {
        self.balancers == 2
    }

    /// Initiators per charon: `per_charon`, else one each for a small lab
    /// and [`PACKED`] for a large one.
    pub fn packing(&self) -> u32 {
        self.per_charon
            .unwrap_or(if self.initiators <= OWN_CHARON_UP_TO {
                1
            } else {
                PACKED
            })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Addresses {
    /// The address every segw owns.
    pub vip: Ipv4Addr,
    /// The balancer answers ARP for it on the uplink (proxy_uplink).
    pub vip_prefix: Prefix,
    /// Initiator n's outer address is host n of this prefix (proxy_gateways).
    pub outer_prefix: Prefix,
    /// Initiator n's inner address (on its lo) is host n of this prefix.
    pub inner_prefix: Prefix,
    /// The data-centre side: an address on every segw's lo ...
    pub service: Ipv4Addr,
    /// ... inside the initiators' remote_ts (the segws' local_ts).
    pub service_prefix: Prefix,
    /// Behind the NAT: its inside address is host 1, the j-th NAT'd
    /// initiator's outer address host j + 1. The NAT's outside address is
    /// host `initiators + 1` of outer_prefix.
    #[serde(default = "default_nat_prefix")]
    pub nat_prefix: Prefix,
    /// The VIP's IPv6 address, for initiators over IPv6 (`lab.ipv6`).
    #[serde(default = "default_vip6")]
    pub vip6: Ipv6Addr,
    /// Initiator n over IPv6 has host n of this prefix as its outer
    /// address (proxy_gateways). The segws' next hop towards them is
    /// host [`NEXT_HOP6`].
    #[serde(default = "default_outer6_prefix")]
    pub outer6_prefix: Prefix6,
    /// A pair's sync link between the two balancers: host 1 and 2 are
    /// theirs (replication listens there), host 3 is keepalived's address
    /// on the active one.
    #[serde(default = "default_sync_prefix")]
    pub sync_prefix: Prefix,
}

/// Host number of the segws' IPv6 next hop towards the initiators (past
/// any initiator: at most [`MAX_INITIATORS`]).
pub const NEXT_HOP6: u32 = 0xffff;

fn default_vip6() -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1)
}

fn default_outer6_prefix() -> Prefix6 {
    Prefix6::try_from("2001:db8:1::/64".to_string()).expect("valid default")
}

fn default_nat_prefix() -> Prefix {
    // The shared address space carrier-grade NATs use (RFC 6598): room
    // for thousands behind the lab's one NAT.
    Prefix::try_from("100.64.0.0/16".to_string()).expect("valid default")
}

fn default_sync_prefix() -> Prefix {
    Prefix::try_from("10.255.0.0/29".to_string()).expect("valid default")
}

impl Default for Addresses {
    fn default() -> Self {
        let p = |s: &str| Prefix::try_from(s.to_string()).expect("valid default");
        Addresses {
            vip: Ipv4Addr::new(10, 2, 2, 1),
            vip_prefix: p("10.2.2.0/24"),
            outer_prefix: p("10.1.0.0/16"),
            inner_prefix: p("10.200.0.0/16"),
            service: Ipv4Addr::new(10, 201, 0, 1),
            service_prefix: p("10.201.0.0/24"),
            nat_prefix: default_nat_prefix(),
            vip6: default_vip6(),
            outer6_prefix: default_outer6_prefix(),
            sync_prefix: default_sync_prefix(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerSection {
    /// policies/NAME.wasm
    #[serde(default = "default_policy")]
    pub policy: String,
    /// Relative to the lab file.
    #[serde(default = "default_policy_dir")]
    pub policy_dir: PathBuf,
    #[serde(default = "default_interval")]
    pub health_interval_ms: u64,
    #[serde(default = "default_down_after")]
    pub health_down_after: u32,
    /// The balancer's `[dataplane] fast_path` (its default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fast_path: Option<FastPathMode>,
}

impl Default for BalancerSection {
    fn default() -> Self {
        BalancerSection {
            policy: default_policy(),
            policy_dir: default_policy_dir(),
            health_interval_ms: default_interval(),
            health_down_after: default_down_after(),
            fast_path: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegwSection {
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Tunnels it may hold, in the balancer's config and as its charon's
    /// own `ikesa_limit`; 0 for no limit.
    #[serde(default)]
    pub capacity: u64,
    /// The traffic it can carry, both ways (`"4 Gbps"`), in the balancer's
    /// config: what its utilization is measured against.
    #[serde(default)]
    pub throughput: Option<String>,
}

impl SegwSection {
    /// Its throughput in bytes/s; 0 when not given. (Checked by
    /// `validate`.)
    pub fn throughput_bytes(&self) -> u64 {
        self.throughput
            .as_deref()
            .and_then(|t| crate::units::parse_rate(t).ok())
            .unwrap_or(0)
    }
}

fn default_prefix() -> String {
    "sglab".into()
}
fn default_dpd() -> u32 {
    5
}
fn default_pings() -> u32 {
    3
}
fn default_policy() -> String {
    "round-robin".into()
}
fn default_policy_dir() -> PathBuf {
    "../policies".into()
}
fn default_interval() -> u64 {
    500
}
fn default_down_after() -> u32 {
    3
}
fn default_weight() -> u32 {
    1
}
fn one() -> u32 {
    1
}
fn default_segws() -> Vec<SegwSection> {
    (1..=3)
        .map(|n| SegwSection {
            capacity: 0,
            name: format!("segw{n}"),
            weight: 1,
            throughput: None,
        })
        .collect()
}

/// Most initiators a lab takes: with `per_charon` > 1, ~2.5 MB of charon
/// and kernel per tunnel; the NAT's 10,000 ports hold 5,000 NAT'd ones.
pub const MAX_INITIATORS: u32 = 5_000;
/// Most initiators in one charon.
pub const MAX_PER_CHARON: u32 = 1_000;
/// Up to this many initiators an unset `lab.per_charon` gives each its
/// own charon; beyond, [`PACKED`] to a charon (see README, "The lab at
/// scale": one charon per initiator costs ~2.6 MB and slows every
/// initiation past a few hundred).
pub const OWN_CHARON_UP_TO: u32 = 50;
pub const PACKED: u32 = 50;
/// Host number of keepalived's address in `sync_prefix` (the balancers
/// are hosts 1 and 2).
pub const SYNC_VRRP: u32 = 3;
/// Most segws (one balancer port each).
pub const MAX_SEGWS: usize = 16;

impl LabConfig {
    /// Read and check `path`; the policy directory is made absolute
    /// relative to the file.
    pub fn load(path: &Path) -> Result<LabConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            what: format!("read {}", path.display()),
            source,
        })?;
        let mut c = LabConfig::parse(&text).map_err(|msg| Error::Config {
            path: path.to_path_buf(),
            msg,
        })?;
        if c.balancer.policy_dir.is_relative() {
            let base = path.parent().unwrap_or(Path::new("."));
            let dir = base.join(&c.balancer.policy_dir);
            c.balancer.policy_dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        }
        Ok(c)
    }

    pub fn parse(text: &str) -> Result<LabConfig, String> {
        let c: LabConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.check()?;
        Ok(c)
    }

    /// Everything a lab needs of this file, or what is wrong with it.
    pub fn check(&self) -> Result<(), String> {
        let p = &self.lab.prefix;
        if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(format!(
                "lab.prefix {p:?}: 1 to 8 letters or digits (namespace names are PREFIX-i5000)"
            ));
        }
        if self.lab.initiators == 0 || self.lab.initiators > MAX_INITIATORS {
            return Err(format!("lab.initiators must be 1..={MAX_INITIATORS}"));
        }
        if self
            .lab
            .per_charon
            .is_some_and(|k| k == 0 || k > MAX_PER_CHARON)
        {
            return Err(format!("lab.per_charon must be 1..={MAX_PER_CHARON}"));
        }
        if !(1..=2).contains(&self.lab.balancers) {
            return Err(format!(
                "lab.balancers = {}: a lab runs 1 balancer, or 2 as an active/standby pair",
                self.lab.balancers
            ));
        }
        if self.segw.is_empty() || self.segw.len() > MAX_SEGWS {
            return Err(format!("1..={MAX_SEGWS} [[segw]] sections"));
        }
        for (i, s) in self.segw.iter().enumerate() {
            let ok = !s.name.is_empty()
                && s.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(format!("segw name {:?}: letters, digits, - and _", s.name));
            }
            if self.segw[..i].iter().any(|o| o.name == s.name) {
                return Err(format!("two segws named {:?}", s.name));
            }
            if let Some(t) = &s.throughput {
                crate::units::parse_rate(t)
                    .map_err(|m| format!("segw {:?} throughput: {m}", s.name))?;
            }
        }
        let a = &self.addresses;
        if !a.vip_prefix.contains(a.vip) {
            return Err(format!(
                "vip {} is not in vip_prefix {}",
                a.vip, a.vip_prefix
            ));
        }
        if !a.service_prefix.contains(a.service) {
            return Err(format!(
                "service {} is not in service_prefix {}",
                a.service, a.service_prefix
            ));
        }
        let named = [
            ("vip_prefix", a.vip_prefix),
            ("outer_prefix", a.outer_prefix),
            ("inner_prefix", a.inner_prefix),
            ("service_prefix", a.service_prefix),
            ("nat_prefix", a.nat_prefix),
            ("sync_prefix", a.sync_prefix),
        ];
        for (i, (n1, p1)) in named.iter().enumerate() {
            for (n2, p2) in &named[i + 1..] {
                if p1.overlaps(p2) {
                    // Inner must differ from outer, or the segw refuses the
                    // traffic selector (TS_UNACCEPTABLE).
                    return Err(format!("{n1} {p1} overlaps {n2} {p2}"));
                }
            }
        }
        if self.lab.pair() && a.sync_prefix.host(SYNC_VRRP).is_none() {
            return Err(format!(
                "sync_prefix {} has no room for the two balancers and keepalived's address (a /29 has)",
                a.sync_prefix
            ));
        }
        if self.lab.nat > self.lab.initiators {
            return Err("lab.nat is more than lab.initiators".into());
        }
        if self.lab.ipv6 > self.lab.initiators - self.lab.nat {
            return Err(format!(
                "lab.ipv6 is {}, but only {} initiators are not behind the NAT",
                self.lab.ipv6,
                self.lab.initiators - self.lab.nat
            ));
        }
        if a.outer6_prefix.host(NEXT_HOP6).is_none() || a.outer6_prefix.contains(a.vip6) {
            return Err(format!(
                "outer6_prefix {} must hold {} hosts and not the VIP {}",
                a.outer6_prefix, NEXT_HOP6, a.vip6
            ));
        }
        if self.lab.nat > 0 && a.nat_prefix.host(self.lab.nat + 1).is_none() {
            return Err(format!(
                "nat_prefix {} has no room for {} NAT'd initiators",
                a.nat_prefix, self.lab.nat
            ));
        }
        // The segws' next hop towards the initiators is the outer prefix's
        // last host (one neighbour entry, not one per initiator).
        let room = matches!(
            (a.outer_prefix.host(self.lab.initiators + 2), a.outer_prefix.last_host()),
            (Some(nat), Some(next_hop)) if nat < next_hop
        );
        if !room {
            return Err(format!(
                "outer_prefix {} has no room for {} initiators, the NAT and the segws' next hop",
                a.outer_prefix, self.lab.initiators
            ));
        }
        for (what, p) in [
            ("outer_prefix", a.outer_prefix),
            ("inner_prefix", a.inner_prefix),
        ] {
            if p.host(self.lab.initiators + 1).is_none() {
                return Err(format!(
                    "{what} {p} has no room for {} initiators",
                    self.lab.initiators
                ));
            }
        }
        Ok(())
    }

    pub fn work_dir(&self) -> PathBuf {
        self.lab
            .work_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/segwlb-lab-{}", self.lab.prefix)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_lab_file_parses() {
        let text = include_str!("../../../config/lab.toml");
        let c = LabConfig::parse(text).unwrap();
        assert_eq!(c.lab.initiators, 12);
        assert_eq!(c.segw.len(), 3);
        assert!(c.lab.ipv6 > 0, "the default lab is dual-stack");
    }

    #[test]
    fn ipv6_prefixes_and_shares() {
        let p = Prefix6::try_from("2001:db8:1::/64".to_string()).unwrap();
        assert_eq!(p.host(5), Some("2001:db8:1::5".parse().unwrap()));
        assert!(p.contains("2001:db8:1::ffff".parse().unwrap()));
        assert!(!p.contains("2001:db8:2::1".parse().unwrap()));
        let small = Prefix6::try_from("2001:db8:1::/120".to_string()).unwrap();
        assert_eq!(small.host(256), None);
        assert!(Prefix6::try_from("10.1.0.0/16".to_string()).is_err());
        let e = LabConfig::parse("[lab]\ninitiators = 4\nnat = 2\nipv6 = 3\n").unwrap_err();
        assert!(
            e.contains("only 2 initiators are not behind the NAT"),
            "{e}"
        );
        let e = LabConfig::parse(
            "[lab]\ninitiators = 4\nipv6 = 1\n[addresses]\nvip = \"10.2.2.1\"\n\
             vip_prefix = \"10.2.2.0/24\"\nouter_prefix = \"10.1.0.0/16\"\n\
             inner_prefix = \"10.200.0.0/16\"\nservice = \"10.201.0.1\"\n\
             service_prefix = \"10.201.0.0/24\"\nouter6_prefix = \"2001:db8:1::/120\"\n",
        )
        .unwrap_err();
        assert!(e.contains("outer6_prefix"), "{e}");
    }

    #[test]
    fn prefixes() {
        let p = Prefix::try_from("10.1.0.0/16".to_string()).unwrap();
        assert!(p.contains(Ipv4Addr::new(10, 1, 200, 3)));
        assert!(!p.contains(Ipv4Addr::new(10, 2, 0, 1)));
        assert_eq!(p.host(1), Some(Ipv4Addr::new(10, 1, 0, 1)));
        assert_eq!(p.host(65535), None);
        let q = Prefix::try_from("10.1.2.0/24".to_string()).unwrap();
        assert!(p.overlaps(&q) && q.overlaps(&p));
        assert!(Prefix::try_from("10.1.0.0".to_string()).is_err());
        assert!(Prefix::try_from("10.1.0.0/33".to_string()).is_err());
    }

    #[test]
    fn checks_say_what_is_wrong() {
        let base = "[lab]\ninitiators = 4\n";
        assert!(LabConfig::parse(base).is_ok());
        let e = LabConfig::parse("[lab]\ninitiators = 4\nprefix = \"a-b\"\n").unwrap_err();
        assert!(e.contains("prefix"), "{e}");
        let e = LabConfig::parse(&format!(
            "{base}[addresses]\nvip = \"10.2.2.1\"\nvip_prefix = \"10.2.2.0/24\"\n\
             outer_prefix = \"10.1.0.0/16\"\ninner_prefix = \"10.1.5.0/24\"\n\
             service = \"10.201.0.1\"\nservice_prefix = \"10.201.0.0/24\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
        let e = LabConfig::parse("[lab]\ninitiators = 0\n").unwrap_err();
        assert!(e.contains("initiators"), "{e}");
    }

    #[test]
    fn a_lab_runs_one_balancer_or_a_pair() {
        let one = LabConfig::parse("[lab]\ninitiators = 4\n").unwrap();
        assert!(!one.lab.pair());
        let pair = LabConfig::parse("[lab]\ninitiators = 4\nbalancers = 2\n").unwrap();
        assert!(pair.lab.pair());
        assert_eq!(
            pair.addresses.sync_prefix.host(SYNC_VRRP),
            Some(Ipv4Addr::new(10, 255, 0, 3))
        );
        for n in [0, 3] {
            let e =
                LabConfig::parse(&format!("[lab]\ninitiators = 4\nbalancers = {n}\n")).unwrap_err();
            assert!(
                e.contains(&format!("lab.balancers = {n}: a lab runs 1 balancer, or 2")),
                "{e}"
            );
        }
        let addresses = "[addresses]\nvip = \"10.2.2.1\"\nvip_prefix = \"10.2.2.0/24\"\n\
             outer_prefix = \"10.1.0.0/16\"\ninner_prefix = \"10.200.0.0/16\"\n\
             service = \"10.201.0.1\"\nservice_prefix = \"10.201.0.0/24\"\n";
        let e = LabConfig::parse(&format!(
            "[lab]\ninitiators = 4\nbalancers = 2\n{addresses}sync_prefix = \"10.255.0.0/30\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("sync_prefix 10.255.0.0/30 has no room"), "{e}");
        let e = LabConfig::parse(&format!(
            "[lab]\ninitiators = 4\n{addresses}sync_prefix = \"10.1.255.0/29\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("overlaps sync_prefix"), "{e}");
    }
}
