//! Ports: where frames come from and go to. The balancer core never sees
//! these; the data path (`crate::dataplane`) moves frames between them and
//! the core.
//!
//! - [`afpacket`]: a real interface, through an AF_PACKET socket (pnet).
//! - [`memory`]: in-memory ports, for tests and the simulation.

pub mod afpacket;
pub mod memory;

use crate::balancer::PortId;

/// One frame received on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub port: PortId,
    pub frame: Vec<u8>,
}

/// The sending half of a port. The worker owns one per port.
pub trait Tx: Send {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;
}
