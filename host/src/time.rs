//! Time as the core sees it: passed in, never read.
//!
//! The live data path stamps frames from a monotonic clock at the I/O edge;
//! the simulation and the tests advance a `Timestamp` by hand. Nothing in the
//! core calls `Instant::now()`.

use std::ops::Add;
use std::time::Duration;

/// A point in time, as an offset from an epoch the caller chose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(Duration);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(Duration::ZERO);

    pub const fn from_duration(since_epoch: Duration) -> Self {
        Timestamp(since_epoch)
    }

    pub const fn from_secs(secs: u64) -> Self {
        Timestamp(Duration::from_secs(secs))
    }

    pub const fn from_millis(millis: u64) -> Self {
        Timestamp(Duration::from_millis(millis))
    }

    pub const fn since_epoch(self) -> Duration {
        self.0
    }

    /// `d` before `self`, or the epoch if that is earlier.
    pub fn before(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(d))
    }

    /// Time from `earlier` to `self`; zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        Timestamp(self.0 + d)
    }
}
