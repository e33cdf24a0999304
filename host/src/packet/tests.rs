use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::craft::*;
use super::ike::{IKE_AUTH, IKE_SA_INIT};
use super::*;

const PEER_MAC: Mac = [2, 0, 0, 0, 0, 1];
const LB_MAC: Mac = [2, 0, 0, 0, 0, 0xb];
const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1));
const PEER6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 7));
const VIP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1));

fn sa_init() -> IkeHeader {
    IkeHeader {
        initiator_spi: 0x0123_4567_89ab_cdef,
        responder_spi: 0,
        exchange: IKE_SA_INIT,
        from_initiator: true,
        response: false,
        message_id: 0,
    }
}

fn auth() -> IkeHeader {
    IkeHeader {
        responder_spi: 0xfeed_f00d_dead_beef,
        exchange: IKE_AUTH,
        message_id: 1,
        ..sa_init()
    }
}

fn to_vip(ip: Vec<u8>) -> Vec<u8> {
    frame(LB_MAC, PEER_MAC, None, &ip)
}

fn ip(frame: &[u8]) -> IpPacket {
    match parse(frame).expect("parses").kind {
        Kind::Ip(ip) => ip,
        other => panic!("not IP: {other:?}"),
    }
}

/// Every fixture frame the tests use; also fed to the truncation test.
fn fixtures() -> Vec<(&'static str, Vec<u8>)> {
    let esp_udp = udp_packet(PEER, 4500, VIP, 4500, &esp_body(0xc001_d00d, 1, 120));
    let big_esp = udp_packet(PEER, 4500, VIP, 4500, &esp_body(0xc001_d00d, 2, 3000));
    let big_esp6 = udp_packet(PEER6, 4500, VIP6, 4500, &esp_body(0xc001_d00d, 2, 3000));
    let back_to_peer = udp_packet(VIP, 4500, PEER, 4500, &esp_body(0xbeef_0001, 9, 1400));
    let back_to_peer6 = ip_packet(VIP6, PEER6, 50, &esp_body(0xbeef_0002, 9, 1400), 0);
    let mut v = vec![
        (
            "ike_sa_init_500",
            to_vip(udp_packet(
                PEER,
                500,
                VIP,
                500,
                &ike_body(&sa_init(), false, 200),
            )),
        ),
        (
            "ike_auth_4500",
            to_vip(udp_packet(
                PEER,
                4500,
                VIP,
                4500,
                &ike_body(&auth(), true, 300),
            )),
        ),
        (
            "keepalive",
            to_vip(udp_packet(PEER, 31_337, VIP, 4500, &keepalive_body())),
        ),
        ("esp_in_udp", to_vip(esp_udp)),
        (
            "raw_esp",
            to_vip(ip_packet(PEER, VIP, 50, &esp_body(0xc002, 1, 100), 9)),
        ),
        (
            "raw_esp6",
            to_vip(ip_packet(PEER6, VIP6, 50, &esp_body(0xc003, 1, 100), 0)),
        ),
        (
            "ike6",
            to_vip(udp_packet(
                PEER6,
                500,
                VIP6,
                500,
                &ike_body(&sa_init(), false, 64),
            )),
        ),
        (
            "vlan_ike",
            frame(
                LB_MAC,
                PEER_MAC,
                Some(42),
                &udp_packet(PEER, 500, VIP, 500, &ike_body(&sa_init(), false, 0)),
            ),
        ),
        (
            "icmp_frag_needed",
            to_vip(icmp_too_big(
                IpAddr::V4(Ipv4Addr::new(198, 51, 100, 254)),
                VIP,
                &back_to_peer,
                1280,
            )),
        ),
        (
            "icmp6_too_big",
            to_vip(icmp_too_big(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0xfe)),
                VIP6,
                &back_to_peer6,
                1280,
            )),
        ),
        (
            "return_esp_in_udp",
            frame(
                PEER_MAC,
                LB_MAC,
                None,
                &udp_packet(VIP, 4500, PEER, 31_337, &esp_body(7, 1, 60)),
            ),
        ),
        (
            "arp_request",
            arp::Arp::request(
                PEER_MAC,
                Ipv4Addr::new(198, 51, 100, 7),
                Ipv4Addr::new(10, 2, 2, 1),
            )
            .broadcast_frame(PEER_MAC, None),
        ),
    ];
    for (i, f) in fragments(&big_esp, 1400, 0x4321).into_iter().enumerate() {
        v.push((["frag4_first", "frag4_second", "frag4_third"][i], to_vip(f)));
    }
    for (i, f) in fragments(&big_esp6, 1400, 0x8765_4321)
        .into_iter()
        .enumerate()
    {
        v.push((["frag6_first", "frag6_second", "frag6_third"][i], to_vip(f)));
    }
    v
}

fn fixture(name: &str) -> Vec<u8> {
    fixtures()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no fixture {name}"))
        .1
}

#[test]
fn ike_on_500_carries_the_initiator_spi() {
    let p = ip(&fixture("ike_sa_init_500"));
    assert_eq!((p.src, p.dst, p.fragment), (PEER, VIP, None));
    let Payload::Ike { udp, header, nat_t } = p.payload else {
        panic!("{:?}", p.payload)
    };
    assert_eq!((udp.src, udp.dst, nat_t), (500, 500, false));
    assert_eq!(header, sa_init());
    assert!(header.is_sa_init_request());
}

#[test]
fn ike_on_4500_behind_the_non_esp_marker() {
    let Payload::Ike { header, nat_t, .. } = ip(&fixture("ike_auth_4500")).payload else {
        panic!()
    };
    assert!(nat_t);
    assert_eq!(header, auth());
    assert!(!header.is_sa_init_request());
}

#[test]
fn udp_4500_keepalive_esp_and_return_traffic() {
    assert_eq!(
        ip(&fixture("keepalive")).payload,
        Payload::NatKeepalive {
            udp: Udp {
                src: 31_337,
                dst: 4500
            }
        }
    );
    assert_eq!(
        ip(&fixture("esp_in_udp")).payload,
        Payload::EspInUdp {
            udp: Udp {
                src: 4500,
                dst: 4500
            },
            spi: 0xc001_d00d
        }
    );
    // segw → peer behind a NAT: the IKE side's port is the source.
    assert_eq!(
        ip(&fixture("return_esp_in_udp")).payload,
        Payload::EspInUdp {
            udp: Udp {
                src: 4500,
                dst: 31_337
            },
            spi: 7
        }
    );
}

#[test]
fn raw_esp_over_both_families() {
    assert_eq!(
        ip(&fixture("raw_esp")).payload,
        Payload::Esp { spi: 0xc002 }
    );
    let p = ip(&fixture("raw_esp6"));
    assert_eq!((p.src, p.payload), (PEER6, Payload::Esp { spi: 0xc003 }));
    assert!(matches!(
        ip(&fixture("ike6")).payload,
        Payload::Ike { nat_t: false, .. }
    ));
}

#[test]
fn one_vlan_tag_is_seen_through_two_are_refused() {
    let f = parse(&fixture("vlan_ike")).unwrap();
    assert_eq!((f.vlan, f.l3_offset), (Some(42), 18));
    assert!(matches!(
        f.kind,
        Kind::Ip(IpPacket {
            payload: Payload::Ike { .. },
            ..
        })
    ));
    let mut double = fixture("vlan_ike");
    double.splice(16..16, [0x81, 0x00, 0x00, 0x07]);
    assert_eq!(parse(&double), Err(Malformed::VlanStack));
}

#[test]
fn fragments_first_carries_ports_later_ones_do_not() {
    for (v, id) in [("4", 0x4321), ("6", 0x8765_4321)] {
        let first = ip(&fixture(&format!("frag{v}_first")));
        assert_eq!(
            first.fragment,
            Some(Fragment {
                id,
                first: true,
                protocol: 17
            })
        );
        assert!(
            matches!(
                first.payload,
                Payload::EspInUdp {
                    spi: 0xc001_d00d,
                    ..
                }
            ),
            "{:?}",
            first.payload
        );
        for later in ["second", "third"] {
            let p = ip(&fixture(&format!("frag{v}_{later}")));
            assert_eq!(
                p.fragment,
                Some(Fragment {
                    id,
                    first: false,
                    protocol: 17
                })
            );
            assert_eq!(p.payload, Payload::LaterFragment { protocol: 17 });
            assert_eq!(p.src, if v == "4" { PEER } else { PEER6 });
        }
    }
}

#[test]
fn icmp_errors_expose_the_tunnel_they_quote() {
    let Payload::IcmpError { quoted: Some(q) } = ip(&fixture("icmp_frag_needed")).payload else {
        panic!()
    };
    assert_eq!((q.src, q.dst), (VIP, PEER));
    assert_eq!(
        q.udp,
        Some(Udp {
            src: 4500,
            dst: 4500
        })
    );
    assert_eq!(q.spi, Some(0xbeef_0001));
    let Payload::IcmpError { quoted: Some(q) } = ip(&fixture("icmp6_too_big")).payload else {
        panic!()
    };
    assert_eq!(
        (q.src, q.dst, q.udp, q.spi),
        (VIP6, PEER6, None, Some(0xbeef_0002))
    );
}

#[test]
fn arp_requests_parse_and_replies_answer_them() {
    let f = parse(&fixture("arp_request")).unwrap();
    let Kind::Arp(req) = f.kind else { panic!() };
    assert_eq!(
        (req.op, req.target_ip, req.sender_mac),
        (arp::REQUEST, Ipv4Addr::new(10, 2, 2, 1), PEER_MAC)
    );
    let reply = req.reply(LB_MAC);
    let bytes = reply.to_frame(req.sender_mac, LB_MAC, f.vlan);
    let Kind::Arp(back) = parse(&bytes).unwrap().kind else {
        panic!()
    };
    assert_eq!(
        (back.op, back.sender_ip, back.sender_mac),
        (arp::REPLY, req.target_ip, LB_MAC)
    );
    assert_eq!((back.target_ip, back.target_mac), (req.sender_ip, PEER_MAC));
}

#[test]
fn every_truncation_of_every_fixture_is_an_answer_not_a_panic() {
    for (name, frame) in fixtures() {
        for len in 0..=frame.len() {
            // The result may be an error or a shorter reading; it must not panic.
            let _ = parse(&frame[..len]);
        }
        assert!(parse(&frame).is_ok(), "{name} does not parse whole");
    }
}

#[test]
fn truncated_headers_are_named() {
    assert_eq!(parse(&[0; 13]), Err(Malformed::Ethernet));
    let ike = fixture("ike_sa_init_500");
    // Cut inside the IKE header, and fix up the IP and UDP lengths so only
    // the IKE header is short.
    let cut = 14 + 20 + 8 + 10;
    let mut short = ike[..cut].to_vec();
    short[16..18].copy_from_slice(&((cut - 14) as u16).to_be_bytes());
    short[38..40].copy_from_slice(&((cut - 34) as u16).to_be_bytes());
    assert_eq!(parse(&short), Err(Malformed::Ike));
}

#[test]
fn rewrite_touches_only_the_two_macs() {
    let mut f = fixture("vlan_ike");
    let before = f.clone();
    rewrite::set_macs(&mut f, [9; 6], [8; 6]);
    assert_eq!(&f[..12], &[9, 9, 9, 9, 9, 9, 8, 8, 8, 8, 8, 8]);
    assert_eq!(f[12..], before[12..]);
}
