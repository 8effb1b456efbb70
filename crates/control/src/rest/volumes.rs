//! `/v1/volumes` and `/v1/replicas`. `{id}` is a volume's UUID or its name.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use trireme_api::{
    CreateVolumeBody, Problem, PublishBody, Replica, ResizeVolumeBody, SetReplicasBody, Volume,
};

use super::AppState;
use super::extract::{Body, Id};
use crate::ControlError;

#[utoipa::path(get, path = "/v1/volumes", tag = "volumes", responses((status = 200, body = Vec<Volume>)))]
pub async fn list_volumes(State(app): State<AppState>) -> Json<Vec<Volume>> {
    Json(app.registry.volumes())
}

/// Creates a volume (idempotent by name or client id: the same spec answers 200 with it).
#[utoipa::path(post, path = "/v1/volumes", tag = "volumes", request_body = CreateVolumeBody,
    responses((status = 201, body = Volume), (status = 200, body = Volume, description = "already exists with this spec"),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 507, body = Problem, content_type = "application/problem+json", description = "no pool has room")))]
pub async fn create_volume(
    State(app): State<AppState>,
    Body(body): Body<CreateVolumeBody>,
) -> Result<(StatusCode, Json<Volume>), ControlError> {
    let (volume, created) = app.registry.create_volume(body).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(volume)))
}

#[utoipa::path(get, path = "/v1/volumes/{id}", tag = "volumes", params(("id" = String, Path, description = "volume UUID or name")),
    responses((status = 200, body = Volume), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn get_volume(
    State(app): State<AppState>,
    Id(id): Id,
) -> Result<Json<Volume>, ControlError> {
    app.registry.volume(&id).map(Json)
}

/// Unpublishes, destroys the replicas and removes the volume.
#[utoipa::path(delete, path = "/v1/volumes/{id}", tag = "volumes", params(("id" = String, Path, description = "volume UUID or name")),
    responses((status = 204), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn delete_volume(
    State(app): State<AppState>,
    Id(id): Id,
) -> Result<StatusCode, ControlError> {
    app.registry.delete_volume(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Grows a volume (replicas, then nexus). Shrinking is refused.
#[utoipa::path(post, path = "/v1/volumes/{id}/resize", tag = "volumes", request_body = ResizeVolumeBody,
    params(("id" = String, Path, description = "volume UUID or name")),
    responses((status = 200, body = Volume), (status = 422, body = Problem, content_type = "application/problem+json")))]
pub async fn resize_volume(
    State(app): State<AppState>,
    Id(id): Id,
    Body(body): Body<ResizeVolumeBody>,
) -> Result<Json<Volume>, ControlError> {
    app.registry.resize_volume(&id, body.size).await.map(Json)
}

/// Sets how many replicas the volume keeps: growing places new replicas on other nodes (each
/// rebuilt in full while the volume stays online); shrinking removes faulted, then rebuilding,
/// then remote online replicas, never the last online one.
#[utoipa::path(post, path = "/v1/volumes/{id}/set-replicas", tag = "volumes", request_body = SetReplicasBody,
    params(("id" = String, Path, description = "volume UUID or name")),
    responses((status = 200, body = Volume), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json",
            description = "0 replicas, or more than there are nodes able to hold one"),
        (status = 507, body = Problem, content_type = "application/problem+json", description = "no pool has room")))]
pub async fn set_replicas(
    State(app): State<AppState>,
    Id(id): Id,
    Body(body): Body<SetReplicasBody>,
) -> Result<Json<Volume>, ControlError> {
    app.registry.set_replicas(&id, body.replicas).await.map(Json)
}

/// Publishes the volume and waits (up to 30 s) for its nexus; answers with `status.target.uri`.
/// A volume that cannot be served now (no current replica reachable) gets 503 at once; the
/// publish stands and takes effect when a current replica returns.
#[utoipa::path(put, path = "/v1/volumes/{id}/target", tag = "volumes", request_body = PublishBody,
    params(("id" = String, Path, description = "volume UUID or name")),
    responses((status = 200, body = Volume), (status = 409, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json",
            description = "node unavailable, or no current replica reachable"),
        (status = 504, body = Problem, content_type = "application/problem+json")))]
pub async fn publish_volume(
    State(app): State<AppState>,
    Id(id): Id,
    Body(body): Body<PublishBody>,
) -> Result<Json<Volume>, ControlError> {
    app.registry.publish_volume(&id, body.node).await.map(Json)
}

#[utoipa::path(delete, path = "/v1/volumes/{id}/target", tag = "volumes", params(("id" = String, Path, description = "volume UUID or name")),
    responses((status = 200, body = Volume), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn unpublish_volume(
    State(app): State<AppState>,
    Id(id): Id,
) -> Result<Json<Volume>, ControlError> {
    app.registry.unpublish_volume(&id).await.map(Json)
}

#[utoipa::path(get, path = "/v1/volumes/{id}/replicas", tag = "replicas", params(("id" = String, Path, description = "volume UUID or name")),
    responses((status = 200, body = Vec<Replica>), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn list_volume_replicas(
    State(app): State<AppState>,
    Id(id): Id,
) -> Result<Json<Vec<Replica>>, ControlError> {
    app.registry.replicas(Some(&id)).map(Json)
}

#[utoipa::path(get, path = "/v1/replicas", tag = "replicas", responses((status = 200, body = Vec<Replica>)))]
pub async fn list_replicas(
    State(app): State<AppState>,
) -> Result<Json<Vec<Replica>>, ControlError> {
    app.registry.replicas(None).map(Json)
}
