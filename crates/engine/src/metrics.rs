//! Prometheus `/metrics` for the engine (`--metrics-listen`).
//!
//! Every scrape builds a fresh registry from the engine's current state and the NBD server's
//! counters, so metrics of destroyed pools and nexuses disappear with them and nothing on the
//! data path pays for bookkeeping beyond the NBD server's own counters.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trireme_nbd::{Export, OpKind, ServerStats};
use trireme_types::{ChildState, LATENCY_BOUNDS_NS, LatencySnapshot, NexusState};

use crate::engine::Engine;
use crate::pools::PoolStatus;

type Labels = Vec<(&'static str, String)>;

#[derive(Clone)]
struct Sources {
    engine: Arc<Engine>,
    nbd: Arc<ServerStats>,
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    nbd: Arc<ServerStats>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new().route("/metrics", get(scrape)).with_state(Sources { engine, nbd });
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

async fn scrape(State(src): State<Sources>) -> impl IntoResponse {
    match render(&src.engine, &src.nbd) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "cannot encode metrics".to_owned(),
        ),
    }
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    registry.register(name, help, f.clone());
    f
}

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    registry.register(name, help, f.clone());
    f
}

/// A histogram the NBD server has already counted, encoded as it stands at the scrape
/// (prometheus-client's own histogram only counts observations itself).
#[derive(Debug, Default)]
struct Counted(OnceLock<LatencySnapshot>);

impl TypedMetric for Counted {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Counted {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.get().copied().unwrap_or_default();
        // prometheus-client marks the unbounded bucket with f64::MAX.
        let bounds = LATENCY_BOUNDS_NS.iter().map(|&ns| ns as f64 / 1e9).chain([f64::MAX]);
        let buckets: Vec<(f64, u64)> = bounds.zip(s.buckets).collect();
        encoder.encode_histogram::<NoLabelSet>(s.sum.as_secs_f64(), s.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

fn histogram_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counted> {
    let f = Family::<Labels, Counted>::default();
    registry.register(name, help, f.clone());
    f
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn render(engine: &Engine, nbd: &ServerStats) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();

    let info = gauge_family(&mut r, "trireme_engine_info", "The engine's node and version");
    info.get_or_create(&vec![
        ("node", engine.node_id().to_string()),
        ("version", crate::VERSION.to_owned()),
    ])
    .set(1);

    let pool_online = gauge_family(&mut r, "trireme_pool_online", "1 if the pool is online");
    let capacity =
        gauge_family(&mut r, "trireme_pool_capacity_bytes", "Usable capacity of the pool");
    let used = gauge_family(&mut r, "trireme_pool_used_bytes", "Bytes allocated in the pool");
    let replicas = gauge_family(&mut r, "trireme_pool_replicas", "Replicas in the pool");
    let disk_ops = counter_family(
        &mut r,
        "trireme_pool_disk_ops",
        "Operations the pool asked of its disk (metadata and data), by op (read, write, sync)",
    );
    let disk_bytes = counter_family(
        &mut r,
        "trireme_pool_disk_bytes",
        "Bytes the pool read from and wrote to its disk, by op (read, write)",
    );
    let disk_errors =
        counter_family(&mut r, "trireme_pool_disk_errors", "Disk operations that failed");
    let disk_latency = histogram_family(
        &mut r,
        "trireme_pool_disk_latency_seconds",
        "Time the pool's disk took per operation, by op (read, write, sync)",
    );
    for p in engine.list_pools() {
        let pool = p.name.to_string();
        if let Some(d) = p.disk_stats {
            let by_op = |op: &str| vec![("pool", pool.clone()), ("op", op.to_owned())];
            for (op, ops, bytes, latency) in [
                ("read", d.read_ops, Some(d.read_bytes), d.read_latency),
                ("write", d.write_ops, Some(d.write_bytes), d.write_latency),
                ("sync", d.sync_ops, None, d.sync_latency),
            ] {
                disk_ops.get_or_create(&by_op(op)).inc_by(ops);
                if let Some(bytes) = bytes {
                    disk_bytes.get_or_create(&by_op(op)).inc_by(bytes);
                }
                // A fresh family per scrape: the cell is always empty here.
                let _ = disk_latency.get_or_create(&by_op(op)).0.set(latency);
            }
            disk_errors.get_or_create(&vec![("pool", pool.clone())]).inc_by(d.errors);
        }
        let labels = vec![("pool", pool)];
        let online = matches!(p.status, PoolStatus::Online(_));
        pool_online.get_or_create(&labels).set(i64::from(online));
        if let PoolStatus::Online(info) = p.status {
            capacity.get_or_create(&labels).set(int(info.capacity.bytes()));
            used.get_or_create(&labels).set(int(info.used.bytes()));
            replicas.get_or_create(&labels).set(int(info.replica_count as u64));
        }
    }

    let nexus_size = gauge_family(&mut r, "trireme_nexus_size_bytes", "Size of the volume's nexus");
    let nexus_state = gauge_family(
        &mut r,
        "trireme_nexus_state",
        "1 for the nexus's current state (online, degraded, faulted)",
    );
    let children = gauge_family(&mut r, "trireme_nexus_children", "Children of the nexus by state");
    let child_state = gauge_family(
        &mut r,
        "trireme_child_state",
        "1 for each child's current state (online, faulted, rebuilding)",
    );
    let rebuild_bytes = counter_family(
        &mut r,
        "trireme_rebuild_bytes",
        "Bytes rebuilds copied into the nexus's children",
    );
    for n in engine.list_nexuses() {
        let volume = n.volume().to_string();
        nexus_size.get_or_create(&vec![("volume", volume.clone())]).set(int(n.size()));
        for s in [NexusState::Online, NexusState::Degraded, NexusState::Faulted] {
            let labels = vec![("volume", volume.clone()), ("state", s.to_string())];
            nexus_state.get_or_create(&labels).set(i64::from(n.state() == s));
        }
        for c in n.children() {
            let state = match c.state {
                ChildState::Online => "online",
                ChildState::Faulted { .. } => "faulted",
                ChildState::Rebuilding { .. } => "rebuilding",
            };
            children
                .get_or_create(&vec![("volume", volume.clone()), ("state", state.to_owned())])
                .inc();
            for s in ["online", "faulted", "rebuilding"] {
                let labels = vec![
                    ("volume", volume.clone()),
                    ("replica", c.replica.to_string()),
                    ("state", s.to_owned()),
                ];
                child_state.get_or_create(&labels).set(i64::from(s == state));
            }
        }
        rebuild_bytes
            .get_or_create(&vec![("volume", volume.clone())])
            .inc_by(n.rebuild_bytes_total());
    }

    let read_ops = counter_family(&mut r, "trireme_nbd_read_ops", "NBD reads served, by export");
    let read_bytes =
        counter_family(&mut r, "trireme_nbd_read_bytes", "Bytes read over NBD, by export");
    let write_ops = counter_family(&mut r, "trireme_nbd_write_ops", "NBD writes served, by export");
    let write_bytes =
        counter_family(&mut r, "trireme_nbd_write_bytes", "Bytes written over NBD, by export");
    let other_ops = counter_family(
        &mut r,
        "trireme_nbd_other_ops",
        "NBD flush, trim, write-zeroes and block-status requests, by export",
    );
    let errors =
        counter_family(&mut r, "trireme_nbd_errors", "NBD requests answered with an error");
    let latency = histogram_family(
        &mut r,
        "trireme_nbd_latency_seconds",
        "Time from an NBD request's arrival to its reply being ready, by export and operation \
         (read, write, flush, other)",
    );
    for (export, s) in nbd.all() {
        for kind in OpKind::ALL {
            let labels = vec![("export", export.clone()), ("op", kind.as_str().to_owned())];
            // A fresh family per scrape: the cell is always empty here.
            let _ = latency.get_or_create(&labels).0.set(*s.latency(kind));
        }
        let labels = vec![("export", export)];
        read_ops.get_or_create(&labels).inc_by(s.read_ops);
        read_bytes.get_or_create(&labels).inc_by(s.read_bytes);
        write_ops.get_or_create(&labels).inc_by(s.write_ops);
        write_bytes.get_or_create(&labels).inc_by(s.write_bytes);
        other_ops.get_or_create(&labels).inc_by(s.other_ops);
        errors.get_or_create(&labels).inc_by(s.errors);
    }

    let mut out = String::new();
    encode(&mut out, &r)?;
    Ok(out)
}
