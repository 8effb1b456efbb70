//! The nexus: a volume's target. Every volume is reached through exactly one nexus, which the
//! engine shares over NBD under the volume's UUID.
//!
//! ```text
//!   NBD client ──> share (export "<volume uuid>") ──> Nexus ──┬─> child: replica:///<uuid>  (local pool)
//!                                                              ├─> child: nbd://B/replica-… (next issue)
//!                                                              └─> child: nbd://C/replica-…
//! ```
//!
//! **Reads** go to one `online` child. If it errs, it is faulted and the read is retried on the
//! next online child, so a client sees an error only when no copy is left.
//!
//! **Writes, FLUSH, TRIM and WRITE_ZEROES** go to every child that receives writes (`online`
//! and `rebuilding`), concurrently, and are acknowledged when all of them have answered. A
//! child that fails is faulted and the operation still succeeds on the others; but the last
//! online child is never faulted: its error goes to the client instead, because faulting it
//! would leave the nexus with nothing current to serve. The membership rules live in
//! [`state::ChildTable`], apart from the I/O, so they are tested without disks.
//!
//! **No lock is held across an await.** Each operation takes the table's lock just long enough
//! to clone the `Arc`s of the children it needs, then does its I/O unlocked; a fault re-takes
//! the lock briefly. The write buffer ([`IoBuf`]) passes through untouched to a single child;
//! with several children all but the last get a copy, because each child's backend (io_uring,
//! a socket) needs to own its buffer for the duration of the operation.
//!
//! **Seams for replication** (the next issue): a child added to a running nexus starts
//! `rebuilding`; [`Nexus::complete`] is where a changed healthy-child set is persisted before
//! the write that caused it is acknowledged; remote children implement [`Child`] over NBD.

mod child;
pub mod recorder;
mod state;
#[cfg(test)]
pub(crate) mod testing;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use futures::future::join_all;
use parking_lot::Mutex;
use trireme_iobuf::IoBuf;
use trireme_nbd::{Export, ExportError, Extent};
use trireme_types::{ChildState, NexusState, ReplicaId, VolumeId};

pub use child::{Child, ChildError, ChildExtent, ChildUri, ChildUriError, LocalChild};
use state::ChildTable;
pub use state::{FaultOutcome, RemoveOutcome};

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
}

/// A snapshot of one child for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildInfo {
    pub uri: ChildUri,
    pub replica: ReplicaId,
    pub state: ChildState,
}

pub struct Nexus {
    volume: VolumeId,
    size: AtomicU64,
    children: Mutex<ChildTable>,
    closed: AtomicBool,
}

impl Nexus {
    /// A nexus of `size` bytes over `children`, all online.
    pub fn new(
        volume: VolumeId,
        size: u64,
        children: Vec<Arc<dyn Child>>,
    ) -> Result<Self, NexusError> {
        if children.is_empty() {
            return Err(NexusError::NoChildren);
        }
        for (i, c) in children.iter().enumerate() {
            let replica = c.replica_id();
            if children[..i].iter().any(|o| o.replica_id() == replica) {
                return Err(NexusError::DuplicateChild { replica });
            }
            if c.size() < size {
                return Err(NexusError::ChildTooSmall { replica, size: c.size(), needed: size });
            }
        }
        Ok(Self {
            volume,
            size: AtomicU64::new(size),
            children: Mutex::new(ChildTable::new_online(children)),
            closed: AtomicBool::new(false),
        })
    }

    pub fn volume(&self) -> VolumeId {
        self.volume
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
                uri: s.child.uri().clone(),
                replica: s.child.replica_id(),
                state: s.state,
            })
            .collect()
    }

    /// Whether `replica` is one of this nexus's children.
    pub fn has_child(&self, replica: ReplicaId) -> bool {
        self.children.lock().slots().iter().any(|s| s.child.replica_id() == replica)
    }

    /// Grows the nexus; every child must already hold `new_size` bytes. Idempotent.
    pub fn resize(&self, new_size: u64) -> Result<(), NexusError> {
        let table = self.children.lock();
        let current = self.size.load(Ordering::Acquire);
        if new_size < current {
            return Err(NexusError::Shrink { from: current, to: new_size });
        }
        for s in table.slots() {
            let size = s.child.size();
            if size < new_size {
                let replica = s.child.replica_id();
                return Err(NexusError::ChildTooSmall { replica, size, needed: new_size });
            }
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Adds a child that starts `rebuilding`: it takes every write from now on and serves
    /// reads once a rebuild has copied the rest and marked it online.
    pub fn add_child(&self, child: Arc<dyn Child>) -> Result<(), NexusError> {
        let size = self.size.load(Ordering::Acquire);
        let replica = child.replica_id();
        if child.size() < size {
            return Err(NexusError::ChildTooSmall { replica, size: child.size(), needed: size });
        }
        self.children
            .lock()
            .add_rebuilding(child, size)
            .map_err(|_| NexusError::DuplicateChild { replica })?;
        tracing::info!(volume = %self.volume, %replica, "child added, rebuilding");
        Ok(())
    }

    /// Removes a child (shrink, drain). Idempotent; the last online child is never removed.
    pub fn remove_child(&self, replica: ReplicaId) -> Result<(), NexusError> {
        let outcome = self.children.lock().remove(replica);
        match outcome {
            RemoveOutcome::Removed => {
                tracing::info!(volume = %self.volume, %replica, "child removed");
                Ok(())
            }
            RemoveOutcome::Absent => Ok(()),
            RemoveOutcome::RefusedLastOnline => Err(NexusError::LastOnlineChild { replica }),
        }
    }

    /// Stops serving: later I/O fails with `ShuttingDown`; completed writes are flushed.
    pub async fn close(&self) -> Result<(), ExportError> {
        // Flush first, then refuse I/O: a client's last acknowledged writes become durable
        // even when the nexus is destroyed under it.
        let result = self.flush_children().await;
        self.closed.store(true, Ordering::Release);
        result
    }

    fn check_open(&self) -> Result<(), ExportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(ExportError::ShuttingDown);
        }
        Ok(())
    }

    /// Faults the child after `err`; returns whether the I/O may go on without it.
    fn fault_child(&self, replica: ReplicaId, err: &ChildError) -> bool {
        let reason = err.fault_reason();
        let outcome = self.children.lock().fault(replica, reason);
        match outcome {
            FaultOutcome::Faulted => {
                tracing::warn!(volume = %self.volume, %replica, %reason, error = %err, "child faulted");
                true
            }
            FaultOutcome::AlreadyFaulted | FaultOutcome::Unknown => true,
            FaultOutcome::RefusedLastOnline => {
                tracing::debug!(volume = %self.volume, %replica, error = %err,
                    "I/O error on the last online child, returned to the client");
                false
            }
        }
    }

    /// The children a write must reach; none when no child is online (the nexus is faulted
    /// and must not accept writes that only a stale copy would hold).
    fn writers(&self) -> Result<Vec<Arc<dyn Child>>, ExportError> {
        let table = self.children.lock();
        if table.reader().is_none() {
            return Err(faulted());
        }
        Ok(table.writers())
    }

    /// Waits for one fanned-out operation on every child and settles the outcome: failed
    /// children are faulted; the client sees an error only if the last online child failed.
    async fn complete<F>(&self, ops: impl IntoIterator<Item = F>) -> Result<(), ExportError>
    where
        F: Future<Output = (ReplicaId, Result<(), ChildError>)>,
    {
        let mut client_error = None;
        for (replica, result) in join_all(ops).await {
            if let Err(e) = result
                && !self.fault_child(replica, &e)
            {
                client_error.get_or_insert(e);
            }
        }
        // Replication persists the healthy-child set here, before acknowledging, whenever
        // the loop above faulted a child.
        match client_error {
            None => Ok(()),
            Some(e) => Err(to_export_error(e)),
        }
    }

    async fn flush_children(&self) -> Result<(), ExportError> {
        let writers = self.writers()?;
        self.complete(writers.into_iter().map(|c| async move { (c.replica_id(), c.flush().await) }))
            .await
    }
}

fn faulted() -> ExportError {
    ExportError::Io("nexus is faulted: no online child".to_owned())
}

fn to_export_error(e: ChildError) -> ExportError {
    match e {
        ChildError::NoSpace => ExportError::NoSpace,
        other => ExportError::Io(other.to_string()),
    }
}

/// Turns a child's allocation runs into block-status extents covering `[offset, offset+len)`
/// from its start, contiguous and merged. A gap or a short map ends the reply early (the
/// protocol allows fewer bytes than asked); an unusable map answers "allocated", which is
/// always safe: a client then simply reads the data.
pub(crate) fn to_extents(offset: u64, len: u64, runs: &[ChildExtent]) -> Vec<Extent> {
    let end = offset.saturating_add(len);
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    for run in runs {
        let run_end = run.offset.saturating_add(run.length);
        if run_end <= pos {
            continue;
        }
        if run.offset > pos || pos >= end {
            break;
        }
        let length = run_end.min(end) - pos;
        let hole = !run.allocated;
        match out.last_mut() {
            Some(last) if last.hole == hole => last.length += length,
            _ => out.push(Extent { length, hole, zero: hole }),
        }
        pos += length;
    }
    if out.is_empty() {
        out.push(Extent { length: len, hole: false, zero: false });
    }
    out
}

#[async_trait]
impl Export for Nexus {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, ExportError> {
        self.check_open()?;
        loop {
            let child = self.children.lock().reader().ok_or_else(faulted)?;
            match child.read(offset, len).await {
                Ok(buf) => return Ok(buf),
                // Each failed attempt faults one child, so this loop ends.
                Err(e) if self.fault_child(child.replica_id(), &e) => continue,
                Err(e) => return Err(to_export_error(e)),
            }
        }
    }

    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), ExportError> {
        self.check_open()?;
        let writers = self.writers()?;
        let last = writers.len().saturating_sub(1);
        let mut data = Some(data);
        let ops = writers.into_iter().enumerate().map(|(i, child)| {
            // The last child takes the original buffer; the others get copies.
            let buf = if i == last { data.take() } else { data.clone() };
            async move {
                let result = match buf {
                    Some(buf) => child.write(offset, buf, fua).await,
                    None => Err(ChildError::Io("write buffer missing".to_owned())),
                };
                (child.replica_id(), result)
            }
        });
        let ops: Vec<_> = ops.collect();
        self.complete(ops).await
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.check_open()?;
        self.flush_children().await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.check_open()?;
        let writers = self.writers()?;
        self.complete(writers.into_iter().map(|c| async move {
            let mut result = c.trim(offset, len).await;
            if fua && result.is_ok() {
                result = c.flush().await;
            }
            (c.replica_id(), result)
        }))
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), ExportError> {
        self.check_open()?;
        let writers = self.writers()?;
        self.complete(writers.into_iter().map(|c| async move {
            let mut result = c.write_zeroes(offset, len, may_trim).await;
            if fua && result.is_ok() {
                result = c.flush().await;
            }
            (c.replica_id(), result)
        }))
        .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        self.check_open()?;
        loop {
            let child = self.children.lock().reader().ok_or_else(faulted)?;
            match child.allocation(offset, len).await {
                Ok(runs) => return Ok(to_extents(offset, len, &runs)),
                Err(e) if self.fault_child(child.replica_id(), &e) => continue,
                Err(e) => return Err(to_export_error(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests;
