//! The data path of one replica.
//!
//! ```text
//!  write(off, buf) ─ unaligned? ─ yes ─> lock the 4 KiB head/tail blocks, read them, merge
//!        │                                        (bounce buffer)            │
//!        └──────────────── aligned span <─────────────────────────────────────┘
//!                              │  split at cluster boundaries
//!          map[v] exclusive ───┼──> one O_DIRECT write in place (no metadata)   ← fast path
//!          hole / shared ──────┴──> reserve a cluster, mark v in flight, zero it or copy the
//!                                   shared one (COW), write, then journal Map{v → new}
//! ```
//!
//! Concurrency: the metadata mutex is held only to look up or change a map, never across I/O.
//! A virtual cluster being allocated or copied is *in flight*; other reads and writes of it
//! wait for that to finish and look again. Structural changes that could move clusters under
//! running I/O (snapshot, trim, write-zeroes, destroy) take the replica's gate exclusively,
//! which drains that replica's I/O; reads and writes hold it shared.
//!
//! Reads register with the pool's read fence (see [`crate::fence`]) so that a cluster they
//! looked up cannot be freed, reused and overwritten by another replica under them.
//!
//! Writes run in a spawned task that owns its buffers and gate guards, so a caller dropping
//! the future (an NBD client going away) cannot let a half-done write land in a cluster that
//! has meanwhile been freed and given to someone else.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use trireme_iobuf::IoBuf;
use trireme_types::{ByteSize, ReplicaId};

use crate::inner::Inner;
use crate::io::BLOCK;
use crate::meta::{HOLE, Record};
use crate::{Allocation, PoolError};

const RMW_SHARDS: usize = 8;

/// Per-replica runtime state shared by its handles.
pub(crate) struct ReplicaIo {
    gate: Arc<tokio::sync::RwLock<()>>,
    size: AtomicU64,
    destroyed: AtomicBool,
    /// Serialise read-modify-write of the same 4 KiB block (hashed).
    rmw: [tokio::sync::Mutex<()>; RMW_SHARDS],
}

impl ReplicaIo {
    pub(crate) fn new(size: u64) -> Self {
        Self {
            gate: Arc::new(tokio::sync::RwLock::new(())),
            size: AtomicU64::new(size),
            destroyed: AtomicBool::new(false),
            rmw: Default::default(),
        }
    }

    pub(crate) fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    pub(crate) fn mark_destroyed(&self) {
        self.destroyed.store(true, Ordering::Release);
    }

    pub(crate) fn gate(&self) -> &Arc<tokio::sync::RwLock<()>> {
        &self.gate
    }
}

/// An open replica: cheap to clone, usable from many tasks at once.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<Inner>,
    id: ReplicaId,
    io: Arc<ReplicaIo>,
}

fn join_err(e: tokio::task::JoinError) -> PoolError {
    PoolError::io("replica I/O task failed", std::io::Error::other(e))
}

fn dev_err(what: &'static str, off: u64, e: std::io::Error) -> PoolError {
    PoolError::io(format!("{what} at disk offset {off}"), e)
}

impl Replica {
    pub(crate) fn new(inner: Arc<Inner>, id: ReplicaId, io: Arc<ReplicaIo>) -> Self {
        Self { inner, id, io }
    }

    pub fn id(&self) -> ReplicaId {
        self.id
    }

    /// Current size in bytes (reflects resizes).
    pub fn size(&self) -> u64 {
        self.io.size.load(Ordering::Acquire)
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), PoolError> {
        self.inner.usable()?;
        if self.io.destroyed.load(Ordering::Acquire) {
            return Err(PoolError::Destroyed(self.id));
        }
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(PoolError::OutOfRange { offset, len, size }),
        }
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, PoolError> {
        self.check(offset, u64::from(len))?;
        if len == 0 {
            return Ok(IoBuf::zeroed(0));
        }
        let _pool = self.inner.gate.read().await;
        let _rep = self.io.gate.read().await;
        self.check(offset, u64::from(len))?;
        let ctx = Ctx { inner: &self.inner, id: self.id };
        let a = offset - offset % BLOCK;
        let b = (offset + u64::from(len)).div_ceil(BLOCK) * BLOCK;
        // SAFETY: read_span writes every byte of the span (disk data or zeroes for holes)
        // before returning Ok; on error the buffer is dropped unread.
        let buf = ctx.read_span(a, unsafe { IoBuf::uninit((b - a) as usize) }).await?;
        if a == offset && b - a == u64::from(len) {
            return Ok(buf);
        }
        let start = (offset - a) as usize;
        Ok(IoBuf::copy_from(&buf[start..start + len as usize]))
    }

    pub async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), PoolError> {
        self.check(offset, data.len() as u64)?;
        let (inner, io, id) = (self.inner.clone(), self.io.clone(), self.id);
        tokio::spawn(async move {
            let _pool = inner.gate.clone().read_owned().await;
            let _rep = io.gate.clone().read_owned().await;
            let r = Replica { inner: inner.clone(), id, io: io.clone() };
            r.check(offset, data.len() as u64)?;
            if !data.is_empty() {
                Ctx { inner: &inner, id }.write_bytes(offset, data, Some(&io)).await?;
            }
            if fua { inner.flush(false).await } else { Ok(()) }
        })
        .await
        .map_err(join_err)?
    }

    /// Makes every completed write of the pool durable, with its metadata.
    pub async fn flush(&self) -> Result<(), PoolError> {
        self.inner.usable()?;
        self.inner.flush(false).await
    }

    /// Releases whole clusters of a thin replica; partial clusters (and thick replicas) are
    /// zeroed instead. Reads of the range return zeroes afterwards.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), PoolError> {
        self.zero_range(offset, len, true).await
    }

    /// Zeroes a range; with `may_trim`, whole clusters of a thin replica are released.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> Result<(), PoolError> {
        self.zero_range(offset, len, may_trim).await
    }

    async fn zero_range(&self, offset: u64, len: u64, dealloc: bool) -> Result<(), PoolError> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (inner, io, id) = (self.inner.clone(), self.io.clone(), self.id);
        tokio::spawn(async move {
            let _pool = inner.gate.clone().read_owned().await;
            // Exclusive: no read or write of this replica runs while clusters are released.
            let _rep = io.gate.clone().write_owned().await;
            let r = Replica { inner: inner.clone(), id, io: io.clone() };
            r.check(offset, len)?;
            let size = r.size();
            Ctx { inner: &inner, id }.zero_range(offset, len, dealloc, size).await
        })
        .await
        .map_err(join_err)?
    }

    /// Allocated and unallocated runs covering `[offset, offset+len)`, in order.
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Allocation>, PoolError> {
        self.check(offset, len)?;
        let cs = self.inner.cluster_size();
        let m = self.inner.meta();
        let r = m.replicas.get(&self.id).ok_or(PoolError::Destroyed(self.id))?;
        let mut out: Vec<Allocation> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let v = pos / cs;
            let piece_end = ((v + 1) * cs).min(end);
            let allocated = r.map.get(v as u32) != HOLE;
            match out.last_mut() {
                Some(last) if last.allocated == allocated => last.length += piece_end - pos,
                _ => out.push(Allocation { offset: pos, length: piece_end - pos, allocated }),
            }
            pos = piece_end;
        }
        Ok(out)
    }

    /// Bytes allocated to this replica.
    pub fn allocated(&self) -> Result<ByteSize, PoolError> {
        let m = self.inner.meta();
        let r = m.replicas.get(&self.id).ok_or(PoolError::Destroyed(self.id))?;
        Ok(ByteSize::b(r.mapped * self.inner.cluster_size()))
    }
}

/// What `allocate` did with the caller's buffer.
enum Allocated {
    /// The data is in a fresh cluster now mapped at `v`.
    Done(IoBuf),
    /// Someone else allocated or is allocating `v`; nothing was written.
    Raced(IoBuf),
}

/// A virtual cluster being allocated by one request, and the physical cluster reserved for it.
///
/// Dropping it, however the request ends, lets the requests waiting on the cluster look again
/// and returns the reserved cluster to the free pool unless it was mapped. A write runs in a
/// task of its own, so its caller going away does not end it here; an error on any path or a
/// panic does, and must not leave every later read and write of the cluster waiting forever.
/// (Nothing aborts write tasks: a cluster returned while its write was still in the kernel
/// could be handed out and then overwritten by that write.)
struct Claim<'a> {
    inner: &'a Inner,
    key: (ReplicaId, u32),
    waiters: Arc<tokio::sync::Semaphore>,
    cluster: u32,
    mapped: bool,
}

impl<'a> Claim<'a> {
    fn new(
        inner: &'a Inner,
        m: &mut crate::meta::Meta,
        key: (ReplicaId, u32),
        cluster: u32,
    ) -> Self {
        let waiters = Arc::new(tokio::sync::Semaphore::new(0));
        m.inflight.insert(key, Arc::clone(&waiters));
        Claim { inner, key, waiters, cluster, mapped: false }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut m = self.inner.meta();
        m.inflight.remove(&self.key);
        if !self.mapped {
            m.unreserve(self.cluster);
        }
        drop(m);
        self.waiters.close();
    }
}

/// What a lookup of one virtual cluster found.
enum Lookup {
    Hole,
    /// Mapped, and only this replica references it: write in place.
    Exclusive(u32),
    /// Mapped and shared with a snapshot or clone: copy on write.
    Shared(u32),
    /// Being allocated or copied by another request: wait and look again.
    Busy(Arc<tokio::sync::Semaphore>),
}

/// The data-path operations, valid while the caller holds the gates.
struct Ctx<'a> {
    inner: &'a Inner,
    id: ReplicaId,
}

impl Ctx<'_> {
    fn lookup(&self, v: u32) -> Result<Lookup, PoolError> {
        let m = self.inner.meta();
        if let Some(sem) = m.inflight.get(&(self.id, v)) {
            return Ok(Lookup::Busy(sem.clone()));
        }
        let r = m.replicas.get(&self.id).ok_or(PoolError::Destroyed(self.id))?;
        Ok(match r.map.get(v) {
            HOLE => Lookup::Hole,
            e if m.refcount(e - 1) == 1 => Lookup::Exclusive(e - 1),
            e => Lookup::Shared(e - 1),
        })
    }

    fn phys(&self, p: u32, within: u64) -> u64 {
        self.inner.sb.layout.cluster_offset(p) + within
    }

    /// Reads the 4 KiB-aligned span starting at `a` into `buf` (whose length is the span),
    /// writing every byte of it: `buf` may come from [`IoBuf::uninit`].
    async fn read_span(&self, a: u64, mut buf: IoBuf) -> Result<IoBuf, PoolError> {
        // Clusters looked up below are not reused by anyone else until this read is done.
        let _fence = self.inner.reads.enter();
        let cs = self.inner.cluster_size();
        let end = a + buf.len() as u64;
        let mut pos = a;
        while pos < end {
            let v = (pos / cs) as u32;
            let piece_end = ((u64::from(v) + 1) * cs).min(end);
            let p = loop {
                match self.lookup(v)? {
                    Lookup::Busy(sem) => {
                        let _ = sem.acquire().await;
                    }
                    Lookup::Hole => break None,
                    Lookup::Exclusive(p) | Lookup::Shared(p) => break Some(p),
                }
            };
            if let Some(p) = p {
                let off = self.phys(p, pos - u64::from(v) * cs);
                let (b, r) = self
                    .inner
                    .dev
                    .read(buf, (pos - a) as usize, (piece_end - pos) as usize, off)
                    .await;
                buf = b;
                r.map_err(|e| dev_err("reading replica data", off, e))?;
            } else {
                buf.as_uninit_mut()[(pos - a) as usize..(piece_end - a) as usize]
                    .fill(std::mem::MaybeUninit::new(0));
            }
            pos = piece_end;
        }
        Ok(buf)
    }

    /// Writes arbitrary bytes: aligned requests go straight to [`Ctx::write_span`]; others are
    /// merged with the current contents of their head and tail blocks first.
    async fn write_bytes(
        &self,
        offset: u64,
        data: IoBuf,
        io: Option<&ReplicaIo>,
    ) -> Result<(), PoolError> {
        let len = data.len() as u64;
        let end = offset + len;
        if offset.is_multiple_of(BLOCK) && len.is_multiple_of(BLOCK) {
            return self.write_span(offset, data).await;
        }
        let a = offset - offset % BLOCK;
        let b = end.div_ceil(BLOCK) * BLOCK;
        // Two unaligned writes into the same block must not interleave their read-modify-write.
        let mut shards =
            vec![(a / BLOCK) as usize % RMW_SHARDS, ((b - BLOCK) / BLOCK) as usize % RMW_SHARDS];
        shards.sort_unstable();
        shards.dedup();
        let mut guards = Vec::new();
        if let Some(io) = io {
            for s in &shards {
                guards.push(io.rmw[*s].lock().await);
            }
        }
        let mut bounce = IoBuf::zeroed((b - a) as usize);
        if offset != a {
            let head = self.read_span(a, IoBuf::zeroed(BLOCK as usize)).await?;
            bounce[..BLOCK as usize].copy_from_slice(&head);
        }
        if end != b && (b - BLOCK != a || offset == a) {
            let tail = self.read_span(b - BLOCK, IoBuf::zeroed(BLOCK as usize)).await?;
            let at = (b - BLOCK - a) as usize;
            bounce[at..].copy_from_slice(&tail);
        }
        let at = (offset - a) as usize;
        bounce[at..at + len as usize].copy_from_slice(&data);
        drop(data);
        self.write_span(a, bounce).await
    }

    /// Writes a 4 KiB-aligned span, cluster by cluster.
    async fn write_span(&self, a: u64, mut buf: IoBuf) -> Result<(), PoolError> {
        let cs = self.inner.cluster_size();
        let end = a + buf.len() as u64;
        let mut pos = a;
        while pos < end {
            let v = (pos / cs) as u32;
            let base = u64::from(v) * cs;
            let piece_end = ((u64::from(v) + 1) * cs).min(end);
            let (boff, len) = ((pos - a) as usize, (piece_end - pos) as usize);
            loop {
                let found = self.lookup(v)?;
                match found {
                    Lookup::Busy(sem) => {
                        let _ = sem.acquire().await;
                    }
                    Lookup::Exclusive(p) => {
                        let off = self.phys(p, pos - base);
                        let (b, r) = self.inner.dev.write(buf, boff, len, off).await;
                        buf = b;
                        r.map_err(|e| dev_err("writing replica data", off, e))?;
                        break;
                    }
                    Lookup::Hole | Lookup::Shared(_) => {
                        let old = match found {
                            Lookup::Shared(p) => Some(p),
                            _ => None,
                        };
                        match self.allocate(v, old, buf, boff, len, pos - base).await? {
                            Allocated::Done(b) => {
                                buf = b;
                                break;
                            }
                            // Another request got to this cluster first: look again.
                            Allocated::Raced(b) => buf = b,
                        }
                    }
                }
            }
            pos = piece_end;
        }
        Ok(())
    }

    /// Gives virtual cluster `v` a fresh cluster holding `buf[boff..boff+len]` at `within`,
    /// zeroes elsewhere or (copy on write) the rest of the old cluster `old`.
    ///
    /// `old` is what the caller's lookup saw, but the meta lock was dropped since: if another
    /// request has started allocating `v`, or has mapped it, in between, this returns
    /// [`Allocated::Raced`] and the caller looks again. Allocating anyway would map `v` twice
    /// and the later mapping would silently drop the earlier request's acknowledged data.
    async fn allocate(
        &self,
        v: u32,
        old: Option<u32>,
        buf: IoBuf,
        boff: usize,
        len: usize,
        within: u64,
    ) -> Result<Allocated, PoolError> {
        let cs = self.inner.cluster_size();
        let mut committed = false;
        let expected = old.map_or(HOLE, |p| p + 1);
        let mut claim = loop {
            let quarantined = {
                let mut m = self.inner.meta();
                let current = m.replicas.get(&self.id).ok_or(PoolError::Destroyed(self.id))?;
                if m.inflight.contains_key(&(self.id, v)) || current.map.get(v) != expected {
                    return Ok(Allocated::Raced(buf));
                }
                if let Some(new) = m.reserve() {
                    break Claim::new(self.inner, &mut m, (self.id, v), new);
                }
                // An empty quarantine does not prove the pool full: a commit under way may be
                // about to free what it took from the quarantine. One commit of our own waits
                // for it; only after that is "no space" the truth.
                if committed {
                    return Err(PoolError::NoSpace {
                        needed: ByteSize::b(cs),
                        free: ByteSize::b(m.free_clusters() * cs),
                    });
                }
                m.quarantine.len()
            };
            // Released clusters wait for their release to be durable; make it so and retry.
            tracing::debug!(quarantined, "pool full; committing releases before allocating");
            self.inner.flush(false).await?;
            committed = true;
        };
        let res = self.fill(claim.cluster, old, buf, boff, len, within).await;
        let mut m = self.inner.meta();
        let ok = res.as_ref().is_ok_and(|_| m.replicas.contains_key(&self.id));
        if ok && m.log(Record::Map { id: self.id, v, p: claim.cluster }).is_ok() {
            claim.mapped = true;
            drop(m);
            return res.map(Allocated::Done);
        }
        drop(m);
        res.and(Err(PoolError::Destroyed(self.id)))
    }

    async fn fill(
        &self,
        new: u32,
        old: Option<u32>,
        buf: IoBuf,
        boff: usize,
        len: usize,
        within: u64,
    ) -> Result<IoBuf, PoolError> {
        let cs = self.inner.cluster_size();
        let dev = &self.inner.dev;
        let dst = self.phys(new, 0);
        if within == 0 && len as u64 == cs {
            let (b, r) = dev.write(buf, boff, len, dst).await;
            r.map_err(|e| dev_err("writing a new cluster", dst, e))?;
            return Ok(b);
        }
        match old {
            None => {
                dev.zero(dst, cs).await.map_err(|e| dev_err("zeroing a new cluster", dst, e))?;
                let (b, r) = dev.write(buf, boff, len, dst + within).await;
                r.map_err(|e| dev_err("writing a new cluster", dst + within, e))?;
                Ok(b)
            }
            Some(old) => {
                let src = self.phys(old, 0);
                let (mut copy, r) = dev.read(IoBuf::zeroed(cs as usize), 0, cs as usize, src).await;
                r.map_err(|e| dev_err("reading a shared cluster", src, e))?;
                copy[within as usize..within as usize + len]
                    .copy_from_slice(&buf[boff..boff + len]);
                let (_, r) = dev.write(copy, 0, cs as usize, dst).await;
                r.map_err(|e| dev_err("writing a copied cluster", dst, e))?;
                Ok(buf)
            }
        }
    }

    /// Zeroes `[offset, offset+len)`; whole clusters of thin replicas are released when
    /// `dealloc`. The caller holds the replica gate exclusively.
    async fn zero_range(
        &self,
        offset: u64,
        len: u64,
        dealloc: bool,
        size: u64,
    ) -> Result<(), PoolError> {
        let cs = self.inner.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let v = (pos / cs) as u32;
            let base = u64::from(v) * cs;
            let piece_end = (base + cs).min(end);
            // Bytes past the replica's end are never visible, so covering up to it is whole.
            let whole = pos == base && piece_end >= (base + cs).min(size);
            let (thin, found) = {
                let m = self.inner.meta();
                let r = m.replicas.get(&self.id).ok_or(PoolError::Destroyed(self.id))?;
                (r.thin, r.map.get(v))
            };
            if found != HOLE {
                if whole && dealloc && thin {
                    self.inner.meta().log(Record::Unmap { id: self.id, v })?;
                } else if let (Lookup::Exclusive(p), true) =
                    (self.lookup(v)?, pos.is_multiple_of(BLOCK) && piece_end.is_multiple_of(BLOCK))
                {
                    let off = self.phys(p, pos - base);
                    self.inner
                        .dev
                        .zero(off, piece_end - pos)
                        .await
                        .map_err(|e| dev_err("zeroing replica data", off, e))?;
                } else {
                    let zeros = IoBuf::zeroed((piece_end - pos) as usize);
                    self.write_bytes(pos, zeros, None).await?;
                }
            }
            pos = piece_end;
        }
        Ok(())
    }
}
