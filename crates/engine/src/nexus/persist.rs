//! The persist task: the one place a nexus talks to its [`Recorder`](super::Recorder).
//!
//! ```text
//!   writers ──pending regions──┐                     ┌──> dirty_done (batch n recorded)
//!   table changes ──version────┴─> persist task ─────┴──> persisted (version v recorded)
//! ```
//!
//! One task does both kinds of call, one at a time, so they reach the store in the order the
//! nexus made them: a log clear (sent with the membership once every child is online) can
//! never overtake a region marked after a later fault. Dirty regions go first, because writes
//! wait for them before they even reach the children. Concurrent writers share one
//! `mark_dirty` call: whatever accumulated while the previous call ran goes in the next.
//!
//! Any recorder error is final: the nexus stops serving (a `Fenced` reply means a newer
//! nexus owns the volume; anything else means it cannot prove its state is recorded).

use std::sync::{Arc, Weak};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Nexus;
use super::recorder::{MembershipRecord, RecordError};

enum Work {
    Dirty { batch: u64, regions: Vec<u64> },
    Members { version: u64, record: MembershipRecord },
    Idle,
}

impl Nexus {
    /// What the persist task should record next.
    fn next_record_work(&self) -> Work {
        {
            let mut dirty = self.dirty.lock();
            if !dirty.pending.is_empty() {
                let regions: Vec<u64> = std::mem::take(&mut dirty.pending).into_iter().collect();
                let batch = dirty.next_batch;
                dirty.next_batch += 1;
                return Work::Dirty { batch, regions };
            }
        }
        let version = self.children.lock().version();
        if version > *self.persisted.borrow() {
            let (version, record) = self.membership_record(false);
            return Work::Members { version, record };
        }
        Work::Idle
    }

    fn record_failed(&self, what: &str, e: RecordError) {
        let reason = match e {
            RecordError::Fenced(msg) => format!("fenced: {msg}"),
            RecordError::Unavailable(msg) => format!("could not record {what}: {msg}"),
        };
        self.stop(reason);
    }
}

pub(super) async fn run(nexus: Weak<Nexus>, kick: Arc<Notify>, cancel: CancellationToken) {
    loop {
        let Some(n) = nexus.upgrade() else { return };
        match n.next_record_work() {
            Work::Dirty { batch, regions } => {
                let count = regions.len();
                let region_bytes = n.dirty.lock().log.region_bytes();
                let call = n.recorder.mark_dirty(n.volume, n.epoch, region_bytes, regions.clone());
                let result = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = call => r,
                };
                match result {
                    Ok(()) => {
                        {
                            let mut dirty = n.dirty.lock();
                            for r in regions {
                                dirty.log.set(r);
                            }
                        }
                        tracing::debug!(volume = %n.volume, regions = count, "dirty regions recorded");
                        n.dirty_done.send_modify(|done| *done = (*done).max(batch));
                    }
                    Err(e) => return n.record_failed("dirty regions", e),
                }
            }
            Work::Members { version, record } => {
                let call = n.recorder.record_children(record);
                let result = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = call => r,
                };
                match result {
                    Ok(generation) => {
                        n.generation.store(generation, std::sync::atomic::Ordering::Release);
                        n.children.lock().recorded(version);
                        n.persisted.send_modify(|v| *v = (*v).max(version));
                    }
                    Err(e) => return n.record_failed("the membership", e),
                }
            }
            Work::Idle => {
                drop(n);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = kick.notified() => {}
                }
            }
        }
    }
}
