//! A fence between reads and the reuse of released clusters.
//!
//! A read looks a cluster up under the metadata lock and then reads it without the lock. If,
//! meanwhile, the cluster left the map (a copy-on-write moved the data, then the snapshot that
//! still held the old copy was destroyed), was committed free and handed to another replica,
//! the read could return that replica's data. So before released clusters return to the free
//! pool, the committer waits for every read that started before the release to finish.
//!
//! Two-slot epoch counting: a reader registers in the slot of the current epoch; the
//! releaser advances the epoch and waits for the old slot to drain. Releases are serialised
//! (they happen under the journal lock), so a slot is always drained before it is reused.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use tokio::sync::Notify;

#[derive(Default)]
pub(crate) struct ReadFence {
    epoch: AtomicU64,
    active: [AtomicU64; 2],
    idle: Notify,
}

pub(crate) struct ReadGuard<'a> {
    fence: &'a ReadFence,
    slot: usize,
}

impl ReadFence {
    /// Registers a read until the guard drops.
    pub(crate) fn enter(&self) -> ReadGuard<'_> {
        loop {
            let e = self.epoch.load(SeqCst);
            let slot = (e & 1) as usize;
            self.active[slot].fetch_add(1, SeqCst);
            if self.epoch.load(SeqCst) == e {
                return ReadGuard { fence: self, slot };
            }
            // The epoch moved while registering: register again in the new slot.
            self.leave(slot);
        }
    }

    fn leave(&self, slot: usize) {
        if self.active[slot].fetch_sub(1, SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Waits until every read registered before this call has finished.
    pub(crate) async fn wait_for_earlier_reads(&self) {
        let slot = (self.epoch.fetch_add(1, SeqCst) & 1) as usize;
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active[slot].load(SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.fence.leave(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn waits_for_earlier_reads_only() {
        let f = Arc::new(ReadFence::default());
        let g = f.enter();
        let f2 = f.clone();
        let waiter = tokio::spawn(async move { f2.wait_for_earlier_reads().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "release did not wait for an earlier read");
        // A read starting now does not hold the release up.
        let later = f.enter();
        drop(g);
        tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap();
        drop(later);
        tokio::time::timeout(Duration::from_secs(10), f.wait_for_earlier_reads()).await.unwrap();
    }
}
