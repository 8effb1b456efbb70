//! The storage engine (`trireme engine`): one per storage node. It owns the node's pools,
//! carves replicas out of them, hosts a nexus per published volume, shares nexuses and
//! replicas over NBD, and serves the `Engine` gRPC API that control drives.
//!
//! ```text
//!            control ──gRPC──> grpc::EngineService ──> engine::Engine ──> pools::Pools ──> trireme_pool
//!               ^  ^                                       │
//!   registration   │                                       ├── nexus::Nexus (one per volume) ──> children:
//!                  └── recorder_grpc (membership, DRL) <───┤     LocalChild | remote::RemoteChild (NBD)
//!                                                          └── share::Shares ──> NBD server (trireme_nbd)
//!                                                                 └── fence::Fence per replica (epochs)
//! ```
//!
//! Replication: a nexus's children are replicas here or on other engines; each is claimed with
//! the nexus's epoch through its replica's fence, so a superseded nexus is refused by every
//! replica it still reaches (`fence.rs`). Membership changes and dirty regions are recorded
//! with control before the nexus acknowledges writes that depend on them (`recorder_grpc.rs`).
//!
//! Startup order matters: both listeners are bound first, so that the endpoints advertised to
//! control work the moment control calls back; pools are imported from the state directory;
//! then the servers start and registration runs beside them, never blocking them. Shutdown
//! stops the servers, then flushes every nexus and closes every pool, each step bounded in time.

// Tests may unwrap: a panic there is a test failure with a backtrace.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod args;
mod engine;
mod error;
mod fence;
mod grpc;
mod metrics;
pub mod nexus;
mod pools;
mod recorder_grpc;
mod registration;
mod share;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use nix::fcntl::{Flock, FlockArg};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use args::EngineArgs;
pub use engine::{ChildRequest, Endpoints, Engine, NexusRequest, NexusSettings};
pub use error::EngineError;
pub use grpc::{EngineService, to_status};
pub use pools::{PoolStatus, PoolView};
pub use recorder_grpc::{GrpcRecorder, RecorderTimeouts};
pub use share::{Shares, nexus_export_name, replica_epoch_export_name, replica_export_name};

/// The engine's version, reported to control.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long the servers get to finish in-flight requests at shutdown.
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long flushing nexuses and closing pools may take at shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on connecting to a remote child (TCP plus the NBD negotiation).
const REMOTE_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Upper bound for one gRPC request (pool creation formats a disk, so not short).
const GRPC_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the engine until `shutdown` is cancelled (or a server fails), then stops cleanly.
pub async fn run(args: EngineArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(args, shutdown).await?.wait().await
}

/// A started engine: its listeners are bound and its servers running.
pub struct RunningEngine {
    engine: Arc<Engine>,
    grpc_addr: SocketAddr,
    nbd_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    /// Cancelled on shutdown or when any server fails; a child of the caller's token.
    stop: CancellationToken,
    tasks: JoinSet<(&'static str, anyhow::Result<()>)>,
    /// Held until the pools are closed, so a second engine cannot import them meanwhile.
    _state_lock: Flock<std::fs::File>,
}

/// Takes an exclusive lock on the state directory: two engines importing the same pools
/// would corrupt them.
fn lock_state_dir(dir: &std::path::Path) -> anyhow::Result<Flock<std::fs::File>> {
    let path = dir.join("engine.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow::anyhow!("another engine is using the state directory {} ({errno})", dir.display())
    })
}

/// What the engine's nexuses are created with, from its flags: remote children's time limits,
/// the rebuild limits, and the recorder (control's Registry, or nowhere without `--control`).
fn nexus_settings(args: &EngineArgs) -> anyhow::Result<NexusSettings> {
    let io_timeout = Duration::from_millis(args.child_timeout_ms);
    let remote = nexus::remote::RemoteOptions {
        connect_timeout: REMOTE_CONNECT_TIMEOUT.min(io_timeout),
        io_timeout,
    };
    let concurrency = usize::try_from(args.rebuild_concurrency).unwrap_or(usize::MAX);
    let rebuild = Arc::new(nexus::RebuildLimits::new(args.rebuild_bandwidth_mib, concurrency));
    let recorder: Arc<dyn nexus::Recorder> = match args.control.as_deref() {
        Some(control) => {
            Arc::new(GrpcRecorder::new(control, args.node_id.clone(), RecorderTimeouts::default())?)
        }
        None => Arc::new(nexus::recorder::NoRecorder),
    };
    Ok(NexusSettings { remote, rebuild, recorder })
}

/// Binds the listeners, imports the pools, and starts the servers and registration.
pub async fn start(args: EngineArgs, shutdown: CancellationToken) -> anyhow::Result<RunningEngine> {
    tokio::fs::create_dir_all(&args.state_dir).await.with_context(|| {
        format!("cannot create the state directory {}", args.state_dir.display())
    })?;
    let state_lock = lock_state_dir(&args.state_dir)?;
    let grpc_listener = TcpListener::bind(args.grpc_listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", args.grpc_listen))?;
    let nbd_listener = TcpListener::bind(args.nbd_listen)
        .await
        .with_context(|| format!("cannot listen for NBD on {}", args.nbd_listen))?;
    let metrics_listener = match args.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?,
        ),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let grpc_addr = grpc_listener.local_addr()?;
    let nbd_addr = nbd_listener.local_addr()?;
    let endpoints = Endpoints {
        grpc: args::advertise(args.grpc_advertise.as_deref(), grpc_addr),
        nbd: args::advertise(args.nbd_advertise.as_deref(), nbd_addr),
    };
    // Validate the control endpoint before anything runs: a typo is a startup error.
    let registration = args
        .control
        .as_deref()
        .map(|control| {
            registration::Registration::new(
                control,
                args.node_id.clone(),
                endpoints.clone(),
                Duration::from_secs(args.heartbeat_secs),
            )
        })
        .transpose()?;

    let settings = nexus_settings(&args)?;
    let engine = Arc::new(
        Engine::load(args.node_id.clone(), endpoints.clone(), &args.state_dir, settings)
            .await
            .context("cannot load the engine's pools")?,
    );

    let stop = shutdown.child_token();
    let mut tasks = JoinSet::new();
    let nbd_stats = Arc::new(trireme_nbd::ServerStats::default());
    {
        let registry = engine.shares();
        let stats = Arc::clone(&nbd_stats);
        let token = stop.clone();
        tasks.spawn(async move {
            let served = share::serve_nbd(nbd_listener, registry, stats, token).await;
            ("nbd server", served.context("NBD server failed"))
        });
    }
    {
        let service = EngineService::new(Arc::clone(&engine)).into_server();
        let token = stop.clone();
        tasks.spawn(async move {
            let served = tonic::transport::Server::builder()
                .timeout(GRPC_REQUEST_TIMEOUT)
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(grpc_listener),
                    token.cancelled_owned(),
                )
                .await;
            ("grpc server", served.context("gRPC server failed"))
        });
    }
    if let Some(listener) = metrics_listener {
        let engine = Arc::clone(&engine);
        let token = stop.clone();
        tasks.spawn(async move {
            let served = metrics::serve(listener, engine, nbd_stats, token).await;
            ("metrics server", served.context("metrics server failed"))
        });
    }
    if let Some(registration) = registration {
        let token = stop.clone();
        tasks.spawn(async move {
            registration.run(token).await;
            ("registration", Ok(()))
        });
    }
    tracing::info!(
        node = %args.node_id, grpc = %endpoints.grpc, nbd = %endpoints.nbd,
        state_dir = %args.state_dir.display(), "engine started"
    );
    Ok(RunningEngine {
        engine,
        grpc_addr,
        nbd_addr,
        metrics_addr,
        stop,
        tasks,
        _state_lock: state_lock,
    })
}

impl RunningEngine {
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The bound gRPC address (the actual port when listening on port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound NBD address.
    pub fn nbd_addr(&self) -> SocketAddr {
        self.nbd_addr
    }

    /// The bound `/metrics` address, if metrics are served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Waits for shutdown (or a server failure), then stops the servers and closes the
    /// pools, each step within a bounded time.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut failure = None;
        tokio::select! {
            biased;
            () = self.stop.cancelled() => {}
            Some(ended) = self.tasks.join_next() => {
                // A server ending on its own (not because it was told to stop) is a failure:
                // stop the rest. Both may be ready at once when shutdown races a server's exit.
                failure = (!self.stop.is_cancelled()).then(|| match ended {
                    Ok((name, Ok(()))) => anyhow::anyhow!("{name} stopped unexpectedly"),
                    Ok((_, Err(e))) => e,
                    Err(e) => anyhow::anyhow!("a server task panicked: {e}"),
                });
            }
        }
        tracing::info!("engine stopping");
        self.stop.cancel();
        let drain = async {
            while let Some(ended) = self.tasks.join_next().await {
                match ended {
                    Ok((_, Ok(()))) => {}
                    Ok((name, Err(e))) => {
                        tracing::warn!(task = name, error = %e, "task failed while stopping")
                    }
                    Err(e) => tracing::warn!(error = %e, "task panicked while stopping"),
                }
            }
        };
        if tokio::time::timeout(SERVER_STOP_TIMEOUT, drain).await.is_err() {
            tracing::warn!("servers did not stop in time; aborting them");
            self.tasks.abort_all();
        }
        if tokio::time::timeout(CLOSE_TIMEOUT, self.engine.shutdown()).await.is_err() {
            tracing::error!("closing nexuses and pools did not finish in time");
        }
        tracing::info!("engine stopped");
        failure.map_or(Ok(()), Err)
    }
}
