//! The REST API: axum handlers annotated for utoipa, so the OpenAPI document at
//! `/v1/openapi.json` is generated from the same code that serves the routes.
//!
//! ```text
//!   /healthz /readyz /metrics          no token
//!   /v1/...                            bearer token (auth::require_token)
//!   every answer                       counted (metrics::track)
//!   every error                        ControlError -> problem+json (error.rs)
//! ```

mod events;
pub mod extract;
mod nodes;
mod pools;
mod volumes;

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{Method, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::ControlError;
use crate::auth::{Tokens, require_token};
use crate::metrics::{Metrics, track};
use crate::registry::Registry;

/// What every handler can reach.
#[derive(Clone, Debug)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Trireme", description = "Replicated block storage for Kubernetes: the control plane's REST API."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(trireme_api::Problem))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Adds the answers any operation can give, where its annotation does not list them: every
/// call needs a token and reads the store, and one naming an object may not find it; a change
/// may also be refused to a viewer and goes to engines, which may fail, be unreachable or be
/// slow; a body may be too large, not JSON or invalid. Applied once the router has added
/// every path, so one list covers every route.
struct CommonResponses;

impl utoipa::Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let problem = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/problem+json",
                    ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build(),
                )
                .build()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let names_one = path.contains('{');
            let ops = [
                (&mut item.get, false),
                (&mut item.post, true),
                (&mut item.put, true),
                (&mut item.delete, true),
                (&mut item.patch, true),
            ];
            for (op, changes) in ops {
                let Some(op) = op.as_mut() else { continue };
                let mut add =
                    vec![("401", "no token, or an unknown one"), ("500", "the store failed")];
                if names_one {
                    add.push(("404", "no such object"));
                }
                if changes {
                    add.extend([
                        ("403", "the token's role may not change anything"),
                        ("502", "an engine failed"),
                        ("503", "a node, volume or placement is unavailable"),
                        ("504", "an engine did not answer in time"),
                    ]);
                }
                if op.request_body.is_some() {
                    add.extend([
                        ("400", "the body is not a JSON object"),
                        ("413", "the body is too large"),
                        ("422", "the body does not describe a valid request"),
                    ]);
                }
                for (status, description) in add {
                    op.responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| problem(description).into());
                }
            }
        }
    }
}

/// The `/v1` routes and the OpenAPI document describing them.
fn v1() -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(nodes::list_nodes))
        .routes(routes!(nodes::get_node))
        .routes(routes!(nodes::cordon_node))
        .routes(routes!(nodes::uncordon_node))
        .routes(routes!(nodes::drain_node))
        .routes(routes!(pools::list_pools, pools::create_pool))
        .routes(routes!(pools::get_pool, pools::delete_pool))
        .routes(routes!(volumes::list_volumes, volumes::create_volume))
        .routes(routes!(volumes::get_volume, volumes::delete_volume))
        .routes(routes!(volumes::resize_volume))
        .routes(routes!(volumes::set_replicas))
        .routes(routes!(volumes::publish_volume, volumes::unpublish_volume))
        .routes(routes!(volumes::list_volume_replicas))
        .routes(routes!(volumes::list_replicas))
        .routes(routes!(events::list_events))
        .split_for_parts();
    let mut doc = doc;
    utoipa::Modify::modify(&CommonResponses, &mut doc);
    (router, doc)
}

/// The OpenAPI document as JSON.
pub fn openapi_json() -> String {
    v1().1.to_pretty_json().unwrap_or_else(|_| "{}".to_owned())
}

pub fn router(state: AppState, tokens: Arc<Tokens>) -> axum::Router {
    let (v1_routes, doc) = v1();
    let doc = Arc::new(doc.to_pretty_json().unwrap_or_else(|_| "{}".to_owned()));
    let v1_routes =
        v1_routes
            .route(
                "/v1/openapi.json",
                get(move || {
                    let doc = doc.clone();
                    async move {
                        ([(header::CONTENT_TYPE, "application/json")], doc.as_str().to_owned())
                    }
                }),
            )
            .route_layer(axum::middleware::from_fn_with_state(tokens, require_token));
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(v1_routes)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.metrics.clone(), track))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

fn health(status: &str) -> Json<trireme_api::Health> {
    Json(trireme_api::Health {
        status: status.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

async fn healthz() -> Json<trireme_api::Health> {
    health("ok")
}

/// Ready when the store answers.
async fn readyz(State(app): State<AppState>) -> Response {
    match app.registry.store.get("readyz-probe").await {
        Ok(_) => health("ok").into_response(),
        Err(e) => ControlError::Store(e).into_response(),
    }
}

async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        app.metrics.render(&app.registry),
    )
}

async fn no_route(uri: Uri) -> ControlError {
    ControlError::NoRoute { path: uri.path().to_owned() }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ControlError {
    ControlError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_owned() }
}
