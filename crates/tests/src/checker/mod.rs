//! The crash-consistency checker behind `trireme-checker`: proves DESIGN.md's first guarantee
//! ("a write acknowledged before a completed FLUSH survives a crash") with a log, not by eye.
//!
//! `write` keeps many tagged-block writes in flight at random indexes (never two to the same
//! block at once, so "the latest acknowledged write" is well defined), and FLUSHes
//! periodically. At the moment a FLUSH is *sent* it snapshots which writes were already
//! acknowledged; once the FLUSH completes, it appends that snapshot to the log and fsyncs it.
//! So the log only ever claims what the protocol promises.
//!
//! `verify` reads every block back and holds each covered block to its recorded sequence.
//!
//! ```text
//!   writes ──ack──> dirty{idx→seq} ──(FLUSH sent: take)──> snapshot ──(FLUSH ok)──> log+fsync
//! ```

pub mod format;

use std::collections::{HashMap, HashSet};
use std::io::Seek;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use rand::{Rng, SeedableRng};

use trireme_iobuf::IoBuf;
use trireme_nbd::{Client, ClientError, ClientOptions};

use format::{BlockContent, LogHeader};

/// Options of `trireme-checker write`.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub uri: String,
    pub log: std::path::PathBuf,
    pub seconds: u64,
    pub flush_every: Duration,
    pub block_size: usize,
    /// Blocks to use from the start of the export; `None`: as many as fit (at most 65,536).
    pub blocks: Option<u64>,
    pub depth: usize,
    /// Percentage of writes sent with FUA; each acknowledged one is recorded at once, since
    /// FUA makes it durable without a FLUSH.
    pub fua_percent: u8,
}

/// How `write` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReport {
    pub writes_acked: u64,
    pub flushes_recorded: u64,
    pub last_flush: u64,
    /// `None` when it ran for the requested time; otherwise why the connection ended.
    pub connection_lost: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckerError {
    #[error(transparent)]
    Nbd(#[from] ClientError),
    #[error(transparent)]
    Log(#[from] format::LogError),
    #[error("cannot write the log {path}: {source}")]
    LogWrite {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

fn log_write_err(path: &Path) -> impl Fn(std::io::Error) -> CheckerError + '_ {
    move |source| CheckerError::LogWrite { path: path.display().to_string(), source }
}

/// (block index, sequence, sent with FUA, outcome)
type WriteDone = (u64, u64, bool, Result<(), ClientError>);
/// A FLUSH in flight and the acknowledged writes it will cover.
type Flushing = (BoxFuture<'static, Result<(), ClientError>>, Vec<(u64, u64)>);
type ReadDone = (u64, Result<IoBuf, ClientError>);

/// A request may wait this long for its answer; a loaded 2-core test machine can stall an
/// engine for many seconds without anything being wrong.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

async fn connect(uri: &str) -> Result<Client, ClientError> {
    let opts = ClientOptions { io_timeout: IO_TIMEOUT, ..ClientOptions::default() };
    Client::connect_uri(uri, opts).await
}

/// Runs the write mode until `seconds` pass or the connection is lost.
pub async fn write(opts: &WriteOptions) -> Result<WriteReport, CheckerError> {
    if opts.block_size < 512 || !opts.block_size.is_power_of_two() {
        return Err(CheckerError::Usage("--block must be a power of two of at least 512".into()));
    }
    let client = Arc::new(connect(&opts.uri).await?);
    let fit = client.size() / opts.block_size as u64;
    let blocks = opts.blocks.unwrap_or(fit.min(65_536));
    if blocks == 0 || blocks > fit {
        return Err(CheckerError::Usage(format!(
            "--blocks {blocks} does not fit an export of {} bytes with {}-byte blocks",
            client.size(),
            opts.block_size
        )));
    }
    let header = LogHeader { block_size: opts.block_size as u32, blocks };
    let (mut log, mut seq, mut flush_no) = open_log(&opts.log, header)?;
    let lw = log_write_err(&opts.log);

    let depth = opts.depth.max(1);
    // A seeded StdRng rather than the thread-local one: `write` must be Send so it can run
    // as a task beside the faults a test injects.
    let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
    let mut inflight: FuturesUnordered<BoxFuture<'static, WriteDone>> = FuturesUnordered::new();
    let mut busy: HashSet<u64> = HashSet::new();
    let mut dirty: HashMap<u64, u64> = HashMap::new();
    let mut flushing: Option<Flushing> = None;
    let mut ticker = tokio::time::interval(opts.flush_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(opts.seconds);
    let mut report = WriteReport {
        writes_acked: 0,
        flushes_recorded: 0,
        last_flush: flush_no,
        connection_lost: None,
    };
    let mut stopping = false;

    loop {
        while !stopping && inflight.len() < depth {
            // Never two writes to one block at once: their order on disk would be undefined.
            let Some(index) =
                (0..32).map(|_| rng.random_range(0..blocks)).find(|i| !busy.contains(i))
            else {
                break;
            };
            seq += 1;
            busy.insert(index);
            let block =
                IoBuf::copy_from(&format::make_block(opts.block_size, index, seq, rng.random()));
            let c = client.clone();
            let offset = index * opts.block_size as u64;
            let s = seq;
            let fua = rng.random_range(0..100u8) < opts.fua_percent;
            inflight
                .push(Box::pin(async move { (index, s, fua, c.write(offset, block, fua).await) }));
        }
        if stopping && inflight.is_empty() && flushing.is_none() {
            break;
        }
        tokio::select! {
            Some((index, s, fua, res)) = inflight.next(), if !inflight.is_empty() => {
                busy.remove(&index);
                match res {
                    Ok(()) if fua => {
                        // Durable on acknowledgement: record it under the last completed flush.
                        report.writes_acked += 1;
                        let rec = format::encode_record(flush_no, &[(index, s)]);
                        format::append_durably(&mut log, &rec).map_err(&lw)?;
                    }
                    Ok(()) => {
                        report.writes_acked += 1;
                        let e = dirty.entry(index).or_insert(0);
                        *e = (*e).max(s);
                    }
                    Err(e) if e.is_connection_lost() => {
                        report.connection_lost = Some(e.to_string());
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            res = async { match flushing.as_mut() { Some((f, _)) => f.await, None => std::future::pending().await } },
                if flushing.is_some() => {
                let snapshot = flushing.take().map(|(_, s)| s).unwrap_or_default();
                match res {
                    Ok(()) => {
                        flush_no += 1;
                        let rec = format::encode_record(flush_no, &snapshot);
                        format::append_durably(&mut log, &rec).map_err(&lw)?;
                        report.flushes_recorded += 1;
                        report.last_flush = flush_no;
                    }
                    Err(e) if e.is_connection_lost() => {
                        report.connection_lost = Some(e.to_string());
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            _ = ticker.tick(), if flushing.is_none() && !stopping => {
                // Everything in `dirty` was acknowledged before this FLUSH is sent.
                let snapshot: Vec<(u64, u64)> = dirty.drain().collect();
                let c = client.clone();
                flushing = Some((Box::pin(async move { c.flush().await }), snapshot));
            }
            _ = tokio::time::sleep_until(deadline), if !stopping => {
                stopping = true;
            }
        }
        if stopping && inflight.is_empty() && flushing.is_none() && !dirty.is_empty() {
            let snapshot: Vec<(u64, u64)> = dirty.drain().collect();
            let c = client.clone();
            flushing = Some((Box::pin(async move { c.flush().await }), snapshot));
        }
    }
    if report.connection_lost.is_none() {
        client.disconnect().await.ok();
    }
    Ok(report)
}

/// Opens (or starts) the log. Returns it positioned for appending, the first sequence number
/// to use and the last flush number recorded.
fn open_log(path: &Path, header: LogHeader) -> Result<(std::fs::File, u64, u64), CheckerError> {
    let lw = log_write_err(path);
    if path.exists() {
        let parsed = format::read_log(path)?;
        if parsed.header != header {
            return Err(CheckerError::Usage(format!(
                "{} was started with {:?}, not {:?}",
                path.display(),
                parsed.header,
                header
            )));
        }
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(&lw)?;
        // Drop a torn tail so new records follow the last valid one.
        f.set_len(parsed.valid_len).map_err(&lw)?;
        f.seek(std::io::SeekFrom::End(0)).map_err(&lw)?;
        // Writes of an earlier run that were never recorded may still be on disk with higher
        // sequence numbers than any recorded; jump far past them so "newer" stays meaningful.
        let seq = parsed.covered.max_seq + (1 << 32);
        Ok((f, seq, parsed.covered.last_flush))
    } else {
        let mut f =
            std::fs::OpenOptions::new().create_new(true).write(true).open(path).map_err(&lw)?;
        format::append_durably(&mut f, &header.encode()).map_err(&lw)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).ok();
        }
        Ok((f, 1 << 32, 0))
    }
}

/// One thing `verify` found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A covered block reads older than (or as zeroes instead of) its recorded write.
    Lost { index: u64, want_seq: u64, flush: u64, found: String },
    /// A block that is neither zeroes nor a valid tag of its own index.
    Corrupt { index: u64, found: String },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Lost { index, want_seq, flush, found } => write!(
                f,
                "LOST block {index}: write seq {want_seq} was acknowledged before flush {flush} completed, but the block holds {found}"
            ),
            Self::Corrupt { index, found } => write!(f, "CORRUPT block {index}: {found}"),
        }
    }
}

/// What `verify` found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub blocks: u64,
    pub covered: u64,
    pub last_flush: u64,
    pub findings: Vec<Finding>,
}

impl VerifyReport {
    pub fn lost(&self) -> usize {
        self.findings.iter().filter(|f| matches!(f, Finding::Lost { .. })).count()
    }
    pub fn corrupt(&self) -> usize {
        self.findings.iter().filter(|f| matches!(f, Finding::Corrupt { .. })).count()
    }
    pub fn summary(&self) -> String {
        let mut s = format!(
            "verified {} blocks, {} covered by flush {}, {} lost",
            self.blocks,
            self.covered,
            self.last_flush,
            self.lost()
        );
        if self.corrupt() > 0 {
            s.push_str(&format!(", {} corrupt", self.corrupt()));
        }
        s
    }
}

/// Checks one block against what the log says about it.
pub fn check_block(index: u64, data: &[u8], covered: Option<(u64, u64)>) -> Option<Finding> {
    let content = format::parse_block(data);
    let corrupt = |found: String| Some(Finding::Corrupt { index, found });
    match (content, covered) {
        (BlockContent::Garbage, _) => {
            corrupt(format!("neither zeroes nor a tag: starts {:02x?}", &data[..16]))
        }
        (BlockContent::BadCrc { index: i, seq }, _) => {
            corrupt(format!("tag of block {i} seq {seq} with a wrong crc32c (torn or damaged)"))
        }
        (BlockContent::Tag { index: i, seq }, _) if i != index => {
            corrupt(format!("a valid tag of block {i} seq {seq}: data landed at the wrong offset"))
        }
        (BlockContent::Zero, Some((want_seq, flush))) => {
            Some(Finding::Lost { index, want_seq, flush, found: "zeroes".into() })
        }
        (BlockContent::Tag { seq, .. }, Some((want_seq, flush))) if seq < want_seq => {
            Some(Finding::Lost { index, want_seq, flush, found: format!("older seq {seq}") })
        }
        _ => None,
    }
}

/// Reads every block of the log's geometry and checks it.
pub async fn verify(uri: &str, log_path: &Path) -> Result<VerifyReport, CheckerError> {
    let log = format::read_log(log_path)?;
    let client = Arc::new(connect(uri).await?);
    let bs = log.header.block_size as u64;
    let blocks = log.header.blocks;
    if blocks * bs > client.size() {
        return Err(CheckerError::Usage(format!(
            "the log covers {} bytes but the export has only {}",
            blocks * bs,
            client.size()
        )));
    }
    // Read in chunks of up to 64 blocks, within the export's largest request.
    let chunk_blocks = (u64::from(client.block_sizes().maximum) / bs).clamp(1, 64);
    let mut report = VerifyReport {
        blocks,
        covered: log.covered.blocks.len() as u64,
        last_flush: log.covered.last_flush,
        findings: Vec::new(),
    };
    let mut reads: FuturesUnordered<BoxFuture<'static, ReadDone>> = FuturesUnordered::new();
    let mut next = 0u64;
    loop {
        while next < blocks && reads.len() < 8 {
            let n = chunk_blocks.min(blocks - next);
            let c = client.clone();
            let first = next;
            reads.push(Box::pin(async move { (first, c.read(first * bs, (n * bs) as u32).await) }));
            next += n;
        }
        let Some((first, res)) = reads.next().await else { break };
        let data = res?;
        for (k, chunk) in data.chunks_exact(bs as usize).enumerate() {
            let index = first + k as u64;
            if let Some(f) = check_block(index, chunk, log.covered.blocks.get(&index).copied()) {
                report.findings.push(f);
            }
        }
    }
    report.findings.sort_by_key(|f| match f {
        Finding::Lost { index, .. } | Finding::Corrupt { index, .. } => *index,
    });
    Ok(report)
}

/// For the binary: a short line about how `write` ended.
pub fn describe_write(r: &WriteReport, started: Instant) -> String {
    format!(
        "wrote {} acknowledged blocks in {:.1}s, recorded {} flushes (last flush {}), {}",
        r.writes_acked,
        started.elapsed().as_secs_f64(),
        r.flushes_recorded,
        r.last_flush,
        match &r.connection_lost {
            None => "ran to the end".to_owned(),
            Some(why) => format!("stopped: {why}"),
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_block_classifies() {
        let b = format::make_block(4096, 3, 10, 5);
        assert_eq!(check_block(3, &b, Some((10, 1))), None);
        assert_eq!(check_block(3, &b, Some((9, 1))), None, "newer than recorded is fine");
        assert!(matches!(check_block(3, &b, Some((11, 1))), Some(Finding::Lost { .. })));
        assert!(matches!(check_block(4, &b, None), Some(Finding::Corrupt { .. })));
        let z = vec![0u8; 4096];
        assert_eq!(check_block(3, &z, None), None);
        assert!(matches!(check_block(3, &z, Some((1, 1))), Some(Finding::Lost { .. })));
    }
}
