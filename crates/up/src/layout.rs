//! Where a local cluster keeps everything, under one data directory:
//!
//! ```text
//!   DIR/
//!     up.lock            flock'ed by the running `up` (holds its pid)
//!     up.json            pids, ports and URL of the running cluster (see `UpState`)
//!     control/           control's --data-dir: the store, admin.token, viewer.token
//!     node-1/            engine 1's --state-dir
//!       pool.img         engine 1's file-backed pool `pool-1`
//!     node-2/ …
//!     logs/
//!       control.log      each child's stdout and stderr, appended across restarts
//!       node-1.log …
//! ```

use std::path::{Path, PathBuf};

use trireme_types::ByteSize;

/// The paths of a cluster's data directory. Pure path arithmetic: nothing here touches disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn lock_file(&self) -> PathBuf {
        self.root.join("up.lock")
    }

    pub fn state_file(&self) -> PathBuf {
        self.root.join("up.json")
    }

    pub fn control_dir(&self) -> PathBuf {
        self.root.join("control")
    }

    /// Written by control on its first start; the CLI reads it by default.
    pub fn admin_token(&self) -> PathBuf {
        self.control_dir().join("admin.token")
    }

    pub fn viewer_token(&self) -> PathBuf {
        self.control_dir().join("viewer.token")
    }

    /// How many nodes an earlier run left here: node-1, node-2, … up to the first missing one.
    pub fn existing_nodes(&self) -> u16 {
        (1..=u16::MAX).take_while(|&i| self.node_dir(i).is_dir()).last().unwrap_or(0)
    }

    /// The size of the pool an earlier run made for node-1, if there is one.
    pub fn existing_pool_size(&self) -> Option<ByteSize> {
        std::fs::metadata(self.pool_image(1)).ok().map(|m| ByteSize::b(m.len()))
    }

    pub fn node_dir(&self, index: u16) -> PathBuf {
        self.root.join(node_name(index))
    }

    pub fn pool_image(&self, index: u16) -> PathBuf {
        self.node_dir(index).join("pool.img")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn log_file(&self, child: &str) -> PathBuf {
        self.logs_dir().join(format!("{child}.log"))
    }
}

/// The node id of engine `index` (1-based).
pub fn node_name(index: u16) -> String {
    format!("node-{index}")
}

/// The pool `up` creates on engine `index`.
pub fn pool_name(index: u16) -> String {
    format!("pool-{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let l = Layout::new("/d");
        assert_eq!(l.admin_token(), Path::new("/d/control/admin.token"));
        assert_eq!(l.pool_image(2), Path::new("/d/node-2/pool.img"));
        assert_eq!(l.log_file("node-3"), Path::new("/d/logs/node-3.log"));
        assert_eq!(l.state_file(), Path::new("/d/up.json"));
        assert_eq!(node_name(1), "node-1");
        assert_eq!(pool_name(1), "pool-1");
    }
}
