//! The Controller service: volumes' life cycle through control's REST API.
//!
//! Stateless by design: control is the record of every volume, so every RPC reads what it needs
//! from control and every retry sees what the previous attempt did. A CSI node id is the name
//! of the Trireme node on that machine; publishing a volume for a node runs the volume's nexus
//! on that node, so the NBD traffic from the node's client to its target stays local. Control
//! runs a nexus only on a node that holds one of the volume's replicas, so each volume
//! advertises those nodes as its accessible topology and the CO schedules its users there.

mod params;

use std::collections::HashMap;

use tonic::{Request, Response, Status};
use trireme_api::{Client, CreateVolumeBody, PublishBody, Volume};
use trireme_types::{NodeId, VolumeId};

use crate::caps::{self, Access};
use crate::error::api_status;
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::{self as ccap, rpc::Type as Rpc};
use crate::proto::*;
pub(crate) use params::{CTX_FS_TYPE, Params, TOPOLOGY_KEY};
use params::{condition, csi_volume, fits, published_nodes, size_for, trireme_name};

/// publish_context keys: what NodeStageVolume needs to attach the volume.
pub(crate) const PUBLISH_URI: &str = "uri";
pub(crate) const PUBLISH_NODE: &str = "node";

#[derive(Debug, Clone)]
pub(crate) struct ControllerService {
    client: Client,
}

impl ControllerService {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// The volume, or NOT_FOUND (an id that is not even a UUID names no volume either).
    async fn volume(&self, id: &str) -> Result<Volume, Status> {
        let missing = || Status::not_found(format!("volume {id} does not exist"));
        let id: VolumeId = id.parse().map_err(|_| missing())?;
        match self.client.volume(&id.to_string()).await {
            Ok(v) => Ok(v),
            Err(e) if e.is_not_found() => Err(missing()),
            Err(e) => Err(api_status(&format!("get volume {id}"), &e)),
        }
    }

    /// The volume if it exists (`None` for unknown ids: idempotent deletes and unpublishes).
    async fn volume_if_any(&self, id: &str) -> Result<Option<Volume>, Status> {
        match self.volume(id).await {
            Ok(v) => Ok(Some(v)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.trim().is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(value)
}

fn require_caps(list: &[VolumeCapability]) -> Result<Vec<Access>, Status> {
    if list.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities is required"));
    }
    list.iter().map(|c| caps::parse(c).map_err(Status::invalid_argument)).collect()
}

/// Why an existing volume does not match a create request, if it does not.
fn incompatibility(v: &Volume, req: &CreateVolumeRequest, p: &Params) -> Option<String> {
    if !fits(v.spec.size, req.capacity_range.as_ref()) {
        return Some(format!(
            "it has {} which is outside the requested capacity range",
            v.spec.size
        ));
    }
    if v.spec.replicas != p.replicas {
        return Some(format!("it has {} replicas, not {}", v.spec.replicas, p.replicas));
    }
    if v.spec.thin != p.thin {
        return Some(format!("it is {}thin provisioned", if v.spec.thin { "" } else { "not " }));
    }
    None
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.name, "name")?;
        require_caps(&req.volume_capabilities)?;
        if req.volume_content_source.is_some() {
            return Err(Status::invalid_argument(
                "creating a volume from a snapshot or another volume is not supported yet",
            ));
        }
        let p = Params::parse(&req.parameters)?;
        let size = size_for(req.capacity_range.as_ref()).map_err(Status::out_of_range)?;
        let name = trireme_name(&req.name)?;
        if !p.pool_selector.is_empty() {
            let pools = self.client.pools().await.map_err(|e| api_status("list pools", &e))?;
            if let Some(missing) = p
                .pool_selector
                .iter()
                .find(|s| !pools.iter().any(|pl| pl.id.as_str() == s.as_str()))
            {
                return Err(Status::invalid_argument(format!(
                    "poolSelector names pool {missing:?} which does not exist"
                )));
            }
        }
        let answer = |v: &Volume| {
            let mut vol = csi_volume(v, Some(&p.fs_type));
            vol.volume_context = p.context(&v.name);
            Response::new(CreateVolumeResponse { volume: Some(vol) })
        };
        // Idempotent by name: a retry finds the volume the first attempt made.
        let existing = match self.client.volume(name.as_str()).await {
            Ok(v) => Some(v),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(api_status(&format!("get volume {name}"), &e)),
        };
        if let Some(v) = existing {
            return match incompatibility(&v, &req, &p) {
                None => Ok(answer(&v)),
                Some(why) => {
                    Err(Status::already_exists(format!("volume {name} already exists and {why}")))
                }
            };
        }
        let body = CreateVolumeBody {
            name: name.clone(),
            id: None,
            size,
            replicas: p.replicas,
            thin: p.thin,
        };
        match self.client.create_volume(&body).await {
            Ok(v) => Ok(answer(&v)),
            // Lost a race with a concurrent create of the same name: judge what won.
            Err(e) if e.status() == Some(409) => match self.client.volume(name.as_str()).await {
                Ok(v) => match incompatibility(&v, &req, &p) {
                    None => Ok(answer(&v)),
                    Some(why) => Err(Status::already_exists(format!(
                        "volume {name} already exists and {why}"
                    ))),
                },
                Err(_) => Err(api_status(&format!("create volume {name}"), &e)),
            },
            Err(e) => Err(api_status(&format!("create volume {name}"), &e)),
        }
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        let Some(v) = self.volume_if_any(&req.volume_id).await? else {
            return Ok(Response::new(DeleteVolumeResponse {}));
        };
        if let Some(node) = &v.spec.publish {
            return Err(Status::failed_precondition(format!(
                "volume {} is published on node {node}; unpublish it first",
                v.id
            )));
        }
        match self.client.delete_volume(&v.id.to_string()).await {
            Ok(()) => Ok(Response::new(DeleteVolumeResponse {})),
            Err(e) if e.is_not_found() => Ok(Response::new(DeleteVolumeResponse {})),
            Err(e) => Err(api_status(&format!("delete volume {}", v.id), &e)),
        }
    }

    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        required(&req.node_id, "node_id")?;
        caps::require(req.volume_capability.as_ref())?;
        let v = self.volume(&req.volume_id).await?;
        let node_missing = || Status::not_found(format!("node {} does not exist", req.node_id));
        let node: NodeId = req.node_id.parse().map_err(|_| node_missing())?;
        match self.client.node(node.as_str()).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => return Err(node_missing()),
            Err(e) => return Err(api_status(&format!("get node {node}"), &e)),
        }
        if let Some(other) = v.spec.publish.as_ref().filter(|n| **n != node) {
            return Err(Status::failed_precondition(format!(
                "volume {} is published on node {other}; a volume is attached to one node at a time",
                v.id
            )));
        }
        let body = PublishBody { node: Some(node.clone()) };
        let published = self
            .client
            .publish_volume(&v.id.to_string(), &body)
            .await
            .map_err(|e| api_status(&format!("publish volume {} on node {node}", v.id), &e))?;
        let target = published.status.target.ok_or_else(|| {
            Status::unavailable(format!(
                "volume {} is published but its target is not up yet; retry",
                v.id
            ))
        })?;
        let context = HashMap::from([
            (PUBLISH_URI.to_owned(), target.uri),
            (PUBLISH_NODE.to_owned(), target.node.to_string()),
        ]);
        Ok(Response::new(ControllerPublishVolumeResponse { publish_context: context }))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        let done = || Ok(Response::new(ControllerUnpublishVolumeResponse {}));
        // Unknown volumes, and volumes not published on this node, count as unpublished.
        let Some(v) = self.volume_if_any(&req.volume_id).await? else { return done() };
        let Some(on) = &v.spec.publish else { return done() };
        if !req.node_id.is_empty() && on.as_str() != req.node_id {
            return done();
        }
        match self.client.unpublish_volume(&v.id.to_string()).await {
            Ok(_) => done(),
            Err(e) if e.is_not_found() => done(),
            Err(e) => Err(api_status(&format!("unpublish volume {}", v.id), &e)),
        }
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        self.volume(&req.volume_id).await?;
        if let Err(s) = Params::parse(&req.parameters) {
            return Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: s.message().to_owned(),
            }));
        }
        if let Some(why) = req.volume_capabilities.iter().find_map(caps::unsupported) {
            return Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            }));
        }
        let confirmed = validate_volume_capabilities_response::Confirmed {
            volume_context: req.volume_context,
            volume_capabilities: req.volume_capabilities,
            parameters: req.parameters,
            mutable_parameters: Default::default(),
        };
        Ok(Response::new(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(confirmed),
            message: String::new(),
        }))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = request.into_inner();
        if req.max_entries < 0 {
            return Err(Status::invalid_argument("max_entries must not be negative"));
        }
        let mut volumes =
            self.client.volumes().await.map_err(|e| api_status("list volumes", &e))?;
        // A stable order, so a token (the index of the next entry) means the same on the next page.
        volumes.sort_by_key(|v| v.id);
        let start = match req.starting_token.as_str() {
            "" => 0,
            t => t.parse::<usize>().ok().filter(|i| *i <= volumes.len()).ok_or_else(|| {
                Status::aborted(format!(
                    "starting_token {t:?} is not valid; list again from the start"
                ))
            })?,
        };
        let take = match req.max_entries {
            0 => usize::MAX,
            n => n as usize,
        };
        let page: Vec<_> = volumes.iter().skip(start).take(take).collect();
        let next = start + page.len();
        let entries = page
            .into_iter()
            .map(|v| list_volumes_response::Entry {
                volume: Some(csi_volume(v, None)),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: published_nodes(v),
                    volume_condition: Some(condition(v)),
                }),
            })
            .collect();
        let next_token = if next < volumes.len() { next.to_string() } else { String::new() };
        Ok(Response::new(ListVolumesResponse { entries, next_token }))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = request.into_inner();
        if let Some(why) = req.volume_capabilities.iter().find_map(caps::unsupported) {
            return Err(Status::invalid_argument(why));
        }
        let p = Params::parse(&req.parameters)?;
        let pools = self.client.pools().await.map_err(|e| api_status("list pools", &e))?;
        let mut free: Vec<u64> = pools
            .iter()
            .filter(|pl| {
                p.pool_selector.is_empty() || p.pool_selector.iter().any(|s| s == pl.id.as_str())
            })
            .filter(|pl| pl.status.state == trireme_api::PoolState::Online)
            .map(|pl| pl.status.free.bytes())
            .collect();
        free.sort_unstable_by(|a, b| b.cmp(a));
        let total: u64 = free.iter().sum();
        // Each replica needs its own pool: the largest volume is bounded by the
        // `replicas`-th largest free space, and the data fits `total / replicas` times.
        let r = usize::from(p.replicas);
        let largest = free.get(r - 1).copied().unwrap_or(0);
        let available = total / u64::from(p.replicas);
        let to_i64 =
            |b: u64| i64::try_from(b / params::SIZE_UNIT * params::SIZE_UNIT).unwrap_or(i64::MAX);
        Ok(Response::new(GetCapacityResponse {
            available_capacity: to_i64(available),
            maximum_volume_size: Some(to_i64(largest)),
            minimum_volume_size: Some(to_i64(params::SIZE_UNIT)),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let rpcs = [
            Rpc::CreateDeleteVolume,
            Rpc::PublishUnpublishVolume,
            Rpc::ListVolumes,
            Rpc::GetCapacity,
            Rpc::ExpandVolume,
            Rpc::ListVolumesPublishedNodes,
            Rpc::VolumeCondition,
            Rpc::GetVolume,
        ];
        let capabilities = rpcs
            .into_iter()
            .map(|t| ControllerServiceCapability {
                r#type: Some(ccap::Type::Rpc(ccap::Rpc { r#type: t as i32 })),
            })
            .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse { capabilities }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        let access = match req.volume_capability.as_ref() {
            Some(c) => Some(caps::parse(c).map_err(Status::invalid_argument)?),
            None => None,
        };
        let size = size_for(Some(range)).map_err(Status::out_of_range)?;
        let v = self.volume(&req.volume_id).await?;
        // A block volume has no file system for the node to grow.
        let node_expansion_required = !access.is_some_and(|a| a.is_block());
        let answer = |bytes: u64| {
            Ok(Response::new(ControllerExpandVolumeResponse {
                capacity_bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
                node_expansion_required,
            }))
        };
        if fits(v.spec.size, Some(range)) || v.spec.size >= size {
            // Already as large as asked (a retry, or a shrink request, which is never done).
            return answer(v.spec.size.bytes());
        }
        if let Some(node) = &v.spec.publish {
            return Err(Status::failed_precondition(format!(
                "volume {} is published on node {node}; Trireme expands volumes offline, unpublish it first",
                v.id
            )));
        }
        let grown = self
            .client
            .resize_volume(&v.id.to_string(), size)
            .await
            .map_err(|e| api_status(&format!("resize volume {} to {size}", v.id), &e))?;
        answer(grown.spec.size.bytes())
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        let v = self.volume(&req.volume_id).await?;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(csi_volume(&v, None)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: published_nodes(&v),
                volume_condition: Some(condition(&v)),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("ControllerModifyVolume is not supported"))
    }

    async fn create_snapshot(
        &self,
        _: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not available through CSI yet"))
    }

    async fn delete_snapshot(
        &self,
        _: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not available through CSI yet"))
    }

    async fn list_snapshots(
        &self,
        _: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented("snapshots are not available through CSI yet"))
    }

    async fn get_snapshot(
        &self,
        _: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not available through CSI yet"))
    }
}
