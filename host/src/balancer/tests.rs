//! Every affinity rule of DESIGN.md, on real frames, with simulated time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::affinity::{Timeouts, TunnelState};
use super::farm::{port_mac, segw_mac};
use super::rules::Placement;
use super::*;
use crate::packet::craft::*;
use crate::packet::ike::{IKE_AUTH, IKE_SA_INIT, INFORMATIONAL};
use crate::packet::IkeHeader;
use crate::policy::{native, FallbackReason};

const PEER_SIDE_ROUTER: Mac = [2, 0xaa, 0, 0, 0, 1];
const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1));

fn peer(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, n))
}

/// segw2 and segw3 cooperate: segw2 labels its IKE SPIs 0x02 in the top
/// byte and allocates ESP SPIs 0xc2000000..=0xc2ffffff; segw3 likewise with
/// 0x03 and 0xc3…. segw1 does not.
fn steering(n: u8) -> SpiSteering {
    if n == 1 {
        return SpiSteering::default();
    }
    let top = u64::from(n) << 56;
    let esp = 0xc000_0000 | (u32::from(n) << 24);
    SpiSteering {
        ike_label: Some(IkeSpiLabel {
            mask: 0xff << 56,
            label: top,
        }),
        esp_range: Some((esp, esp | 0x00ff_ffff)),
    }
}

struct Lab {
    lb: Balancer,
    now: Timestamp,
}

impl Lab {
    /// Three segws on ports 1..3 behind a round-robin policy (so placements
    /// are predictable: segw1, segw2, segw3, segw1, …).
    fn new() -> Self {
        Self::with_capacity(1 << 16)
    }

    fn with_capacity(max_tunnels: usize) -> Self {
        Self::build(max_tunnels, true)
    }

    /// The same segws, their MACs not configured: learned from what they
    /// send.
    fn learning_macs() -> Self {
        Self::build(1 << 16, false)
    }

    fn build(max_tunnels: usize, static_macs: bool) -> Self {
        let config = Config {
            port_macs: (0..4).map(port_mac).collect(),
            proxy: vec!["10.2.2.1".parse().unwrap()],
            proxy_gateways: vec!["198.51.100.0/24".parse().unwrap()],
            max_tunnels,
            timeouts: Timeouts::default(),
        };
        let mut lb = Balancer::new(config, native::shipped("round-robin", &[]).unwrap());
        for n in 1..=3u8 {
            let spec = GatewaySpec {
                name: format!("segw{n}"),
                port: PortId::from(n),
                mac: static_macs.then(|| segw_mac(n)),
                weight: 1,
                capacity: 0,
                throughput: 0,
                steering: steering(n),
            };
            lb.add_gateway(spec, Timestamp::ZERO).unwrap();
        }
        Lab {
            lb,
            now: Timestamp::ZERO,
        }
    }

    fn tick(&mut self, d: Duration) {
        self.now = self.now + d;
    }

    /// Send an IP packet from the initiator side; returns the segw number
    /// it went to, checking the rewrite on the way.
    fn up(&mut self, ip: Vec<u8>) -> Result<u8, DropReason> {
        let out = self.up_frames(ip)?;
        assert_eq!(out.len(), 1, "one frame in, one out");
        Ok(out[0].0)
    }

    /// Send an IP packet from the initiator side; returns every frame that
    /// left (this one, and the held fragments it released: none if it was
    /// held itself) with the segw it went to, checking each rewrite.
    fn up_frames(&mut self, ip: Vec<u8>) -> Result<Vec<(u8, Vec<u8>)>, DropReason> {
        let original = frame(port_mac(UPLINK), PEER_SIDE_ROUTER, None, &ip);
        let mut f = original.clone();
        let (port, held) = match self.lb.handle(&mut f, UPLINK, self.now) {
            Verdict::Forward(port) => (port, Vec::new()),
            Verdict::ForwardWithHeld(port, held) => (port, held),
            Verdict::Held => {
                assert!(f.is_empty(), "a held frame is taken");
                return Ok(Vec::new());
            }
            Verdict::Drop(r) => return Err(r),
            Verdict::Reply => panic!("an IP packet got a reply"),
        };
        assert_eq!(&f[12..], &original[12..], "bytes past the MACs changed");
        let out: Vec<(u8, Vec<u8>)> = std::iter::once(f)
            .chain(held)
            .map(|f| (port as u8, f))
            .collect();
        for (_, f) in &out {
            assert_eq!(
                &f[6..12],
                &port_mac(port),
                "source MAC is not the egress port's"
            );
            assert_eq!(
                &f[0..6],
                &segw_mac(port as u8),
                "destination is not the segw's MAC"
            );
        }
        Ok(out)
    }

    /// Send an IP packet from segw `n` towards an initiator.
    fn down(&mut self, n: u8, ip: Vec<u8>) -> Result<Mac, DropReason> {
        let original = frame(port_mac(PortId::from(n)), segw_mac(n), None, &ip);
        let mut f = original.clone();
        match self.lb.handle(&mut f, PortId::from(n), self.now) {
            Verdict::Forward(UPLINK) => {
                assert_eq!(&f[12..], &original[12..]);
                assert_eq!(&f[6..12], &port_mac(UPLINK));
                Ok(f[0..6].try_into().unwrap())
            }
            other => match other {
                Verdict::Drop(r) => Err(r),
                v => panic!("return traffic: {v:?}"),
            },
        }
    }

    fn placed(&self) -> u64 {
        self.lb.counters().placed
    }

    /// A working tunnel from `p`: IKE_SA_INIT, its segw's answer, IKE_AUTH
    /// on 4500 and the segw's answer to that (which establishes it).
    /// Returns the segw.
    fn open_tunnel(&mut self, p: IpAddr, spi: u64) -> u8 {
        let gw = self.up(sa_init(p, 500, spi)).unwrap();
        self.down(gw, sa_init_answer(p, 500, spi, RESPONDER_SPI))
            .unwrap();
        assert_eq!(self.up(auth_4500(p, 4500, spi)), Ok(gw));
        self.down(gw, auth_answer(p, 4500, spi)).unwrap();
        gw
    }

    /// Send an IP packet from the initiator side, from the MAC `from`.
    fn up_from(&mut self, from: Mac, ip: Vec<u8>) -> Result<u8, DropReason> {
        let mut f = frame(port_mac(UPLINK), from, None, &ip);
        match self.lb.handle(&mut f, UPLINK, self.now) {
            Verdict::Forward(port) => Ok(port as u8),
            Verdict::Drop(r) => Err(r),
            v => panic!("{v:?}"),
        }
    }
}

/// The responder SPI segws answer with in these tests, and that later IKE
/// messages of the initiators carry.
const RESPONDER_SPI: u64 = 77;

fn ike(spi: u64, exchange: u8, responder_spi: u64) -> IkeHeader {
    IkeHeader {
        initiator_spi: spi,
        responder_spi,
        exchange,
        from_initiator: true,
        response: false,
        message_id: 0,
    }
}

fn sa_init(p: IpAddr, port: u16, spi: u64) -> Vec<u8> {
    udp_packet(
        p,
        port,
        VIP,
        500,
        &ike_body(&ike(spi, IKE_SA_INIT, 0), false, 100),
    )
}

fn auth_4500(p: IpAddr, port: u16, spi: u64) -> Vec<u8> {
    udp_packet(
        p,
        port,
        VIP,
        4500,
        &ike_body(&ike(spi, IKE_AUTH, RESPONDER_SPI), true, 400),
    )
}

fn esp_udp(p: IpAddr, port: u16, spi: u32) -> Vec<u8> {
    udp_packet(p, port, VIP, 4500, &esp_body(spi, 1, 120))
}

fn arp_frame(op_request: bool, target: Ipv4Addr) -> Vec<u8> {
    let req = packet::arp::Arp::request(PEER_SIDE_ROUTER, Ipv4Addr::new(198, 51, 100, 1), target);
    let arp = if op_request {
        req
    } else {
        req.reply(PEER_SIDE_ROUTER)
    };
    arp.broadcast_frame(PEER_SIDE_ROUTER, None)
}

#[test]
fn arp_for_proxied_addresses_is_answered_from_the_ingress_port() {
    let mut lab = Lab::new();
    // Initiators ask for the VIP on the uplink; segws ask for initiators.
    let vip = Ipv4Addr::new(10, 2, 2, 1);
    let initiator = Ipv4Addr::new(198, 51, 100, 9);
    for (port, target) in [(UPLINK, vip), (2, initiator)] {
        let mut f = arp_frame(true, target);
        assert_eq!(lab.lb.handle(&mut f, port, lab.now), Verdict::Reply);
        let Kind::Arp(reply) = packet::parse(&f).unwrap().kind else {
            panic!()
        };
        assert_eq!(
            (reply.op, reply.sender_mac),
            (packet::arp::REPLY, port_mac(port))
        );
        assert_eq!(reply.sender_ip, target);
        assert_eq!(&f[0..6], &PEER_SIDE_ROUTER);
    }
    // Each side's prefixes are answered on that side only: an initiator
    // asking for another initiator on the uplink is not answered (that
    // would pull traffic between initiators through the balancer), nor a
    // segw asking for the VIP it owns itself.
    for (port, target) in [(UPLINK, initiator), (2, vip)] {
        let mut f = arp_frame(true, target);
        assert_eq!(
            lab.lb.handle(&mut f, port, lab.now),
            Verdict::Drop(DropReason::ArpIgnored),
            "port {port} asking for {target}"
        );
    }
    let mut outside = arp_frame(true, Ipv4Addr::new(10, 9, 9, 9));
    assert_eq!(
        lab.lb.handle(&mut outside, UPLINK, lab.now),
        Verdict::Drop(DropReason::ArpIgnored)
    );
    let mut not_a_request = arp_frame(false, Ipv4Addr::new(10, 2, 2, 1));
    assert_eq!(
        lab.lb.handle(&mut not_a_request, UPLINK, lab.now),
        Verdict::Drop(DropReason::ArpIgnored)
    );
}

#[test]
fn the_500_to_4500_float_keeps_the_segw_a_five_tuple_hash_would_not() {
    let mut lab = Lab::new();
    // Two other tunnels first, so this one does not land on segw1 by luck.
    lab.up(sa_init(peer(1), 500, 1)).unwrap();
    lab.up(sa_init(peer(2), 500, 2)).unwrap();
    let first = lab.up(sa_init(peer(9), 500, 0x99)).unwrap();
    assert_eq!(first, 3);
    lab.down(first, sa_init_answer(peer(9), 500, 0x99, RESPONDER_SPI))
        .unwrap();
    // NAT detected: IKE_AUTH moves to 4500, and the NAT maps a new port.
    assert_eq!(lab.up(auth_4500(peer(9), 40_001, 0x99)), Ok(first));
    assert_eq!(lab.up(esp_udp(peer(9), 40_001, 0xc0de)), Ok(first));
    assert_eq!(lab.placed(), 3, "the float must not ask the policy again");
    assert_eq!(lab.lb.table().counters.rebound, 1);
}

#[test]
fn esp_in_udp_by_endpoint_then_address_and_raw_esp_by_address() {
    let mut lab = Lab::new();
    let gw = lab.up(sa_init(peer(5), 500, 5)).unwrap();
    assert_eq!(
        lab.up(ip_packet(peer(5), VIP, 50, &esp_body(0xe5, 1, 80), 3)),
        Ok(gw)
    );
    // ESP-in-UDP from a port never seen: the address decides, as it holds
    // one tunnel.
    assert_eq!(lab.up(esp_udp(peer(5), 5555, 0xe6)), Ok(gw));
    assert_eq!(lab.placed(), 1);
}

/// Send every piece; every frame that left, with its segw.
fn send_pieces(lab: &mut Lab, pieces: &[Vec<u8>]) -> Vec<(u8, Vec<u8>)> {
    pieces
        .iter()
        .flat_map(|p| lab.up_frames(p.clone()).unwrap())
        .collect()
}

/// Each piece left exactly once, on `gw`, unchanged past the MACs.
fn assert_all_on(left: &[(u8, Vec<u8>)], pieces: &[Vec<u8>], gw: u8) {
    assert!(
        left.iter().all(|(to, _)| *to == gw),
        "pieces split or misplaced: {:?}, expected segw{gw}",
        left.iter().map(|(to, _)| to).collect::<Vec<_>>()
    );
    let mut got: Vec<&[u8]> = left.iter().map(|(_, f)| &f[14..]).collect();
    let mut want: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
    got.sort();
    want.sort();
    assert!(got == want, "not every piece left exactly once");
}

#[test]
fn fragments_follow_their_first_fragment_in_either_order() {
    // Two tunnels behind one NAT address, on two segws. The address alone
    // names whichever was bound last: it cannot stand in for a first
    // fragment.
    let mut lab = Lab::new();
    let nat = peer(100);
    let tunnels = [(40_001, 0xa), (40_002, 0xb)];
    let gws: Vec<u8> = tunnels
        .iter()
        .map(|&(port, spi)| lab.up(auth_4500(nat, port, spi)).unwrap())
        .collect();
    assert_ne!(gws[0], gws[1]);
    let mut id = 0x1000;
    for (&(port, spi), &gw) in tunnels.iter().zip(&gws) {
        let big = udp_packet(
            nat,
            port,
            VIP,
            4500,
            &ike_body(&ike(spi, IKE_AUTH, RESPONDER_SPI), true, 3000),
        );
        for reversed in [false, true] {
            id += 1;
            let mut pieces = fragments(&big, 1400, id);
            assert_eq!(pieces.len(), 3);
            if reversed {
                pieces.reverse();
            }
            let left = send_pieces(&mut lab, &pieces);
            assert_all_on(&left, &pieces, gw);
        }
    }
    assert_eq!(
        lab.lb.counters().held,
        4,
        "two pieces of each reversed packet"
    );
    assert_eq!(lab.lb.held_fragments(), (0, 0, 0));
    assert_eq!(lab.placed(), 2);
    assert_eq!(
        lab.lb
            .gateway(&format!("segw{}", gws[0]))
            .unwrap()
            .counters
            .frames_to,
        1 + 6,
        "released pieces are counted on their gateway"
    );
}

#[test]
fn ipv6_fragments_follow_their_first_fragment_in_either_order() {
    use std::net::Ipv6Addr;
    let mut lab = Lab::new();
    let vip6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1));
    // One host, two IKE SAs from two ports (or an NPTv6/NAT66 address).
    let host = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 7));
    let auth = |port, spi| {
        udp_packet(
            host,
            port,
            vip6,
            4500,
            &ike_body(&ike(spi, IKE_AUTH, RESPONDER_SPI), true, 3000),
        )
    };
    let a = lab.up(auth(40_001, 0xa6)).unwrap();
    let b = lab.up(auth(40_002, 0xb6)).unwrap();
    assert_ne!(a, b);
    for (id, reversed) in [(0x6000_0001, false), (0x6000_0002, true)] {
        let mut pieces = fragments(&auth(40_001, 0xa6), 1400, id);
        assert!(matches!(
            packet::parse(&frame(port_mac(UPLINK), PEER_SIDE_ROUTER, None, &pieces[1]))
                .unwrap()
                .kind,
            Kind::Ip(IpPacket {
                payload: Payload::LaterFragment { .. },
                ..
            })
        ));
        if reversed {
            pieces.reverse();
        }
        assert_all_on(&send_pieces(&mut lab, &pieces), &pieces, a);
    }
}

#[test]
fn a_later_fragment_whose_first_never_comes_is_dropped_after_the_hold() {
    let mut lab = Lab::new();
    // An unknown peer: a fragmented first message (a big IKE_SA_INIT) whose
    // pieces come reversed opens its tunnel with all of them.
    let stranger = udp_packet(
        peer(66),
        500,
        VIP,
        500,
        &ike_body(&ike(0x66, IKE_SA_INIT, 0), false, 2000),
    );
    let mut pieces = fragments(&stranger, 1400, 0x3333);
    pieces.reverse();
    let left = send_pieces(&mut lab, &pieces);
    assert_eq!(left.len(), 2);
    // A piece whose first fragment is lost waits, then is dropped.
    let lost = fragments(&stranger, 1400, 0x4444).pop().unwrap();
    assert_eq!(lab.up_frames(lost), Ok(Vec::new()));
    assert_eq!(lab.lb.held_fragments().1, 1);
    lab.tick(Duration::from_millis(900));
    lab.lb.expire(lab.now, usize::MAX);
    assert_eq!(lab.lb.held_fragments().1, 1, "still inside the hold time");
    lab.tick(Duration::from_millis(200));
    lab.lb.expire(lab.now, usize::MAX);
    assert_eq!(lab.lb.held_fragments(), (0, 0, 0));
    assert_eq!(lab.lb.counters().dropped(DropReason::FragmentTimeout), 1);
}

#[test]
fn a_packet_of_more_pieces_than_the_hold_takes_stays_whole_from_an_address_with_one_tunnel() {
    use super::fragments::HOLD_FRAMES_PER_PACKET;
    let mut lab = Lab::new();
    lab.up(sa_init(peer(1), 500, 1)).unwrap();
    let gw = lab.up(auth_4500(peer(5), 4500, 5)).unwrap();
    let big = udp_packet(peer(5), 4500, VIP, 4500, &esp_body(0x55, 1, 4000));
    let mut pieces = fragments(&big, 200, 0x5555);
    assert!(pieces.len() > HOLD_FRAMES_PER_PACKET + 1);
    pieces.reverse();
    // The hold takes 16 pieces; the 17th finds no room and the address
    // (one tunnel) decides, and the held ones leave with it.
    let left = send_pieces(&mut lab, &pieces);
    assert_all_on(&left, &pieces, gw);
    assert_eq!(lab.lb.counters().held, HOLD_FRAMES_PER_PACKET as u64);
    assert_eq!(lab.lb.held_fragments(), (0, 0, 0));
}

#[test]
fn a_full_fragment_hold_falls_back_to_an_address_that_names_one_tunnel() {
    use super::fragments::HOLD_PACKETS;
    let mut lab = Lab::new();
    lab.up(sa_init(peer(1), 500, 1)).unwrap();
    let alone = lab.up(sa_init(peer(2), 500, 2)).unwrap();
    let nat = peer(100);
    lab.up(auth_4500(nat, 40_001, 0xa)).unwrap();
    lab.up(auth_4500(nat, 40_002, 0xb)).unwrap();
    // Later fragments from spoofed sources fill the hold.
    let later = |src, id| {
        let p = udp_packet(src, 4500, VIP, 4500, &esp_body(1, 1, 1500));
        fragments(&p, 1400, id).pop().unwrap()
    };
    for i in 0..HOLD_PACKETS as u32 {
        let spoofed = IpAddr::V4(Ipv4Addr::from(0xcb00_7100 + i));
        assert_eq!(lab.up_frames(later(spoofed, i)), Ok(Vec::new()));
    }
    let spoofed = IpAddr::V4(Ipv4Addr::from(0xcb00_7100 + HOLD_PACKETS as u32));
    assert_eq!(lab.up(later(spoofed, 1)), Err(DropReason::FragmentHoldFull));
    assert_eq!(lab.lb.held_fragments().0, HOLD_PACKETS);
    // No room: an address with one tunnel still decides; a NAT address
    // with two does not.
    assert_eq!(lab.up(later(peer(2), 7)), Ok(alone));
    assert_eq!(lab.up(later(nat, 8)), Err(DropReason::FragmentHoldFull));
    // Once the flood's pieces have waited out the hold, there is room again.
    lab.tick(Duration::from_secs(2));
    assert_eq!(lab.up_frames(later(nat, 9)), Ok(Vec::new()));
    assert_eq!(lab.lb.held_fragments().1, 1);
    assert_eq!(
        lab.lb.counters().dropped(DropReason::FragmentTimeout),
        HOLD_PACKETS as u64
    );
}

#[test]
fn mobike_moves_the_binding_not_the_segw() {
    let mut lab = Lab::new();
    lab.up(sa_init(peer(1), 500, 1)).unwrap();
    let gw = lab.open_tunnel(peer(8), 8);
    // The initiator moves to a new address (UPDATE_SA_ADDRESSES rides an
    // INFORMATIONAL with the same IKE SPI).
    let moved_to = peer(200);
    let update = udp_packet(
        moved_to,
        4500,
        VIP,
        4500,
        &ike_body(&ike(8, INFORMATIONAL, RESPONDER_SPI), true, 60),
    );
    assert_eq!(lab.up(update), Ok(gw));
    assert_eq!(lab.up(esp_udp(moved_to, 4500, 0xabc)), Ok(gw));
    assert_eq!(
        lab.lb.table().by_endpoint(peer(8), 4500),
        None,
        "the old binding is gone"
    );
    assert_eq!(lab.placed(), 2);
}

#[test]
fn an_ike_sa_init_with_a_known_spi_from_elsewhere_moves_nothing() {
    let mut lab = Lab::new();
    lab.up(sa_init(peer(1), 500, 1)).unwrap();
    let gw = lab.up(sa_init(peer(8), 500, 8)).unwrap();
    lab.down(gw, sa_init_answer(peer(8), 500, 8, RESPONDER_SPI))
        .unwrap();
    lab.up(auth_4500(peer(8), 40_008, 8)).unwrap();
    // Someone who saw the SPI on the wire sends IKE_SA_INIT with it from
    // an address of their own.
    let spoofer = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 66));
    assert_eq!(
        lab.up(sa_init(spoofer, 500, 8)),
        Err(DropReason::IkeSpiInUse)
    );
    assert_eq!(lab.lb.counters().dropped(DropReason::IkeSpiInUse), 1);
    let t = lab.lb.table();
    let id = t.by_spi(8).unwrap();
    assert_eq!(t.by_endpoint(peer(8), 40_008), Some(id), "binding kept");
    assert_eq!(t.by_endpoint(spoofer, 500), None);
    assert_eq!(t.counters.rebound, 1, "the float only");
    // The real peer's traffic is where it was; nothing was placed anew.
    assert_eq!(lab.up(esp_udp(peer(8), 40_008, 0xe8)), Ok(gw));
    assert_eq!(
        lab.up(ip_packet(peer(8), VIP, 50, &esp_body(0xe9, 1, 80), 1)),
        Ok(gw)
    );
    assert_eq!(lab.placed(), 2);
    // The same SPI past IKE_SA_INIT (the responder's SPI in it) still
    // moves the binding: NAT rebinding, MOBIKE.
    assert_eq!(lab.up(auth_4500(peer(8), 40_108, 8)), Ok(gw));
    assert_eq!(lab.lb.table().by_endpoint(peer(8), 40_108), Some(id));
}

#[test]
fn icmp_packet_too_big_goes_to_the_segw_of_the_quoted_tunnel() {
    let mut lab = Lab::new();
    lab.up(sa_init(peer(1), 500, 1)).unwrap();
    let gw = lab.up(sa_init(peer(4), 500, 4)).unwrap();
    lab.up(auth_4500(peer(4), 4500, 4)).unwrap();
    // The segw's ESP to the peer was too big for a router on the way.
    let segw_to_peer = udp_packet(VIP, 4500, peer(4), 4500, &esp_body(0x77, 5, 1400));
    let router = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254));
    assert_eq!(
        lab.up(icmp_too_big(router, VIP, &segw_to_peer, 1280)),
        Ok(gw)
    );
}

#[test]
fn icmpv6_packet_too_big_goes_to_the_segw_of_the_quoted_tunnel() {
    use std::net::Ipv6Addr;
    let mut lab = Lab::new();
    let vip6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1));
    let host = |n| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, n));
    let auth = |p, spi| {
        udp_packet(
            p,
            4500,
            vip6,
            4500,
            &ike_body(&ike(spi, IKE_AUTH, RESPONDER_SPI), true, 400),
        )
    };
    lab.up(auth(host(1), 1)).unwrap();
    let gw = lab.up(auth(host(4), 4)).unwrap();
    assert_eq!(gw, 2);
    // The segw's ESP to the peer was too big for a router on the way.
    let router = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1));
    let segw_to = |p| udp_packet(vip6, 4500, p, 4500, &esp_body(0x77, 5, 1400));
    let too_big = icmp_too_big(router, vip6, &segw_to(host(4)), 1280);
    assert_eq!(too_big[40], 2, "ICMPv6 packet too big");
    assert_eq!(lab.up(too_big), Ok(gw));
    // Quoting a packet to a peer nobody knows: nowhere to go.
    assert_eq!(
        lab.up(icmp_too_big(router, vip6, &segw_to(host(99)), 1280)),
        Err(DropReason::UnknownTunnel)
    );
}

#[test]
fn nat_keepalives_follow_known_tunnels_and_never_open_one() {
    let mut lab = Lab::new();
    let gw = lab.up(auth_4500(peer(3), 4500, 3)).unwrap();
    let ka = |p| udp_packet(p, 4500, VIP, 4500, &keepalive_body());
    assert_eq!(lab.up(ka(peer(3))), Ok(gw));
    assert_eq!(lab.up(ka(peer(30))), Err(DropReason::UnknownTunnel));
    assert_eq!(lab.lb.table().len(), 1);
}

#[test]
fn return_traffic_rebuilds_the_table_after_a_restart() {
    let mut lab = Lab::new();
    // A fresh balancer: segw2 already holds peer 6's tunnel.
    let to_peer = udp_packet(VIP, 4500, peer(6), 4500, &esp_body(0x66, 1, 100));
    assert_eq!(
        lab.down(2, to_peer.clone()),
        Err(DropReason::NextHopUnknown)
    );
    // Once the initiator side has spoken, the way back is known.
    lab.up(sa_init(peer(1), 500, 1)).unwrap();
    assert_eq!(lab.down(2, to_peer), Ok(PEER_SIDE_ROUTER));
    let placed = lab.placed();
    assert_eq!(
        lab.up(esp_udp(peer(6), 4500, 0x99)),
        Ok(2),
        "taught by segw2's traffic"
    );
    assert_eq!(lab.placed(), placed, "no policy call for a taught tunnel");
    assert!(lab.lb.counters().taught >= 1);
}

#[test]
fn a_segw_answering_for_a_tunnel_placed_elsewhere_corrects_a_guess_never_a_decision() {
    let mut lab = Lab::new();
    // A new tunnel: its IKE_SA_INIT was placed on segw1, by decision.
    assert_eq!(lab.up(sa_init(peer(5), 500, 5)), Ok(1));
    // segw3 sends IKE for that SPI (a segw that should not have it): the
    // frame still reaches the peer, the tunnel stays, the conflict counts.
    assert_eq!(
        lab.down(3, sa_init_answer(peer(5), 500, 5, 9)),
        Ok(PEER_SIDE_ROUTER)
    );
    assert_eq!(lab.up(auth_4500(peer(5), 4500, 5)), Ok(1));
    assert_eq!(lab.lb.counters().conflicts, 1);
    assert_eq!(lab.lb.gateway("segw1").unwrap().counters.tunnels, 1);
    // A tunnel the table only guessed: ESP from a peer it has not seen (a
    // restarted balancer) goes where the policy says, segw2; segw3 holds
    // the SA and answers: the guess is corrected.
    assert_eq!(lab.up(esp_udp(peer(6), 4500, 0x66)), Ok(2));
    lab.down(
        3,
        udp_packet(VIP, 4500, peer(6), 4500, &esp_body(0x99, 1, 100)),
    )
    .unwrap();
    assert_eq!(lab.up(esp_udp(peer(6), 4500, 0x66)), Ok(3));
    assert_eq!(lab.lb.gateway("segw2").unwrap().counters.tunnels, 0);
    // Corrected once, it is the segw's now: another segw cannot take it.
    lab.down(
        1,
        udp_packet(VIP, 4500, peer(6), 4500, &esp_body(0x98, 1, 100)),
    )
    .unwrap();
    assert_eq!(lab.up(esp_udp(peer(6), 4500, 0x66)), Ok(3));
    assert_eq!(lab.lb.counters().conflicts, 2);
}

#[test]
fn a_rebalance_sticks_while_the_old_segw_still_talks() {
    let mut lab = Lab::new();
    let gws: Vec<u8> = (1..=6)
        .map(|n| lab.open_tunnel(peer(n), u64::from(n)))
        .collect();
    let (_, moved) = lab.lb.replace_policy(
        native::shipped("consistent-hash", &[]).unwrap(),
        true,
        lab.now,
    );
    assert!(moved > 0);
    let gateway_of = |lab: &Lab, n: u8| {
        let (_, t) = lab
            .lb
            .table()
            .iter()
            .find(|(_, t)| t.peer == peer(n))
            .unwrap();
        t.gateway
    };
    for n in 1..=6u8 {
        let now_on = gateway_of(&lab, n);
        // The old segw keeps the SA until its DPD gives up, and sends DPD
        // to the peer meanwhile: that must not pull the tunnel back.
        let old = gws[usize::from(n) - 1];
        lab.down(
            old,
            udp_packet(
                VIP,
                4500,
                peer(n),
                4500,
                &esp_body(0x10 + u32::from(n), 2, 100),
            ),
        )
        .unwrap();
        let after = gateway_of(&lab, n);
        assert_eq!(after, now_on, "peer {n}: its old segw took it back");
    }
}

#[test]
fn a_new_ike_sa_from_the_endpoint_a_tunnel_opened_from_stays_on_its_segw() {
    // DPD gave up and restarted, or the peer reauthenticates: IKE_SA_INIT
    // with a new SPI from (address, 500), while the tunnel lives on 4500.
    let mut lab = Lab::new();
    let gw = lab.open_tunnel(peer(7), 7);
    let (decisions, entries) = (lab.lb.policy_stats().decisions, lab.lb.table().len());
    assert_eq!(lab.up(sa_init(peer(7), 500, 0x70)), Ok(gw));
    // Its retransmission (the answer was slow) is found by the new SPI, from
    // the tunnel's own opening endpoint: not an SPI from elsewhere.
    assert_eq!(lab.up(sa_init(peer(7), 500, 0x70)), Ok(gw));
    assert_eq!(lab.up(auth_4500(peer(7), 4500, 0x70)), Ok(gw));
    assert_eq!(lab.up(esp_udp(peer(7), 4500, 0x77)), Ok(gw));
    assert_eq!(
        lab.lb.policy_stats().decisions,
        decisions,
        "asked the policy again"
    );
    assert_eq!(
        lab.lb.table().len(),
        entries,
        "a second entry for one tunnel"
    );
    // Behind a NAT the endpoint is the NAT's port: the same holds, and the
    // next tunnel behind the same address is still its own.
    let nat = peer(8);
    let a = lab.up(sa_init(nat, 40001, 0x81)).unwrap();
    lab.down(a, sa_init_answer(nat, 40001, 0x81, 0x77)).unwrap();
    lab.up(auth_4500(nat, 40002, 0x81)).unwrap();
    let b = lab.up(sa_init(nat, 40003, 0x82)).unwrap();
    assert_ne!(a, b, "round-robin gives the second tunnel the next segw");
    assert_eq!(lab.up(sa_init(nat, 40001, 0x83)), Ok(a));
}

#[test]
fn a_down_segw_loses_its_tunnels_on_their_next_packet_and_gets_no_new_ones() {
    let mut lab = Lab::new();
    let gws: Vec<u8> = (1..=6)
        .map(|n| lab.up(sa_init(peer(n), 500, u64::from(n))).unwrap())
        .collect();
    assert_eq!(gws, [1, 2, 3, 1, 2, 3]);
    lab.lb.set_healthy("segw2", false, lab.now).unwrap();
    for n in 1..=6 {
        let gw = lab.up(auth_4500(peer(n), 4500, u64::from(n))).unwrap();
        assert_ne!(gw, 2);
        if gws[usize::from(n) - 1] != 2 {
            assert_eq!(
                gw,
                gws[usize::from(n) - 1],
                "a tunnel of a healthy segw moved"
            );
        }
    }
    assert_eq!(lab.lb.counters().moved, 2);
    assert!((7..20).all(|n| lab.up(sa_init(peer(n), 500, u64::from(n))).unwrap() != 2));
    // Back up: no tunnel moves back by itself.
    lab.lb.set_healthy("segw2", true, lab.now).unwrap();
    assert_eq!(lab.lb.gateway("segw2").unwrap().counters.tunnels, 0);
}

#[test]
fn draining_takes_no_new_tunnels_and_keeps_its_own() {
    let mut lab = Lab::new();
    let gw = lab.up(sa_init(peer(1), 500, 1)).unwrap();
    lab.lb
        .set_draining(&format!("segw{gw}"), true, lab.now)
        .unwrap();
    assert_eq!(lab.up(auth_4500(peer(1), 4500, 1)), Ok(gw));
    assert!((2..10).all(|n| lab.up(sa_init(peer(n), 500, u64::from(n))).unwrap() != gw));
}

#[test]
fn a_full_segw_takes_no_new_tunnels_and_keeps_its_own_flowing() {
    let mut lab = Lab::new();
    lab.lb.set_capacity("segw1", 2, lab.now).unwrap();
    // Round-robin answers 1, 2, 3, 1, 2, 3, …; segw1 is full after two.
    let gws: Vec<u8> = (1..=9)
        .map(|n| lab.open_tunnel(peer(n), u64::from(n)))
        .collect();
    assert_eq!(gws.iter().filter(|&&g| g == 1).count(), 2, "{gws:?}");
    assert_eq!(lab.lb.gateway("segw1").unwrap().counters.tunnels, 2);
    // Its answers of segw1 were overruled (counted), never a tunnel lost.
    let full = lab
        .lb
        .policy_stats()
        .fallbacks_for(FallbackReason::GatewayFull);
    assert_eq!(
        full, 1,
        "round-robin answered segw1 once more after it filled"
    );
    // segw1's own tunnels keep flowing.
    for (n, &gw) in (1..=9).zip(&gws) {
        if gw == 1 {
            assert_eq!(lab.up(esp_udp(peer(n), 4500, u32::from(n))), Ok(1));
        }
    }
    // A lower capacity evicts nothing.
    lab.lb.set_capacity("segw1", 1, lab.now).unwrap();
    assert_eq!(lab.lb.gateway("segw1").unwrap().counters.tunnels, 2);
}

#[test]
fn every_segw_full_refuses_the_tunnel_counted_and_room_takes_it_again() {
    let mut lab = Lab::new();
    for n in 1..=3 {
        lab.lb
            .set_capacity(&format!("segw{n}"), 1, lab.now)
            .unwrap();
    }
    for n in 1..=3 {
        lab.open_tunnel(peer(n), u64::from(n));
    }
    // Full: a new tunnel and its retransmission are refused, each counted.
    assert_eq!(
        lab.up(sa_init(peer(4), 500, 4)),
        Err(DropReason::AtCapacity)
    );
    assert_eq!(
        lab.up(sa_init(peer(4), 500, 4)),
        Err(DropReason::AtCapacity)
    );
    assert_eq!(lab.lb.counters().dropped(DropReason::AtCapacity), 2);
    assert_eq!(
        lab.lb.table().len(),
        3,
        "a refused tunnel takes no table slot"
    );
    // A segw fails: its tunnel has nowhere to go either, and stays bound.
    lab.lb.set_healthy("segw3", false, lab.now).unwrap();
    assert_eq!(
        lab.up(esp_udp(peer(3), 4500, 3)),
        Err(DropReason::AtCapacity)
    );
    // Room again (a higher limit): the next try is placed.
    lab.lb.set_capacity("segw1", 3, lab.now).unwrap();
    assert_eq!(lab.up(sa_init(peer(4), 500, 4)), Ok(1));
    assert_eq!(lab.up(esp_udp(peer(3), 4500, 3)), Ok(1));
    assert_eq!(lab.lb.gateway("segw1").unwrap().counters.tunnels, 3);
}

#[test]
fn a_rebalance_respects_capacity() {
    let mut lab = Lab::new();
    for n in 1..=12 {
        lab.open_tunnel(peer(n), u64::from(n));
    }
    lab.lb.set_capacity("segw2", 2, lab.now).unwrap();
    let policy = native::shipped("consistent-hash", &[]).unwrap();
    lab.lb.replace_policy(policy, true, lab.now);
    let on = |lab: &Lab, n: u8| {
        lab.lb
            .gateway(&format!("segw{n}"))
            .unwrap()
            .counters
            .tunnels
    };
    assert!(on(&lab, 2) <= 2, "segw2 holds {}", on(&lab, 2));
    assert_eq!(on(&lab, 1) + on(&lab, 2) + on(&lab, 3), 12);
}

#[test]
fn half_open_entries_expire_sooner_than_established_ones() {
    let mut lab = Lab::new();
    lab.up(sa_init(peer(1), 500, 1)).unwrap(); // stays half-open
    lab.open_tunnel(peer(2), 2); // answered: established
                                 // Initiator-side traffic alone, even past IKE_SA_INIT, is half-open.
    lab.up(auth_4500(peer(3), 4500, 3)).unwrap();
    lab.up(esp_udp(peer(4), 4500, 4)).unwrap();
    lab.tick(Duration::from_secs(31));
    assert_eq!(lab.lb.expire(lab.now, usize::MAX), 3);
    assert_eq!(lab.lb.table().counters.expired, 3);
    assert_eq!(lab.lb.table().len(), 1);
    lab.tick(Duration::from_secs(560)); // 591 s idle: under the 600 s idle timeout
    assert_eq!(lab.lb.expire(lab.now, usize::MAX), 0);
    lab.tick(Duration::from_secs(20));
    assert_eq!(lab.lb.expire(lab.now, usize::MAX), 1);
    assert!(lab.lb.table().is_empty());
    assert_eq!(
        lab.lb.gateways().map(|g| g.counters.tunnels).sum::<u64>(),
        0
    );
}

#[test]
fn an_ike_sa_init_flood_stays_in_bounds_and_moves_no_established_tunnel() {
    let mut lab = Lab::with_capacity(100);
    let established: Vec<(u8, u8)> = (1..=20)
        .map(|n| (n, lab.open_tunnel(peer(n), u64::from(n))))
        .collect();
    for i in 0..10_000u32 {
        let spoofed = IpAddr::V4(Ipv4Addr::from(0xcb00_7100 + i));
        let _ = lab.up(sa_init(spoofed, 500, u64::from(i) << 20));
        assert!(lab.lb.table().len() <= 100);
        assert!(lab.lb.table().half_open_len() <= 80);
    }
    for (n, gw) in established {
        assert_eq!(
            lab.up(esp_udp(peer(n), 4500, 1)),
            Ok(gw),
            "established tunnel {n} moved"
        );
    }
    assert!(lab.lb.table().counters.evicted_half_open > 9_000);
}

/// segw `gw`'s answer to peer `p`'s IKE_SA_INIT: what confirms a tunnel.
fn sa_init_answer(p: IpAddr, port: u16, spi: u64, responder_spi: u64) -> Vec<u8> {
    let h = IkeHeader {
        from_initiator: false,
        response: true,
        ..ike(spi, IKE_SA_INIT, responder_spi)
    };
    udp_packet(VIP, 500, p, port, &ike_body(&h, false, 100))
}

#[test]
fn an_ike_sa_the_entry_never_saw_is_learned_from_its_segw_and_then_proves_a_move() {
    // A tunnel on segw g at peer(1):4500 with IKE SA 0x11 ...
    let mut lab = Lab::new();
    let g = lab.up(sa_init(peer(1), 500, 0x11)).unwrap();
    lab.down(g, sa_init_answer(peer(1), 500, 0x11, RESPONDER_SPI))
        .unwrap();
    lab.up(auth_4500(peer(1), 4500, 0x11)).unwrap();
    let id = lab.lb.table().by_spi(0x11).unwrap();
    // ... whose peer has another IKE SA with g now, which the table never
    // saw (opened again after the table was saved, then a restart). g
    // speaks on it first: its DPD to the endpoint.
    let dpd = IkeHeader {
        initiator_spi: 0x22,
        responder_spi: 0x2222,
        exchange: INFORMATIONAL,
        from_initiator: false,
        response: false,
        message_id: 9,
    };
    lab.down(
        g,
        udp_packet(VIP, 4500, peer(1), 4500, &ike_body(&dpd, true, 60)),
    )
    .unwrap();
    assert_eq!(lab.lb.table().by_spi(0x22), Some(id), "the entry names it");
    assert_eq!(lab.lb.table().by_spi(0x11), None);
    // The peer's NAT rebinds: the new IKE SA's pair proves the move, and
    // the tunnel stays on g (no policy guess for an unknown SPI).
    let rebound = udp_packet(
        peer(1),
        40_001,
        VIP,
        4500,
        &ike_body(&ike(0x22, INFORMATIONAL, 0x2222), true, 60),
    );
    assert_eq!(lab.up(rebound), Ok(g));
    assert_eq!(lab.lb.table().by_endpoint(peer(1), 40_001), Some(id));
    assert_eq!(lab.lb.counters().placed, 1, "placed once, at the start");
}

#[test]
fn half_open_bookkeeping_stays_within_the_table_under_long_churn() {
    // Far more IKE_SA_INITs over time than the table holds, never full:
    // half of them answered (established), the rest left half-open, all
    // expiring in turn. What is kept for eviction order follows the table.
    let mut lab = Lab::with_capacity(100);
    for i in 0..10_000u32 {
        let p = IpAddr::V4(Ipv4Addr::from(0xc000_0000 + i));
        let spi = u64::from(i) + 1;
        let gw = lab.up(sa_init(p, 500, spi)).unwrap();
        if i % 2 == 0 {
            lab.down(gw, sa_init_answer(p, 500, spi, 0x77)).unwrap();
        }
        if i % 50 == 49 {
            lab.tick(Duration::from_secs(601));
            assert_eq!(lab.lb.expire(lab.now, usize::MAX), 50);
        }
        let t = lab.lb.table();
        let half_open = t
            .iter()
            .filter(|(_, t)| t.state() == TunnelState::HalfOpen)
            .count();
        assert_eq!(t.half_open_len(), half_open, "after IKE_SA_INIT {i}");
        assert!(t.half_open_len() <= t.len() && t.len() < 100);
    }
    assert_eq!(lab.lb.table().counters.evicted_half_open, 0);
}

#[test]
fn a_full_table_evicts_the_oldest_half_open_entry_even_from_a_reused_slot() {
    let mut lab = Lab::with_capacity(3);
    lab.up(sa_init(peer(1), 500, 1)).unwrap();
    lab.tick(Duration::from_secs(20));
    lab.up(sa_init(peer(2), 500, 2)).unwrap();
    lab.tick(Duration::from_secs(11));
    // Peer 1 gives up; its slot is free, and peer 2 is now the oldest.
    assert_eq!(lab.lb.expire(lab.now, usize::MAX), 1);
    lab.up(sa_init(peer(3), 500, 3)).unwrap(); // in peer 1's old slot
    lab.up(sa_init(peer(4), 500, 4)).unwrap();
    assert_eq!(lab.lb.table().len(), 3);
    lab.up(sa_init(peer(5), 500, 5)).unwrap();
    let t = lab.lb.table();
    assert_eq!(t.by_spi(2), None, "peer 2 was the oldest half-open entry");
    for spi in [3, 4, 5] {
        assert!(
            t.by_spi(spi).is_some(),
            "peer {spi} was evicted out of turn"
        );
    }
    assert_eq!(t.counters.evicted_half_open, 1);
}

#[test]
fn a_table_full_of_established_tunnels_refuses_new_ones() {
    let mut lab = Lab::with_capacity(3);
    for n in 1..=3 {
        lab.open_tunnel(peer(n), u64::from(n));
    }
    assert_eq!(lab.up(sa_init(peer(4), 500, 4)), Err(DropReason::TableFull));
    assert_eq!(
        lab.up(esp_udp(peer(5), 4500, 5)),
        Err(DropReason::TableFull)
    );
    assert_eq!(lab.lb.counters().dropped(DropReason::TableFull), 2);
}

#[test]
fn a_spoofed_esp_flood_cannot_lock_new_tunnels_out() {
    let mut lab = Lab::with_capacity(100);
    let established: Vec<(u8, u8)> = (1..=20)
        .map(|n| (n, lab.open_tunnel(peer(n), u64::from(n))))
        .collect();
    // After a balancer restart: ESP of a tunnel the table does not know is
    // placed, and its segw's answer establishes it.
    let restarted = peer(150);
    let gw_restarted = lab.up(esp_udp(restarted, 4500, 0x1500)).unwrap();
    let answer = udp_packet(VIP, 4500, restarted, 4500, &esp_body(0x5100, 1, 100));
    lab.down(gw_restarted, answer).unwrap();
    // ESP in UDP and raw ESP from spoofed sources: 100 times the table.
    let flood = |lab: &mut Lab, from: u32, n: u32| {
        for i in from..from + n {
            let spoofed = IpAddr::V4(Ipv4Addr::from(0xcb00_7100 + i));
            // Whether the flood gets through is not the point; the bound is.
            let _ = if i % 2 == 0 {
                lab.up(esp_udp(spoofed, 4500, i))
            } else {
                lab.up(ip_packet(spoofed, VIP, 50, &esp_body(i, 1, 80), 1))
            };
            assert!(lab.lb.table().len() <= 100);
        }
    };
    flood(&mut lab, 0, 10_000);
    assert_eq!(lab.lb.table().len(), 100);
    // A new tunnel still gets in, and stays once its segw has answered:
    // the flood evicts the entries no segw answered first.
    let newcomer = peer(200);
    let gw_new = lab
        .up(sa_init(newcomer, 500, 0x200))
        .expect("a new tunnel is let in");
    lab.down(gw_new, sa_init_answer(newcomer, 500, 0x200, 0x99))
        .unwrap();
    flood(&mut lab, 10_000, 1_000);
    assert_eq!(lab.up(auth_4500(newcomer, 4500, 0x200)), Ok(gw_new));
    lab.down(gw_new, auth_answer(newcomer, 4500, 0x200))
        .unwrap();
    for (n, gw) in established {
        assert_eq!(lab.up(esp_udp(peer(n), 4500, 1)), Ok(gw), "tunnel {n}");
    }
    assert_eq!(lab.up(esp_udp(restarted, 4500, 0x1500)), Ok(gw_restarted));
    assert_eq!(lab.lb.counters().dropped(DropReason::TableFull), 0);
    // What the flood left is forgotten on the half-open timeout.
    lab.tick(Duration::from_secs(31));
    lab.lb.expire(lab.now, usize::MAX);
    assert_eq!(lab.lb.table().len(), 22);
}

#[test]
fn only_a_miss_asks_the_policy_and_a_swap_moves_nothing_unless_asked() {
    let mut lab = Lab::new();
    for n in 1..=9 {
        lab.up(sa_init(peer(n), 500, u64::from(n))).unwrap();
        for _ in 0..5 {
            lab.up(auth_4500(peer(n), 4500, u64::from(n))).unwrap();
        }
    }
    assert_eq!(lab.lb.policy_stats().decisions, 9);
    let before: Vec<u64> = lab.lb.gateways().map(|g| g.counters.tunnels).collect();
    let (_, moved) = lab.lb.replace_policy(
        native::shipped("consistent-hash", &[]).unwrap(),
        false,
        lab.now,
    );
    assert_eq!(moved, 0);
    assert_eq!(
        before,
        lab.lb
            .gateways()
            .map(|g| g.counters.tunnels)
            .collect::<Vec<_>>()
    );
    let (_, moved) =
        lab.lb
            .replace_policy(native::shipped("weighted", &[]).unwrap(), true, lab.now);
    // Round-robin's placement is not weighted's: a rebalance moves some,
    // and says how many.
    assert!(moved > 0, "a rebalance to another policy moved nothing");
    assert_eq!(moved, lab.lb.counters().moved);
    assert_eq!(
        lab.lb.gateways().map(|g| g.counters.moved_in).sum::<u64>(),
        moved
    );
    assert_eq!(
        lab.lb.gateways().map(|g| g.counters.tunnels).sum::<u64>(),
        9
    );
}

#[test]
fn a_rebalance_places_a_floated_tunnel_by_the_endpoint_it_opened_from() {
    // Consistent hashing placed each tunnel by (address, 500); after the
    // float the tunnel lives on (address, NAT port). Placing it afresh with
    // the same policy must give the same segw: the policy sees the opening
    // key, not wherever the peer has moved to since.
    let ch = || native::shipped("consistent-hash", &[]).unwrap();
    let mut lb = super::farm::balancer(ch(), 3, vec!["10.2.2.1".parse().unwrap()], 1024);
    let send = |lb: &mut Balancer, ip: Vec<u8>| {
        let mut f = frame(port_mac(UPLINK), PEER_SIDE_ROUTER, None, &ip);
        lb.handle(&mut f, UPLINK, Timestamp::ZERO)
    };
    for n in 1..=60u8 {
        let spi = u64::from(n) << 8;
        send(&mut lb, sa_init(peer(n), 500, spi));
        // Through a NAT: IKE_AUTH on 4500 from another port.
        let natted = 30_000 + u16::from(n);
        assert!(matches!(
            send(&mut lb, auth_4500(peer(n), natted, spi)),
            Verdict::Forward(_)
        ));
    }
    let (_, moved) = lb.replace_policy(ch(), true, Timestamp::ZERO);
    assert_eq!(moved, 0);
}

#[test]
fn vlan_tagged_frames_keep_their_tag() {
    let mut lab = Lab::new();
    let ip = sa_init(peer(1), 500, 1);
    let original = frame(port_mac(UPLINK), PEER_SIDE_ROUTER, Some(300), &ip);
    let mut f = original.clone();
    assert_eq!(lab.lb.handle(&mut f, UPLINK, lab.now), Verdict::Forward(1));
    assert_eq!(&f[12..], &original[12..]);
}

#[test]
fn garbage_is_a_counted_drop() {
    let mut lab = Lab::new();
    let mut rng = crate::workload::Rng::new(9);
    for len in 0..2000 {
        let mut f: Vec<u8> = (0..len % 200).map(|_| rng.next_u64() as u8).collect();
        // Half of them with a plausible Ethernet/IPv4 start.
        if len % 2 == 0 && f.len() > 14 {
            f[12] = 0x08;
            f[13] = 0x00;
            f[14] = 0x45;
        }
        let port = (len % 4) as PortId;
        let _ = lab.lb.handle(&mut f, port, lab.now);
    }
    let c = lab.lb.counters();
    assert_eq!(c.drops.iter().sum::<u64>() + c.forwarded + c.replies, 2000);
    assert!(c.dropped(DropReason::Malformed) > 0);
}

#[test]
fn spi_ranges_steer_with_no_table_state_even_after_a_restart() {
    // A fresh balancer knows no tunnel; the SPIs say where each one lives.
    let mut lab = Lab::new();
    let segw3_ike = 0x03aa_bbcc_dd00_1122;
    let auth = udp_packet(
        peer(40),
        4500,
        VIP,
        4500,
        &ike_body(&ike(0x40, IKE_AUTH, segw3_ike), true, 200),
    );
    assert_eq!(lab.up(auth), Ok(3));
    // ESP into segw2's range, from an address nobody has seen (NAT rebinding).
    assert_eq!(lab.up(esp_udp(peer(41), 61_000, 0xc200_0042)), Ok(2));
    assert_eq!(
        lab.up(ip_packet(
            peer(42),
            VIP,
            50,
            &esp_body(0xc300_0001, 1, 80),
            1
        )),
        Ok(3)
    );
    assert_eq!(
        lab.lb.policy_stats().decisions,
        0,
        "steering never asks the policy"
    );
    assert_eq!(lab.lb.counters().steered, 3);
    // The table followed, so a keepalive of the steered tunnel finds it.
    assert_eq!(
        lab.up(udp_packet(peer(41), 61_000, VIP, 4500, &keepalive_body())),
        Ok(2)
    );
    // SPIs outside every range, and a responder SPI of 0, use the table.
    assert_eq!(lab.up(esp_udp(peer(43), 4500, 0x1234)), Ok(1));
    assert_eq!(lab.lb.policy_stats().decisions, 1);
}

#[test]
fn return_traffic_for_one_tunnel_behind_a_nat_never_moves_its_neighbour() {
    let mut lab = Lab::new();
    let nat = peer(100);
    let a = lab.up(auth_4500(nat, 40_001, 0xa)).unwrap();
    let b = lab.up(auth_4500(nat, 40_002, 0xb)).unwrap();
    assert_ne!(a, b);
    // segw3 talks to a third endpoint behind the same NAT address.
    let other = 6 - a - b;
    lab.down(
        other,
        udp_packet(VIP, 4500, nat, 40_003, &esp_body(9, 1, 60)),
    )
    .unwrap();
    assert_eq!(lab.up(esp_udp(nat, 40_001, 1)), Ok(a));
    assert_eq!(lab.up(esp_udp(nat, 40_002, 1)), Ok(b));
    assert_eq!(lab.up(esp_udp(nat, 40_003, 1)), Ok(other));
    assert_eq!(lab.lb.counters().moved, 0);
}

#[test]
fn the_address_still_finds_its_other_tunnels_when_the_latest_one_there_goes() {
    let mut lab = Lab::new();
    let nat = peer(100);
    // Two working tunnels behind one NAT address, on two segws.
    let open = |lab: &mut Lab, port, spi| {
        let gw = lab.up(auth_4500(nat, port, spi)).unwrap();
        let back = udp_packet(
            VIP,
            4500,
            nat,
            port,
            &esp_body(0x5000 + port as u32, 1, 100),
        );
        lab.down(gw, back).unwrap();
        gw
    };
    let a = open(&mut lab, 40_001, 0xa);
    lab.tick(Duration::from_secs(300));
    let b = open(&mut lab, 40_002, 0xb);
    assert_ne!(a, b);
    assert_eq!(lab.lb.table().by_addr(nat), lab.lb.table().by_spi(0xb));
    // a is busy, b goes quiet: at 601 s idle b is forgotten.
    lab.tick(Duration::from_secs(300));
    lab.up(esp_udp(nat, 40_001, 0xa0)).unwrap();
    lab.tick(Duration::from_secs(301));
    assert_eq!(lab.lb.expire(lab.now, usize::MAX), 1);
    assert_eq!(lab.lb.table().by_spi(0xb), None);
    // The NAT remaps a: its ESP comes from a new port before any IKE. The
    // address still names a, which keeps its segw; no policy call.
    let placed = lab.placed();
    assert_eq!(lab.up(esp_udp(nat, 41_001, 0xa0)), Ok(a));
    assert_eq!(lab.placed(), placed);
    assert_eq!(
        lab.lb.table().sole_tunnel_at(nat),
        lab.lb.table().by_spi(0xa)
    );
}

#[test]
fn neighbour_solicitations_for_proxied_ipv6_get_an_advertisement_from_the_ingress_port() {
    use crate::packet::ndp;
    use std::net::Ipv6Addr;
    let config = Config {
        port_macs: (0..4).map(port_mac).collect(),
        proxy: vec!["2001:db8:2::1".parse().unwrap()],
        proxy_gateways: Vec::new(),
        max_tunnels: 16,
        timeouts: Timeouts::default(),
    };
    let mut lb: Balancer = Balancer::new(config, native::shipped("round-robin", &[]).unwrap());
    let asker = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 7);
    let vip6 = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
    let solicit = |target| {
        frame(
            ndp::multicast_mac(ndp::solicited_node(target)),
            PEER_SIDE_ROUTER,
            None,
            &ndp::solicitation(asker, PEER_SIDE_ROUTER, target),
        )
    };
    let mut f = solicit(vip6);
    assert_eq!(lb.handle(&mut f, UPLINK, Timestamp::ZERO), Verdict::Reply);
    assert_eq!(
        (&f[0..6], &f[6..12]),
        (&PEER_SIDE_ROUTER[..], &port_mac(UPLINK)[..])
    );
    let Kind::Ip(ip) = packet::parse(&f).unwrap().kind else {
        panic!()
    };
    assert_eq!((ip.src, ip.dst), (IpAddr::V6(vip6), IpAddr::V6(asker)));
    let icmp = &f[14 + 40..];
    assert_eq!(icmp[0], ndp::ADVERTISEMENT);
    assert_eq!(&icmp[8..24], &vip6.octets());
    assert_eq!(
        &icmp[26..32],
        &port_mac(UPLINK),
        "target link-layer address option"
    );
    assert_eq!(f[14 + 7], 255, "hop limit");
    // The checksum verifies: summing the message with its checksum gives 0.
    assert!(crate::packet::checksum_ok_for_test(vip6, asker, icmp));
    let mut other = solicit(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 9));
    assert_eq!(
        lb.handle(&mut other, UPLINK, Timestamp::ZERO),
        Verdict::Drop(DropReason::NeighborIgnored)
    );
}

#[test]
fn announce_is_a_gratuitous_arp_or_an_unsolicited_advertisement_from_each_port() {
    use crate::packet::ndp;
    use std::net::Ipv6Addr;
    let lab = Lab::new();
    let vip = Ipv4Addr::new(10, 2, 2, 1);
    let sent = lab.lb.announce(IpAddr::V4(vip));
    assert_eq!(
        sent.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    for (port, f) in &sent {
        assert_eq!(
            (&f[0..6], &f[6..12]),
            (&[0xff; 6][..], &port_mac(*port)[..])
        );
        let Kind::Arp(arp) = packet::parse(f).unwrap().kind else {
            panic!("not ARP")
        };
        // A request for itself: every Linux neighbour table takes it.
        assert_eq!(
            arp,
            packet::arp::Arp {
                op: packet::arp::REQUEST,
                sender_mac: port_mac(*port),
                sender_ip: vip,
                target_mac: [0; 6],
                target_ip: vip,
            }
        );
    }
    let vip6 = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
    let sent = lab.lb.announce(IpAddr::V6(vip6));
    assert_eq!(sent.len(), 4);
    for (port, f) in &sent {
        assert_eq!(
            (&f[0..6], &f[6..12]),
            (&[0x33, 0x33, 0, 0, 0, 1][..], &port_mac(*port)[..]),
            "to all nodes, from the port"
        );
        let Kind::Ip(ip) = packet::parse(f).unwrap().kind else {
            panic!("not IP")
        };
        assert_eq!(
            (ip.src, ip.dst),
            (IpAddr::V6(vip6), IpAddr::V6(ndp::ALL_NODES))
        );
        assert_eq!(f[14 + 7], 255, "hop limit");
        let icmp = &f[14 + 40..];
        assert_eq!(icmp[0], ndp::ADVERTISEMENT);
        assert_eq!(icmp[4], 0x20, "override, not solicited, not a router");
        assert_eq!(&icmp[8..24], &vip6.octets());
        assert_eq!(&icmp[24..26], &[2, 1], "target link-layer address option");
        assert_eq!(&icmp[26..32], &port_mac(*port));
        assert!(crate::packet::checksum_ok_for_test(
            vip6,
            ndp::ALL_NODES,
            icmp
        ));
    }
}

#[test]
fn frames_and_bytes_are_counted_each_way_and_a_frame_that_cannot_go_is_not() {
    // One segw whose MAC is learned, not configured.
    let config = Config {
        port_macs: (0..2).map(port_mac).collect(),
        proxy: vec!["10.2.2.1".parse().unwrap()],
        proxy_gateways: Vec::new(),
        max_tunnels: 16,
        timeouts: Timeouts::default(),
    };
    let mut lb: Balancer = Balancer::new(config, native::shipped("round-robin", &[]).unwrap());
    let spec = GatewaySpec {
        name: "segw1".into(),
        port: 1,
        mac: None,
        weight: 1,
        capacity: 0,
        throughput: 0,
        steering: SpiSteering::default(),
    };
    lb.add_gateway(spec, Timestamp::ZERO).unwrap();
    let mut lab = Lab {
        lb,
        now: Timestamp::ZERO,
    };
    let init = sa_init(peer(1), 500, 1);
    assert_eq!(lab.up(init.clone()), Err(DropReason::GatewayMacUnknown));
    let c = lab.lb.gateway("segw1").unwrap().counters;
    assert_eq!((c.frames_to, c.bytes_to), (0, 0), "nothing was sent");
    // The segw's ARP teaches its MAC; now frames go, and are counted.
    let mut arp = arp_reply_from_segw(1);
    lab.lb.handle(&mut arp, 1, lab.now);
    assert_eq!(lab.up(init.clone()), Ok(1));
    let answer = sa_init_answer(peer(1), 500, 1, 0x77);
    lab.down(1, answer.clone()).unwrap();
    let esp = udp_packet(peer(1), 4500, VIP, 4500, &esp_body(0xe1, 1, 1000));
    assert_eq!(lab.up(esp.clone()), Ok(1));
    let c = lab.lb.gateway("segw1").unwrap().counters;
    // IP lengths: what went into the segw, and what came out of it.
    assert_eq!(
        (c.frames_to, c.bytes_to),
        (2, (init.len() + esp.len()) as u64)
    );
    assert_eq!((c.frames_from, c.bytes_from), (1, answer.len() as u64));
    assert_eq!(esp.len(), 20 + 8 + 1000);
    let (_, t) = lab.lb.table().iter().next().unwrap();
    assert_eq!((t.frames, t.bytes), (2, (init.len() + esp.len()) as u64));
    assert_eq!(lab.lb.counters().dropped(DropReason::GatewayMacUnknown), 1);
}

// ----- health probing -------------------------------------------------------

fn arp_reply_from_segw(n: u8) -> Vec<u8> {
    let vip = Ipv4Addr::new(10, 2, 2, 1);
    packet::arp::Arp {
        op: packet::arp::REPLY,
        sender_mac: segw_mac(n),
        sender_ip: vip,
        target_mac: port_mac(PortId::from(n)),
        target_ip: Ipv4Addr::UNSPECIFIED,
    }
    .to_frame(port_mac(PortId::from(n)), segw_mac(n), None)
}

#[test]
fn probes_are_arp_probes_for_the_vip_on_every_gateway_port() {
    let mut lab = Lab::new();
    let vip = Ipv4Addr::new(10, 2, 2, 1);
    let round = lab
        .lb
        .probe(&[vip.into()], &HealthConfig::default(), lab.now);
    assert!(round.changes.is_empty());
    let ports: Vec<PortId> = round.frames.iter().map(|(p, _)| *p).collect();
    assert_eq!(ports, vec![1, 2, 3]);
    for (port, frame) in &round.frames {
        let Kind::Arp(arp) = packet::parse(frame).unwrap().kind else {
            panic!("not ARP")
        };
        assert_eq!(arp.op, packet::arp::REQUEST);
        assert_eq!(arp.target_ip, vip);
        // An RFC 5227 probe: it claims no address.
        assert_eq!(arp.sender_ip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(arp.sender_mac, port_mac(*port));
        assert_eq!(&frame[0..6], &[0xff; 6]);
    }
}

#[test]
fn ipv6_probes_are_solicitations_from_the_ports_link_local_and_answers_teach_the_mac() {
    let mut lab = Lab::learning_macs();
    let vip6: Ipv6Addr = "2001:db8:2::1".parse().unwrap();
    let health = HealthConfig {
        interval: Duration::from_secs(1),
        down_after: 1,
        up_after: 1,
    };
    let round = lab.lb.probe(&[vip6.into()], &health, lab.now);
    assert_eq!(round.frames.len(), 3, "one solicitation per gateway port");
    for (port, frame) in &round.frames {
        let our_mac = port_mac(*port);
        let ll = packet::ndp::link_local(our_mac);
        let f = packet::parse(frame).unwrap();
        let Kind::Ip(ip) = &f.kind else {
            panic!("not IP")
        };
        let Payload::NeighborSolicit(ns) = &ip.payload else {
            panic!("not a solicitation: {:?}", ip.payload)
        };
        assert_eq!(ns.target, vip6);
        assert_eq!(ns.source_mac, Some(our_mac), "answers come back unicast");
        assert_eq!(ip.src, IpAddr::V6(ll));
        assert_eq!(
            ip.dst,
            IpAddr::V6(packet::ndp::solicited_node(vip6)),
            "to the VIP's solicited-node group"
        );
        assert_eq!(
            &frame[0..6],
            &packet::ndp::multicast_mac(packet::ndp::solicited_node(vip6))
        );
        assert_eq!(frame[14 + 7], 255, "hop limit 255, or receivers ignore it");
    }
    // segw1 answers with an advertisement to our link-local address; segw2
    // only asks for our link-local address (its neighbour check) and is
    // answered; segw3 says nothing.
    let (p1, p2) = (PortId::from(1u8), PortId::from(2u8));
    let na = packet::ndp::advertisement(
        vip6,
        segw_mac(1),
        packet::ndp::link_local(port_mac(p1)),
        true,
    );
    let mut f = frame(port_mac(p1), segw_mac(1), None, &na);
    assert_eq!(
        lab.lb.handle(&mut f, p1, lab.now),
        Verdict::Drop(DropReason::LinkScoped),
        "an answer to our probe stops here, never crossing to the uplink"
    );
    let segw2_ll = packet::ndp::link_local(segw_mac(2));
    let ns =
        packet::ndp::solicitation(segw2_ll, segw_mac(2), packet::ndp::link_local(port_mac(p2)));
    let mut f = frame(
        packet::ndp::multicast_mac(Ipv6Addr::UNSPECIFIED),
        segw_mac(2),
        None,
        &ns,
    );
    f[0] = 0x33; // multicast
    assert_eq!(lab.lb.handle(&mut f, p2, lab.now), Verdict::Reply);
    let Kind::Ip(reply) = packet::parse(&f).unwrap().kind else {
        panic!("no advertisement")
    };
    assert_eq!(reply.src, IpAddr::V6(packet::ndp::link_local(port_mac(p2))));
    assert_eq!(reply.dst, IpAddr::V6(segw2_ll));
    assert_eq!(&f[0..6], &segw_mac(2));
    for n in [1u8, 2] {
        let g = lab.lb.gateway(&format!("segw{n}")).unwrap();
        assert_eq!(g.mac, Some(segw_mac(n)), "segw{n}'s MAC learned by NDP");
    }
    assert_eq!(lab.lb.gateway("segw3").unwrap().mac, None);
    let changes = lab
        .lb
        .probe(&[vip6.into()], &health, lab.now + health.interval)
        .changes;
    let down: Vec<&str> = changes.iter().map(|c| c.1.as_str()).collect();
    assert_eq!(down, vec!["segw3"], "the silent one, alone");
}

#[test]
fn a_silent_segw_goes_down_after_the_threshold_and_comes_back_when_it_answers() {
    let mut lab = Lab::new();
    let vip = Ipv4Addr::new(10, 2, 2, 1);
    let health = HealthConfig {
        interval: Duration::from_secs(1),
        down_after: 3,
        up_after: 2,
    };
    let round = |lab: &mut Lab, answering: &[u8]| {
        for &n in answering {
            let mut f = arp_reply_from_segw(n);
            lab.lb.handle(&mut f, PortId::from(n), lab.now);
        }
        lab.now = lab.now + health.interval;
        lab.lb.probe(&[vip.into()], &health, lab.now).changes
    };
    assert!(
        round(&mut lab, &[]).is_empty(),
        "the first round judges nothing"
    );
    // segw2 stops answering: down on the third missed round, not before.
    for _ in 0..2 {
        assert!(round(&mut lab, &[1, 2, 3]).is_empty());
    }
    assert!(round(&mut lab, &[1, 3]).is_empty());
    assert!(round(&mut lab, &[1, 3]).is_empty());
    let changes = round(&mut lab, &[1, 3]);
    assert_eq!(changes.len(), 1);
    assert_eq!((changes[0].1.as_str(), changes[0].2), ("segw2", false));
    assert!(!lab.lb.gateway("segw2").unwrap().healthy);
    // New tunnels avoid it.
    for i in 0..6u8 {
        let peer = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 100 + i));
        assert_ne!(lab.up(esp_udp(peer, 4500, 0x100 + u32::from(i))), Ok(2));
    }
    // It answers again: up after two answered rounds.
    assert!(round(&mut lab, &[1, 2, 3]).is_empty());
    let changes = round(&mut lab, &[1, 2, 3]);
    assert_eq!((changes[0].1.as_str(), changes[0].2), ("segw2", true));
    assert!(lab.lb.gateway("segw2").unwrap().healthy);
}

#[test]
fn traffic_from_a_segw_counts_as_an_answer() {
    let mut lab = Lab::new();
    let vip = Ipv4Addr::new(10, 2, 2, 1);
    let health = HealthConfig {
        interval: Duration::from_secs(1),
        down_after: 1,
        up_after: 1,
    };
    lab.lb.probe(&[vip.into()], &health, lab.now);
    // Only segw1 carries ESP back to a peer; nobody answers ARP.
    let peer = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    assert_eq!(lab.up(esp_udp(peer, 4500, 0x77)), Ok(1));
    let back = udp_packet(VIP, 4500, peer, 4500, &esp_body(0x99, 1, 120));
    assert!(lab.down(1, back).is_ok());
    let changes = lab
        .lb
        .probe(&[vip.into()], &health, lab.now + health.interval)
        .changes;
    let down: Vec<&str> = changes.iter().map(|c| c.1.as_str()).collect();
    assert_eq!(down, vec!["segw2", "segw3"]);
}

// ----- an attacker on the initiators' side ----------------------------------
//
// An off-path host that can spoof any source address, or a host on the
// uplink's segment. Each test is an attack that worked before the rules
// were one table (`rules.rs`).

/// A host on the uplink's segment, not the initiators' router.
const ATTACKER_MAC: Mac = [2, 0xee, 0xee, 0, 0, 1];

fn raw_esp(p: IpAddr, spi: u32) -> Vec<u8> {
    ip_packet(p, VIP, 50, &esp_body(spi, 1, 80), 1)
}

#[test]
fn an_spi_from_a_segws_range_cannot_move_a_tunnel_a_segw_confirmed() {
    let mut lab = Lab::new();
    // The victim's tunnel is on segw1, which its answer confirmed.
    let victim = peer(1);
    assert_eq!(lab.open_tunnel(victim, 1), 1);
    // Spoofed from the victim's address and endpoint, with SPIs from the
    // ranges segw3 and segw2 allocate from.
    assert_eq!(lab.up(raw_esp(victim, 0xc300_0001)), Ok(1));
    assert_eq!(lab.up(esp_udp(victim, 4500, 0xc200_0001)), Ok(1));
    assert_eq!(lab.lb.counters().spi_overruled, 2);
    assert_eq!(lab.lb.counters().moved, 0);
    // The victim's own traffic, and segw1's, are where they were.
    assert_eq!(lab.up(esp_udp(victim, 4500, 0x1111)), Ok(1));
    let back = udp_packet(VIP, 4500, victim, 4500, &esp_body(0x2222, 1, 100));
    assert_eq!(lab.down(1, back), Ok(PEER_SIDE_ROUTER));
    assert_eq!(lab.lb.counters().conflicts, 0);
    for (name, tunnels) in [("segw1", 1), ("segw2", 0), ("segw3", 0)] {
        assert_eq!(lab.lb.gateway(name).unwrap().counters.tunnels, tunnels);
    }
    // A guess is what an SPI range may correct: ESP of a tunnel a fresh
    // balancer has not seen goes by the policy, then its SPI says segw3.
    let unseen = peer(7);
    let guessed = lab.up(esp_udp(unseen, 4500, 0x1234)).unwrap();
    assert_ne!(guessed, 3);
    assert_eq!(lab.up(esp_udp(unseen, 4500, 0xc300_0007)), Ok(3));
    assert_eq!(
        lab.up(udp_packet(unseen, 4500, VIP, 4500, &keepalive_body())),
        Ok(3)
    );
}

#[test]
fn another_mac_on_the_segment_cannot_redirect_return_traffic() {
    let mut lab = Lab::new();
    let victim = peer(1);
    let gw = lab.open_tunnel(victim, 1);
    let back = || udp_packet(VIP, 4500, victim, 4500, &esp_body(0x2222, 1, 100));
    // One frame of the victim's tunnel from another MAC on the segment,
    // and an IKE message that does not carry the tunnel's SPI pair.
    assert_eq!(
        lab.up_from(ATTACKER_MAC, esp_udp(victim, 4500, 0x1)),
        Ok(gw)
    );
    let wrong_pair = udp_packet(
        victim,
        4500,
        VIP,
        4500,
        &ike_body(&ike(1, INFORMATIONAL, 0xbad), true, 60),
    );
    assert_eq!(lab.up_from(ATTACKER_MAC, wrong_pair), Ok(gw));
    assert_eq!(lab.down(gw, back()), Ok(PEER_SIDE_ROUTER));
    // Nor the way back to peers whose next hop is not known yet (a tunnel
    // a segw taught after a restart).
    let taught = udp_packet(VIP, 4500, peer(66), 4500, &esp_body(0x66, 1, 100));
    assert_eq!(lab.down(2, taught), Ok(PEER_SIDE_ROUTER));
    // A frame that proves the tunnel (its IKE SPI pair: the responder half
    // came in the segw's answer) moves the next hop: a router failover.
    const NEW_ROUTER: Mac = [2, 0xaa, 0, 0, 0, 2];
    let dpd = udp_packet(
        victim,
        4500,
        VIP,
        4500,
        &ike_body(&ike(1, INFORMATIONAL, RESPONDER_SPI), true, 60),
    );
    assert_eq!(lab.up_from(NEW_ROUTER, dpd), Ok(gw));
    assert_eq!(lab.down(gw, back()), Ok(NEW_ROUTER));
}

#[test]
fn an_ike_move_needs_the_responder_spi_the_segw_answered_with() {
    let mut lab = Lab::new();
    lab.up(sa_init(peer(1), 500, 1)).unwrap();
    let victim = peer(8);
    let gw = lab.open_tunnel(victim, 8);
    let id = lab.lb.table().by_spi(8).unwrap();
    // The initiator SPI is on the wire; the responder SPI an off-path
    // spoofer guesses.
    let spoofer = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 66));
    let informational = |from, responder| {
        udp_packet(
            from,
            4500,
            VIP,
            4500,
            &ike_body(&ike(8, INFORMATIONAL, responder), true, 60),
        )
    };
    // Sent to the segw that holds the SA (it judges the message), moving
    // nothing.
    assert_eq!(lab.up(informational(spoofer, 0x1234)), Ok(gw));
    let t = lab.lb.table();
    assert_eq!(t.by_endpoint(victim, 4500), Some(id), "binding kept");
    assert_eq!(t.by_endpoint(spoofer, 4500), None);
    assert_eq!(lab.lb.counters().unproven_moves, 1);
    assert_eq!(lab.up(esp_udp(victim, 4500, 0xe8)), Ok(gw));
    // With the pair the segw answered with: MOBIKE, a NAT rebinding.
    let moved_to = peer(88);
    assert_eq!(lab.up(informational(moved_to, RESPONDER_SPI)), Ok(gw));
    assert_eq!(lab.lb.table().by_endpoint(moved_to, 4500), Some(id));
    assert_eq!(lab.lb.table().by_endpoint(victim, 4500), None);
}

#[test]
fn a_move_never_takes_another_tunnels_endpoint() {
    let mut lab = Lab::new();
    let (a, b) = (peer(1), peer(2));
    let gw_a = lab.open_tunnel(a, 0xa);
    let gw_b = lab.open_tunnel(b, 0xb);
    assert_ne!(gw_a, gw_b);
    let id_a = lab.lb.table().by_spi(0xa).unwrap();
    // b's own pair, from a's endpoint (b moved behind a's NAT port, or
    // someone on the path replays b's IKE from there).
    let b_from_a = udp_packet(
        a,
        4500,
        VIP,
        4500,
        &ike_body(&ike(0xb, INFORMATIONAL, RESPONDER_SPI), true, 60),
    );
    assert_eq!(lab.up(b_from_a), Ok(gw_b), "b's IKE still reaches b's segw");
    assert_eq!(lab.lb.table().by_endpoint(a, 4500), Some(id_a));
    assert_eq!(lab.lb.table().counters.rebind_refused, 1);
    assert_eq!(lab.up(esp_udp(a, 4500, 0xa1)), Ok(gw_a));
    // From a's own address it is a's peer re-establishing (its old IKE SA
    // given up, behind the same NAT): the new IKE SA, proven, takes the
    // endpoint, wherever the policy placed it.
    let again = lab.up(sa_init(a, 40_500, 0xa2)).unwrap();
    assert_ne!(again, gw_a);
    lab.down(again, sa_init_answer(a, 40_500, 0xa2, RESPONDER_SPI))
        .unwrap();
    assert_eq!(lab.up(auth_4500(a, 4500, 0xa2)), Ok(again));
    assert_eq!(
        lab.lb.table().by_endpoint(a, 4500),
        lab.lb.table().by_spi(0xa2)
    );
    assert_eq!(lab.up(esp_udp(a, 4500, 0xa3)), Ok(again));
    assert_eq!(lab.lb.table().counters.rebind_refused, 1);
    // A half-open entry there (nothing a segw spoke for) gives way.
    let c = peer(3);
    lab.up(sa_init(c, 4500, 0xc)).unwrap();
    let b_from_c = udp_packet(
        c,
        4500,
        VIP,
        4500,
        &ike_body(&ike(0xb, INFORMATIONAL, RESPONDER_SPI), true, 60),
    );
    let tunnels = lab.lb.table().len();
    assert_eq!(lab.up(b_from_c), Ok(gw_b));
    assert_eq!(
        lab.lb.table().by_endpoint(c, 4500),
        lab.lb.table().by_spi(0xb)
    );
    assert_eq!(lab.lb.table().len(), tunnels - 1);
    let counted: u64 = lab.lb.gateways().map(|g| g.counters.tunnels).sum();
    assert_eq!(
        counted,
        tunnels as u64 - 1,
        "the evicted entry left its gateway's count"
    );
}

#[test]
fn esp_in_udp_from_an_unseen_port_behind_a_nat_asks_the_policy() {
    let mut lab = Lab::new();
    let nat = peer(100);
    // Two working tunnels behind one NAT address, on segw1 and segw2.
    for (port, spi) in [(40_001, 0xa), (40_002, 0xb)] {
        let gw = lab.up(auth_4500(nat, port, spi)).unwrap();
        let back = udp_packet(VIP, 4500, nat, port, &esp_body(spi as u32, 1, 100));
        lab.down(gw, back).unwrap();
    }
    // A third peer behind the NAT, whose tunnel this balancer has not seen:
    // the address does not say which of the two it might be, so the policy
    // guesses (round-robin: segw3), and the segw that holds it corrects.
    let placed = lab.placed();
    assert_eq!(lab.up(esp_udp(nat, 40_003, 0xc)), Ok(3));
    assert_eq!(lab.placed(), placed + 1);
    let id = lab.lb.table().by_endpoint(nat, 40_003).unwrap();
    assert_eq!(
        lab.lb.table().get(id).unwrap().placement(),
        Placement::Guessed
    );
    let back = udp_packet(VIP, 4500, nat, 40_003, &esp_body(0x33, 1, 100));
    lab.down(1, back).unwrap();
    assert_eq!(lab.up(esp_udp(nat, 40_003, 0xc)), Ok(1));
    // A keepalive from a fourth port names no tunnel.
    let ka = udp_packet(nat, 40_004, VIP, 4500, &keepalive_body());
    assert_eq!(lab.up(ka), Err(DropReason::UnknownTunnel));
}

#[test]
fn a_spoofed_ike_sa_init_from_a_peers_address_does_not_take_its_raw_esp() {
    let mut lab = Lab::new();
    // A tunnel with no NAT: IKE on 500, raw ESP, on segw1.
    let victim = peer(5);
    let gw = lab.up(sa_init(victim, 500, 5)).unwrap();
    lab.down(gw, sa_init_answer(victim, 500, 5, RESPONDER_SPI))
        .unwrap();
    assert_eq!(lab.up(raw_esp(victim, 0x55)), Ok(gw));
    lab.down(gw, ip_packet(VIP, victim, 50, &esp_body(0x5555, 1, 80), 1))
        .unwrap();
    // An IKE_SA_INIT spoofed from the victim's address (another port, a
    // new SPI): a new half-open tunnel, on another segw.
    let spoofed = lab.up(sa_init(victim, 501, 0xdead)).unwrap();
    assert_ne!(spoofed, gw);
    // The victim's ESP, and its segw's to it, find the tunnel a segw
    // confirmed, not the newest at the address.
    assert_eq!(lab.up(raw_esp(victim, 0x55)), Ok(gw));
    let back = ip_packet(VIP, victim, 50, &esp_body(0x5555, 1, 80), 1);
    assert_eq!(lab.down(gw, back), Ok(PEER_SIDE_ROUTER));
    assert_eq!(lab.lb.counters().conflicts, 0);
}

#[test]
fn frames_not_addressed_to_the_ports_mac_are_not_ours() {
    let mut lab = Lab::new();
    // Flooded by a switch: an IKE_SA_INIT from an initiator to another
    // host, and a segw's ESP to another host.
    let mut to_other = frame(
        [2, 0x77, 0, 0, 0, 9],
        PEER_SIDE_ROUTER,
        None,
        &sa_init(peer(1), 500, 1),
    );
    assert_eq!(
        lab.lb.handle(&mut to_other, UPLINK, lab.now),
        Verdict::Drop(DropReason::NotForUs)
    );
    let esp = ip_packet(VIP, peer(1), 50, &esp_body(1, 1, 80), 1);
    let mut from_segw = frame([2, 0x77, 0, 0, 0, 9], segw_mac(1), None, &esp);
    assert_eq!(
        lab.lb.handle(&mut from_segw, 1, lab.now),
        Verdict::Drop(DropReason::NotForUs)
    );
    // An IP packet to the broadcast address is not ours either.
    let mut broadcast = frame([0xff; 6], PEER_SIDE_ROUTER, None, &sa_init(peer(1), 500, 1));
    assert_eq!(
        lab.lb.handle(&mut broadcast, UPLINK, lab.now),
        Verdict::Drop(DropReason::NotForUs)
    );
    assert_eq!(lab.placed(), 0);
    assert!(lab.lb.table().is_empty());
    assert!(DropReason::NotForUs.is_foreign());
    // ARP requests are broadcast: still answered.
    let mut arp = arp_frame(true, Ipv4Addr::new(10, 2, 2, 1));
    assert_eq!(lab.lb.handle(&mut arp, UPLINK, lab.now), Verdict::Reply);
}

#[test]
fn two_peers_behind_a_nat_reusing_an_ip_id_each_keep_their_segw() {
    let mut lab = Lab::new();
    let nat = peer(100);
    let tunnels = [(40_001, 0xa), (40_002, 0xb)];
    let gws: Vec<u8> = tunnels
        .iter()
        .map(|&(port, spi)| lab.up(auth_4500(nat, port, spi)).unwrap())
        .collect();
    assert_ne!(gws[0], gws[1]);
    // The NAT keeps each host's IPv4 ID: both happen to send packet 0x4242.
    let big = |port, spi| {
        udp_packet(
            nat,
            port,
            VIP,
            4500,
            &ike_body(&ike(spi, IKE_AUTH, RESPONDER_SPI), true, 3000),
        )
    };
    for (&(port, spi), &gw) in tunnels.iter().zip(&gws) {
        let pieces = fragments(&big(port, spi), 1400, 0x4242);
        let left = send_pieces(&mut lab, &pieces);
        assert_all_on(&left, &pieces, gw);
    }
    // A later piece of another protocol with the same addresses and ID is
    // another packet: it waits for its own first piece.
    let raw = ip_packet(nat, VIP, 50, &esp_body(0xe5, 1, 3000), 0x4242);
    let pieces = fragments(&raw, 1400, 0x4242);
    assert_eq!(lab.up_frames(pieces[1].clone()), Ok(Vec::new()), "held");
}

#[test]
fn a_flood_of_first_fragments_cannot_stop_the_fragments_of_a_tunnel() {
    let mut lab = Lab::with_capacity(1 << 20);
    let victim = peer(1);
    let gw = lab.open_tunnel(victim, 1);
    // More spoofed first fragments than decisions are kept, within the
    // time a decision lasts.
    let n = fragments::DECIDED as u32 + 10_000;
    for i in 0..n {
        let spoofed = IpAddr::V4(Ipv4Addr::from(0xcb00_0000 + i));
        let esp = udp_packet(spoofed, 4500, VIP, 4500, &esp_body(i, 1, 1600));
        let first = fragments(&esp, 1400, i).swap_remove(0);
        let _ = lab.up(first);
    }
    assert!(
        lab.lb.fragment_decisions().1 >= 10_000,
        "the oldest evicted"
    );
    // The victim's fragmented packet: its first piece is decided, and the
    // later one follows it, not held and dropped.
    let big = udp_packet(victim, 4500, VIP, 4500, &esp_body(0x11, 2, 3000));
    let pieces = fragments(&big, 1400, 0x77);
    let left = send_pieces(&mut lab, &pieces);
    assert_all_on(&left, &pieces, gw);
    assert_eq!(lab.lb.held_fragments(), (0, 0, 0));
}

#[test]
fn a_saved_table_restored_in_a_fresh_balancer_moves_nothing() {
    use super::saved::{decode, encode};
    let mut a = Lab::new();
    let spi = |n: u8| 0x5a00 + u64::from(n);
    let placed: Vec<(IpAddr, u8)> = (1..=9)
        .map(|n| (peer(n), a.open_tunnel(peer(n), spi(n))))
        .collect();
    // One more that only opened: half-open, its segw has not answered.
    let half_open = a.up(sa_init(peer(10), 500, spi(10))).unwrap();
    a.tick(Duration::from_secs(30));
    let file = encode(&a.lb.save(a.now));

    // A new process: its own clock, a policy starting its rotation anew.
    let mut b = Lab::new();
    b.now = Timestamp::from_secs(100);
    let restored = b.lb.restore(&decode(&file).unwrap(), b.now);
    assert_eq!(restored.loaded, 10, "{restored}");
    assert_eq!((restored.unknown_gateway, restored.invalid), (0, 0));
    // Open a decoy first: without the table, round-robin would now put
    // every tunnel one segw further.
    b.up(sa_init(peer(50), 500, 0xdec0)).unwrap();
    let decided = b.placed();
    for (n, &(p, gw)) in (1u8..).zip(&placed) {
        assert_eq!(
            b.up(esp_udp(p, 4500, 0x100 + u32::from(n))),
            Ok(gw),
            "ESP of {p}"
        );
        assert_eq!(b.up(auth_4500(p, 4500, spi(n))), Ok(gw), "IKE of {p}");
        // A DPD restart from where it opened: a new IKE SA, same segw.
        assert_eq!(
            b.up(sa_init(p, 500, spi(n) + 0x1000)),
            Ok(gw),
            "restart of {p}"
        );
    }
    assert_eq!(b.up(sa_init(peer(10), 500, spi(10))), Ok(half_open));
    assert_eq!(b.placed(), decided, "no tunnel asked the policy again");
    // Ages carried over: opened 30 s before the save.
    let oldest = b.lb.table().iter().map(|(_, t)| t.since).min().unwrap();
    assert_eq!(oldest, Timestamp::from_secs(70));
}

#[test]
fn a_state_file_damaged_cut_foreign_or_for_other_gateways_is_refused_or_trimmed() {
    use super::saved::{decode, encode, StateError};
    let mut a = Lab::new();
    for n in 1..=6 {
        a.open_tunnel(peer(n), 0x7700 + u64::from(n));
    }
    let saved = a.lb.save(a.now);
    let file = encode(&saved);
    assert_eq!(decode(&file).unwrap(), saved);

    let mut flipped = file.clone();
    let last = flipped.len() - 5;
    flipped[last] ^= 0x01;
    assert_eq!(decode(&flipped), Err(StateError::Checksum));
    let cut = &file[..file.len() - 40];
    assert!(matches!(
        decode(cut),
        Err(StateError::Count { expected: 6, .. })
    ));
    let foreign =
        String::from_utf8(file.clone())
            .unwrap()
            .replacen("segwlb-state 1 ", "segwlb-state 2 ", 1);
    assert_eq!(
        decode(foreign.as_bytes()),
        Err(StateError::Version { found: "2".into() })
    );
    assert_eq!(decode(b""), Err(StateError::NotAStateFile));
    assert_eq!(decode(b"{\"peer\":1}\n"), Err(StateError::NotAStateFile));

    // Fields this build does not know, a tunnel twice: dropped, counted.
    let mut odd = saved.clone();
    odd[0].placement = "teleported".into();
    odd.push(saved[1].clone());
    let mut b = Lab::new();
    let r = b.lb.restore(&decode(&encode(&odd)).unwrap(), b.now);
    assert_eq!((r.loaded, r.invalid), (5, 2), "{r}");

    // A config with segw3 gone: its tunnels are dropped and counted; the
    // others are restored.
    let on_segw3 = saved.iter().filter(|t| t.gateway == "segw3").count();
    assert!(on_segw3 > 0);
    let mut two =
        super::farm::balancer(native::shipped("round-robin", &[]).unwrap(), 2, vec![], 64);
    let r = two.restore(&saved, Timestamp::ZERO);
    assert_eq!(
        (r.loaded, r.unknown_gateway),
        (6 - on_segw3, on_segw3),
        "{r}"
    );
    // A table too small: the rest counted, not a crash.
    let mut small =
        super::farm::balancer(native::shipped("round-robin", &[]).unwrap(), 3, vec![], 4);
    let r = small.restore(&saved, Timestamp::ZERO);
    assert_eq!((r.loaded, r.table_full), (4, 2), "{r}");
}

#[test]
fn a_bulk_frame_counts_as_the_packets_it_stands_for_and_rates_follow() {
    let mut lab = Lab::new();
    let p = peer(7);
    assert_eq!(lab.up(sa_init(p, 500, 0x77)), Ok(1));
    let bulk = Bulk {
        packets: 1_000,
        bytes: 800_000,
    };
    let mut f = frame(
        port_mac(UPLINK),
        PEER_SIDE_ROUTER,
        None,
        &esp_udp(p, 500, 0xc100_0007),
    );
    let len = f.len();
    let forwarded = lab.lb.counters().forwarded;
    lab.lb.measure(lab.now);
    assert_eq!(
        lab.lb.handle_bulk(&mut f, UPLINK, lab.now, bulk),
        Verdict::Forward(1)
    );
    assert_eq!(f.len(), len, "the frame itself is forwarded as it is");
    assert_eq!(lab.lb.counters().forwarded, forwarded + 1_000);
    let g = lab.lb.gateway("segw1").unwrap().counters;
    let ike = lab.lb.table().iter().next().unwrap().1.bytes - 800_000;
    assert_eq!((g.frames_to, g.bytes_to), (1_001, 800_000 + ike));
    // Back from the segw: four times as much.
    let back = udp_packet(VIP, 500, p, 500, &esp_body(0x00ab_cdef, 1, 120));
    let mut f = frame(port_mac(1), segw_mac(1), None, &back);
    let down = Bulk {
        packets: 4_000,
        bytes: 3_200_000,
    };
    assert_eq!(
        lab.lb.handle_bulk(&mut f, 1, lab.now, down),
        Verdict::Forward(UPLINK)
    );
    // A second later: the gateway's rates, as its load view shows them.
    lab.tick(Duration::from_secs(1));
    lab.lb.measure(lab.now);
    let rates = lab.lb.gateway("segw1").unwrap().meter.rates;
    // The measurement before the bulk saw the IKE_SA_INIT: what came since.
    assert_eq!((rates.packets_to, rates.packets_from), (1_000.0, 4_000.0));
    assert_eq!(rates.bytes_from, 3_200_000.0);
    let view = lab.lb.load().gateway(1);
    assert_eq!((view.bytes_from, view.packets_from), (3_200_000, 4_000));
    // No throughput given: nothing to be full of.
    assert_eq!(view.utilization, 0.0);
    lab.lb.set_throughput("segw1", 8_000_000, lab.now).unwrap();
    lab.lb.measure(lab.now + Duration::from_millis(1));
    assert!(lab.lb.load().gateway(1).utilization > 0.0);
}

#[test]
fn a_reported_utilization_counts_for_policies_after_the_blackout_only() {
    let mut lab = Lab::new();
    lab.lb.set_throughput("segw2", 1_000_000, lab.now).unwrap();
    lab.lb.report_utilization("segw2", 0.9, lab.now).unwrap();
    lab.lb.measure(lab.now);
    assert_eq!(lab.lb.load().gateway(2).reported, None);
    lab.tick(Duration::from_secs(10));
    lab.lb.report_utilization("segw2", 0.8, lab.now).unwrap();
    lab.lb.measure(lab.now);
    let g = lab.lb.load().gateway(2);
    assert_eq!((g.reported, g.utilization), (Some(0.8), 0.8));
    assert_eq!(
        lab.lb.report_utilization("segw9", 0.1, lab.now),
        Err(GatewayError::Unknown("segw9".into()))
    );
    // Three minutes without a report: dropped.
    lab.tick(Duration::from_secs(180));
    lab.lb.measure(lab.now);
    assert_eq!(lab.lb.load().gateway(2).reported, None);
}

// ----- graceful moves (make-before-break) -----------------------------------

/// The segw's IKE_AUTH answer for IKE SA `spi`, to the peer's 4500 endpoint.
fn auth_answer(p: IpAddr, port: u16, spi: u64) -> Vec<u8> {
    let h = IkeHeader {
        from_initiator: false,
        response: true,
        ..ike(spi, IKE_AUTH, RESPONDER_SPI)
    };
    udp_packet(VIP, 4500, p, port, &ike_body(&h, true, 300))
}

fn gateway_of_spi(lab: &Lab, spi: u64) -> Option<u8> {
    let id = lab.lb.table().by_spi(spi)?;
    Some(lab.lb.table().get(id)?.gateway as u8)
}

/// A peer behind a NAT (IKE from 40000, NAT-T from 40001) with a working
/// tunnel on segw1, IKE SA 0x1, sending ESP on SPI 0x1000.
fn nat_peer_on_segw1(lab: &mut Lab) -> IpAddr {
    let p = peer(40);
    assert_eq!(lab.up(sa_init(p, 40000, 0x1)), Ok(1));
    lab.down(1, sa_init_answer(p, 40000, 0x1, RESPONDER_SPI))
        .unwrap();
    assert_eq!(lab.up(auth_4500(p, 40001, 0x1)), Ok(1));
    lab.down(1, auth_answer(p, 40001, 0x1)).unwrap();
    assert_eq!(lab.up(esp_udp(p, 40001, 0x1000)), Ok(1));
    p
}

#[test]
fn a_graceful_drain_moves_a_tunnel_make_before_break_with_no_frame_lost() {
    let mut lab = Lab::new();
    let p = nat_peer_on_segw1(&mut lab);
    assert_eq!(lab.lb.drain_gracefully("segw1", lab.now), Ok(1));
    // Queued, not moved: its traffic still goes to segw1.
    assert_eq!(lab.up(esp_udp(p, 40001, 0x1000)), Ok(1));
    let asks = lab.lb.graceful_step(lab.now);
    assert_eq!(asks.len(), 1, "{asks:?}");
    let ask = &asks[0];
    assert_eq!((ask.peer, ask.peer_port, ask.from), (p, 40001, 1));
    assert_eq!(
        (ask.ike_spi, ask.responder_spi),
        (Some(0x1), Some(RESPONDER_SPI))
    );
    let to = ask.to as u8;
    assert_ne!(to, 1);
    assert_eq!(lab.lb.moves().progress().asked, 1);

    // The old segw redirects the peer; until the new SAs work, every old
    // frame still reaches segw1.
    assert_eq!(lab.up(esp_udp(p, 40001, 0x1000)), Ok(1));
    // The new IKE SA, from the endpoint the tunnel opened from, goes to the
    // target, decided by the move (no policy call), as a second entry.
    let decisions = lab.lb.policy_stats().decisions;
    assert_eq!(lab.up(sa_init(p, 40000, 0x2)), Ok(to));
    assert_eq!(lab.lb.policy_stats().decisions, decisions);
    assert_eq!(lab.lb.table().len(), 2);
    lab.down(to, sa_init_answer(p, 40000, 0x2, RESPONDER_SPI))
        .unwrap();
    assert_eq!(lab.up(auth_4500(p, 40001, 0x2)), Ok(to));
    assert_eq!(lab.up(esp_udp(p, 40001, 0x1000)), Ok(1), "old SA mid-move");
    assert_eq!(lab.lb.moves().progress().moving, 1);
    // The old segw keeps talking on the old SAs: to the peer, no conflict.
    let conflicts = lab.lb.counters().conflicts;
    lab.down(
        1,
        udp_packet(VIP, 4500, p, 40001, &esp_body(0x5000, 9, 100)),
    )
    .unwrap();
    lab.down(1, auth_answer(p, 40001, 0x1)).unwrap();
    assert_eq!(lab.lb.counters().conflicts, conflicts);

    // The target answers IKE_AUTH: the new CHILD_SA works, the move is over.
    lab.down(to, auth_answer(p, 40001, 0x2)).unwrap();
    assert_eq!(lab.lb.moves().counters.moved, 1);
    assert_eq!(lab.up(esp_udp(p, 40001, 0x3000)), Ok(to), "the new SA");
    assert_eq!(lab.up(esp_udp(p, 40001, 0x1000)), Ok(1), "old SA in flight");
    // The peer deletes the old IKE SA on segw1.
    let delete = udp_packet(
        p,
        40001,
        VIP,
        4500,
        &ike_body(&ike(0x1, INFORMATIONAL, RESPONDER_SPI), true, 80),
    );
    assert_eq!(lab.up(delete), Ok(1));
    assert_eq!(gateway_of_spi(&lab, 0x1), Some(1));

    // After the linger the old entry goes; the tunnel is the new one alone.
    lab.tick(lab.lb.moves().settings.linger + Duration::from_millis(1));
    assert!(lab.lb.graceful_step(lab.now).is_empty());
    assert_eq!(lab.lb.table().len(), 1);
    assert_eq!(gateway_of_spi(&lab, 0x1), None);
    assert_eq!(gateway_of_spi(&lab, 0x2), Some(to));
    assert_eq!(lab.up(esp_udp(p, 40001, 0x3000)), Ok(to));
    assert_eq!(lab.lb.gateway("segw1").unwrap().counters.tunnels, 0);
    assert_eq!(lab.lb.moves().progress(), moves::Progress::default());
    assert_eq!(lab.lb.counters().moved, 0, "nothing was re-pointed");
}

#[test]
fn a_graceful_move_the_peer_does_not_follow_times_out_and_leaves_the_tunnel_whole() {
    let mut lab = Lab::new();
    let p = nat_peer_on_segw1(&mut lab);
    lab.lb.drain_gracefully("segw1", lab.now).unwrap();
    assert_eq!(lab.lb.graceful_step(lab.now).len(), 1);
    lab.tick(Duration::from_secs(5));
    assert_eq!(lab.up(esp_udp(p, 40001, 0x1000)), Ok(1));
    lab.tick(lab.lb.moves().settings.timeout);
    lab.lb.graceful_step(lab.now);
    assert_eq!(lab.lb.moves().counters.timed_out, 1);
    assert!(lab.lb.moves().is_empty());
    assert_eq!(lab.up(esp_udp(p, 40001, 0x1000)), Ok(1));
    assert_eq!(lab.up(auth_4500(p, 40001, 0x1)), Ok(1));
    // A new IKE SA from its endpoint now stays on its segw, as ever.
    assert_eq!(lab.up(sa_init(p, 40000, 0x9)), Ok(1));
    assert_eq!(lab.lb.table().len(), 1);
}

#[test]
fn a_graceful_rebalance_queues_moves_and_asks_them_at_the_set_pace() {
    let mut lab = Lab::new();
    for n in 1..=12u8 {
        lab.open_tunnel(peer(n), u64::from(n));
        lab.down(
            lab.lb
                .table()
                .get(lab.lb.table().by_spi(u64::from(n)).unwrap())
                .unwrap()
                .gateway as u8,
            auth_answer(peer(n), 4500, u64::from(n)),
        )
        .unwrap();
    }
    let before: Vec<Option<u8>> = (1..=12).map(|n| gateway_of_spi(&lab, n)).collect();
    lab.lb.set_move_settings(moves::Settings {
        per_second: 2.0,
        ..moves::Settings::default()
    });
    lab.lb
        .swap_policy_gracefully(native::shipped("consistent-hash", &[]).unwrap(), lab.now);
    let queued = loop {
        if let Some(moved) = lab.lb.rebalance_step(5, lab.now) {
            break moved;
        }
    };
    assert!(queued >= 3, "consistent hashing moves some of 12: {queued}");
    let after: Vec<Option<u8>> = (1..=12).map(|n| gateway_of_spi(&lab, n)).collect();
    assert_eq!(before, after, "a graceful rebalance re-points nothing");
    assert_eq!(lab.lb.moves().progress().queued as u64, queued);
    // Two a second: two now (a second's worth), one half a second later.
    assert_eq!(lab.lb.graceful_step(lab.now).len(), 2);
    lab.tick(Duration::from_millis(500));
    assert_eq!(lab.lb.graceful_step(lab.now).len(), 1);
    lab.tick(Duration::from_millis(100));
    assert_eq!(lab.lb.graceful_step(lab.now).len(), 0);
    assert_eq!(lab.lb.moves().counters.asked, 3);
}

#[test]
fn an_old_sa_packet_in_flight_when_the_move_ends_still_reaches_the_old_segw() {
    // The peer sent nothing on its old SA while it moved (a move takes
    // milliseconds, a probe comes every 200): the SA it used before the
    // move is known all the same.
    let mut lab = Lab::new();
    let p = nat_peer_on_segw1(&mut lab);
    lab.lb.drain_gracefully("segw1", lab.now).unwrap();
    let to = lab.lb.graceful_step(lab.now)[0].to as u8;
    assert_eq!(lab.up(sa_init(p, 40000, 0x2)), Ok(to));
    lab.down(to, sa_init_answer(p, 40000, 0x2, RESPONDER_SPI))
        .unwrap();
    assert_eq!(lab.up(auth_4500(p, 40001, 0x2)), Ok(to));
    lab.down(to, auth_answer(p, 40001, 0x2)).unwrap();
    assert_eq!(lab.lb.moves().counters.moved, 1);
    assert_eq!(
        lab.up(esp_udp(p, 40001, 0x1000)),
        Ok(1),
        "sent before the switch"
    );
    assert_eq!(lab.up(esp_udp(p, 40001, 0x3000)), Ok(to));
}

#[test]
fn a_successors_slot_taken_by_another_tunnel_is_not_moving() {
    // Room for two: the moving tunnel and its successor. A third peer's
    // IKE_SA_INIT evicts the half-open successor and gets its slot: its
    // frames are its own, not the move's.
    let mut lab = Lab::with_capacity(2);
    let p = nat_peer_on_segw1(&mut lab);
    lab.lb.drain_gracefully("segw1", lab.now).unwrap();
    let to = lab.lb.graceful_step(lab.now)[0].to as u8;
    assert_eq!(lab.up(sa_init(p, 40000, 0x2)), Ok(to));
    lab.tick(Duration::from_millis(5));
    let other = peer(41);
    let placed = lab.up(sa_init(other, 500, 0x77)).unwrap();
    assert_eq!(lab.lb.table().counters.evicted_half_open, 1);
    lab.down(placed, sa_init_answer(other, 500, 0x77, RESPONDER_SPI))
        .unwrap();
    assert_eq!(
        lab.up(udp_packet(other, 500, VIP, 4500, &esp_body(0x4242, 1, 100))),
        Ok(placed),
        "the other peer's ESP went where the move would send it"
    );
    assert_ne!(placed, 1, "round-robin skips the draining segw1");
}

// ----- capacity under spoofing (issue 30) ------------------------------------

/// The segw's COOKIE answer to an IKE_SA_INIT: no IKE SA (responder SPI 0).
fn cookie_answer(p: IpAddr, port: u16, spi: u64) -> Vec<u8> {
    sa_init_answer(p, port, spi, 0)
}

fn spoofed(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0xcb00_7100 + i))
}

#[test]
fn a_spoofed_ike_sa_init_flood_cannot_refuse_a_real_initiator() {
    // 30 places in all. The flood the issue names: a new spoofed source
    // every second, 30 per half-open timeout, for a minute; its segw
    // answers a third with an IKE SA (as strongSwan does), a third with a
    // COOKIE, and a third not at all. A real initiator every 3 s.
    let mut lab = Lab::new();
    for n in 1..=3 {
        lab.lb
            .set_capacity(&format!("segw{n}"), 10, lab.now)
            .unwrap();
    }
    let mut real = Vec::new();
    for second in 0..60u32 {
        let spi = 0xf00d_0000 + u64::from(second);
        if let Ok(gw) = lab.up(sa_init(spoofed(second), 500, spi)) {
            let answer = match second % 3 {
                0 => Some(sa_init_answer(spoofed(second), 500, spi, 0x5f00 + spi)),
                1 => Some(cookie_answer(spoofed(second), 500, spi)),
                _ => None,
            };
            if let Some(answer) = answer {
                lab.down(gw, answer).unwrap();
            }
        }
        if second % 3 == 0 {
            let n = (second / 3) as u8 + 1;
            let spi = u64::from(n);
            let gw = lab.up(sa_init(peer(n), 500, spi));
            assert!(gw.is_ok(), "real initiator {n} at {second} s: {gw:?}");
            let gw = gw.unwrap();
            lab.down(gw, sa_init_answer(peer(n), 500, spi, RESPONDER_SPI))
                .unwrap();
            assert_eq!(lab.up(auth_4500(peer(n), 4500, spi)), Ok(gw));
            lab.down(gw, auth_answer(peer(n), 4500, spi)).unwrap();
            real.push((n, gw));
        }
        lab.tick(Duration::from_secs(1));
        lab.lb.expire(lab.now, usize::MAX);
    }
    assert_eq!(real.len(), 20);
    assert_eq!(lab.lb.counters().dropped(DropReason::AtCapacity), 0);
    for (n, gw) in real {
        assert_eq!(lab.up(esp_udp(peer(n), 4500, 1)), Ok(gw), "tunnel {n}");
    }
    // What a segw answered for a spoof is not a working tunnel: it goes on
    // the half-open timeout, not the idle one.
    lab.tick(Duration::from_secs(31));
    lab.lb.expire(lab.now, usize::MAX);
    assert_eq!(lab.lb.table().len(), 20);
}

#[test]
fn a_flood_faster_than_a_handshake_refuses_only_for_one_handshake_window() {
    // The limit, stated: a spoof looks like a real IKE_SA_INIT until the
    // real one would have been confirmed, so a flood that fills every
    // place within one handshake window refuses while it lasts. It holds
    // those places for that window (5 s), not for the half-open timeout.
    let mut lab = Lab::new();
    for n in 1..=3 {
        lab.lb
            .set_capacity(&format!("segw{n}"), 2, lab.now)
            .unwrap();
    }
    for i in 0..6 {
        lab.up(sa_init(spoofed(i), 500, 0xbad0 + u64::from(i)))
            .unwrap();
    }
    assert_eq!(
        lab.up(sa_init(peer(1), 500, 1)),
        Err(DropReason::AtCapacity)
    );
    lab.tick(Duration::from_secs(6));
    lab.lb.expire(lab.now, usize::MAX);
    assert!(lab.up(sa_init(peer(1), 500, 1)).is_ok());
    assert_eq!(lab.lb.table().len(), 7, "the spoofs stay, half-open");
}

#[test]
fn an_spi_steered_tunnel_reaches_its_full_segw_and_spoofed_spis_hold_no_place() {
    // segw2 (ESP SPIs 0xc2……) holds one place, taken.
    let mut lab = Lab::new();
    for (n, capacity) in [(1, 1), (2, 2), (3, 1)] {
        lab.lb
            .set_capacity(&format!("segw{n}"), capacity, lab.now)
            .unwrap();
    }
    for n in 1..=3 {
        lab.open_tunnel(peer(n), u64::from(n));
    }
    // A tunnel the table does not know (a restart) whose SA is on segw2:
    // it goes there, full or not. Its SA is there; nowhere else works.
    assert_eq!(lab.up(esp_udp(peer(40), 4500, 0xc200_0040)), Ok(2));
    lab.down(
        2,
        udp_packet(VIP, 4500, peer(40), 4500, &esp_body(0x4000, 1, 80)),
    )
    .unwrap();
    lab.lb.set_capacity("segw2", 3, lab.now).unwrap();
    // ESP from spoofed sources with SPIs from segw2's range: steered
    // there, and for one handshake window they hold places ...
    for i in 0..50 {
        let _ = lab.up(esp_udp(spoofed(i), 4500, 0xc200_1000 + i));
    }
    assert_eq!(
        lab.up(sa_init(peer(50), 500, 50)),
        Err(DropReason::AtCapacity)
    );
    // ... and then none: the real initiator gets segw2's last place.
    lab.tick(Duration::from_secs(6));
    lab.lb.expire(lab.now, usize::MAX);
    assert_eq!(lab.up(sa_init(peer(50), 500, 50)), Ok(2));
}

#[test]
fn tunnels_opened_during_a_rebalance_and_the_rebalance_share_each_capacity() {
    // 12 tunnels, 4 a segw; then a policy that wants segw2 above all,
    // which has 6 places. New tunnels arrive while the rebalance is under
    // way: between them and the rebalance, segw2 gets 6, not more.
    let mut lab = Lab::new();
    for n in 1..=12 {
        lab.open_tunnel(peer(n), u64::from(n));
    }
    lab.lb.set_capacity("segw2", 6, lab.now).unwrap();
    lab.lb.set_weight("segw2", 100, lab.now).unwrap();
    let policy = native::shipped("weighted", &[]).unwrap();
    lab.lb.swap_policy(policy, true, lab.now);
    lab.tick(Duration::from_secs(1));
    for n in 20..30 {
        lab.up(sa_init(peer(n), 500, u64::from(n))).unwrap();
    }
    while lab.lb.rebalance_step(4, lab.now).is_none() {}
    let on = |n: u8| {
        lab.lb
            .gateway(&format!("segw{n}"))
            .unwrap()
            .counters
            .tunnels
    };
    assert_eq!(on(1) + on(2) + on(3), 22);
    assert_eq!(on(2), 6, "segw2 holds {}", on(2));
}

#[test]
fn restored_ages_survive_a_live_clock_that_just_started() {
    use super::saved::{decode, encode};
    use crate::dataplane::Clock;
    // A tunnel idle 590 s of its 600 s timeout when the table was saved.
    let mut a = Lab::new();
    a.open_tunnel(peer(1), 1);
    a.tick(Duration::from_secs(590));
    let file = encode(&a.lb.save(a.now));
    // The restarted process: its live clock has just started.
    let clock = Clock::start();
    let mut b = Lab::new();
    b.now = clock.now();
    assert_eq!(b.lb.restore(&decode(&file).unwrap(), b.now).loaded, 1);
    b.tick(Duration::from_secs(20));
    assert_eq!(b.lb.expire(b.now, usize::MAX), 1, "a dead tunnel lived on");
    assert_eq!(b.lb.gateway("segw1").unwrap().counters.tunnels, 0);
}

// ----- restarts without a state file (issue 30) ------------------------------

/// Segw `n`'s DPD to `p`'s 4500 endpoint, for an IKE SA the table never saw.
fn segw_dpd(p: IpAddr) -> Vec<u8> {
    let h = IkeHeader {
        initiator_spi: 0x0d0d,
        responder_spi: 0x0e0e,
        exchange: INFORMATIONAL,
        from_initiator: false,
        response: false,
        message_id: 7,
    };
    udp_packet(VIP, 4500, p, 4500, &ike_body(&h, true, 60))
}

#[test]
fn after_a_cold_restart_a_segw_that_speaks_first_reaches_a_configured_next_hop() {
    // A restart without a state file: an empty table, no initiator has
    // spoken yet, and segw1's DPD to a peer comes first.
    let mut lab = Lab::new();
    assert_eq!(
        lab.down(1, segw_dpd(peer(1))),
        Err(DropReason::NextHopUnknown),
        "without configuration the way back is learned from initiators"
    );
    lab.lb
        .set_uplink_next_hop(Some(UplinkNextHop::Mac(PEER_SIDE_ROUTER)));
    assert_eq!(lab.down(1, segw_dpd(peer(1))), Ok(PEER_SIDE_ROUTER));
    // A frame from another MAC on the segment (one that proves its tunnel)
    // gives that tunnel its own next hop, never the default.
    let other: Mac = [2, 0xbb, 0, 0, 0, 9];
    let gw = lab.up_from(other, sa_init(peer(2), 500, 2)).unwrap();
    lab.down(gw, sa_init_answer(peer(2), 500, 2, RESPONDER_SPI))
        .unwrap();
    lab.up_from(other, auth_4500(peer(2), 4500, 2)).unwrap();
    assert_eq!(lab.down(gw, auth_answer(peer(2), 4500, 2)), Ok(other));
    assert_eq!(lab.down(1, segw_dpd(peer(3))), Ok(PEER_SIDE_ROUTER));
}

#[test]
fn a_next_hop_configured_by_address_is_asked_for_and_taken_from_its_answer() {
    let router = Ipv4Addr::new(192, 0, 2, 254);
    let router6: Ipv6Addr = "fe80::1".parse().unwrap();
    let (mac4, mac6): (Mac, Mac) = ([2, 0xcc, 0, 0, 0, 4], [2, 0xcc, 0, 0, 0, 6]);
    for (hop, mac) in [(IpAddr::V4(router), mac4), (IpAddr::V6(router6), mac6)] {
        let mut lab = Lab::new();
        lab.lb
            .set_uplink_next_hop(Some(UplinkNextHop::Address(hop)));
        assert_eq!(
            lab.down(1, segw_dpd(peer(1))),
            Err(DropReason::NextHopUnknown),
            "{hop}: not resolved yet"
        );
        // Every probe round asks for it on the uplink.
        let health = HealthConfig {
            interval: Duration::from_secs(1),
            down_after: u32::MAX,
            up_after: 1,
        };
        let round = lab.lb.probe(&[VIP], &health, lab.now);
        let asked: Vec<&Vec<u8>> = round
            .frames
            .iter()
            .filter(|(port, _)| *port == UPLINK)
            .map(|(_, f)| f)
            .collect();
        assert_eq!(asked.len(), 1, "{hop}");
        assert_eq!(&asked[0][6..12], &port_mac(UPLINK));
        // Its answer teaches the MAC.
        let mut answer = match hop {
            // The answer to our probe (sent from 0.0.0.0, RFC 5227).
            IpAddr::V4(v4) => {
                packet::arp::Arp::request(port_mac(UPLINK), Ipv4Addr::UNSPECIFIED, v4)
                    .reply(mac)
                    .to_frame(port_mac(UPLINK), mac, None)
            }
            IpAddr::V6(v6) => frame(
                port_mac(UPLINK),
                mac,
                None,
                &packet::ndp::advertisement(
                    v6,
                    mac,
                    packet::ndp::link_local(port_mac(UPLINK)),
                    true,
                ),
            ),
        };
        lab.lb.handle(&mut answer, UPLINK, lab.now);
        assert_eq!(lab.down(1, segw_dpd(peer(1))), Ok(mac), "{hop}");
        // Initiators' frames from elsewhere leave it alone.
        lab.up_from([2, 0xdd, 0, 0, 0, 1], sa_init(peer(5), 500, 5))
            .unwrap();
        assert_eq!(lab.down(1, segw_dpd(peer(6))), Ok(mac), "{hop}");
    }
}

#[test]
fn a_rebalance_leaves_the_tunnels_it_does_not_move_confirmed() {
    // A rebalance visits every tunnel; the ones it leaves where they are
    // keep their segw's word (and their place on the fast path).
    let mut lab = Lab::new();
    for n in 1..=12 {
        lab.open_tunnel(peer(n), u64::from(n));
    }
    let before = lab.lb.fast_path().len();
    let policy = native::shipped("consistent-hash", &[]).unwrap();
    let (_, moved) = lab.lb.replace_policy(policy, true, lab.now);
    assert!(moved > 0 && moved < 12, "{moved}");
    let confirmed = lab
        .lb
        .table()
        .iter()
        .filter(|(_, t)| t.placement() == Placement::Confirmed)
        .count() as u64;
    assert_eq!(confirmed, 12 - moved);
    assert_eq!(
        lab.lb.fast_path().len() as u64,
        before as u64 * (12 - moved) / 12
    );
}

#[test]
fn a_restored_table_is_not_refused_at_capacity_and_then_new_tunnels_are() {
    // Decided: a restore puts back tunnels whose SAs live on their segws.
    // Refusing one at capacity would send it nowhere that works; its segw
    // is over its limit until tunnels leave, and new ones go elsewhere.
    use super::saved::{decode, encode};
    let mut a = Lab::new();
    for n in 1..=6 {
        a.open_tunnel(peer(n), u64::from(n));
    }
    let file = encode(&a.lb.save(a.now));
    let mut b = Lab::new();
    b.lb.set_capacity("segw1", 1, b.now).unwrap();
    let restored = b.lb.restore(&decode(&file).unwrap(), b.now);
    assert_eq!(restored.loaded, 6, "{restored}");
    assert_eq!(b.lb.gateway("segw1").unwrap().counters.tunnels, 2);
    for _ in 0..4 {
        let n = 20 + b.lb.table().len() as u8;
        assert_ne!(
            b.open_tunnel(peer(n), u64::from(n)),
            1,
            "a new tunnel on full segw1"
        );
    }
}

mod replica;
