//! In-memory ports: what a port sends lands on a channel the test reads.

use crossbeam_channel::Sender;

use super::Tx;
use crate::balancer::PortId;

/// Sends `(port, frame)` into a channel shared by every memory port.
pub struct MemoryTx {
    port: PortId,
    out: Sender<(PortId, Vec<u8>)>,
}

impl MemoryTx {
    pub fn new(port: PortId, out: Sender<(PortId, Vec<u8>)>) -> Self {
        MemoryTx { port, out }
    }
}

impl Tx for MemoryTx {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.out
            .send((self.port, frame.to_vec()))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reader gone"))
    }
}
