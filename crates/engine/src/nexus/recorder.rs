//! What a nexus must get recorded outside itself before it may go on: its children's states
//! (the healthy set) and the regions written while a child was out (the dirty-region log).
//!
//! ```text
//!   Nexus ──record_children / mark_dirty──> Recorder ──gRPC Registry──> control ──> store
//! ```
//!
//! The nexus holds the acknowledgement of every write issued after a membership change until
//! [`Recorder::record_children`] returned, and issues no write to a region missing from the
//! log while a child is out until [`Recorder::mark_dirty`] returned. That is what makes a
//! crash of the nexus safe: the store then knows which replicas are current and which regions
//! a returning replica missed. A [`RecordError::Fenced`] reply means a newer nexus of the same
//! volume exists: this one stops serving at once.

use async_trait::async_trait;
use trireme_types::{ChildState, ReplicaId, VolumeId};

/// How a child joins a nexus (the `ChildJoin` of the gRPC contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Join {
    /// Holds every acknowledged write; serves reads at once.
    Online,
    /// Missed only the regions in the dirty-region log: copy those.
    Partial,
    /// Holds nothing trustworthy: copy every allocated region.
    Full,
}

/// A rebuild that finished: what it copied and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildSummary {
    pub kind: Join,
    pub copied_bytes: u64,
    pub millis: u64,
}

/// One child as recorded in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildRecord {
    pub replica: ReplicaId,
    pub state: ChildState,
    /// For a faulted or rebuilding child: what it still needs (`Partial` or `Full`).
    pub needs: Option<Join>,
    /// Set in the record that turns a rebuilt child online.
    pub rebuilt: Option<RebuildSummary>,
}

/// A membership change to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipRecord {
    pub volume: VolumeId,
    pub epoch: u64,
    pub children: Vec<ChildRecord>,
    /// Every child is online again: the dirty-region log may be cleared.
    pub clear_dirty: bool,
    /// The nexus is being destroyed after a final flush.
    pub clean_shutdown: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A newer nexus of this volume exists; this one must stop serving.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The store could not be reached in time; the nexus must not run on unrecorded state.
    #[error("could not record the nexus's state: {0}")]
    Unavailable(String),
}

/// Where a nexus records its membership and dirty regions. Implementations bound every call
/// in time and retry transient failures themselves; an error is final for the nexus.
#[async_trait]
pub trait Recorder: Send + Sync + 'static {
    /// Records the children's states; returns the volume's generation after the change.
    async fn record_children(&self, record: MembershipRecord) -> Result<u64, RecordError>;
    /// Adds `regions` (indexes of `region_bytes`-sized regions) to the dirty-region log.
    async fn mark_dirty(
        &self,
        volume: VolumeId,
        epoch: u64,
        region_bytes: u64,
        regions: Vec<u64>,
    ) -> Result<(), RecordError>;
}

/// A recorder for an engine run without control (tests, a stand-alone engine): it accepts
/// everything and keeps nothing, so a crash of such a nexus forgets its dirty regions.
#[derive(Debug, Default)]
pub struct NoRecorder;

#[async_trait]
impl Recorder for NoRecorder {
    async fn record_children(&self, _: MembershipRecord) -> Result<u64, RecordError> {
        Ok(0)
    }
    async fn mark_dirty(
        &self,
        _: VolumeId,
        _: u64,
        _: u64,
        _: Vec<u64>,
    ) -> Result<(), RecordError> {
        Ok(())
    }
}
