//! The worker's side of the XDP fast path: the program on every port, its
//! maps kept equal to [`Balancer::fast_path`] and its counters folded back
//! into the core.
//!
//! The maps are brought up to date at the end of every turn in which the
//! core's lookups changed ([`Balancer::fast_path_changes`]): the entries
//! at the endpoints of the tunnels that were added, moved, rebound,
//! confirmed or removed, at once, before the worker takes the next frames,
//! so a moved tunnel's frames leave the fast path from the next one on
//! (those already inside the kernel go as frames in a batch do).
//!
//! When every entry may have changed (a segw's health or MAC, the set, too
//! many endpoints at once), the whole table is looked at again: at a
//! million tunnels that is millions of lookups and map writes, so it goes
//! a slice of at most [`RESYNC_SLICE`] per turn. Meanwhile the egress
//! ports are closed (the program passes every frame to the core, which
//! handles it as it always can), and they open again once every endpoint
//! //! has been looked at and the entries nobody confirmed are swept.
//!
//! The counters come back in passes over the tunnel slots, [`FOLD_SLICE`]
//! slots every [`FOLD_EVERY`] (and before a status, a save or the
//! measurement, if the last slice is a second old): a pass over a million
//! slots reads 64 MB, a long turn taken whole. A pass over a million
//! slots takes ~2 s, well inside a quarter of any idle timeout: a tunnel
//! the fast path carries is never idle to the sweep.

use std::time::Duration;

use crate::balancer::fastpath::{FastChanges, FastPathMark};
use crate::balancer::{Balancer, PortId};
use crate::io::xdp::{FastPath, XdpError};
use crate::packet::Mac;
use crate::policy::Policy;
use crate::time::Timestamp;

/// How often a slice of the fast path's counters is folded into the core ...
pub const FOLD_EVERY: Duration = Duration::from_millis(2);
/// ... and how many tunnel slots a slice reads.
pub const FOLD_SLICE: usize = 1_024;

/// The longest a turn spends on a full resync, less what the turn has
/// already spent on other work (see [`Fast::turn`]); at least one step,
/// unless the turn has spent all of it.
pub const RESYNC_SLICE: Duration = Duration::from_micros(500);

/// Table slots looked at between two looks at the clock.
const SLOTS_PER_LOOK: usize = 8;

/// A full resync under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resync {
    /// Looking at the endpoints of the tunnels from this slot on.
    Walking(usize),
    /// Every endpoint looked at: removing the entries none confirmed.
    Sweeping,
}

pub struct Fast {
    path: FastPath,
    /// Where the maps were last brought up to date.
    mark: FastPathMark,
    next_count: Timestamp,
    /// The tunnel slot the next fold begins at.
    fold_at: usize,
    resync: Option<Resync>,
    /// Endpoints of the slice in hand (kept to reuse its memory).
    keys: Vec<(std::net::IpAddr, u16)>,
}

impl Fast {
    pub fn new(path: FastPath) -> Self {
        Fast {
            path,
            mark: FastPathMark::default(),
            next_count: Timestamp::ZERO,
            fold_at: 0,
            resync: None,
            keys: Vec::new(),
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

    /// After a turn: the maps again if the core's lookups changed (a slice
    /// of a full resync: [`RESYNC_SLICE`] less `spent`, the work the turn
    /// has done already), and the counters when due.
    pub fn turn<P: Policy>(
        &mut self,
        lb: &mut Balancer<P>,
        now: Timestamp,
        spent: Duration,
    ) -> Result<(), XdpError> {
        if now >= self.next_count {
            self.count(lb, now);
            self.next_count = now + FOLD_EVERY;
        }
        match lb.fast_path_changes(&mut self.mark) {
            FastChanges::None => {}
            FastChanges::At(keys) => {
                self.path
                    .update(keys.into_iter().map(|k| (k, lb.fast_path_at(k.0, k.1))))?;
            }
            FastChanges::All => {
                self.path.close_ports()?;
                // The ranges first: an entry never meets ranges older
                // than itself (new ranges with an old entry at worst pass
                // a frame to the core).
                let ranges = lb.fast_path_spi_ranges().unwrap_or_default();
                self.path.set_spi_ranges(&ranges)?;
                self.path.begin_resync();
                self.resync = Some(Resync::Walking(0));
            }
        }
        // A turn that has done its share already (the timers', say) leaves
        // the resync to the next: turns without timers come between.
        if self.resync.is_some() && spent < RESYNC_SLICE {
            self.resync_slice(lb, RESYNC_SLICE - spent)?;
        }
        Ok(())
    }

    /// The program and its maps (a test runs frames through them).
    pub fn path(&mut self) -> &mut FastPath {
        &mut self.path
    }

    /// Entries in the maps (both ways).
    pub fn entries(&self) -> usize {
        self.path.entries()
    }

    /// A full resync is under way: the worker has work without input.
    pub fn resyncing(&self) -> bool {
        self.resync.is_some()
    }

    /// Up to `budget` of the resync under way (at least one step).
    fn resync_slice<P: Policy>(
        &mut self,
        lb: &Balancer<P>,
        budget: Duration,
    ) -> Result<(), XdpError> {
        let deadline = std::time::Instant::now() + budget;
        while let Some(Resync::Walking(from)) = self.resync {
            self.keys.clear();
            let next = lb.fast_path_keys(from, SLOTS_PER_LOOK, &mut self.keys);
            self.path.update(
                self.keys
                    .iter()
                    .map(|&(addr, port)| ((addr, port), lb.fast_path_at(addr, port))),
            )?;
            self.resync = Some(next.map_or(Resync::Sweeping, Resync::Walking));
            if std::time::Instant::now() >= deadline {
                return Ok(());
            }
        }
        if self.path.sweep(Some(deadline))? {
            self.path.open_ports()?;
            self.resync = None;
        }
        Ok(())
    }

    /// Fold what the program forwarded since the last time into the core
    /// now.
    pub fn count<P: Policy>(&mut self, lb: &mut Balancer<P>, now: Timestamp) {
        let mut taken = Vec::new();
        let next = self
            .path
            .take_counts_in(self.fold_at, FOLD_SLICE, &mut taken);
        self.fold_at = next.unwrap_or(0);
        for (tunnel, c) in taken {
            lb.fast_path_forwarded(tunnel, c.frames, c.bytes, c.steered, now);
        }
    }
}
