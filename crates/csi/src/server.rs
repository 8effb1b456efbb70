//! Serving the plugins over a unix socket until cancelled.

use std::path::Path;

use anyhow::Context as _;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::args::{ControllerArgs, NodeArgs};
use crate::controller::ControllerService;
use crate::identity::{IdentityService, Readiness};
use crate::node::NodeService;
use crate::proto::controller_server::ControllerServer;
use crate::proto::identity_server::IdentityServer;
use crate::proto::node_server::NodeServer;

/// Runs the controller plugin (Identity + Controller) until `shutdown` is cancelled.
pub async fn run_controller(
    args: ControllerArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let socket = args.common.socket_path()?;
    let client = args.common.client()?;
    let listener = bind(&socket)?;
    tracing::info!(endpoint = %socket.display(), api = client.base_url(), "CSI controller plugin serving");
    let identity = IdentityService::new(Readiness::Control(client.clone()));
    let result = Server::builder()
        .trace_fn(|req| tracing::info_span!("csi", rpc = %req.uri().path()))
        .add_service(IdentityServer::new(identity))
        .add_service(ControllerServer::new(ControllerService::new(client)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown.cancelled_owned())
        .await
        .context("CSI controller plugin failed");
    let _ = std::fs::remove_file(&socket);
    result
}

/// Runs the node plugin (Identity + Node) until `shutdown` is cancelled.
pub async fn run_node(args: NodeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let socket = args.common.socket_path()?;
    let client = args.common.client()?;
    anyhow::ensure!(!args.node_id.trim().is_empty(), "--node-id must not be empty");
    let node = NodeService::new(args.node_id.clone(), args.state_dir.clone(), client).await?;
    let listener = bind(&socket)?;
    tracing::info!(endpoint = %socket.display(), node = %args.node_id, state_dir = %args.state_dir.display(), "CSI node plugin serving");
    let identity = IdentityService::new(Readiness::NodeTools);
    let result = Server::builder()
        .trace_fn(|req| tracing::info_span!("csi", rpc = %req.uri().path()))
        .add_service(IdentityServer::new(identity))
        .add_service(NodeServer::new(node))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown.cancelled_owned())
        .await
        .context("CSI node plugin failed");
    let _ = std::fs::remove_file(&socket);
    result
}

/// Binds the socket, replacing a stale socket file a previous run left behind.
fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt as _;
            anyhow::ensure!(
                meta.file_type().is_socket(),
                "{} exists and is not a socket; refusing to replace it",
                socket.display()
            );
            std::fs::remove_file(socket)
                .with_context(|| format!("cannot remove stale socket {}", socket.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", socket.display())),
    }
    UnixListener::bind(socket).with_context(|| format!("cannot listen on {}", socket.display()))
}
