//! `/v1/pools`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use trireme_api::{CreatePoolBody, Pool, Problem};

use super::AppState;
use super::extract::{Body, Id};
use crate::ControlError;

#[utoipa::path(get, path = "/v1/pools", tag = "pools", responses((status = 200, body = Vec<Pool>)))]
pub async fn list_pools(State(app): State<AppState>) -> Json<Vec<Pool>> {
    Json(app.registry.pools())
}

/// Creates a pool (idempotent by name: the same node and disk answer 200 with the pool).
#[utoipa::path(post, path = "/v1/pools", tag = "pools", request_body = CreatePoolBody,
    responses((status = 201, body = Pool), (status = 200, body = Pool, description = "already exists with this spec"),
        (status = 409, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json")))]
pub async fn create_pool(
    State(app): State<AppState>,
    Body(body): Body<CreatePoolBody>,
) -> Result<(StatusCode, Json<Pool>), ControlError> {
    let (pool, created) = app.registry.create_pool(body).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(pool)))
}

#[utoipa::path(get, path = "/v1/pools/{id}", tag = "pools", params(("id" = String, Path, description = "pool name")),
    responses((status = 200, body = Pool), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn get_pool(State(app): State<AppState>, Id(id): Id) -> Result<Json<Pool>, ControlError> {
    app.registry.pool(&id).map(Json)
}

/// Deletes a pool that holds no replica.
#[utoipa::path(delete, path = "/v1/pools/{id}", tag = "pools", params(("id" = String, Path, description = "pool name")),
    responses((status = 204), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json")))]
pub async fn delete_pool(
    State(app): State<AppState>,
    Id(id): Id,
) -> Result<StatusCode, ControlError> {
    app.registry.delete_pool(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
