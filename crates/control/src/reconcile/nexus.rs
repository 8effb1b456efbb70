//! Nexuses and orphans: every published volume has its nexus on its publish node; every
//! nexus or replica an engine holds for a volume the store does not own is destroyed.
//!
//! The orphan rule for replicas is deliberately narrow, because destroying one loses data: a
//! replica is destroyed only if no volume in the store lists it AND the volume it names
//! (`volume_uuid`) is one this store deleted (a tombstone) or still has (a replaced replica).
//! Replicas of volumes this store never knew — e.g. after the store was lost — are left alone.

use trireme_rpc as rpc;
use trireme_types::{NodeId, ReplicaId, VolumeId};

use super::Reconciler;
use crate::events::Kind;
use crate::registry::membership::join_of;
use crate::registry::records::{VolumePhase, VolumeRecord};
use crate::registry::{Registry, State};

impl Reconciler {
    /// Step 4: create the nexus of every published volume whose node does not report it.
    /// A nexus that stopped serving on its own (fenced, or it could not record a membership
    /// change) is destroyed first, so that it is recreated with a new epoch from the store.
    pub(super) async fn nexuses(&mut self, reg: &Registry) {
        self.stopped_nexuses(reg).await;
        let todo: Vec<VolumeId> = {
            let st = reg.state.read();
            st.volumes
                .values()
                .filter(|v| v.phase == VolumePhase::Ready)
                .filter(|v| {
                    v.publish.as_ref().is_some_and(|n| {
                        st.node_online(n)
                            && st.observed.get(n).is_some_and(|o| !o.nexuses.contains_key(&v.id))
                    })
                })
                .map(|v| v.id)
                .collect()
        };
        for id in todo {
            let subject = format!("nexus of volume {id}");
            let lost = self.nexuses_seen.contains(&id);
            match create_nexus(reg, id, lost).await {
                Ok(Created::Yes) => {
                    self.succeeded(&subject);
                    self.nexuses_seen.insert(id);
                }
                Ok(Created::Waiting(message)) => {
                    let changed = reg.state.write().volume_messages.insert(id, message.clone())
                        != Some(message.clone());
                    if changed {
                        reg.events()
                            .record(
                                Kind::Volume,
                                id,
                                "volume_waiting",
                                format!("volume {id}: {message}"),
                            )
                            .await;
                    }
                }
                Err(e) => self.failed(reg, Kind::Nexus, &id.to_string(), subject, e).await,
            }
        }
    }

    async fn stopped_nexuses(&mut self, reg: &Registry) {
        let stopped: Vec<(VolumeId, NodeId, String)> = {
            let st = reg.state.read();
            st.volumes
                .values()
                .filter(|v| v.phase == VolumePhase::Ready)
                .filter_map(|v| {
                    let n = crate::registry::view::observed_nexus(&st, v)?;
                    let node = v.publish.clone()?;
                    (!n.stopped_reason.is_empty()).then(|| (v.id, node, n.stopped_reason.clone()))
                })
                .collect()
        };
        for (vid, node, reason) in stopped {
            let subject = format!("stopped nexus of volume {vid} on node {node}");
            let _op = reg.lock_volume(vid).await;
            match reg.destroy_nexus(&node, vid).await {
                Ok(()) => {
                    self.succeeded(&subject);
                    reg.events()
                        .record(
                            Kind::Volume,
                            vid,
                            "nexus_stopped",
                            format!(
                                "the nexus of volume {vid} on node {node} stopped serving ({reason}); recreating it with a new epoch"
                            ),
                        )
                        .await;
                }
                Err(e) => self.failed(reg, Kind::Nexus, &vid.to_string(), subject, e).await,
            }
        }
    }

    /// Step 5: destroy what engines hold for volumes that no longer want it.
    pub(super) async fn destroy_orphaned(&mut self, reg: &Registry) {
        let (nexuses, replicas) = {
            let st = reg.state.read();
            let mut nexuses: Vec<(NodeId, VolumeId)> = Vec::new();
            let mut replicas: Vec<(NodeId, ReplicaId)> = Vec::new();
            for (node, obs) in &st.observed {
                if !st.node_online(node) {
                    continue;
                }
                for vid in obs.nexuses.keys() {
                    let wanted =
                        st.volumes.get(vid).is_some_and(|v| v.publish.as_ref() == Some(node));
                    if !wanted {
                        nexuses.push((node.clone(), *vid));
                    }
                }
                for (rid, rep) in &obs.replicas {
                    if st.replica_owner(rid).is_some() {
                        continue;
                    }
                    let Ok(owner) = rep.volume_uuid.parse::<VolumeId>() else { continue };
                    if !st.tombstones.contains_key(&owner) && !st.volumes.contains_key(&owner) {
                        continue;
                    }
                    replicas.push((node.clone(), *rid));
                }
            }
            (nexuses, replicas)
        };
        for (node, vid) in nexuses {
            // Re-check under the volume lock: a publish may have claimed it meanwhile.
            let _guard = reg.lock_volume(vid).await;
            if reg.volume_record(&vid).is_some_and(|v| v.publish.as_ref() == Some(&node)) {
                continue;
            }
            let subject = format!("orphaned nexus of volume {vid} on node {node}");
            match reg.destroy_nexus(&node, vid).await {
                Ok(()) => {
                    self.succeeded(&subject);
                    reg.events()
                        .record(Kind::Nexus, vid, "orphan_destroyed", format!("destroyed the nexus of volume {vid} on node {node}: not published there"))
                        .await;
                }
                Err(e) => self.failed(reg, Kind::Nexus, &vid.to_string(), subject, e).await,
            }
        }
        for (node, rid) in replicas {
            if reg.state.read().replica_owner(&rid).is_some() {
                continue; // claimed since the observation
            }
            let subject = format!("orphaned replica {rid} on node {node}");
            match reg.destroy_replica_on(&node, rid).await {
                Ok(()) => {
                    self.succeeded(&subject);
                    reg.events()
                        .record(
                            Kind::Replica,
                            rid,
                            "orphan_destroyed",
                            format!("destroyed replica {rid} on node {node}: no volume owns it"),
                        )
                        .await;
                }
                Err(e) => self.failed(reg, Kind::Replica, &rid.to_string(), subject, e).await,
            }
        }
    }
}

/// What creating a volume's nexus came to.
pub(super) enum Created {
    Yes,
    /// Not created: no replica recorded online is on an online node. The message names the
    /// replicas it waits for.
    Waiting(String),
}

/// The children of a new nexus on `node`: every replica, joining as the store says (online,
/// or partial/full for one that missed writes; full for one the latest nexus never claimed,
/// see [`VolumeRecord::join_needs`]). `v` is the record before the epoch bump. `Err(message)` when none recorded online has
/// its node online: creating over stale replicas only would serve old data.
pub(crate) fn nexus_children(
    st: &State,
    v: &VolumeRecord,
    node: &NodeId,
) -> Result<Vec<rpc::ChildSpec>, String> {
    let online = v.online_replicas();
    let current_reachable =
        v.replicas.iter().any(|r| online.contains(&r.id) && st.node_online(&r.node));
    if !current_reachable {
        let waiting: Vec<String> = v
            .replicas
            .iter()
            .filter(|r| online.contains(&r.id))
            .map(|r| format!("replica {} on {}", r.id, r.node))
            .collect();
        return Err(if waiting.is_empty() {
            "no current replica: every replica missed writes; none can be trusted as a source"
                .to_owned()
        } else {
            format!("no current replica reachable: waiting for {}", waiting.join(", "))
        });
    }
    Ok(v.replicas
        .iter()
        .filter_map(|r| {
            let uri = st.child_uri(node, r)?;
            let claimed = st
                .observed
                .get(&r.node)
                .filter(|_| st.node_online(&r.node))
                .and_then(|o| o.replicas.get(&r.id))
                .map(|rep| rep.epoch);
            Some(rpc::ChildSpec {
                uri,
                replica_uuid: r.id.to_string(),
                join: join_of(v.join_needs(&r.id, claimed)) as i32,
            })
        })
        .collect())
}

/// Creates a volume's nexus over all its replicas and records what the engine reports.
/// `lost`: the nexus had been seen on its node before, so it vanished (an engine restart).
///
/// The epoch is bumped and persisted BEFORE CreateNexus: every child is claimed with it, so
/// any older nexus still running somewhere (a partitioned node) is fenced off its replicas and
/// its RecordChildren refused.
async fn create_nexus(
    reg: &Registry,
    id: VolumeId,
    lost: bool,
) -> Result<Created, crate::ControlError> {
    let _guard = reg.lock_volume(id).await;
    let Some(record) = reg.volume_record(&id) else { return Ok(Created::Yes) };
    let Some(node) = record.publish.clone() else { return Ok(Created::Yes) };
    let (endpoint, children) = {
        let st = reg.state.read();
        let Some(endpoint) = st.online_endpoint(&node) else { return Ok(Created::Yes) };
        match nexus_children(&st, &record, &node) {
            Ok(c) => (endpoint, c),
            Err(message) => return Ok(Created::Waiting(message)),
        }
    };
    // A current replica is reachable again: what the volume waited for is no longer the
    // reason (the engine's answer, if it refuses, is).
    reg.state.write().volume_messages.remove(&id);
    let dirty = reg.dirty_log(&id).await?;
    let (record, epoch) = reg
        .update_volume(id, |r| {
            r.epoch += 1;
            Ok(r.epoch)
        })
        .await?;
    let mut client = reg.engines.client(&node, &endpoint)?;
    let req = rpc::CreateNexusRequest {
        volume_uuid: id.to_string(),
        size_bytes: record.size.bytes(),
        children,
        epoch,
        generation: record.generation,
        dirty: dirty.map(|d| rpc::DirtyLog { region_bytes: d.region_bytes, bitmap: d.regions }),
    };
    let nexus = match reg.engines.call(&node, "CreateNexus", client.create_nexus(req)).await {
        Ok(n) => n,
        Err(e) => {
            if e.is_refusal() {
                reg.state.write().nexus_errors.insert(id, e.clone());
            }
            return Err(e.into());
        }
    };
    let uri = nexus.share_uri.clone();
    {
        let mut st = reg.state.write();
        st.nexus_errors.remove(&id);
        st.volume_messages.remove(&id);
        st.touch(&node).nexuses.insert(id, nexus);
    }
    reg.events()
        .record(
            Kind::Volume,
            id,
            if lost { "nexus_recreated" } else { "published" },
            if lost {
                format!("the nexus of volume {} was gone from node {node} (engine restarted?); recreated at {uri} (epoch {epoch})", record.name)
            } else {
                format!("volume {} is published on node {node} at {uri} (epoch {epoch})", record.name)
            },
        )
        .await;
    Ok(Created::Yes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::registry::records::{ChildHealth, ChildStatusRecord, RECORD_VERSION, ReplicaRecord};
    use crate::registry::{NodeEntry, Observation};
    use trireme_api::RebuildKind;
    use trireme_types::ByteSize;

    fn state(online: &[(&str, bool)]) -> State {
        let mut st = State::default();
        for (id, up) in online {
            let nid: NodeId = id.parse().unwrap();
            st.nodes.insert(nid.clone(), NodeEntry::for_test(&nid, *up));
            st.observed.insert(nid, Observation::default());
        }
        st
    }

    fn volume() -> VolumeRecord {
        let r = |node: &str| ReplicaRecord {
            id: ReplicaId::new_random(),
            pool: "p".parse().unwrap(),
            node: node.parse().unwrap(),
        };
        VolumeRecord {
            version: RECORD_VERSION,
            id: VolumeId::new_random(),
            name: "v".parse().unwrap(),
            size: ByteSize::mib(1),
            replica_count: 2,
            thin: true,
            publish: Some("a".parse().unwrap()),
            replicas: vec![r("a"), r("bb")],
            phase: VolumePhase::Ready,
            pending: None,
            epoch: 0,
            generation: 0,
            children: Default::default(),
        }
    }

    #[test]
    fn every_replica_is_a_child_local_or_over_nbd_joining_as_recorded() {
        let st = state(&[("a", true), ("bb", true)]);
        let mut v = volume();
        let (a, b) = (v.replicas[0].id, v.replicas[1].id);
        let mut faulted = ChildStatusRecord::new_empty(0);
        faulted.state = ChildHealth::Faulted;
        faulted.needs = Some(RebuildKind::Partial);
        v.children.insert(b, faulted);
        let got = nexus_children(&st, &v, &"a".parse().unwrap()).unwrap();
        assert_eq!(got[0].uri, format!("replica:///{a}"));
        assert_eq!(got[0].join, rpc::ChildJoin::Online as i32);
        assert_eq!(got[1].uri, format!("nbd://bb:10809/replica-{b}"));
        assert_eq!(got[1].join, rpc::ChildJoin::Partial as i32);
    }

    #[test]
    fn never_over_stale_replicas_only() {
        // The current replica's node is down; the reachable one missed writes.
        let st = state(&[("a", true), ("bb", false)]);
        let mut v = volume();
        let (a, b) = (v.replicas[0].id, v.replicas[1].id);
        let mut faulted = ChildStatusRecord::new_empty(0);
        faulted.state = ChildHealth::Faulted;
        v.children.insert(a, faulted);
        let err = nexus_children(&st, &v, &"a".parse().unwrap()).unwrap_err();
        assert_eq!(err, format!("no current replica reachable: waiting for replica {b} on bb"));
        // Both up: created, the stale one joining for a rebuild.
        let st = state(&[("a", true), ("bb", true)]);
        assert!(nexus_children(&st, &v, &"a".parse().unwrap()).is_ok());
    }
}
