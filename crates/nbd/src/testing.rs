//! An in-memory, sparse [`Export`] and a simple [`ExportRegistry`], for tests of this crate and
//! of the crates above it (enabled by the `testing` feature).
//!
//! Data lives in a map of 4 KiB blocks; a block that was never written (or was trimmed) is a
//! hole and reads as zeroes, so `block_status` reports real allocation.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use trireme_iobuf::IoBuf;

use crate::export::{BlockSizes, Capabilities, Export, ExportError, ExportRegistry, Extent};

const BLOCK: u64 = 4096;

/// A sparse in-memory block device.
pub struct MemExport {
    size: u64,
    caps: Capabilities,
    sizes: BlockSizes,
    blocks: Mutex<BTreeMap<u64, Box<[u8]>>>,
    flushes: AtomicU64,
}

impl MemExport {
    pub fn new(size: u64) -> Self {
        Self::with_capabilities(size, Capabilities::ALL)
    }

    pub fn with_capabilities(size: u64, caps: Capabilities) -> Self {
        Self {
            size,
            caps,
            sizes: BlockSizes::default(),
            blocks: Mutex::new(BTreeMap::new()),
            flushes: AtomicU64::new(0),
        }
    }

    /// Advertises other block-size constraints (the server enforces them).
    pub fn with_block_sizes(mut self, sizes: BlockSizes) -> Self {
        self.sizes = sizes;
        self
    }

    /// Number of allocated 4 KiB blocks.
    pub fn allocated_blocks(&self) -> usize {
        self.lock().len()
    }

    /// Number of FLUSH calls seen.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        self.blocks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ExportError::Invalid(format!("range {offset}+{len} out of bounds"))),
        }
    }

    /// Applies `f(block_index, offset_in_block, range_in_caller)` to each block piece of a range.
    fn for_each_piece(
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, usize, std::ops::Range<usize>),
    ) {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let idx = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            let n = ((BLOCK - within as u64).min(end - pos)) as usize;
            let start = (pos - offset) as usize;
            f(idx, within, start..start + n);
            pos += n as u64;
        }
    }

    /// Zeroes a range; whole blocks are deallocated when `dealloc`, partial ones zeroed.
    fn zero_range(&self, offset: u64, len: u64, dealloc: bool) {
        let mut blocks = self.lock();
        Self::for_each_piece(offset, len, |idx, within, range| {
            let whole = within == 0 && range.len() == BLOCK as usize;
            if whole && dealloc {
                blocks.remove(&idx);
            } else if let Some(b) = blocks.get_mut(&idx) {
                b[within..within + range.len()].fill(0);
            } else if !dealloc {
                blocks.insert(idx, vec![0u8; BLOCK as usize].into_boxed_slice());
            }
        });
    }
}

#[async_trait]
impl Export for MemExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn block_sizes(&self) -> BlockSizes {
        self.sizes
    }

    async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, ExportError> {
        self.check(offset, u64::from(len))?;
        let mut out = IoBuf::zeroed(len as usize);
        let blocks = self.lock();
        Self::for_each_piece(offset, u64::from(len), |idx, within, range| {
            if let Some(b) = blocks.get(&idx) {
                out[range.clone()].copy_from_slice(&b[within..within + range.len()]);
            }
        });
        Ok(out)
    }

    async fn write(&self, offset: u64, data: IoBuf, _fua: bool) -> Result<(), ExportError> {
        if self.caps.read_only {
            return Err(ExportError::ReadOnly);
        }
        self.check(offset, data.len() as u64)?;
        let mut blocks = self.lock();
        Self::for_each_piece(offset, data.len() as u64, |idx, within, range| {
            let b =
                blocks.entry(idx).or_insert_with(|| vec![0u8; BLOCK as usize].into_boxed_slice());
            b[within..within + range.len()].copy_from_slice(&data[range]);
        });
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), ExportError> {
        self.check(offset, len)?;
        self.zero_range(offset, len, true);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        _fua: bool,
    ) -> Result<(), ExportError> {
        self.check(offset, len)?;
        self.zero_range(offset, len, may_trim);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        self.check(offset, len)?;
        let blocks = self.lock();
        let end = offset + len;
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let idx = pos / BLOCK;
            let hole = !blocks.contains_key(&idx);
            // Extend to the end of the run of blocks with the same state.
            let run_end = if hole {
                blocks.range(idx..).next().map_or(self.size, |(&next, _)| next * BLOCK)
            } else {
                let mut next = idx + 1;
                while blocks.contains_key(&next) && next * BLOCK < end {
                    next += 1;
                }
                next * BLOCK
            };
            let run_end = run_end.min(self.size);
            extents.push(Extent { length: run_end - pos, hole, zero: hole });
            pos = run_end;
        }
        Ok(extents)
    }
}

/// An export with its description.
type Entry = (String, Arc<dyn Export>);

/// A registry of named exports held in memory.
#[derive(Default)]
pub struct MemRegistry {
    exports: RwLock<HashMap<String, Entry>>,
}

impl MemRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces an export.
    pub fn insert(&self, name: &str, description: &str, export: Arc<dyn Export>) {
        let mut map = self.exports.write().unwrap_or_else(|p| p.into_inner());
        map.insert(name.to_owned(), (description.to_owned(), export));
    }

    pub fn remove(&self, name: &str) {
        let mut map = self.exports.write().unwrap_or_else(|p| p.into_inner());
        map.remove(name);
    }
}

impl ExportRegistry for MemRegistry {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        let map = self.exports.read().unwrap_or_else(|p| p.into_inner());
        map.get(name).map(|(_, e)| Arc::clone(e))
    }

    fn list(&self) -> Vec<(String, String)> {
        let map = self.exports.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = map.iter().map(|(n, (d, _))| (n.clone(), d.clone())).collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sparse_reads_writes_and_status() {
        let e = MemExport::new(1 << 20);
        assert_eq!(
            e.block_status(0, 1 << 20).await.unwrap(),
            vec![Extent { length: 1 << 20, hole: true, zero: true }]
        );
        e.write(5000, IoBuf::copy_from(&[7u8; 10000]), false).await.unwrap();
        let r = e.read(4990, 10020).await.unwrap();
        assert!(r[..10].iter().all(|&b| b == 0));
        assert!(r[10..10010].iter().all(|&b| b == 7));
        assert!(r[10010..].iter().all(|&b| b == 0));
        let st = e.block_status(0, 1 << 20).await.unwrap();
        assert_eq!(st[0], Extent { length: 4096, hole: true, zero: true });
        assert_eq!(st[1], Extent { length: 12288, hole: false, zero: false });
        assert_eq!(st[2].length, (1 << 20) - 16384);
        // Trim the middle block: only whole blocks go away.
        e.trim(8192, 4096, false).await.unwrap();
        assert_eq!(e.allocated_blocks(), 2);
        e.write_zeroes(0, 1 << 20, false, false).await.unwrap();
        assert_eq!(e.allocated_blocks(), 256);
        assert!(e.read(0, 1 << 20).await.unwrap().iter().all(|&b| b == 0));
        e.write_zeroes(0, 1 << 20, true, false).await.unwrap();
        assert_eq!(e.allocated_blocks(), 0);
        assert!(e.read(u64::MAX, 1).await.is_err());
    }
}
