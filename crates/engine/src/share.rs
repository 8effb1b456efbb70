//! Shares: what this engine's NBD server exports, by name.
//!
//! ```text
//!   "<volume uuid>"            -> the volume's Nexus                 (applications connect here)
//!   "replica-<uuid>@<epoch>"   -> one replica, claimed by that epoch (remote nexuses connect here)
//!   "replica-<uuid>"           -> one replica, read-only             (tools, debugging)
//! ```
//!
//! One NBD server serves them all; the handshake looks names up in [`Shares`]. Replica shares
//! are not stored per name: a lookup of `replica-<uuid>@<epoch>` builds a share bound to that
//! epoch over the replica and its [`Fence`]. Every request through it is admitted by the fence
//! (see `fence.rs`): the first request of a new epoch claims the replica and waits until the
//! claim is durable; a request of an epoch that is no longer the fence is refused with
//! `EPERM` ([`ExportError::ReadOnly`]), which the remote nexus reads as "fenced". The looking
//! up itself changes nothing, so the handshake can stay synchronous.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;
use trireme_iobuf::IoBuf;
use trireme_nbd::{Capabilities, Export, ExportError, ExportRegistry, Extent};
use trireme_pool::{Pool, PoolError, Replica};
use trireme_types::{ReplicaId, VolumeId};

use crate::fence::{Admitted, Fence, FenceError};

const REPLICA_PREFIX: &str = "replica-";

/// The export name of a replica's read-only share.
pub fn replica_export_name(id: ReplicaId) -> String {
    format!("{REPLICA_PREFIX}{id}")
}

/// The export name under which a nexus of `epoch` reaches a replica.
pub fn replica_epoch_export_name(id: ReplicaId, epoch: u64) -> String {
    format!("{REPLICA_PREFIX}{id}@{epoch}")
}

/// The export name of a volume's nexus.
pub fn nexus_export_name(id: VolumeId) -> String {
    id.to_string()
}

/// A replica export name split into its replica and epoch (`None`: the read-only share).
fn parse_replica_name(name: &str) -> Option<(ReplicaId, Option<u64>)> {
    let rest = name.strip_prefix(REPLICA_PREFIX)?;
    match rest.split_once('@') {
        None => Some((rest.parse().ok()?, None)),
        Some((id, epoch)) => Some((id.parse().ok()?, Some(epoch.parse().ok()?))),
    }
}

struct Share {
    export: Arc<dyn Export>,
    description: String,
}

/// A shared replica: its handle and its fence.
#[derive(Clone)]
pub struct SharedReplica {
    pub replica: Replica,
    pub fence: Arc<Fence>,
}

/// The exports of this engine, looked up by the NBD handshake.
#[derive(Default)]
pub struct Shares {
    by_name: RwLock<BTreeMap<String, Share>>,
    replicas: RwLock<BTreeMap<ReplicaId, SharedReplica>>,
}

impl Shares {
    pub fn insert(&self, name: String, description: String, export: Arc<dyn Export>) {
        self.by_name.write().insert(name, Share { export, description });
    }

    pub fn remove(&self, name: &str) {
        self.by_name.write().remove(name);
    }

    /// Shares a replica of `pool`. Idempotent: a replica shared already keeps its fence (raised
    /// to what the pool's meta holds, should that be higher).
    pub fn share_replica(&self, replica: Replica, pool: &Arc<Pool>) {
        let id = replica.id();
        let persisted = pool.replica_info(id).map(|i| i.meta.epoch).unwrap_or(0);
        let mut replicas = self.replicas.write();
        let fence = match replicas.get(&id) {
            Some(existing) if existing.fence.is_in(pool) => {
                existing.fence.observe_persisted(persisted);
                Arc::clone(&existing.fence)
            }
            // The pool was imported again after it stopped: persist into the new instance.
            Some(existing) => Arc::new(existing.fence.reimported(Arc::clone(pool), persisted)),
            None => Arc::new(Fence::new(id, Arc::clone(pool), persisted)),
        };
        replicas.insert(id, SharedReplica { replica, fence });
    }

    /// Stops sharing a replica; returns what was shared, so a failed destroy can put it back.
    pub fn unshare_replica(&self, id: ReplicaId) -> Option<SharedReplica> {
        self.replicas.write().remove(&id)
    }

    /// Shares a replica again after a failed destroy, with its fence unchanged.
    pub fn reshare_replica(&self, shared: SharedReplica) {
        self.replicas.write().entry(shared.replica.id()).or_insert(shared);
    }

    /// The replica's handle and fence, if it is shared here.
    pub fn replica(&self, id: ReplicaId) -> Option<SharedReplica> {
        self.replicas.read().get(&id).cloned()
    }

    /// The fence of a shared replica.
    pub fn fence(&self, id: ReplicaId) -> Option<Arc<Fence>> {
        self.replicas.read().get(&id).map(|s| Arc::clone(&s.fence))
    }
}

impl ExportRegistry for Shares {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        if let Some((id, epoch)) = parse_replica_name(name) {
            let shared = self.replica(id)?;
            return Some(match epoch {
                Some(epoch) => Arc::new(EpochShare { shared, epoch }),
                None => Arc::new(ReadOnlyShare(shared.replica)),
            });
        }
        self.by_name.read().get(name).map(|s| Arc::clone(&s.export))
    }

    fn list(&self) -> Vec<(String, String)> {
        let mut list: Vec<_> =
            self.by_name.read().iter().map(|(n, s)| (n.clone(), s.description.clone())).collect();
        list.extend(
            self.replicas
                .read()
                .keys()
                .map(|id| (replica_export_name(*id), format!("replica {id} (read-only)"))),
        );
        list
    }
}

fn export_error(e: PoolError) -> ExportError {
    match e {
        PoolError::NoSpace { .. } => ExportError::NoSpace,
        PoolError::Closed => ExportError::ShuttingDown,
        PoolError::OutOfRange { .. } | PoolError::InvalidArgument(_) => {
            ExportError::Invalid(e.to_string())
        }
        other => ExportError::Io(other.to_string()),
    }
}

/// The one mapping of fence refusals to the wire: a stale epoch is `EPERM` (the remote nexus
/// reads it as "fenced"); a claim that could not be persisted is an ordinary I/O error.
fn fence_error(e: FenceError) -> ExportError {
    match e {
        FenceError::Stale { replica, epoch, fence } => {
            tracing::debug!(%replica, epoch, fence, "request of a stale epoch refused");
            ExportError::ReadOnly
        }
        FenceError::Persist { .. } | FenceError::Draining { .. } => ExportError::Io(e.to_string()),
    }
}

async fn block_status(
    replica: &Replica,
    offset: u64,
    len: u64,
) -> Result<Vec<Extent>, ExportError> {
    let runs = replica.allocation(offset, len).await.map_err(export_error)?;
    let runs: Vec<_> = runs
        .into_iter()
        .map(|a| crate::nexus::ChildExtent {
            offset: a.offset,
            length: a.length,
            allocated: a.allocated,
        })
        .collect();
    Ok(crate::nexus::to_extents(offset, len, &runs))
}

/// A replica served to the remote nexus of one epoch; every request is admitted by the fence.
struct EpochShare {
    shared: SharedReplica,
    epoch: u64,
}

impl EpochShare {
    /// The replica, once the fence admits this share's epoch; keep the guard for the request.
    async fn admit(&self) -> Result<(Admitted<'_>, &Replica), ExportError> {
        let guard = self.shared.fence.admit(self.epoch).await.map_err(fence_error)?;
        Ok((guard, &self.shared.replica))
    }
}

#[async_trait]
impl Export for EpochShare {
    fn size(&self) -> u64 {
        self.shared.replica.size()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, ExportError> {
        let (_admitted, r) = self.admit().await?;
        r.read(offset, len).await.map_err(export_error)
    }
    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), ExportError> {
        let (_admitted, r) = self.admit().await?;
        r.write(offset, data, fua).await.map_err(export_error)
    }
    async fn flush(&self) -> Result<(), ExportError> {
        let (_admitted, r) = self.admit().await?;
        r.flush().await.map_err(export_error)
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        let (_admitted, r) = self.admit().await?;
        r.trim(offset, len).await.map_err(export_error)?;
        if fua {
            r.flush().await.map_err(export_error)?;
        }
        Ok(())
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), ExportError> {
        let (_admitted, r) = self.admit().await?;
        r.write_zeroes(offset, len, may_trim).await.map_err(export_error)?;
        if fua {
            r.flush().await.map_err(export_error)?;
        }
        Ok(())
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        let (_admitted, r) = self.admit().await?;
        block_status(r, offset, len).await
    }
}

/// A replica served read-only, outside any epoch: for inspection, never for a nexus.
struct ReadOnlyShare(Replica);

#[async_trait]
impl Export for ReadOnlyShare {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: true,
            flush: false,
            fua: false,
            trim: false,
            write_zeroes: false,
            ..Capabilities::ALL
        }
    }
    async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, ExportError> {
        self.0.read(offset, len).await.map_err(export_error)
    }
    async fn write(&self, _: u64, _: IoBuf, _: bool) -> Result<(), ExportError> {
        Err(ExportError::ReadOnly)
    }
    async fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }
    async fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), ExportError> {
        Err(ExportError::ReadOnly)
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<(), ExportError> {
        Err(ExportError::ReadOnly)
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        block_status(&self.0, offset, len).await
    }
}

/// Serves every share over NBD on `listener` until `shutdown`.
pub(crate) async fn serve_nbd(
    listener: tokio::net::TcpListener,
    shares: Arc<Shares>,
    stats: Arc<trireme_nbd::ServerStats>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let config = trireme_nbd::ServerConfig { stats, ..Default::default() };
    trireme_nbd::serve_tcp(listener, shares, config, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_names_parse() {
        let id = ReplicaId::new_random();
        assert_eq!(parse_replica_name(&replica_export_name(id)), Some((id, None)));
        assert_eq!(parse_replica_name(&replica_epoch_export_name(id, 7)), Some((id, Some(7))));
        assert_eq!(parse_replica_name(&format!("replica-{id}@")), None);
        assert_eq!(parse_replica_name(&format!("replica-{id}@-1")), None);
        assert_eq!(parse_replica_name("replica-nope"), None);
        assert_eq!(parse_replica_name(&id.to_string()), None);
    }
}
