//! `/v1/events`.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use trireme_api::{Event, Problem};

use super::AppState;
use crate::ControlError;

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct EventsQuery {
    /// Only events with a larger sequence number.
    pub after: Option<u64>,
}

/// Retained events, oldest first.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventsQuery),
    responses((status = 200, body = Vec<Event>), (status = 400, body = Problem, content_type = "application/problem+json")))]
pub async fn list_events(
    State(app): State<AppState>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<Vec<Event>>, ControlError> {
    let Query(q) =
        query.map_err(|e| ControlError::MalformedBody { detail: format!("invalid query: {e}") })?;
    Ok(Json(app.registry.events().after(q.after.unwrap_or(0))))
}
