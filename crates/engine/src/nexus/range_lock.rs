//! Region locks between client writes and a rebuild's copy.
//!
//! A rebuild copies one region at a time from an online child to the target: read from the
//! source, write to the target. A client write to the same region in between would reach
//! both children, and then the rebuild's older copy would overwrite it on the target. So every
//! write, trim and write_zeroes holds a *shared* lock on its regions from before it picks its
//! children until it has its answers, and the rebuild holds an *exclusive* lock on the region
//! it copies. Uncontended, a shared lock is one short mutex section.
//!
//! An exclusive request waits for the current holders, and blocks new shared holders while it
//! waits, so a steady stream of writes cannot starve a rebuild. A shared request takes all its
//! regions at once (or none), so two requests never wait on each other in a cycle.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

#[derive(Default)]
struct Region {
    shared: u32,
    exclusive: bool,
    waiting_exclusive: u32,
}

impl Region {
    fn idle(&self) -> bool {
        self.shared == 0 && !self.exclusive && self.waiting_exclusive == 0
    }
}

#[derive(Default)]
struct Inner {
    regions: Mutex<HashMap<u64, Region>>,
    released: Notify,
}

/// Shared/exclusive locks on region indexes.
#[derive(Default, Clone)]
pub(crate) struct RangeLock {
    inner: Arc<Inner>,
}

/// Holds shared locks on a range of regions until dropped.
pub(crate) struct SharedGuard {
    inner: Arc<Inner>,
    range: Range<u64>,
}

/// Holds the exclusive lock on one region until dropped.
pub(crate) struct ExclusiveGuard {
    inner: Arc<Inner>,
    region: u64,
}

/// Withdraws an exclusive request that was dropped while waiting.
struct WaitingExclusive<'a> {
    inner: &'a Inner,
    region: u64,
    armed: bool,
}

impl Drop for WaitingExclusive<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut regions = self.inner.regions.lock();
        if let Some(r) = regions.get_mut(&self.region) {
            r.waiting_exclusive -= 1;
            if r.idle() {
                regions.remove(&self.region);
            }
        }
        drop(regions);
        self.inner.released.notify_waiters();
    }
}

impl RangeLock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes shared locks on every region of `range`, waiting while any of them is held or
    /// wanted exclusively.
    pub async fn shared(&self, range: Range<u64>) -> SharedGuard {
        loop {
            let notified = self.inner.released.notified();
            tokio::pin!(notified);
            // Registered before checking, so a release between the check and the await
            // still wakes this request.
            notified.as_mut().enable();
            {
                let mut regions = self.inner.regions.lock();
                let free = range.clone().all(|i| {
                    regions.get(&i).is_none_or(|r| !r.exclusive && r.waiting_exclusive == 0)
                });
                if free {
                    for i in range.clone() {
                        regions.entry(i).or_default().shared += 1;
                    }
                    return SharedGuard { inner: Arc::clone(&self.inner), range };
                }
            }
            notified.await;
        }
    }

    /// Takes the exclusive lock on `region`.
    pub async fn exclusive(&self, region: u64) -> ExclusiveGuard {
        self.inner.regions.lock().entry(region).or_default().waiting_exclusive += 1;
        let mut waiting = WaitingExclusive { inner: &self.inner, region, armed: true };
        loop {
            let notified = self.inner.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut regions = self.inner.regions.lock();
                let r = regions.entry(region).or_default();
                if r.shared == 0 && !r.exclusive {
                    r.waiting_exclusive -= 1;
                    r.exclusive = true;
                    waiting.armed = false;
                    return ExclusiveGuard { inner: Arc::clone(&self.inner), region };
                }
            }
            notified.await;
        }
    }

    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.inner.regions.lock().is_empty()
    }
}

impl Drop for SharedGuard {
    fn drop(&mut self) {
        let mut regions = self.inner.regions.lock();
        for i in self.range.clone() {
            if let Some(r) = regions.get_mut(&i) {
                r.shared -= 1;
                if r.idle() {
                    regions.remove(&i);
                }
            }
        }
        drop(regions);
        self.inner.released.notify_waiters();
    }
}

impl Drop for ExclusiveGuard {
    fn drop(&mut self) {
        let mut regions = self.inner.regions.lock();
        if let Some(r) = regions.get_mut(&self.region) {
            r.exclusive = false;
            if r.idle() {
                regions.remove(&self.region);
            }
        }
        drop(regions);
        self.inner.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn pending<F: Future>(f: F) -> bool {
        tokio::time::timeout(Duration::from_millis(50), f).await.is_err()
    }

    #[tokio::test]
    async fn shared_locks_coexist_and_exclusive_waits_for_them() {
        let lock = RangeLock::new();
        let a = lock.shared(0..3).await;
        let b = lock.shared(2..4).await;
        assert!(pending(lock.exclusive(2)).await);
        drop(a);
        assert!(pending(lock.exclusive(2)).await);
        drop(b);
        let x = lock.exclusive(2).await;
        // Regions next to it are free; the held one is not.
        drop(lock.shared(0..2).await);
        assert!(pending(lock.shared(1..3)).await);
        drop(x);
        drop(lock.shared(1..3).await);
        assert!(lock.is_idle(), "dropped and abandoned requests leave nothing behind");
    }

    #[tokio::test]
    async fn a_waiting_exclusive_request_holds_off_new_shared_ones() {
        let lock = RangeLock::new();
        let held = lock.shared(5..6).await;
        let l2 = lock.clone();
        let excl = tokio::spawn(async move {
            let _g = l2.exclusive(5).await;
        });
        // Wait until the exclusive request is registered.
        while lock.inner.regions.lock().get(&5).is_none_or(|r| r.waiting_exclusive == 0) {
            tokio::task::yield_now().await;
        }
        assert!(pending(lock.shared(5..6)).await, "writers queue behind a rebuild");
        drop(held);
        excl.await.unwrap();
        drop(lock.shared(5..6).await);
        assert!(lock.is_idle());
    }
}
