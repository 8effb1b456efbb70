//! Block I/O on the pool's backing file or device.
//!
//! Everything the pool reads or writes — superblocks, checkpoints, journal blocks and replica
//! data — goes through [`Backend`], with offsets and lengths aligned to [`BLOCK`] so that
//! `O_DIRECT` accepts them. Buffers are owned [`IoBuf`]s moved into each operation and handed
//! back on completion: an operation whose caller went away still owns its memory until the
//! kernel is done with it.
//!
//! ```text
//!   pool / replica ──> Backend ─┬─ Uring  (io_uring, O_DIRECT; completions via eventfd + AsyncFd)
//!                               ├─ Sync   (pread/pwrite on tokio's blocking pool; fallback)
//!                               └─ Mem    (tests only: in-memory disk with crash injection)
//! ```
//!
//! The backend also counts what it does ([`DiskStats`]): operations, bytes and latency by kind,
//! so an operator sees a failing disk slow down before it fails.

#[cfg(test)]
pub(crate) mod mem;
mod sync;
mod uring;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use trireme_iobuf::IoBuf;
use trireme_types::{LatencyHistogram, LatencySnapshot};

/// The unit of alignment for every backend operation.
pub(crate) const BLOCK: u64 = 4096;

pub(crate) struct Backend {
    pub(crate) dev: Device,
    stats: DiskStats,
}

pub(crate) enum Device {
    Uring(uring::Uring),
    Sync(sync::SyncDev),
    #[cfg(test)]
    Mem(Arc<mem::MemDev>),
}

/// Counters of a pool's disk operations: metadata and data alike, as the disk sees them.
#[derive(Debug, Default)]
struct DiskStats {
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
    sync_ops: AtomicU64,
    errors: AtomicU64,
    read_latency: LatencyHistogram,
    write_latency: LatencyHistogram,
    sync_latency: LatencyHistogram,
}

/// A point-in-time copy of a pool's disk counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStatsSnapshot {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    /// Flushes of the disk's write cache (fdatasync).
    pub sync_ops: u64,
    /// Operations the disk failed.
    pub errors: u64,
    pub read_latency: LatencySnapshot,
    pub write_latency: LatencySnapshot,
    pub sync_latency: LatencySnapshot,
}

impl DiskStats {
    fn done<T>(
        &self,
        ops: &AtomicU64,
        bytes: Option<(&AtomicU64, usize)>,
        latency: &LatencyHistogram,
        started: Instant,
        r: &io::Result<T>,
    ) {
        latency.record(started.elapsed());
        if r.is_err() {
            self.errors.fetch_add(1, Relaxed);
            return;
        }
        ops.fetch_add(1, Relaxed);
        if let Some((counter, n)) = bytes {
            counter.fetch_add(n as u64, Relaxed);
        }
    }

    fn snapshot(&self) -> DiskStatsSnapshot {
        DiskStatsSnapshot {
            read_ops: self.read_ops.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            write_ops: self.write_ops.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            sync_ops: self.sync_ops.load(Relaxed),
            errors: self.errors.load(Relaxed),
            read_latency: self.read_latency.snapshot(),
            write_latency: self.write_latency.snapshot(),
            sync_latency: self.sync_latency.snapshot(),
        }
    }
}

impl Backend {
    fn new(dev: Device) -> Self {
        Self { dev, stats: DiskStats::default() }
    }

    /// An in-memory disk (tests).
    #[cfg(test)]
    pub(crate) fn mem(dev: Arc<mem::MemDev>) -> Self {
        Self::new(Device::Mem(dev))
    }

    pub(crate) fn stats(&self) -> DiskStatsSnapshot {
        self.stats.snapshot()
    }

    /// Opens `path` for direct I/O, preferring io_uring. Falls back to buffered I/O when the
    /// file system refuses `O_DIRECT`, and to pread/pwrite when io_uring is unavailable.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(disk = %path.display(), "O_DIRECT not supported here; using buffered I/O");
                OpenOptions::new().read(true).write(true).open(path)?
            }
            Err(e) => return Err(e),
        };
        lock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(e.kind(), "the disk is in use by another pool instance (locked)")
            } else {
                e
            }
        })?;
        let file = Arc::new(file);
        match uring::Uring::new(file.clone()) {
            Ok(u) => Ok(Self::new(Device::Uring(u))),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable; falling back to pread/pwrite");
                Ok(Self::new(Device::Sync(sync::SyncDev::new(file))))
            }
        }
    }

    /// Opens with the blocking pread/pwrite backend (tests compare both paths).
    #[cfg(test)]
    pub(crate) fn open_sync(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        lock(&file, libc::LOCK_EX | libc::LOCK_NB)?;
        Ok(Self::new(Device::Sync(sync::SyncDev::new(Arc::new(file)))))
    }

    pub(crate) fn kind(&self) -> &'static str {
        match &self.dev {
            Device::Uring(_) => "io_uring",
            Device::Sync(_) => "sync",
            #[cfg(test)]
            Device::Mem(_) => "mem",
        }
    }

    /// Drops the exclusive lock on the disk (after close: no more I/O will be issued).
    pub(crate) fn unlock(&self) {
        let file = match &self.dev {
            Device::Uring(u) => u.file(),
            Device::Sync(s) => s.file(),
            #[cfg(test)]
            Device::Mem(_) => return,
        };
        if let Err(e) = lock(file, libc::LOCK_UN) {
            tracing::warn!(error = %e, "unlocking the pool disk failed");
        }
    }

    /// Size of the backing store in bytes.
    pub(crate) fn size(&self) -> io::Result<u64> {
        match &self.dev {
            Device::Uring(u) => file_size(u.file()),
            Device::Sync(s) => file_size(s.file()),
            #[cfg(test)]
            Device::Mem(m) => Ok(m.size()),
        }
    }

    /// Reads `len` bytes at disk offset `off` into `buf[buf_off..]`.
    pub(crate) async fn read(
        &self,
        buf: IoBuf,
        buf_off: usize,
        len: usize,
        off: u64,
    ) -> (IoBuf, io::Result<()>) {
        debug_assert!(buf_off + len <= buf.capacity());
        let started = Instant::now();
        let (buf, r) = match &self.dev {
            Device::Uring(u) => u.rw(false, buf, buf_off, len, off).await,
            Device::Sync(s) => s.rw(false, buf, buf_off, len, off).await,
            #[cfg(test)]
            Device::Mem(m) => m.rw(false, buf, buf_off, len, off),
        };
        let st = &self.stats;
        st.done(&st.read_ops, Some((&st.read_bytes, len)), &st.read_latency, started, &r);
        (buf, r)
    }

    /// Writes `buf[buf_off..buf_off+len]` at disk offset `off`.
    pub(crate) async fn write(
        &self,
        buf: IoBuf,
        buf_off: usize,
        len: usize,
        off: u64,
    ) -> (IoBuf, io::Result<()>) {
        debug_assert!(buf_off + len <= buf.capacity());
        let started = Instant::now();
        let (buf, r) = match &self.dev {
            Device::Uring(u) => u.rw(true, buf, buf_off, len, off).await,
            Device::Sync(s) => s.rw(true, buf, buf_off, len, off).await,
            #[cfg(test)]
            Device::Mem(m) => m.rw(true, buf, buf_off, len, off),
        };
        let st = &self.stats;
        st.done(&st.write_ops, Some((&st.write_bytes, len)), &st.write_latency, started, &r);
        (buf, r)
    }

    /// Makes every completed write durable (fdatasync).
    pub(crate) async fn sync(&self) -> io::Result<()> {
        let started = Instant::now();
        let r = match &self.dev {
            Device::Uring(u) => u.sync().await,
            Device::Sync(s) => s.sync().await,
            #[cfg(test)]
            Device::Mem(m) => m.sync(),
        };
        let st = &self.stats;
        st.done(&st.sync_ops, None, &st.sync_latency, started, &r);
        r
    }

    /// Makes `[off, off+len)` read as zeroes, cheaply where the file system allows.
    pub(crate) async fn zero(&self, off: u64, len: u64) -> io::Result<()> {
        let file = match &self.dev {
            Device::Uring(u) => u.file().clone(),
            Device::Sync(s) => s.file().clone(),
            #[cfg(test)]
            Device::Mem(m) => return m.zero(off, len),
        };
        // fallocate can wait on the file system's journal: keep it off the async workers.
        let done = tokio::task::spawn_blocking(move || zero_by_fallocate(&file, off, len))
            .await
            .map_err(io::Error::other)??;
        if done {
            return Ok(());
        }
        // Neither fallocate mode works here (e.g. an old kernel on a block device): write zeroes.
        let chunk = (1u64 << 20).min(len) as usize;
        let mut buf = IoBuf::zeroed(chunk);
        let mut done = 0u64;
        while done < len {
            let n = chunk.min((len - done) as usize);
            let (b, r) = self.write(buf, 0, n, off + done).await;
            buf = b;
            r?;
            done += n as u64;
        }
        Ok(())
    }
}

/// An advisory lock on the whole disk, so that two pool instances (two engines, or a stale
/// one in the same process) never write the same disk. Released when the file is closed.
fn lock(file: &File, op: i32) -> io::Result<()> {
    // SAFETY: flock only takes a descriptor and flags; the fd is valid while `file` lives.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn file_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    // Block devices report a zero length in metadata; seeking to the end works for both.
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

/// Zeroes a range with `FALLOC_FL_ZERO_RANGE`, else `PUNCH_HOLE`; Ok(false) when neither is
/// supported by the file system or device.
fn zero_by_fallocate(file: &File, off: u64, len: u64) -> io::Result<bool> {
    let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "range too large"));
    };
    for mode in [libc::FALLOC_FL_ZERO_RANGE, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE]
    {
        // SAFETY: fallocate only reads its integer arguments; the fd is valid while `file` lives.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, o, l) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENODEV) => continue,
            _ => return Err(e),
        }
    }
    Ok(false)
}
