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

/// The uplink and ports 1..=`gateways`, named `if0`, `if1`, …, all sending
/// into `out`: what `Worker::new` takes, with no interfaces.
pub fn ports(
    gateways: PortId,
    out: &Sender<(PortId, Vec<u8>)>,
) -> Vec<(PortId, String, Box<dyn Tx>)> {
    (0..=gateways)
        .map(|p| {
            let tx: Box<dyn Tx> = Box::new(MemoryTx::new(p, out.clone()));
            (p, format!("if{p}"), tx)
        })
        .collect()
}

impl Tx for MemoryTx {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.out
            .send((self.port, frame.to_vec()))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reader gone"))
    }
}
