//! The on-disk formats of the checker: tagged blocks on the volume, and the flush log on the
//! local file system.
//!
//! A tagged block (`B` bytes):
//! ```text
//!  0        8        16       24       32                       B-4    B
//!  | magic  | index  | seq    | salt   | filler(index,seq,salt) | crc32c |
//! ```
//! The crc covers everything before it, so a torn or misplaced block never passes as valid.
//!
//! The log is a header followed by flush records, each appended and fsync'd after the FLUSH it
//! describes completed:
//! ```text
//!  header: "TRCKLOG1" | block size u32 | blocks u64 | crc32c u32
//!  record: "FLSH" | flush number u64 | n u32 | n × (index u64, seq u64) | crc32c u32
//! ```
//! A record lists the blocks whose latest acknowledged write changed since the previous
//! record. A torn last record (the checker itself killed mid-append) is ignored.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;

pub const BLOCK_MAGIC: &[u8; 8] = b"TRIRBLK1";
pub const LOG_MAGIC: &[u8; 8] = b"TRCKLOG1";
pub const RECORD_MAGIC: &[u8; 4] = b"FLSH";
const HEADER_LEN: usize = 24;

/// Builds the tagged block for `(index, seq, salt)`.
pub fn make_block(block_size: usize, index: u64, seq: u64, salt: u64) -> Vec<u8> {
    let mut b = vec![0u8; block_size];
    b[0..8].copy_from_slice(BLOCK_MAGIC);
    b[8..16].copy_from_slice(&index.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b[24..32].copy_from_slice(&salt.to_le_bytes());
    let mut x = salt ^ index.rotate_left(17) ^ seq.rotate_left(41) ^ 0x9e37_79b9_7f4a_7c15;
    let end = block_size - 4;
    for chunk in b[32..end].chunks_mut(8) {
        // xorshift64*: cheap, deterministic filler, so every byte of the block is checked.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let crc = crc32c::crc32c(&b[..end]);
    b[end..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// What a block read back from the volume holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockContent {
    /// All zeroes: never written (or the write was lost).
    Zero,
    /// A tag whose crc is valid.
    Tag { index: u64, seq: u64 },
    /// A tag header with a wrong crc: torn or corrupted.
    BadCrc { index: u64, seq: u64 },
    /// Neither zeroes nor a tag.
    Garbage,
}

pub fn parse_block(b: &[u8]) -> BlockContent {
    if b.len() < 40 {
        return BlockContent::Garbage;
    }
    if &b[0..8] != BLOCK_MAGIC {
        return if b.iter().all(|&x| x == 0) { BlockContent::Zero } else { BlockContent::Garbage };
    }
    let index = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
    let seq = u64::from_le_bytes(b[16..24].try_into().unwrap_or_default());
    let end = b.len() - 4;
    let crc = u32::from_le_bytes(b[end..].try_into().unwrap_or_default());
    if crc32c::crc32c(&b[..end]) != crc {
        return BlockContent::BadCrc { index, seq };
    }
    BlockContent::Tag { index, seq }
}

/// The geometry the log was started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHeader {
    pub block_size: u32,
    pub blocks: u64,
}

impl LogHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN);
        v.extend_from_slice(LOG_MAGIC);
        v.extend_from_slice(&self.block_size.to_le_bytes());
        v.extend_from_slice(&self.blocks.to_le_bytes());
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }
}

/// The latest acknowledged-and-flushed state of each block, merged over all records.
#[derive(Debug, Clone, Default)]
pub struct Covered {
    /// index → (seq, flush number that covered it)
    pub blocks: HashMap<u64, (u64, u64)>,
    pub last_flush: u64,
    pub records: u64,
    pub max_seq: u64,
}

/// A parsed log.
#[derive(Debug, Clone)]
pub struct Log {
    pub header: LogHeader,
    pub covered: Covered,
    /// Length of the valid prefix; anything after it is a torn record.
    pub valid_len: u64,
    pub torn_bytes: u64,
}

pub fn encode_record(flush: u64, entries: &[(u64, u64)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + entries.len() * 16);
    v.extend_from_slice(RECORD_MAGIC);
    v.extend_from_slice(&flush.to_le_bytes());
    v.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (i, s) in entries {
        v.extend_from_slice(&i.to_le_bytes());
        v.extend_from_slice(&s.to_le_bytes());
    }
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot read the log {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a checker log (bad header)")]
    BadHeader { path: String },
}

pub fn read_log(path: &Path) -> Result<Log, LogError> {
    let io = |source| LogError::Io { path: path.display().to_string(), source };
    let mut bytes = Vec::new();
    std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io)?;
    parse_log(&bytes).ok_or_else(|| LogError::BadHeader { path: path.display().to_string() })
}

pub fn parse_log(bytes: &[u8]) -> Option<Log> {
    if bytes.len() < HEADER_LEN || &bytes[0..8] != LOG_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(bytes[20..24].try_into().ok()?);
    if crc32c::crc32c(&bytes[..20]) != crc {
        return None;
    }
    let header = LogHeader {
        block_size: u32::from_le_bytes(bytes[8..12].try_into().ok()?),
        blocks: u64::from_le_bytes(bytes[12..20].try_into().ok()?),
    };
    let mut covered = Covered::default();
    let mut pos = HEADER_LEN;
    loop {
        let rest = &bytes[pos..];
        if rest.len() < 20 || &rest[0..4] != RECORD_MAGIC {
            break;
        }
        let flush = u64::from_le_bytes(rest[4..12].try_into().ok()?);
        let n = u32::from_le_bytes(rest[12..16].try_into().ok()?) as usize;
        let len = 16 + n * 16 + 4;
        if rest.len() < len {
            break;
        }
        let crc = u32::from_le_bytes(rest[len - 4..len].try_into().ok()?);
        if crc32c::crc32c(&rest[..len - 4]) != crc {
            break;
        }
        for e in rest[16..len - 4].chunks_exact(16) {
            let index = u64::from_le_bytes(e[0..8].try_into().ok()?);
            let seq = u64::from_le_bytes(e[8..16].try_into().ok()?);
            let slot = covered.blocks.entry(index).or_insert((0, 0));
            if seq >= slot.0 {
                *slot = (seq, flush);
            }
            covered.max_seq = covered.max_seq.max(seq);
        }
        covered.last_flush = flush;
        covered.records += 1;
        pos += len;
    }
    Some(Log { header, covered, valid_len: pos as u64, torn_bytes: (bytes.len() - pos) as u64 })
}

/// Appends bytes and makes them durable before returning: a record must never claim a flush
/// the log itself could lose.
pub fn append_durably(file: &mut std::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    file.write_all(bytes)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_and_detect_damage() {
        let b = make_block(4096, 7, 99, 1234);
        assert_eq!(parse_block(&b), BlockContent::Tag { index: 7, seq: 99 });
        let mut bad = b.clone();
        bad[2000] ^= 1;
        assert_eq!(parse_block(&bad), BlockContent::BadCrc { index: 7, seq: 99 });
        assert_eq!(parse_block(&vec![0u8; 4096]), BlockContent::Zero);
        let mut junk = vec![0u8; 4096];
        junk[100] = 1;
        assert_eq!(parse_block(&junk), BlockContent::Garbage);
        assert_ne!(make_block(4096, 7, 99, 1), b, "the salt changes the content");
    }

    #[test]
    fn log_merges_records_and_ignores_a_torn_tail() {
        let mut log = LogHeader { block_size: 4096, blocks: 10 }.encode();
        log.extend(encode_record(1, &[(1, 5), (2, 6)]));
        log.extend(encode_record(2, &[(1, 9)]));
        let full = log.len();
        let torn = encode_record(3, &[(2, 100)]);
        log.extend(&torn[..torn.len() - 3]);
        let parsed = parse_log(&log).unwrap();
        assert_eq!(parsed.covered.blocks[&1], (9, 2));
        assert_eq!(parsed.covered.blocks[&2], (6, 1));
        assert_eq!(parsed.covered.last_flush, 2);
        assert_eq!(parsed.valid_len as usize, full);
        assert_eq!(parsed.torn_bytes as usize, torn.len() - 3);
    }
}
