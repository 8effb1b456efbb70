//! Volume operations, each through the guarded path: log the intent in the persisted spec
//! (phase `creating`/`deleting`, `pending` resize), act on the engines, then commit or clear.
//! A crash anywhere in between leaves a spec the reconciler finishes.
//!
//! ```text
//!   create:  place ─> persist(creating, replicas) ─> CreateReplica… ─> persist(ready)
//!                                          └─ fails ─> delete path (undo)
//!   resize:  persist(pending) ─> ResizeReplica… ─> ResizeNexus ─> persist(size, no pending)
//!   delete:  persist(deleting) ─> DestroyNexus ─> DestroyReplica… ─> remove record
//!   publish: persist(publish=node) ─> reconciler CreateNexus ─> observed share URI
//! ```

use std::time::Duration;

use trireme_api::{CreateVolumeBody, Replica, Volume};
use trireme_rpc as rpc;
use trireme_store::{Compare, Txn};
use trireme_types::{ByteSize, NodeId, VolumeId};

use super::records::{self, PendingOp, RECORD_VERSION, ReplicaRecord, VolumePhase, VolumeRecord};
use super::{Registry, State, view};
use crate::ControlError;
use crate::engine_client::EngineError;
use crate::events::Kind;
use crate::scheduler::{self, Candidate};

/// Sizes are multiples of this (the smallest block size NBD clients use).
pub const SIZE_ALIGN: u64 = 512;
/// How long publish waits for the nexus to be observed.
pub const PUBLISH_WAIT: Duration = Duration::from_secs(30);

fn check_size(size: ByteSize) -> Result<(), ControlError> {
    if size.bytes() == 0 {
        return Err(ControlError::InvalidBody { detail: "size must be greater than zero".into() });
    }
    if !size.is_multiple_of(SIZE_ALIGN) {
        return Err(ControlError::InvalidBody {
            detail: format!(
                "size {} ({} bytes) is not a multiple of {SIZE_ALIGN} bytes",
                size,
                size.bytes()
            ),
        });
    }
    Ok(())
}

impl State {
    /// Pools a new replica may go to: active, online, on an online node that takes new work.
    pub fn candidates(&self) -> Vec<Candidate> {
        self.pools
            .values()
            .filter(|p| p.record.phase == records::PoolPhase::Active)
            .filter(|p| {
                self.nodes
                    .get(&p.record.node)
                    .is_some_and(|n| n.online && !n.record.cordoned && !n.record.draining)
            })
            .filter_map(|p| {
                let o = p.observed.as_ref()?;
                (view::pool_state(o) == trireme_api::PoolState::Online).then(|| Candidate {
                    pool: p.record.id.clone(),
                    node: p.record.node.clone(),
                    free: ByteSize::b(o.capacity_bytes.saturating_sub(o.used_bytes)),
                })
            })
            .collect()
    }

    /// Where to publish a volume by default: a schedulable node holding a replica recorded
    /// online (local reads), else any online node holding one, else its first replica's node
    /// (which then answers why it cannot).
    pub fn default_publish_node(&self, v: &VolumeRecord) -> Option<NodeId> {
        let online = v.online_replicas();
        let usable = |r: &&ReplicaRecord, schedulable: bool| {
            self.nodes.get(&r.node).is_some_and(|n| {
                n.online && (!schedulable || (!n.record.cordoned && !n.record.draining))
            })
        };
        v.replicas
            .iter()
            .filter(|r| online.contains(&r.id))
            .find(|r| usable(r, true))
            .or_else(|| {
                v.replicas.iter().filter(|r| online.contains(&r.id)).find(|r| usable(r, false))
            })
            .or_else(|| v.replicas.first())
            .map(|r| r.node.clone())
    }

    /// How many nodes may take a new replica: online, neither cordoned nor draining.
    pub fn schedulable_nodes(&self) -> usize {
        self.nodes.values().filter(|n| n.online && !n.record.cordoned && !n.record.draining).count()
    }

    /// A volume by UUID or by name.
    pub fn find_volume(&self, id: &str) -> Option<&VolumeRecord> {
        match id.parse::<VolumeId>() {
            Ok(uuid) => self.volumes.get(&uuid),
            Err(_) => self.volumes.values().find(|v| v.name.as_str() == id),
        }
    }
}

impl Registry {
    /// Every volume, by name.
    pub fn volumes(&self) -> Vec<Volume> {
        let st = self.state.read();
        let mut out: Vec<Volume> = st.volumes.values().map(|v| view::volume(&st, v)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn volume(&self, id: &str) -> Result<Volume, ControlError> {
        let st = self.state.read();
        st.find_volume(id)
            .map(|v| view::volume(&st, v))
            .ok_or_else(|| ControlError::not_found("volume", id))
    }

    fn volume_spec(&self, id: &str) -> Result<VolumeRecord, ControlError> {
        self.state
            .read()
            .find_volume(id)
            .cloned()
            .ok_or_else(|| ControlError::not_found("volume", id))
    }

    pub fn replicas(&self, volume: Option<&str>) -> Result<Vec<Replica>, ControlError> {
        let st = self.state.read();
        match volume {
            Some(id) => {
                let v = st.find_volume(id).ok_or_else(|| ControlError::not_found("volume", id))?;
                Ok(v.replicas.iter().map(|r| view::replica(&st, v, r)).collect())
            }
            None => Ok(st
                .volumes
                .values()
                .flat_map(|v| v.replicas.iter().map(|r| view::replica(&st, v, r)))
                .collect()),
        }
    }

    /// Creates a volume, or returns the existing one with the same name (or client id) and the
    /// same spec. Returns whether this call created it.
    pub async fn create_volume(
        &self,
        body: CreateVolumeBody,
    ) -> Result<(Volume, bool), ControlError> {
        check_size(body.size)?;
        if body.replicas == 0 {
            return Err(ControlError::InvalidBody { detail: "replicas must be at least 1".into() });
        }
        let _create = self.lock_create().await;
        let existing = {
            let st = self.state.read();
            body.id
                .and_then(|id| st.volumes.get(&id))
                .or_else(|| st.volumes.values().find(|v| v.name == body.name))
                .cloned()
        };
        if let Some(v) = existing {
            return self.existing_volume(v, &body);
        }
        let placement = {
            let st = self.state.read();
            let nodes = st.schedulable_nodes();
            // One replica with no node at all is the scheduler's answer (no pool is usable).
            if body.replicas > 1 && usize::from(body.replicas) > nodes {
                return Err(ControlError::InvalidBody {
                    detail: format!(
                        "replicas is {}, but only {nodes} node(s) can take a replica (online, \
                         neither cordoned nor draining); each replica needs its own node",
                        body.replicas
                    ),
                });
            }
            scheduler::place(
                &st.candidates(),
                usize::from(body.replicas),
                body.size,
                body.thin,
                &[],
            )?
        };
        let record = VolumeRecord {
            version: RECORD_VERSION,
            id: body.id.unwrap_or_else(VolumeId::new_random),
            name: body.name.clone(),
            size: body.size,
            replica_count: body.replicas,
            thin: body.thin,
            publish: None,
            replicas: placement
                .iter()
                .map(|c| ReplicaRecord {
                    id: trireme_types::ReplicaId::new_random(),
                    pool: c.pool.clone(),
                    node: c.node.clone(),
                })
                .collect(),
            phase: VolumePhase::Creating,
            pending: None,
            epoch: 0,
            generation: 0,
            children: Default::default(),
        };
        let key = records::volume_key(&record.id);
        let name_key = records::volume_name_key(&record.name);
        let txn = Txn::new()
            .when(Compare::Absent(key.clone()))
            .when(Compare::Absent(name_key.clone()))
            .put(key.clone(), records::encode(&key, &record)?)
            .put(
                name_key.clone(),
                records::encode(
                    &name_key,
                    &records::NameRecord { version: RECORD_VERSION, volume: record.id },
                )?,
            );
        if !self.store.txn(txn).await?.committed() {
            return Err(ControlError::VolumeConflict {
                name: record.name.to_string(),
                difference: "another volume with this name or id was stored concurrently".into(),
            });
        }
        self.state.write().volumes.insert(record.id, record.clone());
        if let Err(e) = self.create_replicas(&record).await {
            // Undo through the delete path so that a crash during the undo is also finished.
            let undo = self
                .update_volume(record.id, |r| {
                    r.phase = VolumePhase::Deleting;
                    Ok(())
                })
                .await;
            if let Ok((undo, ())) = undo {
                let _ = self.finish_volume_delete(&undo).await;
            }
            return Err(e);
        }
        let (ready, ()) = self
            .update_volume(record.id, |r| {
                r.phase = VolumePhase::Ready;
                Ok(())
            })
            .await?;
        let placed: Vec<String> =
            ready.replicas.iter().map(|r| format!("{} on {}", r.pool, r.node)).collect();
        self.events
            .record(
                Kind::Volume,
                ready.id,
                "created",
                format!(
                    "volume {} ({}, {}) created with replica(s) in pool {}",
                    ready.name,
                    ready.size,
                    if ready.thin { "thin" } else { "thick" },
                    placed.join(", ")
                ),
            )
            .await;
        Ok((self.volume(&ready.id.to_string())?, true))
    }

    fn existing_volume(
        &self,
        v: VolumeRecord,
        body: &CreateVolumeBody,
    ) -> Result<(Volume, bool), ControlError> {
        if v.phase == VolumePhase::Deleting {
            return Err(ControlError::VolumeDeleting { volume: v.id });
        }
        let mut diffs = Vec::new();
        if v.name != body.name {
            diffs.push(format!("id {} belongs to volume {:?}", v.id, v.name.as_str()));
        }
        if let Some(id) = body.id
            && id != v.id
        {
            diffs.push(format!("its id is {}, not {id}", v.id));
        }
        if v.size != body.size {
            diffs.push(format!("size is {}, not {}", v.size, body.size));
        }
        if v.replica_count != body.replicas {
            diffs.push(format!("replicas is {}, not {}", v.replica_count, body.replicas));
        }
        if v.thin != body.thin {
            diffs.push(format!("thin is {}, not {}", v.thin, body.thin));
        }
        if diffs.is_empty() {
            // Idempotent repeat of the same create (CSI retries): the same volume.
            Ok((self.volume(&v.id.to_string())?, false))
        } else {
            Err(ControlError::VolumeConflict {
                name: body.name.to_string(),
                difference: diffs.join("; "),
            })
        }
    }

    /// Creates every replica of the record on its engine (idempotent on the engine side).
    pub(crate) async fn create_replicas(&self, record: &VolumeRecord) -> Result<(), ControlError> {
        for r in &record.replicas {
            self.create_replica(record, r).await?;
        }
        Ok(())
    }

    /// Deletes a volume: unpublish, destroy replicas, remove — each step idempotent.
    pub async fn delete_volume(&self, id: &str) -> Result<(), ControlError> {
        let vid = self.volume_spec(id)?.id;
        let _guard = self.lock_volume(vid).await;
        let mut record =
            self.volume_record(&vid).ok_or_else(|| ControlError::not_found("volume", id))?;
        if record.phase != VolumePhase::Deleting {
            record = self
                .update_volume(vid, |r| {
                    r.phase = VolumePhase::Deleting;
                    Ok(())
                })
                .await?
                .0;
            self.events
                .record(
                    Kind::Volume,
                    vid,
                    "deleting",
                    format!("volume {} is being deleted", record.name),
                )
                .await;
        }
        self.finish_volume_delete(&record).await
    }

    /// The acting half of a delete; the reconciler calls it for volumes left `deleting`.
    /// Engines that are offline are skipped: what they still hold is an orphan, destroyed by
    /// the reconciler when they return.
    pub(crate) async fn finish_volume_delete(
        &self,
        record: &VolumeRecord,
    ) -> Result<(), ControlError> {
        // The nexus where the spec puts it, and any other one seen (an unpublish whose
        // DestroyNexus failed): engines refuse to destroy a replica a nexus still uses.
        let mut nexus_nodes: Vec<NodeId> = {
            let st = self.state.read();
            st.observed
                .iter()
                .filter(|(_, o)| o.nexuses.contains_key(&record.id))
                .map(|(n, _)| n.clone())
                .collect()
        };
        if let Some(node) = &record.publish
            && !nexus_nodes.contains(node)
        {
            nexus_nodes.push(node.clone());
        }
        for node in &nexus_nodes {
            self.destroy_nexus(node, record.id).await?;
        }
        for r in &record.replicas {
            let Some(endpoint) = self.state.read().online_endpoint(&r.node) else { continue };
            let mut client = self.engines.client(&r.node, &endpoint)?;
            let req = rpc::DestroyReplicaRequest { uuid: r.id.to_string() };
            match self.engines.call(&r.node, "DestroyReplica", client.destroy_replica(req)).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {} // already gone
                Err(e) => return Err(e.into()),
            }
            let mut st = self.state.write();
            let gone = st.touched(&r.node).and_then(|o| o.replicas.remove(&r.id));
            // Until the next observation, give the space back so the pool reads right.
            if let Some(rep) = gone
                && let Some(o) = st.pools.get_mut(&r.pool).and_then(|p| p.observed.as_mut())
            {
                if !rep.thin {
                    o.used_bytes = o.used_bytes.saturating_sub(rep.size_bytes);
                }
                o.replica_count = o.replica_count.saturating_sub(1);
            }
        }
        self.remove_volume(record).await?;
        self.events
            .record(Kind::Volume, record.id, "deleted", format!("volume {} deleted", record.name))
            .await;
        Ok(())
    }

    /// Destroys a volume's nexus on `node` if that node is online; absent is success.
    pub(crate) async fn destroy_nexus(
        &self,
        node: &NodeId,
        volume: VolumeId,
    ) -> Result<(), EngineError> {
        let Some(endpoint) = self.state.read().online_endpoint(node) else { return Ok(()) };
        let mut client = self.engines.client(node, &endpoint)?;
        let req = rpc::DestroyNexusRequest { volume_uuid: volume.to_string() };
        match self.engines.call(node, "DestroyNexus", client.destroy_nexus(req)).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        if let Some(o) = self.state.write().touched(node) {
            o.nexuses.remove(&volume);
        }
        Ok(())
    }

    /// Grows a volume: replicas first, then the nexus, then the spec.
    pub async fn resize_volume(&self, id: &str, size: ByteSize) -> Result<Volume, ControlError> {
        check_size(size)?;
        let vid = self.volume_spec(id)?.id;
        let _guard = self.lock_volume(vid).await;
        let mut record =
            self.volume_record(&vid).ok_or_else(|| ControlError::not_found("volume", id))?;
        if record.phase == VolumePhase::Deleting {
            return Err(ControlError::VolumeDeleting { volume: vid });
        }
        if size < record.size {
            return Err(ControlError::Shrink {
                volume: record.name,
                current: record.size,
                requested: size,
            });
        }
        if record.pending == Some(PendingOp::Replicas) {
            return Err(busy(&record, "its replica count is changing"));
        }
        if size == record.size && record.pending.is_none() {
            return self.volume(&vid.to_string()); // idempotent: already this size
        }
        if !record.thin {
            let grow = size.saturating_sub(record.size);
            let st = self.state.read();
            for r in &record.replicas {
                let free = st
                    .pools
                    .get(&r.pool)
                    .and_then(|p| p.observed.as_ref())
                    .map(|o| ByteSize::b(o.capacity_bytes.saturating_sub(o.used_bytes)))
                    .unwrap_or(ByteSize::ZERO);
                if free < grow {
                    return Err(scheduler::PlacementError::InsufficientCapacity {
                        size: grow,
                        largest_free: free,
                    }
                    .into());
                }
            }
        }
        record = self
            .update_volume(vid, |r| {
                r.pending = Some(PendingOp::Resize { size });
                Ok(())
            })
            .await?
            .0;
        match self.apply_resize(&record).await {
            Ok(()) => {}
            Err(ControlError::Engine(e)) if e.is_refusal() => {
                // The engine refused: clear the intent so the reconciler does not retry it. A
                // failure to reach it (Unavailable, a timeout) leaves the intent for the
                // reconciler, or some replicas would stay grown with the volume's size not.
                self.update_volume(vid, |r| {
                    r.pending = None;
                    Ok(())
                })
                .await?;
                return Err(e.into());
            }
            Err(e) => return Err(e), // left pending: the reconciler finishes it
        }
        self.volume(&vid.to_string())
    }

    /// Carries out a pending resize; commits the new size.
    pub(crate) async fn apply_resize(&self, record: &VolumeRecord) -> Result<(), ControlError> {
        let Some(PendingOp::Resize { size }) = record.pending.clone() else {
            return Ok(());
        };
        for r in &record.replicas {
            let endpoint = self.state.read().online_endpoint(&r.node).ok_or_else(|| {
                ControlError::NodeUnavailable { node: r.node.clone(), state: "offline".into() }
            })?;
            let mut client = self.engines.client(&r.node, &endpoint)?;
            let req =
                rpc::ResizeReplicaRequest { uuid: r.id.to_string(), size_bytes: size.bytes() };
            let rep =
                self.engines.call(&r.node, "ResizeReplica", client.resize_replica(req)).await?;
            self.state.write().touch(&r.node).replicas.insert(r.id, rep);
        }
        let nexus_at =
            record.publish.as_ref().and_then(|n| Some((n, self.state.read().online_endpoint(n)?)));
        if let Some((node, endpoint)) = nexus_at {
            let mut client = self.engines.client(node, &endpoint)?;
            let req = rpc::ResizeNexusRequest {
                volume_uuid: record.id.to_string(),
                size_bytes: size.bytes(),
            };
            match self.engines.call(node, "ResizeNexus", client.resize_nexus(req)).await {
                Ok(n) => {
                    self.state.write().touch(node).nexuses.insert(record.id, n);
                }
                // No nexus yet: the reconciler creates it at the new size.
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        let old = record.size;
        let (done, ()) = self
            .update_volume(record.id, |r| {
                r.size = size;
                r.pending = None;
                Ok(())
            })
            .await?;
        self.events
            .record(
                Kind::Volume,
                done.id,
                "resized",
                format!("volume {} grew from {old} to {size}", done.name),
            )
            .await;
        Ok(())
    }

    /// Publishes a volume on `node` and waits, bounded, until its nexus is observed with a
    /// share URI. Any online, uncordoned node will do (replicas elsewhere are reached over
    /// NBD); the default is a node holding a current replica, so that one child is local.
    pub async fn publish_volume(
        &self,
        id: &str,
        node: Option<NodeId>,
    ) -> Result<Volume, ControlError> {
        let vid = self.volume_spec(id)?.id;
        {
            let _guard = self.lock_volume(vid).await;
            let mut record =
                self.volume_record(&vid).ok_or_else(|| ControlError::not_found("volume", id))?;
            if record.phase == VolumePhase::Deleting {
                return Err(ControlError::VolumeDeleting { volume: vid });
            }
            let no_replica = || ControlError::InvalidBody {
                detail: format!("volume {vid} has no replica to publish"),
            };
            if record.replicas.is_empty() {
                return Err(no_replica());
            }
            let target = match (node, &record.publish) {
                (Some(n), _) => n,
                (None, Some(current)) => current.clone(),
                (None, None) => {
                    self.state.read().default_publish_node(&record).ok_or_else(no_replica)?
                }
            };
            if let Some(current) = &record.publish
                && current != &target
            {
                return Err(ControlError::AlreadyPublished { volume: vid, node: current.clone() });
            }
            {
                let st = self.state.read();
                match st.nodes.get(&target) {
                    None => return Err(ControlError::not_found("node", target.as_str())),
                    Some(n) if !n.online => {
                        return Err(ControlError::NodeUnavailable {
                            node: target,
                            state: "offline".into(),
                        });
                    }
                    // Cordoned nodes take no new nexuses; one already there stays.
                    Some(n)
                        if record.publish.is_none() && (n.record.cordoned || n.record.draining) =>
                    {
                        let state = if n.record.draining { "draining" } else { "cordoned" };
                        return Err(ControlError::NodeUnavailable {
                            node: target,
                            state: state.into(),
                        });
                    }
                    Some(_) => {}
                }
            }
            if record.publish.is_none() {
                record = self
                    .update_volume(vid, |r| {
                        r.publish = Some(target.clone());
                        Ok(())
                    })
                    .await?
                    .0;
                self.events
                    .record(
                        Kind::Volume,
                        vid,
                        "publishing",
                        format!("volume {} is being published on node {target}", record.name),
                    )
                    .await;
            }
        }
        self.state.write().nexus_errors.remove(&vid);
        self.wake();
        let mut passes = self.subscribe_passes();
        let wait = async {
            // A message is this request's answer only once a pass started after it has run:
            // the first pass to end may have begun before the publish was recorded.
            let mut passes_ended = 0;
            loop {
                let v = self.volume(&vid.to_string())?;
                if v.status.target.is_some() {
                    return Ok(v);
                }
                // The engine refused the nexus: waiting longer will not change its mind.
                if let Some(e) = self.state.read().nexus_errors.get(&vid).cloned() {
                    return Err(e.into());
                }
                // The reconciler could not create the nexus and says why (no current replica
                // reachable): that waits on a node coming back, which may take hours. Answer
                // now; the publish stands and happens when the replica returns.
                if passes_ended >= 2
                    && let Some(reason) = self.state.read().volume_messages.get(&vid).cloned()
                {
                    return Err(ControlError::VolumeUnavailable { volume: vid, reason });
                }
                if passes.changed().await.is_err() {
                    return Err(ControlError::Timeout {
                        what: format!("publishing volume {vid}"),
                        secs: 0,
                    });
                }
                passes_ended += 1;
            }
        };
        match tokio::time::timeout(PUBLISH_WAIT, wait).await {
            Ok(r) => r,
            Err(_) => Err(ControlError::Timeout {
                what: format!("creating the nexus of volume {vid}"),
                secs: PUBLISH_WAIT.as_secs(),
            }),
        }
    }

    /// Unpublishes: clears the spec first (so a crash leaves an orphan nexus, which the
    /// reconciler destroys), then destroys the nexus.
    pub async fn unpublish_volume(&self, id: &str) -> Result<Volume, ControlError> {
        let vid = self.volume_spec(id)?.id;
        let _guard = self.lock_volume(vid).await;
        let mut record =
            self.volume_record(&vid).ok_or_else(|| ControlError::not_found("volume", id))?;
        let Some(node) = record.publish.take() else {
            return self.volume(&vid.to_string()); // idempotent: not published
        };
        self.update_volume(vid, |r| {
            r.publish = None;
            Ok(())
        })
        .await?;
        self.state.write().volume_messages.remove(&vid);
        if let Err(e) = self.destroy_nexus(&node, vid).await {
            tracing::warn!(volume = %vid, "nexus left for the reconciler: {e}");
        }
        self.events
            .record(
                Kind::Volume,
                vid,
                "unpublished",
                format!("volume {} unpublished from node {node}", record.name),
            )
            .await;
        self.volume(&vid.to_string())
    }
}

/// The answer to a change while another one is still being carried out on the volume.
pub(crate) fn busy(record: &VolumeRecord, why: &str) -> ControlError {
    ControlError::InvalidBody {
        detail: format!("volume {} cannot change now: {why}; retry when it is done", record.name),
    }
}
