//! The dirty-region log (DRL): which fixed-size regions of a volume were written while some
//! child was out. A child that returns (`Join::Partial`) gets exactly those regions copied.
//!
//! ```text
//!   region:  0    1    2    3    4    5  ...        region_bytes = max(1 MiB, next_pow2(size / 2^20))
//!   bit:     0    1    1    0    0    1             bit i = bit (i % 8) of byte (i / 8)
//! ```
//!
//! This module is pure data: the bitmap, its region arithmetic and its wire layout (the gRPC
//! `DirtyLog`). How a nexus keeps it recorded before it issues a write lives in the nexus.

use std::ops::Range;

/// The smallest region: keeps the log of a small volume from tracking tiny writes.
pub const MIN_REGION_BYTES: u64 = 1 << 20;

/// The region size for a volume of `size` bytes: at least 1 MiB, and never more than about
/// 2^20 regions (a 128 KiB bitmap) however large the volume.
pub fn region_bytes_for(size: u64) -> u64 {
    (size >> 20).next_power_of_two().max(MIN_REGION_BYTES)
}

/// A bitmap of dirty regions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirtyLog {
    region_bytes: u64,
    bitmap: Vec<u8>,
}

impl DirtyLog {
    /// An empty log with regions of `region_bytes` (0 means "not chosen yet": the nexus
    /// picks [`region_bytes_for`] its size).
    pub fn new(region_bytes: u64) -> Self {
        Self { region_bytes, bitmap: Vec::new() }
    }

    /// An empty log sized by the rule for a volume of `size` bytes.
    pub fn for_size(size: u64) -> Self {
        Self::new(region_bytes_for(size))
    }

    /// The log as the gRPC `DirtyLog` carries it. Trailing zero bytes are harmless.
    pub fn from_bytes(region_bytes: u64, bitmap: Vec<u8>) -> Self {
        Self { region_bytes, bitmap }
    }

    /// The bitmap in the gRPC layout: bit i is bit (i % 8) of byte (i / 8).
    pub fn bitmap(&self) -> &[u8] {
        &self.bitmap
    }

    pub fn into_parts(self) -> (u64, Vec<u8>) {
        (self.region_bytes, self.bitmap)
    }

    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    pub fn is_set(&self, region: u64) -> bool {
        let Ok(byte) = usize::try_from(region / 8) else { return false };
        self.bitmap.get(byte).is_some_and(|b| b & (1 << (region % 8)) != 0)
    }

    /// Sets one region; returns whether it was clear before.
    pub fn set(&mut self, region: u64) -> bool {
        let Ok(byte) = usize::try_from(region / 8) else { return false };
        if byte >= self.bitmap.len() {
            self.bitmap.resize(byte + 1, 0);
        }
        let bit = 1 << (region % 8);
        let was_clear = self.bitmap[byte] & bit == 0;
        self.bitmap[byte] |= bit;
        was_clear
    }

    pub fn clear(&mut self) {
        self.bitmap.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.bitmap.iter().all(|&b| b == 0)
    }

    /// How many regions are set.
    pub fn count(&self) -> u64 {
        self.bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// The set regions, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.bitmap.iter().enumerate().flat_map(|(byte, &b)| {
            (0..8u64).filter(move |bit| b & (1 << bit) != 0).map(move |bit| byte as u64 * 8 + bit)
        })
    }

    /// The regions a byte range touches (empty for an empty range).
    pub fn regions(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 || self.region_bytes == 0 {
            return 0..0;
        }
        let end = offset.saturating_add(len);
        offset / self.region_bytes..end.div_ceil(self.region_bytes)
    }

    /// The regions of `range` not set yet.
    pub fn missing(&self, range: Range<u64>) -> Vec<u64> {
        range.filter(|&r| !self.is_set(r)).collect()
    }

    /// The byte range of `region` within a volume of `size` bytes (the last region may be
    /// short; a region past the end is empty).
    pub fn span(&self, region: u64, size: u64) -> Range<u64> {
        let start = region.saturating_mul(self.region_bytes).min(size);
        let end = start.saturating_add(self.region_bytes).min(size);
        start..end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_size_follows_the_rule() {
        assert_eq!(region_bytes_for(0), 1 << 20);
        assert_eq!(region_bytes_for(64 << 30), 1 << 20);
        assert_eq!(region_bytes_for(1 << 40), 1 << 20);
        assert_eq!(region_bytes_for((1 << 40) + 1), 1 << 20);
        assert_eq!(region_bytes_for(3 << 40), 4 << 20);
        assert_eq!(region_bytes_for(16 << 40), 16 << 20);
    }

    #[test]
    fn bits_use_the_wire_layout() {
        let mut log = DirtyLog::new(1 << 20);
        assert!(log.set(0));
        assert!(!log.set(0));
        log.set(9);
        log.set(15);
        assert_eq!(log.bitmap(), &[0b0000_0001, 0b1000_0010]);
        assert_eq!(log.iter().collect::<Vec<_>>(), vec![0, 9, 15]);
        assert_eq!(log.count(), 3);
        let back = DirtyLog::from_bytes(1 << 20, log.bitmap().to_vec());
        assert_eq!(back, log);
        assert!(back.is_set(9) && !back.is_set(8) && !back.is_set(1000));
        let (region_bytes, bytes) = back.into_parts();
        assert_eq!((region_bytes, bytes.len()), (1 << 20, 2));
        log.clear();
        assert!(log.is_empty());
        assert!(DirtyLog::from_bytes(1, vec![0, 0]).is_empty());
    }

    #[test]
    fn ranges_map_to_regions() {
        let log = DirtyLog::new(1 << 20);
        assert_eq!(log.regions(0, 0), 0..0);
        assert_eq!(log.regions(0, 1), 0..1);
        assert_eq!(log.regions((1 << 20) - 1, 2), 0..2);
        assert_eq!(log.regions(1 << 20, 1 << 20), 1..2);
        assert_eq!(log.span(1, (1 << 20) + 100), (1 << 20)..(1 << 20) + 100);
        assert_eq!(log.span(5, 1 << 20), (1 << 20)..(1 << 20));
        let mut log = log;
        log.set(1);
        assert_eq!(log.missing(0..3), vec![0, 2]);
    }
}

/// Regions written since the last flush that covered them. A replica acknowledges a write
/// before it is durable (its engine may lose it in a crash until the next flush), so when a
/// child faults these regions join the dirty-region log: a partial rebuild then repairs what
/// the child may have lost, not only what it missed while out.
#[derive(Debug, Default)]
pub(super) struct Unflushed {
    /// Region -> the number of the last completed write to it.
    regions: std::collections::HashMap<u64, u64>,
    /// Completed writes so far.
    writes: u64,
}

impl Unflushed {
    /// A write to `regions` completed on every child it went to.
    pub fn note(&mut self, regions: Range<u64>) {
        self.writes += 1;
        for r in regions {
            self.regions.insert(r, self.writes);
        }
    }

    /// Taken when a flush starts: it covers the writes completed by then.
    pub fn mark(&self) -> u64 {
        self.writes
    }

    /// A flush started at `mark` succeeded on every child: what it covered is durable.
    pub fn flushed(&mut self, mark: u64) {
        self.regions.retain(|_, w| *w > mark);
    }

    pub fn regions(&self) -> Vec<u64> {
        self.regions.keys().copied().collect()
    }
}

#[cfg(test)]
mod unflushed_tests {
    use super::Unflushed;

    #[test]
    fn a_flush_clears_only_the_writes_completed_before_it_started() {
        let mut u = Unflushed::default();
        u.note(0..2);
        let mark = u.mark();
        u.note(5..6); // completed while the flush ran: not covered
        u.note(1..2); // rewritten while the flush ran: not covered either
        u.flushed(mark);
        let mut left = u.regions();
        left.sort_unstable();
        assert_eq!(left, vec![1, 5]);
        u.flushed(u.mark());
        assert!(u.regions().is_empty());
    }
}
