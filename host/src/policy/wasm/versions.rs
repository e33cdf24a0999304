//! The contract versions this host runs, each through its own bindings, and
//! one way to call any of them. A component is served by the version it
//! exports; the rule for adding one is in `wit/README.md`.
//!
//! - 0.1.0 (`wit/v0.1.0/policy.wit`): frozen. Its gateways carry no
//!   capacity and it cannot read the load; the host's guard answers for it.
//! - 0.2.0 (`wit/v0.2.0/policy.wit`): frozen. `load.tunnels(id)` and
//!   `gateway.capacity`.
//! - 0.3.0 (`wit/policy.wit`): traffic. `gateway.throughput` and
//!   `load.gateway(id)` / `load.gateways-of(ids)`: rates each way and
//!   utilization, measured and reported.

use wasmtime::component::{HasSelf, InstancePre, Linker};
use wasmtime::Store;

use super::host::HostState;
use crate::policy::{Gateway, Opener, TunnelKey};

mod v0_1 {
    wasmtime::component::bindgen!({ world: "policy", path: "../wit/v0.1.0/policy.wit" });
}

mod v0_2 {
    wasmtime::component::bindgen!({ world: "policy", path: "../wit/v0.2.0/policy.wit" });
}

mod v0_3 {
    wasmtime::component::bindgen!({ world: "policy", path: "../wit/policy.wit" });
}

/// A contract version, as a component's `balancer` export names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V0_1,
    V0_2,
    V0_3,
}

impl Version {
    pub const ALL: [Version; 3] = [Version::V0_1, Version::V0_2, Version::V0_3];

    /// `segwlb:policy@X.Y.Z`.
    pub fn package(self) -> &'static str {
        match self {
            Version::V0_1 => "segwlb:policy@0.1.0",
            Version::V0_2 => "segwlb:policy@0.2.0",
            Version::V0_3 => "segwlb:policy@0.3.0",
        }
    }

    /// The interface a policy of this version exports.
    pub fn export(self) -> &'static str {
        match self {
            Version::V0_1 => "segwlb:policy/balancer@0.1.0",
            Version::V0_2 => "segwlb:policy/balancer@0.2.0",
            Version::V0_3 => "segwlb:policy/balancer@0.3.0",
        }
    }

    /// Our interfaces a policy of this version may import.
    pub fn ours(self) -> &'static [&'static str] {
        match self {
            Version::V0_1 => &["segwlb:policy/log@0.1.0", "segwlb:policy/types@0.1.0"],
            Version::V0_2 => &[
                "segwlb:policy/log@0.2.0",
                "segwlb:policy/types@0.2.0",
                LOAD[0],
            ],
            Version::V0_3 => &[
                "segwlb:policy/log@0.3.0",
                "segwlb:policy/types@0.3.0",
                LOAD[1],
            ],
        }
    }
}

/// The live-load interface of each version that has one: a component that
/// imports it has the load copied into its store before each `choose`.
pub const LOAD: [&str; 2] = ["segwlb:policy/load@0.2.0", "segwlb:policy/load@0.3.0"];

/// Link every version's host imports (`log`, and 0.2.0's `load`).
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    v0_1::Policy::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?;
    v0_2::Policy::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?;
    v0_3::Policy::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?;
    Ok(())
}

/// A component ready to instantiate, by version.
#[derive(Clone)]
pub enum Pre {
    V0_1(v0_1::PolicyPre<HostState>),
    V0_2(v0_2::PolicyPre<HostState>),
    V0_3(v0_3::PolicyPre<HostState>),
}

/// One instance's exports, by version.
pub enum Bindings {
    V0_1(v0_1::Policy),
    V0_2(v0_2::Policy),
    V0_3(v0_3::Policy),
}

impl Pre {
    pub fn new(version: Version, pre: InstancePre<HostState>) -> wasmtime::Result<Self> {
        Ok(match version {
            Version::V0_1 => Pre::V0_1(v0_1::PolicyPre::new(pre)?),
            Version::V0_2 => Pre::V0_2(v0_2::PolicyPre::new(pre)?),
            Version::V0_3 => Pre::V0_3(v0_3::PolicyPre::new(pre)?),
        })
    }

    pub fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Bindings> {
        Ok(match self {
            Pre::V0_1(pre) => Bindings::V0_1(pre.instantiate(store)?),
            Pre::V0_2(pre) => Bindings::V0_2(pre.instantiate(store)?),
            Pre::V0_3(pre) => Bindings::V0_3(pre.instantiate(store)?),
        })
    }
}

impl Bindings {
    pub fn configure(
        &self,
        store: &mut Store<HostState>,
        params: &[(String, String)],
    ) -> wasmtime::Result<Result<(), String>> {
        match self {
            Bindings::V0_1(b) => b.segwlb_policy_balancer().call_configure(store, params),
            Bindings::V0_2(b) => b.segwlb_policy_balancer().call_configure(store, params),
            Bindings::V0_3(b) => b.segwlb_policy_balancer().call_configure(store, params),
        }
    }

    pub fn set_gateways(
        &self,
        store: &mut Store<HostState>,
        gateways: &[Gateway],
    ) -> wasmtime::Result<()> {
        match self {
            Bindings::V0_1(b) => {
                let set: Vec<_> = gateways.iter().map(v0_1_gateway).collect();
                b.segwlb_policy_balancer().call_set_gateways(store, &set)
            }
            Bindings::V0_2(b) => {
                let set: Vec<_> = gateways.iter().map(v0_2_gateway).collect();
                b.segwlb_policy_balancer().call_set_gateways(store, &set)
            }
            Bindings::V0_3(b) => {
                let set: Vec<_> = gateways.iter().map(v0_3_gateway).collect();
                b.segwlb_policy_balancer().call_set_gateways(store, &set)
            }
        }
    }

    pub fn choose(
        &self,
        store: &mut Store<HostState>,
        key: &TunnelKey,
    ) -> wasmtime::Result<Option<u32>> {
        match self {
            Bindings::V0_1(b) => b.segwlb_policy_balancer().call_choose(store, v0_1_key(key)),
            Bindings::V0_2(b) => b.segwlb_policy_balancer().call_choose(store, v0_2_key(key)),
            Bindings::V0_3(b) => b.segwlb_policy_balancer().call_choose(store, v0_3_key(key)),
        }
    }
}

/// The types of every version are spelled the same (0.2.0 and 0.3.0 added
/// fields to `gateway`, and interfaces), so one macro writes each
/// conversion once per version.
macro_rules! conversions {
    ($wit:ident, $key:ident, $gateway:ident $(, $extra:ident)*) => {
        fn $key(key: &TunnelKey) -> $wit::TunnelKey {
            let ip = |ip: std::net::IpAddr| match ip {
                std::net::IpAddr::V4(a) => $wit::IpAddress::V4(a.into()),
                std::net::IpAddr::V6(a) => {
                    let bits = u128::from(a);
                    $wit::IpAddress::V6(((bits >> 64) as u64, bits as u64))
                }
            };
            $wit::TunnelKey {
                peer: ip(key.peer),
                peer_port: key.peer_port,
                vip: ip(key.vip),
                ike_spi: key.ike_spi,
                opened_by: match key.opened_by {
                    Opener::Ike => $wit::Opener::Ike,
                    Opener::NatT => $wit::Opener::NatT,
                    Opener::Esp => $wit::Opener::Esp,
                },
            }
        }

        fn $gateway(g: &Gateway) -> $wit::Gateway {
            $wit::Gateway {
                id: g.id,
                name: g.name.clone(),
                weight: g.weight,
                healthy: g.healthy,
                draining: g.draining,
                tunnels: g.tunnels,
                $($extra: g.$extra,)*
            }
        }
    };
}

use v0_1::segwlb::policy::types as types_v0_1;
use v0_2::segwlb::policy::types as types_v0_2;
use v0_3::segwlb::policy::types as types_v0_3;
conversions!(types_v0_1, v0_1_key, v0_1_gateway);
conversions!(types_v0_2, v0_2_key, v0_2_gateway, capacity);
conversions!(types_v0_3, v0_3_key, v0_3_gateway, capacity, throughput);

/// The imports each version's guests call, answered by the same host state.
mod imports {
    use super::{v0_1, v0_2, v0_3, HostState};

    /// Every version's `log` is the same function on its own `level` enum.
    macro_rules! log_import {
        ($version:ident) => {
            impl $version::segwlb::policy::log::Host for HostState {
                fn log(&mut self, level: $version::segwlb::policy::log::Level, message: String) {
                    use $version::segwlb::policy::log::Level as L;
                    let level = match level {
                        L::Error => tracing::Level::ERROR,
                        L::Warn => tracing::Level::WARN,
                        L::Info => tracing::Level::INFO,
                        L::Debug => tracing::Level::DEBUG,
                    };
                    self.guest_log(level, &message);
                }
            }
        };
    }
    log_import!(v0_1);
    log_import!(v0_2);
    log_import!(v0_3);

    impl v0_2::segwlb::policy::load::Host for HostState {
        fn tunnels(&mut self, id: u32) -> u64 {
            self.load.tunnels(id)
        }

        fn tunnels_of(&mut self, ids: Vec<u32>) -> Vec<u64> {
            ids.iter().map(|&id| self.load.tunnels(id)).collect()
        }
    }

    impl v0_3::segwlb::policy::load::Host for HostState {
        fn tunnels(&mut self, id: u32) -> u64 {
            self.load.tunnels(id)
        }

        fn tunnels_of(&mut self, ids: Vec<u32>) -> Vec<u64> {
            ids.iter().map(|&id| self.load.tunnels(id)).collect()
        }

        fn gateway(&mut self, id: u32) -> v0_3::segwlb::policy::types::GatewayLoad {
            gateway_load(self.load.gateway(id))
        }

        fn gateways_of(&mut self, ids: Vec<u32>) -> Vec<v0_3::segwlb::policy::types::GatewayLoad> {
            ids.iter()
                .map(|&id| gateway_load(self.load.gateway(id)))
                .collect()
        }

        fn utilization_of(
            &mut self,
            ids: Vec<u32>,
        ) -> v0_3::segwlb::policy::types::UtilizationView {
            v0_3::segwlb::policy::types::UtilizationView {
                tunnels: ids.iter().map(|&id| self.load.tunnels(id)).collect(),
                utilization: ids.iter().map(|&id| self.load.utilization(id)).collect(),
            }
        }
    }

    fn gateway_load(
        g: crate::policy::load::GatewayLoad,
    ) -> v0_3::segwlb::policy::types::GatewayLoad {
        v0_3::segwlb::policy::types::GatewayLoad {
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

    impl v0_1::segwlb::policy::types::Host for HostState {}
    impl v0_2::segwlb::policy::types::Host for HostState {}
    impl v0_3::segwlb::policy::types::Host for HostState {}
}
