//! `DIR/up.json`: what the running `up` started, for tests, scripts and the CLI. It is rewritten
//! (atomically, by rename) whenever a child starts or restarts, and removed when `up` stops, so
//! a file that exists describes a live cluster unless `up` itself was killed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The format version of `up.json`.
pub const STATE_VERSION: u32 = 1;

/// The contents of `up.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpState {
    pub version: u32,
    /// The `trireme up` process.
    pub pid: u32,
    pub data_dir: PathBuf,
    /// The REST API (and GUI) URL.
    pub api_url: String,
    pub admin_token: PathBuf,
    pub viewer_token: PathBuf,
    pub logs_dir: PathBuf,
    /// True once control is ready, every node is online and every pool exists.
    pub ready: bool,
    pub control: ControlState,
    pub nodes: Vec<NodeState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    /// The current process, if running.
    pub pid: Option<u32>,
    pub api: SocketAddr,
    pub grpc: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// How many times it was restarted after exiting unexpectedly.
    pub restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// `node-<i>`.
    pub name: String,
    pub pid: Option<u32>,
    pub grpc: SocketAddr,
    pub nbd: SocketAddr,
    /// The engine's Prometheus `/metrics` (NBD and pool disk latencies, rebuilds); absent in
    /// an `up.json` written before engines had one under `up`.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    pub state_dir: PathBuf,
    /// `pool-<i>`.
    pub pool: String,
    pub pool_disk: PathBuf,
    pub log: PathBuf,
    pub restarts: u32,
}

impl UpState {
    /// Reads `up.json` from `path`.
    pub fn read(path: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Writes to a temporary file and renames it over `path`, so readers never see half a file.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let mut bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)
    }

    /// Records the pid of a (re)started child; `restarted` counts unexpected exits.
    pub(crate) fn set_pid(&mut self, child: &str, pid: Option<u32>, restarted: bool) {
        if child == "control" {
            self.control.pid = pid;
            self.control.restarts += u32::from(restarted);
        } else if let Some(n) = self.nodes.iter_mut().find(|n| n.name == child) {
            n.pid = pid;
            n.restarts += u32::from(restarted);
        }
    }
}

/// Writes every new version of the state to `path` until cancelled. Only this task writes the
/// file, so versions land in order.
pub(crate) async fn write_on_change(
    mut rx: watch::Receiver<UpState>,
    path: PathBuf,
    shutdown: CancellationToken,
) {
    loop {
        let snapshot = rx.borrow_and_update().clone();
        let p = path.clone();
        let written = tokio::task::spawn_blocking(move || snapshot.write(&p)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot write up.json")
            }
            Err(e) => tracing::warn!(error = %e, "up.json writer task failed"),
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> UpState {
        UpState {
            version: STATE_VERSION,
            pid: 42,
            data_dir: "/d".into(),
            api_url: "http://127.0.0.1:7480".into(),
            admin_token: "/d/control/admin.token".into(),
            viewer_token: "/d/control/viewer.token".into(),
            logs_dir: "/d/logs".into(),
            ready: false,
            control: ControlState {
                pid: Some(43),
                api: "127.0.0.1:7480".parse().unwrap(),
                grpc: "127.0.0.1:7481".parse().unwrap(),
                data_dir: "/d/control".into(),
                log: "/d/logs/control.log".into(),
                restarts: 0,
            },
            nodes: vec![NodeState {
                name: "node-1".into(),
                pid: None,
                grpc: "127.0.0.1:7492".parse().unwrap(),
                nbd: "127.0.0.1:7493".parse().unwrap(),
                metrics: Some("127.0.0.1:7495".parse().unwrap()),
                state_dir: "/d/node-1".into(),
                pool: "pool-1".into(),
                pool_disk: "/d/node-1/pool.img".into(),
                log: "/d/logs/node-1.log".into(),
                restarts: 0,
            }],
        }
    }

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.json");
        let s = sample();
        s.write(&path).unwrap();
        assert_eq!(UpState::read(&path).unwrap(), s);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["nodes"][0]["nbd"], "127.0.0.1:7493");
        assert_eq!(v["api_url"], "http://127.0.0.1:7480");
    }

    /// The CLI still finds the API through an up.json written before engines had metrics.
    #[test]
    fn an_older_file_without_metrics_still_reads() {
        let mut json = serde_json::to_value(sample()).unwrap();
        json["nodes"][0].as_object_mut().unwrap().remove("metrics");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.json");
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        let read = UpState::read(&path).unwrap();
        assert_eq!(read.nodes[0].metrics, None);
        assert_eq!(read.api_url, sample().api_url);
    }

    #[test]
    fn pids_and_restarts_are_recorded() {
        let mut s = sample();
        s.set_pid("node-1", Some(7), false);
        s.set_pid("node-1", Some(8), true);
        s.set_pid("control", Some(9), true);
        s.set_pid("node-9", Some(1), true);
        assert_eq!((s.nodes[0].pid, s.nodes[0].restarts), (Some(8), 1));
        assert_eq!((s.control.pid, s.control.restarts), (Some(9), 1));
    }

    #[tokio::test]
    async fn writer_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.json");
        let (tx, rx) = watch::channel(sample());
        let stop = CancellationToken::new();
        let task = tokio::spawn(write_on_change(rx, path.clone(), stop.clone()));
        tx.send_modify(|s| s.ready = true);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while !UpState::read(&path).map(|s| s.ready).unwrap_or(false) {
            assert!(tokio::time::Instant::now() < deadline, "up.json never became ready");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        stop.cancel();
        task.await.unwrap();
    }
}
