//! The node plugin's errors, and the one place they become gRPC statuses.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub(crate) enum NodeError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {secs} s")]
    Timeout { command: String, secs: u64 },
    #[error("`{command}` failed (exit {code:?}): {stderr}")]
    Command { command: String, code: Option<i32>, stderr: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state record {path} is corrupt: {source}")]
    Record {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("path {0:?} is not valid UTF-8")]
    BadPath(String),
    #[error("nbdfuse for {uri} did not come up within {secs} s: {log}")]
    FuseNotReady { uri: String, secs: u64, log: String },
    #[error("NBD URI {0:?} is not nbd://host[:port]/export")]
    BadUri(String),
    #[error("no free /dev/nbd device")]
    NoNbdDevice,
}

impl NodeError {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io { path: path.as_ref().display().to_string(), source }
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        match &e {
            NodeError::Timeout { .. } => Status::deadline_exceeded(e.to_string()),
            NodeError::BadUri(_) | NodeError::BadPath(_) => Status::invalid_argument(e.to_string()),
            NodeError::FuseNotReady { .. } => Status::unavailable(e.to_string()),
            NodeError::NoNbdDevice => Status::resource_exhausted(e.to_string()),
            _ => Status::internal(e.to_string()),
        }
    }
}
