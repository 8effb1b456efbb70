//! Per-export counters of served operations and bytes, shared by every connection to the
//! export. Plain atomics: the metrics layer (later) reads snapshots and exports them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::proto::{Command, Request};

/// Counters of one export.
#[derive(Debug, Default)]
pub struct ExportStats {
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
    other_ops: AtomicU64,
    errors: AtomicU64,
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
}

impl ExportStats {
    pub(crate) fn record(&self, req: &Request, ok: bool) {
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
