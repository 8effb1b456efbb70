//! The node plugin's record of what it attached, one JSON file per volume, written atomically
//! (write a temporary file, fsync, rename, fsync the directory) before and after each step.
//!
//! ```text
//!  <state-dir>/volumes/<volume id>.json   the stage record (below)
//!  <state-dir>/fuse/<volume id>/nbd       the nbdfuse file the loop device is backed by
//!  <state-dir>/fuse/<volume id>.pid       nbdfuse's pid (written by nbdfuse when ready)
//!  <state-dir>/fuse/<volume id>.log       nbdfuse's stderr
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::NodeError;

pub(crate) const RECORD_VERSION: u32 = 1;

/// How a volume is attached to this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Attachment {
    /// nbdfuse exposes the volume as a file; a loop device makes it a block device.
    Fuse { loop_device: Option<PathBuf> },
    /// The kernel's NBD client on a /dev/nbdN device.
    Kernel { device: PathBuf },
}

/// What NodeStageVolume was asked for and how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StageRecord {
    pub version: u32,
    pub volume_id: String,
    pub uri: String,
    pub staging_path: PathBuf,
    pub block: bool,
    pub fs_type: Option<String>,
    pub mount_flags: Vec<String>,
    /// Set as soon as an attach is started, so a crash mid-attach is cleaned up by unstage.
    pub attachment: Option<Attachment>,
    /// Every step done: the volume is staged.
    pub staged: bool,
}

/// The state directory.
#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub(crate) fn open(root: &Path) -> Result<Self, NodeError> {
        for sub in ["volumes", "fuse"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(|e| NodeError::io(&dir, e))?;
        }
        Ok(Self { root: root.to_owned() })
    }

    fn record_path(&self, volume_id: &str) -> PathBuf {
        self.root.join("volumes").join(format!("{volume_id}.json"))
    }

    pub(crate) fn fuse_dir(&self, volume_id: &str) -> PathBuf {
        self.root.join("fuse").join(volume_id)
    }

    pub(crate) fn fuse_file(&self, volume_id: &str) -> PathBuf {
        self.fuse_dir(volume_id).join("nbd")
    }

    pub(crate) fn fuse_pidfile(&self, volume_id: &str) -> PathBuf {
        self.root.join("fuse").join(format!("{volume_id}.pid"))
    }

    pub(crate) fn fuse_log(&self, volume_id: &str) -> PathBuf {
        self.root.join("fuse").join(format!("{volume_id}.log"))
    }

    pub(crate) fn load(&self, volume_id: &str) -> Result<Option<StageRecord>, NodeError> {
        let path = self.record_path(volume_id);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| NodeError::Record { path: path.display().to_string(), source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(NodeError::io(&path, e)),
        }
    }

    pub(crate) fn save(&self, record: &StageRecord) -> Result<(), NodeError> {
        let path = self.record_path(&record.volume_id);
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|source| NodeError::Record { path: path.display().to_string(), source })?;
        write_atomic(&path, &bytes)
    }

    pub(crate) fn remove(&self, volume_id: &str) -> Result<(), NodeError> {
        let path = self.record_path(volume_id);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(NodeError::io(&path, e)),
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), NodeError> {
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| NodeError::io(&tmp, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| NodeError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| NodeError::io(path, e))?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> Result<(), NodeError> {
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| NodeError::io(dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert_eq!(state.load("v1").unwrap(), None);
        let rec = StageRecord {
            version: RECORD_VERSION,
            volume_id: "v1".into(),
            uri: "nbd://h:1/v1".into(),
            staging_path: "/s".into(),
            block: false,
            fs_type: Some("ext4".into()),
            mount_flags: vec![],
            attachment: Some(Attachment::Fuse { loop_device: Some("/dev/loop3".into()) }),
            staged: true,
        };
        state.save(&rec).unwrap();
        assert_eq!(state.load("v1").unwrap(), Some(rec.clone()));
        state.remove("v1").unwrap();
        state.remove("v1").unwrap();
        assert_eq!(state.load("v1").unwrap(), None);
    }
}
