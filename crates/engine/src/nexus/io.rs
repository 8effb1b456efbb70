//! The nexus's data path: the NBD [`Export`] over its children.
//!
//! A write-like request (write, trim, write_zeroes) goes through these steps:
//!
//! ```text
//!   shared region lock ─> [some child out? regions not in the log? record them, retry]
//!                      ─> fan out to online + rebuilding children ─> fault the failed ones
//!                      ─> [a child failed? record the regions] ─> wait: table version recorded
//!                      ─> acknowledge
//! ```
//!
//! Choosing the children and checking the log happen in one critical section of the table's
//! lock, so a child faulted by another request in between cannot miss a write that the log
//! does not hold.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use futures::future::join_all;
use trireme_iobuf::IoBuf;
use trireme_nbd::{Export, ExportError, Extent};

use super::child::{Child, ChildError, ChildExtent};
use super::state::FaultOutcome;
use super::{Nexus, range_lock::SharedGuard};

fn faulted() -> ExportError {
    ExportError::Io("nexus is faulted: no online child".to_owned())
}

fn to_export_error(e: ChildError) -> ExportError {
    match e {
        ChildError::NoSpace => ExportError::NoSpace,
        other => ExportError::Io(other.to_string()),
    }
}

/// A write-like request ready to go: its region locks, its place among the requests in
/// flight, and its children.
struct Prepared<'a> {
    _lock: SharedGuard,
    inflight: Inflight<'a>,
    regions: Range<u64>,
    writers: Vec<Arc<dyn Child>>,
}

/// Counts a request in [`Nexus::inflight`] until dropped.
struct Inflight<'a> {
    nexus: &'a Nexus,
    version: u64,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        {
            let mut inflight = self.nexus.inflight.lock();
            if let Some(count) = inflight.get_mut(&self.version) {
                *count -= 1;
                if *count == 0 {
                    inflight.remove(&self.version);
                }
            }
        }
        self.nexus.inflight_done.notify_waiters();
    }
}

impl Nexus {
    /// Waits until every write-like request that chose its children before table version
    /// `version` has finished (and logged its regions if it failed somewhere).
    pub(super) async fn drained_before(&self, version: u64) {
        loop {
            let done = self.inflight_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.inflight.lock().range(..version).next().is_none() {
                return;
            }
            done.await;
        }
    }

    pub(super) fn check_open(&self) -> Result<(), ExportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(ExportError::ShuttingDown);
        }
        if self.is_stopped() {
            let reason = self.stopped_reason().unwrap_or_default();
            return Err(ExportError::Io(format!("nexus stopped serving: {reason}")));
        }
        Ok(())
    }

    /// Handles a child's error: `Fenced` stops the nexus; anything else faults the child.
    /// Returns whether the I/O may go on without it.
    pub(super) fn fault_child(&self, child: &Arc<dyn Child>, err: &ChildError) -> bool {
        let replica = child.replica_id();
        if let ChildError::Fenced(msg) = err {
            self.stop(format!("fenced by child {replica}: {msg}"));
            return false;
        }
        let reason = err.fault_reason();
        let outcome = self.children.lock().fault_instance(child, reason);
        match outcome {
            FaultOutcome::Faulted => {
                self.log_unflushed();
                if let Some(token) = self.rebuild_cancels.lock().remove(&replica) {
                    token.1.cancel();
                }
                self.kick.notify_one();
                tracing::warn!(volume = %self.volume, %replica, %reason, error = %err, "child faulted");
                true
            }
            FaultOutcome::AlreadyFaulted | FaultOutcome::Unknown | FaultOutcome::Stale => true,
            FaultOutcome::RefusedLastOnline => {
                tracing::debug!(volume = %self.volume, %replica, error = %err,
                    "I/O error on the last online child, returned to the client");
                false
            }
        }
    }

    /// The regions of a byte range in the dirty-region log's units.
    fn regions(&self, offset: u64, len: u64) -> Range<u64> {
        self.dirty.lock().log.regions(offset, len)
    }

    /// Locks the regions of a write-like request and picks its children. While some child is
    /// out, the regions are recorded in the log first.
    async fn prepare_write(&self, offset: u64, len: u64) -> Result<Prepared<'_>, ExportError> {
        let regions = self.regions(offset, len);
        let guard = self.ranges.shared(regions.clone()).await;
        loop {
            self.check_open()?;
            let missing = {
                let table = self.children.lock();
                if table.reader().is_none() {
                    return Err(faulted());
                }
                let missing = if table.all_online() {
                    Vec::new()
                } else {
                    self.dirty.lock().log.missing(regions.clone())
                };
                if missing.is_empty() {
                    let version = table.version();
                    *self.inflight.lock().entry(version).or_default() += 1;
                    let inflight = Inflight { nexus: self, version };
                    let writers = table.writers();
                    return Ok(Prepared { _lock: guard, inflight, regions, writers });
                }
                missing
            };
            self.mark_dirty(missing).await?;
        }
    }

    /// A child just faulted: what it acknowledged since the last flush may be lost with it,
    /// so those regions go to the log (queued; nothing waits for them).
    pub(super) fn log_unflushed(&self) {
        let unflushed = self.unflushed.lock().regions();
        self.queue_dirty(unflushed);
    }

    /// Queues the regions the log lacks for the recorder; returns the batch that will carry
    /// them, or None if there is nothing to wait for.
    fn queue_dirty(&self, regions: Vec<u64>) -> Option<u64> {
        if regions.is_empty() {
            return None;
        }
        let batch = {
            let mut dirty = self.dirty.lock();
            if !self.started.load(Ordering::Acquire) {
                // Recorded nowhere: keep the log in memory only.
                for r in regions {
                    dirty.log.set(r);
                }
                return None;
            }
            let mut any = false;
            for r in regions {
                if !dirty.log.is_set(r) {
                    dirty.pending.insert(r);
                    any = true;
                }
            }
            if !any {
                return None;
            }
            dirty.next_batch
        };
        self.kick.notify_one();
        Some(batch)
    }

    /// Gets `regions` recorded in the dirty-region log (batched with concurrent callers).
    pub(super) async fn mark_dirty(&self, regions: Vec<u64>) -> Result<(), ExportError> {
        let Some(batch) = self.queue_dirty(regions) else { return Ok(()) };
        let mut rx = self.dirty_done.subscribe();
        loop {
            self.check_open()?;
            if *rx.borrow_and_update() >= batch {
                return Ok(());
            }
            if rx.changed().await.is_err() {
                return Err(ExportError::ShuttingDown);
            }
        }
    }

    /// Waits until the recorder stored a table at least as new as `version`.
    pub(super) async fn wait_persisted(&self, version: u64) -> Result<(), ExportError> {
        if !self.started.load(Ordering::Acquire) {
            return Ok(());
        }
        if *self.persisted.borrow() >= version {
            return Ok(());
        }
        self.kick.notify_one();
        let mut rx = self.persisted.subscribe();
        loop {
            self.check_open()?;
            if *rx.borrow_and_update() >= version {
                return Ok(());
            }
            if rx.changed().await.is_err() {
                return Err(ExportError::ShuttingDown);
            }
        }
    }

    /// Waits for one fanned-out operation on every child and settles the outcome: failed
    /// children are faulted and the regions of the request recorded as dirty; the client sees
    /// an error only if the last online child failed (or the nexus stopped). Nothing is
    /// acknowledged before the table version it ends with is recorded.
    async fn complete<F>(
        &self,
        regions: Range<u64>,
        ops: impl IntoIterator<Item = F>,
    ) -> Result<(), ExportError>
    where
        F: Future<Output = (Arc<dyn Child>, Result<(), ChildError>)>,
    {
        let mut client_error = None;
        let mut any_failed = false;
        for (child, result) in join_all(ops).await {
            if let Err(e) = result {
                // Even when the error goes to the client (the last online child failed), the
                // other children may hold the new data: the region is logged either way.
                any_failed = true;
                if !self.fault_child(&child, &e) {
                    client_error.get_or_insert(e);
                }
            }
        }
        self.check_open()?;
        if any_failed {
            self.mark_dirty(regions.collect()).await?;
        }
        let version = self.children.lock().version();
        self.wait_persisted(version).await?;
        match client_error {
            None => Ok(()),
            Some(e) => Err(to_export_error(e)),
        }
    }

    /// A write-like request completed: unless it was durable on arrival (FUA), its regions
    /// stay among those a faulting child may lose until a flush covers them. If a child left
    /// while it ran, that child's fault may have logged the unflushed regions before these
    /// joined them, so they go to the log now.
    async fn written(&self, p: &Prepared<'_>, durable: bool) -> Result<(), ExportError> {
        if !durable {
            self.unflushed.lock().note(p.regions.clone());
        }
        if self.children.lock().version() != p.inflight.version {
            self.mark_dirty(p.regions.clone().collect()).await?;
        }
        Ok(())
    }

    pub(super) async fn flush_children(&self) -> Result<(), ExportError> {
        let writers = {
            let table = self.children.lock();
            if table.reader().is_none() {
                return Err(faulted());
            }
            table.writers()
        };
        let mark = self.unflushed.lock().mark();
        self.complete(
            0..0,
            writers.into_iter().map(|c| async move {
                let result = c.flush().await;
                (c, result)
            }),
        )
        .await?;
        // Every child that took part flushed, or faulted with the unflushed regions logged.
        self.unflushed.lock().flushed(mark);
        Ok(())
    }

    /// Runs `op` on the first online child, failing over to the next one on errors.
    async fn read_from_online<T, F, Fut>(&self, op: F) -> Result<T, ExportError>
    where
        F: Fn(Arc<dyn Child>) -> Fut,
        Fut: Future<Output = Result<T, ChildError>>,
    {
        loop {
            self.check_open()?;
            let child = self.children.lock().reader().ok_or_else(faulted)?;
            match op(Arc::clone(&child)).await {
                Ok(v) => return Ok(v),
                // Each failed attempt faults one child (or stops the nexus), so this ends.
                Err(e) if self.fault_child(&child, &e) => continue,
                Err(e) => {
                    self.check_open()?;
                    return Err(to_export_error(e));
                }
            }
        }
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
        self.read_from_online(|c| async move { c.read(offset, len).await }).await
    }

    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), ExportError> {
        self.check_open()?;
        let p = self.prepare_write(offset, data.len() as u64).await?;
        let last = p.writers.len().saturating_sub(1);
        let mut data = Some(data);
        let ops = p.writers.iter().enumerate().map(|(i, child)| {
            let child = Arc::clone(child);
            // The last child takes the original buffer; the others get copies.
            let buf = if i == last { data.take() } else { data.clone() };
            async move {
                let result = match buf {
                    Some(buf) => child.write(offset, buf, fua).await,
                    None => Err(ChildError::Io("write buffer missing".to_owned())),
                };
                (child, result)
            }
        });
        let ops: Vec<_> = ops.collect();
        self.complete(p.regions.clone(), ops).await?;
        self.written(&p, fua).await
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.check_open()?;
        self.flush_children().await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.check_open()?;
        let p = self.prepare_write(offset, len).await?;
        self.complete(
            p.regions.clone(),
            p.writers.iter().cloned().map(|c| async move {
                let mut result = c.trim(offset, len).await;
                if fua && result.is_ok() {
                    result = c.flush().await;
                }
                (c, result)
            }),
        )
        .await?;
        self.written(&p, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), ExportError> {
        self.check_open()?;
        let p = self.prepare_write(offset, len).await?;
        self.complete(
            p.regions.clone(),
            p.writers.iter().cloned().map(|c| async move {
                let mut result = c.write_zeroes(offset, len, may_trim).await;
                if fua && result.is_ok() {
                    result = c.flush().await;
                }
                (c, result)
            }),
        )
        .await?;
        self.written(&p, fua).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        let runs =
            self.read_from_online(|c| async move { c.allocation(offset, len).await }).await?;
        Ok(to_extents(offset, len, &runs))
    }
}
