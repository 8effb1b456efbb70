//! Rebuilds: bringing a `rebuilding` child up to date from an online one.
//!
//! ```text
//!   for each region (Partial: the log's set regions; Full: every region), 4 at a time
//!       exclusive region lock ──> source.allocation(region)
//!           allocated runs: source.read ──> target.write     (counted in copied_bytes)
//!           holes:          target.write_zeroes(may_trim)    (so a reused replica keeps no stale data)
//!       unlock, progress
//!   flush target ──> online (recorded with the rebuild's summary)
//! ```
//!
//! The target receives every client write from the moment it joins, so a region copied once
//! stays current: the exclusive lock makes sure no write to the region is between its read
//! from the source and its write to the target. The source is always an online child, picked
//! per region (it may be faulted mid-way; the next online one takes over). A failure of the
//! target (or of every source) faults the target, with its need unchanged: a full rebuild that
//! failed still needs a full one. Only a rebuild that copied every region turns it online.
//!
//! Every nexus of an engine shares one [`RebuildLimits`]: a semaphore bounding how many
//! rebuilds copy at once, and a token bucket bounding their combined bandwidth. A region is
//! copied at full speed and paid for after its lock is released, so the limit spaces regions
//! out without ever holding a client write up.

use std::ops::Range;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use trireme_types::{FaultReason, ReplicaId};

use super::Nexus;
use super::child::{Child, ChildError};
use super::dirty::DirtyLog;
use super::recorder::{Join, RebuildSummary};
use super::state::FaultOutcome;

/// The largest single read/write of a copy.
const COPY_CHUNK: u64 = 1 << 20;

/// Regions one rebuild copies at once.
const REGIONS_IN_FLIGHT: usize = 4;

/// How many times a region is retried on another source after its source failed.
const SOURCE_RETRIES: usize = 8;

/// Limits shared by every rebuild of an engine.
pub struct RebuildLimits {
    permits: Arc<Semaphore>,
    bucket: Option<Mutex<Bucket>>,
}

struct Bucket {
    /// Bytes per second.
    rate: f64,
    capacity: f64,
    /// May go negative: a caller reserves its bytes and sleeps off the debt, so concurrent
    /// rebuilds queue fairly without a loop.
    tokens: f64,
    last: Instant,
}

impl RebuildLimits {
    /// `bandwidth_mib_per_s` of 0 means unlimited; a concurrency of 0 is taken as 1.
    pub fn new(bandwidth_mib_per_s: u64, concurrency: usize) -> Self {
        let bucket = (bandwidth_mib_per_s > 0).then(|| {
            let rate = bandwidth_mib_per_s as f64 * (1 << 20) as f64;
            // A quarter second of burst: smooth enough to see, small enough to matter.
            let capacity = rate / 4.0;
            Mutex::new(Bucket { rate, capacity, tokens: capacity, last: Instant::now() })
        });
        Self { permits: Arc::new(Semaphore::new(concurrency.max(1))), bucket }
    }

    /// Waits until `bytes` may be copied.
    pub async fn throttle(&self, bytes: u64) {
        let Some(bucket) = &self.bucket else { return };
        let wait = {
            let mut b = bucket.lock();
            let now = Instant::now();
            let refill = now.duration_since(b.last).as_secs_f64() * b.rate;
            b.tokens = (b.tokens + refill).min(b.capacity);
            b.last = now;
            b.tokens -= bytes as f64;
            if b.tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-b.tokens / b.rate)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

impl Default for RebuildLimits {
    /// The engine flags' defaults: unlimited bandwidth, two rebuilds at once.
    fn default() -> Self {
        Self::new(0, 2)
    }
}

/// One rebuild to run.
pub(super) struct Job {
    pub replica: ReplicaId,
    pub id: u64,
    pub target: Arc<dyn Child>,
    pub kind: Join,
    /// The table version when the task was assigned (at or after the child joined).
    pub joined: u64,
}

/// The regions a rebuild copies.
pub(super) enum Regions {
    /// Every region below this count (a full rebuild: no list of a million entries).
    All(u64),
    /// The dirty-region log's set regions (a partial rebuild).
    Listed(Vec<u64>),
}

impl Regions {
    fn iter(&self) -> Box<dyn Iterator<Item = u64> + Send + '_> {
        match self {
            Self::All(count) => Box::new(0..*count),
            Self::Listed(list) => Box::new(list.iter().copied()),
        }
    }

    fn count(&self) -> u64 {
        match self {
            Self::All(count) => *count,
            Self::Listed(list) => list.len() as u64,
        }
    }
}

/// Why a region could not be copied.
enum CopyError {
    /// No online child was left to copy from, or the sources kept failing.
    Source(ChildError),
    Target(ChildError),
}

/// Which side of one copy attempt failed.
enum Side {
    Source(ChildError),
    Target(ChildError),
}

pub(super) async fn run(nexus: Weak<Nexus>, job: Job, cancel: CancellationToken) {
    let Some(limits) = nexus.upgrade().map(|n| Arc::clone(&n.limits)) else { return };
    {
        let Some(n) = nexus.upgrade() else { return };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = n.drained_before(job.joined) => {}
        }
    }
    let permit = tokio::select! {
        _ = cancel.cancelled() => return,
        p = Arc::clone(&limits.permits).acquire_owned() => p,
    };
    let Ok(_permit) = permit else { return };
    let started = Instant::now();
    let (regions, layout, total) = {
        let Some(n) = nexus.upgrade() else { return };
        let size = n.size.load(std::sync::atomic::Ordering::Acquire);
        // The snapshot: every request that may have missed the child has logged by now.
        let (regions, layout) = {
            let dirty = n.dirty.lock();
            let layout = DirtyLog::new(dirty.log.region_bytes());
            let regions = match job.kind {
                // Regions still on their way to the store count too (those a faulting
                // child may have lost before it faulted are queued without a waiter).
                Join::Partial => {
                    let mut listed: Vec<u64> =
                        dirty.log.iter().chain(dirty.pending.iter().copied()).collect();
                    listed.sort_unstable();
                    listed.dedup();
                    Regions::Listed(listed)
                }
                _ => Regions::All(size.div_ceil(layout.region_bytes().max(1))),
            };
            (regions, layout)
        };
        let total = regions.iter().map(|r| len(&layout.span(r, size))).sum();
        n.children.lock().set_progress(job.replica, job.id, 0, total);
        tracing::info!(volume = %n.volume, replica = %job.replica, kind = ?job.kind,
            regions = regions.count(), total_bytes = total, "rebuild started");
        (regions, layout, total)
    };
    let (mut done, mut copied) = (0u64, 0u64);
    // Several regions in flight: one region at a time leaves the disks idle between a read
    // from the source and the write to the target (each region holds only its own lock, so
    // copies never wait on each other, and client writes wait only for the region they hit).
    let mut copies = futures::stream::iter(regions.iter())
        .map(|region| copy_step(&nexus, &job, &cancel, layout.clone(), region))
        .buffer_unordered(REGIONS_IN_FLIGHT);
    while let Some(step) = copies.next().await {
        let (span_len, region_copied) = match step {
            Step::Copied { span_len, copied } => (span_len, copied),
            Step::Skipped => continue,
            Step::Stop => return,
            Step::Failed(e) => {
                drop(copies);
                if let Some(n) = nexus.upgrade() {
                    n.rebuild_failed(&job, e);
                }
                return;
            }
        };
        let Some(n) = nexus.upgrade() else { return };
        copied += region_copied;
        done += span_len;
        n.children.lock().set_progress(job.replica, job.id, done.min(total), total);
    }
    drop(copies);
    let Some(n) = nexus.upgrade() else { return };
    let flushed = tokio::select! {
        _ = cancel.cancelled() => return,
        r = job.target.flush() => r,
    };
    if let Err(e) = flushed {
        return n.rebuild_failed(&job, CopyError::Target(e));
    }
    let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let summary = RebuildSummary { kind: job.kind, copied_bytes: copied, millis };
    if n.children.lock().finish_rebuild(job.replica, job.id, summary) {
        n.forget_rebuild(job.replica, job.id);
        n.kick.notify_one();
        tracing::info!(volume = %n.volume, replica = %job.replica, kind = ?job.kind,
            copied_bytes = copied, millis, "rebuild finished, child online");
    }
}

/// What one region's copy came to.
enum Step {
    Copied {
        span_len: u64,
        copied: u64,
    },
    /// Past the end of a shrunk span: nothing to copy.
    Skipped,
    /// Cancelled, or the rebuild is no longer this job's: end quietly.
    Stop,
    Failed(CopyError),
}

/// Copies one region under its exclusive lock, then pays the bandwidth limit for it.
async fn copy_step(
    nexus: &Weak<Nexus>,
    job: &Job,
    cancel: &CancellationToken,
    layout: DirtyLog,
    region: u64,
) -> Step {
    let Some(n) = nexus.upgrade() else { return Step::Stop };
    if cancel.is_cancelled() || !n.children.lock().owns_rebuild(job.replica, job.id) {
        return Step::Stop;
    }
    let span = layout.span(region, n.size.load(std::sync::atomic::Ordering::Acquire));
    if span.is_empty() {
        return Step::Skipped;
    }
    let result = tokio::select! {
        _ = cancel.cancelled() => return Step::Stop,
        r = async {
            let _guard = n.ranges.exclusive(region).await;
            copy_region(&n, job, span.clone()).await
        } => r,
    };
    let copied = match result {
        Ok(c) => c,
        Err(e) => return Step::Failed(e),
    };
    // Paid after the region is unlocked, so a slow limit never holds client writes up.
    tokio::select! {
        _ = cancel.cancelled() => return Step::Stop,
        _ = n.limits.throttle(copied) => {}
    }
    Step::Copied { span_len: len(&span), copied }
}

fn len(r: &Range<u64>) -> u64 {
    r.end - r.start
}

/// Copies one region from an online child to the target; returns the bytes copied.
async fn copy_region(n: &Nexus, job: &Job, span: Range<u64>) -> Result<u64, CopyError> {
    let mut attempts = 0;
    loop {
        let Some(source) = n.children.lock().reader() else {
            return Err(CopyError::Source(ChildError::Io("no online child to copy from".into())));
        };
        match copy_from(n, &*source, &*job.target, span.clone()).await {
            Ok(copied) => return Ok(copied),
            Err(Side::Target(e)) => return Err(CopyError::Target(e)),
            Err(Side::Source(e)) => {
                attempts += 1;
                if !n.fault_child(&source, &e) || attempts > SOURCE_RETRIES {
                    return Err(CopyError::Source(e));
                }
            }
        }
    }
}

/// One attempt at copying `span`, guided by the source's allocation map.
async fn copy_from(
    n: &Nexus,
    source: &dyn Child,
    target: &dyn Child,
    span: Range<u64>,
) -> Result<u64, Side> {
    let runs = source.allocation(span.start, len(&span)).await.map_err(Side::Source)?;
    let mut copied = 0;
    for (range, allocated) in segments(&span, &runs) {
        if !allocated {
            target.write_zeroes(range.start, len(&range), true).await.map_err(Side::Target)?;
            continue;
        }
        let mut pos = range.start;
        while pos < range.end {
            let chunk = (range.end - pos).min(COPY_CHUNK);
            // `chunk` ≤ 1 MiB, so it fits a u32.
            let buf = source.read(pos, chunk as u32).await.map_err(Side::Source)?;
            target.write(pos, buf, false).await.map_err(Side::Target)?;
            copied += chunk;
            pos += chunk;
            n.rebuild_bytes.fetch_add(chunk, std::sync::atomic::Ordering::Relaxed);
        }
    }
    Ok(copied)
}

/// Splits `span` into allocated and unallocated pieces by `runs`. Anything the map does not
/// describe (a gap, a short map) counts as allocated: copying is always safe.
fn segments(span: &Range<u64>, runs: &[super::ChildExtent]) -> Vec<(Range<u64>, bool)> {
    let mut out: Vec<(Range<u64>, bool)> = Vec::new();
    let mut push = |range: Range<u64>, allocated: bool| {
        if range.is_empty() {
            return;
        }
        match out.last_mut() {
            Some((last, a)) if *a == allocated && last.end == range.start => last.end = range.end,
            _ => out.push((range, allocated)),
        }
    };
    let mut pos = span.start;
    for run in runs {
        let start = run.offset.max(pos);
        let end = run.offset.saturating_add(run.length).min(span.end);
        if end <= start {
            continue;
        }
        push(pos..start, true);
        push(start..end, run.allocated);
        pos = end;
        if pos >= span.end {
            break;
        }
    }
    push(pos..span.end, true);
    out
}

impl Nexus {
    fn forget_rebuild(&self, replica: ReplicaId, id: u64) {
        let mut cancels = self.rebuild_cancels.lock();
        if cancels.get(&replica).is_some_and(|(i, _)| *i == id) {
            cancels.remove(&replica);
        }
    }

    /// The target goes faulted, keeping what it needs; a fenced child stops the nexus.
    fn rebuild_failed(&self, job: &Job, e: CopyError) {
        self.forget_rebuild(job.replica, job.id);
        let (side, err) = match e {
            CopyError::Source(e) => ("source", e),
            CopyError::Target(e) => ("target", e),
        };
        if let ChildError::Fenced(msg) = &err {
            return self.stop(format!("fenced during a rebuild: {msg}"));
        }
        if self.is_stopped() || !self.children.lock().owns_rebuild(job.replica, job.id) {
            return;
        }
        let reason = if side == "target" { err.fault_reason() } else { FaultReason::Disconnected };
        let outcome = self.children.lock().fault(job.replica, reason);
        if outcome == FaultOutcome::Faulted {
            // The target took client writes while it rebuilt.
            self.log_unflushed();
            self.kick.notify_one();
        }
        tracing::warn!(volume = %self.volume, replica = %job.replica, kind = ?job.kind,
            failed = side, error = %err, "rebuild failed, child faulted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nexus::ChildExtent;

    fn run(offset: u64, length: u64, allocated: bool) -> ChildExtent {
        ChildExtent { offset, length, allocated }
    }

    #[test]
    fn segments_cover_the_span_and_default_to_allocated() {
        let span = 100..200;
        assert_eq!(segments(&span, &[]), vec![(100..200, true)]);
        let runs = [run(0, 150, false), run(150, 100, true)];
        assert_eq!(segments(&span, &runs), vec![(100..150, false), (150..200, true)]);
        // A gap and a short map are copied.
        let runs = [run(100, 10, false), run(120, 10, false)];
        assert_eq!(
            segments(&span, &runs),
            vec![(100..110, false), (110..120, true), (120..130, false), (130..200, true)]
        );
    }
}
