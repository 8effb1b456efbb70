//! The nexus: a volume's target. Every volume is reached through exactly one nexus, which the
//! engine shares over NBD under the volume's UUID, and which keeps the volume's replicas (its
//! children) identical.
//!
//! ```text
//!   NBD client ──> share (export "<volume uuid>") ──> Nexus ──┬─> child: replica:///<uuid>  (local pool)
//!                                                     │        ├─> child: nbd://B/replica-…@<epoch>
//!                         persist task ──Recorder──>  │        └─> child: nbd://C/replica-…@<epoch>
//!                         rebuild tasks (one per rebuilding child, copying from an online one)
//! ```
//!
//! **Reads** go to one `online` child, local ones first. If it errs, it is faulted and the read
//! is retried on the next online child, so a client sees an error only when no copy is left.
//!
//! **Writes, FLUSH, TRIM and WRITE_ZEROES** go to every child that receives writes (`online`
//! and `rebuilding`), concurrently. A child that fails is faulted and the operation still
//! succeeds on the others; but the last online child is never faulted: its error goes to the
//! client instead. The membership rules live in [`state::ChildTable`], apart from the I/O.
//!
//! **Nothing is acknowledged on unrecorded state** ([`recorder`]): the table has a version,
//! bumped on every membership change, that the persist task ([`persist`]) records; a write
//! is acknowledged only once the recorded version is at least the one it saw when it
//! completed. While a child is out, a write first gets its regions into the dirty-region log
//! ([`dirty`]) and only then reaches the children. A recorder failure, or a sign that a newer
//! nexus owns the volume (`Fenced`), stops this nexus: every later I/O fails.
//!
//! **Rebuilds** ([`rebuild`]) bring a child joining `Partial` or `Full` up to date region by
//! region, under an exclusive region lock ([`range_lock`]) that writes share. A partial one
//! takes its snapshot of the log only once every request that chose its children before the
//! child joined has finished, so a late failure on the child's earlier instance is logged in
//! time; such a late error never faults the re-opened instance.
//!
//! **No lock is held across an await.** Each operation takes the table's lock just long enough
//! to clone the `Arc`s of the children it needs, then does its I/O unlocked.

mod child;
pub mod dirty;
mod io;
mod persist;
mod range_lock;
mod rebuild;
pub mod recorder;
pub mod remote;
mod state;
#[cfg(test)]
pub(crate) mod testing;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trireme_nbd::ExportError;
use trireme_types::{ChildState, FaultReason, NexusState, ReplicaId, VolumeId};

pub use child::{Child, ChildError, ChildExtent, ChildUri, ChildUriError, LocalChild};
pub use dirty::DirtyLog;
pub(crate) use io::to_extents;
use range_lock::RangeLock;
pub use rebuild::RebuildLimits;
pub use recorder::{Join, RebuildSummary, Recorder};
use recorder::{MembershipRecord, NoRecorder, RecordError};
use state::{AddOutcome, ChildTable, Slot};
pub use state::{FaultOutcome, RemoveOutcome};

/// How long closing waits to record a clean shutdown.
const CLEAN_RECORD_TIMEOUT: Duration = Duration::from_secs(2);

/// How long `close` waits for the nexus's tasks to notice they were cancelled.
const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing nexus waits for writes already admitted; within the engine's own bound
/// on a close at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a nexus cannot be built or changed as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NexusError {
    #[error("a nexus needs at least one child")]
    NoChildren,
    #[error("replica {replica} appears more than once among the children")]
    DuplicateChild { replica: ReplicaId },
    #[error("child {replica} holds {size} bytes, less than the nexus size {needed}")]
    ChildTooSmall { replica: ReplicaId, size: u64, needed: u64 },
    #[error("child {replica} is the last online child and holds the only current data")]
    LastOnlineChild { replica: ReplicaId },
    #[error("a nexus only grows: {from} bytes to {to} bytes refused")]
    Shrink { from: u64, to: u64 },
    /// No child joining `Online` could be opened: serving would expose stale data.
    #[error("no current replica reachable")]
    NoCurrentChild,
    #[error(
        "the dirty-region log's region size must be 0 (unset, with no regions) or a power of two of at least 4 KiB"
    )]
    InvalidDirtyLog,
    /// The membership could not be recorded; the nexus stopped.
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("the nexus stopped serving: {0}")]
    Stopped(String),
    #[error("the nexus is closed")]
    Closed,
}

/// A snapshot of one child for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildInfo {
    pub uri: ChildUri,
    pub replica: ReplicaId,
    pub state: ChildState,
    /// For a faulted or rebuilding child: the rebuild it needs or is doing.
    pub needs: Option<Join>,
    /// The last rebuild of this child that finished in this nexus.
    pub last_rebuild: Option<RebuildSummary>,
}

/// One child of a nexus being created.
pub struct NewChild {
    pub uri: ChildUri,
    pub replica: ReplicaId,
    /// `None`: the replica could not be opened; it starts faulted with what it needs.
    pub child: Option<Arc<dyn Child>>,
    pub join: Join,
    /// Why it could not be opened (used when `child` is `None`).
    pub fault: Option<FaultReason>,
}

impl NewChild {
    pub fn opened(child: Arc<dyn Child>, join: Join) -> Self {
        Self {
            uri: child.uri().clone(),
            replica: child.replica_id(),
            child: Some(child),
            join,
            fault: None,
        }
    }

    pub fn unopened(uri: ChildUri, replica: ReplicaId, join: Join, reason: FaultReason) -> Self {
        Self { uri, replica, child: None, join, fault: Some(reason) }
    }
}

/// What a nexus is created with, besides its children.
pub struct NexusConfig {
    /// The fencing epoch control claimed the children with.
    pub epoch: u64,
    /// The membership generation in the store.
    pub generation: u64,
    pub recorder: Arc<dyn Recorder>,
    /// The dirty-region log from the store (regions missed by children joining `Partial`);
    /// a region size of 0 picks the rule's size.
    pub dirty: DirtyLog,
    /// Shared by every nexus of the engine.
    pub rebuild: Arc<RebuildLimits>,
}

impl NexusConfig {
    /// A nexus recorded nowhere (tests, an engine without control).
    pub fn standalone() -> Self {
        Self {
            epoch: 0,
            generation: 0,
            recorder: Arc::new(NoRecorder),
            dirty: DirtyLog::default(),
            rebuild: Arc::new(RebuildLimits::default()),
        }
    }
}

/// The dirty-region log and the regions waiting to be recorded in it.
struct DirtyState {
    /// Regions recorded (the store has them).
    log: DirtyLog,
    /// Regions asked for and not yet sent to the recorder.
    pending: std::collections::BTreeSet<u64>,
    /// The batch that will carry `pending`; `dirty_done` publishes the last one recorded.
    next_batch: u64,
}

pub struct Nexus {
    volume: VolumeId,
    epoch: u64,
    generation: AtomicU64,
    /// Bytes rebuilds copied into this nexus's children (for `trireme_rebuild_bytes_total`).
    rebuild_bytes: AtomicU64,
    size: AtomicU64,
    children: Mutex<ChildTable>,
    dirty: Mutex<DirtyState>,
    /// Regions a faulting child may have lost: written, not yet flushed.
    unflushed: Mutex<dirty::Unflushed>,
    ranges: RangeLock,
    recorder: Arc<dyn Recorder>,
    limits: Arc<RebuildLimits>,
    /// The latest table version the recorder stored.
    persisted: watch::Sender<u64>,
    /// The latest dirty-region batch the recorder stored.
    dirty_done: watch::Sender<u64>,
    /// Wakes the persist task (a stored permit: no wake-up is lost).
    kick: Arc<Notify>,
    /// Whether `start` ran: before it, nothing is recorded and nothing waits (the legacy
    /// constructor's nexus is never started).
    started: AtomicBool,
    closed: AtomicBool,
    stopped: Mutex<Option<String>>,
    stopped_flag: AtomicBool,
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// Write-like requests between choosing their children and their acknowledgement,
    /// counted by the table version they chose them at. A partial rebuild waits for those
    /// older than its child's joining: one of them may have missed the child and only log
    /// its regions when it fails, after the join.
    inflight: Mutex<std::collections::BTreeMap<u64, usize>>,
    inflight_done: Notify,
    /// The cancellation of each running rebuild, with its rebuild id.
    rebuild_cancels: Mutex<std::collections::HashMap<ReplicaId, (u64, CancellationToken)>>,
}

impl Nexus {
    /// A nexus of `size` bytes over `children`, all online, never started (recorded nowhere,
    /// nothing waits): the plain I/O tests use it. [`Nexus::create`] is the real constructor.
    #[cfg(test)]
    pub fn new(
        volume: VolumeId,
        size: u64,
        children: Vec<Arc<dyn Child>>,
    ) -> Result<Self, NexusError> {
        let children = children.into_iter().map(|c| NewChild::opened(c, Join::Online)).collect();
        Self::build(volume, size, children, NexusConfig::standalone())
    }

    /// A nexus of `size` bytes over `children`. Children joining `Partial` or `Full` start
    /// rebuilding, unopened ones start faulted; at least one `Online` child must be open.
    /// Call [`Nexus::start`] before sharing it.
    pub fn create(
        volume: VolumeId,
        size: u64,
        children: Vec<NewChild>,
        config: NexusConfig,
    ) -> Result<Arc<Self>, NexusError> {
        Self::build(volume, size, children, config).map(Arc::new)
    }

    fn build(
        volume: VolumeId,
        size: u64,
        children: Vec<NewChild>,
        config: NexusConfig,
    ) -> Result<Self, NexusError> {
        if children.is_empty() {
            return Err(NexusError::NoChildren);
        }
        let mut slots = Vec::with_capacity(children.len());
        for (i, c) in children.iter().enumerate() {
            let replica = c.replica;
            if children[..i].iter().any(|o| o.replica == replica) {
                return Err(NexusError::DuplicateChild { replica });
            }
            if let Some(child) = &c.child
                && child.size() < size
            {
                return Err(NexusError::ChildTooSmall {
                    replica,
                    size: child.size(),
                    needed: size,
                });
            }
        }
        if !children
            .iter()
            .any(|c| c.join == Join::Online && c.child.is_some() && c.fault.is_none())
        {
            return Err(NexusError::NoCurrentChild);
        }
        for c in children {
            let (state, needs) = match (&c.child, c.fault, c.join) {
                (Some(_), None, Join::Online) => (ChildState::Online, None),
                (Some(_), None, join) => {
                    (ChildState::Rebuilding { done_bytes: 0, total_bytes: 0 }, Some(join))
                }
                (_, fault, join) => (
                    ChildState::Faulted { reason: fault.unwrap_or(FaultReason::Disconnected) },
                    Some(state::stronger(join, Join::Partial)),
                ),
            };
            slots.push(Slot {
                uri: c.uri,
                replica: c.replica,
                child: c.child,
                state,
                needs,
                last_rebuild: None,
                rebuilt_unrecorded: None,
                rebuild_id: 0,
            });
        }
        let mut dirty = config.dirty;
        if dirty.region_bytes() == 0 {
            if !dirty.is_empty() {
                return Err(NexusError::InvalidDirtyLog);
            }
            dirty = DirtyLog::for_size(size);
        }
        // Tiny regions would make every request lock and log thousands of them.
        if dirty.region_bytes() < 4096 || !dirty.region_bytes().is_power_of_two() {
            return Err(NexusError::InvalidDirtyLog);
        }
        Ok(Self {
            volume,
            epoch: config.epoch,
            generation: AtomicU64::new(config.generation),
            rebuild_bytes: AtomicU64::new(0),
            size: AtomicU64::new(size),
            children: Mutex::new(ChildTable::new(slots)),
            dirty: Mutex::new(DirtyState {
                log: dirty,
                pending: Default::default(),
                next_batch: 1,
            }),
            unflushed: Mutex::new(Default::default()),
            ranges: RangeLock::new(),
            recorder: config.recorder,
            limits: config.rebuild,
            persisted: watch::Sender::new(0),
            dirty_done: watch::Sender::new(0),
            kick: Arc::new(Notify::new()),
            started: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            stopped: Mutex::new(None),
            stopped_flag: AtomicBool::new(false),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            inflight: Mutex::new(Default::default()),
            inflight_done: Notify::new(),
            rebuild_cancels: Mutex::new(Default::default()),
        })
    }

    /// Records the initial membership (and clears a dirty-region log no child needs), then
    /// starts the rebuilds of children joining `Partial` or `Full`. Call once, before the
    /// nexus is shared; an error means it must not be shared (it has stopped).
    pub async fn start(self: &Arc<Self>) -> Result<(), NexusError> {
        if self.started.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.tasks.spawn(persist::run(
            Arc::downgrade(self),
            Arc::clone(&self.kick),
            self.cancel.clone(),
        ));
        let version = self.children.lock().version();
        self.kick.notify_one();
        self.wait_persisted(version).await.map_err(|e| match e {
            ExportError::ShuttingDown => NexusError::Closed,
            _ => NexusError::Stopped(self.stopped_reason().unwrap_or_default()),
        })?;
        self.spawn_rebuilds();
        tracing::info!(volume = %self.volume, epoch = self.epoch, "nexus started");
        Ok(())
    }

    pub fn volume(&self) -> VolumeId {
        self.volume
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The membership generation the store last reported.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Bytes copied by this nexus's rebuilds so far (holes zeroed count nothing).
    pub fn rebuild_bytes_total(&self) -> u64 {
        self.rebuild_bytes.load(Ordering::Relaxed)
    }

    /// Why the nexus stopped serving (fenced, or its state could not be recorded).
    pub fn stopped_reason(&self) -> Option<String> {
        self.stopped.lock().clone()
    }

    pub fn state(&self) -> NexusState {
        self.children.lock().nexus_state()
    }

    pub fn children(&self) -> Vec<ChildInfo> {
        self.children
            .lock()
            .slots()
            .iter()
            .map(|s| ChildInfo {
                uri: s.uri.clone(),
                replica: s.replica,
                state: s.state,
                needs: if s.state.is_readable() { None } else { s.needs },
                last_rebuild: s.last_rebuild,
            })
            .collect()
    }

    /// Whether `replica` is one of this nexus's children.
    pub fn has_child(&self, replica: ReplicaId) -> bool {
        self.children.lock().get(replica).is_some()
    }

    /// A copy of the dirty-region log as recorded so far.
    pub fn dirty_log(&self) -> DirtyLog {
        self.dirty.lock().log.clone()
    }

    /// Grows the nexus; every open child must already hold `new_size` bytes. Idempotent.
    pub fn resize(&self, new_size: u64) -> Result<(), NexusError> {
        let table = self.children.lock();
        let current = self.size.load(Ordering::Acquire);
        if new_size < current {
            return Err(NexusError::Shrink { from: current, to: new_size });
        }
        for s in table.slots() {
            if let Some(child) = &s.child
                && child.size() < new_size
            {
                let size = child.size();
                return Err(NexusError::ChildTooSmall {
                    replica: s.replica,
                    size,
                    needed: new_size,
                });
            }
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Adds a child that is brought up to date by a rebuild: a faulted member re-opened in
    /// place with `child` gets what `join` or its recorded need says (`Partial` copies the
    /// dirty regions, `Full` everything; `Online` is taken as `Partial`); a replica that is
    /// not a member always gets a full copy. It receives every write from now on and serves
    /// reads once rebuilt. Idempotent: a child already online or rebuilding is left alone.
    pub fn add_child(
        self: &Arc<Self>,
        child: Arc<dyn Child>,
        join: Join,
    ) -> Result<(), NexusError> {
        self.check_serving()?;
        let size = self.size.load(Ordering::Acquire);
        let replica = child.replica_id();
        if child.size() < size {
            return Err(NexusError::ChildTooSmall { replica, size: child.size(), needed: size });
        }
        let outcome = self.children.lock().add(child, join, 0);
        match outcome {
            AddOutcome::Present => return Ok(()),
            AddOutcome::Added => {
                tracing::info!(volume = %self.volume, %replica, ?join, "child added, rebuilding")
            }
            AddOutcome::Reopened => {
                tracing::info!(volume = %self.volume, %replica, ?join, "faulted child re-opened, rebuilding")
            }
        }
        self.kick.notify_one();
        if self.started.load(Ordering::Acquire) {
            self.spawn_rebuilds();
        }
        Ok(())
    }

    /// Removes a child (shrink, drain, replacement), cancelling its rebuild. Idempotent; the
    /// last online child is never removed.
    pub fn remove_child(&self, replica: ReplicaId) -> Result<(), NexusError> {
        let outcome = self.children.lock().remove(replica);
        match outcome {
            RemoveOutcome::Removed => {
                if let Some((_, token)) = self.rebuild_cancels.lock().remove(&replica) {
                    token.cancel();
                }
                self.kick.notify_one();
                tracing::info!(volume = %self.volume, %replica, "child removed");
                Ok(())
            }
            RemoveOutcome::Absent => Ok(()),
            RemoveOutcome::RefusedLastOnline => Err(NexusError::LastOnlineChild { replica }),
        }
    }

    /// Waits until the current membership is recorded (e.g. before answering AddChild).
    pub async fn recorded(&self) -> Result<(), NexusError> {
        let version = self.children.lock().version();
        self.wait_persisted(version).await.map_err(|_| self.not_serving())
    }

    /// Stops serving: completed writes are flushed, rebuilds cancelled, and the final
    /// membership is recorded as a clean shutdown. Later I/O fails with `ShuttingDown`.
    pub async fn close(&self) -> Result<(), ExportError> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        // Flush first, then refuse I/O: a client's last acknowledged writes become durable
        // even when the nexus is destroyed under it.
        let flushed = if self.is_stopped() { Ok(()) } else { self.flush_children().await };
        if self.closed.swap(true, Ordering::AcqRel) {
            return flushed;
        }
        // Writes admitted before the close may still be on their way to the children (the NBD
        // server carries out a departed client's requests without it). A clean record made
        // before they end could claim identical replicas that one of them then makes differ.
        // Writes waiting for a record see the close and end (unacknowledged) at once.
        self.wake_waiters();
        let drained =
            tokio::time::timeout(DRAIN_TIMEOUT, self.drained_before(u64::MAX)).await.is_ok();
        if !drained {
            tracing::warn!(volume = %self.volume, "writes still in flight at close; not recorded as a clean shutdown");
        }
        self.cancel.cancel();
        self.tasks.close();
        self.wake_waiters();
        if tokio::time::timeout(TASK_STOP_TIMEOUT, self.tasks.wait()).await.is_err() {
            tracing::warn!(volume = %self.volume, "nexus tasks did not stop in time");
        }
        let mut result = flushed;
        if drained && self.started.load(Ordering::Acquire) && !self.is_stopped() {
            // Bounded well below the recorder's own retries: the flag only spares a later
            // nexus some work, and an engine stopping while control is away must still close
            // its pools (their final checkpoint) within its supervisor's grace period.
            let (_, record) = self.membership_record(true);
            match tokio::time::timeout(CLEAN_RECORD_TIMEOUT, self.recorder.record_children(record))
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(volume = %self.volume, error = %e, "recording the clean shutdown failed");
                    result = result.and(Err(ExportError::Io(e.to_string())));
                }
                Err(_) => {
                    tracing::warn!(volume = %self.volume, "recording the clean shutdown timed out");
                }
            }
        }
        tracing::info!(volume = %self.volume, "nexus closed");
        result
    }

    /// The membership to record now, with `clear_dirty` when every child is online; clearing
    /// the in-memory log happens here, under the same locks that writers check it under, so
    /// a region marked later (after a new fault) is recorded after this record.
    /// Returns the table version the record describes.
    fn membership_record(&self, clean_shutdown: bool) -> (u64, MembershipRecord) {
        let table = self.children.lock();
        let clear_dirty = table.all_online();
        if clear_dirty {
            self.dirty.lock().log.clear();
        }
        let record = MembershipRecord {
            volume: self.volume,
            epoch: self.epoch,
            children: table.records(),
            clear_dirty,
            clean_shutdown,
        };
        (table.version(), record)
    }

    fn is_stopped(&self) -> bool {
        self.stopped_flag.load(Ordering::Acquire)
    }

    /// Stops serving for good: every later I/O fails, tasks are cancelled.
    fn stop(&self, reason: String) {
        {
            let mut stopped = self.stopped.lock();
            if stopped.is_some() {
                return;
            }
            tracing::error!(volume = %self.volume, %reason, "nexus stops serving");
            *stopped = Some(reason);
        }
        self.stopped_flag.store(true, Ordering::Release);
        self.cancel.cancel();
        self.wake_waiters();
    }

    fn wake_waiters(&self) {
        self.persisted.send_modify(|_| {});
        self.dirty_done.send_modify(|_| {});
    }

    fn not_serving(&self) -> NexusError {
        match self.stopped_reason() {
            Some(reason) => NexusError::Stopped(reason),
            None => NexusError::Closed,
        }
    }

    fn check_serving(&self) -> Result<(), NexusError> {
        if self.is_stopped() || self.closed.load(Ordering::Acquire) {
            return Err(self.not_serving());
        }
        Ok(())
    }

    /// Starts a task for every rebuilding child that has none.
    fn spawn_rebuilds(self: &Arc<Self>) {
        let jobs = {
            let mut table = self.children.lock();
            let joined = table.version();
            table
                .unassigned_rebuilds()
                .into_iter()
                .map(|(replica, id, target, kind)| rebuild::Job {
                    replica,
                    id,
                    target,
                    kind,
                    joined,
                })
                .collect::<Vec<_>>()
        };
        for job in jobs {
            let token = self.cancel.child_token();
            let old = self.rebuild_cancels.lock().insert(job.replica, (job.id, token.clone()));
            if let Some((_, old)) = old {
                old.cancel();
            }
            self.tasks.spawn(rebuild::run(Arc::downgrade(self), job, token));
        }
    }
}

impl Drop for Nexus {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod rebuild_tests;
#[cfg(test)]
mod record_tests;
#[cfg(test)]
mod tests;
