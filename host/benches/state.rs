//! What a warm restart costs at 100,000 tunnels (release build):
//!
//!     cargo bench -p segwlb --bench state
//!
//! Opens the tunnels through `Balancer::handle` (IKE_SA_INIT and the
//! segw's answers to it and to IKE_AUTH: established, SPI pair known), then times each part of a
//! SIGTERM + start: the table saved, encoded and written (synced, renamed),
//! read back, decoded and restored into a fresh balancer. Prints the file's
//! size, and as a baseline the time to open the same tunnels through
//! `handle` in the first place.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use segwlb::balancer::saved::{decode, encode};
use segwlb::balancer::{farm, Balancer, Verdict, UPLINK};
use segwlb::control::state;
use segwlb::packet::craft::{frame, ike_body, udp_packet};
use segwlb::packet::ike::{IKE_AUTH, IKE_SA_INIT};
use segwlb::packet::IkeHeader;
use segwlb::policy::native;
use segwlb::time::Timestamp;

const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1));
const TUNNELS: u32 = 100_000;

fn balancer() -> Balancer {
    let policy = native::shipped("round-robin", &[]).expect("shipped");
    let policy: Box<dyn segwlb::policy::Policy> = Box::new(policy);
    let mut lb = farm::balancer(policy, 3, vec![], 1 << 20);
    lb.reserve_table();
    lb
}

fn open(lb: &mut Balancer, now: Timestamp) {
    let mut f = Vec::with_capacity(256);
    for i in 0..TUNNELS {
        let peer = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        let spi = u64::from(i) + 1;
        let mut h = IkeHeader {
            initiator_spi: spi,
            responder_spi: 0,
            exchange: IKE_SA_INIT,
            from_initiator: true,
            response: false,
            message_id: 0,
        };
        let init = udp_packet(peer, 500, VIP, 500, &ike_body(&h, false, 0));
        f.clear();
        f.extend_from_slice(&frame(
            farm::port_mac(UPLINK),
            [2, 0xaa, 0, 0, 0, 1],
            None,
            &init,
        ));
        let Verdict::Forward(port) = lb.handle(&mut f, UPLINK, now) else {
            panic!("IKE_SA_INIT {i} not forwarded")
        };
        h.responder_spi = 0x77;
        h.from_initiator = false;
        h.response = true;
        let back = udp_packet(VIP, 500, peer, 500, &ike_body(&h, false, 0));
        f.clear();
        f.extend_from_slice(&frame(
            farm::port_mac(port),
            farm::segw_mac(port as u8),
            None,
            &back,
        ));
        assert!(matches!(
            lb.handle(&mut f, port, now),
            Verdict::Forward(UPLINK)
        ));
        // Its IKE_AUTH answer: what establishes it.
        h.exchange = IKE_AUTH;
        h.message_id = 1;
        let back = udp_packet(VIP, 500, peer, 500, &ike_body(&h, false, 0));
        f.clear();
        f.extend_from_slice(&frame(
            farm::port_mac(port),
            farm::segw_mac(port as u8),
            None,
            &back,
        ));
        assert!(matches!(
            lb.handle(&mut f, port, now),
            Verdict::Forward(UPLINK)
        ));
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn main() {
    let dir = std::env::temp_dir().join(format!("segwlb-state-bench-{}", std::process::id()));
    let path = dir.join("segwlb.state");
    let mut lb = balancer();
    let t = Instant::now();
    open(&mut lb, Timestamp::from_secs(10));
    let opening = ms(t);

    let t = Instant::now();
    let saved = lb.save(Timestamp::from_secs(20));
    let saving = ms(t);
    let t = Instant::now();
    let bytes = encode(&saved).len();
    let encoding = ms(t);
    let t = Instant::now();
    state::write(&path, &saved).expect("written");
    let writing = ms(t);

    let t = Instant::now();
    let read = state::read(&path).expect("read").expect("there");
    let reading = ms(t);
    let mut fresh = balancer();
    let t = Instant::now();
    let restored = fresh.restore(&read, Timestamp::from_secs(1));
    let restoring = ms(t);
    assert_eq!(restored.loaded, TUNNELS as usize, "{restored}");
    assert_eq!(
        decode(&encode(&read)).expect("round trip").len(),
        read.len()
    );
    let _ = std::fs::remove_dir_all(&dir);

    println!("warm restart at {TUNNELS} tunnels (release build, one core)");
    println!(
        "  state file: {bytes} bytes ({:.0} per tunnel)",
        bytes as f64 / f64::from(TUNNELS)
    );
    println!("  stop:  save the table {saving:.1} ms, encode {encoding:.1} ms, encode + write + sync + rename {writing:.1} ms");
    println!("  start: read + check + decode {reading:.1} ms, restore into a fresh table {restoring:.1} ms");
    println!(
        "  baseline: opening the same tunnels through handle {opening:.1} ms; restore / open = {:.2}",
        restoring / opening
    );
}
