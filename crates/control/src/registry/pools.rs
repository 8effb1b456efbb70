//! Pools: the spec names a node and a disk; the engine creates the pool there, or imports it
//! if the disk already holds it. Creation is idempotent by name; deletion refuses while any
//! volume has a replica on the pool.

use trireme_api::{CreatePoolBody, Pool};
use trireme_rpc as rpc;
use trireme_store::{Compare, Txn};
use trireme_types::PoolId;

use super::records::{self, PoolPhase, PoolRecord, RECORD_VERSION};
use super::{Registry, view};
use crate::ControlError;
use crate::engine_client::EngineError;
use crate::events::Kind;

impl Registry {
    pub fn pools(&self) -> Vec<Pool> {
        let st = self.state.read();
        st.pools.values().map(|p| view::pool(&st, p)).collect()
    }

    pub fn pool(&self, id: &str) -> Result<Pool, ControlError> {
        let st = self.state.read();
        id.parse::<PoolId>()
            .ok()
            .and_then(|pid| st.pools.get(&pid))
            .map(|p| view::pool(&st, p))
            .ok_or_else(|| ControlError::not_found("pool", id))
    }

    /// Creates the pool's spec (or returns the existing identical one) and asks its engine to
    /// create it. Returns the pool and whether it was created by this call.
    pub async fn create_pool(&self, body: CreatePoolBody) -> Result<(Pool, bool), ControlError> {
        if body.disk.trim().is_empty() {
            return Err(ControlError::InvalidBody {
                detail: "disk must name a file or block device".into(),
            });
        }
        let existing = self.state.read().pools.get(&body.name).map(|p| p.record.clone());
        if let Some(existing) = existing {
            if existing.node == body.node
                && existing.disk == body.disk
                && existing.phase == PoolPhase::Active
            {
                // Idempotent repeat (CSI/operator retries): the same spec is the same pool.
                return Ok((self.pool(body.name.as_str())?, false));
            }
            return Err(ControlError::PoolConflict {
                pool: existing.id,
                node: existing.node,
                disk: existing.disk,
            });
        }
        if !self.state.read().nodes.contains_key(&body.node) {
            return Err(ControlError::UnknownNode { node: body.node });
        }
        let record = PoolRecord {
            version: RECORD_VERSION,
            id: body.name.clone(),
            node: body.node.clone(),
            disk: body.disk.clone(),
            size: body.size,
            phase: PoolPhase::Active,
        };
        let key = records::pool_key(&record.id);
        let outcome = self
            .store
            .txn(
                Txn::new()
                    .when(Compare::Absent(key.clone()))
                    .put(key.clone(), records::encode(&key, &record)?),
            )
            .await?;
        if !outcome.committed() {
            // Lost a race with an identical or conflicting create: answer as if it came first.
            return Err(ControlError::PoolConflict {
                pool: record.id,
                node: record.node,
                disk: record.disk,
            });
        }
        self.save_pool(&record).await?;
        self.events
            .record(
                Kind::Pool,
                &record.id,
                "created",
                format!("pool {} created on node {} ({})", record.id, record.node, record.disk),
            )
            .await;
        // Try right away so the pool is usable when the answer arrives. A definitive refusal
        // (bad disk, disk in use) undoes the spec; anything else is retried by the reconciler.
        match self.apply_pool(&record).await {
            Ok(()) => {}
            Err(ControlError::Engine(e)) if e.is_refusal() => {
                self.store.delete(&key).await?;
                self.state.write().pools.remove(&record.id);
                self.events.record(Kind::Pool, &record.id, "create_failed", e.to_string()).await;
                return Err(e.into());
            }
            Err(e) => {
                self.events.record(Kind::Pool, &record.id, "create_failed", e.to_string()).await;
            }
        }
        Ok((self.pool(record.id.as_str())?, true))
    }

    /// Makes the engine hold the pool (create or import) and records what it reports.
    pub(crate) async fn apply_pool(&self, record: &PoolRecord) -> Result<(), ControlError> {
        let Some(endpoint) = self.state.read().online_endpoint(&record.node) else {
            return Err(ControlError::NodeUnavailable {
                node: record.node.clone(),
                state: "offline".into(),
            });
        };
        let mut client = self.engines.client(&record.node, &endpoint)?;
        let req = rpc::CreatePoolRequest {
            name: record.id.to_string(),
            disk: record.disk.clone(),
            size_bytes: record.size.map(u64::from).unwrap_or(0),
            cluster_size: 0,
        };
        match self.engines.call(&record.node, "CreatePool", client.create_pool(req)).await {
            Ok(pool) => {
                self.observe_pool(&record.node, pool);
                if let Some(p) = self.state.write().pools.get_mut(&record.id) {
                    p.error = None;
                }
                Ok(())
            }
            Err(e) => {
                // Only the engine's own verdict describes the pool; a timeout says nothing.
                if matches!(e, EngineError::Status { .. })
                    && let Some(p) = self.state.write().pools.get_mut(&record.id)
                {
                    p.error = Some(e.to_string());
                }
                Err(e.into())
            }
        }
    }

    /// Records one pool as observed on `node`.
    pub(crate) fn observe_pool(&self, node: &trireme_types::NodeId, pool: rpc::Pool) {
        let mut st = self.state.write();
        if let Ok(id) = pool.name.parse::<PoolId>()
            && let Some(entry) = st.pools.get_mut(&id)
            && &entry.record.node == node
        {
            entry.observed = Some(pool.clone());
        }
        st.touch(node).pools.insert(pool.name.clone(), pool);
    }

    /// Deletes a pool that holds no replica of any volume.
    pub async fn delete_pool(&self, id: &str) -> Result<(), ControlError> {
        let record = id
            .parse::<PoolId>()
            .ok()
            .and_then(|pid| self.state.read().pools.get(&pid).map(|p| p.record.clone()))
            .ok_or_else(|| ControlError::not_found("pool", id))?;
        // No volume creation may place a replica here between the check and the mark below;
        // once marked, the pool is no longer offered for placement.
        let _create = self.lock_create().await;
        let users: Vec<String> = {
            let st = self.state.read();
            st.volumes
                .values()
                .filter(|v| v.replicas.iter().any(|r| r.pool == record.id))
                .map(|v| v.name.to_string())
                .collect()
        };
        if !users.is_empty() {
            return Err(ControlError::PoolInUse { pool: record.id, volumes: users.join(", ") });
        }
        let mut deleting = record.clone();
        if deleting.phase != PoolPhase::Deleting {
            deleting.phase = PoolPhase::Deleting;
            self.save_pool(&deleting).await?;
        }
        self.finish_pool_delete(&deleting).await
    }

    /// The second half of a pool delete, also driven by the reconciler after a crash.
    pub(crate) async fn finish_pool_delete(&self, record: &PoolRecord) -> Result<(), ControlError> {
        let Some(endpoint) = self.state.read().online_endpoint(&record.node) else {
            return Err(ControlError::NodeUnavailable {
                node: record.node.clone(),
                state: "offline".into(),
            });
        };
        let mut client = self.engines.client(&record.node, &endpoint)?;
        let req = rpc::DestroyPoolRequest { name: record.id.to_string(), wipe: false };
        match self.engines.call(&record.node, "DestroyPool", client.destroy_pool(req)).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {} // already gone: the delete is idempotent
            Err(e @ EngineError::Status { code: tonic::Code::FailedPrecondition, .. }) => {
                // The engine still holds replicas: one was placed (by a replica being added or
                // replaced) while the delete checked. The pool stays, usable again, rather
                // than stuck half deleted.
                let mut active = record.clone();
                active.phase = PoolPhase::Active;
                self.save_pool(&active).await?;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        }
        self.store.delete(&records::pool_key(&record.id)).await?;
        {
            let mut st = self.state.write();
            st.pools.remove(&record.id);
            if let Some(o) = st.touched(&record.node) {
                o.pools.remove(record.id.as_str());
            }
        }
        self.events
            .record(
                Kind::Pool,
                &record.id,
                "deleted",
                format!("pool {} deleted from node {}", record.id, record.node),
            )
            .await;
        Ok(())
    }
}
