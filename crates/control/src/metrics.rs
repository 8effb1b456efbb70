//! Prometheus metrics (`trireme_*`, base units). Gauges describing the registry are computed
//! at scrape time from one snapshot, so they can never drift from what the API reports; the
//! request counter is updated by a middleware on every REST answer.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Unit;
use trireme_types::{NodeState, VolumeState};

use crate::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: String,
}

pub struct Metrics {
    registry: parking_lot::Mutex<prometheus_client::registry::Registry>,
    nodes: Family<StateLabels, Gauge>,
    volumes: Family<StateLabels, Gauge>,
    pool_capacity: Family<PoolLabels, Gauge>,
    pool_used: Family<PoolLabels, Gauge>,
    requests: Family<RequestLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = prometheus_client::registry::Registry::default();
        let m = Self {
            registry: parking_lot::Mutex::new(prometheus_client::registry::Registry::default()),
            nodes: Family::default(),
            volumes: Family::default(),
            pool_capacity: Family::default(),
            pool_used: Family::default(),
            requests: Family::default(),
        };
        r.register("trireme_nodes", "Nodes by state", m.nodes.clone());
        r.register("trireme_volumes", "Volumes by state", m.volumes.clone());
        r.register_with_unit(
            "trireme_pool_capacity",
            "Pool capacity",
            Unit::Bytes,
            m.pool_capacity.clone(),
        );
        r.register_with_unit(
            "trireme_pool_used",
            "Pool space in use",
            Unit::Bytes,
            m.pool_used.clone(),
        );
        r.register(
            "trireme_rest_requests",
            "REST requests by route, method and status",
            m.requests.clone(),
        );
        *m.registry.lock() = r;
        m
    }

    pub fn record_request(&self, route: &str, method: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                method: method.to_owned(),
                status: status.to_string(),
            })
            .inc();
    }

    /// The text exposition, with registry gauges refreshed from `reg`.
    pub fn render(&self, reg: &Registry) -> String {
        let (nodes, volumes, pools) = (reg.nodes(), reg.volumes(), reg.pools());
        self.nodes.clear();
        for s in [NodeState::Online, NodeState::Offline, NodeState::Cordoned, NodeState::Draining] {
            let n = nodes.iter().filter(|x| x.status.state == s).count();
            self.nodes.get_or_create(&StateLabels { state: s.to_string() }).set(n as i64);
        }
        self.volumes.clear();
        for s in
            [VolumeState::Online, VolumeState::Degraded, VolumeState::Faulted, VolumeState::Unknown]
        {
            let n = volumes.iter().filter(|x| x.status.state == s).count();
            self.volumes.get_or_create(&StateLabels { state: s.to_string() }).set(n as i64);
        }
        self.pool_capacity.clear();
        self.pool_used.clear();
        for p in pools {
            let l = PoolLabels { pool: p.id.to_string(), node: p.spec.node.to_string() };
            self.pool_capacity
                .get_or_create(&l)
                .set(i64::try_from(p.status.capacity.bytes()).unwrap_or(i64::MAX));
            self.pool_used
                .get_or_create(&l)
                .set(i64::try_from(p.status.used.bytes()).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry.lock()) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        out
    }
}

/// Middleware counting every REST answer by matched route (not raw path: ids would explode
/// the label set).
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    // Likewise a client can send any method token: only the standard ones get a label.
    let method = match *req.method() {
        Method::GET
        | Method::HEAD
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::OPTIONS => req.method().as_str(),
        _ => "other",
    }
    .to_owned();
    let resp = next.run(req).await;
    metrics.record_request(&route, &method, resp.status().as_u16());
    resp
}
