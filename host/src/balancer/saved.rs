//! The tunnel table on disk, so that a restarted balancer (an upgrade, a
//! crash) moves no tunnel: every tunnel's keys (IKE SPIs, endpoints, the
//! VIP), its segw by name, how it was placed, its ages and counters. The
//! fragment map is not kept: it lives for seconds.
//!
//! The file is text: a header line, then one JSON object per tunnel.
//!
//! ```text
//! segwlb-state 1 tunnels=2 fnv64=8c1e0c1b2d36a8f1
//! {"peer":"10.1.0.1","peer_port":4500,...}
//! {"peer":"10.1.0.2","peer_port":4500,...}
//! ```
//!
//! The header carries the format's version, the number of tunnels and a
//! checksum of everything after it: a file from another version, cut
//! short, or changed is refused whole ([`StateError`]), never half
//! loaded. Pure: bytes in, tunnels out; reading and writing the file (and
//! when) is the caller's.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::affinity::Tunnel;
use super::rules::Placement;
use super::{Balancer, GwId};
use crate::control::config::{format_mac, parse_mac};
use crate::policy::{Opener, Policy, TunnelKey};
use crate::time::Timestamp;

/// The first word of a state file.
pub const MAGIC: &str = "segwlb-state";
/// The format this build writes and reads.
pub const VERSION: u32 = 1;

/// One tunnel as saved. Times are ages at the moment of saving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedTunnel {
    pub peer: IpAddr,
    pub peer_port: u16,
    pub opened_port: u16,
    pub vip: IpAddr,
    pub ike_spi: Option<u64>,
    pub responder_spi: Option<u64>,
    /// `ike`, `nat-t` or `esp`.
    pub opened_by: String,
    /// The segw, by name (ids are not stable across restarts).
    pub gateway: String,
    pub at_opening_address: bool,
    /// `guessed`, `spi-range`, `opened`, `answered`, `moved` or `confirmed`.
    pub placement: String,
    pub age_ms: u64,
    pub idle_ms: u64,
    pub next_hop: Option<String>,
    pub frames: u64,
    pub bytes: u64,
}

/// Why a state file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("not a segwlb state file (it does not start with `{MAGIC}`)")]
    NotAStateFile,
    #[error("state format {found}, this segwlb reads format {VERSION}")]
    Version { found: String },
    #[error("the header is malformed: {0}")]
    Header(String),
    #[error("cut short or padded: the header says {expected} tunnels, the file holds {found}")]
    Count { expected: usize, found: usize },
    #[error("checksum mismatch: the file changed after it was written")]
    Checksum,
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
}

/// The file's bytes for `tunnels`.
pub fn encode(tunnels: &[SavedTunnel]) -> Vec<u8> {
    let mut body = Vec::with_capacity(tunnels.len() * 256);
    for t in tunnels {
        serde_json::to_writer(&mut body, t).expect("saved tunnels serialise");
        body.push(b'\n');
    }
    let mut out = format!(
        "{MAGIC} {VERSION} tunnels={} fnv64={:016x}\n",
        tunnels.len(),
        fnv64(&body)
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// The tunnels in a state file, or why it is refused.
pub fn decode(bytes: &[u8]) -> Result<Vec<SavedTunnel>, StateError> {
    let nl = bytes.iter().position(|&b| b == b'\n');
    let (header, body) = match nl {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (bytes, &[][..]),
    };
    let header = std::str::from_utf8(header).map_err(|_| StateError::NotAStateFile)?;
    let mut words = header.split(' ');
    if words.next() != Some(MAGIC) {
        return Err(StateError::NotAStateFile);
    }
    let version = words.next().unwrap_or("");
    if version != VERSION.to_string() {
        return Err(StateError::Version {
            found: version.to_string(),
        });
    }
    let field = |w: Option<&str>, name: &str| -> Result<String, StateError> {
        w.and_then(|w| w.strip_prefix(name))
            .and_then(|w| w.strip_prefix('='))
            .map(str::to_string)
            .ok_or_else(|| StateError::Header(format!("no {name}=")))
    };
    let expected: usize = field(words.next(), "tunnels")?
        .parse()
        .map_err(|_| StateError::Header("tunnels= is not a count".into()))?;
    let sum = u64::from_str_radix(&field(words.next(), "fnv64")?, 16)
        .map_err(|_| StateError::Header("fnv64= is not hex".into()))?;
    let found = body.iter().filter(|&&b| b == b'\n').count();
    if found != expected || (!body.is_empty() && !body.ends_with(b"\n")) {
        return Err(StateError::Count { expected, found });
    }
    if fnv64(body) != sum {
        return Err(StateError::Checksum);
    }
    body.split(|&b| b == b'\n')
        .take(expected)
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_slice(line).map_err(|e| StateError::Line {
                line: i + 2,
                message: e.to_string(),
            })
        })
        .collect()
}

/// FNV-1a, 64 bits: catches a changed or damaged file (not an attacker,
/// who could write a whole new one).
fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What [`Balancer::restore`] did with a saved table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    pub loaded: usize,
    /// On a segw this balancer does not have (removed from the config).
    pub unknown_gateway: usize,
    /// Unreadable fields, or a tunnel whose SPI or endpoint another
    /// restored tunnel already has.
    pub invalid: usize,
    /// Past the table's size.
    pub table_full: usize,
}

impl std::fmt::Display for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tunnels restored; dropped: {} on gateways no longer configured, {} invalid, {} past the table's size",
            self.loaded, self.unknown_gateway, self.invalid, self.table_full
        )
    }
}

impl<P: Policy> Balancer<P> {
    /// Every tunnel in the table, as of `now`, in slot order from `from`
    /// for at most `budget` slots: the saved tunnels and where to go on
    /// (`None` once every slot was visited). Done a slice at a time by the
    /// worker, between frames.
    pub fn save_slice(
        &self,
        from: usize,
        budget: usize,
        now: Timestamp,
        out: &mut Vec<SavedTunnel>,
    ) -> Option<usize> {
        let table = self.table();
        let end = table.slots().min(from.saturating_add(budget));
        for (_, t) in table.slots_in(from..end) {
            let Some(gw) = self.gateways.get(t.gateway) else {
                continue;
            };
            out.push(saved(t, &gw.spec.name, now));
        }
        (end < table.slots()).then_some(end)
    }

    /// The whole table at once (at shutdown).
    pub fn save(&self, now: Timestamp) -> Vec<SavedTunnel> {
        let mut out = Vec::with_capacity(self.table().len());
        let mut from = Some(0);
        while let Some(at) = from {
            from = self.save_slice(at, usize::MAX, now, &mut out);
        }
        out
    }

    /// Put `saved` tunnels back into the table, each on its segw by name,
    /// as of `now`. For a balancer that has not seen a frame yet.
    pub fn restore(&mut self, saved: &[SavedTunnel], now: Timestamp) -> Restored {
        let mut done = Restored::default();
        for s in saved {
            let Some(gw) = self.gateways.by_name(&s.gateway).map(|g| g.id) else {
                done.unknown_gateway += 1;
                continue;
            };
            let Some(tunnel) = tunnel(s, gw, now) else {
                done.invalid += 1;
                continue;
            };
            let taken = tunnel
                .ike_spi
                .is_some_and(|spi| self.table.by_spi(spi).is_some())
                || self
                    .table
                    .by_endpoint(tunnel.peer, tunnel.peer_port)
                    .is_some();
            if taken {
                done.invalid += 1;
                continue;
            }
            match self.insert(tunnel) {
                Ok(_) => done.loaded += 1,
                Err(_) => done.table_full += 1,
            }
        }
        done
    }
}

pub(super) fn saved(t: &Tunnel, gateway: &str, now: Timestamp) -> SavedTunnel {
    SavedTunnel {
        peer: t.peer,
        peer_port: t.peer_port,
        opened_port: t.opened_port,
        vip: t.vip,
        ike_spi: t.ike_spi,
        responder_spi: t.responder_spi,
        opened_by: match t.opened_by {
            Opener::Ike => "ike",
            Opener::NatT => "nat-t",
            Opener::Esp => "esp",
        }
        .into(),
        gateway: gateway.into(),
        at_opening_address: t.at_opening_address(),
        placement: match t.placement() {
            Placement::Guessed => "guessed",
            Placement::SpiRange => "spi-range",
            Placement::Opened => "opened",
            Placement::Answered => "answered",
            Placement::Moved => "moved",
            Placement::Confirmed => "confirmed",
        }
        .into(),
        age_ms: millis(now.since(t.since)),
        idle_ms: millis(now.since(t.last_seen)),
        next_hop: t.next_hop.as_ref().map(format_mac),
        frames: t.frames,
        bytes: t.bytes,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The live tunnel `s` describes, on `gw`, ages counted back from `now`;
/// `None` if a field is not one this build knows.
pub(super) fn tunnel(s: &SavedTunnel, gw: GwId, now: Timestamp) -> Option<Tunnel> {
    let opened_by = match s.opened_by.as_str() {
        "ike" => Opener::Ike,
        "nat-t" => Opener::NatT,
        "esp" => Opener::Esp,
        _ => return None,
    };
    let placement = match s.placement.as_str() {
        "guessed" => Placement::Guessed,
        "spi-range" => Placement::SpiRange,
        "opened" => Placement::Opened,
        "answered" => Placement::Answered,
        "moved" => Placement::Moved,
        "confirmed" => Placement::Confirmed,
        _ => return None,
    };
    let next_hop = match &s.next_hop {
        None => None,
        Some(m) => Some(parse_mac(m)?),
    };
    let back = |ms: u64| now.before(Duration::from_millis(ms));
    let key = TunnelKey {
        peer: s.peer,
        peer_port: s.opened_port,
        vip: s.vip,
        ike_spi: s.ike_spi,
        opened_by,
    };
    let mut t = Tunnel::new(&key, gw, placement, back(s.age_ms));
    t.peer_port = s.peer_port;
    t.responder_spi = s.responder_spi;
    t.last_seen = back(s.idle_ms);
    t.next_hop = next_hop;
    t.frames = s.frames;
    t.bytes = s.bytes;
    t.restore_opening_address(s.at_opening_address);
    Some(t)
}
