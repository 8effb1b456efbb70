//! The pool: format, import, and the structural operations on replicas and snapshots.
//!
//! Every structural operation is serialised by the admin lock, applied to the in-memory
//! metadata as a journal record and committed before it returns, so it is durable when the
//! caller hears about it. Data-path records (cluster allocations, releases) are committed by
//! the next flush, FUA write or structural operation, whichever comes first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use trireme_iobuf::IoBuf;
use trireme_types::{ByteSize, ReplicaId, SnapshotId};
use uuid::Uuid;

use crate::inner::Inner;
use crate::io::{BLOCK, Backend, DiskStatsSnapshot};
use crate::journal;
use crate::layout::{Layout, MAX_NAME, SUPER_SIZE, Superblock};
use crate::meta::{Meta, Record, ReplicaState, clusters_for};
use crate::{CreateOptions, PoolError, PoolInfo, Replica, ReplicaInfo, ReplicaMeta, SnapshotInfo};

/// A formatted pool on a file or block device. Shared as `Arc<Pool>`.
pub struct Pool {
    inner: Arc<Inner>,
}

/// What a structural operation found: the object already exists (an idempotent retry), or
/// the work to do.
enum Plan<T> {
    Exists(ReplicaInfo),
    Go(T),
}

/// Clusters reserved for a structural operation and not yet journaled. Dropped before
/// [`Reserved::journaled`], whether the operation failed or its caller went away while the
/// clusters were being zeroed, it returns them to the free pool.
struct Reserved<'a> {
    inner: &'a Inner,
    extents: Vec<crate::record::Extent>,
    /// The replica being created, listed in [`Meta::creating`] until then.
    creating: Option<ReplicaId>,
}

impl Reserved<'_> {
    /// The journal now owns the clusters.
    fn journaled(mut self) {
        self.extents.clear();
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        let mut m = self.inner.meta();
        if !self.extents.is_empty() {
            m.unreserve_extents(&self.extents);
        }
        if let Some(id) = self.creating {
            m.creating.remove(&id);
        }
    }
}

/// The side of a detached operation that tells whether its caller still waits for it.
struct Caller(tokio::sync::oneshot::Receiver<()>);

impl Caller {
    /// Fails with [`PoolError::Abandoned`] if the caller went away (an RPC deadline passed
    /// while the operation queued behind another): the work it asked for is not started.
    fn still_waiting(&mut self) -> Result<(), PoolError> {
        match self.0.try_recv() {
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => Err(PoolError::Abandoned),
            _ => Ok(()),
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn replica_info(id: ReplicaId, r: &ReplicaState, cs: u64) -> ReplicaInfo {
    ReplicaInfo {
        id,
        size: ByteSize::b(r.size),
        thin: r.thin,
        allocated: ByteSize::b(r.mapped * cs),
        meta: r.meta,
        snapshot_of: r.parent,
    }
}

/// Reads both superblock copies: the newest valid one, and whether a copy needs repair.
/// How long opening a pool waits for the disk's lock. A previous owner that was killed still
/// holds it until the kernel has torn down its io_uring (in-flight O_DIRECT requests keep the file
/// open after the process is gone), which can take a moment; a live owner holds it for good.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Opens the disk, waiting (bounded) for a lock left behind by a process that just died.
async fn open_backend(disk: &Path) -> Result<Backend, PoolError> {
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    let mut logged = false;
    loop {
        match Backend::open(disk) {
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && tokio::time::Instant::now() < deadline =>
            {
                if !logged {
                    tracing::warn!(disk = %disk.display(), "pool disk is locked; waiting for its previous owner to let go");
                    logged = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            r => return r.map_err(|e| PoolError::io(format!("opening {}", disk.display()), e)),
        }
    }
}

/// Refuses to format a disk whose head holds anything: a pool with both superblocks damaged must
/// be repaired or wiped on purpose, never silently replaced by an empty one (and a disk holding
/// another file system must not be eaten either).
async fn ensure_blank(dev: &Backend, disk: &Path) -> Result<(), PoolError> {
    let size = dev.size().map_err(|e| PoolError::io(format!("sizing {}", disk.display()), e))?;
    let len = BLANK_CHECK.min(size) as usize;
    if len == 0 {
        return Ok(());
    }
    let (buf, r) = dev.read(IoBuf::zeroed(len), 0, len, 0).await;
    r.map_err(|e| PoolError::io(format!("reading the head of {}", disk.display()), e))?;
    if buf.iter().any(|&b| b != 0) {
        return Err(PoolError::NotBlank { disk: disk.display().to_string() });
    }
    Ok(())
}

/// How much of a disk's head must be zeroes before it is formatted: both superblock copies and
/// the places where common file systems and partition tables keep their signatures.
const BLANK_CHECK: u64 = 64 * 1024;

async fn read_superblocks(dev: &Backend, disk: &Path) -> Result<(Superblock, bool), PoolError> {
    let bad =
        |reason: String| PoolError::BadSuperblock { disk: disk.display().to_string(), reason };
    let size = dev.size().map_err(|e| PoolError::io(format!("sizing {}", disk.display()), e))?;
    if size < 2 * SUPER_SIZE {
        return Err(bad(format!("the disk is only {size} bytes")));
    }
    let (buf, r) =
        dev.read(IoBuf::zeroed(2 * SUPER_SIZE as usize), 0, 2 * SUPER_SIZE as usize, 0).await;
    r.map_err(|e| PoolError::io(format!("reading superblocks of {}", disk.display()), e))?;
    let a = Superblock::decode(&buf[..SUPER_SIZE as usize]);
    let b = Superblock::decode(&buf[SUPER_SIZE as usize..]);
    match (a, b) {
        (Ok(a), Ok(b)) => {
            let repair = a != b;
            Ok((if a.seq >= b.seq { a } else { b }, repair))
        }
        (Ok(s), Err(e)) | (Err(e), Ok(s)) => {
            tracing::warn!(disk = %disk.display(), error = %e, "one superblock copy is invalid; using the other");
            Ok((s, true))
        }
        (Err(PoolError::UnsupportedVersion { found, supported }), _)
        | (_, Err(PoolError::UnsupportedVersion { found, supported })) => {
            Err(PoolError::UnsupportedVersion { found, supported })
        }
        (Err(ea), Err(eb)) => Err(bad(format!("copy A: {ea}; copy B: {eb}"))),
    }
}

async fn write_superblocks(dev: &Backend, sb: &Superblock) -> Result<(), PoolError> {
    let enc = sb.encode();
    for off in [0, SUPER_SIZE] {
        let (_, r) = dev.write(IoBuf::copy_from(&enc), 0, enc.len(), off).await;
        r.map_err(|e| PoolError::io("writing a superblock", e))?;
        // One copy at a time, so a crash tears at most one of them.
        dev.sync().await.map_err(|e| PoolError::io("syncing a superblock", e))?;
    }
    Ok(())
}

impl Pool {
    /// Formats `disk` as a new pool. Refuses a disk that already holds a valid pool.
    pub async fn create(disk: &Path, opts: CreateOptions) -> Result<Arc<Pool>, PoolError> {
        if let Some(size) = opts.size {
            prepare_file(disk, size.bytes())?;
        }
        let dev = open_backend(disk).await?;
        Self::create_on(disk.to_path_buf(), dev, opts, None).await
    }

    pub(crate) async fn create_on(
        disk: PathBuf,
        dev: Backend,
        opts: CreateOptions,
        sizes: Option<(u64, u64)>,
    ) -> Result<Arc<Pool>, PoolError> {
        if opts.name.is_empty() || opts.name.len() > MAX_NAME {
            return Err(PoolError::InvalidArgument(format!(
                "pool name must be 1 to {MAX_NAME} bytes, got {}",
                opts.name.len()
            )));
        }
        match read_superblocks(&dev, &disk).await {
            Ok((sb, _)) => {
                return Err(PoolError::AlreadyFormatted { name: sb.name, uuid: sb.uuid });
            }
            // A pool of a newer format is still a pool: never format over it.
            Err(e @ PoolError::UnsupportedVersion { .. }) => return Err(e),
            Err(_) => ensure_blank(&dev, &disk).await?,
        }
        let size =
            dev.size().map_err(|e| PoolError::io(format!("sizing {}", disk.display()), e))?;
        let cs = opts.cluster_size.bytes();
        let layout = match sizes {
            Some((ckpt, journal)) => Layout::with_sizes(size, cs, ckpt, journal)?,
            None => Layout::compute(size, cs)?,
        };
        let sb = Superblock { seq: 1, uuid: Uuid::new_v4(), name: opts.name, layout };
        let meta = Meta::new(cs, layout.cluster_count as u32);
        let journal = journal::format(&dev, &layout, &meta).await?;
        // Superblocks last: a crash during format leaves no pool rather than half of one.
        write_superblocks(&dev, &sb).await?;
        tracing::info!(disk = %disk.display(), name = %sb.name, uuid = %sb.uuid, backend = dev.kind(),
            clusters = layout.cluster_count, "pool created");
        Ok(Arc::new(Pool { inner: Arc::new(Inner::new(disk, dev, sb, meta, journal)) }))
    }

    /// Opens an existing pool: picks the newest valid superblock, loads the newest valid
    /// checkpoint and replays the journal's valid prefix.
    pub async fn import(disk: &Path) -> Result<Arc<Pool>, PoolError> {
        let dev = open_backend(disk).await?;
        Self::import_on(disk.to_path_buf(), dev).await
    }

    pub(crate) async fn import_on(disk: PathBuf, dev: Backend) -> Result<Arc<Pool>, PoolError> {
        let started = std::time::Instant::now();
        let (sb, repair) = read_superblocks(&dev, &disk).await?;
        let actual =
            dev.size().map_err(|e| PoolError::io(format!("sizing {}", disk.display()), e))?;
        if actual < sb.layout.end() {
            return Err(PoolError::Truncated {
                disk: disk.display().to_string(),
                expected: sb.layout.end(),
                actual,
            });
        }
        let (meta, journal) = journal::load(&dev, &sb.layout).await?;
        if repair {
            write_superblocks(&dev, &sb).await?;
        }
        tracing::info!(disk = %disk.display(), name = %sb.name, replicas = meta.replicas.len(),
            backend = dev.kind(), elapsed_ms = started.elapsed().as_millis() as u64, "pool imported");
        Ok(Arc::new(Pool { inner: Arc::new(Inner::new(disk, dev, sb, meta, journal)) }))
    }

    /// Takes the admin lock of a usable pool (checked again once held: `close` holds it too).
    async fn admin(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, PoolError> {
        self.inner.usable()?;
        let guard = self.inner.admin.lock().await;
        self.inner.usable()?;
        Ok(guard)
    }

    /// Whether a creation of replica `id` is under way (zeroing its space): it is not listed
    /// yet, but a destroy must not be told it is already gone.
    pub fn is_creating(&self, id: ReplicaId) -> bool {
        self.inner.meta().creating.contains(&id)
    }

    pub fn info(&self) -> PoolInfo {
        let cs = self.inner.cluster_size();
        let m = self.inner.meta();
        PoolInfo {
            uuid: self.inner.sb.uuid,
            name: self.inner.sb.name.clone(),
            capacity: ByteSize::b(u64::from(m.cluster_count) * cs),
            used: ByteSize::b(m.used_clusters() * cs),
            free: ByteSize::b(m.free_clusters() * cs),
            cluster_size: ByteSize::b(cs),
            replica_count: m.replicas.len(),
        }
    }

    pub fn disk(&self) -> &Path {
        &self.inner.disk
    }

    /// What the pool has asked of its disk since it was opened: operations, bytes, latency.
    pub fn disk_stats(&self) -> DiskStatsSnapshot {
        self.inner.dev.stats()
    }

    /// Zeroes freshly reserved clusters so that no replica sees another's old data.
    async fn zero_extents(&self, extents: &[crate::meta::Extent]) -> Result<(), PoolError> {
        #[cfg(test)]
        let _held = self.inner.zeroing.read().await;
        let cs = self.inner.cluster_size();
        for e in extents {
            let off = self.inner.sb.layout.cluster_offset(e.p);
            self.inner
                .dev
                .zero(off, u64::from(e.n) * cs)
                .await
                .map_err(|err| PoolError::io(format!("zeroing clusters at offset {off}"), err))?;
        }
        Ok(())
    }

    /// Creates a replica (idempotent: the same id, size and kind returns the existing one).
    ///
    /// Runs to the end even if the caller goes away (see [`Pool::detached`]): a retry waits
    /// for it and finds the replica.
    pub async fn create_replica(
        &self,
        id: ReplicaId,
        size: ByteSize,
        thin: bool,
        meta: ReplicaMeta,
    ) -> Result<ReplicaInfo, PoolError> {
        self.detached(move |pool, caller| async move {
            pool.create_replica_here(id, size, thin, meta, caller).await
        })
        .await
    }

    /// Runs a structural operation that zeroes clusters in a task of its own.
    ///
    /// A thick create or grow zeroes its clusters before it journals them, which takes long on
    /// a disk without a zeroing offload, longer than an RPC deadline. Were the operation
    /// dropped there, its clusters would go back to the free pool while the zeroing already
    /// handed to the kernel still ran, and could zero another replica's new data. One whose
    /// caller left while it still waited for the admin lock does not start at all.
    async fn detached<F, Fut, T>(&self, op: F) -> Result<T, PoolError>
    where
        F: FnOnce(Pool, Caller) -> Fut,
        Fut: std::future::Future<Output = Result<T, PoolError>> + Send + 'static,
        T: Send + 'static,
    {
        let (_waiting, caller) = tokio::sync::oneshot::channel::<()>();
        let pool = Pool { inner: Arc::clone(&self.inner) };
        tokio::spawn(op(pool, Caller(caller))).await.map_err(|e| {
            PoolError::io("structural operation task failed", std::io::Error::other(e))
        })?
    }

    async fn create_replica_here(
        &self,
        id: ReplicaId,
        size: ByteSize,
        thin: bool,
        meta: ReplicaMeta,
        mut caller: Caller,
    ) -> Result<ReplicaInfo, PoolError> {
        let admin = self.admin().await?;
        caller.still_waiting()?;
        let cs = self.inner.cluster_size();
        let size = size.bytes();
        let clusters = clusters_for(size, cs);
        if size == 0 || clusters >= u64::from(u32::MAX) {
            return Err(PoolError::InvalidArgument(format!("replica size {size} is out of range")));
        }
        let plan = {
            let mut m = self.inner.meta();
            match m.replicas.get(&id) {
                Some(r) if r.size != size || r.thin != thin => {
                    return Err(PoolError::AlreadyExists { what: format!("replica {id}") });
                }
                Some(r) => Plan::Exists(replica_info(id, r, cs)),
                None if thin => {
                    self.check_room(&m, 0)?;
                    Plan::Go(Vec::new())
                }
                None => {
                    self.check_room(&m, 0)?;
                    let free = ByteSize::b(m.free_clusters() * cs);
                    let needed = ByteSize::b(clusters * cs);
                    let extents =
                        m.reserve_many(clusters).ok_or(PoolError::NoSpace { needed, free })?;
                    m.creating.insert(id);
                    Plan::Go(extents)
                }
            }
        };
        let reserved = match plan {
            Plan::Go(x) => Reserved { inner: &self.inner, extents: x, creating: Some(id) },
            Plan::Exists(info) => {
                drop(admin);
                // The creation may not be durable yet if its own commit is still running.
                self.inner.flush(false).await?;
                return Ok(info);
            }
        };
        self.zero_extents(&reserved.extents).await?;
        let extents = reserved.extents.clone();
        self.inner.meta().log(Record::CreateReplica { id, size, thin, meta, extents })?;
        reserved.journaled();
        // The commit runs outside the admin lock so that concurrent creations share it.
        drop(admin);
        self.inner.flush(false).await?;
        self.replica_info(id)
    }

    pub async fn destroy_replica(&self, id: ReplicaId) -> Result<(), PoolError> {
        let admin = self.admin().await?;
        let io = self
            .inner
            .meta()
            .replicas
            .get(&id)
            .map(|r| r.io.clone())
            .ok_or(PoolError::NotFound(id))?;
        // Drain this replica's I/O: nothing may still be writing into clusters being released.
        let _gate = io.gate().write().await;
        io.mark_destroyed();
        self.inner.meta().log(Record::DestroyReplica { id })?;
        drop(_gate);
        drop(admin);
        self.inner.flush(false).await
    }

    /// Grows a replica; shrinking is refused. Like a create, runs to the end even if the
    /// caller goes away.
    pub async fn resize_replica(
        &self,
        id: ReplicaId,
        size: ByteSize,
    ) -> Result<ReplicaInfo, PoolError> {
        self.detached(move |pool, caller| async move {
            pool.resize_replica_here(id, size, caller).await
        })
        .await
    }

    async fn resize_replica_here(
        &self,
        id: ReplicaId,
        size: ByteSize,
        mut caller: Caller,
    ) -> Result<ReplicaInfo, PoolError> {
        let admin = self.admin().await?;
        caller.still_waiting()?;
        let cs = self.inner.cluster_size();
        let new = size.bytes();
        let plan = {
            let mut m = self.inner.meta();
            let r = m.replicas.get(&id).ok_or(PoolError::NotFound(id))?;
            if new < r.size {
                return Err(PoolError::ShrinkRefused { id, from: ByteSize::b(r.size), to: size });
            }
            let (old_n, new_n) = (r.map.len(), clusters_for(new, cs));
            if new_n >= u64::from(u32::MAX) {
                return Err(PoolError::InvalidArgument(format!(
                    "replica size {new} is out of range"
                )));
            }
            if new == r.size {
                Plan::Exists(replica_info(id, r, cs))
            } else if r.thin {
                Plan::Go(Vec::new())
            } else {
                let add = new_n - old_n;
                let mut xs = m.reserve_many(add).ok_or_else(|| PoolError::NoSpace {
                    needed: ByteSize::b(add * cs),
                    free: ByteSize::b(m.free_clusters() * cs),
                })?;
                xs.iter_mut().for_each(|x| x.v += old_n as u32);
                Plan::Go(xs)
            }
        };
        let reserved = match plan {
            Plan::Go(x) => Reserved { inner: &self.inner, extents: x, creating: None },
            Plan::Exists(info) => {
                drop(admin);
                self.inner.flush(false).await?;
                return Ok(info);
            }
        };
        self.zero_extents(&reserved.extents).await?;
        let extents = reserved.extents.clone();
        self.inner.meta().log(Record::Resize { id, size: new, extents })?;
        reserved.journaled();
        drop(admin);
        self.inner.flush(false).await?;
        self.replica_info(id)
    }

    /// Stores the engine's small metadata for a replica; durable on return.
    pub async fn set_replica_meta(
        &self,
        id: ReplicaId,
        meta: ReplicaMeta,
    ) -> Result<(), PoolError> {
        let admin = self.admin().await?;
        {
            let mut m = self.inner.meta();
            if !m.replicas.contains_key(&id) {
                return Err(PoolError::NotFound(id));
            }
            m.log(Record::SetMeta { id, meta })?;
        }
        drop(admin);
        self.inner.flush(false).await
    }

    pub fn replicas(&self) -> Vec<ReplicaInfo> {
        let cs = self.inner.cluster_size();
        let m = self.inner.meta();
        let mut v: Vec<ReplicaInfo> =
            m.replicas.iter().map(|(id, r)| replica_info(*id, r, cs)).collect();
        v.sort_by_key(|r| r.id);
        v
    }

    pub fn replica_info(&self, id: ReplicaId) -> Result<ReplicaInfo, PoolError> {
        let cs = self.inner.cluster_size();
        let m = self.inner.meta();
        m.replicas.get(&id).map(|r| replica_info(id, r, cs)).ok_or(PoolError::NotFound(id))
    }

    pub fn open_replica(&self, id: ReplicaId) -> Result<Replica, PoolError> {
        self.inner.usable()?;
        let m = self.inner.meta();
        let r = m.replicas.get(&id).ok_or(PoolError::NotFound(id))?;
        Ok(Replica::new(self.inner.clone(), id, r.io.clone()))
    }

    /// Refuses a new map whose checkpoint could no longer fit its slot (leaving room for the
    /// data path to map every cluster of the pool once more).
    fn check_room(&self, m: &Meta, added: u64) -> Result<(), PoolError> {
        let layout = &self.inner.sb.layout;
        let needed = m.encoded_len_estimate() as u64 + 12 * (added + layout.cluster_count) + 4096;
        if needed > layout.ckpt_slot_size {
            return Err(PoolError::MetadataFull { needed });
        }
        Ok(())
    }

    /// Takes a read-only, copy-on-write snapshot of a replica (idempotent by id).
    pub async fn create_snapshot(
        &self,
        source: ReplicaId,
        id: SnapshotId,
    ) -> Result<SnapshotInfo, PoolError> {
        let admin = self.admin().await?;
        if let Some(s) = self.snapshot_info(id) {
            if s.source != source {
                return Err(PoolError::AlreadyExists { what: format!("snapshot {id}") });
            }
            drop(admin);
            self.inner.flush(false).await?;
            return Ok(s);
        }
        let io = self
            .inner
            .meta()
            .replicas
            .get(&source)
            .map(|r| r.io.clone())
            .ok_or(PoolError::NotFound(source))?;
        // Drain writes so the snapshot holds exactly the writes completed before it.
        let gate = io.gate().write().await;
        {
            let mut m = self.inner.meta();
            let mapped =
                m.replicas.get(&source).map(|r| r.mapped).ok_or(PoolError::NotFound(source))?;
            self.check_room(&m, mapped)?;
            m.log(Record::Snapshot { id, source, created: now_unix() })?;
        }
        drop(gate);
        drop(admin);
        self.inner.flush(false).await?;
        self.snapshot_info(id).ok_or(PoolError::SnapshotNotFound(id))
    }

    fn snapshot_info(&self, id: SnapshotId) -> Option<SnapshotInfo> {
        let m = self.inner.meta();
        m.snapshots.get(&id).map(|s| SnapshotInfo {
            id,
            source: s.source,
            size: ByteSize::b(s.size),
            created_at_unix: s.created,
        })
    }

    /// Destroys a snapshot; clusters still used by its source or clones stay.
    pub async fn destroy_snapshot(&self, id: SnapshotId) -> Result<(), PoolError> {
        let admin = self.admin().await?;
        {
            let mut m = self.inner.meta();
            if !m.snapshots.contains_key(&id) {
                return Err(PoolError::SnapshotNotFound(id));
            }
            m.log(Record::DestroySnapshot { id })?;
        }
        drop(admin);
        self.inner.flush(false).await
    }

    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let m = self.inner.meta();
        let mut v: Vec<SnapshotInfo> = m
            .snapshots
            .iter()
            .map(|(id, s)| SnapshotInfo {
                id: *id,
                source: s.source,
                size: ByteSize::b(s.size),
                created_at_unix: s.created,
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Creates a writable replica sharing the snapshot's clusters (idempotent by id).
    pub async fn create_clone(
        &self,
        snapshot: SnapshotId,
        id: ReplicaId,
        meta: ReplicaMeta,
    ) -> Result<ReplicaInfo, PoolError> {
        let admin = self.admin().await?;
        let cs = self.inner.cluster_size();
        let existing = {
            let mut m = self.inner.meta();
            match m.replicas.get(&id) {
                Some(r) if r.parent != Some(snapshot) => {
                    return Err(PoolError::AlreadyExists { what: format!("replica {id}") });
                }
                Some(r) => Some(replica_info(id, r, cs)),
                None => {
                    let s =
                        m.snapshots.get(&snapshot).ok_or(PoolError::SnapshotNotFound(snapshot))?;
                    let added = s.map.mapped().count() as u64;
                    self.check_room(&m, added)?;
                    m.log(Record::Clone { id, snapshot, meta })?;
                    None
                }
            }
        };
        if let Some(info) = existing {
            drop(admin);
            self.inner.flush(false).await?;
            return Ok(info);
        }
        drop(admin);
        self.inner.flush(false).await?;
        self.replica_info(id)
    }

    /// Flushes, writes a final checkpoint and refuses further I/O.
    pub async fn close(&self) -> Result<(), PoolError> {
        let _admin = self.inner.admin.lock().await;
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let _drain = self.inner.gate.write().await;
        let res = self.inner.flush(true).await;
        // Nothing touches the disk after this; let a new instance import it right away.
        self.inner.dev.unlock();
        res
    }

    #[cfg(test)]
    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    #[cfg(test)]
    pub(crate) async fn flush_for_test_result(&self) -> Result<(), PoolError> {
        self.inner.flush(false).await
    }

    #[cfg(test)]
    pub(crate) async fn flush_for_test(&self) {
        self.inner.flush(false).await.unwrap_or_else(|e| panic!("flush: {e}"));
    }
}

/// Creates the backing file with `size` bytes if it is missing, or grows a smaller one.
fn prepare_file(disk: &Path, size: u64) -> Result<(), PoolError> {
    let ctx = |e| PoolError::io(format!("preparing {}", disk.display()), e);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(disk)
        .map_err(ctx)?;
    let meta = f.metadata().map_err(ctx)?;
    if meta.is_file() && meta.len() < size {
        f.set_len(size.div_ceil(BLOCK) * BLOCK).map_err(ctx)?;
    }
    Ok(())
}
