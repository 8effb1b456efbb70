//! The pool: skeleton (bodies filled in by later commits).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use trireme_types::{ByteSize, ReplicaId, SnapshotId};

use crate::{CreateOptions, PoolError, PoolInfo, Replica, ReplicaInfo, ReplicaMeta, SnapshotInfo};

pub struct Pool {
    disk: PathBuf,
}

#[allow(clippy::unused_async, unused_variables)]
impl Pool {
    pub async fn create(disk: &Path, opts: CreateOptions) -> Result<Arc<Pool>, PoolError> {
        todo!()
    }
    pub async fn import(disk: &Path) -> Result<Arc<Pool>, PoolError> {
        todo!()
    }
    pub fn info(&self) -> PoolInfo {
        todo!()
    }
    pub fn disk(&self) -> &Path {
        &self.disk
    }
    pub async fn create_replica(
        &self,
        id: ReplicaId,
        size: ByteSize,
        thin: bool,
        meta: ReplicaMeta,
    ) -> Result<ReplicaInfo, PoolError> {
        todo!()
    }
    pub async fn destroy_replica(&self, id: ReplicaId) -> Result<(), PoolError> {
        todo!()
    }
    pub async fn resize_replica(
        &self,
        id: ReplicaId,
        size: ByteSize,
    ) -> Result<ReplicaInfo, PoolError> {
        todo!()
    }
    pub async fn set_replica_meta(
        &self,
        id: ReplicaId,
        meta: ReplicaMeta,
    ) -> Result<(), PoolError> {
        todo!()
    }
    pub fn replicas(&self) -> Vec<ReplicaInfo> {
        todo!()
    }
    pub fn replica_info(&self, id: ReplicaId) -> Result<ReplicaInfo, PoolError> {
        todo!()
    }
    pub fn open_replica(&self, id: ReplicaId) -> Result<Replica, PoolError> {
        todo!()
    }
    pub async fn create_snapshot(
        &self,
        source: ReplicaId,
        id: SnapshotId,
    ) -> Result<SnapshotInfo, PoolError> {
        todo!()
    }
    pub async fn destroy_snapshot(&self, id: SnapshotId) -> Result<(), PoolError> {
        todo!()
    }
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        todo!()
    }
    pub async fn create_clone(
        &self,
        snapshot: SnapshotId,
        id: ReplicaId,
        meta: ReplicaMeta,
    ) -> Result<ReplicaInfo, PoolError> {
        todo!()
    }
    pub async fn close(&self) -> Result<(), PoolError> {
        todo!()
    }
}
