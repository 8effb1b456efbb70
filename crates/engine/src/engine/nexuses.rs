//! The engine's nexuses: opening their children (local or remote, each claimed with the
//! nexus's epoch), creating, changing and destroying them.
//!
//! ```text
//!   CreateNexus(epoch E, children + join)
//!     ├─ open every child concurrently: local → claim fence E; remote → "replica-<uuid>@E"
//!     │     fenced by a newer epoch → the whole request is stale (FAILED_PRECONDITION)
//!     │     unreachable            → the child starts faulted with what it needs
//!     ├─ Nexus::create (needs one Online child open) → start() records the membership
//!     └─ share "<volume uuid>"
//! ```
//!
//! Operations on one volume are serialised by a per-volume async lock (opening a remote child
//! takes network time, so a synchronous check-and-insert is not possible); different volumes
//! proceed concurrently.

use std::sync::Arc;

use trireme_nbd::Export;
use trireme_types::{ByteSize, FaultReason, ReplicaId, VolumeId};

use super::Engine;
use crate::error::EngineError;
use crate::nexus::remote::{RemoteChild, remote_replica};
use crate::nexus::{
    Child, ChildError, ChildUri, DirtyLog, Join, LocalChild, NewChild, Nexus, NexusConfig,
};
use crate::share::nexus_export_name;

/// One child of a nexus to create or add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildRequest {
    pub uri: ChildUri,
    pub join: Join,
}

impl ChildRequest {
    /// The replica the child names.
    pub fn replica(&self) -> Result<ReplicaId, EngineError> {
        match &self.uri {
            ChildUri::Local(id) => Ok(*id),
            remote => Ok(remote_replica(remote)?),
        }
    }
}

/// Everything CreateNexus asks for.
#[derive(Debug, Clone)]
pub struct NexusRequest {
    pub volume: VolumeId,
    pub size: ByteSize,
    pub children: Vec<ChildRequest>,
    pub epoch: u64,
    pub generation: u64,
    pub dirty: DirtyLog,
}

/// How opening a child went.
enum Opened {
    Child(Arc<dyn Child>),
    /// Could not be opened now; the nexus lists it faulted for this reason.
    Unavailable(FaultReason, ChildError),
}

impl Engine {
    /// The lock that serialises operations on one volume's nexus.
    fn volume_lock(&self, volume: VolumeId) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(self.nexus_locks.lock().entry(volume).or_default())
    }

    /// Opens one child for the nexus of `epoch`. A child fenced by a newer epoch is an error
    /// (the caller is stale); one that cannot be reached is `Unavailable`.
    async fn open_child(
        &self,
        volume: VolumeId,
        uri: &ChildUri,
        epoch: u64,
    ) -> Result<Opened, EngineError> {
        let result = match uri {
            ChildUri::Local(id) => match self.shares.replica(*id) {
                None => Err(ChildError::Gone),
                Some(shared) => match shared.fence.claim(epoch).await {
                    Ok(()) => {
                        let child = LocalChild::new(shared.replica, shared.fence, epoch);
                        Ok(Arc::new(child) as Arc<dyn Child>)
                    }
                    Err(e) => Err(ChildError::from(e)),
                },
            },
            ChildUri::Nbd { .. } => {
                RemoteChild::open(uri, epoch, self.settings.remote).await.map(|c| {
                    let c = Arc::new(c);
                    self.track_remote(volume, &c);
                    c as Arc<dyn Child>
                })
            }
        };
        match result {
            Ok(child) => Ok(Opened::Child(child)),
            Err(ChildError::Fenced(reason)) => {
                Err(EngineError::Fenced { uri: uri.to_string(), epoch, reason })
            }
            Err(e) => {
                tracing::warn!(child = %uri, epoch, error = %e, "cannot open child");
                Ok(Opened::Unavailable(e.fault_reason(), e))
            }
        }
    }

    /// Creates the volume's nexus, records its membership and shares it. Idempotent: a nexus
    /// of the same epoch with the same children is returned as is (grown to `size` if that is
    /// larger). A nexus of an older epoch is replaced: control superseded it.
    pub async fn create_nexus(&self, req: NexusRequest) -> Result<Arc<Nexus>, EngineError> {
        let volume = req.volume;
        let lock = self.volume_lock(volume);
        let _guard = lock.lock().await;
        if let Some(existing) = self.nexus(volume) {
            if existing.epoch() > req.epoch {
                return Err(EngineError::EpochMismatch {
                    volume,
                    nexus: existing.epoch(),
                    requested: req.epoch,
                });
            }
            if existing.epoch() == req.epoch {
                let have: Vec<ChildUri> = existing.children().into_iter().map(|c| c.uri).collect();
                let same = have.len() == req.children.len()
                    && req.children.iter().all(|c| have.contains(&c.uri));
                // Same children: the same nexus, grown if the volume grew meanwhile (control
                // may reconcile a resized volume through CreateNexus before ResizeNexus).
                if same && existing.size() <= req.size.bytes() {
                    self.refresh_remote_sizes(volume, req.size).await;
                    existing.resize(req.size.bytes())?;
                    return Ok(existing);
                }
                return Err(EngineError::NexusMismatch(volume));
            }
            tracing::info!(%volume, old = existing.epoch(), new = req.epoch,
                "replacing the nexus of an older epoch");
            self.unshare_and_close(volume).await;
        }

        let mut replicas = Vec::with_capacity(req.children.len());
        for c in &req.children {
            replicas.push(c.replica()?);
        }
        let opens = req.children.iter().map(|c| self.open_child(volume, &c.uri, req.epoch));
        let opened = futures::future::join_all(opens).await;
        let mut children = Vec::with_capacity(opened.len());
        for ((spec, replica), opened) in req.children.iter().zip(replicas).zip(opened) {
            children.push(match opened? {
                Opened::Child(child) => NewChild::opened(child, spec.join),
                Opened::Unavailable(reason, _) => {
                    NewChild::unopened(spec.uri.clone(), replica, spec.join, reason)
                }
            });
        }
        let config = NexusConfig {
            epoch: req.epoch,
            generation: req.generation,
            recorder: Arc::clone(&self.settings.recorder),
            dirty: req.dirty,
            rebuild: Arc::clone(&self.settings.rebuild),
        };
        let nexus = Nexus::create(volume, req.size.bytes(), children, config)?;
        if let Err(e) = nexus.start().await {
            if let Err(close) = nexus.close().await {
                tracing::debug!(%volume, error = %close, "closing a nexus that did not start");
            }
            return Err(e.into());
        }
        self.nexuses.lock().insert(volume, Arc::clone(&nexus));
        let export: Arc<dyn Export> = nexus.clone();
        self.shares.insert(nexus_export_name(volume), format!("volume {volume}"), export);
        tracing::info!(%volume, size = %req.size, epoch = req.epoch,
            children = req.children.len(), "nexus created and shared");
        Ok(nexus)
    }

    /// The nexus of `volume`, if its epoch is `epoch`.
    fn nexus_of_epoch(&self, volume: VolumeId, epoch: u64) -> Result<Arc<Nexus>, EngineError> {
        let nexus = self.nexus(volume).ok_or(EngineError::NexusNotFound(volume))?;
        if nexus.epoch() != epoch {
            return Err(EngineError::EpochMismatch {
                volume,
                nexus: nexus.epoch(),
                requested: epoch,
            });
        }
        Ok(nexus)
    }

    /// Adds a child to a running nexus (or re-opens a faulted one) and starts its rebuild;
    /// returns once the change is recorded. Idempotent: a child online or rebuilding is left
    /// as it is.
    pub async fn add_child(
        &self,
        volume: VolumeId,
        epoch: u64,
        child: ChildRequest,
    ) -> Result<Arc<Nexus>, EngineError> {
        let replica = child.replica()?;
        let lock = self.volume_lock(volume);
        let _guard = lock.lock().await;
        let nexus = self.nexus_of_epoch(volume, epoch)?;
        let present = nexus.children().into_iter().any(|c| {
            c.replica == replica && !matches!(c.state, trireme_types::ChildState::Faulted { .. })
        });
        if present {
            return Ok(nexus);
        }
        let opened = match self.open_child(volume, &child.uri, epoch).await? {
            Opened::Child(c) => c,
            Opened::Unavailable(_, error) => {
                return Err(EngineError::ChildUnavailable { uri: child.uri.to_string(), error });
            }
        };
        nexus.add_child(opened, child.join)?;
        nexus.recorded().await?;
        Ok(nexus)
    }

    /// Removes a child from a running nexus; returns once the change is recorded. Idempotent.
    pub async fn remove_child(
        &self,
        volume: VolumeId,
        epoch: u64,
        replica: ReplicaId,
    ) -> Result<Arc<Nexus>, EngineError> {
        let lock = self.volume_lock(volume);
        let _guard = lock.lock().await;
        let nexus = self.nexus_of_epoch(volume, epoch)?;
        nexus.remove_child(replica)?;
        nexus.recorded().await?;
        Ok(nexus)
    }

    /// Unshares and closes the volume's nexus. Idempotent.
    pub async fn destroy_nexus(&self, volume: VolumeId) -> Result<(), EngineError> {
        let lock = self.volume_lock(volume);
        let _guard = lock.lock().await;
        self.unshare_and_close(volume).await;
        Ok(())
    }

    async fn unshare_and_close(&self, volume: VolumeId) {
        let nexus = {
            let mut nexuses = self.nexuses.lock();
            self.shares.remove(&nexus_export_name(volume));
            nexuses.remove(&volume)
        };
        self.remote_children.lock().remove(&volume);
        if let Some(nexus) = nexus {
            if let Err(e) = nexus.close().await {
                tracing::warn!(%volume, error = %e, "flushing the nexus on destroy failed");
            }
            tracing::info!(%volume, "nexus destroyed");
        }
    }

    /// Remembers a remote child of the volume's nexus (pruning the ones gone).
    fn track_remote(&self, volume: VolumeId, child: &Arc<RemoteChild>) {
        let mut remotes = self.remote_children.lock();
        let list = remotes.entry(volume).or_default();
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(child));
    }

    /// Reconnects the volume's remote children smaller than `size`, so they learn a size
    /// their replica gained since they connected. A failure is only logged: the resize then
    /// reports the child as too small.
    async fn refresh_remote_sizes(&self, volume: VolumeId, size: ByteSize) {
        let stale: Vec<Arc<RemoteChild>> = {
            let mut remotes = self.remote_children.lock();
            let list = remotes.entry(volume).or_default();
            list.retain(|w| w.strong_count() > 0);
            list.iter()
                .filter_map(std::sync::Weak::upgrade)
                .filter(|c| c.size() < size.bytes())
                .collect()
        };
        for child in stale {
            if let Err(e) = child.refresh_size().await {
                tracing::warn!(%volume, child = %child.uri(), error = %e,
                    "cannot refresh a remote child's size");
            }
        }
    }

    /// Grows the nexus; its children must hold `size` bytes already. Remote children smaller
    /// than that reconnect first, to learn a size their replica gained since they connected.
    pub async fn resize_nexus(
        &self,
        volume: VolumeId,
        size: ByteSize,
    ) -> Result<Arc<Nexus>, EngineError> {
        let lock = self.volume_lock(volume);
        let _guard = lock.lock().await;
        let nexus = self.nexus(volume).ok_or(EngineError::NexusNotFound(volume))?;
        self.refresh_remote_sizes(volume, size).await;
        nexus.resize(size.bytes())?;
        Ok(nexus)
    }

    pub fn nexus(&self, volume: VolumeId) -> Option<Arc<Nexus>> {
        self.nexuses.lock().get(&volume).cloned()
    }

    pub fn list_nexuses(&self) -> Vec<Arc<Nexus>> {
        self.nexuses.lock().values().cloned().collect()
    }

    /// The NBD URI of a volume's share.
    pub fn share_uri(&self, volume: VolumeId) -> String {
        format!("nbd://{}/{}", self.endpoints.nbd, nexus_export_name(volume))
    }

    pub(super) fn nexus_of(&self, replica: ReplicaId) -> Option<VolumeId> {
        self.nexuses.lock().values().find(|n| n.has_child(replica)).map(|n| n.volume())
    }
}
