//! The pool library's typed errors.

use trireme_types::{ByteSize, ReplicaId, SnapshotId};
use uuid::Uuid;

/// Everything a pool operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("replica {0} not found")]
    NotFound(ReplicaId),
    #[error("snapshot {0} not found")]
    SnapshotNotFound(SnapshotId),
    #[error("{what} already exists with different parameters")]
    AlreadyExists { what: String },
    #[error("disk already holds pool {name:?} ({uuid})")]
    AlreadyFormatted { name: String, uuid: Uuid },
    #[error(
        "disk {disk} is not blank but holds no valid pool (damaged superblocks, or another file \
         system); refusing to format over it: repair it, or wipe it on purpose"
    )]
    NotBlank { disk: String },
    #[error("not enough space: need {needed}, {free} free")]
    NoSpace { needed: ByteSize, free: ByteSize },
    #[error("range {offset}+{len} is outside the replica of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("cannot shrink replica {id} from {from} to {to}")]
    ShrinkRefused { id: ReplicaId, from: ByteSize, to: ByteSize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("pool metadata is corrupt: {what}")]
    Corrupt { what: String },
    #[error("no valid superblock on {disk}: {reason}")]
    BadSuperblock { disk: String, reason: String },
    #[error("pool format version {found} is not supported (this build reads {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("pool metadata area is full ({needed} bytes of metadata needed)")]
    MetadataFull { needed: u64 },
    #[error("pool disk {disk} is {actual} bytes but the pool needs {expected} (truncated?)")]
    Truncated { disk: String, expected: u64, actual: u64 },
    #[error("pool stopped after a failed metadata write; import it again")]
    Failed,
    #[error("pool is closed")]
    Closed,
    #[error("the caller went away before the operation started; nothing was done")]
    Abandoned,
    #[error("replica {0} was destroyed")]
    Destroyed(ReplicaId),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl PoolError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }

    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        Self::Corrupt { what: what.into() }
    }
}
