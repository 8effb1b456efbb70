//! `/v1/nodes`.

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
