//! The operator's entry points of replication: `set-replicas`, `cordon`, `uncordon`, `drain`.
//!
//! ```text
//!   cordon    persist node.cordoned                 scheduler skips the node from then on
//!   uncordon  persist !cordoned, !draining          a drain in progress stops
//!   drain     persist cordoned + draining ──> reconciler (reconcile/drain.rs), each pass:
//!               replica on the node ─> add a replacement elsewhere ─> once it is online:
//!               nexus on the node   ─> republish on a node holding an online replica
//!               old replica         ─> removed
//!               nothing left        ─> persist !draining (the node shows `cordoned`)
//!   set-replicas N   persist replica_count = N ──> add (grow) or remove (shrink) replicas
//! ```
//!
//! Node flags are written under one lock (with registration, which rewrites the same record),
//! so a cordon cannot be lost to an engine re-registering at the same moment.

use std::collections::BTreeSet;

use trireme_api::{Node, Volume};
use trireme_types::NodeId;

use crate::ControlError;
use crate::events::Kind;
use crate::registry::Registry;
use crate::registry::records::{NodeRecord, VolumePhase, VolumeRecord};

/// Serialises writes of node records (flags and registration). Control runs one registry per
/// process, and these writes are rare and short, so one lock for all of them is enough.
pub(crate) static NODE_WRITES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How a node's flags change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeOp {
    Cordon,
    Uncordon,
    Drain,
}

impl NodeOp {
    /// The flags after the operation. Each is idempotent: repeating it changes nothing.
    fn apply(self, r: &mut NodeRecord) {
        match self {
            Self::Cordon => r.cordoned = true,
            Self::Uncordon => {
                r.cordoned = false;
                r.draining = false;
            }
            Self::Drain => {
                r.cordoned = true;
                r.draining = true;
            }
        }
    }
}

impl Registry {
    /// Cordons a node: the scheduler places no new replica and no nexus on it.
    pub async fn cordon_node(&self, id: &str) -> Result<Node, ControlError> {
        self.node_op(id, NodeOp::Cordon).await
    }

    /// Clears cordon and drain: the node takes new work again; a drain in progress stops
    /// (replacements already made stay).
    pub async fn uncordon_node(&self, id: &str) -> Result<Node, ControlError> {
        self.node_op(id, NodeOp::Uncordon).await
    }

    /// Cordons the node and marks it draining; the reconciler moves its replicas and nexuses
    /// away and clears `draining` when nothing is left.
    pub async fn drain_node(&self, id: &str) -> Result<Node, ControlError> {
        let node = self.node_op(id, NodeOp::Drain).await?;
        self.wake();
        Ok(node)
    }

    async fn node_op(&self, id: &str, op: NodeOp) -> Result<Node, ControlError> {
        let nid = id.parse::<NodeId>().map_err(|_| ControlError::not_found("node", id))?;
        let _writes = NODE_WRITES.lock().await;
        let before = self
            .state
            .read()
            .nodes
            .get(&nid)
            .map(|n| n.record.clone())
            .ok_or_else(|| ControlError::not_found("node", id))?;
        let mut after = before.clone();
        op.apply(&mut after);
        if after != before {
            self.save_node(&after).await?;
            if let Some(entry) = self.state.write().nodes.get_mut(&nid) {
                entry.record = after.clone();
            }
            let (reason, message) = match op {
                NodeOp::Cordon => (
                    "cordoned",
                    format!("node {nid} is cordoned: no new replicas or nexuses go there"),
                ),
                NodeOp::Uncordon if before.draining => {
                    ("uncordoned", format!("node {nid} is uncordoned; its drain stopped"))
                }
                NodeOp::Uncordon => ("uncordoned", format!("node {nid} is uncordoned")),
                NodeOp::Drain => (
                    "draining",
                    format!("node {nid} is draining: its replicas and nexuses move to other nodes"),
                ),
            };
            self.events.record(Kind::Node, &nid, reason, message).await;
        }
        self.node(nid.as_str())
    }

    /// Clears `draining` once the drain left nothing on the node (the node stays cordoned).
    /// Returns whether it did; a concurrent uncordon or new drain wins.
    pub(crate) async fn finish_drain(&self, nid: &NodeId) -> Result<bool, ControlError> {
        let _writes = NODE_WRITES.lock().await;
        let Some(mut record) = self.state.read().nodes.get(nid).map(|n| n.record.clone()) else {
            return Ok(false);
        };
        if !record.draining {
            return Ok(false);
        }
        record.draining = false;
        self.save_node(&record).await?;
        if let Some(entry) = self.state.write().nodes.get_mut(nid) {
            entry.record = record;
        }
        self.events
            .record(
                Kind::Node,
                nid,
                "drained",
                format!(
                    "node {nid} is drained: no replica or nexus is left on it; it stays cordoned"
                ),
            )
            .await;
        Ok(true)
    }

    /// How many distinct nodes could hold a replica of the volume: those the scheduler may
    /// use now, plus those already holding one that are not being drained.
    fn replica_capacity(&self, volume: &VolumeRecord) -> usize {
        let st = self.state.read();
        let mut nodes: BTreeSet<NodeId> = st.candidates().into_iter().map(|c| c.node).collect();
        for r in &volume.replicas {
            if st.nodes.get(&r.node).is_some_and(|n| !n.record.draining) {
                nodes.insert(r.node.clone());
            }
        }
        nodes.len()
    }

    /// Sets how many replicas the volume keeps (1 up to the number of nodes able to hold one).
    pub async fn set_replicas(&self, id: &str, replicas: u8) -> Result<Volume, ControlError> {
        if replicas == 0 {
            return Err(ControlError::InvalidBody { detail: "replicas must be at least 1".into() });
        }
        let vid = self
            .state
            .read()
            .find_volume(id)
            .map(|v| v.id)
            .ok_or_else(|| ControlError::not_found("volume", id))?;
        let _guard = self.lock_volume(vid).await;
        let record =
            self.volume_record(&vid).ok_or_else(|| ControlError::not_found("volume", id))?;
        if record.phase == VolumePhase::Deleting {
            return Err(ControlError::VolumeDeleting { volume: vid });
        }
        let current = record.replicas.len();
        let wanted = usize::from(replicas);
        if wanted > current {
            let able = self.replica_capacity(&record);
            if wanted > able {
                return Err(ControlError::InvalidBody {
                    detail: format!(
                        "volume {} cannot have {wanted} replicas: only {able} node(s) can hold \
                         one (online, not cordoned, with an online pool)",
                        record.name
                    ),
                });
            }
        }
        if wanted == current && record.replica_count == replicas {
            return self.volume(&vid.to_string());
        }
        Err(ControlError::ReplicationUnavailable)
    }
}
