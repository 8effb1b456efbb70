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

use trireme_iobuf::IoBuf;

/// The unit of alignment for every backend operation.
pub(crate) const BLOCK: u64 = 4096;

pub(crate) enum Backend {
    Uring(uring::Uring),
    Sync(sync::SyncDev),
    #[cfg(test)]
    Mem(Arc<mem::MemDev>),
}

impl Backend {
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
            Ok(u) => Ok(Self::Uring(u)),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable; falling back to pread/pwrite");
                Ok(Self::Sync(sync::SyncDev::new(file)))
            }
        }
    }

    /// Opens with the blocking pread/pwrite backend (tests compare both paths).
    #[cfg(test)]
    pub(crate) fn open_sync(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        lock(&file, libc::LOCK_EX | libc::LOCK_NB)?;
        Ok(Self::Sync(sync::SyncDev::new(Arc::new(file))))
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Uring(_) => "io_uring",
            Self::Sync(_) => "sync",
            #[cfg(test)]
            Self::Mem(_) => "mem",
        }
    }

    /// Drops the exclusive lock on the disk (after close: no more I/O will be issued).
    pub(crate) fn unlock(&self) {
        let file = match self {
            Self::Uring(u) => u.file(),
            Self::Sync(s) => s.file(),
            #[cfg(test)]
            Self::Mem(_) => return,
        };
        if let Err(e) = lock(file, libc::LOCK_UN) {
            tracing::warn!(error = %e, "unlocking the pool disk failed");
        }
    }

    /// Size of the backing store in bytes.
    pub(crate) fn size(&self) -> io::Result<u64> {
        match self {
            Self::Uring(u) => file_size(u.file()),
            Self::Sync(s) => file_size(s.file()),
            #[cfg(test)]
            Self::Mem(m) => Ok(m.size()),
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
        match self {
            Self::Uring(u) => u.rw(false, buf, buf_off, len, off).await,
            Self::Sync(s) => s.rw(false, buf, buf_off, len, off).await,
            #[cfg(test)]
            Self::Mem(m) => m.rw(false, buf, buf_off, len, off),
        }
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
        match self {
            Self::Uring(u) => u.rw(true, buf, buf_off, len, off).await,
            Self::Sync(s) => s.rw(true, buf, buf_off, len, off).await,
            #[cfg(test)]
            Self::Mem(m) => m.rw(true, buf, buf_off, len, off),
        }
    }

    /// Makes every completed write durable (fdatasync).
    pub(crate) async fn sync(&self) -> io::Result<()> {
        match self {
            Self::Uring(u) => u.sync().await,
            Self::Sync(s) => s.sync().await,
            #[cfg(test)]
            Self::Mem(m) => m.sync(),
        }
    }

    /// Makes `[off, off+len)` read as zeroes, cheaply where the file system allows.
    pub(crate) async fn zero(&self, off: u64, len: u64) -> io::Result<()> {
        let file = match self {
            Self::Uring(u) => u.file().clone(),
            Self::Sync(s) => s.file().clone(),
            #[cfg(test)]
            Self::Mem(m) => return m.zero(off, len),
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
