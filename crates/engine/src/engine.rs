//! The engine's state and operations, independent of any wire format: its pools, the replicas
//! in them, its nexuses (`engine/nexuses.rs`) and what it shares over NBD. The gRPC service
//! translates to and from these calls; tests drive them directly.

mod nexuses;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use trireme_pool::{PoolError, PoolInfo, ReplicaInfo, ReplicaMeta};
use trireme_types::{ByteSize, NodeId, PoolId, ReplicaId, VolumeId};

pub use nexuses::{ChildRequest, NexusRequest};

use crate::error::EngineError;
use crate::nexus::recorder::NoRecorder;
use crate::nexus::remote::{RemoteChild, RemoteOptions};
use crate::nexus::{Nexus, RebuildLimits, Recorder};
use crate::pools::{PoolView, Pools};
use crate::share::{Shares, nexus_export_name};

/// How long shutdown waits for one nexus to flush and record its clean shutdown.
const NEXUS_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(6);

/// What every nexus of this engine is created with.
#[derive(Clone)]
pub struct NexusSettings {
    /// Time limits of remote children.
    pub remote: RemoteOptions,
    /// Rebuild bandwidth and concurrency, shared by every nexus.
    pub rebuild: Arc<RebuildLimits>,
    /// Where nexuses record membership and dirty regions (control, or nowhere).
    pub recorder: Arc<dyn Recorder>,
}

impl Default for NexusSettings {
    /// Stand-alone: recorded nowhere, default limits.
    fn default() -> Self {
        Self {
            remote: RemoteOptions::default(),
            rebuild: Arc::new(RebuildLimits::default()),
            recorder: Arc::new(NoRecorder),
        }
    }
}

/// Where this engine is reached, as advertised to control and put in share URIs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// host:port of the gRPC server.
    pub grpc: String,
    /// host:port of the NBD server.
    pub nbd: String,
}

pub struct Engine {
    node_id: NodeId,
    endpoints: Endpoints,
    pools: Pools,
    nexuses: Mutex<BTreeMap<VolumeId, Arc<Nexus>>>,
    /// Serialises the operations on each volume's nexus (see `nexuses.rs`).
    nexus_locks: Mutex<BTreeMap<VolumeId, Arc<tokio::sync::Mutex<()>>>>,
    /// The remote children opened for each volume's nexus, to refresh their size on resize.
    remote_children: Mutex<BTreeMap<VolumeId, Vec<std::sync::Weak<RemoteChild>>>>,
    shares: Arc<Shares>,
    settings: NexusSettings,
}

impl Engine {
    /// Loads the pools listed in `state_dir` and shares their replicas.
    pub async fn load(
        node_id: NodeId,
        endpoints: Endpoints,
        state_dir: &Path,
        settings: NexusSettings,
    ) -> Result<Self, EngineError> {
        let pools = Pools::load(state_dir).await?;
        let engine = Self {
            node_id,
            endpoints,
            pools,
            nexuses: Mutex::new(BTreeMap::new()),
            nexus_locks: Mutex::new(BTreeMap::new()),
            remote_children: Mutex::new(BTreeMap::new()),
            shares: Arc::new(Shares::default()),
            settings,
        };
        for (name, pool) in engine.pools.online() {
            engine.share_replicas(&name, &pool);
        }
        Ok(engine)
    }

    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    pub fn shares(&self) -> Arc<Shares> {
        Arc::clone(&self.shares)
    }

    fn share_replicas(&self, name: &PoolId, pool: &Arc<trireme_pool::Pool>) {
        for r in pool.replicas() {
            match pool.open_replica(r.id) {
                Ok(replica) => self.shares.share_replica(replica, pool),
                Err(e) => {
                    tracing::error!(pool = %name, replica = %r.id, error = %e, "cannot share replica")
                }
            }
        }
    }

    /// Wraps a pool error, noticing when the pool stopped itself.
    fn pool_error(&self, name: &PoolId, e: PoolError) -> EngineError {
        if matches!(e, PoolError::Failed) {
            self.pools.mark_failed(name, &e);
        }
        EngineError::pool(name, e)
    }

    // ---- pools

    pub async fn create_pool(
        &self,
        name: &PoolId,
        disk: &Path,
        size: Option<ByteSize>,
        cluster_size: ByteSize,
    ) -> Result<PoolInfo, EngineError> {
        let info = self.pools.create(name, disk, size, cluster_size).await?;
        // An imported pool brings its replicas back; share them (idempotent).
        let pool = self.pools.get(name)?;
        self.share_replicas(name, &pool);
        Ok(info)
    }

    pub async fn destroy_pool(&self, name: &PoolId) -> Result<(), EngineError> {
        self.pools.destroy(name).await
    }

    pub fn list_pools(&self) -> Vec<PoolView> {
        self.pools.list()
    }

    // ---- replicas

    /// Creates a replica; idempotent when it exists with the same parameters.
    pub async fn create_replica(
        &self,
        id: ReplicaId,
        pool_name: &PoolId,
        size: ByteSize,
        thin: bool,
        volume: Option<VolumeId>,
    ) -> Result<ReplicaInfo, EngineError> {
        if let Some((found, _, _)) = self.pools.find_replica(id)
            && &found != pool_name
        {
            return Err(EngineError::ReplicaInOtherPool {
                replica: id,
                pool: found,
                requested: pool_name.clone(),
            });
        }
        let pool = self.pools.get(pool_name)?;
        let meta = ReplicaMeta { volume, ..ReplicaMeta::default() };
        let info = pool
            .create_replica(id, size, thin, meta)
            .await
            .map_err(|e| self.pool_error(pool_name, e))?;
        let replica = pool.open_replica(id).map_err(|e| self.pool_error(pool_name, e))?;
        self.shares.share_replica(replica, &pool);
        tracing::info!(replica = %id, pool = %pool_name, %size, thin, "replica created");
        Ok(info)
    }

    /// Destroys a replica; idempotent: an absent replica is already destroyed.
    pub async fn destroy_replica(&self, id: ReplicaId) -> Result<(), EngineError> {
        if let Some(volume) = self.nexus_of(id) {
            return Err(EngineError::ReplicaInUse { replica: id, volume });
        }
        let Some((name, pool, _)) = self.pools.find_replica(id) else {
            // Not listed yet may mean still being created, by a call whose caller gave up:
            // "already gone" would let that creation finish into a replica nobody owns.
            if let Some((pool, _)) =
                self.pools.online().into_iter().find(|(_, p)| p.is_creating(id))
            {
                return Err(EngineError::ReplicaCreating { replica: id, pool });
            }
            return Ok(());
        };
        let shared = self.shares.unshare_replica(id);
        match pool.destroy_replica(id).await {
            Ok(()) | Err(PoolError::NotFound(_)) => {
                tracing::info!(replica = %id, pool = %name, "replica destroyed");
                Ok(())
            }
            Err(e) => {
                // Still there: keep sharing it, with its fence.
                if let Some(shared) = shared {
                    self.shares.reshare_replica(shared);
                }
                Err(self.pool_error(&name, e))
            }
        }
    }

    pub async fn resize_replica(
        &self,
        id: ReplicaId,
        size: ByteSize,
    ) -> Result<(PoolId, ReplicaInfo), EngineError> {
        let (name, pool, _) =
            self.pools.find_replica(id).ok_or(EngineError::ReplicaNotFound(id))?;
        let info = pool.resize_replica(id, size).await.map_err(|e| self.pool_error(&name, e))?;
        Ok((name, info))
    }

    pub fn list_replicas(&self) -> Vec<(PoolId, ReplicaInfo)> {
        self.pools
            .online()
            .into_iter()
            .flat_map(|(name, pool)| pool.replicas().into_iter().map(move |r| (name.clone(), r)))
            .collect()
    }

    pub fn replica(&self, id: ReplicaId) -> Option<(PoolId, ReplicaInfo)> {
        self.pools.find_replica(id).map(|(name, _, info)| (name, info))
    }

    /// Stamps a membership generation into a replica's meta; never lowers it.
    pub async fn set_replica_generation(
        &self,
        id: ReplicaId,
        generation: u64,
    ) -> Result<(PoolId, ReplicaInfo), EngineError> {
        let fence = self.shares.fence(id).ok_or(EngineError::ReplicaNotFound(id))?;
        fence
            .raise_generation(generation)
            .await
            .map_err(|e| EngineError::ReplicaMeta { replica: id, reason: e.to_string() })?;
        self.replica(id).ok_or(EngineError::ReplicaNotFound(id))
    }

    /// Flushes and closes every nexus, then every pool. Called once the servers have stopped.
    pub async fn shutdown(&self) {
        let nexuses: Vec<_> = std::mem::take(&mut *self.nexuses.lock()).into_values().collect();
        let closes = nexuses.into_iter().map(|n| async move {
            self.shares.remove(&nexus_export_name(n.volume()));
            // Bounded, so the pools below still get their final checkpoint within a
            // supervisor's grace period when children or control do not answer.
            match tokio::time::timeout(NEXUS_CLOSE_TIMEOUT, n.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(volume = %n.volume(), error = %e, "flushing the nexus at shutdown failed")
                }
                Err(_) => tracing::warn!(volume = %n.volume(), "closing the nexus timed out"),
            }
        });
        futures::future::join_all(closes).await;
        self.pools.close_all().await;
    }
}
