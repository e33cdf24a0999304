//! The worker's side of the XDP fast path: the program on every port, its
//! maps kept equal to [`Balancer::fast_path`] and its counters folded back
//! into the core.
//!
//! The maps are rewritten (as a difference) at the end of every turn in
//! which [`Balancer::epoch`] moved: a tunnel that moved, a segw marked
//! down, a rebalance step, a next hop — all happen in the worker, and the
//! worker syncs before it takes the next frames, so a moved tunnel's
//! frames leave the fast path from the next one on (those already inside
//! the kernel go as frames in a batch do). The counters come back every
//! [`COUNT_EVERY`]: tunnels the fast path carries are not idle, and `ctl
//! status` counts their frames.

use std::time::Duration;

use crate::balancer::{Balancer, PortId};
use crate::io::xdp::{FastPath, XdpError};
use crate::packet::Mac;
use crate::policy::Policy;
use crate::time::Timestamp;

/// How often the fast path's counters are folded into the core.
pub const COUNT_EVERY: Duration = Duration::from_secs(1);

pub struct Fast {
    path: FastPath,
    /// The core's epoch the maps were written at.
    synced: Option<u64>,
    next_count: Timestamp,
}

impl Fast {
    pub fn new(path: FastPath) -> Self {
        Fast {
            path,
            synced: None,
            next_count: Timestamp::ZERO,
        }
    }

    /// Port `port` is `interface`, with our MAC `mac` there: the program
    /// runs on it from now on.
    pub fn add_port(&mut self, port: PortId, interface: &str, mac: Mac) -> Result<(), XdpError> {
        let name = std::ffi::CString::new(interface).map_err(|_| XdpError::Attach {
            interface: interface.to_string(),
            message: "not an interface name".into(),
        })?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(XdpError::Attach {
                interface: interface.to_string(),
                message: std::io::Error::last_os_error().to_string(),
            });
        }
        self.path.set_port(port, ifindex, mac)?;
        self.path.attach(interface)?;
        self.synced = None;
        Ok(())
    }

    /// After a turn: the maps again if the core's lookups changed, and
    /// the counters when due.
    pub fn turn<P: Policy>(
        &mut self,
        lb: &mut Balancer<P>,
        now: Timestamp,
    ) -> Result<(), XdpError> {
        let epoch = lb.epoch();
        if self.synced != Some(epoch) {
            self.path.sync(&lb.fast_path())?;
            self.synced = Some(epoch);
        }
        if now >= self.next_count {
            for (tunnel, c) in self.path.take_counts()? {
                lb.fast_path_forwarded(tunnel, c.frames, c.bytes, now);
            }
            self.next_count = now + COUNT_EVERY;
        }
        Ok(())
    }
}
