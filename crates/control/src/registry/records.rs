//! The persisted specs: what control writes into the store, as versioned JSON.
//!
//! Every record carries `"version"`; [`decode`] refuses versions it does not know (a newer
//! control wrote them) and is where migrations from older versions will go. The tests decode
//! literal version-1 documents so that a later change that breaks them cannot pass unnoticed.
//!
//! Keys (every value is one of the records below, as JSON with `"version"`):
//! ```text
//!   nodes/<node id>          NodeRecord
//!   pools/<pool id>          PoolRecord
//!   volumes/<volume uuid>    VolumeRecord
//!   volume-names/<name>      NameRecord (makes names unique through the store itself)
//!   tombstones/<volume uuid> TombstoneRecord (lets the orphan collector tell a replica of a
//!                            deleted volume from one this store never knew)
//!   dirty/<volume uuid>      DirtyRecord (the dirty-region log; its own key so that MarkDirty
//!                            does not rewrite the volume)
//!   events/<seq, 20 digits>  EventRecord
//! ```
//!
//! Replication added fields to [`VolumeRecord`] without a new version: each is
//! `#[serde(default)]`, so a version-1 document written before them decodes as a volume whose
//! replicas are all current (no entry in `children` means online) at epoch and generation 0.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use trireme_api::{RebuildInfo, RebuildKind};
use trireme_types::{ByteSize, FaultReason, Name, NodeId, PoolId, ReplicaId, VolumeId};

/// The version this control writes.
pub const RECORD_VERSION: u32 = 1;

pub const NODES: &str = "nodes/";
pub const POOLS: &str = "pools/";
pub const VOLUMES: &str = "volumes/";
pub const VOLUME_NAMES: &str = "volume-names/";
pub const EVENTS: &str = "events/";
pub const TOMBSTONES: &str = "tombstones/";
pub const DIRTY: &str = "dirty/";

/// Why a stored record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("stored record {key} is not valid JSON for its kind: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "stored record {key} has version {version}, newer than this control knows ({RECORD_VERSION}); upgrade control"
    )]
    TooNew { key: String, version: u32 },
    #[error("cannot encode record {key}: {source}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Deserialize)]
struct Envelope {
    version: u32,
}

/// Decodes a stored record, migrating older versions (there are none before version 1).
pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, RecordError> {
    let env: Envelope = serde_json::from_slice(bytes)
        .map_err(|source| RecordError::Decode { key: key.to_owned(), source })?;
    if env.version > RECORD_VERSION {
        return Err(RecordError::TooNew { key: key.to_owned(), version: env.version });
    }
    serde_json::from_slice(bytes)
        .map_err(|source| RecordError::Decode { key: key.to_owned(), source })
}

pub fn encode<T: Serialize>(key: &str, record: &T) -> Result<Vec<u8>, RecordError> {
    serde_json::to_vec(record).map_err(|source| RecordError::Encode { key: key.to_owned(), source })
}

/// A node, remembered across control restarts so that its heartbeats are recognised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub version: u32,
    pub id: NodeId,
    pub grpc_endpoint: String,
    pub nbd_endpoint: String,
    pub engine_version: String,
    #[serde(default)]
    pub cordoned: bool,
    #[serde(default)]
    pub draining: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolPhase {
    /// Should exist on its node; the reconciler creates or imports it.
    Active,
    /// Being removed from its node; the record goes once the engine has let go of it.
    Deleting,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub version: u32,
    pub id: PoolId,
    pub node: NodeId,
    pub disk: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    pub phase: PoolPhase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumePhase {
    /// Replicas are placed (recorded here) but maybe not created yet; the reconciler creates
    /// them and moves on to `ready`.
    Creating,
    Ready,
    /// Being deleted: nexus, then replicas, then this record.
    Deleting,
}

/// An operation logged into the spec before it is carried out, so that a crash halfway is
/// finished by the reconciler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum PendingOp {
    /// Grow replicas, then the nexus, to `size`; then `size` becomes the spec.
    Resize { size: ByteSize },
    /// Add or remove replicas until the volume has `replica_count` of them.
    Replicas,
}

/// Where one replica of a volume lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub id: ReplicaId,
    pub pool: PoolId,
    pub node: NodeId,
}

/// A replica's membership state as its nexus last recorded it (or as control set it when it
/// added the replica). Only `RecordChildren` (the nexus's word) and control's own add/remove of
/// replicas change it; observations never do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildHealth {
    /// Holds every acknowledged write.
    Online,
    /// Missed writes; must be rebuilt (`needs`) before it serves reads again.
    Faulted,
    /// Being rebuilt; receives writes, serves no reads.
    Rebuilding,
}

/// One replica's entry in `VolumeRecord::children`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildStatusRecord {
    pub state: ChildHealth,
    /// Why it faulted (faulted children only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<FaultReason>,
    /// What a faulted or rebuilding child still needs copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs: Option<RebuildKind>,
    /// Milliseconds since the Unix epoch when it entered `state` (the replacement timer).
    #[serde(default)]
    pub since_ms: u64,
    /// The epoch of the nexus that recorded it faulted after writing to it (online or
    /// rebuilding): from then on that nexus no longer writes to it. See
    /// [`VolumeRecord::join_needs`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub out_epoch: u64,
    /// The last rebuild of this replica that finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rebuild: Option<RebuildInfo>,
}

impl ChildStatusRecord {
    /// A replica placed by control that holds nothing yet: it joins with a full rebuild.
    pub fn new_empty(now_ms: u64) -> Self {
        Self {
            state: ChildHealth::Rebuilding,
            reason: None,
            needs: Some(RebuildKind::Full),
            since_ms: now_ms,
            out_epoch: 0,
            last_rebuild: None,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub version: u32,
    pub id: VolumeId,
    pub name: Name,
    pub size: ByteSize,
    /// How many replicas the volume should have.
    pub replica_count: u8,
    pub thin: bool,
    /// The node the nexus should run on, when published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<NodeId>,
    pub replicas: Vec<ReplicaRecord>,
    pub phase: VolumePhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingOp>,
    /// The fencing epoch of the volume's latest nexus: bumped and persisted before every
    /// CreateNexus; a nexus recording with an older one is refused ("fenced").
    #[serde(default)]
    pub epoch: u64,
    /// Membership generation: bumped whenever the set of online replicas changes.
    #[serde(default)]
    pub generation: u64,
    /// Membership state per replica. A replica without an entry is online (a fresh volume's
    /// replicas are all current); entries of replicas no longer in `replicas` are dropped.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub children: BTreeMap<ReplicaId, ChildStatusRecord>,
}

impl VolumeRecord {
    /// The replica's membership state (no entry: online).
    pub fn child_health(&self, id: &ReplicaId) -> ChildHealth {
        self.children.get(id).map_or(ChildHealth::Online, |c| c.state)
    }

    /// The replicas recorded online: the ones holding every acknowledged write.
    pub fn online_replicas(&self) -> BTreeSet<ReplicaId> {
        self.replicas
            .iter()
            .filter(|r| self.child_health(&r.id) == ChildHealth::Online)
            .map(|r| r.id)
            .collect()
    }

    /// What a replica needs when (re)joining a nexus: `None` when it is current.
    pub fn child_needs(&self, id: &ReplicaId) -> Option<RebuildKind> {
        match self.children.get(id) {
            None => None,
            Some(c) if c.state == ChildHealth::Online => None,
            // A faulted child whose nexus did not say is rebuilt in full: nothing cheaper is
            // known to be safe.
            Some(c) => Some(c.needs.unwrap_or(RebuildKind::Full)),
        }
    }

    /// What a replica that is not current needs to (re)join a nexus of this volume: what its
    /// entry says — except that a replica whose last claim (`claimed`, the epoch its engine
    /// reports) is older than the nexus that recorded it out (`out_epoch`) needs a full
    /// rebuild. The nexus that recorded it faulted never claimed it, so the older nexus that
    /// did (frozen or cut off while the volume was republished) may still have been writing to
    /// it, outside the other replicas and the dirty-region log; only a full copy (which also
    /// zeroes what the source does not hold) undoes that. A replica faulted by the nexus that
    /// claimed it got no write from it after the fault: the log covers what it missed.
    /// `None` for a current replica.
    pub fn join_needs(&self, id: &ReplicaId, claimed: Option<u64>) -> Option<RebuildKind> {
        let needs = self.child_needs(id)?;
        let out = self.children.get(id).map_or(0, |c| c.out_epoch);
        match claimed {
            Some(epoch) if epoch < out => Some(RebuildKind::Full),
            _ => Some(needs),
        }
    }

    pub fn replica(&self, id: &ReplicaId) -> Option<&ReplicaRecord> {
        self.replicas.iter().find(|r| &r.id == id)
    }

    /// The size every replica and the nexus must have at least: a pending grow counts.
    pub fn target_size(&self) -> ByteSize {
        match &self.pending {
            Some(PendingOp::Resize { size }) => (*size).max(self.size),
            Some(PendingOp::Replicas) | None => self.size,
        }
    }

    pub fn owns_replica(&self, id: &ReplicaId) -> bool {
        self.replicas.iter().any(|r| &r.id == id)
    }
}

/// `dirty/<volume uuid>`: the volume's dirty-region log — regions written while some replica
/// was out, which a partial rebuild copies. Region i covers `[i * region_bytes, (i + 1) *
/// region_bytes)`; bit i is bit `i % 8` of byte `i / 8` of `regions` (hex in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyRecord {
    pub version: u32,
    pub region_bytes: u64,
    #[serde(with = "hex_bytes")]
    pub regions: Vec<u8>,
}

/// The most regions a dirty log may have (a 16 MiB bitmap), so that a malformed MarkDirty
/// cannot make control allocate without bound.
pub const MAX_DIRTY_REGIONS: u64 = 1 << 27;

impl DirtyRecord {
    pub fn new(region_bytes: u64) -> Self {
        Self { version: RECORD_VERSION, region_bytes, regions: Vec::new() }
    }

    /// Sets the given regions (indexes of `region_bytes`-sized regions). When the log was kept
    /// at another granularity (the volume grew and its region size with it), the existing bits
    /// are first carried over to the new one, rounding outwards so no dirty byte is lost.
    pub fn mark(&mut self, region_bytes: u64, regions: &[u64]) {
        if region_bytes != self.region_bytes {
            let old = std::mem::take(&mut self.regions);
            let old_size = self.region_bytes;
            self.region_bytes = region_bytes;
            for i in set_bits(&old) {
                let start = i.saturating_mul(old_size);
                let end = start.saturating_add(old_size);
                let (first, last) = (start / region_bytes, end.saturating_sub(1) / region_bytes);
                for j in first..=last.min(MAX_DIRTY_REGIONS - 1) {
                    set_bit(&mut self.regions, j);
                }
            }
        }
        for &i in regions {
            set_bit(&mut self.regions, i);
        }
    }

    pub fn is_set(&self, region: u64) -> bool {
        usize::try_from(region / 8)
            .ok()
            .and_then(|b| self.regions.get(b))
            .is_some_and(|byte| byte & (1 << (region % 8)) != 0)
    }
}

fn set_bit(bitmap: &mut Vec<u8>, i: u64) {
    let Ok(byte) = usize::try_from(i / 8) else { return };
    if bitmap.len() <= byte {
        bitmap.resize(byte + 1, 0);
    }
    bitmap[byte] |= 1 << (i % 8);
}

fn set_bits(bitmap: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(b, byte)| {
        (0..8u64).filter(move |k| byte & (1 << k) != 0).map(move |k| b as u64 * 8 + k)
    })
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// `volume-names/<name>`: which volume holds a name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRecord {
    pub version: u32,
    pub volume: VolumeId,
}

/// `tombstones/<uuid>`: a volume this store deleted, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TombstoneRecord {
    pub version: u32,
    pub deleted_ms: u64,
}

/// `events/<seq>`: an event as served by `/v1/events`, versioned like every record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub version: u32,
    #[serde(flatten)]
    pub event: trireme_api::Event,
}

pub fn node_key(id: &NodeId) -> String {
    format!("{NODES}{id}")
}
pub fn pool_key(id: &PoolId) -> String {
    format!("{POOLS}{id}")
}
pub fn volume_key(id: &VolumeId) -> String {
    format!("{VOLUMES}{id}")
}
pub fn volume_name_key(name: &Name) -> String {
    format!("{VOLUME_NAMES}{name}")
}
pub fn tombstone_key(id: &VolumeId) -> String {
    format!("{TOMBSTONES}{id}")
}
pub fn dirty_key(id: &VolumeId) -> String {
    format!("{DIRTY}{id}")
}
pub fn event_key(seq: u64) -> String {
    format!("{EVENTS}{seq:020}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A volume record exactly as version 1 writes it. Do not edit: add a new literal for a
    /// new version and keep this one decoding (through a migration).
    const VOLUME_V1: &str = r#"{
        "version": 1,
        "id": "6f1c1e6e-5b8a-4a3e-9d7e-0a1b2c3d4e5f",
        "name": "vol-1",
        "size": 1073741824,
        "replica_count": 1,
        "thin": false,
        "publish": "node-1",
        "replicas": [{"id": "0b7f6a43-2d7e-4f0a-8a55-7f8e9d0c1b2a", "pool": "pool-1", "node": "node-1"}],
        "phase": "ready",
        "pending": {"op": "resize", "size": 2147483648}
    }"#;
    const POOL_V1: &str = r#"{"version":1,"id":"pool-1","node":"node-1","disk":"/var/lib/p.img","size":4294967296,"phase":"active"}"#;
    const NODE_V1: &str = r#"{"version":1,"id":"node-1","grpc_endpoint":"127.0.0.1:9000","nbd_endpoint":"127.0.0.1:10809","engine_version":"0.1.0"}"#;

    #[test]
    fn version_1_documents_decode() {
        let v: VolumeRecord = decode("volumes/x", VOLUME_V1.as_bytes()).unwrap();
        assert_eq!(v.name.as_str(), "vol-1");
        assert_eq!(v.size, ByteSize::gib(1));
        assert_eq!(v.publish, Some(NodeId::new("node-1").unwrap()));
        assert_eq!(v.phase, VolumePhase::Ready);
        assert_eq!(v.pending, Some(PendingOp::Resize { size: ByteSize::gib(2) }));
        assert_eq!(v.target_size(), ByteSize::gib(2));
        // Written before replication: every replica current, epoch and generation zero.
        assert_eq!((v.epoch, v.generation), (0, 0));
        assert!(v.children.is_empty());
        assert_eq!(v.online_replicas().len(), 1);
        let p: PoolRecord = decode("pools/x", POOL_V1.as_bytes()).unwrap();
        assert_eq!(p.phase, PoolPhase::Active);
        let n: NodeRecord = decode("nodes/x", NODE_V1.as_bytes()).unwrap();
        assert!(!n.cordoned);
    }

    #[test]
    fn version_1_index_and_event_records_decode() {
        let n: NameRecord =
            decode("k", br#"{"version":1,"volume":"6f1c1e6e-5b8a-4a3e-9d7e-0a1b2c3d4e5f"}"#)
                .unwrap();
        assert_eq!(n.volume.to_string(), "6f1c1e6e-5b8a-4a3e-9d7e-0a1b2c3d4e5f");
        let t: TombstoneRecord = decode("k", br#"{"version":1,"deleted_ms":17}"#).unwrap();
        assert_eq!(t.deleted_ms, 17);
        let e: EventRecord = decode(
            "k",
            br#"{"version":1,"seq":4,"time_ms":9,"kind":"volume","id":"x","reason":"created","message":"m"}"#,
        )
        .unwrap();
        assert_eq!(e.event.seq, 4);
        assert_eq!(e.event.reason, "created");
    }

    /// A replicated volume as this version writes it (children, epoch, generation).
    const VOLUME_V1_REPLICATED: &str = r#"{
        "version": 1,
        "id": "6f1c1e6e-5b8a-4a3e-9d7e-0a1b2c3d4e5f",
        "name": "vol-2",
        "size": 1073741824,
        "replica_count": 2,
        "thin": true,
        "replicas": [
            {"id": "0b7f6a43-2d7e-4f0a-8a55-7f8e9d0c1b2a", "pool": "pool-1", "node": "node-1"},
            {"id": "1c8f7b54-3e8f-4a1b-9b66-8a9fae1d2c3b", "pool": "pool-2", "node": "node-2"}
        ],
        "phase": "ready",
        "epoch": 7,
        "generation": 3,
        "children": {
            "1c8f7b54-3e8f-4a1b-9b66-8a9fae1d2c3b": {
                "state": "faulted", "reason": "timeout", "needs": "partial", "since_ms": 5,
                "out_epoch": 6,
                "last_rebuild": {"kind": "full", "copied": 4096, "duration_ms": 12}
            }
        }
    }"#;

    #[test]
    fn replicated_volume_documents_decode() {
        let v: VolumeRecord = decode("k", VOLUME_V1_REPLICATED.as_bytes()).unwrap();
        assert_eq!((v.epoch, v.generation), (7, 3));
        let faulted: ReplicaId = "1c8f7b54-3e8f-4a1b-9b66-8a9fae1d2c3b".parse().unwrap();
        let online: ReplicaId = "0b7f6a43-2d7e-4f0a-8a55-7f8e9d0c1b2a".parse().unwrap();
        assert_eq!(v.child_health(&faulted), ChildHealth::Faulted);
        assert_eq!(v.child_needs(&faulted), Some(RebuildKind::Partial));
        assert_eq!(v.child_needs(&online), None);
        // Recorded out by the nexus of epoch 6: claimed by it (or later), what it recorded;
        // claimed only by an older one, full.
        assert_eq!(v.children[&faulted].out_epoch, 6);
        assert_eq!(v.join_needs(&faulted, Some(6)), Some(RebuildKind::Partial));
        assert_eq!(v.join_needs(&faulted, Some(7)), Some(RebuildKind::Partial));
        assert_eq!(v.join_needs(&faulted, None), Some(RebuildKind::Partial));
        assert_eq!(v.join_needs(&faulted, Some(5)), Some(RebuildKind::Full));
        assert_eq!(v.join_needs(&online, Some(1)), None);
        assert_eq!(v.online_replicas().into_iter().collect::<Vec<_>>(), [online]);
        let c = &v.children[&faulted];
        assert_eq!(c.reason, Some(FaultReason::Timeout));
        assert_eq!(c.last_rebuild.map(|r| r.copied), Some(ByteSize::kib(4)));
        let back: VolumeRecord = decode("k", &encode("k", &v).unwrap()).unwrap();
        assert_eq!(v, back);
        let d: DirtyRecord =
            decode("k", br#"{"version":1,"region_bytes":1048576,"regions":"0580"}"#).unwrap();
        assert!(d.is_set(0) && d.is_set(2) && d.is_set(15) && !d.is_set(1) && !d.is_set(99));
    }

    #[test]
    fn dirty_log_marks_and_regrains_outwards() {
        let mut d = DirtyRecord::new(1 << 20);
        d.mark(1 << 20, &[1, 9]);
        assert!(d.is_set(1) && d.is_set(9) && !d.is_set(0));
        // Doubling the region size: old region 1 (bytes 1..2 MiB) is in new region 0, old 9 in
        // new 4.
        d.mark(2 << 20, &[7]);
        assert_eq!(d.region_bytes, 2 << 20);
        let set: Vec<u64> = (0..16).filter(|&i| d.is_set(i)).collect();
        assert_eq!(set, [0, 4, 7]);
        let back: DirtyRecord = decode("k", &encode("k", &d).unwrap()).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn records_round_trip_and_newer_versions_are_refused() {
        let v: VolumeRecord = decode("k", VOLUME_V1.as_bytes()).unwrap();
        let back: VolumeRecord = decode("k", &encode("k", &v).unwrap()).unwrap();
        assert_eq!(v, back);
        let newer = VOLUME_V1.replace("\"version\": 1", "\"version\": 2");
        assert!(matches!(
            decode::<VolumeRecord>("k", newer.as_bytes()),
            Err(RecordError::TooNew { version: 2, .. })
        ));
        assert!(matches!(decode::<VolumeRecord>("k", b"{"), Err(RecordError::Decode { .. })));
    }
}
