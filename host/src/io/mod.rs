//! Ports: where frames come from and go to. The balancer core never sees
//! these; the data path (`crate::dataplane`) moves frames between them and
//! the core.
//!
//! - [`afpacket`]: a real interface, through an AF_PACKET socket (pnet).
//! - [`memory`]: in-memory ports, for tests and the simulation.
//! - [`xdp`]: the kernel fast path in front of a port (XDP).

pub mod afpacket;
pub mod memory;
pub mod xdp;

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

    /// Send `frames` in order: how many left, and the first error (a frame
    /// that failed is skipped, the rest still go). Ports that can batch
    /// (AF_PACKET: one `sendmmsg`) override this.
    fn send_batch(&mut self, frames: &[&[u8]]) -> (usize, Option<std::io::Error>) {
        let mut sent = 0;
        let mut first_error = None;
        for frame in frames {
            match self.send(frame) {
                Ok(()) => sent += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        (sent, first_error)
    }
}
