//! The pools this engine owns, and the small state file that lets a restarted engine find them.
//!
//! `state-dir/pools.json` lists each pool's name and disk. It is rewritten atomically (temp
//! file, fsync, rename, fsync of the directory) after every change, so a crash leaves either the
//! old or the new list. On start every listed pool is imported; one that fails stays listed as
//! faulted with its error (the disk may come back), rather than being dropped or stopping the
//! engine.
//!
//! Slow operations (format, import, close) run without holding the map's lock: the pool's slot
//! is marked `Busy` meanwhile, and a concurrent operation on the same pool is told to retry.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use trireme_pool::{CreateOptions, DiskStatsSnapshot, Pool, PoolError, PoolInfo, ReplicaInfo};
use trireme_types::{ByteSize, PoolId, ReplicaId};

use crate::error::EngineError;

const STATE_FILE: &str = "pools.json";
const STATE_VERSION: u32 = 1;

/// The persisted list of pools. Versioned so a later engine can migrate it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    pools: Vec<PoolRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PoolRecord {
    name: PoolId,
    disk: PathBuf,
}

enum Slot {
    Online(Arc<Pool>),
    Faulted {
        disk: PathBuf,
        error: String,
    },
    /// An operation is in flight; `persisted` says whether the pool is in the state file.
    Busy {
        disk: PathBuf,
        persisted: bool,
    },
}

impl Slot {
    fn disk(&self) -> &Path {
        match self {
            Self::Online(p) => p.disk(),
            Self::Faulted { disk, .. } | Self::Busy { disk, .. } => disk,
        }
    }

    fn persisted(&self) -> bool {
        match self {
            Self::Online(_) | Self::Faulted { .. } => true,
            Self::Busy { persisted, .. } => *persisted,
        }
    }
}

/// A pool as listed: its disk, and its description or why it is not usable.
#[derive(Debug, Clone)]
pub struct PoolView {
    pub name: PoolId,
    pub disk: PathBuf,
    pub status: PoolStatus,
    /// The disk's counters while the pool is online.
    pub disk_stats: Option<DiskStatsSnapshot>,
}

#[derive(Debug, Clone)]
pub enum PoolStatus {
    Online(PoolInfo),
    Faulted { error: String },
    Busy,
}

pub struct Pools {
    state_path: PathBuf,
    slots: Arc<Mutex<BTreeMap<PoolId, Slot>>>,
    /// Bumped under `slots` for every snapshot written, so an older snapshot never overwrites
    /// a newer one when two writes race.
    seq: AtomicU64,
    /// The sequence number of the snapshot on disk; held while writing the file.
    written: Arc<Mutex<u64>>,
}

impl Pools {
    /// Reads the state file in `state_dir` and imports every pool it lists.
    pub async fn load(state_dir: &Path) -> Result<Self, EngineError> {
        let state_path = state_dir.join(STATE_FILE);
        let records = read_state(&state_path).await?;
        let mut slots = BTreeMap::new();
        for r in records {
            let slot = match Pool::import(&r.disk).await {
                Ok(pool) if pool.info().name == r.name.as_str() => {
                    tracing::info!(pool = %r.name, disk = %r.disk.display(), "pool imported");
                    Slot::Online(pool)
                }
                Ok(pool) => {
                    let found = pool.info().name;
                    if let Err(e) = pool.close().await {
                        tracing::warn!(disk = %r.disk.display(), error = %e, "closing a foreign pool failed");
                    }
                    Slot::Faulted {
                        disk: r.disk,
                        error: format!("the disk now holds pool {found:?}"),
                    }
                }
                Err(e) => {
                    tracing::error!(pool = %r.name, disk = %r.disk.display(), error = %e, "pool import failed");
                    Slot::Faulted { disk: r.disk, error: e.to_string() }
                }
            };
            slots.insert(r.name, slot);
        }
        Ok(Self {
            state_path,
            slots: Arc::new(Mutex::new(slots)),
            seq: AtomicU64::new(0),
            written: Arc::new(Mutex::new(0)),
        })
    }

    /// Creates the pool, or imports it when `disk` already holds a pool of this name.
    /// Idempotent: an online pool of this name on this disk is returned as is.
    pub async fn create(
        &self,
        name: &PoolId,
        disk: &Path,
        size: Option<ByteSize>,
        cluster_size: ByteSize,
    ) -> Result<PoolInfo, EngineError> {
        let persisted = {
            let mut slots = self.slots.lock();
            if let Some(slot) = slots.get(name) {
                if slot.disk() != disk {
                    return Err(EngineError::PoolExists {
                        pool: name.clone(),
                        disk: slot.disk().to_owned(),
                    });
                }
                match slot {
                    // Idempotent: the pool is already there.
                    Slot::Online(p) => return Ok(p.info()),
                    Slot::Busy { .. } => return Err(EngineError::PoolBusy(name.clone())),
                    // A faulted pool is retried: its disk may be back.
                    Slot::Faulted { .. } => {}
                }
            } else if let Some((other, _)) = slots.iter().find(|(_, s)| s.disk() == disk) {
                return Err(EngineError::DiskInUse { disk: disk.to_owned(), pool: other.clone() });
            }
            let persisted = slots.get(name).is_some_and(Slot::persisted);
            slots.insert(name.clone(), Slot::Busy { disk: disk.to_owned(), persisted });
            persisted
        };

        // Runs to the end even if the caller goes away (a deadline drops the gRPC handler):
        // cut short, it would leave the slot Busy, refusing every retry until a restart.
        let slots = Arc::clone(&self.slots);
        let (task_name, task_disk) = (name.clone(), disk.to_owned());
        let settle = tokio::spawn(async move {
            let result = open_or_create(&task_name, &task_disk, size, cluster_size).await;
            let mut slots = slots.lock();
            match &result {
                Ok(pool) => {
                    slots.insert(task_name, Slot::Online(Arc::clone(pool)));
                }
                Err(e) if persisted => {
                    slots
                        .insert(task_name, Slot::Faulted { disk: task_disk, error: e.to_string() });
                }
                Err(_) => {
                    slots.remove(&task_name);
                }
            }
            result
        });
        let pool = settle.await.map_err(|e| EngineError::task(name, &e))??;
        tracing::info!(pool = %name, disk = %disk.display(), "pool online");
        self.persist().await?;
        Ok(pool.info())
    }

    /// Closes the pool and forgets it. Idempotent: an unknown pool is already destroyed.
    pub async fn destroy(&self, name: &PoolId) -> Result<(), EngineError> {
        let pool = {
            let mut slots = self.slots.lock();
            let pool = match slots.get(name) {
                None => return Ok(()),
                Some(Slot::Busy { .. }) => return Err(EngineError::PoolBusy(name.clone())),
                Some(Slot::Faulted { .. }) => None,
                Some(Slot::Online(pool)) => {
                    let replicas = pool.info().replica_count;
                    if replicas > 0 {
                        return Err(EngineError::PoolNotEmpty { pool: name.clone(), replicas });
                    }
                    Some(Arc::clone(pool))
                }
            };
            match &pool {
                Some(p) => {
                    let disk = p.disk().to_owned();
                    slots.insert(name.clone(), Slot::Busy { disk, persisted: true });
                }
                None => {
                    slots.remove(name);
                }
            }
            pool
        };
        if let Some(pool) = pool {
            // Runs to the end even if the caller goes away, like creation, so the slot never
            // stays Busy. The pool is forgotten even if closing fails: what was acknowledged
            // is already durable, and keeping a half-closed pool would serve nothing.
            let slots = Arc::clone(&self.slots);
            let task_name = name.clone();
            let settle = tokio::spawn(async move {
                if let Err(e) = pool.close().await {
                    tracing::warn!(pool = %task_name, error = %e, "closing the pool failed");
                }
                slots.lock().remove(&task_name);
            });
            settle.await.map_err(|e| EngineError::task(name, &e))?;
        }
        tracing::info!(pool = %name, "pool destroyed");
        self.persist().await
    }

    /// The online pool `name`.
    pub fn get(&self, name: &PoolId) -> Result<Arc<Pool>, EngineError> {
        match self.slots.lock().get(name) {
            Some(Slot::Online(p)) => Ok(Arc::clone(p)),
            Some(Slot::Faulted { error, .. }) => {
                Err(EngineError::PoolFaulted { pool: name.clone(), error: error.clone() })
            }
            Some(Slot::Busy { .. }) => Err(EngineError::PoolBusy(name.clone())),
            None => Err(EngineError::PoolNotFound(name.clone())),
        }
    }

    /// Marks an online pool faulted after it stopped itself (a failed metadata write): it
    /// serves nothing more until `create` imports it again.
    pub fn mark_failed(&self, name: &PoolId, error: &PoolError) {
        let mut slots = self.slots.lock();
        if let Some(slot @ Slot::Online(_)) = slots.get_mut(name) {
            let disk = slot.disk().to_owned();
            tracing::error!(pool = %name, %error, "pool failed; marked faulted until imported again");
            *slot = Slot::Faulted { disk, error: error.to_string() };
        }
    }

    pub fn online(&self) -> Vec<(PoolId, Arc<Pool>)> {
        self.slots
            .lock()
            .iter()
            .filter_map(|(n, s)| match s {
                Slot::Online(p) => Some((n.clone(), Arc::clone(p))),
                _ => None,
            })
            .collect()
    }

    pub fn list(&self) -> Vec<PoolView> {
        // Clone under the lock, describe after: `info()` takes the pool's own lock.
        let slots: Vec<_> = self
            .slots
            .lock()
            .iter()
            .map(|(n, s)| {
                let status = match s {
                    Slot::Online(p) => Ok(Arc::clone(p)),
                    Slot::Faulted { error, .. } => {
                        Err(PoolStatus::Faulted { error: error.clone() })
                    }
                    Slot::Busy { .. } => Err(PoolStatus::Busy),
                };
                (n.clone(), s.disk().to_owned(), status)
            })
            .collect();
        slots
            .into_iter()
            .map(|(name, disk, status)| PoolView {
                name,
                disk,
                disk_stats: status.as_ref().ok().map(|p| p.disk_stats()),
                status: match status {
                    Ok(p) => PoolStatus::Online(p.info()),
                    Err(s) => s,
                },
            })
            .collect()
    }

    /// The pool holding replica `id`, if any online pool does.
    pub fn find_replica(&self, id: ReplicaId) -> Option<(PoolId, Arc<Pool>, ReplicaInfo)> {
        self.online().into_iter().find_map(|(name, pool)| {
            let info = pool.replica_info(id).ok()?;
            Some((name, pool, info))
        })
    }

    /// Closes every online pool (at shutdown), concurrently.
    pub async fn close_all(&self) {
        let pools = self.online();
        let closes = pools.into_iter().map(|(name, pool)| async move {
            match pool.close().await {
                Ok(()) => tracing::info!(pool = %name, "pool closed"),
                Err(e) => tracing::error!(pool = %name, error = %e, "closing the pool failed"),
            }
        });
        futures::future::join_all(closes).await;
    }

    /// Writes the current list of pools to the state file.
    async fn persist(&self) -> Result<(), EngineError> {
        let (seq, state) = {
            let slots = self.slots.lock();
            let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
            let pools = slots
                .iter()
                .filter(|(_, s)| s.persisted())
                .map(|(n, s)| PoolRecord { name: n.clone(), disk: s.disk().to_owned() })
                .collect();
            (seq, StateFile { version: STATE_VERSION, pools })
        };
        let path = self.state_path.clone();
        let written = Arc::clone(&self.written);
        let result = tokio::task::spawn_blocking(move || {
            let mut last = written.lock();
            if *last >= seq {
                return Ok(()); // a newer snapshot is already on disk
            }
            write_atomically(&path, &state)?;
            *last = seq;
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        result.map_err(|source| EngineError::StateFile { path: self.state_path.clone(), source })
    }
}

async fn open_or_create(
    name: &PoolId,
    disk: &Path,
    size: Option<ByteSize>,
    cluster_size: ByteSize,
) -> Result<Arc<Pool>, EngineError> {
    let exists = tokio::fs::try_exists(disk).await.unwrap_or(false);
    if !exists && size.is_none() {
        return Err(EngineError::DiskMissing { disk: disk.to_owned() });
    }
    let opts = CreateOptions { name: name.to_string(), cluster_size, size };
    match Pool::create(disk, opts).await {
        Ok(pool) => Ok(pool),
        Err(PoolError::AlreadyFormatted { name: found, .. }) if found == name.as_str() => {
            Pool::import(disk).await.map_err(|e| EngineError::pool(name, e))
        }
        Err(PoolError::AlreadyFormatted { name: found, .. }) => {
            Err(EngineError::DiskHoldsOtherPool { disk: disk.to_owned(), found })
        }
        Err(e) => Err(EngineError::pool(name, e)),
    }
}

async fn read_state(path: &Path) -> Result<Vec<PoolRecord>, EngineError> {
    let bad = |source| EngineError::StateFile { path: path.to_owned(), source };
    let bytes = match tokio::fs::read(path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(bad(e)),
    };
    let state: StateFile = serde_json::from_slice(&bytes)
        .map_err(|e| bad(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    if state.version != STATE_VERSION {
        return Err(bad(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "state file version {} is not supported (expected {STATE_VERSION})",
                state.version
            ),
        )));
    }
    Ok(state.pools)
}

/// Replaces `path` with `state` so that a crash leaves either the old or the new file.
fn write_atomically(path: &Path, state: &StateFile) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The rename is durable only once the directory is.
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_file_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let state = StateFile {
            version: STATE_VERSION,
            pools: vec![PoolRecord { name: PoolId::new("p1").unwrap(), disk: "/d/p1.img".into() }],
        };
        write_atomically(&path, &state).unwrap();
        let back: StateFile = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, state);
        assert!(!path.with_extension("json.tmp").exists());
    }

    #[tokio::test]
    async fn a_missing_state_file_means_no_pools_and_a_bad_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let pools = Pools::load(dir.path()).await.unwrap();
        assert!(pools.list().is_empty());
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        assert!(matches!(Pools::load(dir.path()).await, Err(EngineError::StateFile { .. })));
        std::fs::write(dir.path().join(STATE_FILE), br#"{"version":99,"pools":[]}"#).unwrap();
        assert!(matches!(Pools::load(dir.path()).await, Err(EngineError::StateFile { .. })));
    }

    #[tokio::test]
    async fn a_pool_that_fails_to_import_is_listed_as_faulted() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile {
            version: STATE_VERSION,
            pools: vec![PoolRecord {
                name: PoolId::new("gone").unwrap(),
                disk: dir.path().join("missing.img"),
            }],
        };
        write_atomically(&dir.path().join(STATE_FILE), &state).unwrap();
        let pools = Pools::load(dir.path()).await.unwrap();
        let list = pools.list();
        assert_eq!(list.len(), 1);
        assert!(matches!(list[0].status, PoolStatus::Faulted { .. }));
        assert!(matches!(
            pools.get(&PoolId::new("gone").unwrap()),
            Err(EngineError::PoolFaulted { .. })
        ));
        // Destroying a faulted pool forgets it.
        pools.destroy(&PoolId::new("gone").unwrap()).await.unwrap();
        assert!(pools.list().is_empty());
        let back = read_state(&dir.path().join(STATE_FILE)).await.unwrap();
        assert!(back.is_empty());
    }

    /// Retries `op` while the pool is busy, for at most 10 s.
    async fn until_not_busy<T>(
        mut op: impl AsyncFnMut() -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match op().await {
                Err(EngineError::PoolBusy(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                other => return other,
            }
        }
    }

    /// A caller that gives up (a gRPC deadline drops its handler) leaves no pool Busy for
    /// good: the operation finishes on its own, and a retry sees its outcome.
    #[tokio::test]
    async fn abandoned_create_and_destroy_still_finish() {
        let dir = tempfile::tempdir().unwrap();
        let pools = Pools::load(dir.path()).await.unwrap();
        let name = PoolId::new("p1").unwrap();
        let disk = dir.path().join("p1.img");
        let size = Some(ByteSize::mib(256));
        let cluster = ByteSize::mib(1);
        // Polled once, then dropped mid-format.
        let abandoned = pools.create(&name, &disk, size, cluster);
        let r = tokio::time::timeout(std::time::Duration::from_nanos(1), abandoned).await;
        assert!(r.is_err(), "creation should still be running when abandoned");
        let info =
            until_not_busy(async || pools.create(&name, &disk, size, cluster).await).await.unwrap();
        assert_eq!(info.name, name.as_str());

        let abandoned = pools.destroy(&name);
        let _ = tokio::time::timeout(std::time::Duration::from_nanos(1), abandoned).await;
        until_not_busy(async || pools.destroy(&name).await).await.unwrap();
        assert!(matches!(pools.get(&name), Err(EngineError::PoolNotFound(_))));
    }
}
