//! The engine's typed errors. They carry the ids involved; the gRPC layer maps each to a status
//! code in exactly one place (`grpc::to_status`).

use std::path::PathBuf;

use trireme_pool::PoolError;
use trireme_types::{PoolId, ReplicaId, VolumeId};

use crate::nexus::remote::RemoteUriError;
use crate::nexus::{ChildError, ChildUriError, NexusError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("pool {0} not found")]
    PoolNotFound(PoolId),
    #[error("replica {0} not found")]
    ReplicaNotFound(ReplicaId),
    #[error("no nexus for volume {0}")]
    NexusNotFound(VolumeId),
    #[error("pool {pool} already exists on {disk}")]
    PoolExists { pool: PoolId, disk: PathBuf },
    #[error("disk {disk} is already used by pool {pool}")]
    DiskInUse { disk: PathBuf, pool: PoolId },
    #[error("disk {disk} holds another pool, {found:?}; refusing to overwrite it")]
    DiskHoldsOtherPool { disk: PathBuf, found: String },
    #[error("disk {disk} does not exist and no size was given to create it")]
    DiskMissing { disk: PathBuf },
    #[error("pool {pool} still holds {replicas} replica(s); destroy them first")]
    PoolNotEmpty { pool: PoolId, replicas: usize },
    #[error("pool {pool} is faulted: {error}")]
    PoolFaulted { pool: PoolId, error: String },
    #[error("pool {0} is busy with another operation; retry")]
    PoolBusy(PoolId),
    #[error("replica {replica} exists in pool {pool}, not in pool {requested}")]
    ReplicaInOtherPool { replica: ReplicaId, pool: PoolId, requested: PoolId },
    #[error(
        "replica {replica} is a child of the nexus of volume {volume}; destroy the nexus first"
    )]
    ReplicaInUse { replica: ReplicaId, volume: VolumeId },
    #[error("replica {replica} is still being created in pool {pool}; try again once it is")]
    ReplicaCreating { replica: ReplicaId, pool: PoolId },
    #[error("a nexus for volume {0} already exists with other children or a larger size")]
    NexusMismatch(VolumeId),
    #[error(transparent)]
    Nexus(#[from] NexusError),
    #[error(transparent)]
    ChildUri(#[from] ChildUriError),
    #[error(transparent)]
    RemoteUri(#[from] RemoteUriError),
    /// A child is claimed by a newer epoch: the request comes from a superseded nexus.
    #[error("child {uri} is fenced for epoch {epoch}: {reason}")]
    Fenced { uri: String, epoch: u64, reason: String },
    #[error("the nexus of volume {volume} has epoch {nexus}, not {requested}")]
    EpochMismatch { volume: VolumeId, nexus: u64, requested: u64 },
    #[error("cannot open child {uri}: {error}")]
    ChildUnavailable { uri: String, error: ChildError },
    #[error("cannot update the metadata of replica {replica}: {reason}")]
    ReplicaMeta { replica: ReplicaId, reason: String },
    #[error("pool {pool}: {source}")]
    Pool {
        pool: PoolId,
        #[source]
        source: PoolError,
    },
    /// The task running a pool operation to its end panicked or was cancelled at shutdown.
    #[error("pool {pool}: the operation stopped unexpectedly: {reason}")]
    PoolTask { pool: PoolId, reason: String },
    #[error("wiping a pool's disk is not supported by this engine yet; destroy without wipe")]
    WipeUnsupported,
    #[error("cannot write the engine state file {path}: {source}")]
    StateFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl EngineError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument { field, reason: reason.into() }
    }

    pub(crate) fn task(pool: &PoolId, e: &tokio::task::JoinError) -> Self {
        Self::PoolTask { pool: pool.clone(), reason: e.to_string() }
    }

    pub(crate) fn pool(pool: &PoolId, source: PoolError) -> Self {
        Self::Pool { pool: pool.clone(), source }
    }
}
