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
use trireme_types::{NodeId, ReplicaId, VolumeId};

use crate::ControlError;
use crate::events::Kind;
use crate::registry::records::{ChildHealth, NodeRecord, PendingOp, VolumePhase, VolumeRecord};
use crate::registry::volumes::busy;
use crate::registry::{Registry, State};

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

    /// Clears `draining` once the drain left nothing on the node (the node stays cordoned);
    /// called by the reconciler's drain step. Returns whether it did (a concurrent uncordon
    /// already cleared it).
    pub async fn finish_drain(&self, nid: &NodeId) -> Result<bool, ControlError> {
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
    ///
    /// The count is persisted first, then replicas are added (each placed on a node holding
    /// none, recorded as needing a full rebuild, joined to the nexus) or removed (in
    /// [`shrink_order`]; never the last current one). Answers once the engines have been asked;
    /// new replicas turn online when their rebuild finishes.
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
        let _op = self.lock_volume(vid).await;
        let record =
            self.volume_record(&vid).ok_or_else(|| ControlError::not_found("volume", id))?;
        check_settable(&record)?;
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
        if matches!(record.pending, Some(PendingOp::Resize { .. })) {
            return Err(busy(&record, "it is being resized"));
        }
        let before = record.replica_count;
        // The count is the intent, marked pending until the replicas match it: a crash before
        // that leaves it for the reconciler to finish.
        self.update_volume(vid, |r| {
            check_settable(r)?;
            r.replica_count = replicas;
            r.pending = Some(PendingOp::Replicas);
            Ok(())
        })
        .await?;
        if before != replicas {
            self.events
                .record(
                    Kind::Volume,
                    vid,
                    "replicas_set",
                    format!("volume {} keeps {replicas} replica(s) (was {before})", record.name),
                )
                .await;
        }
        self.finish_set_replicas(vid, true).await?;
        self.wake();
        self.volume(&vid.to_string())
    }

    /// Adds or removes replicas until the volume has as many as its spec says, then clears the
    /// pending mark (caller holds the volume's operation lock). On failure, with `settle`, the
    /// spec is made to say what the volume has, not what it failed to get: the answer to a
    /// request. Without it the mark stays for another try: the reconciler after a crash,
    /// when the nodes may not be back yet (a new `set-replicas` settles it either way).
    pub(crate) async fn finish_set_replicas(
        &self,
        vid: VolumeId,
        settle: bool,
    ) -> Result<(), ControlError> {
        let Some(record) = self.volume_record(&vid) else { return Ok(()) };
        let (current, wanted) = (record.replicas.len(), usize::from(record.replica_count));
        let result = if wanted > current {
            self.grow(vid, wanted - current).await
        } else if wanted < current {
            self.shrink(vid, current - wanted).await
        } else {
            Ok(())
        };
        let failed = result.is_err();
        if failed && !settle {
            return result;
        }
        let settled = self
            .update_volume(vid, |r| {
                if failed {
                    let have = u8::try_from(r.replicas.len()).unwrap_or(u8::MAX);
                    r.replica_count = have.max(1);
                }
                r.pending = None;
                Ok(())
            })
            .await;
        if let Err(u) = &settled {
            tracing::warn!(volume = %vid, "cannot settle the replica count after set-replicas: {u}");
        }
        result?;
        settled.map(drop)
    }

    /// Adds `n` replicas (caller holds the volume's operation lock).
    async fn grow(&self, vid: VolumeId, n: usize) -> Result<(), ControlError> {
        for _ in 0..n {
            self.add_replica_locked(vid, &[]).await?;
        }
        Ok(())
    }

    /// Removes `n` replicas, the least valuable first (caller holds the operation lock).
    async fn shrink(&self, vid: VolumeId, n: usize) -> Result<(), ControlError> {
        let victims: Vec<ReplicaId> = {
            let st = self.state.read();
            let Some(v) = st.volumes.get(&vid) else {
                return Err(ControlError::not_found("volume", vid.to_string()));
            };
            shrink_order(&st, v).into_iter().take(n).collect()
        };
        for rid in victims {
            self.remove_replica_locked(vid, rid).await?;
        }
        Ok(())
    }
}

fn check_settable(r: &VolumeRecord) -> Result<(), ControlError> {
    match r.phase {
        VolumePhase::Ready => Ok(()),
        VolumePhase::Deleting => Err(ControlError::VolumeDeleting { volume: r.id }),
        VolumePhase::Creating => Err(ControlError::InvalidBody {
            detail: format!("volume {} is still being created; retry when it is ready", r.name),
        }),
    }
}

/// The order in which shrinking removes a volume's replicas: faulted first, then rebuilding,
/// then current ones away from the nexus (remote), then the nexus's local one; among equals,
/// those on offline, draining, then cordoned nodes go first. Removal itself refuses the last
/// current replica, so following this order never loses data.
pub(crate) fn shrink_order(st: &State, v: &VolumeRecord) -> Vec<ReplicaId> {
    let mut ranked: Vec<((u8, u8), ReplicaId)> = v
        .replicas
        .iter()
        .map(|r| {
            let health = match v.child_health(&r.id) {
                ChildHealth::Faulted => 0,
                ChildHealth::Rebuilding => 1,
                ChildHealth::Online if v.publish.as_ref() != Some(&r.node) => 2,
                ChildHealth::Online => 3,
            };
            let node = match st.nodes.get(&r.node) {
                None => 0,
                Some(n) if !n.online => 0,
                Some(n) if n.record.draining => 1,
                Some(n) if n.record.cordoned => 2,
                Some(_) => 3,
            };
            ((health, node), r.id)
        })
        .collect();
    ranked.sort();
    ranked.into_iter().map(|(_, id)| id).collect()
}
