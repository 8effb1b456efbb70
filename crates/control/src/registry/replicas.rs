//! Adding and removing one replica of a volume: the primitives behind replacement (reconciler),
//! set-replicas and drain (`ops.rs`).
//!
//! ```text
//!   add_replica:    place (another node) ─> record {replica, child: rebuilding/needs full}
//!                   ─> CreateReplica ─> AddChild(FULL) when published
//!   remove_replica: RemoveChild ─> drop {replica, child} from the record (generation + 1 if it
//!                   was online) ─> DestroyReplica (or the orphan collector, later)
//! ```
//!
//! The record is written before the engines are asked, so a crash in between leaves a replica
//! that is recorded as needing a full rebuild: the reconciler creates it and joins it (it can
//! never be mistaken for a current one). A child the nexus cannot add now (AddChild failed) is
//! likewise added by the reconciler on a later pass.

use trireme_api::RebuildKind;
use trireme_rpc as rpc;
use trireme_types::{NodeId, ReplicaId, VolumeId};

use super::membership::join_of;
use super::records::{ChildStatusRecord, ReplicaRecord, VolumePhase, VolumeRecord};
use super::{Registry, State};
use crate::ControlError;
use crate::engine_client::EngineError;
use crate::events::{Kind, now_ms};
use crate::scheduler::{self, PlacementError};

impl State {
    /// How the nexus on `nexus_node` reaches a replica: in its own pool `replica:///<uuid>`,
    /// elsewhere over NBD `nbd://<that node's NBD endpoint>/replica-<uuid>` (the engine adds
    /// the epoch to the export name itself). `None` when the replica's node is unknown.
    pub fn child_uri(&self, nexus_node: &NodeId, r: &ReplicaRecord) -> Option<String> {
        if &r.node == nexus_node {
            return Some(format!("replica:///{}", r.id));
        }
        let node = self.nodes.get(&r.node)?;
        Some(format!("nbd://{}/replica-{}", node.record.nbd_endpoint, r.id))
    }
}

impl Registry {
    /// Adds one replica to `volume` on a node that holds none of its replicas and is not in
    /// `exclude` (placement: online, uncordoned, not draining, most free space). The replica is
    /// recorded as `rebuilding` needing a `full` rebuild, created on its pool, and — when the
    /// volume is published — added to the nexus with `AddChild(FULL)`; it turns online (and
    /// counts as current) only when the nexus records its rebuild finished.
    ///
    /// Does NOT change `replica_count`: set-replicas sets the count itself, replacement and
    /// drain add before they remove. Takes the volume's operation lock; do not hold it.
    ///
    /// Errors: the volume unknown or not `ready` (404/409/422), no placement (503/507), the
    /// engine refusing the replica (the record is then undone). A failed AddChild is not an
    /// error: the replica stays recorded and the reconciler adds it to the nexus.
    pub async fn add_replica(
        &self,
        volume: VolumeId,
        exclude: &[NodeId],
    ) -> Result<ReplicaRecord, ControlError> {
        let _op = self.lock_volume(volume).await;
        self.add_replica_locked(volume, exclude).await
    }

    /// [`Registry::add_replica`] for a caller already holding the volume's operation lock.
    pub(crate) async fn add_replica_locked(
        &self,
        volume: VolumeId,
        exclude: &[NodeId],
    ) -> Result<ReplicaRecord, ControlError> {
        let record = self
            .volume_record(&volume)
            .ok_or_else(|| ControlError::not_found("volume", volume.to_string()))?;
        check_ready(&record)?;
        let chosen = {
            let st = self.state.read();
            let mut excluded: Vec<NodeId> = exclude.to_vec();
            excluded.extend(record.replicas.iter().map(|r| r.node.clone()));
            scheduler::place(&st.candidates(), 1, record.target_size(), record.thin, &excluded)?
                .into_iter()
                .next()
                .ok_or(PlacementError::NoPools)?
        };
        let replica =
            ReplicaRecord { id: ReplicaId::new_random(), pool: chosen.pool, node: chosen.node };
        let (record, ()) = self
            .update_volume(volume, |r| {
                check_ready(r)?;
                r.replicas.push(replica.clone());
                r.children.insert(replica.id, ChildStatusRecord::new_empty(now_ms()));
                Ok(())
            })
            .await?;
        if let Err(e) = self.create_replica(&record, &replica).await {
            let undo = self
                .update_volume(volume, |r| {
                    r.replicas.retain(|x| x.id != replica.id);
                    r.children.remove(&replica.id);
                    Ok(())
                })
                .await;
            if let Err(u) = undo {
                tracing::warn!(volume = %volume, replica = %replica.id, "replica left recorded after a failed create: {u}");
            }
            return Err(e);
        }
        self.events
            .record(
                Kind::Volume,
                volume,
                "replica_added",
                format!(
                    "replica {} of volume {} placed in pool {} on node {}; it joins with a full rebuild",
                    replica.id, record.name, replica.pool, replica.node
                ),
            )
            .await;
        if record.publish.is_some()
            && let Err(e) = self.add_child(&record, &replica, Some(RebuildKind::Full)).await
        {
            tracing::warn!(volume = %volume, replica = %replica.id, "AddChild failed, the reconciler retries: {e}");
        }
        self.wake();
        Ok(replica)
    }

    /// Removes one replica from `volume`: `RemoveChild` from the nexus (when published and its
    /// node is online), drops it from the record (bumping the generation when it was online),
    /// then destroys it on its pool — or, if its node is away, leaves it to the orphan
    /// collector. Refuses to remove the last replica, or the last one recorded online.
    ///
    /// Does NOT change `replica_count`. Takes the volume's operation lock; do not hold it.
    pub async fn remove_replica(
        &self,
        volume: VolumeId,
        replica: ReplicaId,
    ) -> Result<(), ControlError> {
        let _op = self.lock_volume(volume).await;
        self.remove_replica_locked(volume, replica).await
    }

    /// [`Registry::remove_replica`] for a caller already holding the volume's operation lock.
    pub(crate) async fn remove_replica_locked(
        &self,
        volume: VolumeId,
        replica: ReplicaId,
    ) -> Result<(), ControlError> {
        let record = self
            .volume_record(&volume)
            .ok_or_else(|| ControlError::not_found("volume", volume.to_string()))?;
        let Some(target) = record.replica(&replica).cloned() else {
            return Err(ControlError::not_found("replica", replica.to_string()));
        };
        check_removable(&record, &replica)?;
        self.remove_child(&record, replica).await?;
        let (record, was_online) = self
            .update_volume(volume, |r| {
                check_removable(r, &replica)?;
                let before = r.online_replicas();
                r.replicas.retain(|x| x.id != replica);
                r.children.remove(&replica);
                let changed = before != r.online_replicas();
                if changed {
                    r.generation += 1;
                }
                Ok(changed)
            })
            .await?;
        self.events
            .record(
                Kind::Volume,
                volume,
                "child_removed",
                format!(
                    "replica {replica} on node {} removed from volume {}{}",
                    target.node,
                    record.name,
                    if was_online { "" } else { " (it was not current)" }
                ),
            )
            .await;
        if let Err(e) = self.destroy_replica_on(&target.node, replica).await {
            tracing::info!(%replica, node = %target.node, "removed replica left to the orphan collector: {e}");
        }
        Ok(())
    }

    /// Creates one recorded replica on its engine (idempotent on the engine side) and counts
    /// it in the cached observation.
    pub(crate) async fn create_replica(
        &self,
        record: &VolumeRecord,
        r: &ReplicaRecord,
    ) -> Result<(), ControlError> {
        let endpoint = self.state.read().online_endpoint(&r.node).ok_or_else(|| {
            ControlError::NodeUnavailable { node: r.node.clone(), state: "offline".into() }
        })?;
        let mut client = self.engines.client(&r.node, &endpoint)?;
        let req = rpc::CreateReplicaRequest {
            uuid: r.id.to_string(),
            pool: r.pool.to_string(),
            size_bytes: record.target_size().bytes(),
            thin: record.thin,
            volume_uuid: record.id.to_string(),
        };
        let rep = self.engines.call(&r.node, "CreateReplica", client.create_replica(req)).await?;
        let mut st = self.state.write();
        let known = st.observed.get(&r.node).is_some_and(|o| o.replicas.contains_key(&r.id));
        // Until the next observation, count a new thick replica against its pool's free
        // space so that back-to-back creates do not overbook it.
        if !known && let Some(o) = st.pools.get_mut(&r.pool).and_then(|p| p.observed.as_mut()) {
            if !record.thin {
                o.used_bytes = o.used_bytes.saturating_add(rep.size_bytes);
            }
            o.replica_count = o.replica_count.saturating_add(1);
        }
        st.touch(&r.node).replicas.insert(r.id, rep);
        Ok(())
    }

    /// Asks the volume's nexus to take (or re-open) a replica as a child joining `needs`.
    pub(crate) async fn add_child(
        &self,
        record: &VolumeRecord,
        r: &ReplicaRecord,
        needs: Option<RebuildKind>,
    ) -> Result<(), ControlError> {
        let Some(node) = record.publish.clone() else { return Ok(()) };
        let (endpoint, uri) = {
            let st = self.state.read();
            let endpoint = st.online_endpoint(&node).ok_or_else(|| {
                ControlError::NodeUnavailable { node: node.clone(), state: "offline".into() }
            })?;
            let uri = st
                .child_uri(&node, r)
                .ok_or_else(|| ControlError::UnknownNode { node: r.node.clone() })?;
            (endpoint, uri)
        };
        let mut client = self.engines.client(&node, &endpoint)?;
        let req = rpc::AddChildRequest {
            volume_uuid: record.id.to_string(),
            epoch: record.epoch,
            child: Some(rpc::ChildSpec {
                uri,
                replica_uuid: r.id.to_string(),
                join: join_of(needs) as i32,
            }),
        };
        let n = self.engines.call(&node, "AddChild", client.add_child(req)).await?;
        self.state.write().touch(&node).nexuses.insert(record.id, n);
        Ok(())
    }

    /// Asks the volume's nexus (when published and its node online) to let go of a child.
    /// A missing nexus or child is success.
    pub(crate) async fn remove_child(
        &self,
        record: &VolumeRecord,
        replica: ReplicaId,
    ) -> Result<(), ControlError> {
        let Some(node) = record.publish.clone() else { return Ok(()) };
        let Some(endpoint) = self.state.read().online_endpoint(&node) else { return Ok(()) };
        let mut client = self.engines.client(&node, &endpoint)?;
        let req = rpc::RemoveChildRequest {
            volume_uuid: record.id.to_string(),
            epoch: record.epoch,
            replica_uuid: replica.to_string(),
        };
        match self.engines.call(&node, "RemoveChild", client.remove_child(req)).await {
            Ok(n) => {
                self.state.write().touch(&node).nexuses.insert(record.id, n);
                Ok(())
            }
            // No nexus (not created yet, or lost): nothing holds the child.
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Destroys a replica on its node if that node is online; absent is success.
    pub(crate) async fn destroy_replica_on(
        &self,
        node: &NodeId,
        rid: ReplicaId,
    ) -> Result<(), EngineError> {
        let Some(endpoint) = self.state.read().online_endpoint(node) else { return Ok(()) };
        let mut client = self.engines.client(node, &endpoint)?;
        let req = rpc::DestroyReplicaRequest { uuid: rid.to_string() };
        match self.engines.call(node, "DestroyReplica", client.destroy_replica(req)).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        if let Some(o) = self.state.write().touched(node) {
            o.replicas.remove(&rid);
        }
        Ok(())
    }
}

fn check_ready(r: &VolumeRecord) -> Result<(), ControlError> {
    match r.phase {
        VolumePhase::Ready => Ok(()),
        VolumePhase::Deleting => Err(ControlError::VolumeDeleting { volume: r.id }),
        VolumePhase::Creating => Err(ControlError::InvalidBody {
            detail: format!("volume {} is still being created; retry when it is ready", r.id),
        }),
    }
}

/// Removing `replica` must leave at least one replica recorded online.
fn check_removable(r: &VolumeRecord, replica: &ReplicaId) -> Result<(), ControlError> {
    let online = r.online_replicas();
    if r.replicas.len() <= 1 || (online.contains(replica) && online.len() == 1) {
        return Err(ControlError::InvalidBody {
            detail: format!(
                "replica {replica} is the only current replica of volume {}; removing it would lose data",
                r.name
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::registry::records::{ChildHealth, RECORD_VERSION};
    use trireme_types::ByteSize;

    #[test]
    fn the_last_current_replica_cannot_be_removed() {
        let replicas: Vec<ReplicaRecord> = (0..2)
            .map(|i| ReplicaRecord {
                id: ReplicaId::new_random(),
                pool: format!("p{i}").parse().unwrap(),
                node: format!("n{i}").parse().unwrap(),
            })
            .collect();
        let (a, b) = (replicas[0].id, replicas[1].id);
        let mut v = VolumeRecord {
            version: RECORD_VERSION,
            id: VolumeId::new_random(),
            name: "v".parse().unwrap(),
            size: ByteSize::mib(1),
            replica_count: 2,
            thin: true,
            publish: None,
            replicas,
            phase: VolumePhase::Ready,
            pending: None,
            epoch: 0,
            generation: 0,
            children: Default::default(),
        };
        assert!(check_removable(&v, &a).is_ok());
        let mut faulted = ChildStatusRecord::new_empty(0);
        faulted.state = ChildHealth::Faulted;
        v.children.insert(b, faulted);
        assert!(check_removable(&v, &a).is_err(), "a is the only current one");
        assert!(check_removable(&v, &b).is_ok(), "the faulted one may go");
        v.replicas.truncate(1);
        assert!(check_removable(&v, &a).is_err(), "never the last replica");
    }
}
