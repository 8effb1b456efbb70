//! An in-memory child with failure injection, for the nexus's unit tests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use parking_lot::Mutex;
use trireme_iobuf::IoBuf;
use trireme_types::ReplicaId;

use super::child::{Child, ChildError, ChildExtent, ChildUri};

pub(crate) struct MemChild {
    uri: ChildUri,
    id: ReplicaId,
    data: Mutex<Vec<u8>>,
    /// One flag per 4 KiB block: written since creation or last trim.
    allocated: Mutex<Vec<bool>>,
    pub fail: AtomicBool,
    pub writes: AtomicU64,
}

pub(crate) const BLOCK: u64 = 4096;

impl MemChild {
    pub fn new(size: u64) -> Self {
        let id = ReplicaId::new_random();
        Self {
            uri: ChildUri::Local(id),
            id,
            data: Mutex::new(vec![0; size as usize]),
            allocated: Mutex::new(vec![false; size.div_ceil(BLOCK) as usize]),
            fail: AtomicBool::new(false),
            writes: AtomicU64::new(0),
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

    fn check(&self) -> Result<(), ChildError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(ChildError::Io("injected failure".to_owned()));
        }
        Ok(())
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
        Ok(IoBuf::copy_from(&self.data.lock()[offset as usize..offset as usize + len as usize]))
    }
    async fn write(&self, offset: u64, data: IoBuf, _fua: bool) -> Result<(), ChildError> {
        self.check()?;
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
