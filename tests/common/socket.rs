//! An AF_PACKET socket on an interface inside a test's namespace: frames
//! in and out of a host the test plays (an initiator side, a segw).

use std::time::{Duration, Instant};

use segwlb::io::afpacket::{self, AfPacketTx, Reader};
use segwlb::io::Tx;
use segwlb::lab::netns::Netns;
use segwlb::packet::Mac;

pub struct Socket {
    pub tx: AfPacketTx,
    pub rx: Reader,
    pub mac: Mac,
}

impl Socket {
    pub fn open(ns: &Netns, ifname: &str) -> Socket {
        let o = ns
            .enter(|| afpacket::open(ifname))
            .unwrap()
            .unwrap_or_else(|e| panic!("{}: {e}", ns.name()));
        Socket {
            tx: o.tx,
            rx: o.rx,
            mac: o.mac,
        }
    }

    pub fn send(&mut self, f: &[u8]) {
        self.tx.send(f).unwrap();
    }

    /// Every frame `keep` takes until none came for `quiet` (probes and
    /// the rest go on all the time, and are not waited for).
    pub fn drain(&mut self, quiet: Duration, keep: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut last = Instant::now();
        while last.elapsed() < quiet {
            if let Ok(f) = self.rx.recv() {
                if keep(f) {
                    got.push(f.to_vec());
                    last = Instant::now();
                }
            }
        }
        got
    }

    /// Frames of EtherType `ethertype` until `wait` runs out.
    pub fn frames_of(&mut self, ethertype: [u8; 2], wait: Duration) -> Vec<Vec<u8>> {
        let until = Instant::now() + wait;
        let mut got = Vec::new();
        while Instant::now() < until {
            if let Ok(f) = self.rx.recv() {
                if f.len() >= 14 && f[12..14] == ethertype {
                    got.push(f.to_vec());
                }
            }
        }
        got
    }
}
