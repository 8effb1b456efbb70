//! Node liveness: engines register (endpoint, NBD endpoint, version) and heartbeat; a node is
//! `online` while heartbeats arrive and `offline` once none came for the node timeout.
//! Registration is persisted (so a restarted control recognises heartbeats); liveness is not.

// The operator's node and volume operations live beside liveness (`registry/ops.rs`);
// declared here so that the registry's module list stays as it is.
#[path = "ops.rs"]
pub mod ops;

use std::time::Instant;

use trireme_types::NodeId;

use super::records::{NodeRecord, RECORD_VERSION};
use super::{NodeEntry, Registry};
use crate::ControlError;
use crate::events::{Kind, now_ms};

/// What changed in a node's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    CameOnline,
    WentOffline,
    Unchanged,
}

impl Registry {
    /// An engine (re)registers. Persists the node if new or changed and wakes the reconciler,
    /// which brings the engine to the spec (an engine that restarted has no nexuses).
    pub async fn register_node(
        &self,
        id: NodeId,
        grpc_endpoint: String,
        nbd_endpoint: String,
        engine_version: String,
    ) -> Result<(), ControlError> {
        // Under the node-write lock: the flags read here must not be lost to a cordon or
        // drain that lands between this read and the write below.
        let writes = ops::NODE_WRITES.lock().await;
        let existing = self.state.read().nodes.get(&id).map(|n| n.record.clone());
        let record = NodeRecord {
            version: RECORD_VERSION,
            id: id.clone(),
            grpc_endpoint,
            nbd_endpoint,
            engine_version,
            cordoned: existing.as_ref().is_some_and(|r| r.cordoned),
            draining: existing.as_ref().is_some_and(|r| r.draining),
        };
        if existing.as_ref() != Some(&record) {
            self.save_node(&record).await?;
        }
        let change = {
            let mut st = self.state.write();
            let entry = st.nodes.entry(id.clone()).or_insert_with(|| NodeEntry {
                record: record.clone(),
                last_seen: None,
                last_seen_ms: 0,
                online: false,
            });
            entry.record = record.clone();
            Self::mark_seen(entry)
        };
        drop(writes);
        if existing.is_none() {
            self.events
                .record(
                    Kind::Node,
                    &id,
                    "registered",
                    format!("node {id} registered at {}", record.grpc_endpoint),
                )
                .await;
        }
        self.liveness_event(&id, change, "registered").await;
        self.wake();
        Ok(())
    }

    /// A heartbeat; `false` when the node is unknown (the engine must register again).
    pub async fn heartbeat(&self, id: &NodeId) -> bool {
        let change = {
            let mut st = self.state.write();
            match st.nodes.get_mut(id) {
                Some(entry) => Self::mark_seen(entry),
                None => return false,
            }
        };
        if change == Liveness::CameOnline {
            self.liveness_event(id, change, "heartbeats resumed").await;
            self.wake();
        }
        true
    }

    fn mark_seen(entry: &mut NodeEntry) -> Liveness {
        entry.last_seen = Some(Instant::now());
        entry.last_seen_ms = now_ms();
        if entry.online {
            Liveness::Unchanged
        } else {
            entry.online = true;
            Liveness::CameOnline
        }
    }

    /// Marks nodes whose heartbeats stopped as offline.
    pub async fn check_liveness(&self) {
        let timeout = self.node_timeout;
        let expired: Vec<NodeId> = {
            let mut st = self.state.write();
            st.nodes
                .values_mut()
                .filter(|n| n.online && n.last_seen.is_none_or(|t| t.elapsed() > timeout))
                .map(|n| {
                    n.online = false;
                    n.record.id.clone()
                })
                .collect()
        };
        for id in expired {
            // Observations of an unreachable node are stale; dropping them makes its
            // replicas and nexuses `unknown` rather than reporting old states as current.
            self.state.write().observed.remove(&id);
            self.liveness_event(&id, Liveness::WentOffline, "missed heartbeats").await;
        }
    }

    async fn liveness_event(&self, id: &NodeId, change: Liveness, why: &str) {
        match change {
            Liveness::CameOnline => {
                self.events
                    .record(Kind::Node, id, "online", format!("node {id} is online ({why})"))
                    .await;
            }
            Liveness::WentOffline => {
                let secs = self.node_timeout.as_secs();
                self.events
                    .record(
                        Kind::Node,
                        id,
                        "offline",
                        format!("node {id} is offline ({why} for {secs} s)"),
                    )
                    .await;
            }
            Liveness::Unchanged => {}
        }
    }
}

impl Registry {
    pub fn nodes(&self) -> Vec<trireme_api::Node> {
        self.state.read().nodes.values().map(super::view::node).collect()
    }

    pub fn node(&self, id: &str) -> Result<trireme_api::Node, ControlError> {
        let st = self.state.read();
        id.parse::<NodeId>()
            .ok()
            .and_then(|nid| st.nodes.get(&nid))
            .map(super::view::node)
            .ok_or_else(|| ControlError::not_found("node", id))
    }
}
