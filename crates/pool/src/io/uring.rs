//! The io_uring backend: one ring per pool, no polling threads.
//!
//! ```text
//!  task ──push SQE + submit──> ring ──kernel──> CQE ──eventfd──> reaper task (AsyncFd)
//!    ^                                                               │
//!    └────────────── oneshot(result, buffer) <───────────────────────┘
//! ```
//! Each operation's buffer lives in the ring's slot table from submission until its CQE is
//! reaped, so dropping the submitting future never frees memory the kernel still writes to.
//! The reaper sleeps on the eventfd registered with the ring, so an idle pool costs no CPU.
//! With other operations in flight, a submitter yields once before entering the kernel, so
//! entries queued by tasks running in the same scheduler pass share one io_uring_enter (and
//! one block-layer plug, hence one device notification).
//! In-flight operations are bounded by a semaphore sized to the submission queue, which keeps
//! the completion queue (twice as large) from overflowing. Entries the kernel refuses for now
//! (a failed io_uring_enter) stay queued and the reaper retries them, on a timer if need be.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use io_uring::{IoUring, opcode, types};
use tokio::io::unix::AsyncFd;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use trireme_iobuf::IoBuf;

const ENTRIES: u32 = 256;
/// Retry delays for entries the kernel refused to take (a failed io_uring_enter).
const RETRY_FIRST: Duration = Duration::from_millis(1);
const RETRY_MAX: Duration = Duration::from_millis(100);
/// Largest transfer that waits for company before entering the kernel.
const BATCH_MAX: usize = 64 << 10;

type Completion = (Option<IoBuf>, i32);

struct Slot {
    buf: Option<IoBuf>,
    tx: oneshot::Sender<Completion>,
    _permit: OwnedSemaphorePermit,
}

struct RingState {
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Tests: how many coming submits to fail as a busy kernel would.
    #[cfg(test)]
    refuse_submits: usize,
}

impl RingState {
    /// Hands every queued entry to the kernel; false if some stay queued (the kernel refused
    /// them for now: out of memory, or too many completions pending).
    fn submit_pending(&mut self) -> bool {
        if self.ring.submission().is_empty() {
            return true;
        }
        #[cfg(test)]
        if self.refuse_submits > 0 {
            self.refuse_submits -= 1;
            return false;
        }
        if let Err(e) = self.ring.submit() {
            tracing::warn!(error = %e, "io_uring submit failed; will retry");
        }
        self.ring.submission().is_empty()
    }

    /// Delivers every available completion to its waiter.
    fn reap(&mut self) {
        let done: Vec<(u64, i32)> =
            self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (ud, res) in done {
            let idx = ud as usize;
            if let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) {
                self.free.push(idx);
                self.in_flight -= 1;
                // The waiter may be gone (dropped future); the buffer is then freed here, after
                // the kernel finished with it.
                let _ = slot.tx.send((slot.buf, res));
            }
        }
    }
}

impl Drop for RingState {
    fn drop(&mut self) {
        // Never unmap buffers the kernel may still write into: wait for stragglers first.
        while self.in_flight > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.reap();
        }
    }
}

struct Shared {
    state: Mutex<RingState>,
    eventfd: OwnedFd,
    shutdown: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, RingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries stay queued after a failed submit: have the reaper retry them. Without this an
    /// otherwise idle ring would hold them, and their waiters, until unrelated I/O came along.
    fn retry_later(&self) {
        self.kick();
    }

    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        unsafe { libc::write(self.eventfd.as_raw_fd(), (&raw const one).cast(), 8) };
    }
}

pub(crate) struct Uring {
    file: Arc<File>,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
}

impl Uring {
    pub(crate) fn new(file: Arc<File>) -> io::Result<Self> {
        let ring = IoUring::new(ENTRIES)?;
        // SAFETY: eventfd returns a new descriptor or -1, which we check.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a freshly created descriptor owned by nobody else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let shared = Arc::new(Shared {
            state: Mutex::new(RingState {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
                in_flight: 0,
                #[cfg(test)]
                refuse_submits: 0,
            }),
            eventfd,
            shutdown: AtomicBool::new(false),
        });
        let dup = DupFd::new(&shared.eventfd)?;
        // SAFETY: `dup` owns its descriptor (an OwnedFd) and keeps it open, unchanged, for as
        // long as the AsyncFd lives.
        let afd = unsafe { AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE)? };
        tokio::spawn(reaper(shared.clone(), afd));
        Ok(Self { file, shared, permits: Arc::new(Semaphore::new(ENTRIES as usize)) })
    }

    pub(crate) fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Queues `entry` and waits for its completion. `batch`: the entry may wait one scheduler
    /// pass for others to share its io_uring_enter (worth it for small transfers only).
    async fn submit(
        &self,
        entry: io_uring::squeue::Entry,
        buf: Option<IoBuf>,
        batch: bool,
    ) -> Completion {
        let permit = match self.permits.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return (buf, -libc::ESHUTDOWN),
        };
        let (tx, rx) = oneshot::channel();
        let batch = {
            let mut st = self.shared.lock();
            let idx = match st.free.pop() {
                Some(i) => i,
                None => {
                    st.slots.push(None);
                    st.slots.len() - 1
                }
            };
            st.slots[idx] = Some(Slot { buf, tx, _permit: permit });
            st.in_flight += 1;
            let entry = entry.user_data(idx as u64);
            // SAFETY: the entry's buffer (if any) is owned by slot `idx` and stays alive and
            // unmoved (heap memory) until the CQE for `idx` is reaped.
            let pushed = unsafe { st.ring.submission().push(&entry) };
            if pushed.is_err() {
                // Cannot happen while permits <= ENTRIES, but fail cleanly rather than hang.
                let slot = st.slots[idx].take();
                st.free.push(idx);
                st.in_flight -= 1;
                return (slot.and_then(|s| s.buf), -libc::EAGAIN);
            }
            if st.in_flight == 1 || !batch {
                // Alone on the ring, or large: submit at once. Large transfers gain nothing
                // from sharing a syscall, and submitted together, adjacent ones are merged by
                // the block layer into fewer, larger requests, which leaves a parallel device
                // (a virtual disk, an SSD) with less to work on at once.
                if !st.submit_pending() {
                    self.shared.retry_later();
                }
                st.reap();
                None
            } else {
                Some(SubmitOnDrop(&self.shared))
            }
        };
        if let Some(guard) = batch {
            // Other operations are in flight, so other tasks are likely about to queue
            // theirs. Yielding lets them run first; whoever resumes first submits every queued
            // entry in one io_uring_enter, which the block layer then dispatches under one
            // plug: one device notification for the batch instead of one per request (each a
            // VM exit on a virtual disk).
            tokio::task::yield_now().await;
            drop(guard);
        }
        match rx.await {
            Ok(c) => c,
            Err(_) => (None, -libc::ECANCELED),
        }
    }

    pub(crate) async fn rw(
        &self,
        write: bool,
        mut buf: IoBuf,
        buf_off: usize,
        len: usize,
        off: u64,
    ) -> (IoBuf, io::Result<()>) {
        let mut done = 0usize;
        while done < len {
            let fd = types::Fd(self.file.as_raw_fd());
            let n = (len - done) as u32;
            let pos = off + done as u64;
            // SAFETY: buf_off + len <= capacity (checked by the caller); the pointer stays valid
            // because the buffer moves into the ring's slot table with the entry.
            let ptr = unsafe { buf.as_mut_ptr().add(buf_off + done) };
            let entry = if write {
                opcode::Write::new(fd, ptr, n).offset(pos).build()
            } else {
                opcode::Read::new(fd, ptr, n).offset(pos).build()
            };
            let (b, res) = self.submit(entry, Some(buf), n as usize <= BATCH_MAX).await;
            let Some(b) = b else {
                return (IoBuf::zeroed(0), Err(io::Error::from_raw_os_error(-res)));
            };
            buf = b;
            if res == -libc::EAGAIN || res == -libc::EINTR {
                continue;
            }
            if res < 0 {
                return (buf, Err(io::Error::from_raw_os_error(-res)));
            }
            if res == 0 {
                return (
                    buf,
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "short transfer at end of disk",
                    )),
                );
            }
            done += res as usize;
        }
        (buf, Ok(()))
    }

    pub(crate) async fn sync(&self) -> io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(self.file.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        let (_, res) = self.submit(entry, None, true).await;
        if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(()) }
    }
}

/// Submits queued entries when dropped, so an entry queued by a future that is dropped while
/// it yields still reaches the kernel (its buffer is owned by the slot table until the CQE).
struct SubmitOnDrop<'a>(&'a Shared);

impl Drop for SubmitOnDrop<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        if !st.submit_pending() {
            self.0.retry_later();
        }
        // Deliver completions that are already there: under load this saves the waiters a
        // trip through the eventfd and the reaper task.
        st.reap();
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.permits.close();
        self.shared.kick();
    }
}

/// A duplicate of the eventfd for AsyncFd registration (AsyncFd wants to own its descriptor).
struct DupFd(OwnedFd);

impl DupFd {
    fn new(fd: &OwnedFd) -> io::Result<Self> {
        Ok(Self(fd.try_clone()?))
    }
}

impl AsRawFd for DupFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

async fn reaper(shared: Arc<Shared>, afd: AsyncFd<DupFd>) {
    // Set while the kernel refuses entries (a failed io_uring_enter left them queued): the
    // reaper then also wakes on a timer, as no completion may be coming to wake it.
    let mut retry: Option<Duration> = None;
    loop {
        let woken = match retry {
            None => Some(afd.readable().await),
            Some(delay) => tokio::select! {
                g = afd.readable() => Some(g),
                () = tokio::time::sleep(delay) => None,
            },
        };
        if let Some(woken) = woken {
            let mut guard = match woken {
                Ok(g) => g,
                Err(e) => {
                    // Only a runtime shutting down gets here; nothing is left to wait for us.
                    tracing::error!(error = %e, "io_uring eventfd wait failed");
                    return;
                }
            };
            let mut counter = 0u64;
            // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd.
            unsafe { libc::read(afd.get_ref().as_raw_fd(), (&raw mut counter).cast(), 8) };
            // A successful read resets the counter to zero, so the descriptor is drained either
            // way: no second read to see EAGAIN. A completion posted from here on writes the
            // eventfd again, a fresh edge that makes it ready again.
            guard.clear_ready();
        }
        let (idle, submitted) = {
            let mut st = shared.lock();
            st.reap();
            // Entries a failed submit left queued go out now, with the completions that made
            // room for them.
            let submitted = st.submit_pending();
            (st.in_flight == 0, submitted)
        };
        if idle && shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        retry = if submitted {
            None
        } else {
            Some(retry.map_or(RETRY_FIRST, |d| (d * 2).min(RETRY_MAX)))
        };
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A lone read the kernel refuses at first still completes: the reaper retries it, though
    /// no other I/O (and so no completion) comes along to do it.
    #[tokio::test]
    async fn a_refused_submit_on_an_idle_ring_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let ring = Uring::new(Arc::new(File::open(&path).unwrap())).unwrap();
        ring.shared.lock().refuse_submits = 3;
        let read = ring.rw(false, IoBuf::zeroed(4096), 0, 4096, 4096);
        let (buf, res) = tokio::time::timeout(Duration::from_secs(5), read).await.unwrap();
        res.unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        assert_eq!(ring.shared.lock().refuse_submits, 0);
    }
}
