//! Resources and request bodies. Sizes are [`ByteSize`] (plain byte counts in JSON); states are
//! the enums of `trireme-types`.

use serde::{Deserialize, Serialize};
use trireme_types::{
    ByteSize, ChildState, Name, NexusState, NodeId, NodeState, PoolId, ReplicaId, VolumeId,
    VolumeState,
};

// ---------------------------------------------------------------- nodes

/// A storage node running an engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Node {
    pub id: NodeId,
    pub spec: NodeSpec,
    pub status: NodeStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeSpec {
    /// Takes no new replicas or nexuses.
    #[serde(default)]
    pub cordoned: bool,
    /// Replicas and nexuses are being moved away.
    #[serde(default)]
    pub draining: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeStatus {
    pub state: NodeState,
    /// The engine's gRPC endpoint (host:port).
    pub grpc_endpoint: String,
    /// Where NBD clients reach this node's shares (host:port).
    pub nbd_endpoint: String,
    pub version: String,
    /// Milliseconds since the Unix epoch of the last heartbeat.
    pub last_seen_ms: u64,
}

// ---------------------------------------------------------------- pools

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Pool {
    pub id: PoolId,
    pub spec: PoolSpec,
    pub status: PoolStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolSpec {
    pub node: NodeId,
    /// A block device or file path, or a `file://` URI.
    pub disk: String,
    /// For a file that does not exist yet: its size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PoolState {
    Online,
    Degraded,
    Faulted,
    /// Its node is unreachable, or it has not been created yet.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolStatus {
    pub state: PoolState,
    pub capacity: ByteSize,
    pub used: ByteSize,
    pub free: ByteSize,
    pub replicas: u32,
    /// Why the pool is degraded or faulted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePoolBody {
    pub name: PoolId,
    pub node: NodeId,
    pub disk: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
}

// ---------------------------------------------------------------- volumes

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Volume {
    pub id: VolumeId,
    pub name: Name,
    pub spec: VolumeSpec,
    pub status: VolumeStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeSpec {
    pub size: ByteSize,
    pub replicas: u8,
    pub thin: bool,
    /// The node the volume is published on (where its nexus runs), if published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<NodeId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeStatus {
    pub state: VolumeState,
    /// The volume's nexus, when published and observed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    pub replicas: Vec<Replica>,
    /// Membership generation: bumped each time the set of healthy replicas changes.
    #[serde(default)]
    pub generation: u64,
    /// Why the volume is not online, in one sentence (e.g. which replica it waits for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A volume's nexus as last observed on its node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Target {
    pub node: NodeId,
    /// The NBD URI any NBD client can use: `nbd://host:port/<volume id>`.
    pub uri: String,
    pub state: NexusState,
    pub children: Vec<Child>,
}

/// A nexus's view of one replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Child {
    pub replica: ReplicaId,
    pub uri: String,
    pub state: ChildState,
    /// The last rebuild of this child that finished, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rebuild: Option<RebuildInfo>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RebuildKind {
    /// Only the regions written while the child was out were copied.
    Partial,
    /// Every allocated region was copied.
    Full,
}

/// A finished rebuild: what it copied and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RebuildInfo {
    pub kind: RebuildKind,
    pub copied: ByteSize,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetReplicasBody {
    /// The number of replicas the volume should have (1 up to the number of nodes).
    pub replicas: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeBody {
    pub name: Name,
    /// A client-supplied id (CSI retries create with the same name; either makes it idempotent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<VolumeId>,
    pub size: ByteSize,
    #[serde(default = "one")]
    pub replicas: u8,
    #[serde(default)]
    pub thin: bool,
}

fn one() -> u8 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeVolumeBody {
    pub size: ByteSize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    /// The node to run the volume's nexus on; default: a node holding one of its replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeId>,
}

// ---------------------------------------------------------------- replicas

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Replica {
    pub id: ReplicaId,
    pub volume: VolumeId,
    pub pool: PoolId,
    pub node: NodeId,
    pub size: ByteSize,
    pub thin: bool,
    pub status: ReplicaStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Present on its pool.
    Online,
    /// Its pool does not have it (yet, or any more).
    Missing,
    /// Its node is unreachable.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaStatus {
    pub state: ReplicaState,
    pub allocated: ByteSize,
    /// The replica's state as a child of the volume's nexus, when published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child: Option<ChildState>,
    /// The membership generation this replica last recorded.
    #[serde(default)]
    pub generation: u64,
    /// The last rebuild of this replica that finished, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rebuild: Option<RebuildInfo>,
}

// ---------------------------------------------------------------- events

/// Something that changed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Increases with every event; `GET /v1/events?after=<seq>` returns the newer ones.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// `node`, `pool`, `volume`, `replica` or `nexus`.
    pub kind: String,
    /// The resource's id.
    pub id: String,
    /// A short machine-readable reason, e.g. `created`, `published`, `child_faulted`.
    pub reason: String,
    pub message: String,
}

// ---------------------------------------------------------------- health

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}
