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
//!   events/<seq, 20 digits>  EventRecord
//! ```

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use trireme_types::{ByteSize, Name, NodeId, PoolId, ReplicaId, VolumeId};

/// The version this control writes.
pub const RECORD_VERSION: u32 = 1;

pub const NODES: &str = "nodes/";
pub const POOLS: &str = "pools/";
pub const VOLUMES: &str = "volumes/";
pub const VOLUME_NAMES: &str = "volume-names/";
pub const EVENTS: &str = "events/";
pub const TOMBSTONES: &str = "tombstones/";

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
}

/// Where one replica of a volume lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub id: ReplicaId,
    pub pool: PoolId,
    pub node: NodeId,
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
}

impl VolumeRecord {
    /// The size every replica and the nexus must have at least: a pending grow counts.
    pub fn target_size(&self) -> ByteSize {
        match &self.pending {
            Some(PendingOp::Resize { size }) => (*size).max(self.size),
            None => self.size,
        }
    }

    pub fn owns_replica(&self, id: &ReplicaId) -> bool {
        self.replicas.iter().any(|r| &r.id == id)
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
