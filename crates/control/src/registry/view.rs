//! The REST resources, derived from spec (records) and status (observations). Pure functions of
//! [`State`], so what a client sees is always one consistent snapshot.
//!
//! Child states (and rebuild progress) come from the observed nexus, the engine's live view;
//! the last finished rebuild and the generation come from the store (what the nexus recorded),
//! so they survive an engine restart. A published volume without a nexus shows `faulted` with
//! the reconciler's reason (e.g. the replicas it waits for).

use trireme_api::{
    Child, Node, NodeSpec, NodeStatus, Pool, PoolSpec, PoolState, PoolStatus, RebuildInfo, Replica,
    ReplicaState, ReplicaStatus, Target, Volume, VolumeSpec, VolumeStatus,
};
use trireme_rpc as rpc;
use trireme_types::{
    ByteSize, ChildState, FaultReason, NexusState, NodeState, ReplicaId, VolumeState,
};

use super::records::{ChildHealth, ReplicaRecord, VolumeRecord};
use super::{NodeEntry, PoolEntry, State};

pub fn node(entry: &NodeEntry) -> Node {
    let r = &entry.record;
    let state = match (entry.online, r.draining, r.cordoned) {
        (false, _, _) => NodeState::Offline,
        (true, true, _) => NodeState::Draining,
        (true, false, true) => NodeState::Cordoned,
        (true, false, false) => NodeState::Online,
    };
    Node {
        id: r.id.clone(),
        spec: NodeSpec { cordoned: r.cordoned, draining: r.draining },
        status: NodeStatus {
            state,
            grpc_endpoint: r.grpc_endpoint.clone(),
            nbd_endpoint: r.nbd_endpoint.clone(),
            version: r.engine_version.clone(),
            last_seen_ms: entry.last_seen_ms,
        },
    }
}

pub fn pool_state(p: &rpc::Pool) -> PoolState {
    match rpc::PoolState::try_from(p.state) {
        Ok(rpc::PoolState::Online) => PoolState::Online,
        Ok(rpc::PoolState::Degraded) => PoolState::Degraded,
        Ok(rpc::PoolState::Faulted) => PoolState::Faulted,
        _ => PoolState::Unknown,
    }
}

pub fn pool(st: &State, entry: &PoolEntry) -> Pool {
    let r = &entry.record;
    let observed = entry.observed.as_ref().filter(|_| st.node_online(&r.node));
    let status = match observed {
        Some(p) => PoolStatus {
            state: pool_state(p),
            capacity: ByteSize::b(p.capacity_bytes),
            used: ByteSize::b(p.used_bytes),
            free: ByteSize::b(p.capacity_bytes.saturating_sub(p.used_bytes)),
            replicas: p.replica_count,
            error: (!p.error.is_empty()).then(|| p.error.clone()),
        },
        None => PoolStatus {
            // The engine refused to create or import it (and its node is up): faulted, with
            // the engine's reason; otherwise simply not known yet.
            state: if entry.error.is_some() && st.node_online(&r.node) {
                PoolState::Faulted
            } else {
                PoolState::Unknown
            },
            capacity: ByteSize::ZERO,
            used: ByteSize::ZERO,
            free: ByteSize::ZERO,
            replicas: 0,
            error: entry.error.clone(),
        },
    };
    Pool {
        id: r.id.clone(),
        spec: PoolSpec { node: r.node.clone(), disk: r.disk.clone(), size: r.size },
        status,
    }
}

fn fault_reason(s: &str) -> FaultReason {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).unwrap_or(FaultReason::IoError)
}

pub fn child_state(c: &rpc::Child) -> ChildState {
    match rpc::ChildState::try_from(c.state) {
        Ok(rpc::ChildState::Online) => ChildState::Online,
        Ok(rpc::ChildState::Rebuilding) => ChildState::Rebuilding {
            done_bytes: c.rebuild_done_bytes,
            total_bytes: c.rebuild_total_bytes,
        },
        Ok(rpc::ChildState::Faulted) => {
            ChildState::Faulted { reason: fault_reason(&c.fault_reason) }
        }
        // An engine that does not say is not trusted with reads.
        _ => ChildState::Faulted { reason: FaultReason::Missing },
    }
}

/// A child's state as shown: the nexus's word, except that a child the store already
/// records as faulted shows faulted. The nexus records a fault before it acknowledges the next
/// write, but it is observed only at the next reconcile pass, so for a few seconds the
/// observation can still say `online` about a child that is out.
fn shown_child_state(v: &VolumeRecord, c: &rpc::Child) -> ChildState {
    let observed = child_state(c);
    let recorded = c.replica_uuid.parse::<ReplicaId>().ok().and_then(|id| v.children.get(&id));
    match recorded {
        Some(r) if r.state == ChildHealth::Faulted && observed == ChildState::Online => {
            ChildState::Faulted { reason: r.reason.unwrap_or(FaultReason::IoError) }
        }
        _ => observed,
    }
}

fn nexus_state(n: &rpc::Nexus) -> NexusState {
    match rpc::NexusState::try_from(n.state) {
        Ok(rpc::NexusState::Online) => NexusState::Online,
        Ok(rpc::NexusState::Degraded) => NexusState::Degraded,
        Ok(rpc::NexusState::Faulted) => NexusState::Faulted,
        _ => {
            NexusState::from_children(n.children.iter().map(child_state).collect::<Vec<_>>().iter())
        }
    }
}

/// The volume's nexus as observed on its publish node, if that node is online.
pub fn observed_nexus<'a>(st: &'a State, v: &VolumeRecord) -> Option<&'a rpc::Nexus> {
    let node = v.publish.as_ref()?;
    if !st.node_online(node) {
        return None;
    }
    st.observed.get(node)?.nexuses.get(&v.id)
}

pub fn replica(st: &State, v: &VolumeRecord, r: &ReplicaRecord) -> Replica {
    let observed = st.observed.get(&r.node).filter(|_| st.node_online(&r.node));
    let (state, allocated, size) = match observed {
        None => (ReplicaState::Unknown, ByteSize::ZERO, v.size),
        Some(o) => match o.replicas.get(&r.id) {
            Some(rep) => (
                ReplicaState::Online,
                ByteSize::b(rep.allocated_bytes),
                ByteSize::b(rep.size_bytes),
            ),
            None => (ReplicaState::Missing, ByteSize::ZERO, v.size),
        },
    };
    let child = observed_nexus(st, v).and_then(|n| {
        let c = n.children.iter().find(|c| c.replica_uuid == r.id.to_string())?;
        Some(shown_child_state(v, c))
    });
    Replica {
        id: r.id,
        volume: v.id,
        pool: r.pool.clone(),
        node: r.node.clone(),
        size,
        thin: v.thin,
        status: ReplicaStatus {
            state,
            allocated,
            child,
            generation: observed
                .and_then(|o| o.replicas.get(&r.id))
                .map_or(0, |rep| rep.generation),
            last_rebuild: last_rebuild(v, &r.id, None),
        },
    }
}

pub fn volume(st: &State, v: &VolumeRecord) -> Volume {
    let nexus = observed_nexus(st, v);
    let target = match (nexus, &v.publish) {
        (Some(n), Some(node)) if !n.share_uri.is_empty() => {
            let children: Vec<Child> = n
                .children
                .iter()
                .filter_map(|c| {
                    let replica: ReplicaId = c.replica_uuid.parse().ok()?;
                    Some(Child {
                        replica,
                        uri: c.uri.clone(),
                        state: shown_child_state(v, c),
                        last_rebuild: last_rebuild(v, &replica, Some(c)),
                    })
                })
                .collect();
            let observed = nexus_state(n);
            // A child shown faulted from the store's record also degrades the nexus.
            let state = match observed {
                NexusState::Online => NexusState::from_children(children.iter().map(|c| &c.state)),
                other => other,
            };
            Some(Target { node: node.clone(), uri: n.share_uri.clone(), state, children })
        }
        _ => None,
    };
    // Why a published volume on a reachable node has no nexus: the reconciler's reason, or
    // the engine's refusal.
    let waiting =
        v.publish.as_ref().filter(|n| target.is_none() && st.node_online(n)).and_then(|_| {
            st.volume_messages
                .get(&v.id)
                .cloned()
                .or_else(|| st.nexus_errors.get(&v.id).map(|e| e.to_string()))
        });
    let state = match (&target, &waiting) {
        (Some(t), _) => VolumeState::from(t.state),
        (None, Some(_)) => VolumeState::Faulted,
        (None, None) => VolumeState::Unknown,
    };
    let message = waiting.or_else(|| {
        let t = target.as_ref()?;
        let out: Vec<String> = t
            .children
            .iter()
            .filter_map(|c| match c.state {
                ChildState::Online => None,
                ChildState::Faulted { reason } => Some(format!(
                    "replica {} is faulted ({})",
                    c.replica,
                    serde_json::to_value(reason)
                        .ok()
                        .and_then(|x| x.as_str().map(str::to_owned))
                        .unwrap_or_default()
                )),
                ChildState::Rebuilding { done_bytes, total_bytes } => Some(format!(
                    "replica {} is rebuilding ({} of {})",
                    c.replica,
                    ByteSize::b(done_bytes),
                    ByteSize::b(total_bytes)
                )),
            })
            .collect();
        (!out.is_empty()).then(|| out.join("; "))
    });
    Volume {
        id: v.id,
        name: v.name.clone(),
        spec: VolumeSpec {
            size: v.size,
            replicas: v.replica_count,
            thin: v.thin,
            publish: v.publish.clone(),
        },
        status: VolumeStatus {
            state,
            target,
            replicas: v.replicas.iter().map(|r| replica(st, v, r)).collect(),
            generation: v.generation,
            message,
        },
    }
}

/// A replica's last finished rebuild: as recorded in the store, else as its nexus reports it.
fn last_rebuild(v: &VolumeRecord, r: &ReplicaId, c: Option<&rpc::Child>) -> Option<RebuildInfo> {
    v.children.get(r).and_then(|e| e.last_rebuild).or_else(|| {
        let c = c?;
        let kind = crate::registry::membership::rebuild_kind(c.last_rebuild_kind)?;
        Some(RebuildInfo {
            kind,
            copied: ByteSize::b(c.last_rebuild_copied_bytes),
            duration_ms: c.last_rebuild_millis,
        })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::registry::records::{RECORD_VERSION, VolumePhase};
    use crate::registry::{NodeEntry, Observation};
    use trireme_types::{NodeId, ReplicaId, VolumeId};

    fn state_with(child_states: &[rpc::ChildState], online: bool) -> (State, VolumeRecord) {
        let node = NodeId::new("n1").unwrap();
        let mut st = State::default();
        st.nodes.insert(node.clone(), NodeEntry::for_test(&node, online));
        let replicas: Vec<ReplicaRecord> = child_states
            .iter()
            .map(|_| ReplicaRecord {
                id: ReplicaId::new_random(),
                pool: "p".parse().unwrap(),
                node: node.clone(),
            })
            .collect();
        let v = VolumeRecord {
            version: RECORD_VERSION,
            id: VolumeId::new_random(),
            name: "v".parse().unwrap(),
            size: ByteSize::mib(1),
            replica_count: 1,
            thin: false,
            publish: Some(node.clone()),
            replicas: replicas.clone(),
            phase: VolumePhase::Ready,
            pending: None,
            epoch: 0,
            generation: 0,
            children: Default::default(),
        };
        let nexus = rpc::Nexus {
            volume_uuid: v.id.to_string(),
            size_bytes: 1 << 20,
            children: replicas
                .iter()
                .zip(child_states)
                .map(|(r, s)| rpc::Child {
                    uri: format!("replica:///{}", r.id),
                    replica_uuid: r.id.to_string(),
                    state: *s as i32,
                    fault_reason: "timeout".into(),
                    ..Default::default()
                })
                .collect(),
            // Unspecified: derived from the children.
            state: 0,
            share_uri: "nbd://h:1/x".into(),
            ..Default::default()
        };
        let mut obs = Observation::default();
        obs.nexuses.insert(v.id, nexus);
        st.observed.insert(node, obs);
        (st, v)
    }

    #[test]
    fn volume_state_follows_the_observed_nexus() {
        use rpc::ChildState as C;
        let (st, v) = state_with(&[C::Online, C::Online], true);
        assert_eq!(volume(&st, &v).status.state, VolumeState::Online);
        let (st, v) = state_with(&[C::Online, C::Faulted], true);
        let got = volume(&st, &v);
        assert_eq!(got.status.state, VolumeState::Degraded);
        assert_eq!(
            got.status.replicas[1].status.child,
            Some(ChildState::Faulted { reason: FaultReason::Timeout })
        );
        let (st, v) = state_with(&[C::Faulted], true);
        assert_eq!(volume(&st, &v).status.state, VolumeState::Faulted);
        // Its node is offline: unknown, and no stale target is shown.
        let (st, v) = state_with(&[C::Online], false);
        let got = volume(&st, &v);
        assert_eq!(got.status.state, VolumeState::Unknown);
        assert!(got.status.target.is_none());
        // Not published: unknown.
        let (st, mut v) = state_with(&[C::Online], true);
        v.publish = None;
        assert_eq!(volume(&st, &v).status.state, VolumeState::Unknown);
    }

    #[test]
    fn a_fault_in_the_store_shows_before_the_next_observation() {
        use crate::registry::records::ChildStatusRecord;
        use rpc::ChildState as C;
        let (st, mut v) = state_with(&[C::Online, C::Online], true);
        let mut entry = ChildStatusRecord::new_empty(0);
        entry.state = ChildHealth::Faulted;
        entry.reason = Some(FaultReason::Disconnected);
        v.children.insert(v.replicas[1].id, entry);
        let got = volume(&st, &v);
        assert_eq!(got.status.state, VolumeState::Degraded);
        let faulted = ChildState::Faulted { reason: FaultReason::Disconnected };
        assert_eq!(got.status.replicas[1].status.child, Some(faulted));
        assert_eq!(got.status.target.unwrap().children[1].state, faulted);
        assert_eq!(got.status.replicas[0].status.child, Some(ChildState::Online));
    }

    #[test]
    fn a_waiting_volume_is_faulted_with_its_reason_and_rebuilds_are_shown() {
        use crate::registry::records::ChildStatusRecord;
        use rpc::ChildState as C;
        let (mut st, v) = state_with(&[C::Online], true);
        st.observed.values_mut().for_each(|o| o.nexuses.clear());
        st.volume_messages.insert(v.id, "no current replica reachable: waiting for x".into());
        let got = volume(&st, &v);
        assert_eq!(got.status.state, VolumeState::Faulted);
        assert!(got.status.message.unwrap().contains("waiting for x"));

        let (st, mut v) = state_with(&[C::Online, C::Rebuilding], true);
        let info = RebuildInfo {
            kind: trireme_api::RebuildKind::Full,
            copied: ByteSize::mib(2),
            duration_ms: 9,
        };
        let mut entry = ChildStatusRecord::new_empty(0);
        entry.last_rebuild = Some(info);
        v.children.insert(v.replicas[0].id, entry);
        v.generation = 4;
        let got = volume(&st, &v);
        assert_eq!(got.status.generation, 4);
        assert_eq!(got.status.replicas[0].status.last_rebuild, Some(info));
        assert_eq!(got.status.target.unwrap().children[0].last_rebuild, Some(info));
        assert!(got.status.message.unwrap().contains("rebuilding"));
    }
}
