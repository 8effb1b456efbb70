//! The nexus's membership table: which children exist and in which [`ChildState`]. Every state
//! change goes through a method here that says what changed, so the rules ("never fault the
//! last online child", "only online children serve reads") live in one place and are tested
//! without any I/O.

use std::sync::Arc;

use trireme_types::{ChildState, FaultReason, NexusState, ReplicaId};

use super::child::Child;

/// One child and its state.
pub(crate) struct Slot {
    pub child: Arc<dyn Child>,
    pub state: ChildState,
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

#[derive(Default)]
pub(crate) struct ChildTable {
    slots: Vec<Slot>,
}

impl ChildTable {
    /// A table whose children all start `online`: control creates a nexus over the replicas it
    /// knows to be current. (A child added to a running nexus starts `rebuilding`.)
    pub fn new_online(children: Vec<Arc<dyn Child>>) -> Self {
        Self {
            slots: children
                .into_iter()
                .map(|child| Slot { child, state: ChildState::Online })
                .collect(),
        }
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub fn nexus_state(&self) -> NexusState {
        NexusState::from_children(self.slots.iter().map(|s| &s.state))
    }

    /// The child reads go to: the first online one (local children are listed first).
    pub fn reader(&self) -> Option<Arc<dyn Child>> {
        self.slots.iter().find(|s| s.state.is_readable()).map(|s| Arc::clone(&s.child))
    }

    /// Every child that must receive a write.
    pub fn writers(&self) -> Vec<Arc<dyn Child>> {
        self.slots
            .iter()
            .filter(|s| s.state.receives_writes())
            .map(|s| Arc::clone(&s.child))
            .collect()
    }

    fn online_count(&self) -> usize {
        self.slots.iter().filter(|s| s.state.is_readable()).count()
    }

    fn find(&self, replica: ReplicaId) -> Option<usize> {
        self.slots.iter().position(|s| s.child.replica_id() == replica)
    }

    /// Adds a child that must be brought up to date: it starts `rebuilding`, so it receives
    /// every write from now on but serves no read until its rebuild completes.
    pub fn add_rebuilding(
        &mut self,
        child: Arc<dyn Child>,
        total_bytes: u64,
    ) -> Result<(), Arc<dyn Child>> {
        if self.find(child.replica_id()).is_some() {
            return Err(child);
        }
        let state = ChildState::Rebuilding { done_bytes: 0, total_bytes };
        self.slots.push(Slot { child, state });
        Ok(())
    }

    /// Removes a child, unless it is the last online one. Idempotent for an absent child.
    pub fn remove(&mut self, replica: ReplicaId) -> RemoveOutcome {
        let Some(i) = self.find(replica) else { return RemoveOutcome::Absent };
        if self.slots[i].state.is_readable() && self.online_count() <= 1 {
            return RemoveOutcome::RefusedLastOnline;
        }
        self.slots.remove(i);
        RemoveOutcome::Removed
    }

    /// Faults the child holding `replica`, unless that would leave no online child.
    pub fn fault(&mut self, replica: ReplicaId, reason: FaultReason) -> FaultOutcome {
        let online = self.online_count();
        let Some(slot) = self.slots.iter_mut().find(|s| s.child.replica_id() == replica) else {
            return FaultOutcome::Unknown;
        };
        match slot.state {
            ChildState::Faulted { .. } => FaultOutcome::AlreadyFaulted,
            ChildState::Online if online <= 1 => FaultOutcome::RefusedLastOnline,
            ChildState::Online | ChildState::Rebuilding { .. } => {
                slot.state = ChildState::Faulted { reason };
                FaultOutcome::Faulted
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
    }

    #[test]
    fn the_last_online_child_is_never_faulted() {
        let (mut t, ids) = table(1);
        assert_eq!(t.fault(ids[0], FaultReason::IoError), FaultOutcome::RefusedLastOnline);
        assert_eq!(t.nexus_state(), NexusState::Online);
        assert!(t.reader().is_some());
    }

    #[test]
    fn faulting_degrades_and_stops_reads_and_writes_to_the_child() {
        let (mut t, ids) = table(3);
        assert_eq!(t.fault(ids[0], FaultReason::Timeout), FaultOutcome::Faulted);
        assert_eq!(t.fault(ids[0], FaultReason::IoError), FaultOutcome::AlreadyFaulted);
        assert_eq!(t.nexus_state(), NexusState::Degraded);
        assert_eq!(t.writers().len(), 2);
        let reader = t.reader().unwrap();
        assert_ne!(reader.replica_id(), ids[0]);
        assert_eq!(t.fault(ids[1], FaultReason::IoError), FaultOutcome::Faulted);
        assert_eq!(t.fault(ids[2], FaultReason::IoError), FaultOutcome::RefusedLastOnline);
        assert_eq!(t.reader().unwrap().replica_id(), ids[2]);
        assert_eq!(t.nexus_state(), NexusState::Degraded);
        // The recorded reason is the first one.
        assert_eq!(t.slots()[0].state, ChildState::Faulted { reason: FaultReason::Timeout });
        assert_eq!(t.fault(ReplicaId::new_random(), FaultReason::IoError), FaultOutcome::Unknown);
    }

    #[test]
    fn added_children_rebuild_and_the_last_online_child_stays() {
        let (mut t, ids) = table(1);
        let new: Arc<dyn Child> = Arc::new(MemChild::new(4096));
        let new_id = new.replica_id();
        assert!(t.add_rebuilding(Arc::clone(&new), 4096).is_ok());
        assert!(t.add_rebuilding(new, 4096).is_err(), "a replica is a child once");
        assert_eq!(t.nexus_state(), NexusState::Degraded);
        assert_eq!(t.writers().len(), 2);
        assert_eq!(t.reader().unwrap().replica_id(), ids[0]);
        assert_eq!(t.remove(ids[0]), RemoveOutcome::RefusedLastOnline);
        assert_eq!(t.remove(new_id), RemoveOutcome::Removed);
        assert_eq!(t.remove(new_id), RemoveOutcome::Absent);
        assert_eq!(t.nexus_state(), NexusState::Online);
    }

    #[test]
    fn rebuilding_children_take_writes_not_reads_and_can_always_be_faulted() {
        let (mut t, ids) = table(2);
        t.slots[1].state = ChildState::Rebuilding { done_bytes: 0, total_bytes: 4096 };
        assert_eq!(t.nexus_state(), NexusState::Degraded);
        assert_eq!(t.writers().len(), 2);
        assert_eq!(t.reader().unwrap().replica_id(), ids[0]);
        // The online child is the last online one even though a rebuilding child exists.
        assert_eq!(t.fault(ids[0], FaultReason::IoError), FaultOutcome::RefusedLastOnline);
        assert_eq!(t.fault(ids[1], FaultReason::IoError), FaultOutcome::Faulted);
        assert_eq!(t.nexus_state(), NexusState::Degraded);
        assert_eq!(t.writers().len(), 1);
    }
}
