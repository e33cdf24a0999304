//! What one frame costs in the XDP fast path, against the core deciding
//! the same frame, in one run (root; release build):
//!
//!     cargo bench -p segwlb --bench fastpath
//!
//! 1,000 tunnels (ESP in UDP, established through `Balancer::handle`),
//! the fast path's maps written from `Balancer::fast_path`. Then, per
//! frame kind (ESP in UDP up, ESP in UDP down):
//!
//! - xdp: the kernel's mean time per run of the program on live frames
//!   (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`): parse, map
//!   lookups, counters, MAC rewrite and the redirect, which really
//!   transmits on a veth in a namespace this program builds and removes
//!   (the receiving veth's work is in the figure too);
//! - pass: the same program on a frame it does not know (a raw ESP frame
//!   of an unknown peer): passed to the kernel's stack, where `segwlb
//!   run`'s AF_PACKET socket would read it. The baseline: what every frame
//!   costs before the userspace path even starts;
//! - core: `Balancer::handle` on the same frame (with the copy of the frame
//!   into the buffer it rewrites): the decision alone, without the two
//!   AF_PACKET crossings `segwlb run` pays around it (`--bench throughput`
//!   measures those).
//!
//! Then reading every tunnel's counters back, as the worker does every
//! second, at 1,000 and at 50,000 tunnels: `FastPath::take_counts` (loads
//! from the mapped counter array) against the baseline of one lookup
//! syscall per tunnel.
//!
//! `SEGWLB_BENCH_REPEAT` (default 1,000,000) runs per figure. Not root, or
//! no XDP program in this build: says so and exits 0.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use segwlb::balancer::farm::{self, port_mac, segw_mac};
use segwlb::balancer::{Balancer, PortId, Verdict, UPLINK};
use segwlb::io::xdp::{FastPath, PROGRAM};
use segwlb::lab::netns::{self, Netns};
use segwlb::packet::craft::{esp_body, frame, ike_body, ip_packet, udp_packet};
use segwlb::packet::ike::{IKE_AUTH, IKE_SA_INIT};
use segwlb::packet::{IkeHeader, Mac};
use segwlb::policy::native;
use segwlb::time::Timestamp;

const ROUTER: Mac = [2, 0xaa, 0, 0, 0, 1];
const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1));
const TUNNELS: u32 = 1000;
/// Tunnels for the second counter reading.
const MANY: u32 = 50_000;
const SEGWS: u8 = 3;

fn ike(spi: u64, exchange: u8, responder: u64, from_initiator: bool) -> IkeHeader {
    IkeHeader {
        initiator_spi: spi,
        responder_spi: responder,
        exchange,
        from_initiator,
        response: !from_initiator,
        message_id: u32::from(exchange != IKE_SA_INIT),
    }
}

fn peer(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + i))
}

/// Open tunnel `i` through the core; its segw's port.
fn open(lb: &mut Balancer, i: u32) -> PortId {
    let (p, spi) = (peer(i), u64::from(i) + 1);
    let mut handle = |port: PortId, src: Mac, ip: Vec<u8>| {
        let mut f = frame(port_mac(port), src, None, &ip);
        lb.handle(&mut f, port, Timestamp::ZERO)
    };
    let init = udp_packet(
        p,
        500,
        VIP,
        500,
        &ike_body(&ike(spi, IKE_SA_INIT, 0, true), false, 200),
    );
    let Verdict::Forward(segw) = handle(UPLINK, ROUTER, init) else {
        panic!("tunnel {i} not placed")
    };
    let mac = segw_mac(segw as u8);
    let answer = udp_packet(
        VIP,
        500,
        p,
        500,
        &ike_body(&ike(spi, IKE_SA_INIT, 0x77, false), false, 200),
    );
    handle(segw, mac, answer);
    let auth = udp_packet(
        p,
        4500,
        VIP,
        4500,
        &ike_body(&ike(spi, IKE_AUTH, 0x77, true), true, 300),
    );
    handle(UPLINK, ROUTER, auth);
    let answer = udp_packet(
        VIP,
        4500,
        p,
        4500,
        &ike_body(&ike(spi, IKE_AUTH, 0x77, false), true, 300),
    );
    handle(segw, mac, answer);
    segw
}

fn main() {
    if PROGRAM.is_none() || !netns::is_root() {
        println!("skipped: needs root and a build with the XDP program (clang, libbpf-dev)");
        return;
    }
    let repeat: u32 = std::env::var("SEGWLB_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let ns = Netns::new(&netns::unique_prefix("fpb")).expect("a namespace");
    for n in 0..=SEGWS {
        netns::veth(&ns, &format!("p{n}"), &ns, &format!("q{n}")).expect("veth");
        let mac = netns::format_mac(&port_mac(PortId::from(n)));
        ns.ip(&["link", "set", &format!("p{n}"), "address", &mac])
            .expect("mac");
        // The receiving end of a redirect into a veth needs NAPI: GRO on.
        ns.exec(&["ethtool", "-K", &format!("q{n}"), "gro", "on"])
            .expect("gro");
    }
    ns.enter(|| bench(repeat)).expect("setns");
}

fn bench(repeat: u32) {
    let ifindex: Vec<u32> = (0..=SEGWS)
        .map(|n| {
            let name = std::ffi::CString::new(format!("p{n}")).unwrap();
            // SAFETY: a NUL-terminated name.
            unsafe { libc::if_nametoindex(name.as_ptr()) }
        })
        .collect();
    let mut fp = FastPath::load(1 << 16, false).expect("the XDP program loads");
    for n in 0..=SEGWS {
        let port = PortId::from(n);
        fp.set_port(port, ifindex[usize::from(n)], port_mac(port))
            .expect("ports");
    }
    let policy = native::shipped("round-robin", &[]).expect("shipped");
    let mut lb = farm::balancer(policy, SEGWS, vec![], 1 << 16);
    let segw_of: Vec<PortId> = (0..TUNNELS).map(|i| open(&mut lb, i)).collect();
    let entries = lb.fast_path();
    let synced = fp.sync(&entries).expect("maps");
    println!(
        "{TUNNELS} tunnels, {} fast-path entries written; {repeat} runs per figure",
        synced.written
    );
    let i = TUNNELS / 2;
    let up = frame(
        port_mac(UPLINK),
        ROUTER,
        None,
        &udp_packet(peer(i), 4500, VIP, 4500, &esp_body(0xabc, 1, 108)),
    );
    let segw = segw_of[i as usize];
    let down = frame(
        port_mac(segw),
        segw_mac(segw as u8),
        None,
        &udp_packet(VIP, 4500, peer(i), 4500, &esp_body(0xdef, 1, 108)),
    );
    let unknown = frame(
        port_mac(UPLINK),
        ROUTER,
        None,
        &ip_packet(peer(TUNNELS + 7), VIP, 50, &esp_body(0x5eed, 1, 116), 1),
    );
    println!("frame      xdp ns/frame   pass ns/frame   xdp/pass   core decision ns/frame");
    for (name, f, ingress) in [("ESP up", &up, UPLINK), ("ESP down", &down, segw)] {
        let ifi = ifindex[usize::from(ingress)];
        // Each once to warm up (the live-frame page pool, the caches), then
        // measured.
        let up_ifi = ifindex[usize::from(UPLINK)];
        fp.time_live(&unknown, up_ifi, repeat / 10 + 1)
            .expect("test run");
        fp.time_live(f, ifi, repeat / 10 + 1).expect("test run");
        let pass = fp.time_live(&unknown, up_ifi, repeat).expect("test run");
        let xdp = fp.time_live(f, ifi, repeat).expect("test run");
        let mut buf = Vec::with_capacity(f.len());
        let started = Instant::now();
        for _ in 0..repeat {
            buf.clear();
            buf.extend_from_slice(f);
            let v = lb.handle(&mut buf, ingress, Timestamp::ZERO);
            assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        }
        let core = started.elapsed().as_nanos() as f64 / f64::from(repeat);
        println!(
            "{name:<10} {xdp:>12} {pass:>15} {:>10.2} {core:>24.1}",
            f64::from(xdp) / f64::from(pass.max(1))
        );
    }
    println!("\nreading every tunnel's counters   mapped array   a syscall each   syscalls/mapped");
    counters(&mut fp, &lb);
    for i in TUNNELS..MANY {
        open(&mut lb, i);
    }
    fp.sync(&lb.fast_path()).expect("maps");
    counters(&mut fp, &lb);
}

/// One reading of every tunnel's counters both ways: the median of 11.
fn counters(fp: &mut FastPath, lb: &Balancer) {
    let ids: Vec<u32> = lb.table().iter().map(|(id, _)| id).collect();
    let median = |mut f: Box<dyn FnMut() + '_>| {
        let mut runs: Vec<f64> = (0..11)
            .map(|_| {
                let started = Instant::now();
                f();
                started.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        runs.sort_by(f64::total_cmp);
        runs[runs.len() / 2]
    };
    let mapped = median(Box::new(|| {
        fp.take_counts();
    }));
    let syscalls = median(Box::new(|| {
        for &id in &ids {
            fp.tunnel_counts(id).expect("counters");
        }
    }));
    println!(
        "{:>7} tunnels {:>20.0} µs {:>14.0} µs {:>17.1}",
        ids.len(),
        mapped,
        syscalls,
        syscalls / mapped
    );
}
