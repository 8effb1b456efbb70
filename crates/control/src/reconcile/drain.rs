//! Drain: move every replica and nexus off a draining node, keeping each volume online.
//!
//! ```text
//!   per draining node D, per ready volume V touching D (one step per pass, under V's lock):
//!     fewer replicas off D than V keeps ───────────> add_replica (elsewhere; full rebuild)
//!     a replica off D still rebuilding ────────────> wait (its nexus records it online)
//!     V published on D ────────────────────────────> republish on a node holding an online
//!                                                    replica (new nexus, new epoch; the
//!                                                    orphan collector destroys the old one)
//!     otherwise ───────────────────────────────────> remove_replica(each replica on D)
//!   nothing on D any more ─────────────────────────> D is drained: `cordoned`
//! ```
//!
//! Each step is derived from the store's record alone, so a control restarted mid-drain
//! resumes where it was. A volume that is not published has no nexus to rebuild a new
//! replica: its replica on D goes once another current replica exists (the new one is rebuilt
//! in full when the volume is next published); if D holds its only current replica, the drain
//! waits and says why, rather than lose data.

use trireme_types::{NodeId, VolumeId};

use super::Reconciler;
use crate::events::Kind;
use crate::registry::Registry;
use crate::registry::records::{ChildHealth, ReplicaRecord, VolumePhase, VolumeRecord};

/// The next step of draining one volume off one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    /// Place one more replica elsewhere.
    Add,
    /// Not yet: why, in a sentence (reported once).
    Wait(String),
    /// Run the nexus on this node instead.
    Republish(NodeId),
    /// Remove these replicas (all on the draining node).
    Remove(Vec<ReplicaRecord>),
}

/// What to do next for volume `v` on draining node `node`; `None` when `v` no longer touches
/// it. Pure, so the rules are unit tested. `usable(n)`: node `n` is online and takes new work
/// (not cordoned or draining).
pub(super) fn step(
    v: &VolumeRecord,
    node: &NodeId,
    leaving: impl Fn(&NodeId) -> bool,
    usable: impl Fn(&NodeId) -> bool,
) -> Option<Step> {
    let on: Vec<&ReplicaRecord> = v.replicas.iter().filter(|r| &r.node == node).collect();
    let published_here = v.publish.as_ref() == Some(node);
    if on.is_empty() && !published_here {
        return None;
    }
    if v.phase != VolumePhase::Ready || v.pending.is_some() {
        return Some(Step::Wait(format!(
            "volume {} is being created, resized or deleted; its drain waits for that",
            v.name
        )));
    }
    // Replicas on any draining node are on their way out: they do not count as staying.
    let staying: Vec<&ReplicaRecord> = v.replicas.iter().filter(|r| !leaving(&r.node)).collect();
    if !on.is_empty() && staying.len() < usize::from(v.replica_count.max(1)) {
        return Some(Step::Add);
    }
    let online_staying: Vec<&ReplicaRecord> =
        staying.iter().copied().filter(|r| v.child_health(&r.id) == ChildHealth::Online).collect();
    // The nexus moves as soon as another usable node holds a current replica: the new nexus
    // takes the replicas on this node as remote children and rebuilds the new ones itself,
    // which also covers a draining node that is down (its nexus rebuilds nothing).
    if published_here && let Some(r) = online_staying.iter().find(|r| usable(&r.node)) {
        return Some(Step::Republish(r.node.clone()));
    }
    if v.publish.is_some()
        && let Some(r) = staying.iter().find(|r| v.child_health(&r.id) == ChildHealth::Rebuilding)
    {
        return Some(Step::Wait(format!(
            "replica {} of volume {} on node {} is still rebuilding",
            r.id, v.name, r.node
        )));
    }
    if published_here {
        return Some(Step::Wait(format!(
            "volume {} is published on node {node} and no other usable node holds a current \
             replica of it yet",
            v.name
        )));
    }
    if online_staying.is_empty() {
        return Some(Step::Wait(if v.publish.is_none() {
            format!(
                "volume {} is not published and node {node} holds its only current replica; \
                 publish it so the new replica can be rebuilt, then the drain goes on",
                v.name
            )
        } else {
            format!("volume {} has no current replica off node {node} yet", v.name)
        }));
    }
    Some(Step::Remove(on.into_iter().cloned().collect()))
}

impl Reconciler {
    /// Step 4c: move what draining nodes hold; mark them drained once nothing is left.
    pub(super) async fn drain(&mut self, reg: &Registry) {
        let draining: Vec<NodeId> = reg
            .state
            .read()
            .nodes
            .values()
            .filter(|n| n.record.draining)
            .map(|n| n.record.id.clone())
            .collect();
        for node in draining {
            let touching: Vec<VolumeId> = reg
                .state
                .read()
                .volumes
                .values()
                .filter(|v| {
                    v.publish.as_ref() == Some(&node) || v.replicas.iter().any(|r| r.node == node)
                })
                .map(|v| v.id)
                .collect();
            if touching.is_empty() {
                let subject = format!("finishing the drain of node {node}");
                match reg.finish_drain(&node).await {
                    Ok(_) => self.succeeded(&subject),
                    Err(e) => self.failed(reg, Kind::Node, node.as_str(), subject, e).await,
                }
                continue;
            }
            for vid in touching {
                self.drain_volume(reg, &node, vid).await;
            }
        }
    }

    async fn drain_volume(&mut self, reg: &Registry, node: &NodeId, vid: VolumeId) {
        let subject = format!("draining node {node}: volume {vid}");
        let _op = reg.lock_volume(vid).await;
        let next = {
            let st = reg.state.read();
            let Some(v) = st.volumes.get(&vid) else { return };
            let leaving = |n: &NodeId| st.nodes.get(n).is_some_and(|e| e.record.draining);
            let usable = |n: &NodeId| {
                st.nodes
                    .get(n)
                    .is_some_and(|e| e.online && !e.record.cordoned && !e.record.draining)
            };
            step(v, node, leaving, usable).map(|s| (s, v.name.clone()))
        };
        let Some((next, name)) = next else { return };
        let result = match next {
            Step::Wait(why) => return self.drain_waits(reg, node, subject, why).await,
            Step::Add => match reg.add_replica_locked(vid, &[]).await {
                Ok(r) => Ok(format!(
                    "replica {} of volume {name} placed on node {} to take over from node {node}",
                    r.id, r.node
                )),
                Err(crate::ControlError::Placement(e)) => {
                    let why = format!(
                        "no other node can take a replica of volume {name} ({e}); uncordon or \
                         add a node, or lower its replicas with set-replicas"
                    );
                    return self.drain_waits(reg, node, subject, why).await;
                }
                Err(e) => Err(e),
            },
            Step::Republish(to) => reg
                .update_volume(vid, |r| {
                    if r.publish.as_ref() == Some(node) {
                        r.publish = Some(to.clone());
                    }
                    Ok(())
                })
                .await
                .map(|_| {
                    format!(
                        "volume {name} is republished from node {node} on node {to}; clients \
                         reconnect to its new address"
                    )
                }),
            Step::Remove(replicas) => {
                let mut out: Result<(), crate::ControlError> = Ok(());
                for r in &replicas {
                    if let Err(e) = reg.remove_replica_locked(vid, r.id).await {
                        out = Err(e);
                        break;
                    }
                }
                out.map(|()| format!("volume {name} has no replica left on node {node}"))
            }
        };
        match result {
            Ok(message) => {
                self.succeeded(&subject);
                reg.events().record(Kind::Node, node, "drain_progress", message).await;
                reg.wake();
            }
            Err(e) => self.failed(reg, Kind::Node, node.as_str(), subject, e).await,
        }
    }
}

impl Reconciler {
    /// Says once (until the reason changes or the step succeeds) why a drain cannot go on:
    /// not a failure, but the node stays `draining` meanwhile and the operator should know.
    async fn drain_waits(&mut self, reg: &Registry, node: &NodeId, subject: String, why: String) {
        if self.failures.get(&subject) != Some(&why) {
            reg.events()
                .record(Kind::Node, node, "drain_waiting", format!("{subject}: {why}"))
                .await;
            self.failures.insert(subject, why);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::registry::records::{ChildStatusRecord, RECORD_VERSION};
    use trireme_types::{ByteSize, ReplicaId};

    fn n(s: &str) -> NodeId {
        s.parse().unwrap()
    }

    fn volume(nodes: &[&str], count: u8, publish: Option<&str>) -> VolumeRecord {
        VolumeRecord {
            version: RECORD_VERSION,
            id: VolumeId::new_random(),
            name: "v".parse().unwrap(),
            size: ByteSize::mib(1),
            replica_count: count,
            thin: true,
            publish: publish.map(n),
            replicas: nodes
                .iter()
                .map(|node| ReplicaRecord {
                    id: ReplicaId::new_random(),
                    pool: format!("p-{node}").parse().unwrap(),
                    node: n(node),
                })
                .collect(),
            phase: VolumePhase::Ready,
            pending: None,
            epoch: 1,
            generation: 1,
            children: Default::default(),
        }
    }

    fn rebuilding(v: &mut VolumeRecord, i: usize) {
        v.children.insert(v.replicas[i].id, ChildStatusRecord::new_empty(0));
    }

    fn plan(v: &VolumeRecord) -> Option<Step> {
        step(v, &n("a"), |x| x.as_str() == "a", |x| x.as_str() != "a" && x.as_str() != "down")
    }

    #[test]
    fn a_replica_moves_add_then_wait_then_remove() {
        let mut v = volume(&["a", "b"], 2, Some("b"));
        assert_eq!(plan(&v), Some(Step::Add));
        v.replicas.push(ReplicaRecord {
            id: ReplicaId::new_random(),
            pool: "p-c".parse().unwrap(),
            node: n("c"),
        });
        rebuilding(&mut v, 2);
        assert!(matches!(plan(&v), Some(Step::Wait(w)) if w.contains("rebuilding")));
        v.children.clear();
        assert_eq!(plan(&v), Some(Step::Remove(vec![v.replicas[0].clone()])));
        v.replicas.remove(0);
        assert_eq!(plan(&v), None, "nothing left on the node");
    }

    #[test]
    fn a_nexus_on_a_node_that_is_down_moves_before_the_new_replica_is_rebuilt() {
        let mut v = volume(&["a", "b", "c"], 2, Some("a"));
        rebuilding(&mut v, 2);
        assert_eq!(plan(&v), Some(Step::Republish(n("b"))));
        // One replica only, on the node: the nexus there rebuilds the new one first.
        let mut v = volume(&["a", "b"], 1, Some("a"));
        rebuilding(&mut v, 1);
        assert!(matches!(plan(&v), Some(Step::Wait(w)) if w.contains("rebuilding")));
    }

    #[test]
    fn a_nexus_on_the_node_moves_to_a_usable_node_with_a_current_replica() {
        let mut v = volume(&["a", "down", "c"], 2, Some("a"));
        rebuilding(&mut v, 2);
        assert!(matches!(plan(&v), Some(Step::Wait(w)) if w.contains("rebuilding")));
        v.children.clear();
        assert_eq!(plan(&v), Some(Step::Republish(n("c"))), "not the offline node");
        v.publish = Some(n("c"));
        assert_eq!(plan(&v), Some(Step::Remove(vec![v.replicas[0].clone()])));
        // Published on the node but holding nothing there: only the nexus moves.
        let v = volume(&["b"], 1, Some("a"));
        assert_eq!(plan(&v), Some(Step::Republish(n("b"))));
    }

    #[test]
    fn an_unpublished_volume_never_loses_its_only_current_replica() {
        let mut v = volume(&["a", "b"], 1, None);
        rebuilding(&mut v, 1);
        assert!(
            matches!(plan(&v), Some(Step::Wait(w)) if w.contains("only current replica")),
            "{:?}",
            plan(&v)
        );
        // Another current replica: the one on the node can go; the new one is rebuilt at the
        // next publish.
        let mut v = volume(&["a", "b", "c"], 2, None);
        rebuilding(&mut v, 2);
        assert_eq!(plan(&v), Some(Step::Remove(vec![v.replicas[0].clone()])));
    }

    #[test]
    fn volumes_in_flight_wait() {
        let mut v = volume(&["a"], 1, None);
        v.phase = VolumePhase::Creating;
        assert!(matches!(plan(&v), Some(Step::Wait(_))));
        assert_eq!(plan(&volume(&["b"], 1, Some("b"))), None);
    }
}
