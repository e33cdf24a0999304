//! A full resync of the XDP fast path (a segw down, a MAC changed, the
//! set changed: every entry may be stale) goes a slice per worker turn,
//! and meanwhile the program passes every frame to the core: no frame goes
//! by an entry the resync has not looked at yet. Root, in a namespace of
//! its own (as tests/fastpath_differential.rs); without root or the
//! program it says so and passes, unless SEGWLB_REQUIRE_NETNS is set.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use segwlb::balancer::farm::{self, port_mac, segw_mac};
use segwlb::balancer::{Balancer, PortId, Verdict, UPLINK};
use segwlb::dataplane::fast::Fast;
use segwlb::io::xdp::{FastPath, XDP_PASS, XDP_REDIRECT};
use segwlb::lab::netns::{self, Netns};
use segwlb::packet::craft::{esp_body, frame, ike_body, udp_packet};
use segwlb::packet::ike::{IKE_AUTH, IKE_SA_INIT};
use segwlb::packet::{IkeHeader, Mac};
use segwlb::policy::{native, Policy};
use segwlb::time::Timestamp;

const ROUTER: Mac = [2, 0xaa, 0, 0, 0, 1];
const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1));
const SEGWS: u8 = 3;
/// Enough tunnels that a resync takes many turns, even in a release build.
const TUNNELS: u32 = 30_000;

fn peer(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn ike(spi: u64, exchange: u8, response: bool) -> IkeHeader {
    IkeHeader {
        initiator_spi: spi,
        responder_spi: if exchange == IKE_SA_INIT && !response {
            0
        } else {
            0x77
        },
        exchange,
        from_initiator: !response,
        response,
        message_id: u32::from(exchange != IKE_SA_INIT),
    }
}

/// ESP in UDP from tunnel `i` (it floated to port 4500 + its number).
fn esp_up(i: u32) -> Vec<u8> {
    // SPI 0 would be the non-ESP marker: IKE.
    let ip = udp_packet(peer(i), port_of(i), VIP, 4500, &esp_body(i + 1, 1, 100));
    frame(port_mac(UPLINK), ROUTER, None, &ip)
}

fn port_of(i: u32) -> u16 {
    10_000 + (i % 50_000) as u16
}

/// `TUNNELS` tunnels, each opened and confirmed as strongSwan does it
/// (IKE_SA_INIT and IKE_AUTH, each answered): the fast path's to carry.
fn core() -> (Balancer<Box<dyn Policy>>, Vec<PortId>) {
    let mut lb = farm::balancer(
        native::shipped("round-robin", &[]).unwrap(),
        SEGWS,
        vec!["10.2.2.1/32".parse().unwrap()],
        1 << 17,
    );
    let now = Timestamp::ZERO;
    let mut on = Vec::new();
    for i in 0..TUNNELS {
        let spi = u64::from(i) + 1;
        let init = udp_packet(
            peer(i),
            500,
            VIP,
            500,
            &ike_body(&ike(spi, IKE_SA_INIT, false), false, 100),
        );
        let mut f = frame(port_mac(UPLINK), ROUTER, None, &init);
        let Verdict::Forward(gw) = lb.handle(&mut f, UPLINK, now) else {
            panic!("tunnel {i} not placed")
        };
        let to = |ip: &[u8]| frame(port_mac(gw), segw_mac(gw as u8), None, ip);
        let answer = udp_packet(
            VIP,
            500,
            peer(i),
            500,
            &ike_body(&ike(spi, IKE_SA_INIT, true), false, 100),
        );
        lb.handle(&mut to(&answer), gw, now);
        let auth = udp_packet(
            peer(i),
            port_of(i),
            VIP,
            4500,
            &ike_body(&ike(spi, IKE_AUTH, false), true, 100),
        );
        lb.handle(
            &mut frame(port_mac(UPLINK), ROUTER, None, &auth),
            UPLINK,
            now,
        );
        let answer = udp_packet(
            VIP,
            4500,
            peer(i),
            port_of(i),
            &ike_body(&ike(spi, IKE_AUTH, true), true, 100),
        );
        assert_eq!(
            lb.handle(&mut to(&answer), gw, now),
            Verdict::Forward(UPLINK)
        );
        on.push(gw);
    }
    (lb, on)
}

#[test]
fn a_full_resync_goes_a_slice_a_turn_and_meanwhile_every_frame_goes_to_the_core() {
    if !common::xdp_can_run("the fast-path resync test") {
        return;
    }
    let (mut lb, on) = core();
    let ns = Netns::new(&netns::unique_prefix("rs")).unwrap();
    for n in 0..=SEGWS {
        netns::veth(&ns, &format!("p{n}"), &ns, &format!("q{n}")).unwrap();
        let mac = netns::format_mac(&port_mac(PortId::from(n)));
        ns.ip(&["link", "set", &format!("p{n}"), "address", &mac])
            .unwrap();
        ns.ip(&["link", "set", &format!("p{n}"), "up"]).unwrap();
        ns.ip(&["link", "set", &format!("q{n}"), "up"]).unwrap();
    }
    let report = ns
        .enter(move || {
            let mut fast = Fast::new(FastPath::load(1 << 17, false).unwrap());
            for n in 0..=SEGWS {
                let port = PortId::from(n);
                fast.add_port(port, &format!("p{n}"), port_mac(port))
                    .unwrap();
            }
            let uplink = {
                let name = std::ffi::CString::new("p0").unwrap();
                // SAFETY: a NUL-terminated name.
                unsafe { libc::if_nametoindex(name.as_ptr()) }
            };
            let now = Timestamp::ZERO;
            // The first sync is a full one too: a slice a turn.
            let resync = |fast: &mut Fast, lb: &mut Balancer<Box<dyn Policy>>| {
                let mut turns = 0u32;
                let mut longest = std::time::Duration::ZERO;
                loop {
                    let t = Instant::now();
                    fast.turn(lb, now, Duration::ZERO).unwrap();
                    longest = longest.max(t.elapsed());
                    turns += 1;
                    if !fast.resyncing() {
                        return (turns, longest);
                    }
                    // Meanwhile no frame takes the fast path, and none is
                    // changed by it: the core gets it as it came.
                    let f = esp_up(turns % TUNNELS);
                    let (action, out) = fast.path().test_run(&f, uplink).unwrap();
                    assert_eq!(action, XDP_PASS, "turn {turns}: redirected mid-resync");
                    assert_eq!(out, f, "turn {turns}: passed, but changed");
                }
            };
            let (turns, longest) = resync(&mut fast, &mut lb);
            let first =
                format!("first sync of {TUNNELS} tunnels: {turns} turns, longest {longest:?}");
            assert!(turns > 10, "{first}");
            assert_eq!(fast.path().entries(), lb.fast_path().len(), "{first}");
            // Every tunnel's ESP takes the fast path now.
            for i in (0..TUNNELS).step_by(997) {
                let (action, out) = fast.path().test_run(&esp_up(i), uplink).unwrap();
                assert_eq!(action, XDP_REDIRECT, "tunnel {i}");
                assert_eq!(&out[0..6], &segw_mac(on[i as usize] as u8), "tunnel {i}");
            }
            // segw1 fails: a third of the entries must go.
            lb.set_healthy("segw1", false, now).unwrap();
            let (turns, longest) = resync(&mut fast, &mut lb);
            let failure = format!("segw1 down: {turns} turns, longest {longest:?}");
            assert!(turns > 2, "{failure}");
            assert_eq!(fast.path().entries(), lb.fast_path().len(), "{failure}");
            for i in (0..TUNNELS).step_by(997) {
                let (action, _) = fast.path().test_run(&esp_up(i), uplink).unwrap();
                let want = if on[i as usize] == 1 {
                    XDP_PASS
                } else {
                    XDP_REDIRECT
                };
                assert_eq!(action, want, "tunnel {i} on segw{}", on[i as usize]);
            }
            // A weight change is the policy's alone: no resync.
            lb.set_weight("segw2", 7, now).unwrap();
            fast.turn(&mut lb, now, Duration::ZERO).unwrap();
            assert!(!fast.resyncing());
            format!("{first}; {failure}")
        })
        .unwrap();
    eprintln!("{report}");
}
