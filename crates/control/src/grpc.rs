//! The `Registry` gRPC service engines call: `Register` and `Heartbeat` (liveness), and from
//! each nexus `RecordChildren` and `MarkDirty` (its membership and dirty-region log; see
//! `registry::membership`). A refusal for an old epoch is FAILED_PRECONDITION with a message
//! starting "fenced": the nexus stops serving on it.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use trireme_rpc as rpc;
use trireme_types::NodeId;

use crate::registry::Registry;
use crate::registry::membership::MembershipError;

#[derive(Debug, Clone)]
pub struct RegistryService {
    registry: Arc<Registry>,
}

impl RegistryService {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

fn node_id(s: &str) -> Result<NodeId, Status> {
    s.parse().map_err(|e| Status::invalid_argument(format!("node_id: {e}")))
}

fn endpoint(field: &str, s: &str) -> Result<String, Status> {
    let s = s.trim();
    if s.is_empty() || s.len() > 512 {
        return Err(Status::invalid_argument(format!("{field} must be a host:port")));
    }
    Ok(s.to_owned())
}

#[tonic::async_trait]
impl rpc::registry_server::Registry for RegistryService {
    async fn register(
        &self,
        req: Request<rpc::RegisterRequest>,
    ) -> Result<Response<rpc::RegisterReply>, Status> {
        let req = req.into_inner();
        let id = node_id(&req.node_id)?;
        let grpc = endpoint("grpc_endpoint", &req.grpc_endpoint)?;
        let nbd = endpoint("nbd_endpoint", &req.nbd_endpoint)?;
        self.registry
            .register_node(id, grpc, nbd, req.version)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        // A third of the timeout, so two lost heartbeats do not make the node offline.
        let interval = (self.registry.node_timeout.as_secs() / 3).max(1);
        Ok(Response::new(rpc::RegisterReply {
            heartbeat_interval_secs: u32::try_from(interval).unwrap_or(u32::MAX),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<rpc::HeartbeatRequest>,
    ) -> Result<Response<rpc::HeartbeatReply>, Status> {
        let id = node_id(&req.into_inner().node_id)?;
        let known = self.registry.heartbeat(&id).await;
        Ok(Response::new(rpc::HeartbeatReply { known }))
    }

    async fn record_children(
        &self,
        req: Request<rpc::RecordChildrenRequest>,
    ) -> Result<Response<rpc::RecordChildrenReply>, Status> {
        let generation =
            self.registry.record_children(&req.into_inner()).await.map_err(membership_status)?;
        Ok(Response::new(rpc::RecordChildrenReply { generation }))
    }

    async fn mark_dirty(
        &self,
        req: Request<rpc::MarkDirtyRequest>,
    ) -> Result<Response<rpc::Empty>, Status> {
        self.registry.mark_dirty(&req.into_inner()).await.map_err(membership_status)?;
        Ok(Response::new(rpc::Empty {}))
    }
}

/// The one place membership refusals become gRPC codes: anything the nexus must stop on is
/// FAILED_PRECONDITION; a store failure is UNAVAILABLE (the nexus retries within its bound).
fn membership_status(e: MembershipError) -> Status {
    match &e {
        MembershipError::Fenced { .. }
        | MembershipError::UnknownEpoch { .. }
        | MembershipError::UnknownVolume(_) => Status::failed_precondition(e.to_string()),
        MembershipError::Invalid(_) => Status::invalid_argument(e.to_string()),
        MembershipError::Control(_) => Status::unavailable(e.to_string()),
    }
}
