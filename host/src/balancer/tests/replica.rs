//! A pair's table on real frames: what the active's stream gives its
//! standby, and what the standby does with it when it takes over.

use super::*;
use crate::balancer::replica::{Delta, Replica, Source};

/// The standby of `Lab::new()`'s balancer: the same config and policy.
fn standby() -> Lab {
    let mut lab = Lab::new();
    lab.lb.set_standby(true);
    lab
}

/// What a pair's link carries between two balancers, in memory: the
/// active's deltas, each through its JSON form as the sync link sends it.
struct Stream {
    source: Source,
    replica: Replica,
    sent: usize,
}

impl Stream {
    /// The active starts logging its changes and sends its table whole,
    /// `slice` slots at a time, with `between` run between slices (the
    /// active's traffic while the snapshot is under way).
    fn connect(
        active: &mut Lab,
        standby: &mut Lab,
        slice: usize,
        mut between: impl FnMut(&mut Lab),
    ) -> Self {
        let mut s = Stream {
            source: Source::default(),
            replica: Replica::default(),
            sent: 0,
        };
        active.lb.replicate(true);
        standby.lb.clear_replica(&mut s.replica);
        let mut from = Some(0);
        while let Some(at) = from {
            let mut deltas = Vec::new();
            from = active
                .lb
                .snapshot_slice(&mut s.source, at, slice, active.now, &mut deltas);
            s.apply(standby, deltas);
            between(active);
            s.changes(active, standby);
        }
        s
    }

    /// The active's changes since the last call, applied.
    fn changes(&mut self, active: &mut Lab, standby: &mut Lab) {
        let mut deltas = Vec::new();
        active
            .lb
            .replica_deltas(&mut self.source, active.now, &mut deltas)
            .expect("the change log keeps this many");
        self.apply(standby, deltas);
    }

    fn apply(&mut self, standby: &mut Lab, deltas: Vec<Delta>) {
        for d in deltas {
            let wire = serde_json::to_string(&d).unwrap();
            let d: Delta = serde_json::from_str(&wire).unwrap();
            self.sent += 1;
            standby.lb.apply(&mut self.replica, d, standby.now);
        }
    }
}

/// A tunnel as the two tables must agree on it: peer, port, IKE SPI,
/// responder SPI, segw, placement.
type Seen = (IpAddr, u16, Option<u64>, Option<u64>, GwId, Placement);

/// Every tunnel of `lb`, sorted.
fn tunnels(lb: &Balancer) -> Vec<Seen> {
    let mut all: Vec<_> = lb
        .table()
        .iter()
        .map(|(_, t)| {
            (
                t.peer,
                t.peer_port,
                t.ike_spi,
                t.responder_spi,
                t.gateway,
                t.placement(),
            )
        })
        .collect();
    all.sort();
    all
}

#[test]
fn a_standby_answers_and_forwards_nothing() {
    let mut lab = standby();
    assert_eq!(
        lab.up(sa_init(peer(1), 500, 0x11)),
        Err(DropReason::Standby)
    );
    let mut arp = arp_frame(true, Ipv4Addr::new(10, 2, 2, 1));
    assert_eq!(
        lab.lb.handle(&mut arp, UPLINK, lab.now),
        Verdict::Drop(DropReason::Standby)
    );
    assert_eq!(lab.lb.counters().dropped(DropReason::Standby), 2);
    assert_eq!(lab.placed(), 0, "a standby asks its policy nothing");
    assert!(
        lab.lb.fast_path_at(peer(1), 500).is_none()
            && lab.lb.fast_path_spi_ranges() == Some(vec![]),
        "nor does its fast path carry anything"
    );
}

#[test]
fn a_standby_that_took_the_stream_serves_every_tunnel_where_it_was() {
    let mut active = Lab::new();
    let mut spare = standby();
    // Tunnels before the standby connects: established, half-open, one
    // that will expire, one that floats to another port.
    for n in 1..=12 {
        active.open_tunnel(peer(n), 0x100 + u64::from(n));
    }
    active.up(sa_init(peer(40), 500, 0x400)).unwrap();
    // The snapshot goes 4 slots at a time while tunnels open, re-key,
    // rebind and close on the active.
    let mut n = 12u8;
    let mut stream = Stream::connect(&mut active, &mut spare, 4, |a| {
        n += 1;
        a.tick(Duration::from_millis(100));
        a.open_tunnel(peer(n), 0x100 + u64::from(n));
    });
    // A NAT rebinding: tunnel 2 comes from another port now (proven by its
    // IKE SA pair).
    active.up(auth_4500(peer(2), 4600, 0x102)).unwrap();
    stream.changes(&mut active, &mut spare);
    // Everything idle past the timeout but the tunnels that speak again:
    // the idle ones expire on the active, and their `Gone` reaches the
    // standby, whose slots the active then reuses for new tunnels.
    active.tick(active.lb.idle_timeout() + Duration::from_secs(1));
    for n in 1..=6 {
        active
            .up(esp_udp(
                peer(n),
                if n == 2 { 4600 } else { 4500 },
                0xc100_0000 + u32::from(n),
            ))
            .ok();
    }
    while active.lb.expire(active.now, usize::MAX) > 0 {}
    for n in 50..=55 {
        active.open_tunnel(peer(n), 0x500 + u64::from(n));
    }
    stream.changes(&mut active, &mut spare);

    assert_eq!(
        tunnels(&spare.lb),
        tunnels(&active.lb),
        "the standby's table is the active's"
    );
    assert!(stream.replica.len() == active.lb.table().len());
    assert_eq!(stream.replica.counters.conflicts, 0);

    // The takeover: every tunnel's next frame goes where it went, without
    // a word to the policy.
    spare.now = active.now;
    spare.lb.take_over(&mut stream.replica, spare.now);
    for (_, t) in active
        .lb
        .table()
        .iter()
        .filter(|(_, t)| t.placement().is_established())
    {
        let frame = esp_udp(t.peer, t.peer_port, 0xc100_0000);
        assert_eq!(
            spare.up(frame).map(PortId::from),
            Ok(t.gateway as PortId),
            "{}:{} went elsewhere",
            t.peer,
            t.peer_port
        );
    }
    assert_eq!(spare.placed(), 0, "nothing was placed again");
    // Nothing idles out at once: the idle timers start at the takeover.
    assert_eq!(spare.lb.expire(spare.now, usize::MAX), 0);
}

#[test]
fn a_tunnel_opened_within_the_lag_is_placed_again_and_counted() {
    let mut active = Lab::new();
    let mut spare = standby();
    for n in 1..=3 {
        active.open_tunnel(peer(n), 0x100 + u64::from(n));
    }
    let mut stream = Stream::connect(&mut active, &mut spare, 64, |_| {});
    // Opened after the last delta left: the active dies with it.
    active.open_tunnel(peer(9), 0x109);
    spare.lb.take_over(&mut stream.replica, spare.now);
    assert_eq!(spare.lb.table().len(), 3);
    // Its next frame (IKE on 4500, with its SPI pair) is placed by the new
    // active's policy: counted, and from then on it stays there.
    let first = spare.up(auth_4500(peer(9), 4500, 0x109)).unwrap();
    assert_eq!(spare.placed(), 1);
    assert_eq!(spare.up(esp_udp(peer(9), 4500, 0xc100_0009)), Ok(first));
}

#[test]
fn the_segws_macs_come_with_the_stream_so_the_first_frame_after_a_takeover_goes() {
    let mut active = Lab::learning_macs();
    for n in 1..=3 {
        let mut arp = arp_reply_from_segw(n);
        active.lb.handle(&mut arp, PortId::from(n), active.now);
    }
    for n in 1..=3 {
        active.open_tunnel(peer(n), 0x100 + u64::from(n));
    }
    let mut spare = Lab::learning_macs();
    spare.lb.set_standby(true);
    let mut stream = Stream::connect(&mut active, &mut spare, 64, |_| {});
    spare.lb.take_over(&mut stream.replica, spare.now);
    for n in 1..=3 {
        let gw = gateway_of_spi(&active, 0x100 + u64::from(n)).unwrap();
        assert_eq!(spare.up(esp_udp(peer(n), 4500, 0xc100_0000)), Ok(gw));
    }
    // Said once: nothing changed since.
    let mut again = Vec::new();
    active
        .lb
        .replica_deltas(&mut stream.source, active.now, &mut again)
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
}

#[test]
fn a_takeover_announces_the_vip_upstream_and_the_proxied_peers_to_the_segws() {
    let mut lab = Lab::new();
    lab.open_tunnel(peer(7), 0x107);
    let frames = lab.lb.takeover_announcements(&[VIP], 4);
    let arp_of = |f: &Vec<u8>| {
        let p = packet::parse(f).unwrap();
        match p.kind {
            Kind::Arp(a) => a.sender_ip,
            other => panic!("{other:?}"),
        }
    };
    let uplink: Vec<_> = frames.iter().filter(|(p, _)| *p == UPLINK).collect();
    assert_eq!(uplink.len(), 1);
    assert_eq!(arp_of(&uplink[0].1), Ipv4Addr::new(10, 2, 2, 1));
    // 198.51.100.0/24 is proxied on the segw ports: a small prefix, so its
    // first addresses go first, on every segw port, up to the cap.
    let segw_side: Vec<_> = frames.iter().filter(|(p, _)| *p != UPLINK).collect();
    assert_eq!(segw_side.len(), 4 * 3);
    for port in 1..=3 {
        let said: Vec<_> = segw_side
            .iter()
            .filter(|(p, _)| *p == port)
            .map(|(_, f)| arp_of(f))
            .collect();
        assert_eq!(
            said,
            (0..4)
                .map(|i| Ipv4Addr::new(198, 51, 100, i))
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn a_standby_overhears_what_the_segws_ask_for_and_announces_it_first_at_takeover() {
    let mut lab = standby();
    // segw2 asks (broadcast) for the proxied next hop it routes through.
    let hop = Ipv4Addr::new(198, 51, 100, 200);
    let ask = packet::arp::Arp::request(segw_mac(2), Ipv4Addr::new(10, 2, 2, 1), hop)
        .broadcast_frame(segw_mac(2), None);
    let mut f = ask.clone();
    assert_eq!(
        lab.lb.handle(&mut f, 2, lab.now),
        Verdict::Drop(DropReason::Standby),
        "unanswered"
    );
    lab.lb.take_over(&mut Replica::default(), lab.now);
    let said: Vec<Ipv4Addr> = lab
        .lb
        .takeover_announcements(&[VIP], 1)
        .iter()
        .filter(|(port, _)| *port != UPLINK)
        .map(|(_, f)| match packet::parse(f).unwrap().kind {
            Kind::Arp(a) => a.sender_ip,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        said,
        vec![hop; 3],
        "the asked-for address, on every segw port"
    );
}

#[test]
fn the_other_balancers_probes_on_a_shared_segment_teach_no_segw_mac() {
    let mut lab = Lab::learning_macs();
    let other: Mac = [2, 0xbb, 0, 0, 0, 1];
    for vip in [VIP, "2001:db8:2::1".parse().unwrap()] {
        let mut probe = health::probe_frame(other, vip);
        lab.lb.handle(&mut probe, 1, lab.now);
    }
    // Nor its gratuitous ARPs for the proxied addresses, after a takeover.
    let mut claim = lab.lb.takeover_announcements(&[VIP], 1);
    for (port, f) in &mut claim {
        if *port == 1 {
            let mut f = std::mem::take(f);
            f[6..12].copy_from_slice(&other);
            f[22..28].copy_from_slice(&other);
            lab.lb.handle(&mut f, 1, lab.now);
        }
    }
    assert_eq!(lab.lb.gateway("segw1").unwrap().mac, None);
    // segw1's own answer does.
    let mut answer = arp_reply_from_segw(1);
    lab.lb.handle(&mut answer, 1, lab.now);
    assert_eq!(lab.lb.gateway("segw1").unwrap().mac, Some(segw_mac(1)));
}
