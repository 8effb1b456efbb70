//! Calls to the engines. One lazily connected channel per node, re-made when the node
//! registers with a new endpoint; every call is bounded by a timeout so that a hung engine
//! can only delay a reconcile pass, never stall it.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use trireme_rpc::engine_client::EngineClient;
use trireme_types::NodeId;

/// Why an engine call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("node {node} has an invalid engine endpoint {endpoint:?}")]
    BadEndpoint { node: NodeId, endpoint: String },
    #[error("engine on node {node} did not answer {op} within {secs} s")]
    Timeout { node: NodeId, op: &'static str, secs: u64 },
    #[error("engine on node {node} failed {op}: {message} ({code:?})")]
    Status { node: NodeId, op: &'static str, code: tonic::Code, message: String },
}

impl EngineError {
    /// The engine says the object does not exist (so destroying it is already done).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Status { code: tonic::Code::NotFound, .. })
    }

    /// The engine understood the request and refused it; repeating it will not help.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::Status {
                code: tonic::Code::InvalidArgument
                    | tonic::Code::AlreadyExists
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::NotFound
                    | tonic::Code::Unimplemented,
                ..
            }
        )
    }
}

/// The engine channels, by node.
#[derive(Debug)]
pub struct Engines {
    channels: parking_lot::Mutex<HashMap<NodeId, (String, Channel)>>,
    timeout: Duration,
}

impl Engines {
    pub fn new(timeout: Duration) -> Self {
        Self { channels: parking_lot::Mutex::new(HashMap::new()), timeout }
    }

    /// A client for `node`'s engine at `endpoint` (host:port or URL).
    pub fn client(
        &self,
        node: &NodeId,
        endpoint: &str,
    ) -> Result<EngineClient<Channel>, EngineError> {
        let mut channels = self.channels.lock();
        if let Some((ep, ch)) = channels.get(node)
            && ep == endpoint
        {
            return Ok(EngineClient::new(ch.clone()));
        }
        let url = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("http://{endpoint}")
        };
        let bad = || EngineError::BadEndpoint { node: node.clone(), endpoint: endpoint.to_owned() };
        let channel = Endpoint::from_shared(url)
            .map_err(|_| bad())?
            .connect_timeout(Duration::from_secs(3))
            // No channel-wide request timeout: `call` bounds every call itself and reports it
            // as a timeout, which tonic's own would report as a cancellation.
            .connect_lazy();
        channels.insert(node.clone(), (endpoint.to_owned(), channel.clone()));
        Ok(EngineClient::new(channel))
    }

    /// Runs one call with the engine timeout, turning its failure into an [`EngineError`].
    pub async fn call<T>(
        &self,
        node: &NodeId,
        op: &'static str,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => {
                Err(EngineError::Timeout { node: node.clone(), op, secs: self.timeout.as_secs() })
            }
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                Err(EngineError::Timeout { node: node.clone(), op, secs: self.timeout.as_secs() })
            }
            Ok(Err(status)) => Err(EngineError::Status {
                node: node.clone(),
                op,
                code: status.code(),
                message: status.message().to_owned(),
            }),
            Ok(Ok(resp)) => Ok(resp.into_inner()),
        }
    }
}
