//! The NBD client against this crate's own server (in-memory export): negotiation, pipelined
//! I/O, every command, server errors, and the failure modes — a peer that dies, stalls or
//! sends garbage — through a proxy the test controls.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, RngCore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trireme_iobuf::IoBuf;
use trireme_nbd::proto::{self, errno};
use trireme_nbd::testing::MemRegistry;
use trireme_nbd::{
    Capabilities, Client, ClientAddr, ClientError, ClientOptions, Export, Extent, ReconnectEvent,
    ReconnectPolicy, ReconnectingClient, ServerConfig, serve_tcp,
};

fn opts() -> ClientOptions {
    ClientOptions { connect_timeout: TIMEOUT, io_timeout: TIMEOUT, max_in_flight: 64 }
}

async fn client(srv: &TestServer) -> Client {
    Client::connect(srv.addr.into(), NAME, opts()).await.unwrap()
}

fn random(len: usize) -> IoBuf {
    let mut b = IoBuf::zeroed(len);
    rand::rng().fill_bytes(&mut b);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiates_size_capabilities_and_block_sizes() {
    let srv = start().await;
    let c = client(&srv).await;
    assert_eq!(c.size(), SIZE);
    assert_eq!(c.capabilities(), Capabilities::ALL);
    assert!(c.structured_replies());
    assert_eq!(c.block_sizes().maximum, 32 << 20);
    assert!(c.is_alive());
    // Also through the Export trait, as the nexus sees it.
    let e: Arc<dyn Export> = Arc::new(c);
    assert_eq!(e.size(), SIZE);
    e.write(8192, IoBuf::copy_from(&[9u8; 4096]), true).await.unwrap();
    assert_eq!(&e.read(8192, 4096).await.unwrap()[..], &[9u8; 4096][..]);
    assert!(matches!(e.read(SIZE, 512).await, Err(trireme_nbd::ExportError::Invalid(_))));
    assert!(e.block_status(8192, 4096).await.unwrap()[0].length == 4096);

    let small = Client::connect(srv.addr.into(), "small", opts()).await.unwrap();
    assert!(small.capabilities().read_only);
    let err = small.write(0, IoBuf::zeroed(512), false).await.unwrap_err();
    assert!(matches!(err, ClientError::Unsupported { .. }), "{err}");

    let err = Client::connect(srv.addr.into(), "nope", opts()).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Handshake { reason, .. } if reason.contains("no such export")),
        "{err}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_over_unix_socket_uri_and_refuses_closed_port() {
    let srv = start_unix().await;
    let c = Client::connect_uri(&srv.uri(NAME), opts()).await.unwrap();
    let data = random(8192);
    c.write(4096, data.clone(), true).await.unwrap();
    assert_eq!(&c.read(4096, 8192).await.unwrap()[..], &data[..]);
    c.disconnect().await.unwrap();
    srv.stop().await;

    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let err = Client::connect(addr.into(), NAME, opts()).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
}

/// 256 writes of random data, 64 in flight at a time, then the same reads, all in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_round_trips_of_random_data() {
    let srv = start().await;
    let c = Arc::new(client(&srv).await);
    let mut expected = Vec::new();
    for i in 0..256u64 {
        let len = rand::rng().random_range(1..=64) * 512;
        expected.push((i * 256 * 1024 + 512 * (i % 7), random(len)));
    }
    let writes = expected.iter().map(|(off, data)| {
        let c = c.clone();
        let (off, data) = (*off, data.clone());
        tokio::spawn(async move { c.write(off, data, false).await })
    });
    for w in futures::future::join_all(writes).await {
        w.unwrap().unwrap();
    }
    c.flush().await.unwrap();
    let reads = expected.iter().map(|(off, data)| {
        let c = c.clone();
        let (off, len) = (*off, data.len() as u32);
        tokio::spawn(async move { c.read(off, len).await })
    });
    for (r, (off, data)) in futures::future::join_all(reads).await.into_iter().zip(&expected) {
        let got = r.unwrap().unwrap();
        assert!(got[..] == data[..], "mismatch at {off}");
        // And the server really holds it.
        assert!(srv.export.read(*off, data.len() as u32).await.unwrap()[..] == data[..]);
    }
    // A large read (several structured chunks on our server is fine too) of written + holes.
    let big = c.read(0, 4 << 20).await.unwrap();
    assert!(big[..expected[0].1.len()] == expected[0].1[..]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_trim_zeroes_and_block_status() {
    let srv = start().await;
    let c = client(&srv).await;
    let mib = 1u64 << 20;
    let flushes = srv.export.flushes();
    c.write(mib, random(mib as usize), true).await.unwrap();
    c.flush().await.unwrap();
    assert!(srv.export.flushes() > flushes);

    let ext = c.block_status(0, 4 * mib).await.unwrap();
    let total: u64 = ext.iter().map(|e| e.length).sum();
    assert!(total <= 4 * mib && total > 0);
    assert_eq!(ext[0], Extent { length: mib, hole: true, zero: true });
    assert_eq!(ext[1], Extent { length: mib, hole: false, zero: false });
    // A query in the middle of the data starts there.
    let ext = c.block_status(mib + 4096, 4096).await.unwrap();
    assert_eq!(ext, vec![Extent { length: 4096, hole: false, zero: false }]);

    c.trim(mib, 64 * 1024, false).await.unwrap();
    assert!(c.read(mib, 64 * 1024).await.unwrap().iter().all(|&b| b == 0));
    c.write_zeroes(mib + 128 * 1024, 128 * 1024, false, true).await.unwrap();
    assert!(c.read(mib + 128 * 1024, 128 * 1024).await.unwrap().iter().all(|&b| b == 0));
    c.write_zeroes(mib + 512 * 1024, 64 * 1024, true, false).await.unwrap();
    assert!(c.read(mib + 512 * 1024, 64 * 1024).await.unwrap().iter().all(|&b| b == 0));
    let ext = c.block_status(mib, 64 * 1024).await.unwrap();
    assert!(ext[0].hole && ext[0].zero, "{ext:?}");
    // Data after the zeroed ranges is untouched.
    assert!(c.read(mib + 256 * 1024, 4096).await.unwrap().iter().any(|&b| b != 0));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_leave_the_connection_usable() {
    let srv = start().await;
    let c = client(&srv).await;
    let err = c.read(SIZE - 512, 4096).await.unwrap_err();
    assert!(matches!(err, ClientError::Server { errno: errno::EINVAL, .. }), "{err}");
    assert!(!err.is_connection_lost());
    let err = c.write(SIZE, IoBuf::zeroed(512), false).await.unwrap_err();
    assert!(matches!(err, ClientError::Server { .. }), "{err}");
    let err = c.trim(SIZE - 4096, 8192, false).await.unwrap_err();
    assert!(matches!(err, ClientError::Server { .. }), "{err}");
    // Too large for the export: refused before it reaches the wire.
    let err = c.read(0, 64 << 20).await.unwrap_err();
    assert!(matches!(err, ClientError::Invalid { .. }), "{err}");
    assert!(c.is_alive());
    let data = random(4096);
    c.write(0, data.clone(), false).await.unwrap();
    assert_eq!(&c.read(0, 4096).await.unwrap()[..], &data[..]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_is_clean_and_final() {
    let srv = start().await;
    let c = client(&srv).await;
    c.write(0, random(4096), false).await.unwrap();
    c.disconnect().await.unwrap();
    assert!(!c.is_alive());
    let err = c.read(0, 4096).await.unwrap_err();
    assert!(matches!(err, ClientError::Disconnected { .. }), "{err}");
    c.disconnect().await.unwrap();
    // The server is fine and still serves others.
    let c2 = client(&srv).await;
    c2.read(0, 4096).await.unwrap();
    drop(c2);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_ends_the_session_at_once() {
    let srv = start().await;
    let c = client(&srv).await;
    c.write(0, random(4096), false).await.unwrap();
    c.abort();
    assert!(!c.is_alive());
    let err = c.write(0, random(4096), false).await.unwrap_err();
    assert!(matches!(err, ClientError::Disconnected { .. }), "{err}");
    // A reset connection leaves the server serving others.
    let c2 = client(&srv).await;
    c2.read(0, 4096).await.unwrap();
    drop(c2);
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Failure modes through a proxy

enum Cmd {
    /// Stop forwarding the server's replies (a hung peer); acknowledged once in effect.
    Stall(tokio::sync::oneshot::Sender<()>),
    /// Send these bytes to the client as if from the server.
    Inject(Vec<u8>),
}

/// A one-connection TCP proxy between the client and the server, able to hang, lie or die.
struct Proxy {
    addr: SocketAddr,
    ctrl: mpsc::UnboundedSender<Cmd>,
    /// Bytes forwarded client → server.
    sent: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (ctrl, mut rx) = mpsc::unbounded_channel();
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let task = tokio::spawn(async move {
            let (down, _) = l.accept().await.unwrap();
            let up = TcpStream::connect(upstream).await.unwrap();
            let (mut dr, mut dw) = down.into_split();
            let (mut ur, mut uw) = up.into_split();
            let c2s = async move {
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = dr.read(&mut buf).await.unwrap_or(0);
                    if n == 0 || uw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    counter.fetch_add(n as u64, Ordering::SeqCst);
                }
            };
            let s2c = async move {
                let mut buf = vec![0u8; 1 << 16];
                let mut stalled = false;
                loop {
                    tokio::select! {
                        n = ur.read(&mut buf), if !stalled => {
                            let n = n.unwrap_or(0);
                            if n == 0 || dw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        cmd = rx.recv() => match cmd {
                            Some(Cmd::Stall(ack)) => {
                                stalled = true;
                                let _ = ack.send(());
                            }
                            Some(Cmd::Inject(b)) => { let _ = dw.write_all(&b).await; }
                            None => std::future::pending::<()>().await,
                        },
                    }
                }
            };
            tokio::join!(c2s, s2c);
        });
        Proxy { addr, ctrl, sent, task }
    }

    /// Returns once no further reply will reach the client.
    async fn stall(&self) {
        let (ack, done) = tokio::sync::oneshot::channel();
        self.ctrl.send(Cmd::Stall(ack)).unwrap();
        tokio::time::timeout(TIMEOUT, done).await.unwrap().unwrap();
    }

    /// Both sockets dropped at once, as when the server process dies.
    fn kill(&self) {
        self.task.abort();
    }

    /// Waits until `n` more bytes than `base` went to the server.
    async fn wait_sent(&self, base: u64, n: u64) {
        let deadline = Instant::now() + TIMEOUT;
        while self.sent.load(Ordering::SeqCst) < base + n {
            assert!(Instant::now() < deadline, "requests never reached the server");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_death_fails_every_pending_request_promptly() {
    let srv = start().await;
    let proxy = Proxy::start(srv.addr).await;
    let c = Arc::new(Client::connect(proxy.addr.into(), NAME, opts()).await.unwrap());
    c.write(0, random(1 << 20), false).await.unwrap();
    // Hold replies so that requests are certainly in flight when the peer dies.
    proxy.stall().await;
    let base = proxy.sent.load(Ordering::SeqCst);
    let tasks: Vec<_> = (0..32u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.read(i * 4096, 4096).await.map(drop) })
        })
        .collect();
    proxy.wait_sent(base, 32 * proto::REQUEST_LEN as u64).await;
    let t0 = Instant::now();
    proxy.kill();
    for t in tasks {
        let err = tokio::time::timeout(TIMEOUT, t).await.unwrap().unwrap().unwrap_err();
        assert!(matches!(err, ClientError::Disconnected { .. }), "{err}");
    }
    // io_timeout is a minute: only noticing the dead socket makes this fast.
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    assert!(!c.is_alive());
    tokio::time::timeout(TIMEOUT, c.closed()).await.unwrap();
    let err = c.flush().await.unwrap_err();
    assert!(matches!(err, ClientError::Disconnected { .. }), "{err}");
    srv.stop().await;
}

/// The client's tasks die with it: the socket closes, so the server (here the proxy) sees EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_client_closes_its_connection() {
    let srv = start().await;
    let proxy = Proxy::start(srv.addr).await;
    let c = Client::connect(proxy.addr.into(), NAME, opts()).await.unwrap();
    c.read(0, 4096).await.unwrap();
    drop(c);
    tokio::time::timeout(TIMEOUT, proxy.task).await.unwrap().unwrap();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_timeout_kills_the_connection() {
    let srv = start().await;
    let proxy = Proxy::start(srv.addr).await;
    let o = ClientOptions { io_timeout: Duration::from_millis(500), ..opts() };
    let c = Arc::new(Client::connect(proxy.addr.into(), NAME, o).await.unwrap());
    c.read(0, 4096).await.unwrap();
    proxy.stall().await;
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..8u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.read(i * 4096, 4096).await.map(drop) })
        })
        .collect();
    let mut timeouts = 0;
    for t in tasks {
        match tokio::time::timeout(TIMEOUT, t).await.unwrap().unwrap().unwrap_err() {
            ClientError::Timeout { op: "read", .. } => timeouts += 1,
            ClientError::Disconnected { .. } => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert!(timeouts >= 1);
    assert!(t0.elapsed() < Duration::from_secs(20), "took {:?}", t0.elapsed());
    // Dead now: later requests fail at once, with the reason the connection died, instead of
    // waiting out a timeout of their own.
    let err = c.read(0, 4096).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Disconnected { reason } if reason.contains("timed out")),
        "{err}"
    );
    assert!(!c.is_alive());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_violation_kills_the_connection() {
    let srv = start().await;
    let proxy = Proxy::start(srv.addr).await;
    let c = Arc::new(Client::connect(proxy.addr.into(), NAME, opts()).await.unwrap());
    proxy.stall().await;
    let base = proxy.sent.load(Ordering::SeqCst);
    // Cookies count from 1 on a fresh connection.
    let first = tokio::spawn({
        let c = c.clone();
        async move { c.read(0, 4096).await.map(drop) }
    });
    proxy.wait_sent(base, proto::REQUEST_LEN as u64).await;
    let second = tokio::spawn({
        let c = c.clone();
        async move { c.read(8192, 4096).await.map(drop) }
    });
    proxy.wait_sent(base, 2 * proto::REQUEST_LEN as u64).await;
    // Data for request 1 at an offset it never asked for.
    let mut lie = Vec::new();
    proto::Chunk::OffsetData { offset: 1 << 30, data_len: 4096 }.encode_into(1, true, &mut lie);
    lie.extend_from_slice(&[7u8; 4096]);
    proxy.ctrl.send(Cmd::Inject(lie)).unwrap();
    let e1 = tokio::time::timeout(TIMEOUT, first).await.unwrap().unwrap().unwrap_err();
    assert!(matches!(e1, ClientError::Protocol { .. }), "{e1}");
    let e2 = tokio::time::timeout(TIMEOUT, second).await.unwrap().unwrap().unwrap_err();
    assert!(
        matches!(&e2, ClientError::Disconnected { reason } if reason.contains("protocol")),
        "{e2}"
    );
    assert!(matches!(c.read(0, 512).await, Err(ClientError::Disconnected { .. })));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_read_chunks_are_a_violation_not_a_whole_reply() {
    let srv = start().await;
    let proxy = Proxy::start(srv.addr).await;
    let c = Arc::new(Client::connect(proxy.addr.into(), NAME, opts()).await.unwrap());
    proxy.stall().await;
    let base = proxy.sent.load(Ordering::SeqCst);
    let read = tokio::spawn({
        let c = c.clone();
        async move { c.read(0, 8192).await.map(drop) }
    });
    proxy.wait_sent(base, proto::REQUEST_LEN as u64).await;
    // The first half twice: 8,192 bytes described, the second half never.
    let mut lie = Vec::new();
    for done in [false, true] {
        proto::Chunk::OffsetData { offset: 0, data_len: 4096 }.encode_into(1, done, &mut lie);
        lie.extend_from_slice(&[7u8; 4096]);
    }
    proxy.ctrl.send(Cmd::Inject(lie)).unwrap();
    let err = tokio::time::timeout(TIMEOUT, read).await.unwrap().unwrap().unwrap_err();
    assert!(
        matches!(&err, ClientError::Protocol { reason } if reason.contains("overlaps")),
        "{err}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_server_fails_pending_requests() {
    let srv = start().await;
    let proxy = Proxy::start(srv.addr).await;
    let c = Arc::new(Client::connect(proxy.addr.into(), NAME, opts()).await.unwrap());
    proxy.stall().await;
    let base = proxy.sent.load(Ordering::SeqCst);
    let pending = tokio::spawn({
        let c = c.clone();
        async move { c.flush().await }
    });
    proxy.wait_sent(base, proto::REQUEST_LEN as u64).await;
    proxy.ctrl.send(Cmd::Inject(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec())).unwrap();
    let err = tokio::time::timeout(TIMEOUT, pending).await.unwrap().unwrap().unwrap_err();
    assert!(
        matches!(&err, ClientError::Disconnected { reason } if reason.contains("magic")),
        "{err}"
    );
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Reconnecting

async fn serve_on(
    addr: SocketAddr,
    registry: Arc<MemRegistry>,
) -> (CancellationToken, JoinHandle<std::io::Result<()>>) {
    let deadline = Instant::now() + TIMEOUT;
    // The old listener's port may take a moment to be free again.
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) if Instant::now() < deadline => {
                eprintln!("rebinding {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    };
    let stop = CancellationToken::new();
    let config = ServerConfig { shutdown_grace: Duration::from_millis(100), ..Default::default() };
    let handle = tokio::spawn(serve_tcp(listener, registry, config, stop.clone()));
    (stop, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_client_recovers_after_server_restart() {
    let (registry, _export) = registry();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let (stop, handle) = serve_on(addr, registry.clone()).await;
    let policy = ReconnectPolicy {
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        max_attempts: 3,
    };
    let rc =
        ReconnectingClient::connect(ClientAddr::from(addr), NAME, opts(), policy).await.unwrap();
    let mut events = rc.subscribe();
    assert_eq!(rc.generation(), 1);
    let data = random(65536);
    rc.write(4096, data.clone(), true).await.unwrap();

    stop.cancel();
    handle.await.unwrap().unwrap();
    // The server closed our connection on its way down.
    if let Some(first) = rc.current() {
        tokio::time::timeout(TIMEOUT, first.closed()).await.unwrap();
    }
    assert!(rc.current().is_none());
    // Server down: the demand gives up after its attempts, reporting each.
    let err = rc.read(0, 4096).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    for attempt in 1..=3 {
        match events.recv().await.unwrap() {
            ReconnectEvent::AttemptFailed { attempt: a, retry_in, .. } => {
                assert_eq!(a, attempt);
                assert_eq!(retry_in.is_none(), attempt == 3);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    let (stop, handle) = serve_on(addr, registry).await;
    assert_eq!(&rc.read(4096, 65536).await.unwrap()[..], &data[..]);
    assert_eq!(rc.generation(), 2);
    assert!(matches!(
        events.recv().await.unwrap(),
        ReconnectEvent::Connected { generation: 2, attempts: 1 }
    ));
    // Forced reconnect on a live connection.
    rc.reconnect().await.unwrap();
    assert_eq!(rc.generation(), 3);
    // Through the Export trait too.
    let e: &dyn Export = &rc;
    assert_eq!(e.size(), SIZE);
    e.flush().await.unwrap();
    rc.disconnect().await.unwrap();
    assert!(matches!(rc.read(0, 512).await, Err(ClientError::Disconnected { .. })));
    stop.cancel();
    handle.await.unwrap().unwrap();
}
