//! Per-export counters of served operations and bytes, and a latency histogram per kind of
//! operation, shared by every connection to the export. Plain atomics, so that the data path
//! pays a few uncontended increments per request; the engine's metrics read snapshots.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use trireme_types::{LatencyHistogram, LatencySnapshot};

use crate::proto::{Command, Request};

/// The kinds of operation a latency histogram is kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Read,
    Write,
    /// FLUSH: what a database's fsync waits for. (A write with FUA counts as a write.)
    Flush,
    /// TRIM, WRITE_ZEROES, BLOCK_STATUS, CACHE and unknown commands.
    Other,
}

impl OpKind {
    pub const ALL: [OpKind; 4] = [OpKind::Read, OpKind::Write, OpKind::Flush, OpKind::Other];

    fn of(command: Command) -> Self {
        match command {
            Command::Read => OpKind::Read,
            Command::Write => OpKind::Write,
            Command::Flush => OpKind::Flush,
            _ => OpKind::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Other => "other",
        }
    }
}

/// Counters of one export.
#[derive(Debug, Default)]
pub struct ExportStats {
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
    other_ops: AtomicU64,
    errors: AtomicU64,
    /// Time from a request's arrival (its payload read, for a write) to its reply being
    /// ready, indexed like [`OpKind::ALL`].
    latency: [LatencyHistogram; 4],
}

/// A point-in-time copy of [`ExportStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    /// FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS, CACHE and unknown commands.
    pub other_ops: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Latency of every request, answered with an error or not, indexed like [`OpKind::ALL`].
    pub latency: [LatencySnapshot; 4],
}

impl StatsSnapshot {
    pub fn latency(&self, kind: OpKind) -> &LatencySnapshot {
        &self.latency[kind as usize]
    }
}

impl ExportStats {
    pub(crate) fn record(&self, req: &Request, ok: bool, took: Duration) {
        self.latency[OpKind::of(req.command) as usize].record(took);
        let len = u64::from(req.length);
        match req.command {
            Command::Read if ok => {
                self.read_ops.fetch_add(1, Relaxed);
                self.read_bytes.fetch_add(len, Relaxed);
            }
            Command::Write if ok => {
                self.write_ops.fetch_add(1, Relaxed);
                self.write_bytes.fetch_add(len, Relaxed);
            }
            _ => {
                self.other_ops.fetch_add(1, Relaxed);
            }
        }
        if !ok {
            self.errors.fetch_add(1, Relaxed);
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            read_ops: self.read_ops.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            write_ops: self.write_ops.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            other_ops: self.other_ops.load(Relaxed),
            errors: self.errors.load(Relaxed),
            latency: std::array::from_fn(|i| self.latency[i].snapshot()),
        }
    }
}

/// Counters of every export a server has served, by export name.
#[derive(Debug, Default)]
pub struct ServerStats {
    exports: Mutex<HashMap<String, Arc<ExportStats>>>,
}

impl ServerStats {
    pub(crate) fn for_export(&self, name: &str) -> Arc<ExportStats> {
        let mut map = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(name.to_owned()).or_default())
    }

    /// Snapshot of one export's counters, if it was ever served.
    pub fn export(&self, name: &str) -> Option<StatsSnapshot> {
        let map = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name).map(|s| s.snapshot())
    }

    /// Snapshots of all exports served so far.
    pub fn all(&self) -> Vec<(String, StatsSnapshot)> {
        let map = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.snapshot())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_request_has_its_own_histogram() {
        let stats = ExportStats::default();
        let req = |command| Request { flags: 0, command, cookie: 1, offset: 0, length: 4096 };
        stats.record(&req(Command::Read), true, Duration::from_micros(80));
        stats.record(&req(Command::Flush), true, Duration::from_millis(3));
        stats.record(&req(Command::Trim), false, Duration::from_micros(10));
        let s = stats.snapshot();
        assert_eq!(s.latency(OpKind::Read).buckets[1], 1);
        assert_eq!(s.latency(OpKind::Write).count(), 0);
        assert_eq!(s.latency(OpKind::Flush).buckets[6], 1);
        assert_eq!(s.latency(OpKind::Other).count(), 1);
        assert_eq!((s.read_ops, s.other_ops, s.errors), (1, 2, 1));
    }
}
