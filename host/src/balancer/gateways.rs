//! The segws: where each is, what it may take, what it carries.

use crate::packet::Mac;
use crate::policy::Gateway;

/// A port of the balancer: 0 is the uplink (initiator side), then one per
/// segw, as the I/O layer numbers them.
pub type PortId = u16;

pub const UPLINK: PortId = 0;

/// Stable id of a gateway for its whole life (what policies answer).
pub type GwId = u32;

/// What the operator says about a segw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewaySpec {
    pub name: String,
    /// The balancer port the segw sits behind.
    pub port: PortId,
    /// The segw's MAC when configured; otherwise learned from its frames.
    pub mac: Option<Mac>,
    pub weight: u32,
    /// The most tunnels it may hold (its licence or memory limit); 0 for
    /// no limit. No new tunnel is placed on it when full.
    pub capacity: u64,
    /// The traffic it can carry, bytes/s both directions together (what it
    /// can encrypt and decrypt); 0 for not given. What utilization is
    /// measured against; it never refuses a tunnel.
    pub throughput: u64,
    /// SPI-range steering, for segws configured to cooperate.
    pub steering: SpiSteering,
}

/// How a cooperating segw marks the SPIs it allocates, so that its traffic
/// can be recognised with no table state (after a balancer restart, a NAT
/// rebinding, an address change).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpiSteering {
    /// strongSwan's `charon.spi_mask` / `charon.spi_label`: the segw's own
    /// IKE SPIs (the responder SPI, for tunnels it answers) have
    /// `spi & mask == label`.
    pub ike_label: Option<IkeSpiLabel>,
    /// strongSwan's `charon.spi_min` / `charon.spi_max`: the inbound ESP
    /// SPIs it allocates, inclusive.
    pub esp_range: Option<(u32, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IkeSpiLabel {
    pub mask: u64,
    pub label: u64,
}

impl SpiSteering {
    pub fn owns_ike_spi(&self, responder_spi: u64) -> bool {
        self.ike_label
            .is_some_and(|l| responder_spi & l.mask == l.label)
    }

    pub fn owns_esp_spi(&self, spi: u32) -> bool {
        self.esp_range
            .is_some_and(|(min, max)| (min..=max).contains(&spi))
    }
}

/// Per-gateway counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatewayCounters {
    /// Live tunnels bound to it.
    pub tunnels: u64,
    /// Frames and bytes towards the segw (from initiators).
    pub frames_to: u64,
    pub bytes_to: u64,
    /// Frames and bytes from the segw (to initiators).
    pub frames_from: u64,
    pub bytes_from: u64,
    /// Tunnels moved here from a down gateway or a rebalance.
    pub moved_in: u64,
}

#[derive(Debug, Clone)]
pub struct GatewayState {
    pub id: GwId,
    pub spec: GatewaySpec,
    /// Configured or learned.
    pub mac: Option<Mac>,
    pub healthy: bool,
    pub draining: bool,
    pub counters: GatewayCounters,
    pub probe: super::health::ProbeState,
    /// Its traffic as rates (see [`super::rates`]).
    pub meter: super::rates::Meter,
    /// Utilization reported from outside.
    pub reported: super::rates::Reported,
}

impl GatewayState {
    pub fn takes_new_tunnels(&self) -> bool {
        self.healthy && !self.draining && self.spec.weight > 0
    }

    /// The gateway as a policy sees it.
    pub fn view(&self) -> Gateway {
        Gateway {
            id: self.id,
            name: self.spec.name.clone(),
            weight: self.spec.weight,
            healthy: self.healthy,
            draining: self.draining,
            tunnels: self.counters.tunnels,
            capacity: self.spec.capacity,
            throughput: self.spec.throughput,
        }
    }
}

/// Errors from changing the gateway set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("no gateway named `{0}`")]
    Unknown(String),
    #[error("a gateway named `{0}` already exists")]
    Duplicate(String),
    #[error("port {0} is the uplink; a gateway needs a port of its own")]
    UplinkPort(PortId),
    #[error("port {port} already serves gateway `{by}`")]
    PortTaken { port: PortId, by: String },
}

/// The gateway set, in the order gateways were added.
#[derive(Debug, Default)]
pub struct Gateways {
    list: Vec<GatewayState>,
    next_id: GwId,
    /// Position in `list` by id (ids count up from 1 and are never
    /// reused): the data path finds a gateway without scanning the set.
    position: Vec<Option<u32>>,
}

impl Gateways {
    pub fn add(&mut self, spec: GatewaySpec) -> Result<GwId, GatewayError> {
        if spec.port == UPLINK {
            return Err(GatewayError::UplinkPort(spec.port));
        }
        if self.by_name(&spec.name).is_some() {
            return Err(GatewayError::Duplicate(spec.name));
        }
        if let Some(other) = self.list.iter().find(|g| g.spec.port == spec.port) {
            return Err(GatewayError::PortTaken {
                port: spec.port,
                by: other.spec.name.clone(),
            });
        }
        self.next_id += 1;
        let id = self.next_id;
        self.position.resize(id as usize + 1, None);
        self.position[id as usize] = Some(self.list.len() as u32);
        self.list.push(GatewayState {
            id,
            mac: spec.mac,
            spec,
            healthy: true,
            draining: false,
            counters: GatewayCounters::default(),
            probe: Default::default(),
            meter: Default::default(),
            reported: Default::default(),
        });
        Ok(id)
    }

    pub fn remove(&mut self, name: &str) -> Result<GatewayState, GatewayError> {
        let i = self
            .list
            .iter()
            .position(|g| g.spec.name == name)
            .ok_or_else(|| GatewayError::Unknown(name.into()))?;
        let gone = self.list.remove(i);
        self.position[gone.id as usize] = None;
        for (at, g) in self.list.iter().enumerate().skip(i) {
            self.position[g.id as usize] = Some(at as u32);
        }
        Ok(gone)
    }

    #[inline]
    fn index_of(&self, id: GwId) -> Option<usize> {
        Some(self.position.get(id as usize).copied().flatten()? as usize)
    }

    #[inline]
    pub fn get(&self, id: GwId) -> Option<&GatewayState> {
        self.list.get(self.index_of(id)?)
    }

    #[inline]
    pub fn get_mut(&mut self, id: GwId) -> Option<&mut GatewayState> {
        let i = self.index_of(id)?;
        self.list.get_mut(i)
    }

    pub fn by_name(&self, name: &str) -> Option<&GatewayState> {
        self.list.iter().find(|g| g.spec.name == name)
    }

    pub fn by_name_mut(&mut self, name: &str) -> Result<&mut GatewayState, GatewayError> {
        self.list
            .iter_mut()
            .find(|g| g.spec.name == name)
            .ok_or_else(|| GatewayError::Unknown(name.into()))
    }

    pub fn on_port(&self, port: PortId) -> Option<&GatewayState> {
        self.list.iter().find(|g| g.spec.port == port)
    }

    pub fn on_port_mut(&mut self, port: PortId) -> Option<&mut GatewayState> {
        self.list.iter_mut().find(|g| g.spec.port == port)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut GatewayState> {
        self.list.iter_mut()
    }

    pub fn iter(&self) -> impl Iterator<Item = &GatewayState> {
        self.list.iter()
    }

    /// The set as policies see it.
    pub fn views(&self) -> Vec<Gateway> {
        self.list.iter().map(GatewayState::view).collect()
    }
}
