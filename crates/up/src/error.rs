//! Why `trireme up` could not start or keep a cluster running. Each message is one sentence a
//! newcomer can act on.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("no data directory: set --data-dir, TRIREME_DATA_DIR, XDG_DATA_HOME or HOME")]
    NoDataDir,
    #[error("cannot use data directory {dir}: {source}")]
    DataDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another `trireme up` (pid {pid}) is already running with data directory {dir}; \
         stop it first or pick another --data-dir"
    )]
    AlreadyRunning { dir: PathBuf, pid: String },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--api port 0 is not allowed: every other port derives from the API port")]
    ZeroPort,
    #[error(
        "--api port {api} with {nodes} nodes needs ports up to {highest}, past 65535; \
         pick a lower port"
    )]
    PortsOverflow { api: u16, nodes: u16, highest: u32 },
    #[error(
        "{what} address {addr} is already in use: another trireme is running, or the \
         servers of one that was killed are still stopping (they exit within seconds); \
         wait, or give another cluster its own --api port and --data-dir"
    )]
    PortInUse { what: String, addr: SocketAddr },
    #[error("cannot listen on {addr} for {what}: {source}")]
    PortUnusable {
        what: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find the trireme executable to start servers with: {0}")]
    NoBinary(#[source] std::io::Error),
    /// A child did not get where startup needs it; `last` is the last line it logged.
    #[error("{child} {problem}; see {log}{}", last_words(.last))]
    Child { child: String, problem: String, log: PathBuf, last: Option<String> },
    #[error("control did not write its admin token to {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pool {pool} could not be created on {node}: {reason}")]
    Pool { pool: String, node: String, reason: String },
    #[error("pool {pool} did not come online within {}s ({reason}); see {log}", .after.as_secs())]
    PoolNotOnline { pool: String, reason: String, after: Duration, log: PathBuf },
    #[error("cannot talk to control: {0}")]
    Client(#[from] trireme_api::ClientError),
}

impl UpError {
    /// A child that did not come up, with the last line of its log, which usually says why.
    pub(crate) fn child(child: &str, problem: String, log: PathBuf) -> Self {
        let last = last_log_line(&log);
        Self::Child { child: child.to_owned(), problem, log, last }
    }
}

fn last_words(last: &Option<String>) -> String {
    last.as_ref().map(|l| format!(" (it last said: {l})")).unwrap_or_default()
}

/// The last line a child wrote, skipping `up`'s own start markers.
fn last_log_line(path: &std::path::Path) -> Option<String> {
    const MAX: usize = 300;
    // The end of the log is enough, and a log of any size or with stray bytes still gives it.
    const TAIL: u64 = 64 << 10;
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(len.saturating_sub(TAIL))).ok()?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let line = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with(crate::supervise::START_MARKER))?;
    let mut line = line.to_owned();
    if line.len() > MAX {
        let cut = (0..=MAX).rev().find(|&i| line.is_char_boundary(i)).unwrap_or(0);
        line.truncate(cut);
        line.push('…');
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_errors_quote_the_last_log_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("control.log");
        std::fs::write(
            &log,
            "==== trireme up: starting control ====\nerror: the store is locked\n\n\
             ==== trireme up: starting control ====\n",
        )
        .unwrap();
        let e = UpError::child("control", "keeps exiting".into(), log.clone());
        assert_eq!(
            e.to_string(),
            format!(
                "control keeps exiting; see {} (it last said: error: the store is locked)",
                log.display()
            )
        );
        let e = UpError::child("node-1", "is slow".into(), dir.path().join("none.log"));
        assert!(e.to_string().ends_with("none.log"), "{e}");
        // A stray byte earlier in the log does not hide its last line.
        std::fs::write(&log, b"\xff\xfe garbage\nerror: cannot listen\n").unwrap();
        assert_eq!(last_log_line(&log).as_deref(), Some("error: cannot listen"));
    }
}
