//! A small NBD client, written from the NBD protocol document, for the crash-consistency checker
//! and the malformed-input tests. It is deliberately independent of `trireme-nbd`: a test
//! client that shared the server's codec would agree with the server's bugs.
//!
//! Only what the tests need: the fixed newstyle handshake with `OPT_GO`, simple replies, and
//! `READ`, `WRITE`, `FLUSH`, `DISC` with many requests in flight, matched by handle.
//!
//! ```text
//!  caller ──request()──> [writer half, one request at a time] ──TCP──> server
//!     ^                                                                  │
//!     └── oneshot <── pending{handle} <── reader task (owns read half) <─┘
//! ```
//!
//! When the connection fails, the reader task fails every pending request with
//! [`NbdError::ConnectionLost`] and every later request fails at once with the same error.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

pub const INFO_EXPORT: u16 = 0;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_FLAG_FUA: u16 = 1;

pub const TFLAG_HAS_FLAGS: u16 = 1;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// How long the handshake may take before we give up on the server.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("invalid NBD URI {0:?}: expected nbd://host:port/export")]
    BadUri(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("handshake with {addr} failed: {reason}")]
    Handshake { addr: String, reason: String },
    #[error("the server refused option {option} with reply type {reply:#x}: {message}")]
    OptionRefused { option: u32, reply: u32, message: String },
    #[error("the connection was lost: {0}")]
    ConnectionLost(String),
    #[error("the server answered {command} at offset {offset} with errno {errno}")]
    Errno { command: &'static str, offset: u64, errno: u32 },
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    #[error("{command} at offset {offset} got no answer within {timeout:?}")]
    Timeout { command: &'static str, offset: u64, timeout: Duration },
}

impl NbdError {
    /// Whether the error means the connection is gone (as opposed to an error answer).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, Self::ConnectionLost(_))
    }
}

/// What `OPT_GO` told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
}

/// `nbd://host:port/export` → (`host:port`, `export`).
pub fn parse_uri(uri: &str) -> Result<(String, String), NbdError> {
    let rest = uri.strip_prefix("nbd://").ok_or_else(|| NbdError::BadUri(uri.to_owned()))?;
    let (addr, export) = match rest.split_once('/') {
        Some((a, e)) => (a, e),
        None => (rest, ""),
    };
    if addr.is_empty() {
        return Err(NbdError::BadUri(uri.to_owned()));
    }
    let addr = if addr.contains(':') { addr.to_owned() } else { format!("{addr}:10809") };
    Ok((addr, export.to_owned()))
}

/// Connects a TCP stream to the URI's server, bounded by the handshake timeout.
pub async fn connect_tcp(addr: &str) -> Result<TcpStream, NbdError> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| NbdError::Connect {
            addr: addr.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        })?
        .map_err(|source| NbdError::Connect { addr: addr.to_owned(), source })?;
    stream.set_nodelay(true).ok();
    Ok(stream)
}

/// Reads the server's greeting and sends our client flags. Returns the server's handshake flags.
pub async fn greet(stream: &mut TcpStream) -> Result<u16, NbdError> {
    let addr = peer(stream);
    let hs = |reason: String| NbdError::Handshake { addr: addr.clone(), reason };
    let mut buf = [0u8; 18];
    let read = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.read_exact(&mut buf)).await;
    match read {
        Err(_) => return Err(hs("no greeting within the timeout".into())),
        Ok(Err(e)) => return Err(hs(format!("reading the greeting: {e}"))),
        Ok(Ok(_)) => {}
    }
    let magic = u64::from_be_bytes(buf[0..8].try_into().unwrap_or_default());
    let opt = u64::from_be_bytes(buf[8..16].try_into().unwrap_or_default());
    if magic != NBDMAGIC || opt != IHAVEOPT {
        return Err(hs(format!("not a newstyle NBD greeting: {:02x?}", &buf[..16])));
    }
    let flags = u16::from_be_bytes([buf[16], buf[17]]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(hs("the server does not speak fixed newstyle".into()));
    }
    let client_flags = u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    stream.write_all(&client_flags.to_be_bytes()).await.map_err(|e| hs(format!("{e}")))?;
    Ok(flags)
}

/// Sends one option request.
pub async fn send_option(stream: &mut TcpStream, option: u32, data: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    stream.write_all(&msg).await
}

/// One option reply: (option, reply type, data).
pub async fn read_option_reply(stream: &mut TcpStream) -> Result<(u32, u32, Vec<u8>), NbdError> {
    let lost =
        |e: std::io::Error| NbdError::ConnectionLost(format!("reading an option reply: {e}"));
    let fut = async {
        let mut head = [0u8; 20];
        stream.read_exact(&mut head).await.map_err(lost)?;
        let magic = u64::from_be_bytes(head[0..8].try_into().unwrap_or_default());
        if magic != OPT_REPLY_MAGIC {
            return Err(NbdError::Protocol(format!("bad option reply magic {magic:#x}")));
        }
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap_or_default());
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap_or_default());
        if len > 64 * 1024 {
            return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).await.map_err(lost)?;
        Ok((option, kind, data))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| NbdError::ConnectionLost("no option reply within the timeout".into()))?
}

/// `OPT_GO` for `export`; on success the stream is in the transmission phase.
pub async fn opt_go(stream: &mut TcpStream, export: &str) -> Result<ExportInfo, NbdError> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(stream, OPT_GO, &data)
        .await
        .map_err(|e| NbdError::ConnectionLost(format!("sending OPT_GO: {e}")))?;
    let mut info = None;
    loop {
        let (option, kind, data) = read_option_reply(stream).await?;
        if option != OPT_GO {
            return Err(NbdError::Protocol(format!(
                "reply to option {option} while waiting for OPT_GO"
            )));
        }
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => {
                let ty = u16::from_be_bytes([data[0], data[1]]);
                if ty == INFO_EXPORT {
                    if data.len() != 12 {
                        return Err(NbdError::Protocol(format!(
                            "NBD_INFO_EXPORT of {} bytes",
                            data.len()
                        )));
                    }
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    info = Some(ExportInfo { size, flags });
                }
            }
            k if k & REP_FLAG_ERROR != 0 => {
                return Err(NbdError::OptionRefused {
                    option,
                    reply: k,
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            _ => {}
        }
    }
    info.ok_or_else(|| NbdError::Protocol("OPT_GO acknowledged without NBD_INFO_EXPORT".into()))
}

/// Encodes a request header.
pub fn request_header(flags: u16, command: u16, handle: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&command.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&length.to_be_bytes());
    h
}

/// Reads one simple reply header: (error, handle).
pub async fn read_simple_reply(
    stream: &mut (impl AsyncReadExt + Unpin),
) -> std::io::Result<(u32, u64)> {
    let mut head = [0u8; 16];
    stream.read_exact(&mut head).await?;
    let magic = u32::from_be_bytes(head[0..4].try_into().unwrap_or_default());
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("reply magic {magic:#x} is not the simple reply magic"),
        ));
    }
    let error = u32::from_be_bytes(head[4..8].try_into().unwrap_or_default());
    let handle = u64::from_be_bytes(head[8..16].try_into().unwrap_or_default());
    Ok((error, handle))
}

fn peer(stream: &TcpStream) -> String {
    stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into())
}

struct Pending {
    /// Bytes of payload that follow a successful reply (READ only).
    read_len: usize,
    reply: oneshot::Sender<Result<Vec<u8>, u32>>,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    closed: AtomicBool,
    why_closed: Mutex<String>,
}

impl Shared {
    fn close(&self, why: String) {
        let mut w = self.why_closed.lock();
        if !self.closed.swap(true, Ordering::SeqCst) {
            *w = why;
        }
        drop(w);
        // Dropping the senders wakes every waiter with "connection lost".
        self.pending.lock().clear();
    }
}

/// A connected client in the transmission phase. Requests may be issued concurrently.
pub struct NbdClient {
    info: ExportInfo,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    shared: Arc<Shared>,
    next_handle: AtomicU64,
    reader: JoinHandle<()>,
    timeout: Duration,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient").field("info", &self.info).finish()
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl NbdClient {
    /// Connects and negotiates the URI's export.
    pub async fn connect(uri: &str) -> Result<Self, NbdError> {
        let (addr, export) = parse_uri(uri)?;
        let mut stream = connect_tcp(&addr).await?;
        greet(&mut stream).await?;
        let info = opt_go(&mut stream, &export).await?;
        Ok(Self::from_stream(stream, info))
    }

    /// Wraps a stream already in the transmission phase.
    pub fn from_stream(stream: TcpStream, info: ExportInfo) -> Self {
        let (read, write) = stream.into_split();
        let shared = Arc::new(Shared::default());
        let reader = tokio::spawn(read_replies(read, shared.clone()));
        Self {
            info,
            writer: tokio::sync::Mutex::new(write),
            shared,
            next_handle: AtomicU64::new(1),
            reader,
            timeout: Duration::from_secs(60),
        }
    }

    pub fn info(&self) -> ExportInfo {
        self.info
    }

    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// How long a single request may wait for its reply.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn lost(&self) -> NbdError {
        NbdError::ConnectionLost(self.shared.why_closed.lock().clone())
    }

    async fn request(
        &self,
        name: &'static str,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
    ) -> Result<Vec<u8>, NbdError> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(self.lost());
        }
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let read_len = if command == CMD_READ { length as usize } else { 0 };
        self.shared.pending.lock().insert(handle, Pending { read_len, reply: tx });
        // The reader may have closed between the check above and the insert.
        if self.shared.closed.load(Ordering::SeqCst) {
            self.shared.pending.lock().remove(&handle);
            return Err(self.lost());
        }
        let header = request_header(flags, command, handle, offset, length);
        let sent = tokio::time::timeout(self.timeout, async {
            let mut w = self.writer.lock().await;
            w.write_all(&header).await?;
            if let Some(p) = payload {
                w.write_all(p).await?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
        match sent {
            Err(_) => {
                self.shared.pending.lock().remove(&handle);
                return Err(NbdError::Timeout { command: name, offset, timeout: self.timeout });
            }
            Ok(Err(e)) => {
                self.shared.close(format!("sending {name}: {e}"));
                return Err(self.lost());
            }
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Err(_) => {
                self.shared.pending.lock().remove(&handle);
                Err(NbdError::Timeout { command: name, offset, timeout: self.timeout })
            }
            Ok(Err(_)) => Err(self.lost()),
            Ok(Ok(Err(errno))) => Err(NbdError::Errno { command: name, offset, errno }),
            Ok(Ok(Ok(data))) => Ok(data),
        }
    }

    pub async fn read(&self, offset: u64, length: u32) -> Result<Vec<u8>, NbdError> {
        self.request("READ", CMD_READ, 0, offset, length, None).await
    }

    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let len =
            u32::try_from(data.len()).map_err(|_| NbdError::Protocol("write too large".into()))?;
        self.request("WRITE", CMD_WRITE, flags, offset, len, Some(data)).await.map(drop)
    }

    pub async fn flush(&self) -> Result<(), NbdError> {
        self.request("FLUSH", CMD_FLUSH, 0, 0, 0, None).await.map(drop)
    }

    /// Sends `NBD_CMD_DISC` (which has no reply) and closes our side.
    pub async fn disconnect(self) -> Result<(), NbdError> {
        let header = request_header(0, CMD_DISC, 0, 0, 0);
        let mut w = self.writer.lock().await;
        let r = tokio::time::timeout(self.timeout, async {
            w.write_all(&header).await?;
            w.shutdown().await
        })
        .await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(NbdError::ConnectionLost(format!("sending DISC: {e}"))),
            Err(_) => Err(NbdError::Timeout { command: "DISC", offset: 0, timeout: self.timeout }),
        }
    }
}

async fn read_replies(mut read: OwnedReadHalf, shared: Arc<Shared>) {
    let why = loop {
        let (error, handle) = match read_simple_reply(&mut read).await {
            Ok(r) => r,
            Err(e) => break format!("reading a reply: {e}"),
        };
        // Take the entry out before reading the payload so no lock is held across the await.
        let Some(p) = shared.pending.lock().remove(&handle) else {
            break format!("reply for unknown handle {handle}");
        };
        if error != 0 {
            p.reply.send(Err(error)).ok();
            continue;
        }
        let mut data = vec![0u8; p.read_len];
        if let Err(e) = read.read_exact(&mut data).await {
            break format!("reading {} bytes of READ payload: {e}", p.read_len);
        }
        p.reply.send(Ok(data)).ok();
    };
    shared.close(why);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            parse_uri("nbd://127.0.0.1:123/abc").unwrap(),
            ("127.0.0.1:123".to_owned(), "abc".to_owned())
        );
        assert_eq!(parse_uri("nbd://h").unwrap(), ("h:10809".to_owned(), String::new()));
        assert!(parse_uri("http://x").is_err());
    }

    #[test]
    fn header_layout() {
        let h = request_header(1, CMD_WRITE, 7, 4096, 512);
        assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(u16::from_be_bytes([h[6], h[7]]), CMD_WRITE);
        assert_eq!(u64::from_be_bytes(h[16..24].try_into().unwrap()), 4096);
    }
}
