//! Write the fuzzers' seed corpus: one file per kind of frame the core
//! handles, each prefixed with the ingress port byte the fuzz target reads.
//!
//!     cargo run -p segwlb --example fuzz_seeds -- fuzz/corpus/handle

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use segwlb::packet::arp::Arp;
use segwlb::packet::craft::*;
use segwlb::packet::ike::{IKE_AUTH, IKE_SA_INIT, INFORMATIONAL};
use segwlb::packet::{ndp, IkeHeader};

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus/handle".into());
    std::fs::create_dir_all(&dir)?;
    let peer = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    let vip = IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1));
    let peer6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 7));
    let vip6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1));
    let ike = |exchange, responder_spi| IkeHeader {
        initiator_spi: 0x0123_4567_89ab_cdef,
        responder_spi,
        exchange,
        from_initiator: true,
        response: false,
        message_id: 1,
    };
    let (lb, router) = ([2, 0x1b, 0, 0, 0, 0], [2, 0xaa, 0, 0, 0, 1]);
    let up = |ip: &[u8]| frame(lb, router, None, ip);
    let big = udp_packet(peer, 4500, vip, 4500, &esp_body(0xc001, 2, 3000));
    let mut seeds: Vec<(&str, u8, Vec<u8>)> = vec![
        (
            "ike_sa_init",
            0,
            up(&udp_packet(
                peer,
                500,
                vip,
                500,
                &ike_body(&ike(IKE_SA_INIT, 0), false, 200),
            )),
        ),
        (
            "ike_auth_4500",
            0,
            up(&udp_packet(
                peer,
                4500,
                vip,
                4500,
                &ike_body(&ike(IKE_AUTH, 7), true, 300),
            )),
        ),
        (
            "ike_mobike",
            0,
            up(&udp_packet(
                peer,
                4500,
                vip,
                4500,
                &ike_body(&ike(INFORMATIONAL, 7), true, 40),
            )),
        ),
        (
            "keepalive",
            0,
            up(&udp_packet(peer, 31_337, vip, 4500, &keepalive_body())),
        ),
        (
            "esp_in_udp",
            0,
            up(&udp_packet(
                peer,
                4500,
                vip,
                4500,
                &esp_body(0xc001, 1, 120),
            )),
        ),
        (
            "esp_raw",
            0,
            up(&ip_packet(peer, vip, 50, &esp_body(0xc002, 1, 100), 9)),
        ),
        (
            "esp_raw6",
            0,
            up(&ip_packet(peer6, vip6, 50, &esp_body(0xc003, 1, 100), 0)),
        ),
        (
            "ike6",
            0,
            up(&udp_packet(
                peer6,
                500,
                vip6,
                500,
                &ike_body(&ike(IKE_SA_INIT, 0), false, 64),
            )),
        ),
        (
            "vlan_ike",
            0,
            frame(
                lb,
                router,
                Some(42),
                &udp_packet(
                    peer,
                    500,
                    vip,
                    500,
                    &ike_body(&ike(IKE_SA_INIT, 0), false, 0),
                ),
            ),
        ),
        (
            "icmp_frag_needed",
            0,
            up(&icmp_too_big(
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                vip,
                &udp_packet(vip, 4500, peer, 4500, &esp_body(1, 1, 1400)),
                1280,
            )),
        ),
        (
            "return_esp",
            2,
            frame(
                router,
                [2, 0x5e, 0, 0, 0, 2],
                None,
                &udp_packet(vip, 4500, peer, 4500, &esp_body(7, 1, 60)),
            ),
        ),
        (
            "arp_request",
            0,
            Arp::request(
                router,
                Ipv4Addr::new(198, 51, 100, 1),
                Ipv4Addr::new(10, 2, 2, 1),
            )
            .broadcast_frame(router, None),
        ),
    ];
    if let (IpAddr::V6(p6), IpAddr::V6(v6)) = (peer6, vip6) {
        seeds.push((
            "ndp_solicit",
            0,
            frame(
                ndp::multicast_mac(ndp::solicited_node(v6)),
                router,
                None,
                &ndp::solicitation(p6, router, v6),
            ),
        ));
    }
    for (i, f) in fragments(&big, 1400, 0x4321).into_iter().enumerate() {
        seeds.push((["frag_1", "frag_2", "frag_3"][i], 0, up(&f)));
    }
    let mut count = seeds.len();
    for (name, port, bytes) in &seeds {
        let mut data = vec![*port];
        data.extend_from_slice(bytes);
        std::fs::write(format!("{dir}/{name}"), data)?;
    }
    // Every frame strongSwan sent in the captures; the segw's on port 1.
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
    for file in ["strongswan-direct", "strongswan-nat", "strongswan-steered"] {
        let data = std::fs::read(format!("{fixtures}/{file}.pcap"))?;
        let records = segwlb::packet::pcap::read(&data)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        for (i, r) in records.iter().enumerate() {
            let from_segw = r.frame.get(6..12) == Some(&[2, 0, 0, 0x99, 2, 0x0a][..]);
            let mut seed = vec![u8::from(from_segw)];
            seed.extend_from_slice(&r.frame);
            std::fs::write(format!("{dir}/{file}-{:02}", i + 1), seed)?;
            count += 1;
        }
    }
    println!("{count} seeds in {dir}");
    Ok(())
}
