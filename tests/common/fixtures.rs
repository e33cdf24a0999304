//! The strongSwan and libreswan captures in tests/fixtures/ (made by
//! scripts/capture-fixtures.sh; what each frame is is listed in
//! tests/fixtures/README.md) and the balancer they were captured for: the
//! initiator on the uplink, the captured segw behind port 1 (port 3 for
//! steering), two more segws beside it. Shared by the tests that replay
//! them (`#[path]`: only those compile it).
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::PathBuf;

use segwlb::balancer::affinity::Timeouts;
use segwlb::balancer::farm::port_mac;
use segwlb::balancer::{
    Balancer, Config, DropReason, GatewaySpec, IkeSpiLabel, PortId, SpiSteering, Verdict, UPLINK,
};
use segwlb::packet::{self, Mac};
use segwlb::policy::native;
use segwlb::time::Timestamp;

/// The segw's MAC in every capture.
pub const SEGW: Mac = [0x02, 0, 0, 0x99, 0x02, 0x0a];
pub const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

pub struct Captured {
    pub at: Timestamp,
    pub bytes: Vec<u8>,
}

pub fn pcap(name: &str) -> Vec<Captured> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    packet::pcap::read(&data)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .map(|r| Captured {
            at: Timestamp::from_duration(r.at),
            bytes: r.frame,
        })
        .collect()
}

pub fn steering_of_segw3() -> SpiSteering {
    // What the steered capture's segw ran with (tests/fixtures/README.md).
    SpiSteering {
        ike_label: Some(IkeSpiLabel {
            mask: 0xff00_0000_0000_0000,
            label: 0x0300_0000_0000_0000,
        }),
        esp_range: Some((0xc300_0000, 0xc3ff_ffff)),
    }
}

/// Three segws, round-robin (the first new tunnel goes to segw1); the
/// captured segw is `captured` (1 or 3), with or without its SPI steering.
pub fn balancer(captured: u8, steering: bool) -> Balancer {
    let config = Config {
        port_macs: (0..4).map(port_mac).collect(),
        // The VIP and the initiators' subnet: each side's ARP for the other
        // is answered by the balancer.
        proxy: vec!["192.0.2.0/24".parse().unwrap()],
        proxy_gateways: vec!["192.0.2.0/24".parse().unwrap()],
        max_tunnels: 1024,
        timeouts: Timeouts::default(),
    };
    let mut lb = Balancer::new(config, native::shipped("round-robin", &[]).unwrap());
    for n in 1..=3u8 {
        let spec = GatewaySpec {
            name: format!("segw{n}"),
            port: PortId::from(n),
            mac: Some(if n == captured {
                SEGW
            } else {
                [2, 0x5e, 0, 0, 0, n]
            }),
            weight: 1,
            capacity: 0,
            throughput: 0,
            steering: if steering && n == 3 {
                steering_of_segw3()
            } else {
                SpiSteering::default()
            },
        };
        lb.add_gateway(spec, Timestamp::ZERO).unwrap();
    }
    lb
}

/// Which way a captured frame went: from the segw, or towards it.
pub fn from_segw(frame: &[u8]) -> bool {
    frame[6..12] == SEGW
}

/// Captured frame `c` as it arrives at the balancer with the segw behind
/// `port`: its ingress port, and the frame addressed to the balancer's MAC
/// there (each side sends to the balancer, not to the other side).
pub fn arriving(c: &Captured, port: PortId) -> (PortId, Vec<u8>) {
    let ingress = if from_segw(&c.bytes) { port } else { UPLINK };
    let mut f = c.bytes.clone();
    if f[0] & 1 == 0 {
        f[0..6].copy_from_slice(&port_mac(ingress));
    }
    (ingress, f)
}

/// Every capture by name.
pub const ALL: [&str; 8] = [
    "strongswan-direct.pcap",
    "strongswan-nat.pcap",
    "strongswan-steered.pcap",
    "libreswan-direct.pcap",
    "libreswan-nat.pcap",
    "libreswan-nofloat.pcap",
    "libreswan-nochild.pcap",
    "libreswan-rebind.pcap",
];

/// Replay `frames` with the segw behind `port`; check every verdict and
/// every rewrite. Returns the ports IP frames from the initiator went to.
pub fn replay(lb: &mut Balancer, frames: &[Captured], port: PortId) -> Vec<PortId> {
    let mut went = Vec::new();
    for (i, c) in frames.iter().enumerate() {
        let n = i + 1;
        let back = from_segw(&c.bytes);
        let (ingress, mut f) = arriving(c, port);
        let sent = f.clone();
        let verdict = lb.handle(&mut f, ingress, c.at);
        let arp = c.bytes[12..14] == [0x08, 0x06];
        match (arp, verdict) {
            (true, Verdict::Reply) => {
                let reply = packet::arp::Arp::parse(&f[14..]).expect("an ARP reply");
                assert_eq!(reply.sender_mac, port_mac(ingress), "frame {n}");
            }
            (true, Verdict::Drop(DropReason::ArpIgnored)) => {
                assert_eq!(c.bytes[21], 2, "frame {n}: only ARP replies go unanswered");
            }
            (false, Verdict::Forward(out)) => {
                assert_eq!(
                    f[12..],
                    sent[12..],
                    "frame {n}: bytes past the MACs changed"
                );
                assert_eq!(f[6..12], port_mac(out), "frame {n}: source MAC");
                if back {
                    assert_eq!(out, UPLINK, "frame {n}");
                    // The initiator's (or its NAT's) MAC, learned from its frames.
                    assert_eq!(f[0..6], c.bytes[0..6], "frame {n}: next hop");
                } else {
                    went.push(out);
                }
            }
            (_, v) => panic!("frame {n}: unexpected {v:?}"),
        }
    }
    went
}
