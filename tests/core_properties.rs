//! Properties of the balancer core on any input: arbitrary bytes and
//! mutated real frames never panic, every frame gets exactly one verdict,
//! and whatever is forwarded differs from its input only in the two MACs.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use proptest::prelude::*;
use segwlb::balancer::{farm, Balancer, PortId, Verdict, UPLINK};
use segwlb::packet::craft::*;
use segwlb::packet::ike::{IKE_AUTH, IKE_SA_INIT};
use segwlb::packet::{arp::Arp, IkeHeader};
use segwlb::policy::native;
use segwlb::time::Timestamp;

const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1));
const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));

fn balancer() -> Balancer {
    let proxy = vec!["10.2.2.0/24".parse().unwrap()];
    farm::balancer(
        native::shipped("consistent-hash", &[]).unwrap(),
        3,
        proxy,
        64,
    )
}

/// The responder's SPI is known past IKE_SA_INIT: what lets the IKE_AUTH
/// seed float the tunnel to 4500.
fn ike(exchange: u8) -> IkeHeader {
    IkeHeader {
        initiator_spi: 0x1111,
        responder_spi: if exchange == IKE_SA_INIT { 0 } else { 0x2222 },
        exchange,
        from_initiator: true,
        response: false,
        message_id: 0,
    }
}

/// Real frames of every kind the core handles: the seeds of the mutations.
/// Read once: the captures are files.
fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(build_seeds)
}

fn build_seeds() -> Vec<Vec<u8>> {
    let up = |ip: Vec<u8>| frame([2, 0x1b, 0, 0, 0, 0], [2, 0xaa, 0, 0, 0, 1], None, &ip);
    let big = udp_packet(PEER, 4500, VIP, 4500, &esp_body(0xc001, 2, 3000));
    let mut v = vec![
        up(udp_packet(
            PEER,
            500,
            VIP,
            500,
            &ike_body(&ike(IKE_SA_INIT), false, 100),
        )),
        up(udp_packet(
            PEER,
            4500,
            VIP,
            4500,
            &ike_body(&ike(IKE_AUTH), true, 200),
        )),
        up(udp_packet(PEER, 4500, VIP, 4500, &keepalive_body())),
        up(udp_packet(PEER, 4500, VIP, 4500, &esp_body(0xc001, 1, 100))),
        up(ip_packet(PEER, VIP, 50, &esp_body(0xc002, 1, 100), 3)),
        frame(
            [2, 0x1b, 0, 0, 0, 0],
            [2, 0xaa, 0, 0, 0, 1],
            Some(7),
            &udp_packet(PEER, 500, VIP, 500, &ike_body(&ike(IKE_SA_INIT), false, 0)),
        ),
        up(icmp_too_big(
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            VIP,
            &udp_packet(VIP, 4500, PEER, 4500, &esp_body(1, 1, 1400)),
            1280,
        )),
        Arp::request(
            [2, 0xaa, 0, 0, 0, 1],
            Ipv4Addr::new(198, 51, 100, 1),
            Ipv4Addr::new(10, 2, 2, 1),
        )
        .broadcast_frame([2, 0xaa, 0, 0, 0, 1], None),
    ];
    v.extend(fragments(&big, 1400, 99).into_iter().map(up));
    // And every frame strongSwan sent in the direct and NAT captures.
    for file in ["strongswan-direct.pcap", "strongswan-nat.pcap"] {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/").to_string() + file;
        let data = std::fs::read(&path).expect("the fixture");
        v.extend(
            segwlb::packet::pcap::read(&data)
                .expect("a pcap")
                .into_iter()
                .map(|r| r.frame),
        );
    }
    v
}

fn check(lb: &mut Balancer, input: Vec<u8>, port: PortId) -> Result<(), TestCaseError> {
    // Every frame that came in is forwarded, answered, dropped or held now.
    let accounted = |lb: &Balancer| {
        let c = lb.counters();
        c.forwarded + c.replies + c.drops.iter().sum::<u64>() + lb.held_fragments().1 as u64
    };
    let before = accounted(lb);
    let mut frame = input.clone();
    let verdict = lb.handle(&mut frame, port, Timestamp::from_secs(1));
    prop_assert_eq!(accounted(lb) - before, 1, "one verdict, one count");
    match verdict {
        Verdict::Forward(_) | Verdict::ForwardWithHeld(..) => prop_assert_eq!(
            &frame[12..],
            &input[12..],
            "a forwarded frame changed past its MACs"
        ),
        Verdict::Held => prop_assert!(frame.is_empty(), "a held frame is taken"),
        Verdict::Reply | Verdict::Drop(_) => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400), port in 0u16..4) {
        check(&mut balancer(), bytes, port)?;
    }

    #[test]
    fn mutated_real_frames(
        // An index into every seed, whatever their number: the captures
        // hold most of them.
        seed in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
        port in prop_oneof![Just(UPLINK), 1u16..4],
    ) {
        let mut lb = balancer();
        // Some state first, so lookups have something to find.
        for f in seeds().iter().take(5) {
            lb.handle(&mut f.clone(), UPLINK, Timestamp::ZERO);
        }
        let mut frame = seed.get(seeds()).clone();
        for (at, value) in flips {
            let i = at.index(frame.len());
            frame[i] = value;
        }
        if truncate {
            frame.truncate(cut.index(frame.len() + 1));
        }
        check(&mut lb, frame, port)?;
    }
}

/// The deterministic floor under the mutations: every seed, crafted and
/// captured, cut at every length, on both sides, gets exactly one verdict.
#[test]
fn every_seed_at_every_length_gets_one_verdict() {
    let seeds = seeds();
    // The captures are there: 11 crafted frames, the rest strongSwan's.
    assert!(seeds.len() > 60, "{} seeds", seeds.len());
    let mut lb = balancer();
    for f in seeds {
        lb.handle(&mut f.clone(), UPLINK, Timestamp::ZERO);
    }
    for (i, f) in seeds.iter().enumerate() {
        for cut in 0..=f.len() {
            for port in [UPLINK, 1] {
                check(&mut lb, f[..cut].to_vec(), port)
                    .unwrap_or_else(|e| panic!("seed {i} cut at {cut} on port {port}: {e}"));
            }
        }
    }
}
