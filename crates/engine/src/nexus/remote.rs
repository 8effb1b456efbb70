//! A replica on another engine, reached over NBD: the [`Child`] a nexus holds for every
//! replica that is not in one of its own pools.
//!
//! ```text
//!   Nexus ──> RemoteChild ──ReconnectingClient──TCP──> engine B: share "replica-<uuid>@<epoch>"
//!                                                          └─> Fence(replica) ─> pool
//! ```
//!
//! **Bounded.** Connecting (TCP plus the NBD negotiation) is bounded by
//! [`RemoteOptions::connect_timeout`]; every request, including a reconnection it may need, by
//! [`RemoteOptions::io_timeout`]. A peer that stalls or vanishes therefore costs a nexus at
//! most one timeout per request: the child answers [`ChildError::Timeout`] or
//! [`ChildError::Disconnected`] and the nexus faults it. The dead connection is never retried
//! by the request that saw it fail; the next request makes one attempt to reconnect.
//!
//! **Fenced.** The export name carries the nexus's epoch; the serving engine claims the replica
//! for it and refuses requests once a newer epoch claimed it, with `EPERM`, which is mapped to
//! [`ChildError::Fenced`]. Opening sends one FLUSH, so the claim is made (and a stale epoch
//! discovered) before the child is handed to a nexus.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use trireme_iobuf::IoBuf;
use trireme_nbd::proto::errno;
use trireme_nbd::{ClientAddr, ClientError, ClientOptions, ReconnectPolicy, ReconnectingClient};
use trireme_types::ReplicaId;

use crate::nexus::{Child, ChildError, ChildExtent, ChildUri};

/// The prefix of a replica's export name (`replica-<uuid>`); the epoch is appended as `@<n>`.
const REPLICA_EXPORT_PREFIX: &str = "replica-";

/// Time limits of a remote child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteOptions {
    /// Bounds connecting plus the NBD negotiation.
    pub connect_timeout: Duration,
    /// Bounds every request, from its call to its answer.
    pub io_timeout: Duration,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self { connect_timeout: Duration::from_secs(3), io_timeout: Duration::from_secs(5) }
    }
}

/// Why a URI cannot name a remote child.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteUriError {
    #[error("{uri} is not a remote child URI")]
    NotRemote { uri: String },
    #[error("export {export:?} is not a replica share (expected replica-<uuid>)")]
    NotAReplica { export: String },
}

/// The replica a remote child URI names (`nbd://host:port/replica-<uuid>`).
pub fn remote_replica(uri: &ChildUri) -> Result<ReplicaId, RemoteUriError> {
    let ChildUri::Nbd { export, .. } = uri else {
        return Err(RemoteUriError::NotRemote { uri: uri.to_string() });
    };
    export
        .strip_prefix(REPLICA_EXPORT_PREFIX)
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| RemoteUriError::NotAReplica { export: export.clone() })
}

/// A replica shared by another engine, claimed by the nexus of one epoch.
pub struct RemoteChild {
    uri: ChildUri,
    replica: ReplicaId,
    epoch: u64,
    client: ReconnectingClient,
    io_timeout: Duration,
    /// The connection this child works on (see [`ReconnectingClient::generation`]). A request
    /// that had to connect anew is not silently served: the peer may have restarted and lost
    /// writes it had acknowledged, so the child reports itself disconnected and the nexus
    /// faults it (logging what it may have lost) and rebuilds it before trusting it again.
    connection: AtomicU64,
}

impl std::fmt::Debug for RemoteChild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteChild")
            .field("uri", &self.uri.to_string())
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl RemoteChild {
    /// Connects to the replica `uri` names, claims it for `epoch` and returns the child.
    /// Fails with `Timeout`, `Disconnected` (unreachable, or no such replica there), or
    /// `Fenced` (a newer epoch claimed it).
    pub async fn open(uri: &ChildUri, epoch: u64, opts: RemoteOptions) -> Result<Self, ChildError> {
        let replica = remote_replica(uri).map_err(|e| ChildError::Io(e.to_string()))?;
        let ChildUri::Nbd { authority, export } = uri else {
            return Err(ChildError::Io(format!("{uri} is not a remote child URI")));
        };
        let addr = ClientAddr::Tcp(with_default_port(authority));
        let client_opts = ClientOptions {
            connect_timeout: opts.connect_timeout,
            io_timeout: opts.io_timeout,
            ..ClientOptions::default()
        };
        // One attempt per demand: a request waiting for a dead peer must not outlive its
        // timeout, and the nexus (or control, through AddChild) decides about retrying.
        let policy = ReconnectPolicy { max_attempts: 1, ..ReconnectPolicy::default() };
        let export = format!("{export}@{epoch}");
        let client = ReconnectingClient::connect(addr, &export, client_opts, policy)
            .await
            .map_err(|e| child_error(&e, epoch))?;
        let connection = AtomicU64::new(client.generation());
        let child = Self {
            uri: uri.clone(),
            replica,
            epoch,
            client,
            io_timeout: opts.io_timeout,
            connection,
        };
        // The first request makes the claim durable on the serving engine, or tells us we are
        // already stale.
        child.flush().await?;
        tracing::debug!(uri = %child.uri, epoch, "remote child opened");
        Ok(child)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Reconnects to learn the replica's current size (an NBD connection keeps the size it
    /// negotiated, so a replica grown on its engine looks unchanged until then). Requests in
    /// flight finish on the old connection. Returns the new size.
    pub async fn refresh_size(&self) -> Result<u64, ChildError> {
        let reconnect = async {
            let c = self.client.reconnect().await?;
            // Deliberate: nothing was lost, the next requests may use it.
            self.connection.store(self.client.generation(), Ordering::Release);
            Ok(c.size())
        };
        self.timed("reconnect", reconnect).await
    }

    /// Closes the connection cleanly (bounded by the I/O timeout). Later requests fail.
    pub async fn close(&self) {
        let _ = tokio::time::timeout(self.io_timeout, self.client.disconnect()).await;
    }

    /// Runs one client call within the I/O timeout (which also bounds a reconnection), on
    /// the connection this child started with.
    async fn bounded<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ChildError> {
        let result = self.timed(op, call).await;
        if self.client.generation() != self.connection.load(Ordering::Acquire) {
            tracing::warn!(uri = %self.uri, op, "remote child reconnected; it may have lost writes");
            return Err(ChildError::Disconnected);
        }
        result
    }

    /// Runs one client call within the I/O timeout.
    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ChildError> {
        let err = match tokio::time::timeout(self.io_timeout, call).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => {
                tracing::debug!(uri = %self.uri, op, error = %e, "remote child request failed");
                child_error(&e, self.epoch)
            }
            Err(_) => {
                tracing::debug!(uri = %self.uri, op, after = ?self.io_timeout, "remote child timed out");
                ChildError::Timeout
            }
        };
        // The nexus faults the child on this error and goes on without it. Writes still
        // queued on this connection must die with it: delivered after a partition heals, they
        // would land after the rebuild that brings the replica back, over newer data.
        if matches!(err, ChildError::Timeout | ChildError::Disconnected) {
            self.client.abort_current();
        }
        Err(err)
    }
}

/// `host` alone means the NBD port.
fn with_default_port(authority: &str) -> String {
    let has_port = match authority.rsplit_once(':') {
        // `[v6]` without a port ends in `]`.
        Some((_, port)) => !port.ends_with(']') && port.parse::<u16>().is_ok(),
        None => false,
    };
    if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:{}", trireme_nbd::DEFAULT_PORT)
    }
}

/// The one mapping of NBD client errors to child errors (`epoch`: the child's, for messages).
fn child_error(e: &ClientError, epoch: u64) -> ChildError {
    match e {
        ClientError::Timeout { .. } => ChildError::Timeout,
        ClientError::Connect { .. }
        | ClientError::Disconnected { .. }
        | ClientError::Handshake { .. }
        | ClientError::Protocol { .. } => ChildError::Disconnected,
        // The serving engine refuses a stale epoch with EPERM (see `share.rs`).
        ClientError::Server { errno: errno::EPERM, .. } => ChildError::Fenced(format!(
            "a newer epoch than {epoch} claimed the replica; its engine refuses this one"
        )),
        ClientError::Server { errno: errno::ENOSPC, .. } => ChildError::NoSpace,
        // The peer is shutting down: as good as gone.
        ClientError::Server { errno: errno::ESHUTDOWN, .. } => ChildError::Disconnected,
        ClientError::Server { .. }
        | ClientError::InvalidUri { .. }
        | ClientError::Unsupported { .. }
        | ClientError::Invalid { .. } => ChildError::Io(e.to_string()),
    }
}

#[async_trait]
impl Child for RemoteChild {
    fn uri(&self) -> &ChildUri {
        &self.uri
    }
    fn replica_id(&self) -> ReplicaId {
        self.replica
    }
    fn size(&self) -> u64 {
        self.client.size()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, ChildError> {
        self.bounded("read", self.client.read(offset, len)).await
    }
    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), ChildError> {
        self.bounded("write", self.client.write(offset, data, fua)).await
    }
    async fn flush(&self) -> Result<(), ChildError> {
        self.bounded("flush", self.client.flush()).await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), ChildError> {
        self.bounded("trim", self.client.trim(offset, len, false)).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), ChildError> {
        self.bounded("write_zeroes", self.client.write_zeroes(offset, len, may_trim, false)).await
    }
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<ChildExtent>, ChildError> {
        // A server may describe less than asked: ask again from where it stopped. The whole
        // walk shares one time limit.
        let walk = async {
            let end = offset.saturating_add(len).min(self.client.size());
            if !self.client.capabilities().block_status {
                // A server without `base:allocation`: "allocated" is always a safe answer
                // (the caller then copies the data instead of skipping it).
                let length = end.saturating_sub(offset);
                return Ok(vec![ChildExtent { offset, length, allocated: true }]);
            }
            let mut runs: Vec<ChildExtent> = Vec::new();
            let mut pos = offset;
            while pos < end {
                let extents = self.client.block_status(pos, end - pos).await?;
                let before = pos;
                for e in extents {
                    let allocated = holds_data(&e);
                    match runs.last_mut() {
                        Some(last) if last.allocated == allocated => last.length += e.length,
                        _ => runs.push(ChildExtent { offset: pos, length: e.length, allocated }),
                    }
                    pos += e.length;
                }
                if pos == before {
                    return Err(ClientError::Protocol {
                        reason: "block status described no bytes".to_owned(),
                    });
                }
            }
            Ok(runs)
        };
        self.bounded("block_status", walk).await
    }
}

/// Whether a run must be copied to reproduce it: all but a hole that also reads as zeroes.
/// The protocol lets a hole read as anything (say, a backing file's data), and rebuild writes
/// zeroes for what it skips.
fn holds_data(e: &trireme_nbd::Extent) -> bool {
    !(e.hole && e.zero)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    use tokio_util::sync::CancellationToken;
    use trireme_nbd::{Export, ExportError, ExportRegistry, Extent};
    use trireme_pool::{CreateOptions, Pool, ReplicaMeta};
    use trireme_types::ByteSize;

    use super::*;
    use crate::nexus::LocalChild;
    use crate::share::Shares;

    const MIB: u64 = 1 << 20;

    /// An NBD server in this process sharing `registry`; cancelled (connections closed) on drop.
    struct Server {
        addr: std::net::SocketAddr,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Server {
        async fn start<R: ExportRegistry>(registry: Arc<R>) -> Self {
            Self::start_on("127.0.0.1:0".parse().unwrap(), registry).await
        }

        /// On `addr`: a peer restarting on the port it had.
        async fn start_on<R: ExportRegistry>(addr: std::net::SocketAddr, registry: Arc<R>) -> Self {
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = CancellationToken::new();
            let token = stop.clone();
            let task = tokio::spawn(async move {
                // A stalled request must not hold the kill up for long.
                let config = trireme_nbd::ServerConfig {
                    shutdown_grace: Duration::from_millis(200),
                    ..Default::default()
                };
                let _ = trireme_nbd::serve_tcp(listener, registry, config, token).await;
            });
            Self { addr, stop, task }
        }

        fn uri(&self, replica: ReplicaId) -> ChildUri {
            format!("nbd://{}/replica-{replica}", self.addr).parse().unwrap()
        }

        async fn kill(self) {
            self.stop.cancel();
            tokio::time::timeout(Duration::from_secs(30), self.task).await.unwrap().unwrap();
        }
    }

    /// A pool with one replica, shared like the engine shares it.
    struct Peer {
        _dir: tempfile::TempDir,
        pool: Arc<Pool>,
        shares: Arc<Shares>,
        replica: ReplicaId,
    }

    impl Peer {
        async fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let mut opts = CreateOptions::new("peer");
            opts.size = Some(ByteSize::mib(64));
            let pool = Pool::create(&dir.path().join("disk.img"), opts).await.unwrap();
            let replica = ReplicaId::new_random();
            pool.create_replica(replica, ByteSize::mib(8), true, ReplicaMeta::default())
                .await
                .unwrap();
            let shares = Arc::new(Shares::default());
            shares.share_replica(pool.open_replica(replica).unwrap(), &pool);
            Self { _dir: dir, pool, shares, replica }
        }

        fn local_child(&self, epoch: u64) -> LocalChild {
            let shared = self.shares.replica(self.replica).unwrap();
            LocalChild::new(shared.replica, shared.fence, epoch)
        }
    }

    fn fast() -> RemoteOptions {
        RemoteOptions {
            connect_timeout: Duration::from_secs(3),
            io_timeout: Duration::from_secs(5),
        }
    }

    fn pattern(len: usize, seed: u8) -> IoBuf {
        let bytes: Vec<u8> =
            (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        IoBuf::copy_from(&bytes)
    }

    #[test]
    fn only_holes_that_read_as_zeroes_are_skipped() {
        let run = |hole, zero| Extent { length: 4096, hole, zero };
        assert!(!holds_data(&run(true, true)));
        assert!(holds_data(&run(true, false)), "a hole over a backing file has data");
        assert!(holds_data(&run(false, true)));
        assert!(holds_data(&run(false, false)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_writes_and_allocation_round_trip() {
        let peer = Peer::new().await;
        let server = Server::start(Arc::clone(&peer.shares)).await;
        let child = RemoteChild::open(&server.uri(peer.replica), 1, fast()).await.unwrap();
        assert_eq!(child.replica_id(), peer.replica);
        assert_eq!(child.size(), 8 * MIB);
        assert_eq!(child.uri(), &server.uri(peer.replica), "the URI is reported without epoch");

        let data = pattern(64 << 10, 7);
        child.write(MIB, data.clone(), true).await.unwrap();
        let back = child.read(MIB, 64 << 10).await.unwrap();
        assert!(back[..] == data[..], "data read back differs");
        child.write_zeroes(MIB, 4096, false).await.unwrap();
        assert!(child.read(MIB, 4096).await.unwrap().iter().all(|&b| b == 0));
        child.trim(MIB + (32 << 10), 32 << 10).await.unwrap();
        child.flush().await.unwrap();

        // The allocation map covers the whole range asked, with the written region allocated.
        let runs = child.allocation(0, 8 * MIB).await.unwrap();
        assert_eq!(runs.first().unwrap().offset, 0);
        assert_eq!(runs.iter().map(|r| r.length).sum::<u64>(), 8 * MIB);
        let at = |off: u64| runs.iter().find(|r| r.offset <= off && off < r.offset + r.length);
        assert!(at(MIB).unwrap().allocated, "{runs:?}");
        assert!(!at(0).unwrap().allocated, "{runs:?}");
        assert!(!at(6 * MIB).unwrap().allocated, "{runs:?}");

        // The claim is durable on the serving side.
        assert_eq!(peer.pool.replica_info(peer.replica).unwrap().meta.epoch, 1);
        child.close().await;
        server.kill().await;
        peer.pool.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_newer_epoch_fences_older_children_and_the_plain_share_is_read_only() {
        let peer = Peer::new().await;
        let server = Server::start(Arc::clone(&peer.shares)).await;
        let uri = server.uri(peer.replica);
        let old = RemoteChild::open(&uri, 1, fast()).await.unwrap();
        let old_local = peer.local_child(1);
        old.write(0, pattern(4096, 1), false).await.unwrap();
        old_local.write(4096, pattern(4096, 2), false).await.unwrap();

        let new = RemoteChild::open(&uri, 2, fast()).await.unwrap();
        assert_eq!(peer.pool.replica_info(peer.replica).unwrap().meta.epoch, 2);
        for result in [
            old.write(0, pattern(4096, 3), false).await,
            old.flush().await,
            old.read(0, 4096).await.map(drop),
            old_local.write(0, pattern(4096, 3), false).await,
        ] {
            assert!(matches!(result, Err(ChildError::Fenced(_))), "{result:?}");
        }
        // The new epoch works, through either path, and sees the old data.
        new.write(8192, pattern(4096, 4), false).await.unwrap();
        assert!(new.read(0, 4096).await.unwrap()[..] == pattern(4096, 1)[..]);
        peer.local_child(2).read(8192, 4096).await.unwrap();

        // A lower claim is refused at open.
        let stale = RemoteChild::open(&uri, 1, fast()).await;
        assert!(matches!(stale, Err(ChildError::Fenced(_))), "{stale:?}");

        // The epoch-less share reads but never writes.
        let (addr, _) = ClientAddr::parse_uri(&uri.to_string()).unwrap();
        let plain = trireme_nbd::Client::connect(
            addr,
            &format!("replica-{}", peer.replica),
            ClientOptions::default(),
        )
        .await
        .unwrap();
        assert!(plain.capabilities().read_only);
        assert!(plain.read(8192, 4096).await.unwrap()[..] == pattern(4096, 4)[..]);
        assert!(plain.write(0, pattern(512, 9), false).await.is_err());
        drop(plain);

        server.kill().await;
        peer.pool.close().await.unwrap();
    }

    /// A registry serving one export that stalls writes while `stall` is set.
    struct Stalling {
        inner: trireme_nbd::testing::MemExport,
        stall: AtomicBool,
    }

    struct StallRegistry(Arc<Stalling>);

    impl ExportRegistry for StallRegistry {
        fn lookup(&self, _: &str) -> Option<Arc<dyn Export>> {
            Some(Arc::clone(&self.0) as Arc<dyn Export>)
        }
        fn list(&self) -> Vec<(String, String)> {
            Vec::new()
        }
    }

    #[async_trait]
    impl Export for Stalling {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn capabilities(&self) -> trireme_nbd::Capabilities {
            self.inner.capabilities()
        }
        async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, ExportError> {
            self.inner.read(offset, len).await
        }
        async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), ExportError> {
            if self.stall.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            self.inner.write(offset, data, fua).await
        }
        async fn flush(&self) -> Result<(), ExportError> {
            self.inner.flush().await
        }
        async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
            self.inner.trim(offset, len, fua).await
        }
        async fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            may_trim: bool,
            fua: bool,
        ) -> Result<(), ExportError> {
            self.inner.write_zeroes(offset, len, may_trim, fua).await
        }
        async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
            self.inner.block_status(offset, len).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_peer_times_out_and_a_killed_one_disconnects() {
        let export = Arc::new(Stalling {
            inner: trireme_nbd::testing::MemExport::new(4 * MIB),
            stall: AtomicBool::new(false),
        });
        let server = Server::start(Arc::new(StallRegistry(Arc::clone(&export)))).await;
        let uri = server.uri(ReplicaId::new_random());
        let opts = RemoteOptions {
            connect_timeout: Duration::from_secs(3),
            io_timeout: Duration::from_millis(500),
        };
        let child = RemoteChild::open(&uri, 1, opts).await.unwrap();
        child.write(0, pattern(4096, 1), false).await.unwrap();

        export.stall.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let result = child.write(0, pattern(4096, 2), false).await;
        assert_eq!(result, Err(ChildError::Timeout));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(500) && took < Duration::from_secs(5), "{took:?}");

        // The nexus faulted the child on that timeout; this instance is done for, even with
        // the peer answering again: a request on it reports the lost connection at once.
        export.stall.store(false, Ordering::SeqCst);
        assert_eq!(child.read(0, 4096).await.map(drop), Err(ChildError::Disconnected));

        // Killed: the connection is closed and nothing listens any more.
        server.kill().await;
        let started = Instant::now();
        let result = child.read(0, 4096).await;
        assert_eq!(result.map(drop), Err(ChildError::Disconnected));
        let result = child.write(0, pattern(4096, 3), false).await;
        assert_eq!(result, Err(ChildError::Disconnected));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// A peer that restarted may have lost writes it acknowledged before its last flush: the
    /// child does not carry on over a new connection as if nothing happened.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_restarted_is_reported_disconnected_not_silently_reconnected() {
        let export = Arc::new(Stalling {
            inner: trireme_nbd::testing::MemExport::new(4 * MIB),
            stall: AtomicBool::new(false),
        });
        let registry = Arc::new(StallRegistry(Arc::clone(&export)));
        let server = Server::start(Arc::clone(&registry)).await;
        let addr = server.addr;
        let child =
            RemoteChild::open(&server.uri(ReplicaId::new_random()), 1, fast()).await.unwrap();
        child.write(0, pattern(4096, 1), false).await.unwrap();
        server.kill().await;
        let again = Server::start_on(addr, registry).await;
        // The first request may still meet the old connection; the second connects anew.
        for _ in 0..2 {
            assert_eq!(child.read(0, 4096).await.map(drop), Err(ChildError::Disconnected));
        }
        again.kill().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_without_block_status_reports_everything_allocated() {
        let caps =
            trireme_nbd::Capabilities { block_status: false, ..trireme_nbd::Capabilities::ALL };
        let export = Arc::new(Stalling {
            inner: trireme_nbd::testing::MemExport::with_capabilities(4 * MIB, caps),
            stall: AtomicBool::new(false),
        });
        let server = Server::start(Arc::new(StallRegistry(export))).await;
        let child =
            RemoteChild::open(&server.uri(ReplicaId::new_random()), 1, fast()).await.unwrap();
        let runs = child.allocation(MIB, 8 * MIB).await.unwrap();
        assert_eq!(runs, vec![ChildExtent { offset: MIB, length: 3 * MIB, allocated: true }]);
        server.kill().await;
    }

    #[tokio::test]
    async fn a_peer_that_never_answers_the_handshake_times_out_at_open() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let uri: ChildUri =
            format!("nbd://{addr}/replica-{}", ReplicaId::new_random()).parse().unwrap();
        let opts = RemoteOptions {
            connect_timeout: Duration::from_millis(300),
            io_timeout: Duration::from_millis(300),
        };
        let started = Instant::now();
        let result = RemoteChild::open(&uri, 1, opts).await;
        assert!(matches!(result, Err(ChildError::Timeout)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        hold.abort();
    }

    #[test]
    fn uris_name_replicas() {
        let id = ReplicaId::new_random();
        let uri: ChildUri = format!("nbd://h:1/replica-{id}").parse().unwrap();
        assert_eq!(remote_replica(&uri), Ok(id));
        let bad: ChildUri = "nbd://h:1/volume".parse().unwrap();
        assert!(remote_replica(&bad).is_err());
        assert!(remote_replica(&ChildUri::Local(id)).is_err());
        assert_eq!(with_default_port("h"), "h:10809");
        assert_eq!(with_default_port("h:5"), "h:5");
        assert_eq!(with_default_port("[::1]"), "[::1]:10809");
        assert_eq!(with_default_port("[::1]:7"), "[::1]:7");
    }

    #[test]
    fn errors_map_to_child_errors() {
        let server = |errno| ClientError::Server { errno, message: "m".into() };
        let fenced = child_error(&server(errno::EPERM), 4);
        assert!(matches!(&fenced, ChildError::Fenced(m) if m.contains("than 4")), "{fenced:?}");
        assert_eq!(child_error(&server(errno::ENOSPC), 4), ChildError::NoSpace);
        assert!(matches!(child_error(&server(errno::EIO), 4), ChildError::Io(_)));
        let timeout = ClientError::Timeout { op: "read", after: Duration::from_secs(1) };
        assert_eq!(child_error(&timeout, 1), ChildError::Timeout);
        let lost = ClientError::Disconnected { reason: "x".into() };
        assert_eq!(child_error(&lost, 1), ChildError::Disconnected);
    }
}
