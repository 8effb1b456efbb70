//! The Identity service, served by both plugins.

use tonic::{Request, Response, Status};
use trireme_api::Client;

use crate::proto::identity_server::Identity;
use crate::proto::plugin_capability::{self, service, volume_expansion};
use crate::proto::*;

/// What `Probe` checks.
#[derive(Debug, Clone)]
pub(crate) enum Readiness {
    /// The controller is ready when control answers `/readyz`.
    Control(Client),
    /// The node is ready when the attach tools are installed.
    NodeTools,
}

#[derive(Debug, Clone)]
pub(crate) struct IdentityService {
    readiness: Readiness,
}

impl IdentityService {
    pub(crate) fn new(readiness: Readiness) -> Self {
        Self { readiness }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: crate::DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let service = |t: service::Type| PluginCapability {
            r#type: Some(plugin_capability::Type::Service(plugin_capability::Service {
                r#type: t as i32,
            })),
        };
        // Expansion is OFFLINE: an attached NBD client keeps the size it negotiated at connect
        // time, so the node sees a grown volume only after it is attached again.
        let expansion = PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: volume_expansion::Type::Offline as i32,
                },
            )),
        };
        let mut capabilities = vec![expansion];
        if matches!(self.readiness, Readiness::Control(_)) {
            capabilities.insert(0, service(service::Type::ControllerService));
            capabilities.insert(1, service(service::Type::VolumeAccessibilityConstraints));
        }
        Ok(Response::new(GetPluginCapabilitiesResponse { capabilities }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        match &self.readiness {
            Readiness::Control(client) => match client.ready().await {
                Ok(_) => Ok(Response::new(ProbeResponse { ready: Some(true) })),
                Err(e) => Err(Status::failed_precondition(format!("control is not ready: {e}"))),
            },
            Readiness::NodeTools => match crate::node::missing_tools() {
                None => Ok(Response::new(ProbeResponse { ready: Some(true) })),
                Some(tool) => Err(Status::failed_precondition(format!(
                    "required tool {tool} is not installed on this node"
                ))),
            },
        }
    }
}
