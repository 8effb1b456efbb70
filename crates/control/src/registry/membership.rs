//! What a nexus records about its children (`RecordChildren`) and the regions written while a
//! child was out (`MarkDirty`), and the fencing rule both follow.
//!
//! ```text
//!   nexus ── RecordChildren(epoch, children) ──> epoch == volume.epoch? ──no──> FAILED_PRECONDITION
//!                                                   │yes                        ("fenced")
//!                                                   ▼
//!                         merge into volume.children, generation += 1 if the online set
//!                         changed, drop dirty/<uuid> on clear_dirty — ONE store commit
//!                                                   ▼
//!                                  events: child_faulted, rebuild_started, rebuild_finished
//!                                          (= back online)
//! ```
//!
//! The nexus's report is its word on the children it holds; replicas of the volume it does
//! not report (one control is adding, say) keep their entry, and reported replicas the volume
//! no longer has (just removed) are ignored. Both calls are on the write path of the nexus
//! (it holds acknowledgements until they return), so each is one short store commit under the
//! volume's record lock — never behind the operation lock that engine calls hold.

use std::collections::BTreeSet;

use trireme_api::{RebuildInfo, RebuildKind};
use trireme_rpc as rpc;
use trireme_types::{ByteSize, FaultReason, NodeId, ReplicaId, VolumeId};

use super::Registry;
use super::records::{
    self, ChildHealth, ChildStatusRecord, DirtyRecord, MAX_DIRTY_REGIONS, VolumeRecord,
};
use crate::ControlError;
use crate::events::{Kind, now_ms};

/// Why a RecordChildren or MarkDirty was refused.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(
        "fenced: volume {volume} is at epoch {current}, this nexus has epoch {epoch}; a newer nexus exists"
    )]
    Fenced { volume: VolumeId, epoch: u64, current: u64 },
    #[error(
        "volume {volume} is at epoch {current}, this nexus claims {epoch}, which control never issued"
    )]
    UnknownEpoch { volume: VolumeId, epoch: u64, current: u64 },
    #[error("volume {0} is not known to control")]
    UnknownVolume(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// One child as the nexus reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildReport {
    pub replica: ReplicaId,
    pub state: ChildHealth,
    pub reason: Option<FaultReason>,
    pub needs: Option<RebuildKind>,
    pub copied_bytes: u64,
    pub millis: u64,
}

impl ChildReport {
    pub fn from_rpc(c: &rpc::ChildRecord) -> Result<Self, MembershipError> {
        let replica = c.replica_uuid.parse::<ReplicaId>().map_err(|e| {
            MembershipError::Invalid(format!("replica_uuid {:?}: {e}", c.replica_uuid))
        })?;
        let state = match rpc::ChildState::try_from(c.state) {
            Ok(rpc::ChildState::Online) => ChildHealth::Online,
            Ok(rpc::ChildState::Faulted) => ChildHealth::Faulted,
            Ok(rpc::ChildState::Rebuilding) => ChildHealth::Rebuilding,
            _ => {
                return Err(MembershipError::Invalid(format!(
                    "child {replica} has no state ({})",
                    c.state
                )));
            }
        };
        let reason = (state == ChildHealth::Faulted).then(|| fault_reason(&c.fault_reason));
        Ok(Self {
            replica,
            state,
            reason,
            needs: rebuild_kind(c.needs),
            copied_bytes: c.rebuilt_copied_bytes,
            millis: c.rebuilt_millis,
        })
    }
}

/// A `ChildJoin` as what a child needs (`ONLINE` means nothing).
pub fn rebuild_kind(join: i32) -> Option<RebuildKind> {
    match rpc::ChildJoin::try_from(join) {
        Ok(rpc::ChildJoin::Partial) => Some(RebuildKind::Partial),
        Ok(rpc::ChildJoin::Full) => Some(RebuildKind::Full),
        _ => None,
    }
}

pub fn join_of(needs: Option<RebuildKind>) -> rpc::ChildJoin {
    match needs {
        None => rpc::ChildJoin::Online,
        Some(RebuildKind::Partial) => rpc::ChildJoin::Partial,
        Some(RebuildKind::Full) => rpc::ChildJoin::Full,
    }
}

fn fault_reason(s: &str) -> FaultReason {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).unwrap_or(FaultReason::IoError)
}

fn kind_str(k: RebuildKind) -> &'static str {
    match k {
        RebuildKind::Partial => "partial",
        RebuildKind::Full => "full",
    }
}

/// A change of one child's recorded state, each one an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildChange {
    Faulted {
        replica: ReplicaId,
        reason: FaultReason,
        needs: RebuildKind,
    },
    RebuildStarted {
        replica: ReplicaId,
        kind: RebuildKind,
    },
    /// Also the child's return to `online`: the nexus turns a child online only through a
    /// finished rebuild.
    RebuildFinished {
        replica: ReplicaId,
        info: RebuildInfo,
    },
}

impl ChildChange {
    /// The event's reason and message.
    pub fn event(&self, v: &VolumeRecord) -> (&'static str, String) {
        let at = |r: &ReplicaId| {
            v.replica(r).map(|x| format!(" on node {}", x.node)).unwrap_or_default()
        };
        match self {
            Self::Faulted { replica, reason, needs } => (
                "child_faulted",
                format!(
                    "replica {replica}{} of volume {} faulted ({}); it needs a {} rebuild",
                    at(replica),
                    v.name,
                    serde_json::to_value(reason)
                        .ok()
                        .and_then(|x| x.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    kind_str(*needs)
                ),
            ),
            Self::RebuildStarted { replica, kind } => (
                "rebuild_started",
                format!(
                    "{} rebuild of replica {replica}{} of volume {} started",
                    kind_str(*kind),
                    at(replica),
                    v.name
                ),
            ),
            Self::RebuildFinished { replica, info } => (
                "rebuild_finished",
                format!(
                    "{} rebuild of replica {replica}{} of volume {} finished: {} copied in {} ms; it is online",
                    kind_str(info.kind),
                    at(replica),
                    v.name,
                    info.copied,
                    info.duration_ms
                ),
            ),
        }
    }
}

/// Merges the report of the nexus of `epoch` into the record; returns what changed. Pure, so
/// it is tested without a store.
pub fn apply_report(
    record: &mut VolumeRecord,
    reports: &[ChildReport],
    epoch: u64,
    now: u64,
) -> Vec<ChildChange> {
    let mut changes = Vec::new();
    for rep in reports {
        if !record.owns_replica(&rep.replica) {
            continue; // removed meanwhile: its last word no longer matters
        }
        let prev = record.children.get(&rep.replica).cloned();
        let prev_state = prev.as_ref().map_or(ChildHealth::Online, |c| c.state);
        let prev_needs = prev.as_ref().and_then(|c| c.needs);
        let last_rebuild = prev.as_ref().and_then(|c| c.last_rebuild);
        let prev_out = prev.as_ref().map_or(0, |c| c.out_epoch);
        let since = |same: bool| if same { prev.as_ref().map_or(now, |c| c.since_ms) } else { now };
        match rep.state {
            ChildHealth::Online => {
                if prev_state == ChildHealth::Online {
                    continue;
                }
                // Back online from faulted or rebuilding: the nexus turns a child online only
                // once its rebuild copied every region it needed.
                let info = RebuildInfo {
                    kind: prev_needs.unwrap_or(RebuildKind::Full),
                    copied: ByteSize::b(rep.copied_bytes),
                    duration_ms: rep.millis,
                };
                record.children.insert(
                    rep.replica,
                    ChildStatusRecord {
                        state: ChildHealth::Online,
                        reason: None,
                        needs: None,
                        since_ms: now,
                        out_epoch: 0,
                        last_rebuild: Some(info),
                    },
                );
                changes.push(ChildChange::RebuildFinished { replica: rep.replica, info });
            }
            ChildHealth::Faulted => {
                let needs = rep.needs.or(prev_needs).unwrap_or(RebuildKind::Full);
                let reason = rep.reason.unwrap_or(FaultReason::IoError);
                let same = prev_state == ChildHealth::Faulted;
                record.children.insert(
                    rep.replica,
                    ChildStatusRecord {
                        state: ChildHealth::Faulted,
                        reason: Some(reason),
                        needs: Some(needs),
                        since_ms: since(same),
                        // This nexus wrote to it until now (online or rebuilding); it is the
                        // one whose claim makes the dirty-region log enough.
                        out_epoch: if same { prev_out } else { epoch },
                        last_rebuild,
                    },
                );
                if !same {
                    changes.push(ChildChange::Faulted { replica: rep.replica, reason, needs });
                }
            }
            ChildHealth::Rebuilding => {
                let kind = rep.needs.or(prev_needs).unwrap_or(RebuildKind::Full);
                let same = prev_state == ChildHealth::Rebuilding;
                record.children.insert(
                    rep.replica,
                    ChildStatusRecord {
                        state: ChildHealth::Rebuilding,
                        reason: None,
                        needs: Some(kind),
                        since_ms: since(same),
                        out_epoch: prev_out,
                        last_rebuild,
                    },
                );
                if !same {
                    changes.push(ChildChange::RebuildStarted { replica: rep.replica, kind });
                }
            }
        }
    }
    changes
}

/// Checks a nexus's epoch against the volume's.
fn check_epoch(record: &VolumeRecord, epoch: u64) -> Result<(), MembershipError> {
    let (volume, current) = (record.id, record.epoch);
    if epoch < current {
        return Err(MembershipError::Fenced { volume, epoch, current });
    }
    if epoch > current {
        return Err(MembershipError::UnknownEpoch { volume, epoch, current });
    }
    Ok(())
}

impl Registry {
    /// `RecordChildren`: see the module doc. Returns the generation now stored.
    pub async fn record_children(
        &self,
        req: &rpc::RecordChildrenRequest,
    ) -> Result<u64, MembershipError> {
        let vid = req
            .volume_uuid
            .parse::<VolumeId>()
            .map_err(|_| MembershipError::UnknownVolume(req.volume_uuid.clone()))?;
        let reports =
            req.children.iter().map(ChildReport::from_rpc).collect::<Result<Vec<_>, _>>()?;
        let node: Option<NodeId> = req.node_id.parse().ok();
        let now = now_ms();
        let _record = self.lock_record(vid).await;
        let mut record = self
            .volume_record(&vid)
            .ok_or_else(|| MembershipError::UnknownVolume(req.volume_uuid.clone()))?;
        check_epoch(&record, req.epoch)?;
        let before: BTreeSet<ReplicaId> = record.online_replicas();
        let changes = apply_report(&mut record, &reports, req.epoch, now);
        let after = record.online_replicas();
        let membership_changed = before != after;
        if membership_changed {
            record.generation += 1;
        }
        // Only when every replica is current again may the regions they missed be forgotten.
        let clear = req.clear_dirty && after.len() == record.replicas.len();
        if changes.is_empty() && !membership_changed && !clear {
            return Ok(record.generation); // a repeat: nothing to write
        }
        let key = records::volume_key(&vid);
        let mut txn = trireme_store::Txn::new()
            .put(key.clone(), records::encode(&key, &record).map_err(ControlError::from)?);
        if clear {
            txn = txn.delete(records::dirty_key(&vid));
        }
        self.store.txn(txn).await.map_err(ControlError::from)?;
        self.state.write().volumes.insert(vid, record.clone());
        drop(_record);
        tracing::debug!(volume = %vid, node = ?node, generation = record.generation, "children recorded");
        for c in &changes {
            let (reason, message) = c.event(&record);
            self.events.record(Kind::Volume, vid, reason, message).await;
        }
        if !changes.is_empty() {
            // Returning children and generation stamps are the reconciler's to act on.
            self.wake();
        }
        Ok(record.generation)
    }

    /// `MarkDirty`: ORs the regions into the volume's dirty-region log.
    pub async fn mark_dirty(&self, req: &rpc::MarkDirtyRequest) -> Result<(), MembershipError> {
        let vid = req
            .volume_uuid
            .parse::<VolumeId>()
            .map_err(|_| MembershipError::UnknownVolume(req.volume_uuid.clone()))?;
        let _record = self.lock_record(vid).await;
        let record = self
            .volume_record(&vid)
            .ok_or_else(|| MembershipError::UnknownVolume(req.volume_uuid.clone()))?;
        check_epoch(&record, req.epoch)?;
        let rb = req.region_bytes;
        if rb < 512 || !rb.is_power_of_two() {
            return Err(MembershipError::Invalid(format!(
                "region_bytes {rb} is not a power of two of at least 512"
            )));
        }
        let count = record.target_size().bytes().div_ceil(rb).min(MAX_DIRTY_REGIONS);
        if let Some(bad) = req.regions.iter().find(|&&i| i >= count) {
            return Err(MembershipError::Invalid(format!(
                "region {bad} is beyond the volume's {count} regions of {rb} bytes"
            )));
        }
        let key = records::dirty_key(&vid);
        let mut log = match self.store.get(&key).await.map_err(ControlError::from)? {
            Some(v) => {
                records::decode::<DirtyRecord>(&key, &v.value).map_err(ControlError::from)?
            }
            None => DirtyRecord::new(rb),
        };
        log.mark(rb, &req.regions);
        self.store
            .put(&key, records::encode(&key, &log).map_err(ControlError::from)?)
            .await
            .map_err(ControlError::from)?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::registry::records::{RECORD_VERSION, ReplicaRecord, VolumePhase};

    fn volume(n: usize) -> VolumeRecord {
        VolumeRecord {
            version: RECORD_VERSION,
            id: VolumeId::new_random(),
            name: "v".parse().unwrap(),
            size: ByteSize::mib(8),
            replica_count: n as u8,
            thin: false,
            publish: None,
            replicas: (0..n)
                .map(|i| ReplicaRecord {
                    id: ReplicaId::new_random(),
                    pool: format!("p{i}").parse().unwrap(),
                    node: format!("n{i}").parse().unwrap(),
                })
                .collect(),
            phase: VolumePhase::Ready,
            pending: None,
            epoch: 1,
            generation: 0,
            children: Default::default(),
        }
    }

    fn report(r: ReplicaId, state: ChildHealth, needs: Option<RebuildKind>) -> ChildReport {
        ChildReport {
            replica: r,
            state,
            reason: (state == ChildHealth::Faulted).then_some(FaultReason::Timeout),
            needs,
            copied_bytes: 0,
            millis: 0,
        }
    }

    #[test]
    fn a_fault_then_a_partial_rebuild_is_recorded_with_its_summary() {
        let mut v = volume(2);
        let (a, b) = (v.replicas[0].id, v.replicas[1].id);
        let all_online =
            [report(a, ChildHealth::Online, None), report(b, ChildHealth::Online, None)];
        assert!(apply_report(&mut v, &all_online, 1, 1).is_empty(), "nothing changed");
        assert!(v.children.is_empty());

        let changes = apply_report(
            &mut v,
            &[
                report(a, ChildHealth::Online, None),
                report(b, ChildHealth::Faulted, Some(RebuildKind::Partial)),
            ],
            1,
            10,
        );
        assert_eq!(
            changes,
            [ChildChange::Faulted {
                replica: b,
                reason: FaultReason::Timeout,
                needs: RebuildKind::Partial
            }]
        );
        assert_eq!(v.online_replicas().into_iter().collect::<Vec<_>>(), [a]);
        assert_eq!(v.children[&b].out_epoch, 1, "recorded out by the nexus of epoch 1");
        // Repeating the same report (even from a later nexus) keeps the time it faulted (the
        // replacement timer) and the nexus that faulted it.
        apply_report(&mut v, &[report(b, ChildHealth::Faulted, None)], 2, 99);
        assert_eq!(v.children[&b].since_ms, 10);
        assert_eq!(v.children[&b].out_epoch, 1);
        assert_eq!(v.children[&b].needs, Some(RebuildKind::Partial));

        let changes = apply_report(&mut v, &[report(b, ChildHealth::Rebuilding, None)], 1, 20);
        assert_eq!(
            changes,
            [ChildChange::RebuildStarted { replica: b, kind: RebuildKind::Partial }]
        );
        let mut done = report(b, ChildHealth::Online, None);
        done.copied_bytes = 3 << 20;
        done.millis = 42;
        let changes = apply_report(&mut v, &[done], 1, 30);
        let info =
            RebuildInfo { kind: RebuildKind::Partial, copied: ByteSize::mib(3), duration_ms: 42 };
        assert_eq!(changes, [ChildChange::RebuildFinished { replica: b, info }]);
        assert_eq!(v.children[&b].last_rebuild, Some(info));
        assert_eq!(v.online_replicas().len(), 2);
    }

    #[test]
    fn unreported_replicas_keep_their_entry_and_unknown_ones_are_ignored() {
        let mut v = volume(2);
        let (a, added) = (v.replicas[0].id, v.replicas[1].id);
        v.children.insert(added, ChildStatusRecord::new_empty(5));
        let stranger = ReplicaId::new_random();
        let changes = apply_report(
            &mut v,
            &[report(a, ChildHealth::Online, None), report(stranger, ChildHealth::Online, None)],
            1,
            9,
        );
        assert!(changes.is_empty());
        assert_eq!(v.child_health(&added), ChildHealth::Rebuilding, "not guessed online");
        assert!(!v.children.contains_key(&stranger));
    }

    #[test]
    fn epochs_older_and_newer_are_refused() {
        let mut v = volume(1);
        v.epoch = 5;
        assert!(check_epoch(&v, 5).is_ok());
        assert!(matches!(check_epoch(&v, 4), Err(MembershipError::Fenced { current: 5, .. })));
        assert!(matches!(check_epoch(&v, 6), Err(MembershipError::UnknownEpoch { .. })));
        assert!(check_epoch(&v, 4).unwrap_err().to_string().starts_with("fenced"));
    }

    #[test]
    fn child_records_from_the_wire() {
        let r = ReplicaId::new_random();
        let c = rpc::ChildRecord {
            replica_uuid: r.to_string(),
            state: rpc::ChildState::Faulted as i32,
            fault_reason: "disconnected".into(),
            needs: rpc::ChildJoin::Full as i32,
            ..Default::default()
        };
        let got = ChildReport::from_rpc(&c).unwrap();
        assert_eq!(got.reason, Some(FaultReason::Disconnected));
        assert_eq!(got.needs, Some(RebuildKind::Full));
        let bad = rpc::ChildRecord { replica_uuid: r.to_string(), ..Default::default() };
        assert!(ChildReport::from_rpc(&bad).is_err(), "a child without a state is refused");
    }
}
