//! `/v1/nodes`: listing, and the operator's levers — cordon, uncordon, drain.

use axum::Json;
use axum::extract::State;
use trireme_api::{Node, Problem};

use super::AppState;
use super::extract::Id;
use crate::ControlError;

/// Every node that ever registered.
#[utoipa::path(get, path = "/v1/nodes", tag = "nodes",
    responses((status = 200, body = Vec<Node>), (status = 401, body = Problem, content_type = "application/problem+json")))]
pub async fn list_nodes(State(app): State<AppState>) -> Json<Vec<Node>> {
    Json(app.registry.nodes())
}

#[utoipa::path(get, path = "/v1/nodes/{id}", tag = "nodes", params(("id" = String, Path, description = "node name")),
    responses((status = 200, body = Node), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn get_node(State(app): State<AppState>, Id(id): Id) -> Result<Json<Node>, ControlError> {
    app.registry.node(&id).map(Json)
}

/// Cordons a node: it takes no new replicas or nexuses; what it holds stays (idempotent).
#[utoipa::path(post, path = "/v1/nodes/{id}/cordon", tag = "nodes", params(("id" = String, Path, description = "node name")),
    responses((status = 200, body = Node), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn cordon_node(
    State(app): State<AppState>,
    Id(id): Id,
) -> Result<Json<Node>, ControlError> {
    app.registry.cordon_node(&id).await.map(Json)
}

/// Uncordons a node: it takes new work again; a drain in progress stops (idempotent).
#[utoipa::path(post, path = "/v1/nodes/{id}/uncordon", tag = "nodes", params(("id" = String, Path, description = "node name")),
    responses((status = 200, body = Node), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn uncordon_node(
    State(app): State<AppState>,
    Id(id): Id,
) -> Result<Json<Node>, ControlError> {
    app.registry.uncordon_node(&id).await.map(Json)
}

/// Drains a node: cordons it, then the reconciler moves every replica elsewhere (a new one is
/// rebuilt before the old goes) and republishes volumes served from it on a node holding an
/// online replica. The node reports `draining` until nothing is left, then `cordoned`.
#[utoipa::path(post, path = "/v1/nodes/{id}/drain", tag = "nodes", params(("id" = String, Path, description = "node name")),
    responses((status = 200, body = Node), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn drain_node(
    State(app): State<AppState>,
    Id(id): Id,
) -> Result<Json<Node>, ControlError> {
    app.registry.drain_node(&id).await.map(Json)
}
