//! `trireme up`: a whole cluster on one machine, for trying Trireme out, for development and for
//! the integration tests. It runs the same `trireme` executable as child processes — one
//! control with the embedded store and N engines with a file-backed pool each — and supervises
//! them the way Kubernetes would supervise pods.
//!
//! ```text
//!                    trireme up  (lock: DIR/up.lock, state: DIR/up.json)
//!                 ┌──────┴───────────┬──────────────────┐
//!          trireme control     trireme engine      trireme engine   …
//!          API  :P              node-1              node-2
//!          gRPC :P+1  ◄──────── gRPC :P+12         gRPC :P+14
//!          DIR/control/         NBD  :P+13         NBD  :P+15
//!                               DIR/node-1/pool.img
//! ```
//!
//! Startup: lock the data directory, start control, wait for `/readyz`, start the engines,
//! wait until each has registered, then create each engine's pool through the REST API (an
//! idempotent create, so a second `up` on the same directory resumes the same cluster: same
//! store, same tokens, pools re-imported by their engines, volumes intact). Shutdown (the
//! cancellation token, i.e. Ctrl-C or SIGTERM): SIGTERM to every child, SIGKILL to those still
//! running after 10 s.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod bootstrap;
mod error;
mod layout;
mod lock;
mod ports;
mod state;
mod supervise;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use clap::Args;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trireme_types::ByteSize;

pub use error::UpError;
pub use layout::{Layout, node_name, pool_name};
pub use ports::{EnginePorts, Ports, http_url, parse_api_addr};
pub use state::{ControlState, NodeState, STATE_VERSION, UpState};
pub use supervise::Backoff;

use supervise::ChildSpec;

/// The API address `up` listens on by default, and the CLI's default API.
pub const DEFAULT_API: &str = "127.0.0.1:7480";

/// `trireme up`: start a whole cluster on this machine.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Where the cluster keeps its store, tokens, pools and logs
    /// [default: $TRIREME_DATA_DIR, else $XDG_DATA_HOME/trireme, else ~/.local/share/trireme]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// How many engines (storage nodes) to run [default: as many as the data directory's
    /// cluster had, else 3].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=100))]
    pub nodes: Option<u16>,

    /// The size of each engine's file-backed pool (KiB, MiB, GiB, TiB) [default: the size of
    /// the data directory's existing pools, else 4GiB]. An existing pool keeps its size.
    #[arg(long, value_name = "SIZE")]
    pub pool_size: Option<ByteSize>,

    /// The REST API's listen address; every other port derives from its port P (control gRPC
    /// P+1, engine i gRPC P+10+2i and NBD P+11+2i, and with N nodes, engine i metrics
    /// P+11+2N+i).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_API, value_parser = parse_api_addr)]
    pub api: SocketAddr,

    /// Async runtime threads per engine [default: the machine's CPUs but one, shared out among
    /// the engines, at least 1]. `up` runs every engine on one machine, beside the programs
    /// that use the volumes: giving each engine a thread per CPU would oversubscribe it, and
    /// tasks handed between threads cost a cross-CPU wakeup.
    #[arg(long, value_name = "N")]
    pub engine_threads: Option<NonZeroUsize>,

    /// The executable to run the servers with [default: this one].
    #[arg(long, value_name = "PATH", hide = true, env = "TRIREME_UP_BINARY")]
    pub binary: Option<PathBuf>,

    /// Extra environment for every child (the binary passes its log format on this way).
    #[arg(skip)]
    pub child_env: Vec<(String, String)>,
}

impl UpArgs {
    /// The nodes to run (the default until `run` has looked at the data directory).
    fn node_count(&self) -> u16 {
        self.nodes.unwrap_or(DEFAULT_NODES)
    }

    /// The size of new pools (the default until `run` has looked at the data directory).
    fn pool_size(&self) -> ByteSize {
        self.pool_size.unwrap_or(DEFAULT_POOL_SIZE)
    }
}

/// Pool size when neither the flag nor an earlier run says otherwise.
const DEFAULT_POOL_SIZE: ByteSize = ByteSize::gib(4);

/// The data directory `up` uses without `--data-dir`: `$TRIREME_DATA_DIR`, else
/// `$XDG_DATA_HOME/trireme`, else `$HOME/.local/share/trireme`. The CLI looks for the admin
/// token and `up.json` here.
pub fn default_data_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("TRIREME_DATA_DIR")
        .or_else(|| var("XDG_DATA_HOME").map(|d| d.join("trireme")))
        .or_else(|| var("HOME").map(|h| h.join(".local/share/trireme")))
}

/// Runs a cluster until `shutdown` is cancelled, then stops every child. Returns an error if
/// the cluster cannot be started (after stopping whatever was started).
pub async fn run(args: UpArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    Ok(run_cluster(args, shutdown).await?)
}

/// Nodes when neither the flag nor an earlier run says otherwise.
const DEFAULT_NODES: u16 = 3;

/// The flag if given, else as many nodes as the data directory's cluster had, else the default.
fn nodes_to_run(flag: Option<u16>, earlier: u16) -> u16 {
    flag.or((earlier > 0).then_some(earlier)).unwrap_or(DEFAULT_NODES)
}

async fn run_cluster(mut args: UpArgs, shutdown: CancellationToken) -> Result<(), UpError> {
    let dir = args.data_dir.clone().or_else(default_data_dir).ok_or(UpError::NoDataDir)?;
    let earlier = Layout::new(&dir).existing_nodes();
    let nodes = nodes_to_run(args.nodes, earlier);
    if nodes < earlier {
        tracing::warn!(
            "this cluster had {earlier} nodes; starting {nodes} leaves node-{}..node-{earlier} \
             offline, and volumes with replicas there degraded or unavailable \
             (`trireme up --nodes {earlier}` brings them back)",
            nodes + 1
        );
    }
    args.nodes = Some(nodes);
    args.pool_size = args.pool_size.or_else(|| Layout::new(&dir).existing_pool_size());
    let dir = prepare_dir(&dir, nodes)?;
    let layout = Layout::new(&dir);
    let _lock = lock::DirLock::acquire(&layout.lock_file(), &dir)?;
    let ports = Ports::derive(args.api, nodes)?;
    check_ports_free(&ports)?;
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().map_err(UpError::NoBinary)?,
    };

    let (state_tx, state_rx) = watch::channel(initial_state(&layout, &ports));
    // `stop` ends the children and the writer: on shutdown, or when startup fails.
    let stop = shutdown.child_token();
    let tasks = TaskTracker::new();
    tasks.spawn(state::write_on_change(state_rx, layout.state_file(), stop.clone()));
    // Control stops last: a stopping engine records its nexuses' clean shutdown through it,
    // and with control gone first that record would only time out.
    let control_stop = CancellationToken::new();
    let control = tokio::spawn(supervise::supervise(
        control_spec(&binary, &layout, &ports, &args.child_env),
        state_tx.clone(),
        control_stop.clone(),
    ));

    let api_url = http_url(ports.api);
    let started = tokio::select! {
        r = start(&args, &layout, &ports, &binary, &api_url, &state_tx, &tasks, &stop) => Some(r),
        () = shutdown.cancelled() => None,
    };
    let outcome = match started {
        Some(Ok(())) => {
            state_tx.send_modify(|s| s.ready = true);
            print_banner(&args, &layout, &api_url);
            shutdown.cancelled().await;
            Ok(())
        }
        Some(Err(e)) => Err(e),
        None => Ok(()),
    };

    tracing::info!("stopping the cluster");
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    control_stop.cancel();
    if let Err(e) = control.await {
        tracing::warn!(error = %e, "the control supervisor panicked");
    }
    // The file describes a running cluster; leaving it would hand out dead pids.
    if let Err(e) = std::fs::remove_file(layout.state_file())
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(error = %e, "cannot remove up.json");
    }
    if outcome.is_ok() {
        tracing::info!("cluster stopped");
    }
    outcome
}

/// Waits for control, starts the engines, waits for them and ensures their pools.
#[allow(clippy::too_many_arguments)]
async fn start(
    args: &UpArgs,
    layout: &Layout,
    ports: &Ports,
    binary: &Path,
    api_url: &str,
    state: &watch::Sender<UpState>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<(), UpError> {
    let observed = state.subscribe();
    let client = bootstrap::wait_for_control(api_url, layout, &observed).await?;
    tracing::info!(url = %api_url, "control is ready");
    let threads = args.engine_threads.unwrap_or_else(|| engine_threads(args.node_count()));
    for engine in &ports.engines {
        let spec = engine_spec(binary, layout, ports, engine, threads, &args.child_env);
        tasks.spawn(supervise::supervise(spec, state.clone(), stop.clone()));
    }
    bootstrap::wait_for_nodes(&client, args.node_count(), layout, &observed).await?;
    tracing::info!(nodes = args.node_count(), "every node is online");
    for engine in &ports.engines {
        bootstrap::ensure_pool(&client, engine.index, args.pool_size(), layout, &observed).await?;
    }
    bootstrap::wait_for_pools(&client, args.node_count(), layout, &observed).await?;
    tracing::info!(pools = args.node_count(), "every pool is online");
    Ok(())
}

/// Creates the directory tree (private: it holds the admin token) and returns its absolute path.
fn prepare_dir(dir: &Path, nodes: u16) -> Result<PathBuf, UpError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| UpError::DataDir { dir: dir.to_owned(), source };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
    let dir = dir.canonicalize().map_err(err)?;
    let layout = Layout::new(&dir);
    let mut subdirs = vec![layout.control_dir(), layout.logs_dir()];
    subdirs.extend((1..=nodes).map(|i| layout.node_dir(i)));
    for sub in subdirs {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&sub).map_err(err)?;
    }
    Ok(dir)
}

/// Fails early, with the port's name, rather than letting children crash-loop on a bind error.
fn check_ports_free(ports: &Ports) -> Result<(), UpError> {
    for (what, addr) in ports.all() {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => drop(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(UpError::PortInUse { what, addr });
            }
            Err(source) => return Err(UpError::PortUnusable { what, addr, source }),
        }
    }
    Ok(())
}

fn control_spec(
    binary: &Path,
    layout: &Layout,
    ports: &Ports,
    env: &[(String, String)],
) -> ChildSpec {
    let args = [
        "control".to_owned(),
        "--api-listen".into(),
        ports.api.to_string(),
        "--grpc-listen".into(),
        ports.control_grpc.to_string(),
        "--data-dir".into(),
        layout.control_dir().display().to_string(),
    ];
    ChildSpec {
        name: "control".into(),
        binary: binary.to_owned(),
        args: args.into_iter().map(Into::into).collect(),
        env: env.to_vec(),
        log: layout.log_file("control"),
    }
}

/// The default runtime threads per engine: the machine's CPUs but one (left to the volumes'
/// clients, which share the machine), shared out among `nodes` engines.
///
/// Measured on 2 CPUs with one engine (`bench/run.sh`): one thread served 4 KiB random reads
/// at QD32 at 1.21× qemu-nbd where two threads managed 0.90×, because requests hopped between
/// the threads, and 1 MiB transfers were no slower.
fn engine_threads(nodes: u16) -> NonZeroUsize {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    NonZeroUsize::new(cpus.saturating_sub(1) / usize::from(nodes.max(1)))
        .unwrap_or(NonZeroUsize::MIN)
}

fn engine_spec(
    binary: &Path,
    layout: &Layout,
    ports: &Ports,
    engine: &EnginePorts,
    threads: NonZeroUsize,
    env: &[(String, String)],
) -> ChildSpec {
    let name = node_name(engine.index);
    let args = [
        "engine".to_owned(),
        "--node-id".into(),
        name.clone(),
        "--grpc-listen".into(),
        engine.grpc.to_string(),
        "--nbd-listen".into(),
        engine.nbd.to_string(),
        "--nbd-advertise".into(),
        ports::reachable(engine.nbd).to_string(),
        "--control".into(),
        http_url(ports.control_grpc),
        "--state-dir".into(),
        layout.node_dir(engine.index).display().to_string(),
        "--worker-threads".into(),
        threads.to_string(),
        "--metrics-listen".into(),
        engine.metrics.to_string(),
    ];
    ChildSpec {
        log: layout.log_file(&name),
        name,
        binary: binary.to_owned(),
        args: args.into_iter().map(Into::into).collect(),
        env: env.to_vec(),
    }
}

fn initial_state(layout: &Layout, ports: &Ports) -> UpState {
    UpState {
        version: STATE_VERSION,
        pid: std::process::id(),
        data_dir: layout.root().to_owned(),
        api_url: http_url(ports.api),
        admin_token: layout.admin_token(),
        viewer_token: layout.viewer_token(),
        logs_dir: layout.logs_dir(),
        ready: false,
        control: ControlState {
            pid: None,
            api: ports.api,
            grpc: ports.control_grpc,
            data_dir: layout.control_dir(),
            log: layout.log_file("control"),
            restarts: 0,
        },
        nodes: ports
            .engines
            .iter()
            .map(|e| NodeState {
                name: node_name(e.index),
                pid: None,
                grpc: e.grpc,
                nbd: e.nbd,
                metrics: Some(ports::reachable(e.metrics)),
                state_dir: layout.node_dir(e.index),
                pool: pool_name(e.index),
                pool_disk: layout.pool_image(e.index),
                log: layout.log_file(&node_name(e.index)),
                restarts: 0,
            })
            .collect(),
    }
}

/// What a newcomer needs: where the API is, where the token is, where the logs are, and what
/// to type next.
fn banner(args: &UpArgs, layout: &Layout, api_url: &str) -> String {
    let default_dir =
        default_data_dir().and_then(|d| d.canonicalize().ok()).is_some_and(|d| d == layout.root());
    let mut out = format!(
        "Trireme is up: {} node{}, each with a {} pool.\n\
         \x20 API:          {api_url}\n\
         \x20 admin token:  {}\n\
         \x20 logs:         {}/\n\
         \x20 state:        {}\n\
         try:\n",
        args.node_count(),
        if args.node_count() == 1 { "" } else { "s" },
        args.pool_size(),
        layout.admin_token().display(),
        layout.logs_dir().display(),
        layout.state_file().display(),
    );
    // The CLI finds a cluster in the default data directory by itself; elsewhere it needs help.
    // TRIREME_DATA_DIR leads the CLI to up.json (the API's address) and the admin token, and
    // `dump` to the logs, so that every command reaches this cluster and no other.
    if !default_dir {
        out.push_str(&format!("  export TRIREME_DATA_DIR={}\n", layout.root().display()));
    }
    out.push_str(&format!(
        "  trireme volume create v1 --size {} && trireme volume publish v1\n",
        hint_size(args.pool_size())
    ));
    out.push_str("Ctrl-C stops the cluster; `trireme up` again resumes it.");
    out
}

/// 1GiB, or a quarter of a small pool, so that the suggested command works as typed.
fn hint_size(pool: ByteSize) -> ByteSize {
    let gib = ByteSize::gib(1);
    if pool.bytes() >= 2 * gib.bytes() {
        gib
    } else {
        ByteSize::mib((pool.bytes() / 4 / ByteSize::MIB).max(1))
    }
}

fn print_banner(args: &UpArgs, layout: &Layout, api_url: &str) {
    println!("{}", banner(args, layout, api_url));
}

#[cfg(test)]
mod tests;
