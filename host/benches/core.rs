//! How fast the balancer core decides, on one core, with no I/O.
//!
//!     cargo bench -p segwlb --bench core
//!
//! Opens T tunnels (IKE_SA_INIT, IKE_AUTH on 4500, each answered),
//! then times `Balancer::handle` on 150-byte frames of established
//! tunnels: ESP in UDP, raw ESP, and IKE (the SPI lookup). Baseline in the same run:
//! `packet::parse` alone on the same frames, so the ratio shows what
//! steering and counting add on top of parsing. Also prints the table's
//! memory per tunnel: measured (a counting allocator, a million tunnels
//! opened through `handle`) beside the estimate from the types.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use segwlb::balancer::affinity::AffinityTable;
use segwlb::balancer::{farm, Balancer, PortId, Verdict, UPLINK};
use segwlb::packet::craft::{esp_body, frame, ike_body, ip_packet, udp_packet};
use segwlb::packet::ike::{IKE_AUTH, IKE_SA_INIT};
use segwlb::packet::{self, IkeHeader};
use segwlb::policy::native;
use segwlb::time::Timestamp;

const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1));

/// The system allocator, keeping count of the bytes live. The timed loops
/// allocate nothing, so the count costs them nothing.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            LIVE.fetch_add(new_size, Relaxed);
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn peer(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

/// An initiator's IKE header: the responder's SPI is known past
/// IKE_SA_INIT (only then may a message move a tunnel to port 4500).
fn ike(spi: u64, exchange: u8) -> IkeHeader {
    IkeHeader {
        initiator_spi: spi,
        responder_spi: if exchange == IKE_SA_INIT { 0 } else { 0x77 },
        exchange,
        from_initiator: true,
        response: false,
        message_id: 0,
    }
}

/// Open `tunnels` tunnels as peers do, one address each: IKE_SA_INIT and
/// IKE_AUTH on 4500, each answered by the segw (which establishes it).
fn open_tunnels(lb: &mut Balancer, tunnels: u32, now: Timestamp) {
    let mut f = Vec::with_capacity(256);
    for i in 0..tunnels {
        let spi = u64::from(i) + 1;
        let init = udp_packet(
            peer(i),
            500,
            VIP,
            500,
            &ike_body(&ike(spi, IKE_SA_INIT), false, 0),
        );
        f.clear();
        f.extend_from_slice(&up(&init));
        let Verdict::Forward(port) = lb.handle(&mut f, UPLINK, now) else {
            panic!("IKE_SA_INIT {i} not forwarded")
        };
        segw_answers(lb, &mut f, (port, i, spi), IKE_SA_INIT, now);
        let auth = udp_packet(
            peer(i),
            4500,
            VIP,
            4500,
            &ike_body(&ike(spi, IKE_AUTH), true, 0),
        );
        f.clear();
        f.extend_from_slice(&up(&auth));
        assert_eq!(lb.handle(&mut f, UPLINK, now), Verdict::Forward(port));
        segw_answers(lb, &mut f, (port, i, spi), IKE_AUTH, now);
    }
    assert_eq!(lb.table().half_open_len(), 0);
}

/// Segw `port`'s answer to tunnel `i`'s (IKE SA `spi`) `exchange`
/// (IKE_SA_INIT on 500, IKE_AUTH on 4500), through the balancer back to
/// the peer.
fn segw_answers(
    lb: &mut Balancer,
    f: &mut Vec<u8>,
    (port, i, spi): (PortId, u32, u64),
    exchange: u8,
    now: Timestamp,
) {
    let answer = IkeHeader {
        responder_spi: 0x77,
        from_initiator: false,
        response: true,
        ..ike(spi, exchange)
    };
    let (udp, nat_t) = if exchange == IKE_SA_INIT {
        (500, false)
    } else {
        (4500, true)
    };
    let back = udp_packet(VIP, udp, peer(i), udp, &ike_body(&answer, nat_t, 0));
    f.clear();
    f.extend_from_slice(&frame(
        farm::port_mac(port),
        farm::segw_mac(port as u8),
        None,
        &back,
    ));
    assert!(matches!(lb.handle(f, port, now), Verdict::Forward(UPLINK)));
}

fn up(ip: &[u8]) -> Vec<u8> {
    frame(farm::port_mac(UPLINK), [2, 0xaa, 0, 0, 0, 1], None, ip)
}

/// Frames per second through `f`, best of three passes of ~2M frames.
fn rate(frames: &mut [Vec<u8>], mut f: impl FnMut(&mut Vec<u8>)) -> f64 {
    let rounds = (2_000_000 / frames.len()).max(1);
    (0..3)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..rounds {
                for fr in frames.iter_mut() {
                    f(fr);
                }
            }
            (frames.len() * rounds) as f64 / started.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn main() {
    // 1,000 tunnels: the working set sits in cache, so this is the cost of
    // the code. 100,000: frames and table spill to memory, as in real life.
    // SEGWLB_BENCH_TUNNELS=1000 runs one size alone (and skips the memory
    // figure): for a profile of that size only.
    let sizes: Vec<u32> = match std::env::var("SEGWLB_BENCH_TUNNELS") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("SEGWLB_BENCH_TUNNELS: a list of tunnel counts")
            })
            .collect(),
        Err(_) => vec![1_000, 100_000],
    };
    for &tunnels in &sizes {
        run(tunnels);
        println!();
    }
    if std::env::var_os("SEGWLB_BENCH_TUNNELS").is_none() {
        memory(1_000_000);
    }
}

/// A new balancer, `tunnels` tunnels opened through `handle` (IKE_SA_INIT
/// from a new address each and IKE_AUTH on 4500, each answered): the heap
/// the balancer grew by for them, per tunnel. Tables grow by doubling, so
/// the figure depends on where `tunnels` falls between two sizes.
fn memory(tunnels: u32) {
    let mut lb = farm::balancer(
        native::shipped("consistent-hash", &[]).unwrap(),
        4,
        vec!["10.2.2.1".parse().unwrap()],
        1 << 20,
    );
    // Past the policy and the gateway set: what grows with the tunnels.
    let before = LIVE.load(Relaxed);
    open_tunnels(&mut lb, tunnels, Timestamp::from_secs(1));
    let held = LIVE.load(Relaxed) - before;
    assert_eq!(lb.table().len(), tunnels as usize);
    println!(
        "table: {tunnels} established tunnels, one address each: {} bytes per tunnel measured \
         (heap held by the balancer, counting allocator; {} MiB in all), {} from the types at best",
        held / tunnels as usize,
        held >> 20,
        AffinityTable::bytes_per_tunnel()
    );
    black_box(&lb);
}

fn run(tunnels: u32) {
    let mut lb = farm::balancer(
        native::shipped("consistent-hash", &[]).unwrap(),
        4,
        vec!["10.2.2.1".parse().unwrap()],
        1 << 20,
    );
    let now = Timestamp::from_secs(1);
    open_tunnels(&mut lb, tunnels, now);

    // 150-byte frames: 14 Ethernet + 20 IP + 8 UDP + 108 ESP.
    let mut esp_udp: Vec<Vec<u8>> = (0..tunnels)
        .map(|i| {
            up(&udp_packet(
                peer(i),
                4500,
                VIP,
                4500,
                &esp_body(i + 1, 1, 108),
            ))
        })
        .collect();
    let mut esp_raw: Vec<Vec<u8>> = (0..tunnels)
        .map(|i| up(&ip_packet(peer(i), VIP, 50, &esp_body(i + 1, 1, 116), 1)))
        .collect();
    let mut ike_4500: Vec<Vec<u8>> = (0..tunnels)
        .map(|i| {
            up(&udp_packet(
                peer(i),
                4500,
                VIP,
                4500,
                &ike_body(&ike(u64::from(i) + 1, IKE_AUTH), true, 76),
            ))
        })
        .collect();
    assert_eq!(esp_udp[0].len(), 150);

    let parse_only = rate(&mut esp_udp, |f| {
        black_box(packet::parse(black_box(f)).is_ok());
    });
    println!("segwlb core on one core: {tunnels} established tunnels, 4 segws, 150-byte frames, best of 3");
    println!("{:<34} {:>14} {:>10}", "path", "frames/s", "ns/frame");
    println!(
        "{:<34} {:>14.0} {:>10.1}",
        "baseline: packet::parse only",
        parse_only,
        1e9 / parse_only
    );
    for (name, frames) in [
        ("handle: ESP in UDP", &mut esp_udp),
        ("handle: raw ESP", &mut esp_raw),
        ("handle: IKE on 4500 (SPI lookup)", &mut ike_4500),
    ] {
        // `handle` rewrites the MACs in place: each pass sends the frame
        // to the uplink's MAC again, as the initiators' router does.
        let r = rate(frames, |f| {
            f[0..6].copy_from_slice(&farm::port_mac(UPLINK));
            black_box(lb.handle(f, UPLINK, now));
        });
        let mut once = frames[0].clone();
        once[0..6].copy_from_slice(&farm::port_mac(UPLINK));
        assert!(
            matches!(lb.handle(&mut once, UPLINK, now), Verdict::Forward(_)),
            "{name}: the timed frames are forwarded"
        );
        println!(
            "{name:<34} {r:>14.0} {:>10.1}   {:.2}x the parse-only time",
            1e9 / r,
            parse_only / r
        );
    }
    assert_eq!(
        lb.policy_stats().decisions,
        u64::from(tunnels),
        "established traffic never asks the policy"
    );
}
