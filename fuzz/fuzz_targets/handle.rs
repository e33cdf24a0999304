//! Any bytes through `packet::parse` and `Balancer::handle`: the first byte
//! picks the ingress port, the rest is the frame. A panic is a bug; so is a
//! forwarded frame that differs from its input past the MACs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use segwlb::balancer::{farm, PortId, Verdict};
use segwlb::policy::native;
use segwlb::time::Timestamp;

fuzz_target!(|data: &[u8]| {
    let Some((&port, frame)) = data.split_first() else {
        return;
    };
    let _ = segwlb::packet::parse(frame);
    let proxy = vec![
        "10.2.2.0/24".parse().unwrap(),
        "2001:db8:2::/48".parse().unwrap(),
    ];
    let mut lb = farm::balancer(native::shipped("round-robin", &[]).unwrap(), 3, proxy, 64);
    let mut f = frame.to_vec();
    match lb.handle(&mut f, PortId::from(port % 4), Timestamp::ZERO) {
        Verdict::Forward(_) | Verdict::ForwardWithHeld(..) => assert_eq!(&f[12..], &frame[12..]),
        Verdict::Held => assert!(f.is_empty(), "a held frame is taken"),
        Verdict::Reply | Verdict::Drop(_) => {}
    }
});
