//! Listeners and connection lifecycle.
//!
//! ```text
//!  serve_tcp / serve_unix ── accept ──> connection task (TaskTracker)
//!                                         ├─ handshake (bounded by handshake_timeout)
//!                                         └─ transmission (reader + request tasks + writer)
//! ```
//! Every connection is independent: whatever one client sends only ends that client's
//! connection. On shutdown the listener stops accepting, each connection stops reading new
//! requests, lets in-flight ones finish within `shutdown_grace`, flushes its replies and
//! closes; the serve call returns when all connection tasks have ended. Requests still running
//! after the grace are carried out without a reply, never cancelled half way.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::export::ExportRegistry;
use crate::handshake::{HandshakeError, negotiate};
use crate::stats::ServerStats;
use crate::transmission;

/// Tunables of an NBD server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest READ/WRITE payload accepted (advertised as the maximum block size).
    pub max_request: u32,
    /// Requests of one connection being processed or waiting for their reply to be written.
    pub max_in_flight: usize,
    /// Payload bytes (READ and WRITE) one connection may hold in memory at once.
    pub max_buffered_bytes: usize,
    /// The whole negotiation must finish within this.
    pub handshake_timeout: Duration,
    /// Once a request has started arriving, the rest of it (and each reply write) must
    /// complete within this.
    pub io_timeout: Duration,
    /// On shutdown or disconnect, how long to wait for in-flight requests' replies. Requests
    /// still running then go on without one.
    pub shutdown_grace: Duration,
    /// Connections beyond this are closed right after accept.
    pub max_connections: usize,
    /// Counters of served operations per export; keep a clone to read them.
    pub stats: Arc<ServerStats>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_request: 32 << 20,
            max_in_flight: 128,
            max_buffered_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            max_connections: 1024,
            stats: Arc::default(),
        }
    }
}

/// Serves NBD on a TCP listener until `shutdown` is cancelled.
pub async fn serve_tcp(
    listener: TcpListener,
    registry: Arc<dyn ExportRegistry>,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    info!(%local, "NBD server listening");
    let server = Server::new(registry, config, shutdown.clone());
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Small replies must not wait for Nagle; failure only costs latency.
                if let Err(e) = stream.set_nodelay(true) {
                    debug!(%peer, "TCP_NODELAY failed: {e}");
                }
                let (r, w) = stream.into_split();
                server.spawn(r, w, peer.to_string());
            }
            Err(e) => accept_backoff(e).await,
        }
    }
    server.finish().await;
    Ok(())
}

/// Serves NBD on a Unix socket listener until `shutdown` is cancelled.
pub async fn serve_unix(
    listener: UnixListener,
    registry: Arc<dyn ExportRegistry>,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    info!(local = ?local.as_pathname(), "NBD server listening");
    let server = Server::new(registry, config, shutdown.clone());
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _)) => {
                next_id += 1;
                let (r, w) = stream.into_split();
                server.spawn(r, w, format!("unix#{next_id}"));
            }
            Err(e) => accept_backoff(e).await,
        }
    }
    server.finish().await;
    Ok(())
}

/// Accept errors are per connection (aborted handshakes) or transient (out of file
/// descriptors); neither should end the server. A short pause keeps EMFILE from spinning.
async fn accept_backoff(e: std::io::Error) {
    warn!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

struct Server {
    registry: Arc<dyn ExportRegistry>,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    connections: Arc<Semaphore>,
}

impl Server {
    fn new(
        registry: Arc<dyn ExportRegistry>,
        config: ServerConfig,
        shutdown: CancellationToken,
    ) -> Self {
        let connections = Arc::new(Semaphore::new(config.max_connections.max(1)));
        Self {
            registry,
            config: Arc::new(config),
            shutdown,
            tracker: TaskTracker::new(),
            connections,
        }
    }

    fn spawn<R, W>(&self, read: R, write: W, peer: String)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(permit) = Arc::clone(&self.connections).try_acquire_owned() else {
            warn!(%peer, "connection limit reached; closing new connection");
            return;
        };
        let registry = Arc::clone(&self.registry);
        let config = Arc::clone(&self.config);
        let cancel = self.shutdown.child_token();
        let span = info_span!("nbd", %peer);
        self.tracker.spawn(
            async move {
                connection(read, write, registry, &config, cancel).await;
                drop(permit);
            }
            .instrument(span),
        );
    }

    async fn finish(self) {
        self.tracker.close();
        self.tracker.wait().await;
        info!("NBD server stopped");
    }
}

async fn connection<R, W>(
    read: R,
    mut write: W,
    registry: Arc<dyn ExportRegistry>,
    config: &ServerConfig,
    cancel: CancellationToken,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Large enough to batch pipelined small requests into one read; WRITE payloads bigger than
    // this bypass it and land directly in their IoBuf.
    let mut reader = BufReader::with_capacity(64 << 10, read);
    let negotiation = tokio::select! {
        () = cancel.cancelled() => return,
        r = timeout(
            config.handshake_timeout,
            negotiate(&mut reader, &mut write, registry.as_ref(), config.max_request),
        ) => r,
    };
    let session = match negotiation {
        Ok(Ok(session)) => session,
        Ok(Err(HandshakeError::Aborted)) => {
            debug!("client aborted the negotiation");
            return;
        }
        Ok(Err(HandshakeError::Io(e))) => {
            debug!("negotiation ended: {e}");
            return;
        }
        Ok(Err(e @ HandshakeError::Protocol(_))) => {
            warn!("dropping client during negotiation: {e}");
            return;
        }
        Err(_) => {
            warn!("negotiation timed out");
            return;
        }
    };
    let stats = config.stats.for_export(&session.name);
    debug!(export = %session.name, size = session.size, structured = session.structured,
           "entering transmission");
    let span = info_span!("export", name = %session.name);
    transmission::run(session, reader, write, config, stats, cancel).instrument(span).await;
}
