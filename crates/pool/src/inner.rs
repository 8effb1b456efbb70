//! State shared by the pool and every open replica handle.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::PoolError;
use crate::fence::ReadFence;
use crate::io::Backend;
use crate::journal::Journal;
use crate::layout::Superblock;
use crate::meta::Meta;

pub(crate) struct Inner {
    pub(crate) disk: PathBuf,
    pub(crate) dev: Backend,
    pub(crate) sb: Superblock,
    /// The metadata; held only for in-memory work, never across I/O.
    pub(crate) meta: Mutex<Meta>,
    /// The journal writer; held across the commit I/O, which is what serialises commits.
    pub(crate) journal: tokio::sync::Mutex<Journal>,
    /// Serialises structural operations (create, destroy, resize, snapshot, clone, meta).
    pub(crate) admin: tokio::sync::Mutex<()>,
    /// Data operations hold it shared; `close` takes it exclusively to drain them.
    pub(crate) gate: Arc<tokio::sync::RwLock<()>>,
    pub(crate) closed: AtomicBool,
    /// Set when a metadata write failed: the on-disk state is then behind memory, so the pool
    /// refuses further work until it is imported again.
    pub(crate) failed: AtomicBool,
    syncs_started: AtomicU64,
    syncs_done: AtomicU64,
    /// Reads register here; released clusters are reused only after earlier reads end.
    pub(crate) reads: ReadFence,
    /// Tests hold structural zeroing here, to act while it is under way.
    #[cfg(test)]
    pub(crate) zeroing: tokio::sync::RwLock<()>,
}

impl Inner {
    pub(crate) fn new(
        disk: PathBuf,
        dev: Backend,
        sb: Superblock,
        meta: Meta,
        journal: Journal,
    ) -> Self {
        Self {
            disk,
            dev,
            sb,
            meta: Mutex::new(meta),
            journal: tokio::sync::Mutex::new(journal),
            admin: tokio::sync::Mutex::new(()),
            gate: Arc::new(tokio::sync::RwLock::new(())),
            closed: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            syncs_started: AtomicU64::new(0),
            syncs_done: AtomicU64::new(0),
            reads: ReadFence::default(),
            #[cfg(test)]
            zeroing: tokio::sync::RwLock::new(()),
        }
    }

    pub(crate) fn meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn usable(&self) -> Result<(), PoolError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PoolError::Closed);
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(PoolError::Failed);
        }
        Ok(())
    }

    pub(crate) fn cluster_size(&self) -> u64 {
        self.sb.layout.cluster_size
    }

    /// Makes every completed write and every queued metadata record durable.
    ///
    /// Group commit: a caller that finds, once it holds the journal, that a whole commit
    /// started after it was called has already completed, returns without doing any I/O.
    pub(crate) async fn flush(&self, checkpoint: bool) -> Result<(), PoolError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(PoolError::Failed);
        }
        if !checkpoint && self.closed.load(Ordering::Acquire) {
            // The close checkpoint took every record queued before it; nothing may touch the
            // disk after it (another instance may already own it).
            return if self.meta().pending_n == 0 { Ok(()) } else { Err(PoolError::Closed) };
        }
        let ticket = self.syncs_started.load(Ordering::Acquire);
        let mut j = self.journal.lock().await;
        if !checkpoint && self.syncs_done.load(Ordering::Acquire) > ticket {
            return Ok(());
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(PoolError::Failed);
        }
        let n = self.syncs_started.fetch_add(1, Ordering::AcqRel) + 1;
        match j.commit(&self.dev, &self.sb.layout, &self.meta, checkpoint).await {
            Ok(released) => {
                if !released.is_empty() {
                    self.reads.wait_for_earlier_reads().await;
                    self.meta().release(released);
                }
                self.syncs_done.store(n, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                tracing::error!(disk = %self.disk.display(), error = %e, "pool metadata commit failed; pool stopped");
                self.failed.store(true, Ordering::Release);
                Err(e)
            }
        }
    }

    #[cfg(test)]
    pub(crate) async fn journal_state(&self) -> Journal {
        *self.journal.lock().await
    }
}
