//! Plain data the pool hands out: descriptions of the pool, its replicas and snapshots.

use trireme_types::{ByteSize, ReplicaId, SnapshotId, VolumeId};

/// Options for formatting a new pool.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub name: String,
    /// Allocation unit; a power of two between 64 KiB and 64 MiB. Default 1 MiB.
    pub cluster_size: ByteSize,
    /// Create (or extend) the backing file to this size if it is missing; `None` for block
    /// devices and existing files.
    pub size: Option<ByteSize>,
}

impl CreateOptions {
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), cluster_size: ByteSize::mib(1), size: None }
    }
}

/// A pool's identity and capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInfo {
    pub uuid: uuid::Uuid,
    pub name: String,
    pub capacity: ByteSize,
    pub used: ByteSize,
    pub free: ByteSize,
    pub cluster_size: ByteSize,
    pub replica_count: usize,
}

/// Small per-replica metadata owned by the engine, stored in the replica table so that
/// replication fencing needs no format change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ReplicaMeta {
    pub volume: Option<VolumeId>,
    pub generation: u64,
    pub epoch: u64,
}

/// A replica's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub id: ReplicaId,
    pub size: ByteSize,
    pub thin: bool,
    pub allocated: ByteSize,
    pub meta: ReplicaMeta,
    /// The snapshot this replica was cloned from.
    pub snapshot_of: Option<SnapshotId>,
}

/// A snapshot's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    pub source: ReplicaId,
    pub size: ByteSize,
    pub created_at_unix: u64,
}

/// One run of an allocation map: `[offset, offset+length)` is all allocated or all a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub offset: u64,
    pub length: u64,
    pub allocated: bool,
}
