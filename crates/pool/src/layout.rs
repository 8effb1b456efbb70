//! The on-disk layout and the superblock.
//!
//! ```text
//!  offset 0      4 KiB     8 KiB                                                data_offset
//!  ┌─────────┬─────────┬──────────────┬──────────────┬───────────────────────┬──┬──────────────────┐
//!  │ super A │ super B │ checkpoint 0 │ checkpoint 1 │ journal (ring of      │  │ cluster 0, 1, …  │
//!  │ 4 KiB   │ 4 KiB   │ slot         │ slot         │ commit blocks)        │  │ (data region)    │
//!  └─────────┴─────────┴──────────────┴──────────────┴───────────────────────┴──┴──────────────────┘
//!                                                          padding to a cluster boundary ┘
//! ```
//!
//! **Superblock** (two identical 4 KiB copies, written A then B): magic `TRIREMEP`, format
//! version, a sequence number, pool uuid and name, cluster size, the disk size at format time
//! and every region's offset and size; the last 4 bytes are a crc32c of the rest. Import takes
//! the valid copy with the highest sequence, so a write torn in either copy is survivable.
//! The superblock never points at mutable state: which checkpoint is current is decided by the
//! checkpoints themselves (see [`crate::journal`]), so normal operation never rewrites it.
//!
//! All multi-byte fields are little-endian. Every region starts on a 4 KiB boundary so that
//! `O_DIRECT` accepts every metadata read and write; the data region starts on a cluster
//! boundary so that a cluster never straddles two device stripes more than it must.

use uuid::Uuid;

use crate::PoolError;
use crate::codec::{Dec, Enc};
use crate::io::BLOCK;

pub(crate) const MAGIC: &[u8; 8] = b"TRIREMEP";
/// The pool format version this build writes and reads.
pub(crate) const FORMAT_VERSION: u32 = 1;
pub(crate) const SUPER_SIZE: u64 = BLOCK;
pub(crate) const MAX_NAME: usize = 128;
pub(crate) const MIN_CLUSTER: u64 = 64 << 10;
pub(crate) const MAX_CLUSTER: u64 = 64 << 20;

/// Where each region lives. Fixed at format time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) cluster_size: u64,
    pub(crate) ckpt_offset: u64,
    pub(crate) ckpt_slot_size: u64,
    pub(crate) journal_offset: u64,
    pub(crate) journal_size: u64,
    pub(crate) data_offset: u64,
    pub(crate) cluster_count: u64,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Layout {
    /// Sizes the regions for a disk. A checkpoint slot holds the whole metadata state: an
    /// allowance for the replica table (256 KiB to 2 MiB: thousands of replicas) plus room for
    /// about four fully fragmented copies of a map covering every cluster (12 bytes per
    /// extent). The journal (1 to 16 MiB) holds hundreds to thousands of commits before a
    /// checkpoint is needed. Small disks get the small end, so a 64 MiB test pool keeps most
    /// of its space for data.
    pub(crate) fn compute(disk_size: u64, cluster_size: u64) -> Result<Self, PoolError> {
        let est_clusters = disk_size / cluster_size;
        let table = (disk_size / 128).clamp(256 << 10, 2 << 20);
        let ring = (disk_size / 64).clamp(1 << 20, 16 << 20);
        let ckpt = align_up(table + 48 * est_clusters, BLOCK);
        let journal = align_up(ring + 16 * est_clusters, BLOCK);
        Self::with_sizes(disk_size, cluster_size, ckpt, journal)
    }

    pub(crate) fn with_sizes(
        disk_size: u64,
        cluster_size: u64,
        ckpt: u64,
        journal: u64,
    ) -> Result<Self, PoolError> {
        if !cluster_size.is_power_of_two() || !(MIN_CLUSTER..=MAX_CLUSTER).contains(&cluster_size) {
            return Err(PoolError::InvalidArgument(format!(
                "cluster size {cluster_size} must be a power of two between {MIN_CLUSTER} and {MAX_CLUSTER}"
            )));
        }
        let ckpt_offset = 2 * SUPER_SIZE;
        let journal_offset = ckpt_offset + 2 * ckpt;
        let data_offset = align_up(journal_offset + journal, cluster_size);
        let cluster_count = disk_size.saturating_sub(data_offset) / cluster_size;
        if cluster_count == 0 || cluster_count > u64::from(u32::MAX - 1) {
            return Err(PoolError::InvalidArgument(format!(
                "a disk of {disk_size} bytes cannot hold a pool: metadata needs {data_offset} bytes \
                 plus at least one cluster of {cluster_size} bytes"
            )));
        }
        Ok(Self {
            cluster_size,
            ckpt_offset,
            ckpt_slot_size: ckpt,
            journal_offset,
            journal_size: journal,
            data_offset,
            cluster_count,
        })
    }

    /// The byte the data region ends at: the smallest disk that holds this pool.
    pub(crate) fn end(&self) -> u64 {
        self.data_offset + self.cluster_count * self.cluster_size
    }

    pub(crate) fn ckpt_slot(&self, slot: u64) -> u64 {
        self.ckpt_offset + (slot % 2) * self.ckpt_slot_size
    }

    pub(crate) fn cluster_offset(&self, pcluster: u32) -> u64 {
        self.data_offset + u64::from(pcluster) * self.cluster_size
    }
}

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Superblock {
    pub(crate) seq: u64,
    pub(crate) uuid: Uuid,
    pub(crate) name: String,
    pub(crate) layout: Layout,
}

impl Superblock {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(SUPER_SIZE as usize);
        e.bytes(MAGIC);
        e.u32(FORMAT_VERSION);
        e.u32(0);
        e.u64(self.seq);
        e.bytes(self.uuid.as_bytes());
        let name = self.name.as_bytes();
        let n = name.len().min(MAX_NAME);
        e.u16(n as u16);
        let mut padded = [0u8; MAX_NAME];
        padded[..n].copy_from_slice(&name[..n]);
        e.bytes(&padded);
        let l = &self.layout;
        for v in [
            l.cluster_size,
            l.ckpt_offset,
            l.ckpt_slot_size,
            l.journal_offset,
            l.journal_size,
            l.data_offset,
            l.cluster_count,
        ] {
            e.u64(v);
        }
        let mut buf = e.buf;
        buf.resize(SUPER_SIZE as usize - 4, 0);
        let crc = crc32c::crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decodes one copy; the error says why it is not valid.
    pub(crate) fn decode(buf: &[u8]) -> Result<Self, PoolError> {
        if buf.len() < SUPER_SIZE as usize {
            return Err(PoolError::corrupt("superblock is short"));
        }
        let buf = &buf[..SUPER_SIZE as usize];
        if &buf[..8] != MAGIC {
            return Err(PoolError::corrupt("no pool magic"));
        }
        let stored = u32::from_le_bytes([buf[4092], buf[4093], buf[4094], buf[4095]]);
        if crc32c::crc32c(&buf[..4092]) != stored {
            return Err(PoolError::corrupt("superblock checksum mismatch"));
        }
        let mut d = Dec::new(&buf[8..], "superblock");
        let version = d.u32()?;
        if version != FORMAT_VERSION {
            return Err(PoolError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let _flags = d.u32()?;
        let seq = d.u64()?;
        let uuid = Uuid::from_bytes(d.b16()?);
        let n = usize::from(d.u16()?);
        let raw = d.take(MAX_NAME)?;
        if n > MAX_NAME {
            return Err(d.bad(format!("name length {n}")));
        }
        let name =
            String::from_utf8(raw[..n].to_vec()).map_err(|_| d.bad("name is not UTF-8".into()))?;
        let cluster_size = d.u64()?;
        let ckpt_offset = d.u64()?;
        let ckpt_slot_size = d.u64()?;
        let journal_offset = d.u64()?;
        let journal_size = d.u64()?;
        let data_offset = d.u64()?;
        let cluster_count = d.u64()?;
        let layout = Layout {
            cluster_size,
            ckpt_offset,
            ckpt_slot_size,
            journal_offset,
            journal_size,
            data_offset,
            cluster_count,
        };
        // A checksummed superblock with an inconsistent layout was written by a buggy or
        // hostile tool; refuse it rather than trust offsets into the data region.
        let expect =
            Layout::with_sizes(layout.end(), cluster_size, ckpt_slot_size, journal_size)
                .map_err(|e| PoolError::corrupt(format!("superblock layout is invalid: {e}")))?;
        if expect != layout
            || ckpt_slot_size % BLOCK != 0
            || journal_size % BLOCK != 0
            || journal_size < BLOCK
        {
            return Err(PoolError::corrupt("superblock layout is inconsistent"));
        }
        Ok(Self { seq, uuid, name, layout })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        Superblock {
            seq: 3,
            uuid: Uuid::new_v4(),
            name: "pool-a".into(),
            layout: Layout::compute(1 << 30, 1 << 20).unwrap(),
        }
    }

    #[test]
    fn superblock_round_trips() {
        let s = sb();
        let enc = s.encode();
        assert_eq!(enc.len(), SUPER_SIZE as usize);
        assert_eq!(Superblock::decode(&enc).unwrap(), s);
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let enc = sb().encode();
        for i in (0..enc.len()).step_by(97) {
            let mut bad = enc.clone();
            bad[i] ^= 0x40;
            assert!(Superblock::decode(&bad).is_err(), "flip at {i} not detected");
        }
    }

    #[test]
    fn layout_is_aligned_and_rejects_tiny_disks() {
        let l = Layout::compute(1 << 30, 1 << 20).unwrap();
        assert_eq!(l.data_offset % l.cluster_size, 0);
        assert_eq!(l.journal_offset % BLOCK, 0);
        assert!(l.end() <= 1 << 30);
        assert!(Layout::compute(1 << 20, 1 << 20).is_err());
        // A small pool keeps most of its space for data.
        let small = Layout::compute(64 << 20, 1 << 20).unwrap();
        assert!(small.cluster_count >= 60, "{small:?}");
        assert!(Layout::compute(1 << 30, 3 << 20).is_err());
    }
}
