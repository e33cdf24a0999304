//! Any bytes through `packet::parse` and `Balancer::handle`: the first byte
//! picks the ingress port, the rest is the frame. A panic is a bug; so is a
//! forwarded frame that differs from its input past the MACs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use segwlb::balancer::affinity::Timeouts;
use segwlb::balancer::{Balancer, Config, GatewaySpec, PortId, Verdict};
use segwlb::policy::native;
use segwlb::time::Timestamp;

fuzz_target!(|data: &[u8]| {
    let Some((&port, frame)) = data.split_first() else { return };
    let _ = segwlb::packet::parse(frame);
    let config = Config {
        port_macs: (0..4).map(|p| [2, 0x1b, 0, 0, 0, p]).collect(),
        proxy: vec!["10.2.2.0/24".parse().unwrap(), "2001:db8:2::/48".parse().unwrap()],
        max_tunnels: 64,
        timeouts: Timeouts::default(),
    };
    let mut lb: Balancer = Balancer::new(config, native::shipped("round-robin", &[]).unwrap());
    for n in 1..=3u8 {
        let spec = GatewaySpec { name: format!("segw{n}"), port: PortId::from(n), mac: Some([2, 0x5e, 0, 0, 0, n]), weight: 1, ..Default::default() };
        lb.add_gateway(spec, Timestamp::ZERO).unwrap();
    }
    let mut f = frame.to_vec();
    if let Verdict::Forward(_) = lb.handle(&mut f, PortId::from(port % 4), Timestamp::ZERO) {
        assert_eq!(&f[12..], &frame[12..]);
    }
});
