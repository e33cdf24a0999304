//! A balancer in front of N segws on numbered ports with made-up MACs: what
//! drives the core without real interfaces (simulation, benchmarks,
//! property tests, fuzzing). segw n sits on port n; port 0 is the uplink.

use super::affinity::Timeouts;
use super::{Balancer, Config, GatewaySpec, PortId, Prefix};
use crate::packet::Mac;
use crate::policy::Policy;
use crate::time::Timestamp;

/// The balancer's own MAC on `port`.
pub const fn port_mac(port: PortId) -> Mac {
    [2, 0x1b, 0, 0, (port >> 8) as u8, port as u8]
}

/// segw `n`'s MAC.
pub const fn segw_mac(n: u8) -> Mac {
    [2, 0x5e, 0, 0, 0, n]
}

/// A balancer with `segws` gateways named segw1…segwN, weight 1, static MACs.
pub fn balancer<P: Policy>(
    policy: P,
    segws: u8,
    proxy: Vec<Prefix>,
    max_tunnels: usize,
) -> Balancer<P> {
    let config = Config {
        port_macs: (0..=PortId::from(segws)).map(port_mac).collect(),
        proxy_gateways: proxy.clone(),
        proxy,
        max_tunnels,
        timeouts: Timeouts::default(),
    };
    let mut lb = Balancer::new(config, policy);
    for n in 1..=segws {
        let spec = GatewaySpec {
            name: format!("segw{n}"),
            port: PortId::from(n),
            mac: Some(segw_mac(n)),
            weight: 1,
            ..Default::default()
        };
        lb.add_gateway(spec, Timestamp::ZERO)
            .expect("distinct names and ports");
    }
    lb
}
