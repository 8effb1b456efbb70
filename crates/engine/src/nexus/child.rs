//! A nexus's view of one replica. The nexus only sees the [`Child`] trait; each kind of child
//! implements it: [`LocalChild`] (a replica in one of this engine's pools) here, and
//! `RemoteChild` (a replica on another engine, over NBD) in `remote.rs`.
//!
//! Both are bound to the epoch of the nexus that opened them: every request is admitted by the
//! replica's fence (see `crate::fence`), so a nexus superseded by a newer one gets
//! [`ChildError::Fenced`] from its very next request, whichever path it reaches the replica by.

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use std::sync::Arc;
use trireme_iobuf::IoBuf;

use trireme_pool::{PoolError, Replica};
use trireme_types::{FaultReason, ReplicaId};

use crate::fence::{Admitted, Fence, FenceError};

/// Where a child lives, parsed from its URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChildUri {
    /// `replica:///<uuid>`: a replica in one of this engine's pools.
    Local(ReplicaId),
    /// `nbd://host:port/<export>`: a replica shared by another engine.
    Nbd { authority: String, export: String },
}

/// Why a string is not a child URI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{uri:?} is not a child URI (expected replica:///<uuid> or nbd://host:port/<export>): {reason}"
)]
pub struct ChildUriError {
    pub uri: String,
    pub reason: &'static str,
}

impl FromStr for ChildUri {
    type Err = ChildUriError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let bad = |reason| ChildUriError { uri: uri.to_owned(), reason };
        if let Some(rest) = uri.strip_prefix("replica:///") {
            let id = rest.parse().map_err(|_| bad("the path is not a replica UUID"))?;
            return Ok(Self::Local(id));
        }
        if let Some(rest) = uri.strip_prefix("nbd://") {
            let (authority, export) = rest.split_once('/').ok_or_else(|| bad("no export name"))?;
            if authority.is_empty() || export.is_empty() {
                return Err(bad("empty host or export name"));
            }
            return Ok(Self::Nbd { authority: authority.to_owned(), export: export.to_owned() });
        }
        Err(bad("unknown scheme"))
    }
}

impl fmt::Display for ChildUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(id) => write!(f, "replica:///{id}"),
            Self::Nbd { authority, export } => write!(f, "nbd://{authority}/{export}"),
        }
    }
}

/// An I/O failure of one child. The nexus decides what it means (fault the child, or hand the
/// error to the client when no other copy is left).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChildError {
    #[error("I/O error: {0}")]
    Io(String),
    #[error("no space left in the child's pool")]
    NoSpace,
    #[error("the replica no longer exists")]
    Gone,
    #[error("the child did not answer in time")]
    Timeout,
    #[error("the connection to the child was lost")]
    Disconnected,
    /// The replica was claimed by a newer nexus of its volume (a higher epoch): the nexus that
    /// sees this is stale and must stop serving; the child itself is fine.
    #[error("fenced: the replica belongs to a newer nexus ({0})")]
    Fenced(String),
}

impl ChildError {
    /// The fault reason recorded when this error faults a child.
    pub fn fault_reason(&self) -> FaultReason {
        match self {
            Self::Io(_) | Self::NoSpace => FaultReason::IoError,
            Self::Gone => FaultReason::Missing,
            Self::Timeout => FaultReason::Timeout,
            Self::Disconnected | Self::Fenced(_) => FaultReason::Disconnected,
        }
    }
}

impl From<FenceError> for ChildError {
    fn from(e: FenceError) -> Self {
        match e {
            FenceError::Stale { .. } => Self::Fenced(e.to_string()),
            FenceError::Persist { .. } | FenceError::Draining { .. } => Self::Io(e.to_string()),
        }
    }
}

impl From<PoolError> for ChildError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::NoSpace { .. } => Self::NoSpace,
            PoolError::NotFound(_) | PoolError::Destroyed(_) | PoolError::Closed => Self::Gone,
            other => Self::Io(other.to_string()),
        }
    }
}

/// One run of a child's allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildExtent {
    pub offset: u64,
    pub length: u64,
    pub allocated: bool,
}

/// The I/O a nexus needs from one replica. Buffers are owned so they pass through untouched.
#[async_trait]
pub trait Child: Send + Sync + 'static {
    fn uri(&self) -> &ChildUri;
    fn replica_id(&self) -> ReplicaId;
    /// Current size in bytes (grows when the replica is resized).
    fn size(&self) -> u64;
    async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, ChildError>;
    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), ChildError>;
    async fn flush(&self) -> Result<(), ChildError>;
    async fn trim(&self, offset: u64, len: u64) -> Result<(), ChildError>;
    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), ChildError>;
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<ChildExtent>, ChildError>;
}

/// A replica in one of this engine's pools, reached directly through the pool library, on
/// behalf of the nexus of one epoch.
pub struct LocalChild {
    uri: ChildUri,
    replica: Replica,
    fence: Arc<Fence>,
    epoch: u64,
}

impl LocalChild {
    /// A child for the nexus of `epoch`; the caller has claimed the replica for `epoch`
    /// already (requests claim it too, so a missing claim costs only latency, never safety).
    pub fn new(replica: Replica, fence: Arc<Fence>, epoch: u64) -> Self {
        Self { uri: ChildUri::Local(replica.id()), replica, fence, epoch }
    }

    /// The replica, once the fence admits this child's epoch; keep the guard for the request.
    async fn admitted(&self) -> Result<(Admitted<'_>, &Replica), ChildError> {
        let guard = self.fence.admit(self.epoch).await?;
        Ok((guard, &self.replica))
    }
}

#[async_trait]
impl Child for LocalChild {
    fn uri(&self) -> &ChildUri {
        &self.uri
    }
    fn replica_id(&self) -> ReplicaId {
        self.replica.id()
    }
    fn size(&self) -> u64 {
        self.replica.size()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, ChildError> {
        let (_admitted, r) = self.admitted().await?;
        Ok(r.read(offset, len).await?)
    }
    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), ChildError> {
        let (_admitted, r) = self.admitted().await?;
        Ok(r.write(offset, data, fua).await?)
    }
    async fn flush(&self) -> Result<(), ChildError> {
        let (_admitted, r) = self.admitted().await?;
        Ok(r.flush().await?)
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), ChildError> {
        let (_admitted, r) = self.admitted().await?;
        Ok(r.trim(offset, len).await?)
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), ChildError> {
        let (_admitted, r) = self.admitted().await?;
        Ok(r.write_zeroes(offset, len, may_trim).await?)
    }
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<ChildExtent>, ChildError> {
        let (_admitted, r) = self.admitted().await?;
        let map = r.allocation(offset, len).await?;
        Ok(map
            .into_iter()
            .map(|a| ChildExtent { offset: a.offset, length: a.length, allocated: a.allocated })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_print() {
        let id = ReplicaId::new_random();
        let local: ChildUri = format!("replica:///{id}").parse().unwrap();
        assert_eq!(local, ChildUri::Local(id));
        assert_eq!(local.to_string(), format!("replica:///{id}"));
        let nbd: ChildUri = "nbd://10.0.0.2:10809/replica-x".parse().unwrap();
        assert_eq!(nbd.to_string(), "nbd://10.0.0.2:10809/replica-x");
        for bad in
            ["", "replica:///nope", "replica://host/x", "nbd://host", "nbd:///x", "file:///a"]
        {
            assert!(bad.parse::<ChildUri>().is_err(), "{bad} should not parse");
        }
    }
}
