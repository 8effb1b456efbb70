//! Latency histograms with fixed buckets, counted with atomics: the NBD server keeps one per
//! export and operation, the pool one per kind of disk operation, and the engine's metrics
//! export their snapshots. Fixed bounds make every histogram comparable and aggregatable.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the buckets, in nanoseconds: from 50 µs (a fast device's read) to 10 s (past
/// any sane request), roughly ×2 apart. Anything slower lands in the last, unbounded bucket.
pub const LATENCY_BOUNDS_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Buckets per histogram: one per bound and the unbounded one.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;

/// A histogram that many tasks record into at once (a few uncontended atomic adds each).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    pub fn record(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS.partition_point(|&bound| bound < ns);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Relaxed)),
            sum: Duration::from_nanos(self.sum_ns.load(Relaxed)),
        }
    }
}

/// A point-in-time copy of a [`LatencyHistogram`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Counts per bucket (not cumulative): `buckets[i]` took at most `LATENCY_BOUNDS_NS[i]`
    /// and more than the bound before; the last bucket is unbounded.
    pub buckets: [u64; LATENCY_BUCKETS],
    /// Total time of everything counted.
    pub sum: Duration,
}

impl LatencySnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_the_bucket_whose_bound_they_do_not_exceed() {
        let l = LatencyHistogram::default();
        for us in [1, 50, 51, 100, 700, 20_000_000] {
            l.record(Duration::from_micros(us));
        }
        let s = l.snapshot();
        assert_eq!(s.buckets[0], 2, "1 µs and exactly 50 µs");
        assert_eq!(s.buckets[1], 2, "51 µs and 100 µs");
        assert_eq!(s.buckets[4], 1, "700 µs is under 1 ms");
        assert_eq!(s.buckets[LATENCY_BUCKETS - 1], 1, "20 s is past the last bound");
        assert_eq!(s.count(), 6);
        assert_eq!(s.sum, Duration::from_micros(1 + 50 + 51 + 100 + 700 + 20_000_000));
    }
}
