//! Control's typed errors and the ONE place they become HTTP answers (RFC 9457 problem+json).
//!
//! Every REST handler returns `Result<_, ControlError>`; nothing else builds an error response.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use trireme_api::{PROBLEM_JSON, Problem};
use trireme_types::{ByteSize, Name, NodeId, PoolId, VolumeId};

use crate::engine_client::EngineError;
use crate::registry::RecordError;
use crate::scheduler::PlacementError;

/// Why a control operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("this request needs a bearer token (Authorization: Bearer <token>)")]
    Unauthenticated,
    #[error("the token is not known to this control plane")]
    UnknownToken,
    #[error("a viewer token may only read; {method} needs an admin token")]
    Forbidden { method: String },

    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("no route {path}")]
    NoRoute { path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },

    /// The body is not JSON (or not the expected content type).
    #[error("{detail}")]
    MalformedBody { detail: String },
    /// The body is over the size limit (requests are small JSON documents).
    #[error("{detail}")]
    BodyTooLarge { detail: String },
    /// The body is JSON but does not describe a valid request.
    #[error("{detail}")]
    InvalidBody { detail: String },
    #[error("volume {volume} is {current}; it can only grow, not shrink to {requested}")]
    Shrink { volume: Name, current: ByteSize, requested: ByteSize },

    #[error("volume {name:?} already exists with a different spec: {difference}")]
    VolumeConflict { name: String, difference: String },
    #[error("pool {pool} already exists on node {node} with disk {disk:?}")]
    PoolConflict { pool: PoolId, node: NodeId, disk: String },
    #[error("pool {pool} still holds replicas of volume(s) {volumes}; delete them first")]
    PoolInUse { pool: PoolId, volumes: String },
    #[error("volume {volume} is published on node {node}; unpublish it first")]
    AlreadyPublished { volume: VolumeId, node: NodeId },
    #[error("volume {volume} is being deleted")]
    VolumeDeleting { volume: VolumeId },
    #[error("node {node} is {state}; it cannot take this request now")]
    NodeUnavailable { node: NodeId, state: String },
    /// The volume cannot be served now; the spec stands and it is served as soon as it can be.
    #[error(
        "volume {volume} cannot be served now: {reason}; it is published as soon as that changes"
    )]
    VolumeUnavailable { volume: VolumeId, reason: String },
    #[error("node {node} is not registered; an engine must register it before it can hold pools")]
    UnknownNode { node: NodeId },

    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error("{what} did not finish within {secs} s; the reconciler keeps trying")]
    Timeout { what: String, secs: u64 },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the store failed: {0}")]
    Store(#[from] trireme_store::StoreError),
    #[error(transparent)]
    Record(#[from] RecordError),
}

impl ControlError {
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        Self::NotFound { kind, id: id.into() }
    }

    /// The status code and the stable problem type of each error.
    fn classify(&self) -> (StatusCode, &'static str) {
        use ControlError::*;
        match self {
            Unauthenticated | UnknownToken => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            NotFound { .. } | NoRoute { .. } => (StatusCode::NOT_FOUND, "not-found"),
            MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed"),
            MalformedBody { .. } => (StatusCode::BAD_REQUEST, "malformed-body"),
            BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body-too-large"),
            InvalidBody { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid-body"),
            Shrink { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "shrink-not-supported"),
            VolumeConflict { .. } | PoolConflict { .. } => (StatusCode::CONFLICT, "conflict"),
            PoolInUse { .. } => (StatusCode::CONFLICT, "pool-in-use"),
            AlreadyPublished { .. } => (StatusCode::CONFLICT, "already-published"),
            VolumeDeleting { .. } => (StatusCode::CONFLICT, "deleting"),
            NodeUnavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "node-unavailable"),
            VolumeUnavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "volume-unavailable"),
            UnknownNode { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "unknown-node"),
            Placement(PlacementError::InsufficientCapacity { .. }) => {
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient-capacity")
            }
            Placement(_) => (StatusCode::SERVICE_UNAVAILABLE, "no-placement"),
            Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            Engine(EngineError::Timeout { .. }) => (StatusCode::GATEWAY_TIMEOUT, "engine-timeout"),
            Engine(EngineError::Status { code, .. }) => match code {
                // The engine's own verdicts on the request carry over; the rest is a failure
                // of the engine as seen from here.
                tonic::Code::ResourceExhausted => {
                    (StatusCode::INSUFFICIENT_STORAGE, "insufficient-capacity")
                }
                tonic::Code::AlreadyExists | tonic::Code::FailedPrecondition => {
                    (StatusCode::CONFLICT, "engine-conflict")
                }
                tonic::Code::InvalidArgument => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "engine-invalid-argument")
                }
                tonic::Code::NotFound => (StatusCode::NOT_FOUND, "engine-not-found"),
                _ => (StatusCode::BAD_GATEWAY, "engine-error"),
            },
            Engine(_) => (StatusCode::BAD_GATEWAY, "engine-error"),
            Store(_) | Record(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store-error"),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.classify().0
    }

    pub fn to_problem(&self) -> Problem {
        let (status, kind) = self.classify();
        Problem {
            kind: format!("trireme:{kind}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            instance: None,
        }
    }
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let problem = self.to_problem();
        // Failures of control or of an engine deserve a warning; capacity and availability
        // answers are ordinary outcomes of a request.
        if matches!(problem.status, 500 | 502 | 504) {
            tracing::warn!(status = problem.status, "{}", problem.detail);
        } else {
            tracing::debug!(status = problem.status, "{}", problem.detail);
        }
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut resp = (self.status(), body).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if matches!(self, Self::Unauthenticated | Self::UnknownToken) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_carry_status_type_and_sentence() {
        let p = ControlError::not_found("volume", "vol-9").to_problem();
        assert_eq!(p.status, 404);
        assert_eq!(p.kind, "trireme:not-found");
        assert_eq!(p.detail, "volume \"vol-9\" not found");
    }
}
