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
        "{what} address {addr} is already in use (is another trireme running?); \
         pick another --api port"
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
    #[error("control did not become ready within {}s; see {log}", .after.as_secs())]
    ControlNotReady { after: Duration, log: PathBuf },
    #[error("control did not write its admin token to {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{node} did not come online within {}s; see {log}", .after.as_secs())]
    NodeNotOnline { node: String, after: Duration, log: PathBuf },
    #[error("pool {pool} could not be created on {node}: {reason}")]
    Pool { pool: String, node: String, reason: String },
    #[error("pool {pool} did not come online within {}s ({reason}); see {log}", .after.as_secs())]
    PoolNotOnline { pool: String, reason: String, after: Duration, log: PathBuf },
    #[error("cannot talk to control: {0}")]
    Client(#[from] trireme_api::ClientError),
}
