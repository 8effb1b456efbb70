//! The metadata journal and its checkpoints.
//!
//! ```text
//!  checkpoint slot 0 / 1            journal region (epoch E = the newest checkpoint's epoch)
//!  ┌────────────────────────┐       ┌──────────┬──────────┬───────────────┬───────────────
//!  │ hdr: magic crc seq     │       │ commit   │ commit   │ commit (3     │ stale blocks of
//!  │      epoch E  len      │  ──>  │ E, seq 1 │ E, seq 2 │  blocks)      │ older epochs
//!  │ payload: whole state   │       └──────────┴──────────┴───────────────┴───────────────
//!  └────────────────────────┘        replay: apply while (magic, crc, epoch == E, seq == n+1)
//! ```
//!
//! A **commit block** is the unit of durability: a 32-byte header (magic, crc32c, journal
//! epoch, sequence number, payload length, record count) followed by encoded [`Record`]s,
//! padded to 4 KiB. The crc covers the header after the crc field and the whole payload, so a
//! torn or stale block is recognised and replay stops there: nothing after a bad block is
//! ever applied. Each commit starts on a fresh 4 KiB block so a torn write can only damage the
//! commit being written, never one already acknowledged.
//!
//! Group commit: records from many operations accumulate in memory; one commit writes them all
//! with a single journal write. Before it, one `fdatasync` makes every data write the records
//! point at durable (a mapping must never be durable before the data it maps); after it,
//! another makes the commit itself durable.
//!
//! When the next commit would not fit, a **checkpoint** is written instead: the whole state,
//! into the slot not holding the newest checkpoint, with the next journal epoch. Once it is
//! durable the journal restarts at offset 0; blocks of the old epoch are ignored from then on.
//! A checkpoint torn by a crash fails its crc, so import falls back to the other slot and the
//! old journal, which is untouched until the new checkpoint is durable.

use std::sync::Mutex;

use trireme_iobuf::IoBuf;

use crate::PoolError;
use crate::codec::Dec;
use crate::io::{BLOCK, Backend};
use crate::layout::Layout;
use crate::meta::{Meta, decode_record};

const COMMIT_MAGIC: u32 = u32::from_le_bytes(*b"TJNL");
const CKPT_MAGIC: u32 = u32::from_le_bytes(*b"TCKP");
const COMMIT_HDR: usize = 32;
const CKPT_HDR: usize = 40;
/// Version of the checkpoint payload encoding.
const CKPT_VERSION: u32 = 1;

fn align(n: usize) -> usize {
    n.div_ceil(BLOCK as usize) * BLOCK as usize
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Where the journal stands: the writer's cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Journal {
    /// Byte offset of the next commit inside the journal region.
    pub(crate) tail: u64,
    pub(crate) epoch: u64,
    /// Sequence number of the next commit in this epoch.
    pub(crate) seq: u64,
    /// Sequence number of the newest durable checkpoint.
    pub(crate) ckpt_seq: u64,
    /// Commits and checkpoints written since open (for tests and metrics).
    pub(crate) commits: u64,
    pub(crate) checkpoints: u64,
}

fn to_iobuf(bytes: &[u8]) -> IoBuf {
    let mut b = IoBuf::zeroed(align(bytes.len().max(1)));
    b[..bytes.len()].copy_from_slice(bytes);
    b
}

fn commit_block(epoch: u64, seq: u64, count: u32, payload: &[u8]) -> IoBuf {
    let mut h = Vec::with_capacity(COMMIT_HDR + payload.len());
    h.extend_from_slice(&COMMIT_MAGIC.to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&epoch.to_le_bytes());
    h.extend_from_slice(&seq.to_le_bytes());
    h.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    h.extend_from_slice(&count.to_le_bytes());
    h.extend_from_slice(payload);
    let crc = crc32c::crc32c(&h[8..]);
    h[4..8].copy_from_slice(&crc.to_le_bytes());
    to_iobuf(&h)
}

fn checkpoint_block(seq: u64, epoch: u64, payload: &[u8]) -> IoBuf {
    let mut h = Vec::with_capacity(CKPT_HDR + payload.len());
    h.extend_from_slice(&CKPT_MAGIC.to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&CKPT_VERSION.to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&seq.to_le_bytes());
    h.extend_from_slice(&epoch.to_le_bytes());
    h.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    h.extend_from_slice(payload);
    let crc = crc32c::crc32c(&h[8..]);
    h[4..8].copy_from_slice(&crc.to_le_bytes());
    to_iobuf(&h)
}

async fn read_at(dev: &Backend, off: u64, len: usize) -> Result<IoBuf, PoolError> {
    let buf = IoBuf::zeroed(len);
    let (buf, r) = dev.read(buf, 0, len, off).await;
    r.map_err(|e| PoolError::io(format!("reading pool metadata at offset {off}"), e))?;
    Ok(buf)
}

async fn write_at(dev: &Backend, off: u64, buf: IoBuf) -> Result<(), PoolError> {
    let len = buf.len();
    let (_, r) = dev.write(buf, 0, len, off).await;
    r.map_err(|e| PoolError::io(format!("writing pool metadata at offset {off}"), e))
}

async fn sync(dev: &Backend) -> Result<(), PoolError> {
    dev.sync().await.map_err(|e| PoolError::io("syncing the pool disk", e))
}

/// Writes the empty metadata of a new pool: checkpoint 1 (in slot 1), an invalid slot 0 and
/// an empty journal.
pub(crate) async fn format(
    dev: &Backend,
    layout: &Layout,
    meta: &Meta,
) -> Result<Journal, PoolError> {
    write_at(dev, layout.ckpt_slot(0), IoBuf::zeroed(BLOCK as usize)).await?;
    write_at(dev, layout.journal_offset, IoBuf::zeroed(BLOCK as usize)).await?;
    let state = meta.encode_state();
    write_at(dev, layout.ckpt_slot(1), checkpoint_block(1, 1, &state)).await?;
    sync(dev).await?;
    Ok(Journal { tail: 0, epoch: 1, seq: 1, ckpt_seq: 1, commits: 0, checkpoints: 0 })
}

/// Reads one checkpoint slot; None if it holds no valid checkpoint.
async fn read_checkpoint(
    dev: &Backend,
    layout: &Layout,
    slot: u64,
) -> Result<Option<(u64, u64, Vec<u8>)>, PoolError> {
    let off = layout.ckpt_slot(slot);
    let head = read_at(dev, off, BLOCK as usize).await?;
    if le32(&head, 0) != CKPT_MAGIC || le32(&head, 8) != CKPT_VERSION {
        return Ok(None);
    }
    let len = le64(&head, 32);
    if len > layout.ckpt_slot_size - CKPT_HDR as u64 {
        return Ok(None);
    }
    let total = align(CKPT_HDR + len as usize);
    let full = if total > BLOCK as usize { read_at(dev, off, total).await? } else { head };
    let end = CKPT_HDR + len as usize;
    if crc32c::crc32c(&full[8..end]) != le32(&full, 4) {
        tracing::warn!(slot, "checkpoint slot fails its checksum; ignoring it");
        return Ok(None);
    }
    Ok(Some((le64(&full, 16), le64(&full, 24), full[CKPT_HDR..end].to_vec())))
}

/// Loads the newest valid checkpoint and replays the journal on top of it.
pub(crate) async fn load(dev: &Backend, layout: &Layout) -> Result<(Meta, Journal), PoolError> {
    let a = read_checkpoint(dev, layout, 0).await?;
    let b = read_checkpoint(dev, layout, 1).await?;
    let best = match (a, b) {
        (Some(a), Some(b)) => Some(if a.0 >= b.0 { a } else { b }),
        (a, b) => a.or(b),
    };
    let Some((ckpt_seq, epoch, state)) = best else {
        return Err(PoolError::corrupt("neither checkpoint slot holds a valid checkpoint"));
    };
    let cluster_count = u32::try_from(layout.cluster_count)
        .map_err(|_| PoolError::corrupt("cluster count out of range"))?;
    let mut meta = Meta::decode_state(layout.cluster_size, cluster_count, &state)?;

    // Replay, reading the journal in chunks as far as valid commits go.
    const CHUNK: usize = 1 << 20;
    let mut window: Vec<u8> = Vec::new();
    let mut tail = 0usize;
    let mut seq = 1u64;
    let jsize = layout.journal_size as usize;
    loop {
        if tail + BLOCK as usize > jsize {
            break;
        }
        let need = |n: usize| tail + n;
        // Make sure the header block is in the window.
        while window.len() < need(BLOCK as usize) {
            let n = CHUNK.min(jsize - window.len());
            let b = read_at(dev, layout.journal_offset + window.len() as u64, n).await?;
            window.extend_from_slice(&b);
        }
        let h = &window[tail..];
        if le32(h, 0) != COMMIT_MAGIC || le64(h, 8) != epoch || le64(h, 16) != seq {
            break;
        }
        let plen = le32(h, 24) as usize;
        let count = le32(h, 28);
        let total = align(COMMIT_HDR + plen);
        if tail + total > jsize {
            break;
        }
        while window.len() < need(total) {
            let n = CHUNK.min(jsize - window.len());
            let b = read_at(dev, layout.journal_offset + window.len() as u64, n).await?;
            window.extend_from_slice(&b);
        }
        let blk = &window[tail..tail + COMMIT_HDR + plen];
        if crc32c::crc32c(&blk[8..]) != le32(blk, 4) {
            tracing::info!(seq, offset = tail, "journal ends at a torn or stale commit");
            break;
        }
        let mut d = Dec::new(&blk[COMMIT_HDR..], "journal commit");
        for _ in 0..count {
            let rec = decode_record(&mut d)?;
            meta.apply(&rec, false)?;
        }
        tail += total;
        seq += 1;
    }
    let journal = Journal { tail: tail as u64, epoch, seq, ckpt_seq, commits: 0, checkpoints: 0 };
    Ok((meta, journal))
}

impl Journal {
    /// Commits every pending record (group commit), writing a checkpoint instead when the
    /// journal is full or `checkpoint` is set. Returns once the records are durable, with the
    /// clusters they released (the caller returns them to the free pool).
    pub(crate) async fn commit(
        &mut self,
        dev: &Backend,
        layout: &Layout,
        meta: &Mutex<Meta>,
        checkpoint: bool,
    ) -> Result<Vec<u32>, PoolError> {
        let (payload, count, quarantine, state) = {
            let mut m = meta.lock().unwrap_or_else(|p| p.into_inner());
            let payload = std::mem::take(&mut m.pending.buf);
            let count = std::mem::take(&mut m.pending_n);
            let quarantine = std::mem::take(&mut m.quarantine);
            let needed = align(COMMIT_HDR + payload.len()) as u64;
            let full = count > 0 && self.tail + needed > layout.journal_size;
            // The state is captured under the same lock as the records it subsumes.
            let state = (checkpoint || full).then(|| m.encode_state());
            (payload, count, quarantine, state)
        };
        // Data barrier: everything the records point at is durable before they are.
        sync(dev).await?;
        if let Some(state) = state {
            if CKPT_HDR + state.len() > layout.ckpt_slot_size as usize {
                return Err(PoolError::MetadataFull { needed: state.len() as u64 });
            }
            let seq = self.ckpt_seq + 1;
            let epoch = self.epoch + 1;
            write_at(dev, layout.ckpt_slot(seq), checkpoint_block(seq, epoch, &state)).await?;
            sync(dev).await?;
            *self = Journal {
                tail: 0,
                epoch,
                seq: 1,
                ckpt_seq: seq,
                checkpoints: self.checkpoints + 1,
                ..*self
            };
        } else if count > 0 {
            let blk = commit_block(self.epoch, self.seq, count, &payload);
            let len = blk.len() as u64;
            write_at(dev, layout.journal_offset + self.tail, blk).await?;
            sync(dev).await?;
            self.tail += len;
            self.seq += 1;
            self.commits += 1;
        }
        Ok(quarantine)
    }
}
