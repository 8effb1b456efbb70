//! The Node service: attach, format, mount, bind-mount, and the reverse — idempotently and
//! crash-safely.
//!
//! ```text
//!  NodeStageVolume    record(intent) → attach (nbdfuse + loop | nbd-client) → record(device)
//!                     → mkfs if blank → mount at staging path → record(staged)
//!  NodePublishVolume  bind-mount staging path (or the device, for raw block) onto the target
//!  NodeUnpublish      unmount target, remove it
//!  NodeUnstage        unmount staging path → detach (loop, FUSE mount, nbdfuse) → drop record
//! ```
//!
//! Each step checks the machine before acting (is it mounted, is a loop device already backed
//! by the volume's file, is nbdfuse alive), so running an RPC again after a crash at any point
//! finishes the job or undoes it, and nothing is attached twice. The record is written before
//! anything is attached, so an unstage after a crash mid-stage knows what to clean up.
//! Concurrent RPCs on one volume are refused with ABORTED, as the spec asks.

mod attach;
mod cmd;
mod error;
mod grow;
mod locks;
mod mounts;
mod state;

use std::path::{Path, PathBuf};

use tonic::{Request, Response, Status};
use trireme_api::Client as ApiClient;

use crate::caps::{self, Access, DEFAULT_FS_TYPE};
use crate::controller::{CTX_FS_TYPE, PUBLISH_URI, TOPOLOGY_KEY};
use crate::error::api_status;
use crate::proto::node_server::Node;
use crate::proto::node_service_capability::{self as ncap, rpc::Type as Rpc};
use crate::proto::*;
use attach::Client as NbdClient;
use error::NodeError;
use locks::VolumeLocks;
use state::{RECORD_VERSION, StageRecord, StateDir};

/// The first attach tool this node lacks, if any (for Probe).
pub(crate) fn missing_tools() -> Option<&'static str> {
    NbdClient::detect().tools().iter().copied().find(|t| !cmd::installed(t))
}

#[derive(Debug, Clone)]
pub(crate) struct NodeService {
    node_id: String,
    state: StateDir,
    nbd: NbdClient,
    api: ApiClient,
    locks: VolumeLocks,
}

impl NodeService {
    pub(crate) async fn new(
        node_id: String,
        state_dir: PathBuf,
        api: ApiClient,
    ) -> anyhow::Result<Self> {
        let state = StateDir::open(&state_dir)?;
        let nbd = NbdClient::detect();
        tracing::info!(client = ?nbd, "NBD client for attaching volumes");
        Ok(Self { node_id, state, nbd, api, locks: VolumeLocks::default() })
    }

    fn lock(&self, volume_id: &str) -> Result<locks::Guard, Status> {
        self.locks.try_lock(volume_id).ok_or_else(|| {
            Status::aborted(format!("an operation on volume {volume_id} is already in progress"))
        })
    }

    /// The NBD URI to attach: from the publish context, else asked of control.
    async fn uri_for(
        &self,
        volume_id: &str,
        publish_context: &std::collections::HashMap<String, String>,
    ) -> Result<String, Status> {
        if let Some(uri) = publish_context.get(PUBLISH_URI).filter(|u| !u.is_empty()) {
            return Ok(uri.clone());
        }
        let missing = || Status::not_found(format!("volume {volume_id} does not exist"));
        if volume_id.parse::<trireme_types::VolumeId>().is_err() {
            return Err(missing());
        }
        match self.api.volume(volume_id).await {
            Ok(v) => v.status.target.map(|t| t.uri).ok_or_else(|| {
                Status::failed_precondition(format!(
                    "volume {volume_id} is not published (ControllerPublishVolume first)"
                ))
            }),
            Err(e) if e.is_not_found() => Err(missing()),
            Err(e) => Err(api_status(&format!("get volume {volume_id}"), &e)),
        }
    }

    async fn stage(&self, req: NodeStageVolumeRequest) -> Result<(), Status> {
        let access = caps::require_on_node(req.volume_capability.as_ref())?;
        let staging = PathBuf::from(&req.staging_target_path);
        let (fs_requested, flags) = match &access {
            Access::Block => (None, Vec::new()),
            Access::Mount { fs_type, flags } => (
                fs_type.clone().or_else(|| req.volume_context.get(CTX_FS_TYPE).cloned()),
                flags.clone(),
            ),
        };
        if let Some(fs) = fs_requested.as_ref().filter(|fs| !caps::FS_TYPES.contains(&fs.as_str()))
        {
            return Err(Status::failed_precondition(format!(
                "file system {fs:?} is not supported"
            )));
        }
        let wanted = StageRecord {
            version: RECORD_VERSION,
            volume_id: req.volume_id.clone(),
            uri: String::new(),
            staging_path: staging.clone(),
            block: access.is_block(),
            fs_type: if access.is_block() {
                None
            } else {
                Some(fs_requested.clone().unwrap_or_else(|| DEFAULT_FS_TYPE.into()))
            },
            mount_flags: flags.clone(),
            attachment: None,
            staged: false,
        };
        let previous = self.state.load(&req.volume_id)?;
        if let Some(prev) = &previous {
            let same = prev.staging_path == wanted.staging_path
                && prev.block == wanted.block
                && (fs_requested.is_none() || prev.fs_type == wanted.fs_type)
                && prev.mount_flags == wanted.mount_flags;
            if !same && prev.staged {
                return Err(Status::already_exists(format!(
                    "volume {} is already staged at {} with a different capability",
                    req.volume_id,
                    prev.staging_path.display()
                )));
            }
        }
        let uri = self.uri_for(&req.volume_id, &req.publish_context).await?;
        let mut attachment = previous.as_ref().and_then(|p| p.attachment.clone());
        if let Some(prev) = previous.as_ref().filter(|p| !p.staged && p.uri != uri) {
            // An interrupted attempt attached the volume's previous target (it was published
            // elsewhere since): that connection leads nowhere now, so start from scratch.
            tracing::info!(volume = %req.volume_id, old = %prev.uri, new = %uri, "target moved; reattaching");
            mounts::unmount_all(&prev.staging_path).await?;
            attach::detach(&self.state, &req.volume_id, attachment.as_ref()).await?;
            attachment = None;
        }
        let mut record = StageRecord { uri: uri.clone(), attachment, ..wanted };
        // Intent first: a crash from here on leaves a record that unstage can clean up from.
        self.state.save(&record)?;
        let (attachment, device) = attach::attach(
            self.nbd,
            &self.state,
            &req.volume_id,
            &uri,
            record.attachment.clone().as_ref(),
            |a| {
                record.attachment = Some(a.clone());
                self.state.save(&record)
            },
        )
        .await?;
        record.attachment = Some(attachment);
        if !record.block {
            std::fs::create_dir_all(&staging).map_err(|e| NodeError::io(&staging, e))?;
            match mounts::mount_at(&staging)? {
                Some(m) if Path::new(&m.source) == device => {} // mounted by an earlier attempt
                Some(m) => {
                    return Err(Status::already_exists(format!(
                        "staging path {} already has {} mounted on it",
                        staging.display(),
                        m.source
                    )));
                }
                None => {
                    let fs = self.format_if_blank(&device, fs_requested.as_deref()).await?;
                    record.fs_type = Some(fs.clone());
                    if fs == "ext4" {
                        // The volume may have been expanded while it was not staged.
                        let size = attach::device_size(&device)?;
                        if grow::grow_ext4_offline(&device, size).await? {
                            tracing::info!(volume = %req.volume_id, size, "grew the file system to the expanded volume");
                        }
                    }
                    mounts::mount(path_str(&device)?, &staging, Some(&fs), &flags).await?;
                }
            }
        }
        record.staged = true;
        self.state.save(&record)?;
        Ok(())
    }

    /// Formats the device only when it carries no signature at all; returns the file system
    /// to mount it with.
    async fn format_if_blank(
        &self,
        device: &Path,
        requested: Option<&str>,
    ) -> Result<String, Status> {
        let dev = path_str(device)?;
        let probe =
            cmd::output("blkid", &["-p", "-o", "value", "-s", "TYPE", dev], cmd::QUICK).await?;
        let existing = probe.stdout.trim();
        match probe.code {
            Some(0) if !existing.is_empty() => {
                if let Some(fs) = requested.filter(|fs| *fs != existing) {
                    return Err(Status::failed_precondition(format!(
                        "volume already holds a {existing} file system, not {fs}; refusing to format over it"
                    )));
                }
                if !caps::FS_TYPES.contains(&existing) {
                    return Err(Status::failed_precondition(format!(
                        "volume holds {existing:?}, which Trireme cannot mount"
                    )));
                }
                Ok(existing.to_owned())
            }
            // blkid exits 2 when it finds no signature: a blank device.
            Some(2) | Some(0) => {
                let fs = requested.unwrap_or(DEFAULT_FS_TYPE);
                match fs {
                    "xfs" => cmd::run("mkfs.xfs", &["-q", "-K", dev], cmd::SLOW).await?,
                    _ => {
                        cmd::run(
                            "mkfs.ext4",
                            &[
                                "-q",
                                "-F",
                                "-E",
                                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                                dev,
                            ],
                            cmd::SLOW,
                        )
                        .await?
                    }
                };
                Ok(fs.to_owned())
            }
            _ => Err(NodeError::Command {
                command: cmd::render("blkid", &["-p", dev]),
                code: probe.code,
                stderr: probe.stderr,
            }
            .into()),
        }
    }

    async fn unstage(&self, volume_id: &str, staging: &Path) -> Result<(), Status> {
        let record = self.state.load(volume_id)?;
        let device = match record.as_ref().and_then(|r| r.attachment.as_ref()) {
            Some(state::Attachment::Fuse { loop_device: Some(d) }) => Some(d.clone()),
            Some(state::Attachment::Kernel { device }) => Some(device.clone()),
            _ => None,
        };
        if let Some(device) = device.filter(|d| d.exists()) {
            let users = mounts::users_of(&device, staging)?;
            if !users.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "volume {volume_id} is still published at {}; unpublish it first",
                    users.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        mounts::unmount_all(staging).await?;
        if let Some(r) = record.as_ref().filter(|r| r.staging_path != staging) {
            mounts::unmount_all(&r.staging_path).await?;
        }
        attach::detach(&self.state, volume_id, record.as_ref().and_then(|r| r.attachment.as_ref()))
            .await?;
        self.state.remove(volume_id)?;
        Ok(())
    }

    async fn publish(&self, req: NodePublishVolumeRequest) -> Result<(), Status> {
        let access = caps::require_on_node(req.volume_capability.as_ref())?;
        let target = PathBuf::from(&req.target_path);
        let staging = PathBuf::from(&req.staging_target_path);
        let record = self.state.load(&req.volume_id)?.filter(|r| r.staged).ok_or_else(|| {
            Status::failed_precondition(format!(
                "volume {} is not staged on this node",
                req.volume_id
            ))
        })?;
        if record.block != access.is_block() {
            return Err(Status::already_exists(format!(
                "volume {} is staged for {} access",
                req.volume_id,
                if record.block { "block" } else { "mount" }
            )));
        }
        if let Some(m) = mounts::mount_at(&target)? {
            if m.read_only() == req.readonly {
                return Ok(()); // published by an earlier attempt
            }
            if req.readonly {
                // A crash between the bind mount and its read-only remount: finish it.
                mounts::remount_read_only(&target).await?;
                return Ok(());
            }
            return Err(Status::already_exists(format!(
                "{} is already published read-only",
                target.display()
            )));
        }
        let source = if record.block {
            let device = match &record.attachment {
                Some(state::Attachment::Fuse { loop_device: Some(d) }) => d.clone(),
                Some(state::Attachment::Kernel { device }) => device.clone(),
                _ => {
                    return Err(Status::failed_precondition(format!(
                        "volume {} has no device attached",
                        req.volume_id
                    )));
                }
            };
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| NodeError::io(parent, e))?;
            }
            if !target.exists() {
                std::fs::File::create(&target).map_err(|e| NodeError::io(&target, e))?;
            }
            device
        } else {
            if mounts::mount_at(&staging)?.is_none() {
                return Err(Status::failed_precondition(format!(
                    "staging path {} is not mounted",
                    staging.display()
                )));
            }
            std::fs::create_dir_all(&target).map_err(|e| NodeError::io(&target, e))?;
            staging
        };
        mounts::bind(&source, &target, req.readonly).await?;
        Ok(())
    }

    async fn unpublish(&self, target: &Path) -> Result<(), Status> {
        mounts::unmount_all(target).await?;
        let removed = match std::fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(target),
            Ok(_) => std::fs::remove_file(target),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        removed.map_err(|e| NodeError::io(target, e))?;
        Ok(())
    }

    fn condition(&self, record: Option<&StageRecord>) -> VolumeCondition {
        let verdict = match record.and_then(|r| r.attachment.as_ref().map(|a| (r, a))) {
            None => Err("the volume is not staged on this node".to_owned()),
            Some((r, a)) => attach::health(&self.state, &r.volume_id, a),
        };
        match verdict {
            Ok(()) => VolumeCondition { abnormal: false, message: "attached".into() },
            Err(message) => VolumeCondition { abnormal: true, message },
        }
    }
}

fn path_str(p: &Path) -> Result<&str, NodeError> {
    cmd::path_str(p)
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.trim().is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(value)
}

fn statvfs_usage(path: &Path) -> Result<Vec<VolumeUsage>, NodeError> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| NodeError::io(path, std::io::Error::from(e)))?;
    let frsize = st.fragment_size() as i64;
    let total = st.blocks() as i64 * frsize;
    let avail = st.blocks_available() as i64 * frsize;
    let used = (st.blocks() as i64 - st.blocks_free() as i64) * frsize;
    let inodes = st.files() as i64;
    let ifree = st.files_free() as i64;
    Ok(vec![
        VolumeUsage { available: avail, total, used, unit: volume_usage::Unit::Bytes as i32 },
        VolumeUsage {
            available: ifree,
            total: inodes,
            used: inodes - ifree,
            unit: volume_usage::Unit::Inodes as i32,
        },
    ])
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        required(&req.staging_target_path, "staging_target_path")?;
        caps::require_on_node(req.volume_capability.as_ref())?;
        let _guard = self.lock(&req.volume_id)?;
        let volume = req.volume_id.clone();
        self.stage(req)
            .await
            .inspect_err(|s| tracing::warn!(%volume, "NodeStageVolume failed: {}", s.message()))?;
        tracing::info!(%volume, "staged");
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        required(&req.staging_target_path, "staging_target_path")?;
        let _guard = self.lock(&req.volume_id)?;
        self.unstage(&req.volume_id, Path::new(&req.staging_target_path))
            .await
            .inspect_err(|s| tracing::warn!(volume = %req.volume_id, "NodeUnstageVolume failed: {}", s.message()))?;
        tracing::info!(volume = %req.volume_id, "unstaged");
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        required(&req.target_path, "target_path")?;
        caps::require_on_node(req.volume_capability.as_ref())?;
        if req.staging_target_path.trim().is_empty() {
            return Err(Status::failed_precondition(
                "staging_target_path is required: stage the volume first",
            ));
        }
        let _guard = self.lock(&req.volume_id)?;
        let volume = req.volume_id.clone();
        self.publish(req).await.inspect_err(
            |s| tracing::warn!(%volume, "NodePublishVolume failed: {}", s.message()),
        )?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        required(&req.target_path, "target_path")?;
        let _guard = self.lock(&req.volume_id)?;
        self.unpublish(Path::new(&req.target_path))
            .await
            .inspect_err(|s| tracing::warn!(volume = %req.volume_id, "NodeUnpublishVolume failed: {}", s.message()))?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        required(&req.volume_path, "volume_path")?;
        let path = Path::new(&req.volume_path);
        let meta = std::fs::metadata(path).map_err(|_| {
            Status::not_found(format!("volume path {} does not exist", path.display()))
        })?;
        let record = self.state.load(&req.volume_id)?;
        let usage = if meta.is_dir() {
            if mounts::mount_at(path)?.is_none() {
                return Err(Status::not_found(format!(
                    "volume {} is not mounted at {}",
                    req.volume_id,
                    path.display()
                )));
            }
            statvfs_usage(path)?
        } else {
            let size = attach::device_size(path)? as i64;
            vec![VolumeUsage {
                available: 0,
                total: size,
                used: 0,
                unit: volume_usage::Unit::Bytes as i32,
            }]
        };
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(self.condition(record.as_ref())),
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        required(&req.volume_path, "volume_path")?;
        if let Some(c) = req.volume_capability.as_ref() {
            caps::parse(c).map_err(Status::invalid_argument)?;
        }
        if !Path::new(&req.volume_path).exists() {
            return Err(Status::not_found(format!(
                "volume path {} does not exist",
                req.volume_path
            )));
        }
        let _guard = self.lock(&req.volume_id)?;
        let record = self.state.load(&req.volume_id)?.filter(|r| r.staged).ok_or_else(|| {
            Status::not_found(format!("volume {} is not staged on this node", req.volume_id))
        })?;
        let (attachment, device) = match &record.attachment {
            Some(a @ state::Attachment::Fuse { loop_device: Some(d) }) => (a, d.clone()),
            Some(a @ state::Attachment::Kernel { device }) => (a, device.clone()),
            _ => {
                return Err(Status::failed_precondition(format!(
                    "volume {} has no device attached",
                    req.volume_id
                )));
            }
        };
        attach::refresh_size(attachment).await?;
        let size = attach::device_size(&device)?;
        let required_bytes =
            req.capacity_range.as_ref().map_or(0, |r| r.required_bytes.max(0) as u64);
        if size < required_bytes {
            return Err(Status::failed_precondition(format!(
                "the attached device has {size} bytes, less than the {required_bytes} asked for: \
                 Trireme expands volumes offline, so unstage and stage the volume again"
            )));
        }
        if !record.block {
            let fs = record.fs_type.as_deref().unwrap_or(DEFAULT_FS_TYPE);
            grow::grow_online(fs, &device, &record.staging_path, size).await?;
        }
        Ok(Response::new(NodeExpandVolumeResponse { capacity_bytes: size as i64 }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities =
            [Rpc::StageUnstageVolume, Rpc::GetVolumeStats, Rpc::ExpandVolume, Rpc::VolumeCondition]
                .into_iter()
                .map(|t| NodeServiceCapability {
                    r#type: Some(ncap::Type::Rpc(ncap::Rpc { r#type: t as i32 })),
                })
                .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(Topology {
                segments: [(TOPOLOGY_KEY.to_owned(), self.node_id.clone())].into(),
            }),
        }))
    }
}
