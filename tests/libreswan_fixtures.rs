//! The balancer core on real libreswan traffic: pluto 4.10 initiating to a
//! charon segw, captured by scripts/capture-fixtures.sh (what each frame
//! is: tests/fixtures/README.md), replayed through `handle` as the
//! strongSwan captures are (`strongswan_fixtures.rs`): the initiator on the
//! uplink, the captured segw behind port 1, two more segws beside it, round
//! robin, so a tunnel placed afresh would land elsewhere.
//!
//! The kernel the captures were made on has no ESP, so pluto's tunnels are
//! childless IKE SAs (`lab::libreswan`): these captures are libreswan's IKE
//! on the wire, with no ESP. `libreswan-nochild` is what pluto does without
//! that workaround: it fails its CHILD SA, drops its IKE SA without a word
//! to the segw and starts again.

use std::net::{IpAddr, Ipv4Addr};

#[path = "common/fixtures.rs"]
mod fixtures;
use fixtures::{balancer, pcap, replay, Captured};

use segwlb::packet;

/// The IKE SPIs (initiator, responder) of every IKE frame from the
/// initiator, in order.
fn ike_spis(frames: &[Captured]) -> Vec<(u64, u64)> {
    frames
        .iter()
        .filter_map(|c| {
            let p = packet::parse(&c.bytes).ok()?;
            let packet::Kind::Ip(ip) = p.kind else {
                return None;
            };
            match ip.payload {
                packet::Payload::Ike { header, .. } if ip.dst == IpAddr::V4(fixtures::VIP) => {
                    Some((header.initiator_spi, header.responder_spi))
                }
                _ => None,
            }
        })
        .collect()
}

#[test]
fn a_libreswan_tunnel_stays_on_one_segw_through_liveness_ike_rekey_and_delete() {
    let frames = pcap("libreswan-direct.pcap");
    let mut lb = balancer(1, false);
    let went = replay(&mut lb, &frames, 1);
    // IKE_SA_INIT, IKE_AUTH, its liveness (INFORMATIONAL) and answers to
    // the segw's DPD, the IKE SA rekeyed (CREATE_CHILD_SA, the old one's
    // delete), liveness under the new SPIs, the delete: all IKE, on 4500
    // from IKE_AUTH on although no NAT is in the way, as strongSwan does.
    assert_eq!(went.len(), 10);
    assert!(went.iter().all(|&p| p == 1), "{went:?}");
    // The rekeyed IKE SA first speaks under SPIs the balancer never saw
    // opened: found by its endpoint, not placed afresh.
    let spis = ike_spis(&frames);
    let first = spis[0].0;
    assert!(spis.iter().any(|&(i, _)| i != first), "the capture rekeys");
    assert_eq!(lb.policy_stats().decisions, 1);
    assert_eq!(lb.table().len(), 1);
    let g = lb.gateway("segw1").unwrap();
    assert_eq!(g.counters.tunnels, 1);
    assert_eq!((g.counters.frames_to, g.counters.frames_from), (10, 10));
}

#[test]
fn behind_a_nat_libreswans_float_and_keepalives_keep_the_tunnel_on_its_segw() {
    let frames = pcap("libreswan-nat.pcap");
    let mut lb = balancer(1, false);
    let went = replay(&mut lb, &frames, 1);
    // As direct, plus two NAT keepalives (pluto's keep-alive, 1 byte 0xff).
    assert_eq!(went.len(), 12);
    assert!(went.iter().all(|&p| p == 1), "{went:?}");
    assert_eq!(lb.policy_stats().decisions, 1);
    // Bound to where the NAT put its 4500; where it opened from (its 500)
    // still finds it.
    let nat = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20));
    let id = lb
        .table()
        .by_endpoint(nat, 40203)
        .expect("bound after the float");
    assert_eq!(lb.table().get(id).unwrap().opened_port, 40934);
    assert_eq!(lb.table().by_endpoint(nat, 40934), Some(id));
}

#[test]
fn a_nat_that_forgot_an_idle_pluto_gives_it_a_new_port_and_the_tunnel_follows_its_ike_spi() {
    // pluto 4.10 never re-arms its NAT keepalive: idle past the NAT's UDP
    // timeout (3 s in the capture, 30 s by default), its next message, a
    // liveness under the same IKE SPIs, leaves from a new NAT port.
    let frames = pcap("libreswan-rebind.pcap");
    let mut lb = balancer(1, false);
    let went = replay(&mut lb, &frames, 1);
    assert_eq!(went.len(), 4);
    assert!(went.iter().all(|&p| p == 1), "{went:?}");
    assert_eq!(lb.policy_stats().decisions, 1);
    assert_eq!(lb.table().len(), 1);
    let nat = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20));
    let id = lb
        .table()
        .by_endpoint(nat, 40469)
        .expect("rebound to the new port");
    // The old mapping is gone from the table; where it opened still finds it.
    assert_eq!(lb.table().by_endpoint(nat, 40956), None);
    assert_eq!(lb.table().get(id).unwrap().opened_port, 40816);
    assert_eq!(lb.table().by_endpoint(nat, 40816), Some(id));
    // The segw's answers went back to the new port (replay checks each).
    let g = lb.gateway("segw1").unwrap();
    assert_eq!((g.counters.frames_to, g.counters.frames_from), (4, 4));
}

#[test]
fn with_encapsulation_off_libreswan_keeps_ike_on_500_and_it_is_one_tunnel() {
    // `encapsulation=no`: pluto never floats without a NAT (strongSwan
    // always does): every exchange, the rekey included, on 500.
    let frames = pcap("libreswan-nofloat.pcap");
    let mut lb = balancer(1, false);
    let went = replay(&mut lb, &frames, 1);
    assert_eq!(went.len(), 10);
    assert!(went.iter().all(|&p| p == 1), "{went:?}");
    assert_eq!(lb.policy_stats().decisions, 1);
    let peer = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 100));
    let id = lb.table().by_endpoint(peer, 500).expect("bound on 500");
    assert_eq!(lb.table().get(id).unwrap().opened_port, 500);
    assert_eq!(lb.table().len(), 1);
}

#[test]
fn a_pluto_that_cannot_install_its_child_sa_starts_again_from_the_same_endpoint_on_the_same_segw() {
    // pluto's answer to a kernel without ESP: IKE SA up, CHILD SA refused
    // by the kernel, IKE SA dropped with no DELETE to the segw, a new
    // IKE_SA_INIT from the same address and port with new SPIs. Four
    // rounds in the capture. The segw keeps the abandoned IKE SAs (until
    // its DPD), so each new one must land beside them: one tunnel, one
    // decision.
    let frames = pcap("libreswan-nochild.pcap");
    let spis = ike_spis(&frames);
    let inits: std::collections::BTreeSet<u64> = spis.iter().map(|&(i, _)| i).collect();
    assert_eq!(inits.len(), 4, "four IKE SAs: {spis:x?}");
    let mut lb = balancer(1, false);
    let went = replay(&mut lb, &frames, 1);
    assert_eq!(went.len(), 8);
    assert!(went.iter().all(|&p| p == 1), "{went:?}");
    assert_eq!(lb.policy_stats().decisions, 1);
    assert_eq!(lb.table().len(), 1);
}
