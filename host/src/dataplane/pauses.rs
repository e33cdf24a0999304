//! How long the worker keeps frames waiting: its busy time per turn of its
//! loop (a batch of frames, a command, the timers, a slice of background
//! work such as a status or a rebalance), kept in a log₂ histogram.
//!
//! A turn is timed twice, each in a histogram of its own. On the thread's
//! CPU clock: the work itself, what the worker is answerable for. On the
//! wall clock: what a frame that came in at the start of the turn waited,
//! including the time the OS gave the core to someone else, and a call
//! that blocked (a full socket buffer, a lock), which the CPU clock does
//! not see at all.

use std::time::{Duration, Instant};

/// Bucket `i` holds turns of less than 2^i µs (bucket 0: under 1 µs); the
/// last holds everything longer (2^24 µs is 16.8 s).
pub const BUCKETS: usize = 25;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pauses {
    buckets: [u64; BUCKETS],
    wall_buckets: [u64; BUCKETS],
    turns: u64,
    total: Duration,
    longest: Duration,
    longest_wall: Duration,
}

impl Default for Pauses {
    fn default() -> Self {
        Pauses {
            buckets: [0; BUCKETS],
            wall_buckets: [0; BUCKETS],
            turns: 0,
            total: Duration::ZERO,
            longest: Duration::ZERO,
            longest_wall: Duration::ZERO,
        }
    }
}

impl Pauses {
    pub fn record(&mut self, busy: Duration, wall: Duration) {
        self.buckets[bucket(busy)] += 1;
        self.wall_buckets[bucket(wall)] += 1;
        self.turns += 1;
        self.total += busy;
        self.longest = self.longest.max(busy);
        self.longest_wall = self.longest_wall.max(wall);
    }

    pub fn turns(&self) -> u64 {
        self.turns
    }

    pub fn total(&self) -> Duration {
        self.total
    }

    /// The longest turn, in the worker's CPU time.
    pub fn longest(&self) -> Duration {
        self.longest
    }

    /// The longest turn on the wall clock.
    pub fn longest_wall(&self) -> Duration {
        self.longest_wall
    }

    /// The upper bound of each bucket and the turns shorter than it, from
    /// the shortest (Prometheus' cumulative `le` buckets), the last bound
    /// being infinite.
    pub fn cumulative(&self) -> impl Iterator<Item = (Option<Duration>, u64)> + '_ {
        let mut sum = 0;
        self.buckets.iter().enumerate().map(move |(i, &n)| {
            sum += n;
            let bound = (i + 1 < BUCKETS).then(|| Duration::from_micros(1 << i));
            (bound, sum)
        })
    }

    /// The bound under which at least `q` of the turns were (a bucket's
    /// upper bound; the longest turn for the last bucket).
    pub fn quantile(&self, q: f64) -> Duration {
        let want = (q * self.turns as f64).ceil() as u64;
        self.cumulative()
            .find(|&(_, n)| n >= want)
            .and_then(|(bound, _)| bound)
            .unwrap_or(self.longest)
            .min(self.longest)
    }

    /// Turns of at least `at_least` of work, counted by bucket: `at_least`
    /// is rounded up to a power of two µs (1 ms counts turns from 1.024 ms).
    pub fn at_least(&self, at_least: Duration) -> u64 {
        at_least_in(&self.buckets, at_least)
    }

    /// Turns of at least `at_least` on the wall clock, likewise.
    pub fn wall_at_least(&self, at_least: Duration) -> u64 {
        at_least_in(&self.wall_buckets, at_least)
    }
}

/// The bucket of a turn of `d`.
fn bucket(d: Duration) -> usize {
    let micros = d.as_micros();
    let bucket = if micros == 0 {
        0
    } else {
        (u128::BITS - micros.leading_zeros()) as usize
    };
    bucket.min(BUCKETS - 1)
}

fn at_least_in(buckets: &[u64; BUCKETS], at_least: Duration) -> u64 {
    let micros = at_least.as_micros().max(1);
    // The first bucket whose lower bound, 2^(i-1) µs, is at least that.
    let first = (u128::BITS - (micros - 1).leading_zeros()) as usize + 1;
    buckets[first.min(BUCKETS - 1)..].iter().sum()
}

/// A turn being timed.
pub struct Turn {
    cpu: Duration,
    wall: Instant,
}

impl Turn {
    pub fn start() -> Self {
        Turn {
            cpu: thread_cpu_time(),
            wall: Instant::now(),
        }
    }

    /// (CPU time, wall time) since the start.
    pub fn elapsed(&self) -> (Duration, Duration) {
        (
            thread_cpu_time().saturating_sub(self.cpu),
            self.wall.elapsed(),
        )
    }
}

/// The calling thread's CPU time.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; the thread CPU
    // clock always exists on Linux.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_land_in_power_of_two_buckets() {
        let mut p = Pauses::default();
        let us = Duration::from_micros;
        for d in [us(0), us(1), us(3), us(700), us(1500), us(20_000)] {
            p.record(d, d);
        }
        p.record(us(1), us(9000));
        assert_eq!(p.turns(), 7);
        assert_eq!(p.longest(), us(20_000));
        assert_eq!(p.longest_wall(), us(20_000));
        // Under 1 ms: 5 of 7.
        let under_1024: Vec<_> = p.cumulative().collect();
        assert_eq!(under_1024[10], (Some(us(1024)), 5));
        assert_eq!(p.at_least(Duration::from_millis(1)), 2);
        // On the wall clock the 1 µs turn took 9 ms: a blocked call.
        assert_eq!(p.wall_at_least(Duration::from_millis(1)), 3);
        assert_eq!(p.quantile(0.5), us(4));
        assert_eq!(p.quantile(1.0), us(20_000));
        assert_eq!(p.cumulative().last(), Some((None, 7)));
    }

    #[test]
    fn the_thread_clock_counts_work_not_sleep() {
        let t = Turn::start();
        std::thread::sleep(Duration::from_millis(30));
        let (cpu, wall) = t.elapsed();
        assert!(wall >= Duration::from_millis(30));
        assert!(cpu < Duration::from_millis(10), "{cpu:?}");
    }
}
