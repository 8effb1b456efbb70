//! Shared helpers: an in-memory export served on a free local port, a minimal raw NBD client
//! built on the crate's codec, and a runner for external tools with a timeout.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trireme_nbd::proto::*;
use trireme_nbd::testing::{MemExport, MemRegistry};
use trireme_nbd::{Capabilities, ServerConfig, serve_tcp, serve_unix};

pub const NAME: &str = "mem";
pub const SIZE: u64 = 64 << 20;
/// Generous: the machine is small and shared.
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub struct TestServer {
    pub addr: SocketAddr,
    pub export: Arc<MemExport>,
    pub registry: Arc<MemRegistry>,
    pub config: ServerConfig,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<std::io::Result<()>>,
    pub socket: Option<(tempfile::TempDir, PathBuf)>,
}

pub fn registry() -> (Arc<MemRegistry>, Arc<MemExport>) {
    let registry = Arc::new(MemRegistry::new());
    let export = Arc::new(MemExport::new(SIZE));
    registry.insert(NAME, "in-memory test export", export.clone());
    let ro = Capabilities { read_only: true, ..Capabilities::ALL };
    registry.insert(
        "small",
        "a read-only export",
        Arc::new(MemExport::with_capabilities(1 << 20, ro)),
    );
    (registry, export)
}

pub async fn start() -> TestServer {
    start_with(ServerConfig::default()).await
}

pub async fn start_with(config: ServerConfig) -> TestServer {
    let (registry, export) = registry();
    start_registry(registry, export, config).await
}

/// Serves `registry`; `export` is the one tests inspect.
pub async fn start_registry(
    registry: Arc<MemRegistry>,
    export: Arc<MemExport>,
    config: ServerConfig,
) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let handle =
        tokio::spawn(serve_tcp(listener, registry.clone(), config.clone(), shutdown.clone()));
    TestServer { addr, export, registry, config, shutdown, handle, socket: None }
}

pub async fn start_unix() -> TestServer {
    let (registry, export) = registry();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let shutdown = CancellationToken::new();
    let config = ServerConfig::default();
    let handle =
        tokio::spawn(serve_unix(listener, registry.clone(), config.clone(), shutdown.clone()));
    let addr = "0.0.0.0:0".parse().unwrap();
    TestServer { addr, export, registry, config, shutdown, handle, socket: Some((dir, path)) }
}

impl TestServer {
    pub fn uri(&self, name: &str) -> String {
        match &self.socket {
            Some((_, path)) => format!("nbd+unix:///{name}?socket={}", path.display()),
            None => format!("nbd://{}/{name}", self.addr),
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(TIMEOUT, self.handle).await.unwrap().unwrap().unwrap();
    }
}

/// Runs an external tool; `None` (and a note on stderr) if it is not installed.
pub async fn tool(program: &str, args: &[&str]) -> Option<Output> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .output();
    match tokio::time::timeout(TIMEOUT, child).await {
        Err(_) => panic!("{program} {args:?} timed out"),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("SKIPPED: {program} is not installed");
            None
        }
        Ok(Err(e)) => panic!("{program} failed to start: {e}"),
        Ok(Ok(out)) => Some(out),
    }
}

/// Like [`tool`], and asserts success.
pub async fn tool_ok(program: &str, args: &[&str]) -> Option<String> {
    let out = tool(program, args).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} {args:?} failed: {}\n{stdout}\n{stderr}", out.status);
    Some(stdout)
}

// ---------------------------------------------------------------------------------------------
// A raw client

pub struct Raw {
    pub s: TcpStream,
}

impl Raw {
    /// Connects and reads the greeting.
    pub async fn connect(addr: SocketAddr) -> Raw {
        let s = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await.unwrap().unwrap();
        let mut raw = Raw { s };
        let mut greeting = [0u8; GREETING_LEN];
        raw.read_exact(&mut greeting).await.unwrap();
        let flags = decode_greeting(&greeting).unwrap();
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        raw
    }

    /// Connects and sends fixed-newstyle, no-zeroes client flags.
    pub async fn negotiating(addr: SocketAddr) -> Raw {
        let mut raw = Raw::connect(addr).await;
        raw.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).await;
        raw
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    pub async fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        tokio::time::timeout(TIMEOUT, self.s.read_exact(buf)).await.unwrap().map(|_| ())
    }

    pub async fn option(&mut self, option: u32, data: &[u8]) {
        let h = OptionHeader { option, length: data.len() as u32 };
        self.send(&h.encode()).await;
        self.send(data).await;
    }

    pub async fn option_reply(&mut self) -> OptionReply {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.read_exact(&mut h).await.unwrap();
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut all = h.to_vec();
        all.resize(OPTION_REPLY_HEADER_LEN + len, 0);
        self.read_exact(&mut all[OPTION_REPLY_HEADER_LEN..]).await.unwrap();
        OptionReply::decode(&all).unwrap().0
    }

    /// Reads option replies up to and including the final one.
    pub async fn option_replies(&mut self) -> Vec<OptionReply> {
        let mut out = Vec::new();
        loop {
            let r = self.option_reply().await;
            let last = r.reply_type == REP_ACK || r.reply_type & (1 << 31) != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// Sends OPT_GO; returns (size, transmission flags) on ACK, or the final error type.
    pub async fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        let req = InfoRequest { name: name.into(), requests: vec![INFO_BLOCK_SIZE] };
        self.option(OPT_GO, &req.encode()).await;
        let mut export = None;
        for r in self.option_replies().await {
            match r.reply_type {
                REP_INFO => {
                    if let Some(Info::Export { size, flags }) = Info::decode(&r.data).unwrap() {
                        export = Some((size, flags));
                    }
                }
                REP_ACK => return Ok(export.expect("INFO_EXPORT before ACK")),
                err => return Err(err),
            }
        }
        unreachable!()
    }

    pub async fn structured(&mut self) {
        self.option(OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(self.option_reply().await.reply_type, REP_ACK);
    }

    /// A transmission-phase client on `NAME`, optionally with structured replies.
    pub async fn ready(addr: SocketAddr, structured: bool) -> Raw {
        Raw::ready_on(addr, NAME, structured).await
    }

    /// A transmission-phase client on `name` (an export of `SIZE` bytes).
    pub async fn ready_on(addr: SocketAddr, name: &str, structured: bool) -> Raw {
        let mut raw = Raw::negotiating(addr).await;
        if structured {
            raw.structured().await;
        }
        let (size, _) = raw.go(name).await.unwrap();
        assert_eq!(size, SIZE);
        raw
    }

    pub async fn request(
        &mut self,
        command: Command,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
    ) {
        let r = Request { flags, command, cookie, offset, length };
        self.send(&r.encode()).await;
    }

    /// Reads one simple reply; returns (error, cookie).
    pub async fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.read_exact(&mut h).await.unwrap();
        let r = SimpleReply::decode(&h).unwrap();
        (r.error, r.cookie)
    }

    /// Reads one structured chunk (or simple reply, reported as chunk type u16::MAX with the
    /// error in `flags`'s place); returns header and payload.
    pub async fn any_reply(&mut self) -> (u32, u64, Vec<u8>, u16) {
        let mut magic = [0u8; 4];
        self.read_exact(&mut magic).await.unwrap();
        if u32::from_be_bytes(magic) == SIMPLE_REPLY_MAGIC {
            let mut rest = [0u8; 12];
            self.read_exact(&mut rest).await.unwrap();
            let error = u32::from_be_bytes(rest[..4].try_into().unwrap());
            let cookie = u64::from_be_bytes(rest[4..].try_into().unwrap());
            return (error, cookie, Vec::new(), u16::MAX);
        }
        let mut h = magic.to_vec();
        h.resize(CHUNK_HEADER_LEN, 0);
        self.read_exact(&mut h[4..]).await.unwrap();
        let header = ChunkHeader::decode(&h).unwrap();
        let mut payload = vec![0u8; header.length as usize];
        self.read_exact(&mut payload).await.unwrap();
        let error = match Chunk::decode(&header, &payload).unwrap() {
            Chunk::Error { error, .. } | Chunk::ErrorOffset { error, .. } => error,
            _ => 0,
        };
        (error, header.cookie, payload, header.chunk_type)
    }

    /// True when the server has closed the connection (EOF on read).
    /// Whether the server closes without sending another byte.
    pub async fn closed_silently(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(tokio::time::timeout(TIMEOUT, self.s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
    }

    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(TIMEOUT, self.s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// A fresh, well-behaved client: write, read back, disconnect.
pub async fn assert_healthy(addr: SocketAddr) {
    let mut c = Raw::ready(addr, false).await;
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    c.request(Command::Write, 0, 1, 4096, data.len() as u32).await;
    c.send(&data).await;
    assert_eq!(c.simple_reply().await, (0, 1));
    c.request(Command::Read, 0, 2, 4096, data.len() as u32).await;
    assert_eq!(c.simple_reply().await, (0, 2));
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data);
    c.request(Command::Disc, 0, 3, 0, 0).await;
    assert!(c.closed().await);
}
