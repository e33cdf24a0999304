//! The fast path's share of the rules: which frames a kernel program may
//! forward without asking the core, and where to. Pure: computed from the
//! table with the core's own lookups ([`AffinityTable::find`]), so a frame
//! the fast path forwards is one the core would have forwarded the same
//! way, with the same two MACs, and changes nothing the core keeps but
//! counters and ages (which the host reads back).
//!
//! Only a tunnel its segw has confirmed (`Placement::Confirmed`), on a
//! segw that is up and whose MAC is known, with a next hop back: every
//! other state can change on the next frame (a guess a segw corrects, a
//! failed segw's tunnels re-placed), so those frames go to the core. Per
//! such tunnel:
//!
//! - ESP in UDP both ways, by the tunnel's endpoint (address, port), when
//!   the endpoint index finds this tunnel there;
//! - raw ESP both ways, by the address, when the address lookup raw ESP
//!   uses finds this tunnel (a tunnel on IKE port 500 sends raw ESP).
//!
//! IKE never: from the initiator it can prove the tunnel (and move its next
//! hop), from the segw it teaches SPIs. Nor fragments, ICMP errors, NAT
//! keepalives, VLAN-tagged frames.
//!
//! SPI-range steering: the program also holds the healthy segws' ESP SPI
//! ranges ([`fast_path_spi_ranges`](Balancer::fast_path_spi_ranges)). From
//! the uplink, an SPI in a range speaks for that segw; the core sends a
//! confirmed tunnel's frame to the tunnel's segw all the same, counting it
//! as steered when the two agree and as overruled when not. The program
//! forwards only the first kind (and counts it steered), and leaves the
//! second to the core. With more ranges than it can check
//! ([`MAX_SPI_RANGES`]), nothing is fast.
//!
//! [`AffinityTable::find`]: super::affinity::AffinityTable::find

use std::net::IpAddr;

use super::affinity::TunnelId;
use super::rules::{Find, Keys, Placement};
use super::{Balancer, PortId, UPLINK};
use crate::packet::Mac;
use crate::policy::Policy;
use crate::time::Timestamp;

/// The most segws with an ESP SPI range the kernel program checks (its
/// `spi_ranges` array); with more, the fast path holds nothing.
pub const MAX_SPI_RANGES: usize = 16;

/// A healthy segw's ESP SPI range: from the uplink, an SPI in it speaks
/// for the segw behind `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpiRange {
    pub min: u32,
    pub max: u32,
    pub port: PortId,
}

/// Which way a frame goes, and so which of its addresses is the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Initiator → segw, keyed by the source.
    Up,
    /// Segw → initiator, keyed by the destination.
    Down,
}

/// One entry of the fast path: a frame that comes in on `ingress` going
/// `direction`, whose peer is `addr` (and UDP `port`; 0 for raw ESP), goes
/// out of `egress` with these MACs, counted on `tunnel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FastEntry {
    pub direction: Direction,
    pub addr: IpAddr,
    pub port: u16,
    pub tunnel: TunnelId,
    pub ingress: PortId,
    pub egress: PortId,
    pub dst: Mac,
    pub src: Mac,
}

impl<P: Policy> Balancer<P> {
    /// Moves on whenever what [`fast_path`](Self::fast_path) returns may
    /// have changed (a tunnel added, removed, moved, rebound or confirmed; a
    /// next hop; a segw's health, MAC or the set); frames that only age
    /// and count tunnels leave it. A copy of the entries is current while
    /// this is the same as when it was taken.
    pub fn epoch(&self) -> u64 {
        self.table.epoch().wrapping_add(self.epoch)
    }

    /// The fast path forwarded `frames` and `bytes` of tunnel `id` ([0]
    /// towards its segw, [1] back), `steered` of them by their SPI's
    /// range, last at `now`: counted as the core counts what it forwards
    /// itself, and the tunnel is not idle.
    pub fn fast_path_forwarded(
        &mut self,
        id: TunnelId,
        frames: [u64; 2],
        bytes: [u64; 2],
        steered: u64,
        now: Timestamp,
    ) {
        let total = frames[0] + frames[1];
        self.counters.forwarded += total;
        self.counters.fast_path += total;
        self.counters.steered += steered;
        let Some(t) = self.table.get_mut(id) else {
            return;
        };
        t.last_seen = t.last_seen.max(now);
        t.frames += frames[0];
        t.bytes += bytes[0];
        t.frames_back += frames[1];
        t.bytes_back += bytes[1];
        let gw = t.gateway;
        if let Some(g) = self.gateways.get_mut(gw) {
            g.counters.frames_to += frames[0];
            g.counters.bytes_to += bytes[0];
            g.counters.frames_from += frames[1];
            g.counters.bytes_from += bytes[1];
        }
    }

    /// Every entry the fast path may hold now (see the module's doc).
    pub fn fast_path(&self) -> Vec<FastEntry> {
        let mut entries = Vec::new();
        for (id, t) in self.table.iter() {
            let udp = (t.peer_port != 0).then_some(t.peer_port);
            for port in udp.into_iter().chain([0]) {
                // An address several tunnels share is listed once, by the
                // tunnel it finds.
                if let Some(pair) = self
                    .fast_path_at(t.peer, port)
                    .filter(|p| p[0].tunnel == id)
                {
                    entries.extend(pair);
                }
            }
        }
        entries
    }

    /// The endpoints at which the tunnels in `budget` slots from `from` may
    /// have entries (each tunnel's UDP endpoint, and its address for raw
    /// ESP), into `out`: a full resync ([`fast_path`](Self::fast_path) a
    /// slice at a time) looks at each with
    /// [`fast_path_at`](Self::fast_path_at). The slot to go on from, or
    /// `None` once past the last.
    pub fn fast_path_keys(
        &self,
        from: usize,
        budget: usize,
        out: &mut Vec<(IpAddr, u16)>,
    ) -> Option<usize> {
        let end = self.table.slots().min(from.saturating_add(budget));
        for (_, t) in self.table.slots_in(from..end) {
            if t.peer_port != 0 {
                out.push((t.peer, t.peer_port));
            }
            out.push((t.peer, 0));
        }
        (end < self.table.slots()).then_some(end)
    }

    /// The ESP SPI ranges of the healthy segws, in the order SPI-range
    /// steering tries them (the first that owns an SPI speaks for it);
    /// `None` when there are more than [`MAX_SPI_RANGES`] (the fast path
    /// then holds nothing).
    pub fn fast_path_spi_ranges(&self) -> Option<Vec<SpiRange>> {
        if self.standby {
            return Some(Vec::new());
        }
        let ranges: Vec<SpiRange> = self.spi_ranges().collect();
        (ranges.len() <= MAX_SPI_RANGES).then_some(ranges)
    }

    /// What `spi_owner` checks for ESP, in its order.
    fn spi_ranges(&self) -> impl Iterator<Item = SpiRange> + '_ {
        self.gateways.iter().filter(|g| g.healthy).filter_map(|g| {
            let (min, max) = g.spec.steering.esp_range?;
            Some(SpiRange {
                min,
                max,
                port: g.spec.port,
            })
        })
    }

    /// The fast path's entries for frames whose peer is `addr` (and UDP
    /// `port`; 0 for raw ESP): towards the tunnel's segw and back, or none
    /// (the core takes them).
    pub fn fast_path_at(&self, addr: IpAddr, port: u16) -> Option<[FastEntry; 2]> {
        // A standby carries nothing; with too many ranges the program
        // cannot apply the core's SPI rule.
        if self.standby || self.spi_ranges().nth(MAX_SPI_RANGES).is_some() {
            return None;
        }
        // ESP in UDP: the endpoint index, exactly, at the tunnel's own
        // port (not the one it opened from). Raw ESP: the address lookup.
        // A tunnel may have both (the core would send raw ESP from a
        // NAT'd peer's address to it too).
        let find: &[Find] = if port == 0 {
            &[Find::Address]
        } else {
            &[Find::Endpoint]
        };
        let keys = Keys {
            spi: None,
            addr,
            port: (port != 0).then_some(port),
        };
        let (id, _) = self.table.find(find, &keys)?;
        let t = self.table.get(id)?;
        if (port != 0 && t.peer_port != port)
            || t.placement() != Placement::Confirmed
            || !self.is_up(t.gateway)
            || self.moves.is_moving(id)
        {
            return None;
        }
        let gw = self.gateways.get(t.gateway)?;
        // A frame the core sees with no next hop (the tunnel's, or the
        // default) teaches one: such a tunnel stays the core's.
        self.default_next_hop?;
        let (segw_mac, next_hop) = (gw.mac?, t.next_hop?);
        let port_of_gw = gw.spec.port;
        let up = FastEntry {
            direction: Direction::Up,
            addr,
            port,
            tunnel: id,
            ingress: UPLINK,
            egress: port_of_gw,
            dst: segw_mac,
            src: self.port_mac(port_of_gw),
        };
        let down = FastEntry {
            direction: Direction::Down,
            ingress: port_of_gw,
            egress: UPLINK,
            dst: next_hop,
            src: self.port_mac(UPLINK),
            ..up
        };
        Some([up, down])
    }

    /// What changed in the fast path since `mark` (which it then moves
    /// on): nothing, the entries at some endpoints, or everything (a
    /// segw's health or MAC, the set, the first next hop; or too many
    /// endpoints at once, or the first call).
    pub fn fast_path_changes(&mut self, mark: &mut FastPathMark) -> FastChanges {
        let now = FastPathMark {
            global: Some(self.epoch),
            table: Some(self.table.epoch()),
        };
        let changes = if mark.global != now.global || mark.table.is_none() {
            self.table.take_touched();
            FastChanges::All
        } else if mark.table == now.table {
            FastChanges::None
        } else {
            match self.table.take_touched() {
                Some(mut keys) => {
                    keys.sort_unstable();
                    keys.dedup();
                    FastChanges::At(keys)
                }
                None => FastChanges::All,
            }
        };
        *mark = now;
        changes
    }
}

/// Where a copy of the fast path's entries was last brought up to date
/// ([`Balancer::fast_path_changes`]); the default: never.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FastPathMark {
    global: Option<u64>,
    table: Option<u64>,
}

/// See [`Balancer::fast_path_changes`].
#[derive(Debug, PartialEq, Eq)]
pub enum FastChanges {
    None,
    /// Look at these endpoints again ([`Balancer::fast_path_at`]).
    At(Vec<(IpAddr, u16)>),
    /// Take [`Balancer::fast_path`] whole.
    All,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    use super::*;
    use crate::balancer::farm::{self, port_mac, segw_mac};
    use crate::balancer::Verdict;
    use crate::packet::craft::{esp_body, frame, ike_body, udp_packet};
    use crate::packet::ike::{IKE_AUTH, IKE_SA_INIT};
    use crate::packet::IkeHeader;
    use crate::policy::native;

    const ROUTER: Mac = [2, 0xaa, 0, 0, 0, 1];

    /// Tunnel `n`'s IKE_SA_INIT, or its segw's answer.
    /// The segw's answers that confirm tunnel `n`: to its IKE_SA_INIT and
    /// its IKE_AUTH.
    fn answers(n: u8) -> [IkeHeader; 2] {
        let sa_init = init(n, true);
        let auth = IkeHeader {
            exchange: IKE_AUTH,
            message_id: 1,
            ..sa_init
        };
        [sa_init, auth]
    }

    fn init(n: u8, response: bool) -> IkeHeader {
        IkeHeader {
            initiator_spi: u64::from(n),
            responder_spi: if response { 0x77 } else { 0 },
            exchange: IKE_SA_INIT,
            from_initiator: !response,
            response,
            message_id: 0,
        }
    }

    #[test]
    fn the_spi_ranges_are_the_healthy_segws_in_steerings_order_and_too_many_empty_the_fast_path() {
        use crate::balancer::{GatewaySpec, SpiSteering};
        let policy = native::shipped("round-robin", &[]).unwrap();
        // segw1 without a range, segw2 and segw3 with one.
        let mut lb = farm::balancer(policy, 1, vec![], 64);
        let ranged = |n: u8| GatewaySpec {
            name: format!("segw{n}"),
            port: PortId::from(n),
            mac: Some(segw_mac(n)),
            weight: 1,
            steering: SpiSteering {
                esp_range: Some((u32::from(n) << 24, (u32::from(n) << 24) | 0xff)),
                ..Default::default()
            },
            ..Default::default()
        };
        let now = Timestamp::ZERO;
        for n in 2..=3 {
            lb.add_gateway(ranged(n), now).unwrap();
        }
        let ports = |lb: &Balancer<_>| -> Option<Vec<PortId>> {
            Some(lb.fast_path_spi_ranges()?.iter().map(|r| r.port).collect())
        };
        assert_eq!(ports(&lb), Some(vec![2, 3]));
        assert_eq!(lb.fast_path_spi_ranges().unwrap()[0].min, 0x0200_0000);
        // A segw that is down steers nothing (the core's `spi_owner`).
        lb.set_healthy("segw2", false, now).unwrap();
        assert_eq!(ports(&lb), Some(vec![3]));
        lb.set_healthy("segw2", true, now).unwrap();
        // One open, confirmed tunnel has entries with up to 16 ranges and
        // none with 17.
        let vip = IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1));
        let peer = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1));
        let ip = udp_packet(peer, 500, vip, 500, &ike_body(&init(1, false), false, 100));
        let mut f = frame(port_mac(UPLINK), ROUTER, None, &ip);
        let Verdict::Forward(gw) = lb.handle(&mut f, UPLINK, now) else {
            panic!("not placed")
        };
        for h in answers(1) {
            let ip = udp_packet(vip, 500, peer, 500, &ike_body(&h, false, 100));
            let mut f = frame(port_mac(gw), segw_mac(gw as u8), None, &ip);
            lb.handle(&mut f, gw, now);
        }
        for n in 4..=17 {
            lb.add_gateway(ranged(n), now).unwrap();
        }
        assert_eq!(lb.fast_path_spi_ranges().map(|r| r.len()), Some(16));
        assert!(lb.fast_path_at(peer, 500).is_some());
        lb.add_gateway(ranged(18), now).unwrap();
        assert_eq!(lb.fast_path_spi_ranges(), None);
        assert!(lb.fast_path_at(peer, 500).is_none());
        assert!(lb.fast_path().is_empty());
    }

    #[test]
    fn traffic_leaves_the_epoch_alone_and_a_segw_going_down_takes_its_entries() {
        let policy = native::shipped("round-robin", &[]).unwrap();
        let mut lb = farm::balancer(policy, 2, vec![], 64);
        let vip = IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1));
        let now = Timestamp::ZERO;
        let mut on = Vec::new();
        for n in 1..=4u8 {
            let peer = IpAddr::V4(Ipv4Addr::new(10, 1, 0, n));
            let h = |response: bool| init(n, response);
            let ip = udp_packet(peer, 500, vip, 500, &ike_body(&h(false), false, 100));
            let mut f = frame(port_mac(UPLINK), ROUTER, None, &ip);
            let Verdict::Forward(gw) = lb.handle(&mut f, UPLINK, now) else {
                panic!()
            };
            for h in answers(n) {
                let ip = udp_packet(vip, 500, peer, 500, &ike_body(&h, false, 100));
                let mut f = frame(port_mac(gw), segw_mac(gw as u8), None, &ip);
                lb.handle(&mut f, gw, now);
            }
            on.push((peer, gw));
        }
        // Per tunnel both ways: by endpoint (ESP in UDP from its IKE port,
        // as the core would take it) and by address (raw ESP).
        let entries = lb.fast_path();
        assert_eq!(entries.len(), 16, "{entries:?}");
        let epoch = lb.epoch();
        for &(peer, gw) in &on {
            let ip = crate::packet::craft::ip_packet(peer, vip, 50, &esp_body(9, 1, 80), 1);
            let mut f = frame(port_mac(UPLINK), ROUTER, None, &ip);
            assert_eq!(lb.handle(&mut f, UPLINK, now), Verdict::Forward(gw));
        }
        assert_eq!(lb.epoch(), epoch, "ESP of known tunnels changes no entry");
        // What only the policy reads changes no entry either: at a million
        // tunnels a weight change must not cost a full resync.
        let mut mark = FastPathMark::default();
        assert_eq!(lb.fast_path_changes(&mut mark), FastChanges::All);
        lb.set_weight("segw1", 5, now).unwrap();
        lb.set_capacity("segw1", 100, now).unwrap();
        lb.set_throughput("segw1", 1 << 30, now).unwrap();
        lb.set_draining("segw2", true, now).unwrap();
        lb.set_healthy("segw2", true, now).unwrap(); // already up
        assert_eq!(lb.epoch(), epoch);
        assert_eq!(lb.fast_path_changes(&mut mark), FastChanges::None);
        lb.set_healthy("segw1", false, now).unwrap();
        assert_ne!(lb.epoch(), epoch);
        let left = lb.fast_path();
        assert_eq!(left.len(), 8);
        assert!(
            left.iter().all(|e| e.egress == 2 || e.ingress == 2),
            "{left:?}"
        );
    }

    /// The fast path's copy of the entries, kept up to date by
    /// `fast_path_changes` alone, equals `fast_path()` after every event:
    /// tunnels opened, floated, their next hop changed, segws down and up,
    /// tunnels expired.
    #[test]
    fn entries_kept_up_to_date_by_the_changes_alone_equal_the_whole_recomputed() {
        type Model = HashMap<(Direction, IpAddr, u16), FastEntry>;
        fn whole<P: Policy>(lb: &Balancer<P>) -> Model {
            let all = lb.fast_path();
            let model: Model = all
                .iter()
                .map(|e| ((e.direction, e.addr, e.port), *e))
                .collect();
            assert_eq!(model.len(), all.len(), "one entry per key");
            model
        }
        const ROUTER2: Mac = [2, 0xaa, 0, 0, 0, 2];
        let policy = native::shipped("round-robin", &[]).unwrap();
        let mut lb = farm::balancer(policy, 3, vec![], 64);
        let vip = IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1));
        let mut now = Timestamp::ZERO;
        let (mut mark, mut model) = (FastPathMark::default(), Model::new());
        // Per peer: the UDP port it now speaks from.
        let mut port_of = [500u16; 13];
        let mut down = [false; 4];
        let (mut incremental, mut whole_ones, mut seen_most) = (0, 0, 0);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for step in 0..600u32 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let n = (rng % 12 + 1) as u8;
            let peer = IpAddr::V4(Ipv4Addr::new(10, 1, 0, n));
            let h = |response: bool| init(n, response);
            let router = if rng & 0x100 == 0 { ROUTER } else { ROUTER2 };
            let port = port_of[n as usize];
            // After the IKE_SA_INIT: a message with the SPI pair, which
            // proves the tunnel (and so may float it, or move its next hop).
            let ike = |from: u16, h: IkeHeader| {
                let ip = udp_packet(
                    peer,
                    from,
                    vip,
                    if from == 500 { 500 } else { 4500 },
                    &ike_body(&h, from != 500, 100),
                );
                frame(port_mac(UPLINK), router, None, &ip)
            };
            let auth = IkeHeader {
                exchange: IKE_AUTH,
                responder_spi: 0x77,
                message_id: 1,
                ..h(false)
            };
            match (rng >> 32) % 16 {
                // Open (or re-open) from port 500, and the segw answers.
                0..=3 => {
                    port_of[n as usize] = 500;
                    if let Verdict::Forward(gw) = lb.handle(&mut ike(500, h(false)), UPLINK, now) {
                        let ip = udp_packet(vip, 500, peer, 500, &ike_body(&h(true), false, 100));
                        let mut f = frame(port_mac(gw), segw_mac(gw as u8), None, &ip);
                        lb.handle(&mut f, gw, now);
                    }
                }
                // Float to 4500 from a new (NAT) port.
                4..=5 => {
                    let to = 30_000 + u16::from(n) * 100 + (step % 100) as u16;
                    if matches!(
                        lb.handle(&mut ike(to, auth), UPLINK, now),
                        Verdict::Forward(_)
                    ) {
                        port_of[n as usize] = to;
                    }
                }
                // IKE again from where it is, maybe through the other router.
                6..=8 => {
                    lb.handle(&mut ike(port, auth), UPLINK, now);
                }
                // Its ESP, both ways.
                9..=11 => {
                    let body = esp_body(0x100 + u32::from(n), step, 80);
                    let ip = if port == 500 {
                        crate::packet::craft::ip_packet(peer, vip, 50, &body, 1)
                    } else {
                        udp_packet(peer, port, vip, 4500, &body)
                    };
                    let mut f = frame(port_mac(UPLINK), router, None, &ip);
                    if let Verdict::Forward(gw) = lb.handle(&mut f, UPLINK, now) {
                        let ip = if port == 500 {
                            crate::packet::craft::ip_packet(vip, peer, 50, &body, 1)
                        } else {
                            udp_packet(vip, 4500, peer, port, &body)
                        };
                        let mut f = frame(port_mac(gw), segw_mac(gw as u8), None, &ip);
                        lb.handle(&mut f, gw, now);
                    }
                }
                // A segw goes down, or comes back.
                12 => {
                    let k = (rng >> 40) as usize % 3 + 1;
                    down[k] = !down[k];
                    lb.set_healthy(&format!("segw{k}"), !down[k], now).unwrap();
                }
                // Time passes; now and then past the idle timeout.
                _ => {
                    let secs = if rng & 0xf000 == 0 { 700 } else { 1 };
                    now = now + Duration::from_secs(secs);
                    lb.expire(now, 1 << 10);
                }
            }
            match lb.fast_path_changes(&mut mark) {
                FastChanges::None => {}
                FastChanges::All => {
                    whole_ones += 1;
                    model = whole(&lb);
                }
                FastChanges::At(keys) => {
                    incremental += 1;
                    for (addr, port) in keys {
                        for d in [Direction::Up, Direction::Down] {
                            model.remove(&(d, addr, port));
                        }
                        for e in lb.fast_path_at(addr, port).into_iter().flatten() {
                            model.insert((e.direction, e.addr, e.port), e);
                        }
                    }
                }
            }
            assert_eq!(model, whole(&lb), "step {step}");
            seen_most = seen_most.max(model.len());
        }
        // Both ways of keeping up were taken, the one by endpoint mostly.
        assert!(
            incremental > 2 * whole_ones,
            "{incremental} by endpoint, {whole_ones} whole"
        );
        assert!(whole_ones > 10, "{whole_ones}");
        let most = seen_most;
        assert!(most >= 8, "at most {most} entries at once");
    }
}
