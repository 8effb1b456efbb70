//! Children: bring every replicated volume back to full strength.
//!
//! ```text
//!   per ready volume, per replica (store = the nexus's recorded word, obs = what engines list)
//!     recorded needing FULL, missing from its pool ───────────> CreateReplica (add interrupted)
//!     nexus lacks it, or holds it faulted; node up; pool has it
//!         for --child-retry-secs ─────────────────────────────> AddChild(join = needs)
//!     recorded faulted for --replica-replace-secs, another
//!         current replica reachable ──────────────────────────> add_replica + remove_replica
//!     recorded online, its generation stamp lower ────────────> SetReplicaGeneration
//!     in the nexus but no longer in the volume ───────────────> RemoveChild
//! ```
//!
//! The store's children map is never changed from observations here: only the nexus (through
//! RecordChildren) and control's own add/remove of replicas change it. What the reconciler
//! does is ask the nexus to act; the nexus then records the outcome.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use trireme_api::RebuildKind;
use trireme_rpc as rpc;
use trireme_types::{NodeId, ReplicaId, VolumeId};

use super::Reconciler;
use crate::events::{Kind, now_ms};
use crate::registry::records::{ChildHealth, ReplicaRecord, VolumePhase, VolumeRecord};
use crate::registry::{Registry, State, view};

/// One thing to do for one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// Recorded (needing a full rebuild) but its pool does not have it: create it.
    Create(ReplicaRecord),
    /// The nexus lacks it or holds it faulted, and it is reachable again: add it back.
    Join(ReplicaRecord, Option<RebuildKind>),
    /// Faulted for too long: put a new replica elsewhere, then drop this one.
    Replace(ReplicaRecord),
    /// Current, but its stamped generation is behind the volume's.
    Stamp(NodeId, ReplicaId, u64),
    /// The nexus still holds a replica the volume no longer has (removed while the nexus's
    /// node was away): let go of it.
    Detach(ReplicaId),
}

/// What to do for one volume, from one consistent snapshot. Pure, so the rules are unit
/// tested; the delay before a join is the caller's (it remembers when each was first seen).
pub(super) fn plan(st: &State, v: &VolumeRecord, now: u64, replace_after_ms: u64) -> Vec<Action> {
    let mut actions = Vec::new();
    if v.phase != VolumePhase::Ready || v.pending.is_some() {
        return actions;
    }
    let nexus = view::observed_nexus(st, v);
    let online = v.online_replicas();
    let mut replacing = false;
    for r in &v.replicas {
        let health = v.child_health(&r.id);
        let listed = st.observed.get(&r.node).filter(|_| st.node_online(&r.node));
        let present = listed.and_then(|o| o.replicas.get(&r.id));
        if health != ChildHealth::Online
            && v.child_needs(&r.id) == Some(RebuildKind::Full)
            && listed.is_some()
            && present.is_none()
        {
            actions.push(Action::Create(r.clone()));
        }
        if let (Some(n), Some(_)) = (nexus, present) {
            let uuid = r.id.to_string();
            let child = n.children.iter().find(|c| c.replica_uuid == uuid);
            let joinable = match child {
                None => true,
                Some(c) => c.state == rpc::ChildState::Faulted as i32,
            };
            if joinable {
                let needs = v
                    .join_needs(&r.id, present.map(|p| p.epoch))
                    .or_else(|| {
                        child
                            .and_then(|c| crate::registry::membership::rebuild_kind(c.rebuild_kind))
                    })
                    // Never in the nexus, or no word on what it missed: copy everything.
                    .unwrap_or(RebuildKind::Full);
                actions.push(Action::Join(r.clone(), Some(needs)));
            }
        }
        let faulted_since =
            v.children.get(&r.id).filter(|c| c.state == ChildHealth::Faulted).map(|c| c.since_ms);
        let other_current = v
            .replicas
            .iter()
            .any(|o| o.id != r.id && online.contains(&o.id) && st.node_online(&o.node));
        if let Some(since) = faulted_since
            && now.saturating_sub(since) >= replace_after_ms
            && other_current
            && !replacing
        {
            // One replacement per volume at a time: each one costs a full rebuild.
            replacing = true;
            actions.push(Action::Replace(r.clone()));
        }
        if health == ChildHealth::Online
            && v.generation > 0
            && let Some(rep) = present
            && rep.generation < v.generation
        {
            actions.push(Action::Stamp(r.node.clone(), r.id, v.generation));
        }
    }
    if let Some(n) = nexus {
        for c in &n.children {
            if let Ok(rid) = c.replica_uuid.parse::<ReplicaId>()
                && !v.owns_replica(&rid)
            {
                actions.push(Action::Detach(rid));
            }
        }
    }
    actions
}

impl Reconciler {
    /// Step 4b: returning children, interrupted adds, replacements, generation stamps.
    pub(super) async fn children(&mut self, reg: &Registry) {
        let now = now_ms();
        let replace_after_ms =
            u64::try_from(self.settings.replace_after.as_millis()).unwrap_or(u64::MAX);
        let plans: Vec<(VolumeId, Vec<Action>)> = {
            let st = reg.state.read();
            st.volumes
                .values()
                .map(|v| (v.id, plan(&st, v, now, replace_after_ms)))
                .filter(|(_, a)| !a.is_empty())
                .collect()
        };
        // A child whose rebuild brought it online (or that left the volume) starts afresh; one
        // that keeps failing after each join keeps its growing delay.
        let wanted: Vec<(VolumeId, ReplicaId)> = plans
            .iter()
            .flat_map(|(v, a)| {
                a.iter().filter_map(move |x| match x {
                    Action::Join(r, _) => Some((*v, r.id)),
                    _ => None,
                })
            })
            .collect();
        {
            let st = reg.state.read();
            self.joinable_since.retain(|key @ (vid, rid), _| {
                wanted.contains(key)
                    || st.volumes.get(vid).is_some_and(|v| {
                        v.owns_replica(rid) && v.child_health(rid) != ChildHealth::Online
                    })
            });
        }
        for (vid, actions) in plans {
            for action in actions {
                self.act(reg, vid, action).await;
            }
        }
    }

    async fn act(&mut self, reg: &Registry, vid: VolumeId, action: Action) {
        let id = vid.to_string();
        match action {
            Action::Create(r) => {
                let subject = format!("replica {} of volume {vid}", r.id);
                let _op = reg.lock_volume(vid).await;
                let Some(record) = reg.volume_record(&vid).filter(|v| v.owns_replica(&r.id)) else {
                    return;
                };
                match reg.create_replica(&record, &r).await {
                    Ok(()) => self.succeeded(&subject),
                    Err(e) => self.failed(reg, Kind::Replica, &r.id.to_string(), subject, e).await,
                }
            }
            Action::Join(r, needs) => {
                let entry = self
                    .joinable_since
                    .entry((vid, r.id))
                    .or_insert_with(|| JoinState { since: Instant::now(), attempts: 0 });
                if entry.since.elapsed() < join_delay(self.settings.child_retry, entry.attempts) {
                    return;
                }
                // The next attempt (if this one does not hold) waits longer.
                *entry = JoinState { since: Instant::now(), attempts: entry.attempts + 1 };
                let subject = format!("adding replica {} back to volume {vid}", r.id);
                let _op = reg.lock_volume(vid).await;
                let Some(record) = reg.volume_record(&vid).filter(|v| v.owns_replica(&r.id)) else {
                    return;
                };
                match reg.add_child(&record, &r, needs).await {
                    Ok(()) => {
                        self.succeeded(&subject);
                        reg.events()
                            .record(
                                Kind::Volume,
                                vid,
                                "child_returning",
                                format!(
                                    "replica {} on node {} is reachable again; added back to volume {} ({} rebuild)",
                                    r.id,
                                    r.node,
                                    record.name,
                                    match needs {
                                        Some(RebuildKind::Partial) => "partial",
                                        _ => "full",
                                    }
                                ),
                            )
                            .await;
                    }
                    Err(e) => self.failed(reg, Kind::Volume, &id, subject, e).await,
                }
            }
            Action::Replace(old) => {
                let subject = format!("replacing replica {} of volume {vid}", old.id);
                let _op = reg.lock_volume(vid).await;
                // Re-check under the lock: the child may have come back meanwhile.
                let still = reg.volume_record(&vid).is_some_and(|v| {
                    v.children.get(&old.id).is_some_and(|c| c.state == ChildHealth::Faulted)
                });
                if !still {
                    return;
                }
                let added = match reg.add_replica_locked(vid, &[]).await {
                    Ok(r) => r,
                    Err(e) => return self.failed(reg, Kind::Volume, &id, subject, e).await,
                };
                if let Err(e) = reg.remove_replica_locked(vid, old.id).await {
                    return self.failed(reg, Kind::Volume, &id, subject, e).await;
                }
                self.succeeded(&subject);
                let secs = self.settings.replace_after.as_secs();
                reg.events()
                    .record(
                        Kind::Volume,
                        vid,
                        "replica_replaced",
                        format!(
                            "replica {} on node {} was faulted for more than {secs} s; replaced by replica {} on node {}",
                            old.id, old.node, added.id, added.node
                        ),
                    )
                    .await;
            }
            Action::Detach(rid) => {
                let subject = format!("removing replica {rid} from the nexus of volume {vid}");
                let _op = reg.lock_volume(vid).await;
                let Some(record) = reg.volume_record(&vid).filter(|v| !v.owns_replica(&rid)) else {
                    return;
                };
                match reg.remove_child(&record, rid).await {
                    Ok(()) => self.succeeded(&subject),
                    Err(e) => self.failed(reg, Kind::Volume, &id, subject, e).await,
                }
            }
            Action::Stamp(node, rid, generation) => {
                // Best effort: a failure is retried next pass and reported once.
                let subject = format!("stamping generation on replica {rid}");
                match stamp(reg, &node, rid, generation).await {
                    Ok(()) => self.succeeded(&subject),
                    Err(e) => self.failed(reg, Kind::Replica, &rid.to_string(), subject, e).await,
                }
            }
        }
    }
}

async fn stamp(
    reg: &Registry,
    node: &NodeId,
    rid: ReplicaId,
    generation: u64,
) -> Result<(), crate::engine_client::EngineError> {
    let Some(endpoint) = reg.state.read().online_endpoint(node) else { return Ok(()) };
    let mut client = reg.engines.client(node, &endpoint)?;
    let req = rpc::SetReplicaGenerationRequest { uuid: rid.to_string(), generation };
    let rep =
        reg.engines.call(node, "SetReplicaGeneration", client.set_replica_generation(req)).await?;
    if let Some(o) = reg.state.write().touched(node) {
        o.replicas.insert(rid, rep);
    }
    Ok(())
}

/// A child being brought back: when it was first seen joinable or last tried, and how many
/// times it was added back without staying (a disk that keeps failing, say).
#[derive(Debug, Clone, Copy)]
pub(super) struct JoinState {
    since: Instant,
    attempts: u32,
}

/// Children being brought back, per (volume, replica).
pub(super) type JoinTimes = HashMap<(VolumeId, ReplicaId), JoinState>;

/// The longest wait between two attempts to add a child back.
const MAX_JOIN_DELAY: Duration = Duration::from_secs(30);

/// `--child-retry-secs` before the first attempt, doubling after each one that did not hold,
/// up to [`MAX_JOIN_DELAY`] (never below the flag).
fn join_delay(base: Duration, attempts: u32) -> Duration {
    base.saturating_mul(1 << attempts.min(6)).min(MAX_JOIN_DELAY.max(base))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::registry::records::{ChildStatusRecord, RECORD_VERSION};
    use crate::registry::{NodeEntry, Observation};
    use trireme_types::{ByteSize, FaultReason};

    fn node(st: &mut State, id: &str, online: bool) -> NodeId {
        let nid: NodeId = id.parse().unwrap();
        st.nodes.insert(nid.clone(), NodeEntry::for_test(&nid, online));
        if online {
            st.observed.insert(nid.clone(), Observation::default());
        }
        nid
    }

    /// Two replicas on a and b, published on a, b faulted at t=1000.
    fn setup(b_online: bool) -> (State, VolumeRecord) {
        let mut st = State::default();
        let (a, b) = (node(&mut st, "a", true), node(&mut st, "b", b_online));
        let replicas = vec![
            ReplicaRecord {
                id: ReplicaId::new_random(),
                pool: "pa".parse().unwrap(),
                node: a.clone(),
            },
            ReplicaRecord {
                id: ReplicaId::new_random(),
                pool: "pb".parse().unwrap(),
                node: b.clone(),
            },
        ];
        let mut v = VolumeRecord {
            version: RECORD_VERSION,
            id: VolumeId::new_random(),
            name: "v".parse().unwrap(),
            size: ByteSize::mib(8),
            replica_count: 2,
            thin: false,
            publish: Some(a.clone()),
            replicas: replicas.clone(),
            phase: VolumePhase::Ready,
            pending: None,
            epoch: 3,
            generation: 2,
            children: Default::default(),
        };
        v.children.insert(
            replicas[1].id,
            ChildStatusRecord {
                state: ChildHealth::Faulted,
                reason: Some(FaultReason::Timeout),
                needs: Some(RebuildKind::Partial),
                since_ms: 1000,
                out_epoch: 3,
                last_rebuild: None,
            },
        );
        for r in &replicas {
            if let Some(o) = st.observed.get_mut(&r.node) {
                o.replicas.insert(
                    r.id,
                    // Claimed by the current nexus (epoch 3).
                    rpc::Replica {
                        uuid: r.id.to_string(),
                        generation: 2,
                        epoch: 3,
                        ..Default::default()
                    },
                );
            }
        }
        let nexus = rpc::Nexus {
            volume_uuid: v.id.to_string(),
            children: vec![
                rpc::Child {
                    replica_uuid: replicas[0].id.to_string(),
                    state: rpc::ChildState::Online as i32,
                    ..Default::default()
                },
                rpc::Child {
                    replica_uuid: replicas[1].id.to_string(),
                    state: rpc::ChildState::Faulted as i32,
                    ..Default::default()
                },
            ],
            share_uri: "nbd://x/v".into(),
            ..Default::default()
        };
        st.observed.get_mut(&a).unwrap().nexuses.insert(v.id, nexus);
        v.replicas = replicas;
        (st, v)
    }

    #[test]
    fn a_returning_child_is_joined_with_what_it_needs() {
        let (st, v) = setup(true);
        let got = plan(&st, &v, 2000, 300_000);
        assert_eq!(got, [Action::Join(v.replicas[1].clone(), Some(RebuildKind::Partial))]);
        // Newer nexuses came since (the one that faulted it crashed): it still needs only
        // what the log says.
        let (st, mut v) = setup(true);
        v.epoch = 5;
        let got = plan(&st, &v, 2000, 300_000);
        assert_eq!(got, [Action::Join(v.replicas[1].clone(), Some(RebuildKind::Partial))]);
        // Not claimed by the nexus that faulted it (epoch 3): the older one that did may have
        // written to it unseen: full.
        let (mut st, v) = setup(true);
        let b = &v.replicas[1];
        st.observed.get_mut(&b.node).unwrap().replicas.get_mut(&b.id).unwrap().epoch = 2;
        let got = plan(&st, &v, 2000, 300_000);
        assert_eq!(got, [Action::Join(b.clone(), Some(RebuildKind::Full))]);
        // Its node still away: nothing to join, and too early to replace.
        let (st, v) = setup(false);
        assert!(plan(&st, &v, 2000, 300_000).is_empty());
    }

    #[test]
    fn a_child_faulted_too_long_is_replaced_when_another_is_current() {
        let (st, v) = setup(false);
        let got = plan(&st, &v, 1000 + 300_000, 300_000);
        assert_eq!(got, [Action::Replace(v.replicas[1].clone())]);
        // With no current replica reachable there is nothing to rebuild from: wait.
        let (mut st, v) = setup(false);
        st.nodes.get_mut(&v.replicas[0].node).unwrap().online = false;
        assert!(plan(&st, &v, 1000 + 300_000, 300_000).is_empty());
    }

    #[test]
    fn joins_that_do_not_hold_back_off() {
        let s = Duration::from_secs(1);
        let waits: Vec<u64> = (0..8).map(|n| join_delay(s, n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(join_delay(Duration::from_secs(60), 3), Duration::from_secs(60));
    }

    #[test]
    fn a_child_the_volume_no_longer_has_is_detached() {
        let (st, mut v) = setup(false);
        let gone = v.replicas.remove(1);
        v.children.clear();
        assert_eq!(plan(&st, &v, 2000, 300_000), [Action::Detach(gone.id)]);
    }

    #[test]
    fn stale_generations_are_stamped_and_unfinished_adds_created() {
        let (mut st, mut v) = setup(true);
        v.generation = 3;
        v.children.insert(v.replicas[1].id, ChildStatusRecord::new_empty(0));
        st.observed.get_mut(&v.replicas[1].node).unwrap().replicas.clear();
        let got = plan(&st, &v, 2000, 300_000);
        assert_eq!(
            got,
            [
                Action::Stamp(v.replicas[0].node.clone(), v.replicas[0].id, 3),
                Action::Create(v.replicas[1].clone()),
            ]
        );
    }
}
