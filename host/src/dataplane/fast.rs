//! The worker's side of the XDP fast path: the program on every port, its
//! maps kept equal to [`Balancer::fast_path`] and its counters folded back
//! into the core.
//!
//! The maps are brought up to date at the end of every turn in which the
//! core's lookups changed ([`Balancer::fast_path_changes`]): the entries
//! at the endpoints of the tunnels that were added, moved, rebound,
//! confirmed or removed, or all of them when a segw's health or MAC or the
//! set changed (and then the segws' SPI ranges too). All of that happens
//! in the worker, and the
//! worker syncs before it takes the next frames, so a moved tunnel's
//! frames leave the fast path from the next one on (those already inside
//! the kernel go as frames in a batch do). The counters come back every
//! [`COUNT_EVERY`] (a quarter of the idle timeout if that is shorter: a
//! tunnel the fast path carries is never idle to the sweep), and before a
//! status or a save if the last fold is a second old (a fold reads every
//! slot: a storm of statuses must not make the worker do it each time).

use std::time::Duration;

use crate::balancer::fastpath::{FastChanges, FastPathMark};
use crate::balancer::{Balancer, PortId};
use crate::io::xdp::{FastPath, XdpError};
use crate::packet::Mac;
use crate::policy::Policy;
use crate::time::Timestamp;

/// How often the fast path's counters are folded into the core.
pub const COUNT_EVERY: Duration = Duration::from_secs(1);

pub struct Fast {
    path: FastPath,
    /// Where the maps were last brought up to date.
    mark: FastPathMark,
    next_count: Timestamp,
}

impl Fast {
    pub fn new(path: FastPath) -> Self {
        Fast {
            path,
            mark: FastPathMark::default(),
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
        self.mark = FastPathMark::default();
        Ok(())
    }

    /// After a turn: the maps again if the core's lookups changed, and
    /// the counters when due.
    pub fn turn<P: Policy>(
        &mut self,
        lb: &mut Balancer<P>,
        now: Timestamp,
    ) -> Result<(), XdpError> {
        match lb.fast_path_changes(&mut self.mark) {
            FastChanges::None => {}
            FastChanges::At(keys) => {
                self.path
                    .update(keys.into_iter().map(|k| (k, lb.fast_path_at(k.0, k.1))))?;
            }
            FastChanges::All => {
                // The ranges first: an entry never meets ranges older
                // than itself (new ranges with an old entry at worst pass
                // a frame to the core).
                let ranges = lb.fast_path_spi_ranges().unwrap_or_default();
                self.path.set_spi_ranges(&ranges)?;
                self.path.sync(&lb.fast_path())?;
            }
        }
        if now >= self.next_count {
            self.count(lb, now);
            self.next_count = now + COUNT_EVERY.min(lb.idle_timeout() / 4);
        }
        Ok(())
    }

    /// Fold what the program forwarded since the last time into the core
    /// now.
    pub fn count<P: Policy>(&mut self, lb: &mut Balancer<P>, now: Timestamp) {
        for (tunnel, c) in self.path.take_counts() {
            lb.fast_path_forwarded(tunnel, c.frames, c.bytes, c.steered, now);
        }
    }
}
