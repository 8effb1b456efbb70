//! The nexus's membership table: which children exist, in which [`ChildState`], and what a
//! child that is not online still needs. Every state change goes through a method here that
//! says what changed and bumps the table's `version`, so the rules ("never fault the last
//! online child", "only online children serve reads or feed a rebuild", "local children are
//! read first") live in one place and are tested without any I/O.
//!
//! The `version` is what the persist task records: a write that observed version `v` is not
//! acknowledged before the recorder has stored a table at least as new as `v`.

use std::sync::Arc;

use trireme_types::{ChildState, FaultReason, NexusState, ReplicaId};

use super::child::{Child, ChildUri};
use super::recorder::{ChildRecord, Join, RebuildSummary};

/// One child and its state. `child` is `None` for a replica that could not be opened when the
/// nexus was created: it is listed (faulted, with what it needs) until control re-adds it.
pub(crate) struct Slot {
    pub uri: ChildUri,
    pub replica: ReplicaId,
    pub child: Option<Arc<dyn Child>>,
    pub state: ChildState,
    /// For a faulted or rebuilding child: the rebuild it needs (`Partial` or `Full`).
    pub needs: Option<Join>,
    pub last_rebuild: Option<RebuildSummary>,
    /// The table version that turned this child online after a rebuild, until a record at
    /// least that new is stored: the record announcing it carries the rebuild's summary.
    pub rebuilt_unrecorded: Option<u64>,
    /// The rebuild task working on this child (0: none). A task whose id no longer matches
    /// (the child was faulted, removed or re-added meanwhile) changes nothing.
    pub rebuild_id: u64,
}

impl Slot {
    fn is_local(&self) -> bool {
        matches!(self.uri, ChildUri::Local(_))
    }
}

/// What [`ChildTable::fault`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The child went from a write-receiving state to faulted.
    Faulted,
    /// It already was faulted (another I/O got there first); idempotent.
    AlreadyFaulted,
    /// It is the last online child: it stays online and the error goes to the client, because
    /// a nexus with no online child has nothing left to serve.
    RefusedLastOnline,
    /// No child with that replica id (removed meanwhile).
    Unknown,
    /// The error came from an earlier instance of a child that was faulted and re-opened
    /// since: the current instance is left alone.
    Stale,
}

/// What [`ChildTable::remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveOutcome {
    Removed,
    /// Not a child (already removed); idempotent.
    Absent,
    /// The last online child holds the only current data; it is never removed.
    RefusedLastOnline,
}

/// What [`ChildTable::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddOutcome {
    /// A new child, now rebuilding.
    Added,
    /// A faulted child re-opened in place, now rebuilding.
    Reopened,
    /// Already online or rebuilding: nothing to do.
    Present,
}

/// Whether two handles are the same opened child (data pointers only: the same object may
/// be reached through different vtables).
fn same_instance(a: &Arc<dyn Child>, b: &Arc<dyn Child>) -> bool {
    std::ptr::eq(Arc::as_ptr(a).cast::<()>(), Arc::as_ptr(b).cast::<()>())
}

/// The stronger of two needs: a child that needs a full copy still does after a partial one.
pub(crate) fn stronger(a: Join, b: Join) -> Join {
    match (a, b) {
        (Join::Full, _) | (_, Join::Full) => Join::Full,
        (Join::Partial, _) | (_, Join::Partial) => Join::Partial,
        _ => Join::Online,
    }
}

#[derive(Default)]
pub(crate) struct ChildTable {
    slots: Vec<Slot>,
    version: u64,
    next_rebuild_id: u64,
}

impl ChildTable {
    /// A table over `slots`, local children first (reads go to the first online child, and a
    /// local one answers without a network round trip).
    pub fn new(slots: Vec<Slot>) -> Self {
        let mut table =
            Self { slots: Vec::with_capacity(slots.len()), version: 1, next_rebuild_id: 0 };
        for slot in slots {
            table.insert(slot);
        }
        table
    }

    /// A table whose children all start `online`.
    #[cfg(test)]
    pub fn new_online(children: Vec<Arc<dyn Child>>) -> Self {
        Self::new(children.into_iter().map(|c| Self::slot(c, ChildState::Online, None)).collect())
    }

    pub fn slot(child: Arc<dyn Child>, state: ChildState, needs: Option<Join>) -> Slot {
        Slot {
            uri: child.uri().clone(),
            replica: child.replica_id(),
            child: Some(child),
            state,
            needs,
            last_rebuild: None,
            rebuilt_unrecorded: None,
            rebuild_id: 0,
        }
    }

    fn insert(&mut self, slot: Slot) {
        let at = if slot.is_local() {
            self.slots.iter().position(|s| !s.is_local()).unwrap_or(self.slots.len())
        } else {
            self.slots.len()
        };
        self.slots.insert(at, slot);
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    fn bump(&mut self) {
        self.version += 1;
    }

    pub fn nexus_state(&self) -> NexusState {
        NexusState::from_children(self.slots.iter().map(|s| &s.state))
    }

    /// Every child is online: nothing is missing from any copy.
    pub fn all_online(&self) -> bool {
        self.slots.iter().all(|s| s.state.is_readable())
    }

    /// The child reads go to: the first online one (local children are listed first).
    pub fn reader(&self) -> Option<Arc<dyn Child>> {
        self.slots
            .iter()
            .filter(|s| s.state.is_readable())
            .find_map(|s| s.child.as_ref().map(Arc::clone))
    }

    /// Every child that must receive a write.
    pub fn writers(&self) -> Vec<Arc<dyn Child>> {
        self.slots
            .iter()
            .filter(|s| s.state.receives_writes())
            .filter_map(|s| s.child.as_ref().map(Arc::clone))
            .collect()
    }

    fn online_count(&self) -> usize {
        self.slots.iter().filter(|s| s.state.is_readable()).count()
    }

    fn find(&self, replica: ReplicaId) -> Option<usize> {
        self.slots.iter().position(|s| s.replica == replica)
    }

    pub fn get(&self, replica: ReplicaId) -> Option<&Slot> {
        self.find(replica).map(|i| &self.slots[i])
    }

    /// Adds `child` so that it is brought up to date. A faulted child of the same replica is
    /// re-opened in place, keeping the stronger need (`Online` is taken as `Partial`: it has
    /// missed at least what the log holds). A replica that is not a member always needs a
    /// full copy: the log only covers what members missed, and writes in flight while every
    /// child was online were not logged at all.
    pub fn add(&mut self, child: Arc<dyn Child>, join: Join, total_bytes: u64) -> AddOutcome {
        let join = stronger(join, Join::Partial);
        let state = ChildState::Rebuilding { done_bytes: 0, total_bytes };
        let Some(i) = self.find(child.replica_id()) else {
            self.insert(Self::slot(child, state, Some(Join::Full)));
            self.bump();
            return AddOutcome::Added;
        };
        let slot = &mut self.slots[i];
        if !matches!(slot.state, ChildState::Faulted { .. }) {
            return AddOutcome::Present;
        }
        let needs = slot.needs.map_or(join, |n| stronger(n, join));
        slot.uri = child.uri().clone();
        slot.child = Some(child);
        slot.state = state;
        slot.needs = Some(needs);
        slot.rebuild_id = 0;
        self.bump();
        AddOutcome::Reopened
    }

    /// Removes a child, unless it is the last online one. Idempotent for an absent child.
    pub fn remove(&mut self, replica: ReplicaId) -> RemoveOutcome {
        let Some(i) = self.find(replica) else { return RemoveOutcome::Absent };
        if self.slots[i].state.is_readable() && self.online_count() <= 1 {
            return RemoveOutcome::RefusedLastOnline;
        }
        self.slots.remove(i);
        self.bump();
        RemoveOutcome::Removed
    }

    /// Faults `child` if it is still the instance in the table (see [`FaultOutcome::Stale`]).
    pub fn fault_instance(&mut self, child: &Arc<dyn Child>, reason: FaultReason) -> FaultOutcome {
        let current = self.get(child.replica_id()).and_then(|s| s.child.as_ref());
        if current.is_some_and(|c| !same_instance(c, child)) {
            return FaultOutcome::Stale;
        }
        self.fault(child.replica_id(), reason)
    }

    /// Faults the child holding `replica`, unless that would leave no online child. A child
    /// that was online needs what it misses from now on (`Partial`); a rebuilding one keeps
    /// the need it had (a failed full rebuild still needs a full one).
    pub fn fault(&mut self, replica: ReplicaId, reason: FaultReason) -> FaultOutcome {
        let online = self.online_count();
        let Some(i) = self.find(replica) else { return FaultOutcome::Unknown };
        let slot = &mut self.slots[i];
        match slot.state {
            ChildState::Faulted { .. } => FaultOutcome::AlreadyFaulted,
            ChildState::Online if online <= 1 => FaultOutcome::RefusedLastOnline,
            ChildState::Online | ChildState::Rebuilding { .. } => {
                let floor = if reason.is_recoverable() { Join::Partial } else { Join::Full };
                slot.needs = Some(slot.needs.map_or(floor, |n| stronger(n, floor)));
                slot.state = ChildState::Faulted { reason };
                slot.rebuild_id = 0;
                self.bump();
                FaultOutcome::Faulted
            }
        }
    }

    /// Assigns a rebuild id to every rebuilding child without a task; returns what each new
    /// task needs.
    pub fn unassigned_rebuilds(&mut self) -> Vec<(ReplicaId, u64, Arc<dyn Child>, Join)> {
        let mut out = Vec::new();
        for slot in &mut self.slots {
            if let (ChildState::Rebuilding { .. }, 0, Some(child)) =
                (slot.state, slot.rebuild_id, slot.child.as_ref())
            {
                self.next_rebuild_id += 1;
                slot.rebuild_id = self.next_rebuild_id;
                let kind = slot.needs.unwrap_or(Join::Full);
                out.push((slot.replica, slot.rebuild_id, Arc::clone(child), kind));
            }
        }
        out
    }

    /// Whether rebuild `id` still owns `replica`'s rebuild.
    pub fn owns_rebuild(&self, replica: ReplicaId, id: u64) -> bool {
        self.get(replica).is_some_and(|s| s.rebuild_id == id && id != 0)
    }

    pub fn set_progress(&mut self, replica: ReplicaId, id: u64, done: u64, total: u64) {
        if let Some(i) = self.find(replica)
            && self.slots[i].rebuild_id == id
            && let ChildState::Rebuilding { .. } = self.slots[i].state
        {
            self.slots[i].state = ChildState::Rebuilding { done_bytes: done, total_bytes: total };
        }
    }

    /// Turns a rebuilt child online. Refused (false) if the rebuild no longer owns it.
    pub fn finish_rebuild(&mut self, replica: ReplicaId, id: u64, summary: RebuildSummary) -> bool {
        if !self.owns_rebuild(replica, id) {
            return false;
        }
        self.bump();
        let version = self.version;
        let Some(i) = self.find(replica) else { return false };
        let slot = &mut self.slots[i];
        slot.state = ChildState::Online;
        slot.needs = None;
        slot.last_rebuild = Some(summary);
        slot.rebuilt_unrecorded = Some(version);
        slot.rebuild_id = 0;
        true
    }

    /// The children as the store records them.
    pub fn records(&self) -> Vec<ChildRecord> {
        self.slots
            .iter()
            .map(|s| ChildRecord {
                replica: s.replica,
                state: s.state,
                needs: if s.state.is_readable() { None } else { s.needs },
                rebuilt: s.rebuilt_unrecorded.and(s.last_rebuild),
            })
            .collect()
    }

    /// A table at least as new as `version` is stored: its rebuild summaries are announced.
    pub fn recorded(&mut self, version: u64) {
        for slot in &mut self.slots {
            if slot.rebuilt_unrecorded.is_some_and(|v| v <= version) {
                slot.rebuilt_unrecorded = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nexus::testing::MemChild;

    fn table(n: usize) -> (ChildTable, Vec<ReplicaId>) {
        let children: Vec<Arc<dyn Child>> =
            (0..n).map(|_| Arc::new(MemChild::new(4096)) as Arc<dyn Child>).collect();
        let ids = children.iter().map(|c| c.replica_id()).collect();
        (ChildTable::new_online(children), ids)
    }

    #[test]
    fn new_children_are_online() {
        let (t, _) = table(3);
        assert_eq!(t.nexus_state(), NexusState::Online);
        assert_eq!(t.writers().len(), 3);
        assert!(t.reader().is_some());
        assert!(t.all_online());
    }

    #[test]
    fn the_last_online_child_is_never_faulted() {
        let (mut t, ids) = table(1);
        let v = t.version();
        assert_eq!(t.fault(ids[0], FaultReason::IoError), FaultOutcome::RefusedLastOnline);
        assert_eq!(t.nexus_state(), NexusState::Online);
        assert!(t.reader().is_some());
        assert_eq!(t.version(), v, "a refused fault changes nothing");
    }

    #[test]
    fn faulting_degrades_and_stops_reads_and_writes_to_the_child() {
        let (mut t, ids) = table(3);
        let v = t.version();
        assert_eq!(t.fault(ids[0], FaultReason::Timeout), FaultOutcome::Faulted);
        assert_eq!(t.version(), v + 1);
        assert_eq!(t.fault(ids[0], FaultReason::IoError), FaultOutcome::AlreadyFaulted);
        assert_eq!(t.version(), v + 1);
        assert_eq!(t.nexus_state(), NexusState::Degraded);
        assert_eq!(t.writers().len(), 2);
        let reader = t.reader().unwrap();
        assert_ne!(reader.replica_id(), ids[0]);
        assert_eq!(t.fault(ids[1], FaultReason::IoError), FaultOutcome::Faulted);
        assert_eq!(t.fault(ids[2], FaultReason::IoError), FaultOutcome::RefusedLastOnline);
        assert_eq!(t.reader().unwrap().replica_id(), ids[2]);
        assert_eq!(t.nexus_state(), NexusState::Degraded);
        // The recorded reason is the first one, and an online child needs what it missed.
        assert_eq!(t.slots()[0].state, ChildState::Faulted { reason: FaultReason::Timeout });
        assert_eq!(t.records()[0].needs, Some(Join::Partial));
        assert_eq!(t.records()[2].needs, None);
        assert_eq!(t.fault(ReplicaId::new_random(), FaultReason::IoError), FaultOutcome::Unknown);
    }

    #[test]
    fn added_children_rebuild_and_the_last_online_child_stays() {
        let (mut t, ids) = table(1);
        let new: Arc<dyn Child> = Arc::new(MemChild::new(4096));
        let new_id = new.replica_id();
        assert_eq!(t.add(Arc::clone(&new), Join::Partial, 4096), AddOutcome::Added);
        assert_eq!(t.get(new_id).unwrap().needs, Some(Join::Full), "a newcomer needs everything");
        assert_eq!(t.add(new, Join::Full, 4096), AddOutcome::Present, "a replica is a child once");
        assert_eq!(t.nexus_state(), NexusState::Degraded);
        assert_eq!(t.writers().len(), 2);
        assert_eq!(t.reader().unwrap().replica_id(), ids[0]);
        assert_eq!(t.remove(ids[0]), RemoveOutcome::RefusedLastOnline);
        assert_eq!(t.remove(new_id), RemoveOutcome::Removed);
        assert_eq!(t.remove(new_id), RemoveOutcome::Absent);
        assert_eq!(t.nexus_state(), NexusState::Online);
    }

    #[test]
    fn a_failed_full_rebuild_still_needs_a_full_one_and_reopening_keeps_it() {
        let (mut t, _) = table(1);
        let new: Arc<dyn Child> = Arc::new(MemChild::new(4096));
        let id = new.replica_id();
        t.add(Arc::clone(&new), Join::Full, 4096);
        let jobs = t.unassigned_rebuilds();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].3, Join::Full);
        assert!(t.unassigned_rebuilds().is_empty(), "one task per rebuild");
        assert_eq!(t.fault(id, FaultReason::Timeout), FaultOutcome::Faulted);
        assert!(!t.owns_rebuild(id, jobs[0].1), "a faulted child's rebuild is void");
        assert_eq!(t.get(id).unwrap().needs, Some(Join::Full));
        // Re-added as partial: it still needs the full copy.
        let reopened: Arc<dyn Child> = Arc::new(MemChild::with_id(4096, id));
        assert_eq!(t.add(Arc::clone(&reopened), Join::Partial, 4096), AddOutcome::Reopened);
        // A late error of the old instance does not fault the new one.
        assert_eq!(t.fault_instance(&new, FaultReason::Timeout), FaultOutcome::Stale);
        assert!(matches!(t.get(id).unwrap().state, ChildState::Rebuilding { .. }));
        assert_eq!(t.get(id).unwrap().needs, Some(Join::Full));
        let summary = RebuildSummary { kind: Join::Full, copied_bytes: 1, millis: 2 };
        assert!(!t.finish_rebuild(id, jobs[0].1, summary), "an old task cannot finish");
        let job = t.unassigned_rebuilds().pop().unwrap();
        assert!(t.finish_rebuild(id, job.1, summary));
        assert!(t.all_online());
        let v = t.version();
        assert_eq!(t.records()[1].rebuilt, Some(summary));
        t.recorded(v);
        assert_eq!(t.records()[1].rebuilt, None, "announced once");
    }

    #[test]
    fn local_children_are_read_first() {
        let remote = Arc::new(MemChild::remote(4096));
        let local = Arc::new(MemChild::new(4096));
        let t = ChildTable::new_online(vec![remote.clone(), local.clone()]);
        assert_eq!(t.reader().unwrap().replica_id(), local.replica_id());
        let mut t = ChildTable::new_online(vec![remote.clone()]);
        t.add(local.clone(), Join::Full, 4096);
        assert_eq!(t.slots()[0].replica, local.replica_id(), "local listed ahead");
        // But a rebuilding child is never a reader.
        assert_eq!(t.reader().unwrap().replica_id(), remote.replica_id());
    }

    #[test]
    fn rebuilding_children_take_writes_not_reads_and_can_always_be_faulted() {
        let (mut t, ids) = table(2);
        t.slots[1].state = ChildState::Rebuilding { done_bytes: 0, total_bytes: 4096 };
        assert_eq!(t.nexus_state(), NexusState::Degraded);
        assert!(!t.all_online());
        assert_eq!(t.writers().len(), 2);
        assert_eq!(t.reader().unwrap().replica_id(), ids[0]);
        // The online child is the last online one even though a rebuilding child exists.
        assert_eq!(t.fault(ids[0], FaultReason::IoError), FaultOutcome::RefusedLastOnline);
        assert_eq!(t.fault(ids[1], FaultReason::IoError), FaultOutcome::Faulted);
        assert_eq!(t.nexus_state(), NexusState::Degraded);
        assert_eq!(t.writers().len(), 1);
    }
}
