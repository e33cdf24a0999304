//! The balancer core on real strongSwan traffic: the captures in
//! tests/fixtures/ (made by scripts/capture-fixtures.sh; what each frame is
//! is listed in tests/fixtures/README.md) replayed through `handle`, with
//! the initiator on the uplink and the captured segw behind port 1 (port 3
//! for steering), two more segws beside it.

use std::net::{IpAddr, Ipv4Addr};

use segwlb::balancer::{Verdict, UPLINK};
use segwlb::packet;
use segwlb::time::Timestamp;

#[path = "common/fixtures.rs"]
mod fixtures;
use fixtures::{balancer, from_segw, pcap, replay, VIP};

#[test]
fn a_direct_tunnel_stays_on_one_segw_through_rekeys_dpd_and_delete() {
    let frames = pcap("strongswan-direct.pcap");
    let mut lb = balancer(1, false);
    let went = replay(&mut lb, &frames, 1);
    // IKE_SA_INIT, IKE_AUTH, 2 CREATE_CHILD_SA, 4 INFORMATIONAL, 7 ESP.
    assert_eq!(went.len(), 15);
    assert!(went.iter().all(|&p| p == 1), "{went:?}");
    // One policy decision; the IKE SA rekeyed under new SPIs that first show
    // up on a DPD, found by the tunnel's endpoint, not placed afresh.
    assert_eq!(lb.policy_stats().decisions, 1);
    assert_eq!(lb.table().len(), 1);
    let g = lb.gateway("segw1").unwrap();
    assert_eq!(g.counters.tunnels, 1);
    assert_eq!(g.counters.frames_to, 15);
    assert_eq!(g.counters.frames_from, 15);
}

#[test]
fn a_natted_tunnel_keeps_its_segw_across_the_float_to_a_new_port() {
    let frames = pcap("strongswan-nat.pcap");
    let mut lb = balancer(1, false);
    let went = replay(&mut lb, &frames, 1);
    // As direct, plus the two NAT keepalives.
    assert_eq!(went.len(), 17);
    assert!(went.iter().all(|&p| p == 1), "{went:?}");
    assert_eq!(lb.policy_stats().decisions, 1);
    // The tunnel is bound to where the NAT put its 4500, not its 500.
    let nat = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20));
    let id = lb
        .table()
        .by_endpoint(nat, 40554)
        .expect("bound after the float");
    assert_eq!(lb.table().get(id).unwrap().opened_port, 40940);
    // Where it opened from still finds it: a new IKE SA from there (a DPD
    // restart, a reauthentication) is the same tunnel, on the same segw.
    assert_eq!(lb.table().by_endpoint(nat, 40940), Some(id));
}

#[test]
fn spi_steering_carries_a_tunnel_across_a_balancer_restart() {
    let frames = pcap("strongswan-steered.pcap");
    // Before the restart: segw1 and segw2 drain, so the policy puts the new
    // tunnel on segw3, whose strongSwan labels its SPIs.
    let mut before = balancer(3, true);
    before.set_draining("segw1", true, Timestamp::ZERO).unwrap();
    before.set_draining("segw2", true, Timestamp::ZERO).unwrap();
    let went = replay(&mut before, &frames[..16], 3);
    assert!(went.iter().all(|&p| p == 3), "{went:?}");

    // A new balancer: empty table, every segw open. The rest of the capture
    // (ESP under the rekeyed CHILD_SA, IKE under the rekeyed IKE SA) still
    // reaches segw3, with no policy call: the SPIs say where.
    let mut after = balancer(3, true);
    let went = replay(&mut after, &frames[16..], 3);
    assert_eq!(went.len(), 8);
    assert!(went.iter().all(|&p| p == 3), "{went:?}");
    assert_eq!(after.policy_stats().decisions, 0);
    assert_eq!(after.counters().steered, 8);

    // The same restart without steering: the first ESP packet is a miss,
    // and the policy sends it to segw1, away from its SA.
    let mut blind = balancer(3, false);
    let went = replay(&mut blind, &frames[16..], 3);
    assert_eq!(went[0], 1);
}

#[test]
fn every_truncation_of_every_captured_frame_is_a_counted_drop_never_a_panic() {
    for name in fixtures::ALL {
        let frames = pcap(name);
        let mut lb = balancer(1, true);
        // Learn the tunnel first, so truncations meet a warm table.
        replay(&mut lb, &frames, 1);
        for (i, c) in frames.iter().enumerate() {
            let ingress = if from_segw(&c.bytes) { 1 } else { UPLINK };
            for cut in 0..c.bytes.len() {
                let mut f = c.bytes[..cut].to_vec();
                let verdict = lb.handle(&mut f, ingress, c.at);
                // A cut into the Ethernet header or the IP packet never
                // passes as a frame to forward or answer.
                assert!(
                    matches!(verdict, Verdict::Drop(_)),
                    "{name} frame {} cut at {cut}: {verdict:?}",
                    i + 1
                );
            }
        }
    }
}

#[test]
fn the_fixtures_are_what_their_readme_says() {
    // A regenerated capture has new SPIs: this names the one to update.
    let frames = pcap("strongswan-steered.pcap");
    let ike = packet::parse(&frames[3].bytes).expect("IKE_SA_INIT response");
    let packet::Kind::Ip(ip) = ike.kind else {
        panic!("frame 4 is not IP")
    };
    assert_eq!(ip.src, IpAddr::V4(VIP));
    let packet::Payload::Ike { header, .. } = ip.payload else {
        panic!("frame 4 is not IKE")
    };
    assert_eq!(header.responder_spi, 0x036a_ad4b_7ef7_90ed);
    assert_eq!(frames.len(), 34);
    assert_eq!(pcap("strongswan-direct.pcap").len(), 34);
    assert_eq!(pcap("strongswan-nat.pcap").len(), 36);
}
