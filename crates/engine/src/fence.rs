//! Fencing: which nexus may write a replica.
//!
//! Control bumps a volume's epoch for every nexus it creates. That nexus claims each child
//! with its epoch: a local child directly, a remote one through the share named
//! `replica-<uuid>@<epoch>`. A replica has exactly one [`Fence`] in the engine that holds it,
//! shared by its local children and by every share of it, so a claim made through any path
//! fences all the others at once:
//!
//! ```text
//!   nexus (epoch 7) ── LocalChild ────────────┐
//!   remote nexus (epoch 8) ── "replica-R@8" ──┼──> Fence(R): claimed 8, persisted 8
//!   stale remote nexus ── "replica-R@7" ──────┘        └─> 7 refused: Fenced
//! ```
//!
//! Rules:
//! - A claim lower than the fence is refused; I/O of epoch E is served only while the fence
//!   is exactly E (a higher claim supersedes E at once, for every request after it).
//! - The fence is persisted in the pool's replica meta **before** any I/O of the new epoch is
//!   served, so an engine restart can never lower it: a stale nexus that reconnects after the
//!   restart is still refused. Raising the in-memory fence first is safe: refusing a stale
//!   request early never loses anything.
//! - Requests admitted under the old epoch and still running when a claim raises the fence are
//!   waited for (bounded by [`DRAIN_TIMEOUT`]) before the new epoch is served, so a slow write
//!   of a superseded nexus can never land after, and over, a write of the new one. Every
//!   admitted request holds a shared guard of `gate` for its duration; the claim takes it
//!   exclusively once.
//! - Meta writes (epoch and generation) are serialised per replica, because the pool stores the
//!   whole [`ReplicaMeta`] at once and two interleaved read-modify-writes would lose one field.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use trireme_pool::{Pool, ReplicaMeta};
use trireme_types::ReplicaId;

/// How long a claim waits for requests of older epochs to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Held by a request while it runs under an admitted epoch.
pub type Admitted<'a> = tokio::sync::RwLockReadGuard<'a, ()>;

/// Why I/O or a claim under some epoch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// A newer nexus claimed the replica.
    #[error("replica {replica} is claimed by epoch {fence}; epoch {epoch} is stale")]
    Stale { replica: ReplicaId, epoch: u64, fence: u64 },
    /// The claim could not be made durable; nothing of that epoch is served until it is.
    #[error("cannot persist the claim of replica {replica}: {reason}")]
    Persist { replica: ReplicaId, reason: String },
    /// Requests of an older epoch did not finish in time; the claim may be retried.
    #[error("requests of an older epoch on replica {replica} did not finish within {after:?}")]
    Draining { replica: ReplicaId, after: Duration },
}

/// The highest epoch that claimed one replica, in memory and in the pool's replica meta.
pub struct Fence {
    replica: ReplicaId,
    pool: Arc<Pool>,
    /// Highest epoch asked for; requests of lower epochs are refused from the moment it rises.
    claimed: AtomicU64,
    /// Highest epoch known durable in the replica meta.
    persisted: AtomicU64,
    /// Serialises the read-modify-write of the replica meta. Held across the (local, bounded)
    /// pool metadata write on purpose: that write is what the waiters wait for.
    meta_write: tokio::sync::Mutex<()>,
    /// Shared by every admitted request while it runs; taken exclusively by a claim to wait
    /// for the requests of older epochs.
    gate: tokio::sync::RwLock<()>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("replica", &self.replica)
            .field("claimed", &self.claimed.load(Ordering::Acquire))
            .field("persisted", &self.persisted.load(Ordering::Acquire))
            .finish()
    }
}

impl Fence {
    /// The fence of `replica` in `pool`, starting at the epoch its meta holds.
    pub fn new(replica: ReplicaId, pool: Arc<Pool>, persisted_epoch: u64) -> Self {
        Self {
            replica,
            pool,
            claimed: AtomicU64::new(persisted_epoch),
            persisted: AtomicU64::new(persisted_epoch),
            meta_write: tokio::sync::Mutex::new(()),
            gate: tokio::sync::RwLock::new(()),
        }
    }

    /// A fence for the same replica in a pool imported again (the old pool instance stopped):
    /// it keeps the highest epoch either knows, so re-importing never lowers the fence.
    pub fn reimported(&self, pool: Arc<Pool>, persisted_epoch: u64) -> Self {
        let fence = Self::new(self.replica, pool, persisted_epoch);
        fence.claimed.fetch_max(self.epoch(), Ordering::SeqCst);
        fence
    }

    /// Whether this fence persists into `pool` (that very instance).
    pub fn is_in(&self, pool: &Arc<Pool>) -> bool {
        Arc::ptr_eq(&self.pool, pool)
    }

    pub fn replica(&self) -> ReplicaId {
        self.replica
    }

    /// The highest epoch claimed so far (in memory; at least what is persisted).
    pub fn epoch(&self) -> u64 {
        self.claimed.load(Ordering::Acquire)
    }

    /// Raises the fence to at least `epoch` (never lowers it); used when a pool is imported
    /// again and its meta may hold a newer epoch than this fence.
    pub fn observe_persisted(&self, epoch: u64) {
        self.claimed.fetch_max(epoch, Ordering::AcqRel);
        self.persisted.fetch_max(epoch, Ordering::AcqRel);
    }

    /// Admits one request of `epoch`: the fence is exactly `epoch` and durable. Hold the
    /// returned guard until the request is done. The fast path (already claimed and persisted)
    /// is an uncontended shared lock and two atomic loads; otherwise this claims `epoch` and
    /// waits until the claim is durable.
    pub async fn admit(&self, epoch: u64) -> Result<Admitted<'_>, FenceError> {
        loop {
            // The guard is taken before the fence is read: a claim raising the fence after
            // this read waits for the guard, and one before it is seen here.
            let guard = self.gate.read().await;
            if self.claimed.load(Ordering::SeqCst) == epoch
                && self.persisted.load(Ordering::SeqCst) >= epoch
            {
                return Ok(guard);
            }
            drop(guard);
            // Either refused, or the claim is durable now: look again (a still higher claim
            // may have come in meanwhile).
            self.claim(epoch).await?;
        }
    }

    /// Claims the replica for `epoch`: refused when a higher epoch already did; otherwise
    /// returns once requests of older epochs have finished and the fence is durably at least
    /// `epoch` (and still exactly `epoch`). Idempotent.
    pub async fn claim(&self, epoch: u64) -> Result<(), FenceError> {
        let previous = self.claimed.fetch_max(epoch, Ordering::SeqCst);
        if previous > epoch {
            return Err(self.stale(epoch));
        }
        if self.persisted.load(Ordering::SeqCst) < epoch {
            let _write = self.meta_write.lock().await;
            // Someone may have persisted it (or more) while we waited.
            if self.persisted.load(Ordering::SeqCst) < epoch {
                // Requests admitted before the fence rose may still be running: nothing of
                // this epoch runs before they are done.
                match tokio::time::timeout(DRAIN_TIMEOUT, self.gate.write()).await {
                    Ok(drained) => drop(drained),
                    Err(_) => {
                        return Err(FenceError::Draining {
                            replica: self.replica,
                            after: DRAIN_TIMEOUT,
                        });
                    }
                }
                self.persist(|meta| {
                    let changed = meta.epoch < epoch;
                    meta.epoch = meta.epoch.max(epoch);
                    changed
                })
                .await?;
                self.persisted.fetch_max(epoch, Ordering::SeqCst);
                tracing::info!(replica = %self.replica, epoch, "replica claimed");
            }
        }
        // A higher claim may have arrived while this one was being persisted.
        if self.claimed.load(Ordering::SeqCst) != epoch {
            return Err(self.stale(epoch));
        }
        Ok(())
    }

    /// Stamps a membership generation into the replica meta; never lowers it. Returns the meta
    /// as stored afterwards.
    pub async fn raise_generation(&self, generation: u64) -> Result<ReplicaMeta, FenceError> {
        let _write = self.meta_write.lock().await;
        self.persist(|meta| {
            let changed = meta.generation < generation;
            meta.generation = meta.generation.max(generation);
            changed
        })
        .await
    }

    /// Reads the replica meta, applies `change`, and writes it back if it changed. Called with
    /// `meta_write` held.
    async fn persist(
        &self,
        change: impl FnOnce(&mut ReplicaMeta) -> bool,
    ) -> Result<ReplicaMeta, FenceError> {
        let failed = |e: trireme_pool::PoolError| FenceError::Persist {
            replica: self.replica,
            reason: e.to_string(),
        };
        let mut meta = self.pool.replica_info(self.replica).map_err(failed)?.meta;
        if change(&mut meta) {
            self.pool.set_replica_meta(self.replica, meta).await.map_err(failed)?;
        }
        Ok(meta)
    }

    fn stale(&self, epoch: u64) -> FenceError {
        FenceError::Stale { replica: self.replica, epoch, fence: self.epoch() }
    }
}

#[cfg(test)]
mod tests {
    use trireme_pool::CreateOptions;
    use trireme_types::ByteSize;

    use super::*;

    async fn pool_with_replica(dir: &std::path::Path) -> (Arc<Pool>, ReplicaId) {
        let mut opts = CreateOptions::new("p");
        opts.size = Some(ByteSize::mib(64));
        let pool = Pool::create(&dir.join("disk.img"), opts).await.unwrap();
        let id = ReplicaId::new_random();
        pool.create_replica(id, ByteSize::mib(4), true, ReplicaMeta::default()).await.unwrap();
        (pool, id)
    }

    #[tokio::test]
    async fn claims_rise_persist_and_refuse_lower_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, id) = pool_with_replica(dir.path()).await;
        let fence = Fence::new(id, Arc::clone(&pool), 0);
        drop(fence.admit(0).await.unwrap());
        fence.claim(3).await.unwrap();
        assert_eq!(pool.replica_info(id).unwrap().meta.epoch, 3, "claim not persisted");
        drop(fence.admit(3).await.unwrap());
        // Epoch 2 is stale, and so is 3 once 5 claimed.
        assert!(matches!(fence.admit(2).await, Err(FenceError::Stale { fence: 3, .. })));
        fence.claim(5).await.unwrap();
        assert!(matches!(fence.admit(3).await, Err(FenceError::Stale { fence: 5, .. })));
        assert_eq!(fence.epoch(), 5);
        // Generation stamping keeps the epoch and never lowers.
        assert_eq!(fence.raise_generation(4).await.unwrap().generation, 4);
        assert_eq!(fence.raise_generation(2).await.unwrap().generation, 4);
        let meta = pool.replica_info(id).unwrap().meta;
        assert_eq!((meta.epoch, meta.generation), (5, 4));

        // The fence survives a reimport of the pool.
        pool.close().await.unwrap();
        drop(fence);
        drop(pool);
        let pool = Pool::import(&dir.path().join("disk.img")).await.unwrap();
        let meta = pool.replica_info(id).unwrap().meta;
        assert_eq!((meta.epoch, meta.generation), (5, 4));
        let fence = Fence::new(id, Arc::clone(&pool), meta.epoch);
        assert!(matches!(fence.admit(3).await, Err(FenceError::Stale { .. })));
        drop(fence.admit(5).await.unwrap());
        pool.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_claim_waits_for_requests_of_the_older_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, id) = pool_with_replica(dir.path()).await;
        let fence = Arc::new(Fence::new(id, Arc::clone(&pool), 1));
        let old_request = fence.admit(1).await.unwrap();
        let f = Arc::clone(&fence);
        let claim = tokio::spawn(async move { f.claim(2).await });
        // The fence rises at once...
        tokio::time::timeout(Duration::from_secs(10), async {
            while fence.epoch() != 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        // ...but the claim completes only once the request admitted before is done.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!claim.is_finished(), "the claim did not wait for an older request");
        drop(old_request);
        tokio::time::timeout(Duration::from_secs(10), claim).await.unwrap().unwrap().unwrap();
        assert!(matches!(fence.admit(1).await, Err(FenceError::Stale { .. })));
        drop(fence.admit(2).await.unwrap());
        pool.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_reimported_pool_gets_the_fence_and_persists_into_the_new_instance() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, id) = pool_with_replica(dir.path()).await;
        let fence = Fence::new(id, Arc::clone(&pool), 0);
        fence.claim(4).await.unwrap();
        pool.close().await.unwrap();
        let again = Pool::import(&dir.path().join("disk.img")).await.unwrap();
        let moved =
            fence.reimported(Arc::clone(&again), again.replica_info(id).unwrap().meta.epoch);
        assert!(moved.is_in(&again) && !moved.is_in(&pool));
        assert_eq!(moved.epoch(), 4);
        assert!(matches!(moved.admit(3).await, Err(FenceError::Stale { .. })));
        moved.claim(6).await.unwrap();
        assert_eq!(again.replica_info(id).unwrap().meta.epoch, 6);
        again.close().await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_claims_leave_the_highest() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, id) = pool_with_replica(dir.path()).await;
        let fence = Arc::new(Fence::new(id, Arc::clone(&pool), 0));
        let claims = (1..=8u64).map(|e| {
            let f = Arc::clone(&fence);
            tokio::spawn(async move { (e, f.claim(e).await) })
        });
        let results = futures::future::join_all(claims).await;
        for r in results {
            let (e, r) = r.unwrap();
            if e == 8 {
                r.unwrap();
            }
        }
        assert_eq!(fence.epoch(), 8);
        assert_eq!(pool.replica_info(id).unwrap().meta.epoch, 8);
        pool.close().await.unwrap();
    }
}
