//! The wasm side of the contract: bindings and the conversions between them
//! and the SDK's plain types. Only compiled for wasm32; used by
//! [`export_policy!`](crate::export_policy).

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{Balance, Gateway, GatewayLoad, Load, Opener, Params, TunnelKey};

pub mod bindings {
    wit_bindgen::generate!({
        world: "policy",
        path: "../../wit",
        pub_export_macro: true,
        default_bindings_module: "segwlb_policy_sdk::guest::bindings",
    });
}

pub use bindings::exports::segwlb::policy::balancer as wit;
use bindings::segwlb::policy::load as wit_load;
use bindings::segwlb::policy::log as wit_log;
use bindings::segwlb::policy::types as wit_types;

pub(crate) fn log(level: crate::log::Level, message: &str) {
    let level = match level {
        crate::log::Level::Error => wit_log::Level::Error,
        crate::log::Level::Warn => wit_log::Level::Warn,
        crate::log::Level::Info => wit_log::Level::Info,
        crate::log::Level::Debug => wit_log::Level::Debug,
    };
    wit_log::log(level, message);
}

fn ip(a: wit_types::IpAddress) -> IpAddr {
    match a {
        wit_types::IpAddress::V4(v) => IpAddr::V4(Ipv4Addr::from(v)),
        wit_types::IpAddress::V6((hi, lo)) => {
            IpAddr::V6(Ipv6Addr::from((u128::from(hi) << 64) | u128::from(lo)))
        }
    }
}

/// The one policy instance of this component, created by `configure`.
pub struct Slot<P>(RefCell<Option<P>>);

impl<P: Balance> Slot<P> {
    pub const fn new() -> Self {
        Slot(RefCell::new(None))
    }

    pub fn configure(&self, params: Vec<(String, String)>) -> Result<(), String> {
        let policy = P::configure(Params::new(params))?;
        *self.0.borrow_mut() = Some(policy);
        Ok(())
    }

    pub fn set_gateways(&self, gateways: Vec<wit::Gateway>) {
        let gateways: Vec<Gateway> = gateways
            .into_iter()
            .map(|g| Gateway {
                id: g.id,
                name: g.name,
                weight: g.weight,
                healthy: g.healthy,
                draining: g.draining,
                tunnels: g.tunnels,
                capacity: g.capacity,
                throughput: g.throughput,
            })
            .collect();
        if let Some(p) = self.0.borrow_mut().as_mut() {
            p.set_gateways(&gateways);
        }
    }

    pub fn choose(&self, key: wit::TunnelKey) -> Option<u32> {
        let key = TunnelKey {
            peer: ip(key.peer),
            peer_port: key.peer_port,
            vip: ip(key.vip),
            ike_spi: key.ike_spi,
            opened_by: match key.opened_by {
                wit_types::Opener::Ike => Opener::Ike,
                wit_types::Opener::NatT => Opener::NatT,
                wit_types::Opener::Esp => Opener::Esp,
            },
        };
        self.0.borrow_mut().as_mut()?.choose(&key, &HostLoad)
    }
}

/// The host's live load, one import call per read.
struct HostLoad;

impl Load for HostLoad {
    fn tunnels(&self, id: u32) -> u64 {
        wit_load::tunnels(id)
    }

    fn tunnels_of(&self, ids: &[u32], out: &mut Vec<u64>) {
        *out = wit_load::tunnels_of(ids);
    }

    fn gateway(&self, id: u32) -> GatewayLoad {
        gateway_load(wit_load::gateway(id))
    }

    fn gateways_of(&self, ids: &[u32], out: &mut Vec<GatewayLoad>) {
        out.clear();
        out.extend(wit_load::gateways_of(ids).into_iter().map(gateway_load));
    }

    fn utilization_of(&self, ids: &[u32], tunnels: &mut Vec<u64>, utilization: &mut Vec<f64>) {
        let view = wit_load::utilization_of(ids);
        *tunnels = view.tunnels;
        *utilization = view.utilization;
    }
}

fn gateway_load(g: wit_types::GatewayLoad) -> GatewayLoad {
    GatewayLoad {
        tunnels: g.tunnels,
        bytes_to: g.bytes_to,
        bytes_from: g.bytes_from,
        packets_to: g.packets_to,
        packets_from: g.packets_from,
        measured: g.measured,
        reported: g.reported,
        utilization: g.utilization,
    }
}
