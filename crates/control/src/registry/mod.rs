//! The registry: every node, pool, volume (with its replicas and nexus) as a persisted spec
//! plus what was last observed on the engines.
//!
//! ```text
//!   REST / gRPC ──> Registry ── spec ──> store (write first) ──> in-memory cache
//!                      ▲
//!   reconciler ── observations (ListPools/ListReplicas/ListNexuses per node)
//! ```
//!
//! The store is the truth for specs; the cache mirrors it (one control instance per store for
//! now) and holds observations, which are never persisted. Locks: `state` is a short-held
//! `parking_lot` lock never held across an await; operations on one volume are serialised by a
//! per-volume async lock (held across engine calls), and creations by `create_lock` so that two
//! creates cannot both spend the same free space.
//!
//! Every change to a volume record is a read-modify-write of the cached record through
//! [`Registry::update_volume`], serialised per volume by a second, short lock held only across
//! the store commit. Two writers exist for one volume at once by design: an operation (holding
//! the operation lock, e.g. creating the nexus) and the nexus itself recording its children
//! over gRPC, which must never wait for the operation — CreateNexus and AddChild do not answer
//! until the nexus has recorded its membership, so waiting would deadlock.

pub mod membership;
pub mod nodes;
pub mod pools;
pub mod records;
pub mod replicas;
pub mod view;
pub mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use trireme_rpc as rpc;
use trireme_store::Store;
use trireme_types::{NodeId, PoolId, ReplicaId, VolumeId};

pub use records::RecordError;
use records::{DirtyRecord, NodeRecord, PoolRecord, VolumeRecord};

use crate::ControlError;
use crate::engine_client::Engines;
use crate::events::EventLog;

/// A node as known to control: its persisted record and its liveness.
#[derive(Debug, Clone)]
pub struct NodeEntry {
    pub record: NodeRecord,
    pub last_seen: Option<Instant>,
    pub last_seen_ms: u64,
    pub online: bool,
}

#[cfg(test)]
impl NodeEntry {
    /// A registered node for unit tests: endpoints `<id>:7500` (gRPC) and `<id>:10809` (NBD).
    pub(crate) fn for_test(id: &NodeId, online: bool) -> Self {
        Self {
            record: records::NodeRecord {
                version: records::RECORD_VERSION,
                id: id.clone(),
                grpc_endpoint: format!("{id}:7500"),
                nbd_endpoint: format!("{id}:10809"),
                engine_version: "test".into(),
                cordoned: false,
                draining: false,
            },
            last_seen: None,
            last_seen_ms: 0,
            online,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PoolEntry {
    pub record: PoolRecord,
    /// The pool as its engine last reported it; `None` when not observed (yet).
    pub observed: Option<rpc::Pool>,
    /// Why the last attempt to create or import it failed, shown until one succeeds.
    pub error: Option<String>,
}

/// What one node's engine last reported.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub pools: HashMap<String, rpc::Pool>,
    pub replicas: HashMap<ReplicaId, rpc::Replica>,
    pub nexuses: HashMap<VolumeId, rpc::Nexus>,
}

#[derive(Debug, Default)]
pub struct State {
    pub nodes: BTreeMap<NodeId, NodeEntry>,
    pub pools: BTreeMap<PoolId, PoolEntry>,
    pub volumes: BTreeMap<VolumeId, VolumeRecord>,
    pub observed: HashMap<NodeId, Observation>,
    /// Volumes this store deleted, and when (ms since the epoch).
    pub tombstones: HashMap<VolumeId, u64>,
    /// Bumped whenever an engine call's result is written into a node's observation, so that
    /// a listing that started before it cannot overwrite it with older data.
    pub epochs: HashMap<NodeId, u64>,
    /// The engine's refusal of a volume's last nexus creation, for publish to report.
    pub nexus_errors: HashMap<VolumeId, crate::engine_client::EngineError>,
    /// Why a published volume has no nexus although its node is up (e.g. the replicas it
    /// waits for), set by the reconciler; the volume shows `faulted` with this message.
    pub volume_messages: HashMap<VolumeId, String>,
}

impl State {
    /// A node's observation, for recording the result of a call that changed the engine.
    pub fn touch(&mut self, node: &NodeId) -> &mut Observation {
        *self.epochs.entry(node.clone()).or_default() += 1;
        self.observed.entry(node.clone()).or_default()
    }

    /// Like [`State::touch`], for a node that may not have been observed.
    pub fn touched(&mut self, node: &NodeId) -> Option<&mut Observation> {
        *self.epochs.entry(node.clone()).or_default() += 1;
        self.observed.get_mut(node)
    }

    pub fn epoch(&self, node: &NodeId) -> u64 {
        self.epochs.get(node).copied().unwrap_or(0)
    }

    pub fn node_online(&self, id: &NodeId) -> bool {
        self.nodes.get(id).is_some_and(|n| n.online)
    }

    /// The engine endpoint of an online node.
    pub fn online_endpoint(&self, id: &NodeId) -> Option<String> {
        self.nodes.get(id).filter(|n| n.online).map(|n| n.record.grpc_endpoint.clone())
    }

    /// The replica (and its owner) with this id, if a volume owns it.
    pub fn replica_owner(&self, id: &ReplicaId) -> Option<&VolumeRecord> {
        self.volumes.values().find(|v| v.owns_replica(id))
    }
}

pub struct Registry {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) state: parking_lot::RwLock<State>,
    pub(crate) events: EventLog,
    pub(crate) engines: Engines,
    pub(crate) node_timeout: Duration,
    create_lock: tokio::sync::Mutex<()>,
    volume_locks: parking_lot::Mutex<HashMap<VolumeId, Arc<tokio::sync::Mutex<()>>>>,
    /// Serialise read-modify-write commits of one volume's record (see the module doc).
    record_locks: parking_lot::Mutex<HashMap<VolumeId, Arc<tokio::sync::Mutex<()>>>>,
    wake: Notify,
    /// Bumped after every reconcile pass, so waiters (publish) re-check observations.
    passes: watch::Sender<u64>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("store", &self.store).finish_non_exhaustive()
    }
}

impl Registry {
    /// Loads every spec from the store. Nodes start offline until they heartbeat.
    pub async fn load(
        store: Arc<dyn Store>,
        node_timeout: Duration,
        engine_timeout: Duration,
    ) -> Result<Self, ControlError> {
        let mut state = State::default();
        for (key, v) in store.list(records::NODES).await? {
            let record: NodeRecord = records::decode(&key, &v.value)?;
            state.nodes.insert(
                record.id.clone(),
                NodeEntry { record, last_seen: None, last_seen_ms: 0, online: false },
            );
        }
        for (key, v) in store.list(records::POOLS).await? {
            let record: PoolRecord = records::decode(&key, &v.value)?;
            state
                .pools
                .insert(record.id.clone(), PoolEntry { record, observed: None, error: None });
        }
        for (key, v) in store.list(records::VOLUMES).await? {
            let record: VolumeRecord = records::decode(&key, &v.value)?;
            state.volumes.insert(record.id, record);
        }
        for (key, v) in store.list(records::TOMBSTONES).await? {
            if let Ok(id) = key.trim_start_matches(records::TOMBSTONES).parse::<VolumeId>() {
                let tomb: records::TombstoneRecord = records::decode(&key, &v.value)?;
                state.tombstones.insert(id, tomb.deleted_ms);
            }
        }
        let events = EventLog::load(store.clone(), crate::events::RETAINED).await?;
        Ok(Self {
            store,
            state: parking_lot::RwLock::new(state),
            events,
            engines: Engines::new(engine_timeout),
            node_timeout,
            create_lock: tokio::sync::Mutex::new(()),
            volume_locks: parking_lot::Mutex::new(HashMap::new()),
            record_locks: parking_lot::Mutex::new(HashMap::new()),
            wake: Notify::new(),
            passes: watch::channel(0).0,
        })
    }

    pub fn events(&self) -> &EventLog {
        &self.events
    }

    /// Asks the reconciler for a pass now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }

    pub(crate) fn pass_done(&self) {
        self.passes.send_modify(|n| *n += 1);
    }

    pub(crate) fn subscribe_passes(&self) -> watch::Receiver<u64> {
        self.passes.subscribe()
    }

    pub(crate) async fn lock_create(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.create_lock.lock().await
    }

    pub(crate) fn try_lock_create(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, ()>, tokio::sync::TryLockError> {
        self.create_lock.try_lock()
    }

    /// Serialises mutations of one volume (REST and reconciler alike).
    pub(crate) async fn lock_volume(&self, id: VolumeId) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self.volume_locks.lock().entry(id).or_default().clone();
        lock.lock_owned().await
    }

    fn forget_volume_lock(&self, id: &VolumeId) {
        self.volume_locks.lock().remove(id);
        self.record_locks.lock().remove(id);
    }

    async fn lock_record(&self, id: VolumeId) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self.record_locks.lock().entry(id).or_default().clone();
        lock.lock_owned().await
    }

    /// Changes one volume's record in one store commit: `change` edits the current record
    /// (it may refuse with an error, and then nothing is written); the result is persisted,
    /// then mirrored in the cache. Returns the record as stored and what `change` returned.
    /// Callers never write back a copy they read earlier, so the nexus's own records
    /// (children, generation) and control's (phase, publish, replicas) never overwrite each
    /// other.
    pub async fn update_volume<T>(
        &self,
        id: VolumeId,
        change: impl FnOnce(&mut VolumeRecord) -> Result<T, ControlError>,
    ) -> Result<(VolumeRecord, T), ControlError> {
        let _record = self.lock_record(id).await;
        let mut record = self
            .volume_record(&id)
            .ok_or_else(|| ControlError::not_found("volume", id.to_string()))?;
        let out = change(&mut record)?;
        let key = records::volume_key(&id);
        self.store.put(&key, records::encode(&key, &record)?).await?;
        self.state.write().volumes.insert(id, record.clone());
        Ok((record, out))
    }

    /// The volume's dirty-region log, if any region is marked.
    pub(crate) async fn dirty_log(
        &self,
        id: &VolumeId,
    ) -> Result<Option<DirtyRecord>, ControlError> {
        let key = records::dirty_key(id);
        match self.store.get(&key).await? {
            Some(v) => Ok(Some(records::decode(&key, &v.value)?)),
            None => Ok(None),
        }
    }

    /// Forgets tombstones older than `retention`, at most `batch` per call. Without this the
    /// store would keep one for every volume ever deleted (CI clusters delete thousands).
    /// A node that comes back after the retention with a replica of such a volume keeps it:
    /// the orphan collector leaves replicas of volumes it does not know alone.
    pub(crate) async fn expire_tombstones(
        &self,
        now_ms: u64,
        retention: Duration,
        batch: usize,
    ) -> Result<usize, ControlError> {
        let cutoff =
            now_ms.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        let old: Vec<VolumeId> = self
            .state
            .read()
            .tombstones
            .iter()
            .filter(|&(_, &deleted)| deleted < cutoff)
            .map(|(id, _)| *id)
            .take(batch)
            .collect();
        if old.is_empty() {
            return Ok(0);
        }
        let txn = old
            .iter()
            .fold(trireme_store::Txn::new(), |t, id| t.delete(records::tombstone_key(id)));
        self.store.txn(txn).await?;
        let mut st = self.state.write();
        for id in &old {
            st.tombstones.remove(id);
        }
        Ok(old.len())
    }

    pub(crate) async fn remove_volume(&self, record: &VolumeRecord) -> Result<(), ControlError> {
        let tomb_key = records::tombstone_key(&record.id);
        let tomb = records::TombstoneRecord {
            version: records::RECORD_VERSION,
            deleted_ms: crate::events::now_ms(),
        };
        let txn = trireme_store::Txn::new()
            .delete(records::volume_key(&record.id))
            .delete(records::volume_name_key(&record.name))
            .delete(records::dirty_key(&record.id))
            .put(tomb_key.clone(), records::encode(&tomb_key, &tomb)?);
        self.store.txn(txn).await?;
        let mut st = self.state.write();
        st.volumes.remove(&record.id);
        st.volume_messages.remove(&record.id);
        st.tombstones.insert(record.id, tomb.deleted_ms);
        drop(st);
        self.forget_volume_lock(&record.id);
        Ok(())
    }

    pub(crate) async fn save_pool(&self, record: &PoolRecord) -> Result<(), ControlError> {
        let key = records::pool_key(&record.id);
        self.store.put(&key, records::encode(&key, record)?).await?;
        let mut st = self.state.write();
        let (observed, error) = st
            .pools
            .get(&record.id)
            .map(|p| (p.observed.clone(), p.error.clone()))
            .unwrap_or_default();
        st.pools.insert(record.id.clone(), PoolEntry { record: record.clone(), observed, error });
        Ok(())
    }

    pub(crate) async fn save_node(&self, record: &NodeRecord) -> Result<(), ControlError> {
        let key = records::node_key(&record.id);
        self.store.put(&key, records::encode(&key, record)?).await?;
        Ok(())
    }

    pub fn volume_record(&self, id: &VolumeId) -> Option<VolumeRecord> {
        self.state.read().volumes.get(id).cloned()
    }
}

#[cfg(test)]
mod tombstone_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn tombstones_expire_after_the_retention_and_stay_expired() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(trireme_store::RedbStore::open(dir.path().join("s.redb")).await.unwrap());
        let (old, recent) = (VolumeId::new_random(), VolumeId::new_random());
        for (id, deleted_ms) in [(old, 1_000), (recent, 10_000)] {
            let key = records::tombstone_key(&id);
            let tomb = records::TombstoneRecord { version: records::RECORD_VERSION, deleted_ms };
            store.put(&key, records::encode(&key, &tomb).unwrap()).await.unwrap();
        }
        let secs = Duration::from_secs(10);
        let reg = Registry::load(Arc::clone(&store), secs, secs).await.unwrap();
        assert_eq!(reg.state.read().tombstones.len(), 2);

        // Kept 5 s: at 10.5 s, the one deleted at 1 s goes, the one deleted at 10 s stays.
        let gone = reg.expire_tombstones(10_500, Duration::from_secs(5), 100).await.unwrap();
        assert_eq!(gone, 1);
        let kept: Vec<VolumeId> = reg.state.read().tombstones.keys().copied().collect();
        assert_eq!(kept, vec![recent]);
        assert!(store.get(&records::tombstone_key(&old)).await.unwrap().is_none());
        let reloaded = Registry::load(store, secs, secs).await.unwrap();
        assert_eq!(reloaded.state.read().tombstones.len(), 1);
    }
}
