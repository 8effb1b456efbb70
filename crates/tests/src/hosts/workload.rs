//! Workloads that run while faults happen, and the checks after them.
//!
//! - [`FioLoop`]: fio's nbd engine, random 4 KiB writes verified by crc32c, run after run over
//!   one window of the volume until stopped. Any fio error (an I/O error or a verify failure)
//!   is recorded with fio's output. Keeping the window small keeps the set of regions written
//!   during an outage small, so a partial rebuild is visibly partial.
//! - [`CheckerLoop`]: the repo's crash checker (tagged blocks, a durable log of flushed acks)
//!   in short rounds against one log until stopped or until the connection fails.
//! - [`compare_replicas`]: reads every replica through its read-only share and names the MiB
//!   where they differ: after a rebuild every replica must hold the same bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use trireme_nbd::{Client, ClientOptions};

use super::Hosts;
use crate::checker;
use crate::tools::{self, describe_output, stdout};

/// What a [`FioLoop`] saw.
#[derive(Debug, Clone, Default)]
pub struct FioSummary {
    pub runs: u32,
    /// One entry per failed run: its full description.
    pub failures: Vec<String>,
}

/// fio runs back to back until [`FioLoop::stop`].
pub struct FioLoop {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU32>,
    task: JoinHandle<FioSummary>,
}

impl FioLoop {
    /// Random 4 KiB writes at QD16 over `[offset, offset + size)` of `uri`, each run verifying
    /// everything it wrote (crc32c), until stopped or a run fails.
    pub fn start(uri: &str, offset: u64, size: u64) -> FioLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU32::new(0));
        let (uri, stop2, done2) = (uri.to_owned(), stop.clone(), done.clone());
        let task = tokio::spawn(async move {
            let mut s = FioSummary::default();
            while !stop2.load(Ordering::Relaxed) && s.failures.is_empty() {
                s.runs += 1;
                if let Err(e) = fio_run(&uri, offset, size, s.runs).await {
                    s.failures.push(format!("fio run {}: {e}", s.runs));
                }
                done2.fetch_add(1, Ordering::Relaxed);
            }
            s
        });
        FioLoop { stop, done, task }
    }

    /// Runs finished so far.
    pub fn finished(&self) -> u32 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `n` more runs than now have finished (so some I/O surely happened).
    pub async fn wait_runs(&self, n: u32, timeout: Duration) {
        let target = self.finished() + n;
        tools::wait_for(&format!("{n} more fio runs"), timeout, || async {
            let f = self.finished();
            if f >= target || self.task.is_finished() {
                Ok(())
            } else {
                Err(format!("{f} of {target} runs finished"))
            }
        })
        .await
    }

    /// Lets the current run finish and returns what all runs saw.
    pub async fn stop(self) -> FioSummary {
        self.stop.store(true, Ordering::Relaxed);
        match tokio::time::timeout(Duration::from_secs(300), self.task).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("the fio loop panicked: {e}"),
            Err(_) => panic!("the fio loop did not stop within 300s"),
        }
    }

    /// Stops and panics unless every run succeeded; returns how many ran.
    pub async fn stop_ok(self, what: &str) -> u32 {
        let s = self.stop().await;
        assert!(s.failures.is_empty(), "{what}: fio saw errors:\n{}", s.failures.join("\n\n"));
        s.runs
    }
}

async fn fio_run(uri: &str, offset: u64, size: u64, run: u32) -> Result<(), String> {
    let args = [
        "--name=verify".to_owned(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=16".into(),
        format!("--offset={offset}"),
        format!("--size={size}"),
        format!("--randseed={}", 1000 + run),
        "--verify=crc32c".into(),
        "--do_verify=1".into(),
        "--verify_fatal=1".into(),
        "--verify_state_save=0".into(),
        "--output-format=json".into(),
    ];
    let cmd = tools::command_line("fio", &args);
    let out = tools::run("fio", &args, Duration::from_secs(300)).await?;
    let text = stdout(&out);
    let json: Option<serde_json::Value> =
        text.find('{').and_then(|i| serde_json::from_str(&text[i..]).ok());
    let job_error = json.as_ref().and_then(|j| j["jobs"][0]["error"].as_i64());
    if out.status.success() && job_error == Some(0) {
        Ok(())
    } else {
        Err(describe_output(&cmd, &out))
    }
}

/// How a [`CheckerLoop`] ended.
#[derive(Debug, Clone, Default)]
pub struct CheckerSummary {
    pub rounds: u32,
    pub writes_acked: u64,
    pub flushes: u64,
    /// Why it stopped early: a lost connection or an I/O error (`None`: stopped on request).
    pub ended_by: Option<String>,
}

/// The checker's write mode in 2-second rounds against one log.
pub struct CheckerLoop {
    stop: Arc<AtomicBool>,
    flushes: Arc<AtomicU32>,
    task: JoinHandle<CheckerSummary>,
    log: PathBuf,
}

impl CheckerLoop {
    /// Writes tagged blocks to the first `blocks` 4 KiB blocks of `uri`, flushing every 50 ms,
    /// logging to `log` (appended to if it exists).
    pub fn start(uri: &str, log: &Path, blocks: u64) -> CheckerLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let flushes = Arc::new(AtomicU32::new(0));
        let opts = checker::WriteOptions {
            uri: uri.to_owned(),
            log: log.to_owned(),
            seconds: 2,
            flush_every: Duration::from_millis(50),
            block_size: 4096,
            blocks: Some(blocks),
            depth: 16,
            fua_percent: 10,
        };
        let (stop2, flushes2) = (stop.clone(), flushes.clone());
        let task = tokio::spawn(async move {
            let mut s = CheckerSummary::default();
            while !stop2.load(Ordering::Relaxed) {
                s.rounds += 1;
                match checker::write(&opts).await {
                    Ok(r) => {
                        s.writes_acked += r.writes_acked;
                        s.flushes += r.flushes_recorded;
                        flushes2.fetch_add(r.flushes_recorded as u32, Ordering::Relaxed);
                        if let Some(why) = r.connection_lost {
                            s.ended_by = Some(format!("connection lost: {why}"));
                            break;
                        }
                    }
                    Err(e) => {
                        s.ended_by = Some(format!("error: {e}"));
                        break;
                    }
                }
            }
            s
        });
        CheckerLoop { stop, flushes, task, log: log.to_owned() }
    }

    /// Waits until `n` more flushes than now are recorded.
    pub async fn wait_flushes(&self, n: u32, timeout: Duration) {
        let target = self.flushes.load(Ordering::Relaxed) + n;
        tools::wait_for(&format!("{n} more recorded flushes"), timeout, || async {
            let f = self.flushes.load(Ordering::Relaxed);
            if f >= target {
                Ok(())
            } else if self.task.is_finished() {
                Err(format!("the checker stopped after {f} flushes (wanted {target})"))
            } else {
                Err(format!("{f} of {target} flushes"))
            }
        })
        .await
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Asks it to stop after the current round and returns the summary.
    pub async fn stop(self) -> CheckerSummary {
        self.stop.store(true, Ordering::Relaxed);
        match tokio::time::timeout(Duration::from_secs(180), self.task).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("the checker loop panicked: {e}"),
            Err(_) => panic!("the checker loop did not stop within 180s"),
        }
    }

    /// Waits (bounded) for it to end by itself: a fault broke its connection.
    pub async fn wait_ended(self, timeout: Duration) -> CheckerSummary {
        match tokio::time::timeout(timeout, self.task).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("the checker loop panicked: {e}"),
            Err(_) => panic!("the checker did not notice the fault within {timeout:?}"),
        }
    }
}

/// Runs the checker's verify against `uri` and panics with its findings unless nothing
/// acknowledged-and-flushed was lost and nothing is corrupt. Returns the summary line.
pub async fn checker_verify(uri: &str, log: &Path) -> String {
    let report =
        match tokio::time::timeout(Duration::from_secs(300), checker::verify(uri, log)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("checker verify against {uri} failed to run: {e}"),
            Err(_) => panic!("checker verify against {uri} took more than 300s"),
        };
    if !report.findings.is_empty() {
        let shown: Vec<String> = report.findings.iter().take(30).map(|f| f.to_string()).collect();
        panic!("checker verify: {}\n{}", report.summary(), shown.join("\n"));
    }
    assert!(report.covered > 0, "checker verify covered nothing: {}", report.summary());
    report.summary()
}

/// Reads every replica of `volume` through its read-only share, 1 MiB at a time, and panics
/// naming the MiB ranges where any two differ. Returns the number of replicas compared.
pub async fn compare_replicas(h: &Hosts, volume: &str) -> usize {
    let v = h.volume(volume).await;
    let mut clients = Vec::new();
    for r in &v.status.replicas {
        let uri = h.replica_uri(r);
        let opts = ClientOptions { io_timeout: Duration::from_secs(60), ..Default::default() };
        let c = tools::wait_for(&format!("replica share {uri}"), Duration::from_secs(60), || {
            let (uri, opts) = (uri.clone(), opts.clone());
            async move { Client::connect_uri(&uri, opts).await.map_err(|e| e.to_string()) }
        })
        .await;
        clients.push((r.node.to_string(), c));
    }
    assert!(clients.len() >= 2, "volume {volume} has {} replicas to compare", clients.len());
    let size = v.spec.size.bytes();
    for (node, c) in &clients {
        assert_eq!(c.size(), size, "the replica on {node} has size {}, want {size}", c.size());
    }
    const CHUNK: u64 = 1 << 20;
    let mut differ: Vec<u64> = Vec::new();
    let mut off = 0;
    while off < size {
        let len = CHUNK.min(size - off) as u32;
        let reads = futures::future::join_all(clients.iter().map(|(_, c)| c.read(off, len))).await;
        let mut bufs = Vec::new();
        for ((node, _), r) in clients.iter().zip(reads) {
            bufs.push(r.unwrap_or_else(|e| panic!("read the replica on {node} at {off}: {e}")));
        }
        if bufs.iter().any(|b| b[..] != bufs[0][..]) {
            differ.push(off / CHUNK);
        }
        off += u64::from(len);
    }
    for (_, c) in &clients {
        c.disconnect().await.ok();
    }
    assert!(
        differ.is_empty(),
        "the replicas of {volume} differ in {} MiB: {:?}{}",
        differ.len(),
        &differ[..differ.len().min(40)],
        if differ.len() > 40 { " …" } else { "" }
    );
    clients.len()
}
