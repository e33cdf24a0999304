use std::net::IpAddr;

use crate::{hash, Load, Params};

/// What kind of traffic opened a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opener {
    /// IKE on UDP 500.
    Ike,
    /// IKE or ESP-in-UDP on UDP 4500.
    NatT,
    /// Raw ESP (IP protocol 50).
    Esp,
}

/// The identity of one new tunnel, as the contract's `tunnel-key`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TunnelKey {
    /// The initiator's outer address.
    pub peer: IpAddr,
    /// The initiator's UDP source port; 0 for raw ESP.
    pub peer_port: u16,
    /// The VIP the initiator sent to.
    pub vip: IpAddr,
    /// The IKE initiator SPI, when the opening packet was IKE.
    pub ike_spi: Option<u64>,
    pub opened_by: Opener,
}

impl TunnelKey {
    /// A tunnel that opened with IKE on UDP 500 from `peer` to `vip`.
    pub fn ike(peer: IpAddr, vip: IpAddr, ike_spi: Option<u64>) -> TunnelKey {
        TunnelKey {
            peer,
            peer_port: 500,
            vip,
            ike_spi,
            opened_by: Opener::Ike,
        }
    }

    /// A stable 64-bit hash of where the tunnel comes from: outer address and
    /// UDP port. Deliberately not the SPI, which is new on every
    /// re-establishment: hashing the endpoint sends a tunnel that comes back
    /// after a failure to the same gateway, and makes placement predictable
    /// from the lab's addressing alone.
    pub fn endpoint_hash(&self) -> u64 {
        let (family, hi, lo) = match self.peer {
            IpAddr::V4(a) => (4u64, 0u64, u64::from(u32::from(a))),
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                (6, (bits >> 64) as u64, bits as u64)
            }
        };
        hash::words(&[family, hi, lo, u64::from(self.peer_port)])
    }
}

/// One gateway, as the contract's `gateway`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    pub id: u32,
    pub name: String,
    pub weight: u32,
    pub healthy: bool,
    pub draining: bool,
    /// Live tunnels when the set was pushed (see [`Load`](crate::Load) for now).
    pub tunnels: u64,
    /// The most tunnels it may hold; 0 for no limit.
    pub capacity: u64,
    /// The traffic it can carry, bytes/s both directions together; 0 when
    /// not given. (Contract 0.3.0; what utilization is measured against.)
    pub throughput: u64,
}

impl Gateway {
    /// A gateway that takes new tunnels: healthy, not draining, holding
    /// none, no tunnel or throughput capacity given (set those fields
    /// after, or with `..Gateway::new(…)`): a set for a policy's tests.
    pub fn new(id: u32, name: impl Into<String>, weight: u32) -> Gateway {
        Gateway {
            id,
            name: name.into(),
            weight,
            healthy: true,
            draining: false,
            tunnels: 0,
            capacity: 0,
            throughput: 0,
        }
    }

    /// May this gateway take a new tunnel? Healthy, not draining, weight > 0.
    /// (Whether it has room is a question for the live [`Load`](crate::Load):
    /// [`Gateway::has_room`].)
    pub fn takes_new_tunnels(&self) -> bool {
        self.healthy && !self.draining && self.weight > 0
    }

    /// Is there room for one more tunnel when it holds `tunnels`?
    pub fn has_room(&self, tunnels: u64) -> bool {
        self.capacity == 0 || tunnels < self.capacity
    }
}

/// A balancing policy. See the crate docs for the call order.
pub trait Balance: Sized {
    /// Build the policy from its parameters. Reject unknown keys and bad
    /// values with a message that names them ([`Params::finish`] helps).
    fn configure(params: Params) -> Result<Self, String>;

    /// The whole gateway set changed; rebuild whatever depends on it.
    fn set_gateways(&mut self, gateways: &[Gateway]);

    /// The gateway id for a new tunnel, or `None` for "no answer". `load`
    /// is the live view; a load-blind policy ignores it.
    fn choose(&mut self, key: &TunnelKey, load: &dyn Load) -> Option<u32>;
}
