//! The control plane (`trireme control`): the registry of nodes, pools, replicas, volumes and
//! nexuses; the reconcilers that drive the engines to the spec; the scheduler; the REST API
//! with its OpenAPI document; and the gRPC registry engines register with.
//!
//! ```text
//!   REST (axum + utoipa) ──┐                      ┌── reconciler (timer + wake) ──> Engine gRPC
//!   gRPC Registry ─────────┼──> Registry ─ spec ──┤                                 on each node
//!   /metrics ──────────────┘       │              └── liveness watcher
//!                                  └──> Store (redb file in --data-dir)
//! ```
//!
//! Specs are written to the store before anything acts on them, so control can be killed at
//! any point and the reconciler finishes or undoes what was in flight after a restart.

mod args;
pub mod auth;
mod engine_client;
mod error;
mod events;
mod grpc;
mod metrics;
mod reconcile;
pub mod registry;
mod rest;
pub mod scheduler;

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use trireme_store::{RedbStore, StoreError};

pub use args::ControlArgs;
pub use auth::{ADMIN_TOKEN_FILE, VIEWER_TOKEN_FILE};
pub use error::ControlError;
pub use rest::openapi_json;

/// The store file inside the data dir.
pub const STORE_FILE: &str = "control.redb";
/// How long shutdown waits for servers and reconcilers before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs control until `shutdown` is cancelled (or a server fails).
pub async fn run(args: ControlArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(args, shutdown).await?.wait().await
}

/// A started control plane: its bound addresses (useful with port 0) and its tasks.
#[derive(Debug)]
pub struct Running {
    pub api_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub data_dir: PathBuf,
    cancel: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl Running {
    /// Waits until shutdown is requested or a task fails; then stops everything, bounded.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut result = Ok(());
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            Some(joined) = self.tasks.join_next() => {
                result = flatten(joined);
                self.cancel.cancel();
            }
        }
        let drain = async {
            while let Some(joined) = self.tasks.join_next().await {
                if let Err(e) = flatten(joined)
                    && result.is_ok()
                {
                    result = Err(e);
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            tracing::warn!(
                "control tasks did not stop within {} s; aborting them",
                SHUTDOWN_GRACE.as_secs()
            );
            self.tasks.shutdown().await;
        }
        tracing::info!("control stopped");
        result
    }
}

fn flatten(joined: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    joined.map_err(|e| anyhow::anyhow!("control task failed: {e}"))?
}

/// Opens the store, loads the registry, binds both listeners and starts every task.
pub async fn start(args: ControlArgs, shutdown: CancellationToken) -> anyhow::Result<Running> {
    if !args.data_dir.exists() {
        // Private from the start: it holds the tokens and every spec.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&args.data_dir)
            .with_context(|| format!("cannot create data dir {}", args.data_dir.display()))?;
    }
    let tokens = Arc::new(auth::Tokens::ensure(&args.data_dir)?);
    let store = open_store(&args.data_dir.join(STORE_FILE)).await?;
    let node_timeout = Duration::from_secs(args.node_timeout_secs.max(1));
    let engine_timeout = Duration::from_secs(args.engine_call_secs.max(1));
    let registry =
        Arc::new(registry::Registry::load(Arc::new(store), node_timeout, engine_timeout).await?);

    let api = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("cannot listen for the API on {}", args.api_listen))?;
    let grpc = tokio::net::TcpListener::bind(args.grpc_listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", args.grpc_listen))?;
    let api_addr = api.local_addr()?;
    let grpc_addr = grpc.local_addr()?;

    let cancel = shutdown.child_token();
    let mut tasks = JoinSet::new();

    let app = rest::router(
        rest::AppState { registry: registry.clone(), metrics: Arc::new(metrics::Metrics::new()) },
        tokens,
    );
    let c = cancel.clone();
    tasks.spawn(async move {
        axum::serve(api, app)
            .with_graceful_shutdown(c.cancelled_owned())
            .await
            .context("REST server failed")
    });

    let svc = trireme_rpc::registry_server::RegistryServer::new(grpc::RegistryService::new(
        registry.clone(),
    ));
    let c = cancel.clone();
    tasks.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc),
                c.cancelled_owned(),
            )
            .await
            .context("gRPC server failed")
    });

    let period = reconcile::Settings::from_args(&args);
    let (r, c) = (registry.clone(), cancel.clone());
    tasks.spawn(async move {
        reconcile::run(r, period, c).await;
        Ok(())
    });
    let (r, c) = (registry, cancel.clone());
    tasks.spawn(async move {
        reconcile::watch_liveness(r, c).await;
        Ok(())
    });

    tracing::info!(api = %api_addr, grpc = %grpc_addr, data_dir = %args.data_dir.display(), "control started");
    Ok(Running { api_addr, grpc_addr, data_dir: args.data_dir, cancel, tasks })
}

/// Opens the store, retrying briefly while a previous instance in this process lets go of it.
async fn open_store(path: &Path) -> anyhow::Result<RedbStore> {
    let mut attempt = 0;
    loop {
        match RedbStore::open(path).await {
            Ok(s) => return Ok(s),
            Err(e @ StoreError::Open { .. }) if attempt < 20 => {
                attempt += 1;
                tracing::debug!("store busy, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
