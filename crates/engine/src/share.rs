//! Shares: what this engine's NBD server exports, by name.
//!
//! ```text
//!   "<volume uuid>"    -> the volume's Nexus           (applications connect here)
//!   "replica-<uuid>"   -> one replica, unmirrored       (other engines' nexuses connect here)
//! ```
//!
//! One NBD server serves them all; the handshake looks names up in [`Shares`].

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;
use trireme_iobuf::IoBuf;
use trireme_nbd::{Export, ExportError, ExportRegistry, Extent};
use trireme_pool::{PoolError, Replica};
use trireme_types::{ReplicaId, VolumeId};

/// The export name of a replica's share.
pub fn replica_export_name(id: ReplicaId) -> String {
    format!("replica-{id}")
}

/// The export name of a volume's nexus.
pub fn nexus_export_name(id: VolumeId) -> String {
    id.to_string()
}

struct Share {
    export: Arc<dyn Export>,
    description: String,
}

/// The exports of this engine, looked up by the NBD handshake.
#[derive(Default)]
pub struct Shares {
    by_name: RwLock<BTreeMap<String, Share>>,
}

impl Shares {
    pub fn insert(&self, name: String, description: String, export: Arc<dyn Export>) {
        self.by_name.write().insert(name, Share { export, description });
    }

    pub fn remove(&self, name: &str) {
        self.by_name.write().remove(name);
    }

    pub fn share_replica(&self, replica: Replica) {
        let id = replica.id();
        self.insert(
            replica_export_name(id),
            format!("replica {id}"),
            Arc::new(ReplicaExport(replica)),
        );
    }
}

impl ExportRegistry for Shares {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.by_name.read().get(name).map(|s| Arc::clone(&s.export))
    }

    fn list(&self) -> Vec<(String, String)> {
        self.by_name.read().iter().map(|(n, s)| (n.clone(), s.description.clone())).collect()
    }
}

/// A replica served as is, for a remote nexus.
struct ReplicaExport(Replica);

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

#[async_trait]
impl Export for ReplicaExport {
    fn size(&self) -> u64 {
        self.0.size()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, ExportError> {
        self.0.read(offset, len).await.map_err(export_error)
    }
    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), ExportError> {
        self.0.write(offset, data, fua).await.map_err(export_error)
    }
    async fn flush(&self) -> Result<(), ExportError> {
        self.0.flush().await.map_err(export_error)
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.0.trim(offset, len).await.map_err(export_error)?;
        if fua {
            self.0.flush().await.map_err(export_error)?;
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
        self.0.write_zeroes(offset, len, may_trim).await.map_err(export_error)?;
        if fua {
            self.0.flush().await.map_err(export_error)?;
        }
        Ok(())
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        let runs = self.0.allocation(offset, len).await.map_err(export_error)?;
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
