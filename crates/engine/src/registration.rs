//! Registration with control, then heartbeats.
//!
//! ```text
//!   ┌──────────┐ ok  ┌───────────┐ known=false ┌──────────┐
//!   │ register ├────>│ heartbeat ├────────────>│ register │ ...
//!   └────┬─────┘     └─────┬─────┘             └──────────┘
//!        │ error: backoff  │ error: keep beating (control may come back knowing us)
//! ```
//!
//! Runs beside the gRPC and NBD servers and never blocks them: an engine whose control plane
//! is down keeps serving its volumes. Every call has a timeout. An unreachable control plane is
//! logged once when it goes away and once when it comes back, not at every attempt.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use trireme_rpc::registry_client::RegistryClient;
use trireme_rpc::{HeartbeatRequest, RegisterRequest};
use trireme_types::NodeId;

use crate::engine::Endpoints;

const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Why registration cannot even start.
#[derive(Debug, thiserror::Error)]
#[error("invalid control endpoint {endpoint:?}: {source}")]
pub struct BadEndpoint {
    endpoint: String,
    #[source]
    source: tonic::transport::Error,
}

/// Control's endpoint as a URL: `host:port` means plain HTTP/2 to that address.
fn control_url(control: &str) -> String {
    if control.contains("://") { control.to_owned() } else { format!("http://{control}") }
}

/// The gRPC endpoint of control (shared by registration and the nexus recorder).
pub(crate) fn control_endpoint(control: &str) -> Result<Endpoint, BadEndpoint> {
    Endpoint::from_shared(control_url(control))
        .map_err(|source| BadEndpoint { endpoint: control.to_owned(), source })
}

pub struct Registration {
    client: RegistryClient<Channel>,
    node_id: NodeId,
    endpoints: Endpoints,
    heartbeat: Duration,
}

impl Registration {
    /// Prepares the client; connects lazily, so control need not be up yet. Needs a Tokio
    /// runtime.
    pub fn new(
        control: &str,
        node_id: NodeId,
        endpoints: Endpoints,
        heartbeat: Duration,
    ) -> Result<Self, BadEndpoint> {
        let channel = control_endpoint(control)?
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect_lazy();
        Ok(Self { client: RegistryClient::new(channel), node_id, endpoints, heartbeat })
    }

    /// Registers and heartbeats until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut link = Link { reachable: true };
        loop {
            let Some(interval) = self.register(&shutdown, &mut link).await else { return };
            // Returns when control has forgotten this node: register again.
            if !self.beat(interval, &shutdown, &mut link).await {
                return;
            }
        }
    }

    /// Retries with backoff until control accepts; the heartbeat interval to use, or `None`
    /// on shutdown.
    async fn register(
        &mut self,
        shutdown: &CancellationToken,
        link: &mut Link,
    ) -> Option<Duration> {
        let req = RegisterRequest {
            node_id: self.node_id.to_string(),
            grpc_endpoint: self.endpoints.grpc.clone(),
            nbd_endpoint: self.endpoints.nbd.clone(),
            version: crate::VERSION.to_owned(),
        };
        let mut backoff = BACKOFF_MIN;
        loop {
            let call = tokio::time::timeout(CALL_TIMEOUT, self.client.register(req.clone()));
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return None,
                r = call => r,
            };
            match outcome {
                Ok(Ok(reply)) => {
                    link.up();
                    let secs = reply.into_inner().heartbeat_interval_secs;
                    let interval =
                        if secs == 0 { self.heartbeat } else { Duration::from_secs(secs.into()) };
                    tracing::info!(node = %self.node_id, ?interval, "registered with control");
                    return Some(interval);
                }
                Ok(Err(status)) => link.down(&format!("register: {}", status.message())),
                Err(_) => link.down("register: timed out"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Heartbeats every `interval`; `true` when control asks for a new registration, `false`
    /// on shutdown.
    async fn beat(
        &mut self,
        interval: Duration,
        shutdown: &CancellationToken,
        link: &mut Link,
    ) -> bool {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate; registration just happened
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return false,
                _ = ticker.tick() => {}
            }
            let req = HeartbeatRequest { node_id: self.node_id.to_string() };
            let call = tokio::time::timeout(CALL_TIMEOUT, self.client.heartbeat(req));
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return false,
                r = call => r,
            };
            match outcome {
                Ok(Ok(reply)) if reply.get_ref().known => link.up(),
                Ok(Ok(_)) => {
                    link.up();
                    tracing::info!(node = %self.node_id, "control does not know this node; registering again");
                    return true;
                }
                Ok(Err(status)) => link.down(&format!("heartbeat: {}", status.message())),
                Err(_) => link.down("heartbeat: timed out"),
            }
        }
    }
}

/// Remembers whether control was reachable, to log changes rather than every failure.
struct Link {
    reachable: bool,
}

impl Link {
    fn up(&mut self) {
        if !self.reachable {
            tracing::info!("control is reachable again");
        }
        self.reachable = true;
    }

    fn down(&mut self, why: &str) {
        if self.reachable {
            tracing::warn!(error = why, "control is unreachable; retrying in the background");
        }
        self.reachable = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn control_endpoints_take_a_url_or_host_port() {
        assert_eq!(control_url("127.0.0.1:7481"), "http://127.0.0.1:7481");
        assert_eq!(control_url("https://control:7481"), "https://control:7481");
        let node = NodeId::new("n").unwrap();
        let ep = Endpoints { grpc: "a:1".into(), nbd: "a:2".into() };
        let hb = Duration::from_secs(1);
        assert!(Registration::new("control:7481", node.clone(), ep.clone(), hb).is_ok());
        assert!(Registration::new("http://bad host:1", node, ep, hb).is_err());
    }
}
