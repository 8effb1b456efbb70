//! The NBD client against real servers started here: qemu-nbd (a raw file) and nbdkit (the
//! memory plugin). Each runs the same suite; a peer's tests are skipped (with a note) only if
//! its program is not installed.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::RngCore;
use tokio::process::{Child, Command};
use trireme_iobuf::IoBuf;
use trireme_nbd::{
    Client, ClientAddr, ClientError, ClientOptions, Extent, ReconnectEvent, ReconnectPolicy,
    ReconnectingClient,
};

const SIZE: u64 = 64 << 20;
const EXPORT: &str = "e";
const TIMEOUT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn opts() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(5),
        io_timeout: TIMEOUT,
        max_in_flight: 32,
    }
}

fn random(len: usize) -> IoBuf {
    let mut b = IoBuf::zeroed(len);
    rand::rng().fill_bytes(&mut b);
    b
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Qemu,
    Nbdkit,
}

/// A real NBD server process on a fixed local port (so it can be restarted in place).
struct Peer {
    kind: Kind,
    port: u16,
    _dir: tempfile::TempDir,
    file: PathBuf,
    child: Option<Child>,
}

impl Peer {
    /// Starts the peer; `None` (and a note) if its program is not installed.
    async fn start(kind: Kind) -> Option<Peer> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.raw");
        std::fs::File::create(&file).unwrap().set_len(SIZE).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let mut peer = Peer { kind, port, _dir: dir, file, child: None };
        peer.spawn().await?;
        Some(peer)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn program(&self) -> &'static str {
        match self.kind {
            Kind::Qemu => "qemu-nbd",
            Kind::Nbdkit => "nbdkit",
        }
    }

    async fn spawn(&mut self) -> Option<()> {
        let port = self.port.to_string();
        let mut cmd = Command::new(self.program());
        match self.kind {
            Kind::Qemu => cmd
                .args(["-f", "raw", "-x", EXPORT, "-p", &port, "-b", "127.0.0.1"])
                .args(["--persistent", "--shared=8", "--discard=unmap"])
                .arg(&self.file),
            Kind::Nbdkit => cmd.args(["-f", "-p", &port, "-i", "127.0.0.1", "memory", "64M"]),
        };
        cmd.kill_on_drop(true).stdin(Stdio::null()).stdout(Stdio::null());
        match cmd.spawn() {
            Ok(c) => self.child = Some(c),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("SKIPPED: {} is not installed", self.program());
                return None;
            }
            Err(e) => panic!("cannot start {}: {e}", self.program()),
        }
        self.wait_ready().await;
        Some(())
    }

    /// Waits until the server answers a full negotiation.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok(c) = Client::connect(self.addr().into(), EXPORT, opts()).await {
                c.disconnect().await.unwrap();
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited early: {status}", self.program());
            }
            assert!(Instant::now() < deadline, "{} never became ready", self.program());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, as a crashed replica engine would look.
    async fn kill(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().await.unwrap();
    }
}

/// The extent that starts a block-status answer at `offset`.
async fn first_extent(c: &Client, offset: u64) -> Extent {
    let ext = c.block_status(offset, 4 * MIB).await.unwrap();
    let total: u64 = ext.iter().map(|e| e.length).sum();
    assert!(total > 0 && total <= 4 * MIB, "{ext:?}");
    ext[0]
}

async fn io_suite(kind: Kind) {
    let Some(peer) = Peer::start(kind).await else { return };
    let name = peer.program();
    let c = Arc::new(Client::connect(peer.addr().into(), EXPORT, opts()).await.unwrap());
    assert_eq!(c.size(), SIZE, "{name}");
    let caps = c.capabilities();
    assert!(caps.flush && caps.trim && caps.write_zeroes && !caps.read_only, "{name}: {caps:?}");
    assert!(c.structured_replies(), "{name}");
    assert!(caps.block_status, "{name} did not agree to base:allocation");

    // Many in flight: 128 random writes, then read back concurrently.
    let chunks: Vec<(u64, IoBuf)> =
        (0..128u64).map(|i| (8 * MIB + i * 128 * 1024, random(64 * 1024))).collect();
    let writes = chunks.iter().map(|(off, data)| {
        let (c, off, data) = (c.clone(), *off, data.clone());
        tokio::spawn(async move { c.write(off, data, false).await })
    });
    for w in futures::future::join_all(writes).await {
        w.unwrap().unwrap();
    }
    c.flush().await.unwrap();
    let reads = chunks.iter().map(|(off, data)| {
        let (c, off, len) = (c.clone(), *off, data.len() as u32);
        tokio::spawn(async move { c.read(off, len).await })
    });
    for (r, (off, data)) in futures::future::join_all(reads).await.into_iter().zip(&chunks) {
        assert!(r.unwrap().unwrap()[..] == data[..], "{name}: mismatch at {off}");
    }
    // One large read spanning data and the untouched gaps between chunks.
    let big = c.read(8 * MIB, 4 * MIB as u32).await.unwrap();
    assert!(big[..64 * 1024] == chunks[0].1[..], "{name}");
    assert!(big[64 * 1024..128 * 1024].iter().all(|&b| b == 0), "{name}");

    // FUA write, block status against what was written.
    c.write(MIB, random(MIB as usize), true).await.unwrap();
    let hole = first_extent(&c, 0).await;
    assert!(hole.zero && hole.length <= MIB, "{name}: {hole:?}");
    let data = first_extent(&c, MIB).await;
    assert!(!data.hole && !data.zero, "{name}: {data:?}");

    // Trim and zeroes read back as zeroes.
    c.trim(MIB, 256 * 1024, false).await.unwrap();
    assert!(c.read(MIB, 256 * 1024).await.unwrap().iter().all(|&b| b == 0), "{name}: trim");
    c.write_zeroes(MIB + 512 * 1024, 256 * 1024, false, false).await.unwrap();
    assert!(c.read(MIB + 512 * 1024, 256 * 1024).await.unwrap().iter().all(|&b| b == 0), "{name}");
    c.write_zeroes(MIB + 768 * 1024, 64 * 1024, true, true).await.unwrap();
    assert!(c.read(MIB + 768 * 1024, 64 * 1024).await.unwrap().iter().all(|&b| b == 0), "{name}");
    assert!(c.read(MIB + 256 * 1024, 4096).await.unwrap().iter().any(|&b| b != 0), "{name}");

    // Past the end: the server refuses, the connection stays.
    let err = c.read(SIZE - 4096, 8192).await.unwrap_err();
    assert!(matches!(err, ClientError::Server { .. }), "{name}: {err}");
    let err = c.write(SIZE, random(4096), false).await.unwrap_err();
    assert!(matches!(err, ClientError::Server { .. }), "{name}: {err}");
    assert!(c.is_alive(), "{name}");
    assert!(c.read(8 * MIB, 65536).await.unwrap()[..] == chunks[0].1[..], "{name}");
    c.disconnect().await.unwrap();
}

async fn kill_and_reconnect_suite(kind: Kind) {
    let Some(mut peer) = Peer::start(kind).await else { return };
    let name = peer.program();
    let policy = ReconnectPolicy {
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        max_attempts: 2,
    };
    let rc = Arc::new(
        ReconnectingClient::connect(ClientAddr::from(peer.addr()), EXPORT, opts(), policy)
            .await
            .unwrap(),
    );
    let mut events = rc.subscribe();
    let data = random(MIB as usize);
    rc.write(0, data.clone(), false).await.unwrap();
    rc.flush().await.unwrap();

    // Readers and writers keep 16 requests in flight until the peer dies under them.
    let c = rc.client().await.unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..16u64)
        .map(|i| {
            let (c, done) = (c.clone(), done.clone());
            tokio::spawn(async move {
                loop {
                    let off = 4 * MIB + (i % 8) * 256 * 1024;
                    let r = if i % 2 == 0 {
                        c.read(off, 256 * 1024).await.map(drop)
                    } else {
                        c.write(off, IoBuf::zeroed(256 * 1024), false).await
                    };
                    if let Err(e) = r {
                        return e;
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let deadline = Instant::now() + TIMEOUT;
    while done.load(Ordering::SeqCst) < 64 {
        assert!(Instant::now() < deadline, "{name}: no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = Instant::now();
    peer.kill().await;
    for t in tasks {
        let err = tokio::time::timeout(TIMEOUT, t).await.unwrap().unwrap();
        assert!(matches!(err, ClientError::Disconnected { .. }), "{name}: {err}");
    }
    assert!(t0.elapsed() < Duration::from_secs(10), "{name}: took {:?}", t0.elapsed());
    assert!(!c.is_alive());
    drop(c);

    // While it is down, a demand fails after its attempts.
    let err = rc.read(0, 4096).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{name}: {err}");

    peer.spawn().await.unwrap();
    let got = rc.read(0, MIB as u32).await.unwrap();
    if kind == Kind::Qemu {
        // The file outlived the process: flushed data is still there.
        assert!(got[..] == data[..], "{name}: data lost across restart");
    }
    assert_eq!(rc.generation(), 2);
    let mut reconnected = false;
    while let Ok(ev) = events.try_recv() {
        reconnected |= matches!(ev, ReconnectEvent::Connected { generation: 2, .. });
    }
    assert!(reconnected, "{name}: no reconnect event");
    rc.write(0, random(4096), true).await.unwrap();
    rc.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_io() {
    io_suite(Kind::Qemu).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_io() {
    io_suite(Kind::Nbdkit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_killed_mid_io_then_reconnect() {
    kill_and_reconnect_suite(Kind::Qemu).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_killed_mid_io_then_reconnect() {
    kill_and_reconnect_suite(Kind::Nbdkit).await;
}

/// qemu-nbd on a Unix socket, reached through an `nbd+unix://` URI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_unix_socket_uri() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    std::fs::File::create(&file).unwrap().set_len(SIZE).unwrap();
    let sock = dir.path().join("nbd.sock");
    let child = Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", EXPORT, "--persistent"])
        .arg(format!("--socket={}", sock.display()))
        .arg(&file)
        .kill_on_drop(true)
        .stdin(Stdio::null())
        .spawn();
    let _child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("SKIPPED: qemu-nbd is not installed");
            return;
        }
        Err(e) => panic!("cannot start qemu-nbd: {e}"),
    };
    let uri = format!("nbd+unix:///{EXPORT}?socket={}", sock.display());
    let deadline = Instant::now() + TIMEOUT;
    let c = loop {
        match Client::connect_uri(&uri, opts()).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "qemu-nbd never answered: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(c.size(), SIZE);
    let data = random(65536);
    c.write(MIB, data.clone(), true).await.unwrap();
    assert!(c.read(MIB, 65536).await.unwrap()[..] == data[..]);
    c.disconnect().await.unwrap();
}
