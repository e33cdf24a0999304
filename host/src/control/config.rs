//! `segwlb run`'s configuration file (TOML), validated before anything
//! starts: every error names the file, line, column and dotted field, and
//! says what would be right. See `config/example.toml` for every field.
//!
//! Relative paths in the file (the policy directory, the control socket)
//! are relative to the file's own directory, so a config works from any
//! working directory.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::access::{group_id, Groups};
use crate::balancer::affinity::Timeouts;
use crate::balancer::moves::Settings as MoveSettings;
use crate::balancer::{HealthConfig, IkeSpiLabel, Prefix, SpiSteering, UplinkNextHop};
use crate::packet::Mac;
use crate::pair::{wire::MIN_KEY, PairConfig, Role};
use crate::policy::wasm::{Cache, Compiler, Limits};
use crate::toml_at::{field_at, line_column};

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// The file it came from (errors and reloads name it).
    pub file: PathBuf,
    pub uplink: Located<String>,
    /// The VIP: one address, or one of each family (dual stack), IPv4
    /// first. Probed on every segw port, announced on the uplink.
    pub vips: Vec<IpAddr>,
    pub proxy_uplink: Vec<Prefix>,
    pub proxy_gateways: Vec<Prefix>,
    pub max_tunnels: usize,
    pub timeouts: Timeouts,
    /// Where return traffic goes before a tunnel's own next hop is known
    /// (`balancer.next_hop`); `None`: the last initiator's next hop.
    pub next_hop: Option<UplinkNextHop>,
    pub control_socket: PathBuf,
    /// Who besides root and the balancer's user may use the socket.
    pub control_groups: Groups,
    /// Where the table is saved for a warm restart (at SIGTERM, on `ctl
    /// save`, every `state_interval`) and read at start.
    pub state_file: Option<PathBuf>,
    pub state_interval: Option<Duration>,
    pub metrics: Option<SocketAddr>,
    pub policy: PolicyConfig,
    /// How policies are compiled (fixed for the process's life).
    pub compiler: Compiler,
    /// `None`: probing is off (`interval_ms = 0`), every segw counts as up.
    pub health: Option<HealthConfig>,
    /// Whether the XDP fast path carries established tunnels ...
    pub fast_path: FastPathMode,
    /// ... and how its program is attached.
    pub xdp_mode: XdpMode,
    /// Graceful moves: their pace and the hook that asks a segw to move a
    /// peer (`[moves]`).
    pub moves: MovesConfig,
    /// One of a pair of balancers (`[pair]`), if it is.
    pub pair: Option<PairConfig>,
    pub gateways: Vec<GatewayConfig>,
}

/// `[moves]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MovesConfig {
    pub settings: MoveSettings,
    /// The command run per move on the old segw's behalf (see
    /// `dataplane::hook`); without it graceful moves are refused.
    pub hook: Option<Vec<String>>,
}

/// `[dataplane] xdp_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdpMode {
    /// In the stack's receive path, after the socket buffer is built: on
    /// any interface, and a redirect reaches any interface.
    #[default]
    Generic,
    /// In the driver, before any socket buffer: where the driver supports
    /// it. A redirect into a veth is then dropped unless the veth's peer
    /// has NAPI (GRO on, or an XDP program of its own).
    Native,
}

/// `[dataplane] fast_path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FastPathMode {
    /// AF_PACKET only.
    Off,
    /// The XDP fast path, or `segwlb run` refuses to start.
    Xdp,
    /// The XDP fast path where the kernel and the privileges allow it,
    /// else AF_PACKET alone (said once in the log). The default.
    #[default]
    Auto,
}

impl FastPathMode {
    /// As written in `[dataplane] fast_path`.
    pub fn name(self) -> &'static str {
        match self {
            FastPathMode::Off => "off",
            FastPathMode::Xdp => "xdp",
            FastPathMode::Auto => "auto",
        }
    }

    /// Parse what [`name`](Self::name) writes.
    pub fn parse(name: &str) -> Option<Self> {
        [FastPathMode::Off, FastPathMode::Xdp, FastPathMode::Auto]
            .into_iter()
            .find(|m| m.name() == name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    pub name: String,
    /// Where policies are found by name (and watched for changes).
    pub dir: PathBuf,
    pub params: Vec<(String, String)>,
    /// The limits of every policy ...
    pub limits: Limits,
    /// ... unless overridden by name (`[policy.limits.NAME]`): a Python or
    /// JavaScript policy carries a language runtime and needs more memory.
    pub overrides: BTreeMap<String, Limits>,
    /// Compiled policies are kept here (`None`: compiled at every load).
    pub cache: Option<PathBuf>,
}

impl PolicyConfig {
    /// The limits policy `name` runs under.
    pub fn limits_for(&self, name: &str) -> Limits {
        self.overrides.get(name).copied().unwrap_or(self.limits)
    }

    /// The component file of policy `name` in the policy directory.
    pub fn file_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.wasm"))
    }

    pub fn file(&self) -> PathBuf {
        self.file_of(&self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    pub name: String,
    pub interface: Located<String>,
    pub weight: u32,
    /// The most tunnels it may hold; 0 for no limit.
    pub capacity: u64,
    /// The traffic it can carry, bytes/s both ways; 0 for not given.
    pub throughput: u64,
    /// Static MAC; otherwise learned from the segw's ARP answers.
    pub mac: Option<Mac>,
    pub drain: bool,
    pub steering: SpiSteering,
}

/// A value with the place in the file it was written, for errors found
/// after parsing (an interface that does not exist on this host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub line: usize,
    pub column: usize,
    pub field: String,
}

impl<T> std::ops::Deref for Located<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {field}: {message}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        field: String,
        message: String,
    },
}

impl RunConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, base)
    }

    /// Parse and validate `text`, read from `file`; relative paths are
    /// taken from `base`.
    pub fn parse(text: &str, file: &Path, base: &Path) -> Result<Self, ConfigError> {
        let name = file.display().to_string();
        let at = |span: Range<usize>, field: &str, message: String| {
            let (line, column) = line_column(text, span.start);
            ConfigError::Invalid {
                file: name.clone(),
                line,
                column,
                field: field.to_string(),
                message,
            }
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            at(
                span.clone(),
                &field_at(text, span.start),
                e.message().to_string(),
            )
        })?;
        let locate = |s: &Spanned<String>, field: String| {
            let (line, column) = line_column(text, s.span().start);
            Located {
                value: s.get_ref().clone(),
                line,
                column,
                field,
            }
        };
        let b = raw.balancer;

        let prefixes = |list: &[Spanned<String>], field: &str| {
            list.iter()
                .map(|p| {
                    p.get_ref()
                        .parse::<Prefix>()
                        .map_err(|e| at(p.span(), field, e))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let proxy_uplink = prefixes(&b.proxy_uplink, "balancer.proxy_uplink")?;
        let proxy_gateways = prefixes(&b.proxy_gateways, "balancer.proxy_gateways")?;
        let vips = vips(b.vip.get_ref()).map_err(|e| at(b.vip.span(), "balancer.vip", e))?;
        if let Some(vip) = vips
            .iter()
            .find(|&&vip| !proxy_uplink.iter().any(|p| p.contains(vip)))
        {
            let ask = if vip.is_ipv4() {
                "ARP"
            } else {
                "neighbour solicitations"
            };
            return Err(at(
                b.vip.span(),
                "balancer.vip",
                format!(
                    "the VIP {vip} is outside the prefixes proxied on the uplink ({}): \
                     initiators' {ask} for it would go unanswered; add it to balancer.proxy_uplink",
                    list(&proxy_uplink)
                ),
            ));
        }
        if *b.max_tunnels.get_ref() == 0 {
            return Err(at(
                b.max_tunnels.span(),
                "balancer.max_tunnels",
                "must be at least 1".into(),
            ));
        }
        let next_hop = match &b.next_hop {
            None => None,
            Some(hop) => {
                let text = hop.get_ref().trim();
                let parsed = match parse_mac(text) {
                    Some(mac) => Some(UplinkNextHop::Mac(mac)),
                    None => text.parse().ok().map(UplinkNextHop::Address),
                };
                Some(parsed.ok_or_else(|| {
                    at(
                        hop.span(),
                        "balancer.next_hop",
                        format!(
                            "`{text}` is neither a MAC (02:aa:00:00:00:01) nor an address \
                             (192.0.2.1, fe80::1): the router initiators' traffic comes through"
                        ),
                    )
                })?)
            }
        };
        let idle = Duration::from_secs(*b.idle_timeout_s.get_ref());
        let half_open = Duration::from_secs(*b.half_open_timeout_s.get_ref());
        if half_open > idle || half_open.is_zero() {
            return Err(at(
                b.half_open_timeout_s.span(),
                "balancer.half_open_timeout_s",
                format!(
                    "must be between 1 and idle_timeout_s ({} s)",
                    idle.as_secs()
                ),
            ));
        }
        let metrics = match &b.metrics {
            None => None,
            Some(m) => {
                let addr = m.get_ref().parse::<SocketAddr>().map_err(|_| {
                    at(
                        m.span(),
                        "balancer.metrics",
                        format!("`{}` is not ADDRESS:PORT", m.get_ref()),
                    )
                })?;
                if !addr.ip().is_loopback() && !b.metrics_remote {
                    return Err(at(
                        m.span(),
                        "balancer.metrics",
                        format!(
                            "`{addr}` is not a loopback address: the metrics tell whoever \
                             reaches them your segws and tunnel counts; set \
                             balancer.metrics_remote = true to serve them there"
                        ),
                    ));
                }
                Some(addr)
            }
        };
        let group = |g: &Option<Spanned<String>>, key: &str| -> Result<Option<u32>, ConfigError> {
            g.as_ref()
                .map(|g| group_id(g.get_ref()).map_err(|e| at(g.span(), key, e)))
                .transpose()
        };
        let state_interval = match (&b.state_file, *b.state_interval_s.get_ref()) {
            (_, 0) => None,
            (Some(_), s) => Some(Duration::from_secs(s)),
            (None, _) => {
                return Err(at(
                    b.state_interval_s.span(),
                    "balancer.state_interval_s",
                    "snapshots need balancer.state_file".into(),
                ))
            }
        };
        let control_groups = Groups {
            control: group(&b.control_group, "balancer.control_group")?,
            status: group(&b.status_group, "balancer.status_group")?,
        };

        let p = raw.policy;
        let compiler = match &p.compiler {
            None => Compiler::default(),
            Some(c) => c
                .get_ref()
                .parse()
                .map_err(|e| at(c.span(), "policy.compiler", e))?,
        };
        let dir = base.join(p.dir.get_ref());
        let limits = limits_of(
            &RawLimits {
                call_timeout_ms: p.call_timeout_ms.clone(),
                setup_timeout_ms: p.setup_timeout_ms.clone(),
                memory_mib: p.memory_mib.clone(),
            },
            "policy",
            Limits::default(),
            &at,
        )?;
        let overrides = p
            .limits_by_name
            .iter()
            .map(|(name, raw)| {
                let field = format!("policy.limits.{name}");
                Ok((name.clone(), limits_of(raw, &field, limits, &at)?))
            })
            .collect::<Result<_, ConfigError>>()?;
        let policy = PolicyConfig {
            name: p.name.get_ref().clone(),
            dir,
            params: p
                .params
                .iter()
                .map(|(k, v)| (k.clone(), param_text(v)))
                .collect(),
            limits,
            overrides,
            cache: match (p.cache, &p.cache_dir) {
                (false, _) => None,
                (true, Some(dir)) => Some(base.join(dir)),
                (true, None) => Cache::default_dir(),
            },
        };
        if !policy.file().is_file() {
            return Err(at(
                p.name.span(),
                "policy.name",
                format!(
                    "no policy file {} (policies there: {})",
                    policy.file().display(),
                    available_policies(&policy.dir)
                ),
            ));
        }

        let fast_path = match &raw.dataplane.fast_path {
            None => FastPathMode::default(),
            Some(m) => FastPathMode::parse(m.get_ref()).ok_or_else(|| {
                at(
                    m.span(),
                    "dataplane.fast_path",
                    format!("`{}`: one of \"off\", \"xdp\", \"auto\"", m.get_ref()),
                )
            })?,
        };
        let xdp_mode = match raw
            .dataplane
            .xdp_mode
            .as_ref()
            .map(|m| (m, m.get_ref().as_str()))
        {
            None | Some((_, "generic")) => XdpMode::Generic,
            Some((_, "native")) => XdpMode::Native,
            Some((m, other)) => {
                return Err(at(
                    m.span(),
                    "dataplane.xdp_mode",
                    format!("`{other}`: one of \"generic\", \"native\""),
                ))
            }
        };
        let moves = moves_of(&raw.moves, &at)?;
        let pair = raw.pair.as_ref().map(|p| pair_of(p, &at)).transpose()?;
        let h = raw.health;
        let health = (*h.interval_ms.get_ref() > 0).then(|| HealthConfig {
            interval: Duration::from_millis(*h.interval_ms.get_ref()),
            down_after: h.down_after,
            up_after: h.up_after,
        });
        if health.is_some() && (h.down_after == 0 || h.up_after == 0) {
            return Err(at(
                h.interval_ms.span(),
                "health",
                "down_after and up_after must be at least 1".into(),
            ));
        }

        let uplink = locate(&b.uplink, "balancer.uplink".into());
        if raw.gateway.is_empty() {
            return Err(at(
                0..0,
                "gateway",
                "no [[gateway]]: a balancer needs at least one segw".into(),
            ));
        }
        let mut names = HashSet::new();
        let mut interfaces = HashSet::from([uplink.value.clone()]);
        let mut gateways = Vec::new();
        for (i, g) in raw.gateway.iter().enumerate() {
            let field = |f: &str| format!("gateway[{}].{f}", i + 1);
            if !names.insert(g.name.get_ref().clone()) {
                return Err(at(
                    g.name.span(),
                    &field("name"),
                    format!(
                        "a gateway named `{}` is already configured",
                        g.name.get_ref()
                    ),
                ));
            }
            if !interfaces.insert(g.interface.get_ref().clone()) {
                return Err(at(
                    g.interface.span(),
                    &field("interface"),
                    format!(
                        "interface `{}` is already used (by the uplink or another gateway); \
                         each segw needs a port of its own",
                        g.interface.get_ref()
                    ),
                ));
            }
            let mac = match &g.mac {
                None => None,
                Some(m) => Some(parse_mac(m.get_ref()).ok_or_else(|| {
                    at(
                        m.span(),
                        &field("mac"),
                        format!("`{}` is not a MAC like 02:00:5e:00:00:01", m.get_ref()),
                    )
                })?),
            };
            let ike_label = match (&g.spi_mask, &g.spi_label) {
                (None, None) => None,
                (Some(mask), Some(label)) => Some(IkeSpiLabel {
                    mask: parse_u64(mask).map_err(|m| at(mask.span(), &field("spi_mask"), m))?,
                    label: parse_u64(label).map_err(|m| at(label.span(), &field("spi_label"), m))?,
                }),
                (Some(s), None) | (None, Some(s)) => {
                    return Err(at(
                        s.span(),
                        &field("spi_mask"),
                        "spi_mask and spi_label go together (strongSwan's charon.spi_mask / charon.spi_label)".into(),
                    ))
                }
            };
            let esp_range = match (&g.spi_min, &g.spi_max) {
                (None, None) => None,
                (Some(min), Some(max)) => {
                    let lo = parse_u64(min).map_err(|m| at(min.span(), &field("spi_min"), m))?;
                    let hi = parse_u64(max).map_err(|m| at(max.span(), &field("spi_max"), m))?;
                    match (u32::try_from(lo), u32::try_from(hi)) {
                        (Ok(lo), Ok(hi)) if lo <= hi => Some((lo, hi)),
                        _ => {
                            return Err(at(
                                min.span(),
                                &field("spi_min"),
                                "need spi_min <= spi_max, both 32-bit ESP SPIs".into(),
                            ))
                        }
                    }
                }
                (Some(s), None) | (None, Some(s)) => {
                    return Err(at(
                        s.span(),
                        &field("spi_min"),
                        "spi_min and spi_max go together (strongSwan's charon.spi_min / charon.spi_max)".into(),
                    ))
                }
            };
            let throughput = match &g.throughput {
                Some(t) => crate::units::parse_rate(t.get_ref())
                    .map_err(|m| at(t.span(), &field("throughput"), m))?,
                None => 0,
            };
            gateways.push(GatewayConfig {
                name: g.name.get_ref().clone(),
                interface: locate(&g.interface, field("interface")),
                weight: g.weight,
                capacity: g.capacity,
                throughput,
                mac,
                drain: g.drain,
                steering: SpiSteering {
                    ike_label,
                    esp_range,
                },
            });
        }

        Ok(RunConfig {
            file: file.to_path_buf(),
            uplink,
            vips,
            proxy_uplink,
            proxy_gateways,
            max_tunnels: *b.max_tunnels.get_ref(),
            timeouts: Timeouts {
                idle,
                half_open,
                ..Timeouts::default()
            },
            next_hop,
            control_socket: base.join(&b.control_socket),
            control_groups,
            state_file: b.state_file.as_ref().map(|f| base.join(f)),
            state_interval,
            metrics,
            policy,
            compiler,
            health,
            fast_path,
            xdp_mode,
            moves,
            pair,
            gateways,
        })
    }

    /// Check that every interface the file names exists here (`present`:
    /// this host's interface names).
    pub fn check_interfaces(&self, present: &[String]) -> Result<(), ConfigError> {
        let named = std::iter::once(&self.uplink).chain(self.gateways.iter().map(|g| &g.interface));
        for iface in named {
            if !present.contains(&iface.value) {
                return Err(ConfigError::Invalid {
                    file: self.file.display().to_string(),
                    line: iface.line,
                    column: iface.column,
                    field: iface.field.clone(),
                    message: format!(
                        "no interface `{}` here (interfaces: {})",
                        iface.value,
                        present.join(", ")
                    ),
                });
            }
        }
        Ok(())
    }

    pub fn gateway(&self, name: &str) -> Option<&GatewayConfig> {
        self.gateways.iter().find(|g| g.name == name)
    }
}

/// `vip = "ADDRESS"` or `vip = ["ADDRESS", "ADDRESS"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The VIPs of `balancer.vip`: one or two addresses, at most one of each
/// family, IPv4 first.
fn vips(field: &OneOrMany) -> Result<Vec<IpAddr>, String> {
    let texts = match field {
        OneOrMany::One(one) => std::slice::from_ref(one),
        OneOrMany::Many(many) => many.as_slice(),
    };
    let mut vips = texts
        .iter()
        .map(|t| {
            t.parse::<IpAddr>()
                .map_err(|_| format!("`{t}` is not an IPv4 or IPv6 address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    vips.sort_by_key(|ip| ip.is_ipv6());
    match vips.as_slice() {
        [] => Err("give the VIP: an address, or one IPv4 and one IPv6 address".into()),
        [_] => Ok(vips),
        [a, b] if a.is_ipv4() != b.is_ipv4() => Ok(vips),
        _ => Err(format!(
            "{} VIPs given: at most one IPv4 and one IPv6 address (every segw owns them all)",
            vips.len()
        )),
    }
}

fn list(prefixes: &[Prefix]) -> String {
    if prefixes.is_empty() {
        return "none".into();
    }
    prefixes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn available_policies(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            if p.extension()? != "wasm" {
                return None;
            }
            Some(p.file_stem()?.to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    if names.is_empty() {
        format!("none in {}", dir.display())
    } else {
        names.join(", ")
    }
}

pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// SPI fields are often written in hex: accept `0x…` strings and integers.
fn parse_u64(v: &Spanned<IntOrHex>) -> Result<u64, String> {
    match v.get_ref() {
        IntOrHex::Int(i) => u64::try_from(*i).map_err(|_| format!("{i} is negative")),
        IntOrHex::Text(t) => {
            let digits = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X"));
            match digits {
                Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
                None => t.replace('_', "").parse(),
            }
            .map_err(|_| format!("`{t}` is not a number (decimal, or hex with 0x)"))
        }
    }
}

fn param_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

// ----- the file as written ------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    balancer: RawBalancer,
    policy: RawPolicy,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    dataplane: RawDataplane,
    #[serde(default)]
    moves: RawMoves,
    pair: Option<RawPair>,
    #[serde(default)]
    gateway: Vec<RawGateway>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPair {
    role: Spanned<String>,
    listen: Spanned<String>,
    peer: Spanned<String>,
    key: Spanned<String>,
}

fn pair_of(
    raw: &RawPair,
    at: &dyn Fn(std::ops::Range<usize>, &str, String) -> ConfigError,
) -> Result<PairConfig, ConfigError> {
    let role = Role::parse(raw.role.get_ref()).ok_or_else(|| {
        at(
            raw.role.span(),
            "pair.role",
            format!("`{}`: \"active\" or \"standby\"", raw.role.get_ref()),
        )
    })?;
    let address = |v: &Spanned<String>, key: &str| {
        v.get_ref().parse::<std::net::SocketAddr>().map_err(|_| {
            at(
                v.span(),
                key,
                format!(
                    "`{}`: an address and a port (10.255.0.1:7400, [fd00::1]:7400)",
                    v.get_ref()
                ),
            )
        })
    };
    let (listen, peer) = (
        address(&raw.listen, "pair.listen")?,
        address(&raw.peer, "pair.peer")?,
    );
    if listen.ip() == peer.ip() {
        return Err(at(
            raw.peer.span(),
            "pair.peer",
            format!(
                "the peer's address is this balancer's ({}): give the other balancer's",
                listen.ip()
            ),
        ));
    }
    let key = raw.key.get_ref().as_bytes().to_vec();
    if key.len() < MIN_KEY {
        return Err(at(
            raw.key.span(),
            "pair.key",
            format!(
                "{} bytes: the pair's shared key needs at least {MIN_KEY}",
                key.len()
            ),
        ));
    }
    Ok(PairConfig {
        role,
        listen,
        peer,
        key,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMoves {
    per_second: Option<Spanned<f64>>,
    timeout_s: Option<Spanned<f64>>,
    linger_s: Option<Spanned<f64>>,
    hook: Option<Spanned<Vec<String>>>,
}

fn moves_of(
    raw: &RawMoves,
    at: &dyn Fn(std::ops::Range<usize>, &str, String) -> ConfigError,
) -> Result<MovesConfig, ConfigError> {
    let d = MoveSettings::default();
    let positive = |v: &Option<Spanned<f64>>, key: &str, default: f64| match v {
        None => Ok(default),
        Some(v) if v.get_ref().is_finite() && *v.get_ref() > 0.0 => Ok(*v.get_ref()),
        Some(v) => Err(at(
            v.span(),
            &format!("moves.{key}"),
            "must be a number above 0".into(),
        )),
    };
    let settings = MoveSettings {
        per_second: positive(&raw.per_second, "per_second", d.per_second)?,
        timeout: Duration::from_secs_f64(positive(
            &raw.timeout_s,
            "timeout_s",
            d.timeout.as_secs_f64(),
        )?),
        linger: Duration::from_secs_f64(positive(
            &raw.linger_s,
            "linger_s",
            d.linger.as_secs_f64(),
        )?),
        ..d
    };
    let hook = match &raw.hook {
        None => None,
        Some(h) => {
            crate::dataplane::hook::check(h.get_ref())
                .map_err(|e| at(h.span(), "moves.hook", e))?;
            Some(h.get_ref().clone())
        }
    };
    Ok(MovesConfig { settings, hook })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBalancer {
    uplink: Spanned<String>,
    vip: Spanned<OneOrMany>,
    proxy_uplink: Vec<Spanned<String>>,
    #[serde(default)]
    proxy_gateways: Vec<Spanned<String>>,
    #[serde(default = "max_tunnels")]
    max_tunnels: Spanned<usize>,
    #[serde(default = "idle_timeout_s")]
    idle_timeout_s: Spanned<u64>,
    #[serde(default = "half_open_timeout_s")]
    half_open_timeout_s: Spanned<u64>,
    /// The uplink's next hop: a MAC, or an address resolved on the uplink.
    next_hop: Option<Spanned<String>>,
    #[serde(default = "control_socket")]
    control_socket: PathBuf,
    /// Members may do anything on the control socket (name or gid).
    control_group: Option<Spanned<String>>,
    /// Members may ask for status (name or gid).
    status_group: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    /// Serve metrics on a non-loopback address.
    #[serde(default)]
    metrics_remote: bool,
    /// The warm-restart state file.
    state_file: Option<PathBuf>,
    /// Seconds between snapshots of the table (0: only at SIGTERM and on
    /// `ctl save`).
    #[serde(default = "no_snapshots")]
    state_interval_s: Spanned<u64>,
}

fn max_tunnels() -> Spanned<usize> {
    Spanned::new(0..0, 1 << 20)
}
fn idle_timeout_s() -> Spanned<u64> {
    Spanned::new(0..0, Timeouts::default().idle.as_secs())
}
fn half_open_timeout_s() -> Spanned<u64> {
    Spanned::new(0..0, Timeouts::default().half_open.as_secs())
}
fn no_snapshots() -> Spanned<u64> {
    Spanned::new(0..0, 0)
}
fn control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

/// Where `segwlb run` listens and `segwlb ctl` connects unless told.
pub const DEFAULT_SOCKET: &str = "/run/segwlb.sock";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Spanned<String>,
    #[serde(default = "policy_dir")]
    dir: Spanned<PathBuf>,
    #[serde(default)]
    params: BTreeMap<String, toml::Value>,
    call_timeout_ms: Option<Spanned<u64>>,
    setup_timeout_ms: Option<Spanned<u64>>,
    memory_mib: Option<Spanned<usize>>,
    /// `[policy.limits.NAME]`: one policy's own limits.
    #[serde(default, rename = "limits")]
    limits_by_name: BTreeMap<String, RawLimits>,
    #[serde(default)]
    compiler: Option<Spanned<String>>,
    #[serde(default = "yes")]
    cache: bool,
    #[serde(default)]
    cache_dir: Option<PathBuf>,
}

/// Limits as written; absent fields take the enclosing defaults.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    call_timeout_ms: Option<Spanned<u64>>,
    setup_timeout_ms: Option<Spanned<u64>>,
    memory_mib: Option<Spanned<usize>>,
}

fn yes() -> bool {
    true
}

/// `raw` over `defaults`; `field` names the table in errors.
fn limits_of(
    raw: &RawLimits,
    field: &str,
    defaults: Limits,
    at: &impl Fn(Range<usize>, &str, String) -> ConfigError,
) -> Result<Limits, ConfigError> {
    let ms = |v: &Option<Spanned<u64>>, name: &str, default: Duration| match v {
        None => Ok(default),
        Some(v) if *v.get_ref() == 0 => Err(at(
            v.span(),
            &format!("{field}.{name}"),
            "must be at least 1".into(),
        )),
        Some(v) => Ok(Duration::from_millis(*v.get_ref())),
    };
    let memory = match &raw.memory_mib {
        None => defaults.memory,
        Some(v) if *v.get_ref() == 0 || *v.get_ref() > 4096 => {
            return Err(at(
                v.span(),
                &format!("{field}.memory_mib"),
                "must be between 1 and 4096".into(),
            ))
        }
        Some(v) => *v.get_ref() << 20,
    };
    Ok(Limits {
        call: ms(&raw.call_timeout_ms, "call_timeout_ms", defaults.call)?,
        setup: ms(&raw.setup_timeout_ms, "setup_timeout_ms", defaults.setup)?,
        memory,
    })
}

fn policy_dir() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from("policies"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHealth {
    interval_ms: Spanned<u64>,
    down_after: u32,
    up_after: u32,
}

impl Default for RawHealth {
    fn default() -> Self {
        let d = HealthConfig::default();
        RawHealth {
            interval_ms: Spanned::new(0..0, d.interval.as_millis() as u64),
            down_after: d.down_after,
            up_after: d.up_after,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    fast_path: Option<Spanned<String>>,
    xdp_mode: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    name: Spanned<String>,
    interface: Spanned<String>,
    #[serde(default = "weight")]
    weight: u32,
    /// Tunnels it may hold (a licence or memory limit); 0 = no limit.
    #[serde(default)]
    capacity: u64,
    /// Traffic it can carry, e.g. "4 Gbps".
    throughput: Option<Spanned<String>>,
    mac: Option<Spanned<String>>,
    #[serde(default)]
    drain: bool,
    spi_mask: Option<Spanned<IntOrHex>>,
    spi_label: Option<Spanned<IntOrHex>>,
    spi_min: Option<Spanned<IntOrHex>>,
    spi_max: Option<Spanned<IntOrHex>>,
}

fn weight() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrHex {
    Int(i64),
    Text(String),
}

#[cfg(test)]
mod tests;
