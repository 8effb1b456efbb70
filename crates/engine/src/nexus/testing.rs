//! In-memory children and a scriptable recorder, for the nexus's unit tests. Both can write
//! to a shared [`Journal`], so a test can assert the order in which the nexus recorded state
//! and issued I/O.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::Notify;
use trireme_iobuf::IoBuf;
use trireme_types::{ReplicaId, VolumeId};

use super::child::{Child, ChildError, ChildExtent, ChildUri};
use super::recorder::{MembershipRecord, RecordError, Recorder};

/// What happened, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// A write-like request reached a child.
    Io { replica: ReplicaId, offset: u64 },
    /// The recorder stored dirty regions.
    Marked(Vec<u64>),
    /// The recorder stored a membership.
    Recorded,
}

#[derive(Default)]
pub(crate) struct Journal(Mutex<Vec<Event>>);

impl Journal {
    pub fn push(&self, e: Event) {
        self.0.lock().push(e);
    }
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.0.lock())
    }
}

pub(crate) struct MemChild {
    uri: ChildUri,
    id: ReplicaId,
    data: Mutex<Vec<u8>>,
    /// One flag per 4 KiB block: written since creation or last trim.
    allocated: Mutex<Vec<bool>>,
    pub fail: AtomicBool,
    /// Answer every request with this error (e.g. `Fenced`) while set.
    pub fail_with: Mutex<Option<ChildError>>,
    pub writes: AtomicU64,
    pub reads: AtomicU64,
    /// Delays every read's answer by this many microseconds (to stretch a rebuild).
    pub read_delay_us: AtomicU64,
    /// Delays every write (before it checks for an injected failure).
    pub write_delay_us: AtomicU64,
    pub journal: Mutex<Option<Arc<Journal>>>,
}

pub(crate) const BLOCK: u64 = 4096;

impl MemChild {
    pub fn new(size: u64) -> Self {
        Self::with_id(size, ReplicaId::new_random())
    }

    /// Another instance of replica `id` (a child re-opened after a fault).
    pub fn with_id(size: u64, id: ReplicaId) -> Self {
        Self {
            uri: ChildUri::Local(id),
            id,
            data: Mutex::new(vec![0; size as usize]),
            allocated: Mutex::new(vec![false; size.div_ceil(BLOCK) as usize]),
            fail: AtomicBool::new(false),
            fail_with: Mutex::new(None),
            writes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            read_delay_us: AtomicU64::new(0),
            write_delay_us: AtomicU64::new(0),
            journal: Mutex::new(None),
        }
    }

    /// A child that looks remote (an `nbd://` URI): the nexus reads local children first.
    pub fn remote(size: u64) -> Self {
        let mut c = Self::new(size);
        c.uri = ChildUri::Nbd {
            authority: "10.0.0.2:10809".to_owned(),
            export: format!("replica-{}", c.id),
        };
        c
    }

    pub fn contents(&self, offset: u64, len: usize) -> Vec<u8> {
        self.data.lock()[offset as usize..offset as usize + len].to_vec()
    }

    pub fn all(&self) -> Vec<u8> {
        self.data.lock().clone()
    }

    /// Writes straight into the child, behind the nexus's back (stale or garbage data).
    pub fn poke(&self, offset: u64, bytes: &[u8]) {
        self.data.lock()[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
        self.mark(offset, bytes.len() as u64, true);
    }

    /// How many bytes are allocated.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.lock().iter().filter(|&&a| a).count() as u64 * BLOCK
    }

    fn check(&self) -> Result<(), ChildError> {
        if let Some(e) = self.fail_with.lock().clone() {
            return Err(e);
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(ChildError::Io("injected failure".to_owned()));
        }
        Ok(())
    }

    fn note(&self, offset: u64) {
        if let Some(j) = &*self.journal.lock() {
            j.push(Event::Io { replica: self.id, offset });
        }
    }

    fn mark(&self, offset: u64, len: u64, allocated: bool) {
        let mut map = self.allocated.lock();
        for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            map[b as usize] = allocated;
        }
    }
}

#[async_trait]
impl Child for MemChild {
    fn uri(&self) -> &ChildUri {
        &self.uri
    }
    fn replica_id(&self) -> ReplicaId {
        self.id
    }
    fn size(&self) -> u64 {
        self.data.lock().len() as u64
    }
    async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, ChildError> {
        self.check()?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        let data =
            IoBuf::copy_from(&self.data.lock()[offset as usize..offset as usize + len as usize]);
        // The delay comes after the data is taken, like a real read in flight: a write that
        // lands meanwhile is not in what this read returns.
        let delay = self.read_delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        Ok(data)
    }
    async fn write(&self, offset: u64, data: IoBuf, _fua: bool) -> Result<(), ChildError> {
        let delay = self.write_delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        self.check()?;
        self.note(offset);
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.data.lock()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        self.mark(offset, data.len() as u64, true);
        Ok(())
    }
    async fn flush(&self) -> Result<(), ChildError> {
        self.check()
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), ChildError> {
        self.write_zeroes(offset, len, true).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), ChildError> {
        self.check()?;
        self.note(offset);
        self.data.lock()[offset as usize..(offset + len) as usize].fill(0);
        self.mark(offset, len, !may_trim);
        Ok(())
    }
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<ChildExtent>, ChildError> {
        self.check()?;
        let map = self.allocated.lock();
        let mut out: Vec<ChildExtent> = Vec::new();
        let first = offset / BLOCK;
        for b in first..(offset + len).div_ceil(BLOCK) {
            let allocated = map[b as usize];
            match out.last_mut() {
                Some(last) if last.allocated == allocated => last.length += BLOCK,
                _ => out.push(ChildExtent { offset: b * BLOCK, length: BLOCK, allocated }),
            }
        }
        Ok(out)
    }
}

/// A recorder that keeps what it was told, and can be held, failed or fenced.
#[derive(Default)]
pub(crate) struct TestRecorder {
    pub records: Mutex<Vec<MembershipRecord>>,
    pub marks: Mutex<Vec<Vec<u64>>>,
    pub journal: Arc<Journal>,
    /// Every call fails with this while set.
    pub fail: Mutex<Option<RecordError>>,
    /// Calls wait while set.
    held: AtomicBool,
    released: Notify,
    /// Calls that reached the recorder (held or not).
    pub calls: AtomicU64,
    generation: AtomicU64,
}

impl TestRecorder {
    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
        self.released.notify_waiters();
    }

    pub fn last_record(&self) -> Option<MembershipRecord> {
        self.records.lock().last().cloned()
    }

    async fn gate(&self) -> Result<(), RecordError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if !self.held.load(Ordering::SeqCst) {
                break;
            }
            released.await;
        }
        match self.fail.lock().clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Recorder for TestRecorder {
    async fn record_children(&self, record: MembershipRecord) -> Result<u64, RecordError> {
        self.gate().await?;
        self.journal.push(Event::Recorded);
        self.records.lock().push(record);
        Ok(self.generation.fetch_add(1, Ordering::SeqCst) + 1)
    }
    async fn mark_dirty(
        &self,
        _: VolumeId,
        _: u64,
        _: u64,
        regions: Vec<u64>,
    ) -> Result<(), RecordError> {
        self.gate().await?;
        self.journal.push(Event::Marked(regions.clone()));
        self.marks.lock().push(regions);
        Ok(())
    }
}

/// A started nexus of `size` bytes over `children`, recorded by `recorder`.
pub(crate) async fn started(
    size: u64,
    children: &[(Arc<MemChild>, super::Join)],
    recorder: Arc<TestRecorder>,
    dirty: super::DirtyLog,
    limits: Arc<super::RebuildLimits>,
) -> Arc<super::Nexus> {
    let children = children
        .iter()
        .map(|(c, join)| super::NewChild::opened(Arc::clone(c) as Arc<dyn Child>, *join))
        .collect();
    let config = super::NexusConfig { epoch: 7, generation: 1, recorder, dirty, rebuild: limits };
    let n = super::Nexus::create(VolumeId::new_random(), size, children, config).unwrap();
    n.start().await.unwrap();
    n
}

/// Waits (generously: the machine may be loaded) until `cond` holds.
pub(crate) async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Deterministic test data.
pub(crate) fn pattern(len: usize, seed: u8) -> IoBuf {
    IoBuf::copy_from(
        &(0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<_>>(),
    )
}
