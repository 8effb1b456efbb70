//! Trireme's pool format and pool library.
//!
//! A pool is a file or block device carved into replicas. This crate owns the on-disk format
//! (see `layout.rs` for the picture, `journal.rs` for crash
//! consistency) and the data path (io_uring with `O_DIRECT`, see `io/`).
//!
//! ```text
//!  Arc<Pool> ── create/import/close, replicas, snapshots, clones (structural, journaled)
//!     │
//!     ├── Replica (handle) ── read / write / flush / trim / write_zeroes / allocation
//!     │        │  fast path: mapped, unshared cluster → one O_DIRECT write, no metadata I/O
//!     │        └─ slow path: allocate or copy-on-write a cluster → journal record
//!     │
//!     └── Inner: Backend (io_uring | pread/pwrite), Meta (maps, refcounts), Journal
//! ```
//!
//! On disk (format version 1): two superblock copies, two checkpoint slots, a journal of
//! checksummed commit blocks, then the data clusters. Everything is little-endian, crc32c'd
//! and 4 KiB aligned; `layout.rs` and `journal.rs` hold the full description.
//!
//! Guarantees: after `flush()` returns, or a FUA write completes, the data and the metadata
//! that maps it survive a crash. Import after a crash sees every commit up to the first torn
//! one and nothing after it. A freshly allocated cluster is zeroed (or fully overwritten)
//! before any mapping to it becomes durable, and a released cluster is not reused before its
//! release is durable, so no replica can ever read another's data.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod codec;
mod error;
mod fence;
mod info;
mod inner;
mod io;
mod journal;
mod layout;
mod map;
mod meta;
mod pool;
mod record;
mod replica;
#[cfg(test)]
mod tests;

pub use error::PoolError;
pub use info::{Allocation, CreateOptions, PoolInfo, ReplicaInfo, ReplicaMeta, SnapshotInfo};
pub use io::DiskStatsSnapshot;
pub use pool::Pool;
pub use replica::Replica;
