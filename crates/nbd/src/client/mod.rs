//! An async NBD client: how the nexus reaches a replica on another engine.
//!
//! ```text
//!  Client ──(many requests in flight, matched by cookie)──> NBD server (engine, qemu-nbd, …)
//!    read / write / flush / trim / write_zeroes / block_status, each bounded by io_timeout
//!  ReconnectingClient ── owns the current Client, re-establishes it with backoff on demand
//! ```
//! A [`Client`] is one connection; it never reconnects by itself. Any timeout, I/O error or
//! protocol violation kills it, and from then on every request fails at once with
//! [`ClientError::Disconnected`], so a caller is never left waiting on a dead peer. Whether
//! and when to reconnect, and when to give up on a replica, is the caller's policy; the
//! [`ReconnectingClient`] helps with the mechanics. A `Client` is also an [`Export`], so a
//! remote replica can stand wherever a local one does.

mod addr;
mod conn;
mod error;
mod handshake;
mod reconnect;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use trireme_iobuf::IoBuf;

pub use addr::{ClientAddr, DEFAULT_PORT};
pub use error::{ClientError, errno_name};
pub use reconnect::{ReconnectEvent, ReconnectPolicy, ReconnectingClient};

use conn::{Outgoing, Pending, Reply, Shared};
use handshake::Negotiated;

use crate::export::{BlockSizes, Capabilities, Export, ExportError, Extent};
use crate::proto::*;

/// Tunables of a client connection.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bounds TCP/Unix connect plus the whole negotiation.
    pub connect_timeout: Duration,
    /// Bounds each request from submission to its final reply; when it passes, the connection
    /// is closed (a peer that does not answer one request is not trusted with the others).
    pub io_timeout: Duration,
    /// Requests on the wire at once; further callers wait for a slot (outside the timeout).
    pub max_in_flight: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            max_in_flight: 64,
        }
    }
}

/// TRIM and WRITE_ZEROES longer than this are split (the wire length is 32 bits).
const MAX_RANGE_REQUEST: u64 = 1 << 30;
/// Longest BLOCK_STATUS query: 32 bits, kept 4 KiB-aligned.
const MAX_STATUS_QUERY: u64 = 0xFFFF_F000;

/// One NBD connection in the transmission phase.
pub struct Client {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Outgoing>,
    info: Negotiated,
    addr: ClientAddr,
    export: String,
    opts: ClientOptions,
    cookies: AtomicU64,
    slots: Semaphore,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.end("client dropped");
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("export", &self.export)
            .field("size", &self.info.size)
            .field("alive", &self.is_alive())
            .finish()
    }
}

impl Client {
    /// Connects, negotiates (structured replies, `base:allocation`, `NBD_OPT_GO` with block
    /// sizes) and starts the connection's reader and writer tasks.
    pub async fn connect(
        addr: ClientAddr,
        export: &str,
        opts: ClientOptions,
    ) -> Result<Client, ClientError> {
        let name = addr.to_string();
        let after = opts.connect_timeout;
        let establish = async {
            let connect_err = |e: std::io::Error| ClientError::Connect {
                addr: name.clone(),
                source: Arc::new(e),
            };
            match &addr {
                ClientAddr::Tcp(hp) => {
                    let mut s = TcpStream::connect(hp.as_str()).await.map_err(connect_err)?;
                    // Small requests (4 KiB writes, flushes) must not wait for Nagle.
                    s.set_nodelay(true).map_err(connect_err)?;
                    // Closing resets the connection and drops whatever was not sent yet. A
                    // write that timed out during a network partition must never reach the
                    // server later, when the link comes back: by then its data may be stale.
                    s.set_zero_linger().map_err(connect_err)?;
                    let info = handshake::negotiate(&mut s, &name, export).await?;
                    let (r, w) = s.into_split();
                    Ok((info, Box::new(r) as BoxRead, Box::new(w) as BoxWrite))
                }
                ClientAddr::Unix(path) => {
                    let mut s = UnixStream::connect(path).await.map_err(connect_err)?;
                    let info = handshake::negotiate(&mut s, &name, export).await?;
                    let (r, w) = s.into_split();
                    Ok((info, Box::new(r) as BoxRead, Box::new(w) as BoxWrite))
                }
            }
        };
        let (info, r, w) = timeout(after, establish)
            .await
            .map_err(|_| ClientError::Timeout { op: "connect", after })??;
        Ok(Self::start(info, r, w, addr, export, opts))
    }

    /// Connects to an `nbd://` or `nbd+unix://` URI.
    pub async fn connect_uri(uri: &str, opts: ClientOptions) -> Result<Client, ClientError> {
        let (addr, export) = ClientAddr::parse_uri(uri)?;
        Self::connect(addr, &export, opts).await
    }

    fn start(
        info: Negotiated,
        r: BoxRead,
        w: BoxWrite,
        addr: ClientAddr,
        export: &str,
        opts: ClientOptions,
    ) -> Client {
        let shared = Arc::new(Shared::new());
        let slots = opts.max_in_flight.max(1);
        let (tx, rx) = mpsc::channel(slots);
        let tasks = vec![
            tokio::spawn(conn::writer(w, rx, shared.clone())),
            tokio::spawn(conn::reader(r, shared.clone(), info.structured, info.allocation_context)),
        ];
        Client {
            shared,
            tx,
            info,
            addr,
            export: export.to_owned(),
            opts,
            cookies: AtomicU64::new(1),
            slots: Semaphore::new(slots),
            tasks,
        }
    }

    /// Export size in bytes, as negotiated.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// What the export supports, from its transmission flags; `block_status` is true only if
    /// the server agreed to `base:allocation`.
    pub fn capabilities(&self) -> Capabilities {
        let f = self.info.flags;
        Capabilities {
            read_only: f & FLAG_READ_ONLY != 0,
            flush: f & FLAG_SEND_FLUSH != 0,
            fua: f & FLAG_SEND_FUA != 0,
            trim: f & FLAG_SEND_TRIM != 0,
            write_zeroes: f & FLAG_SEND_WRITE_ZEROES != 0,
            block_status: self.info.allocation_context.is_some(),
            multi_conn: f & FLAG_CAN_MULTI_CONN != 0,
        }
    }

    /// The server's block-size constraints (defaults if it sent none).
    pub fn block_sizes(&self) -> BlockSizes {
        self.info.block_sizes
    }

    /// The raw transmission flags.
    pub fn transmission_flags(&self) -> u16 {
        self.info.flags
    }

    /// Whether structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.info.structured
    }

    pub fn addr(&self) -> &ClientAddr {
        &self.addr
    }

    pub fn export_name(&self) -> &str {
        &self.export
    }

    /// False once the connection has died or `disconnect` began; requests then fail at once.
    pub fn is_alive(&self) -> bool {
        !self.shared.is_dead()
    }

    /// Completes when the connection dies (for a supervisor that wants to know promptly).
    pub async fn closed(&self) {
        self.shared.closed.cancelled().await;
    }

    /// Reads `len` bytes at `offset` into a fresh buffer; holes arrive as zeroes.
    pub async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, ClientError> {
        self.check_len("read", len)?;
        let buf = IoBuf::zeroed(len as usize);
        match self.submit("read", Command::Read, 0, offset, len, None, Some(buf)).await? {
            Reply::Data(b) => Ok(b),
            _ => Err(ClientError::protocol("read completed without data")),
        }
    }

    /// Writes `data` at `offset`; with `fua`, durable on the server before this returns (a
    /// server without FUA gets a FLUSH after the write).
    pub async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), ClientError> {
        let len = u32::try_from(data.len()).map_err(|_| ClientError::Invalid {
            reason: format!("write of {} bytes", data.len()),
        })?;
        self.check_len("write", len)?;
        if self.capabilities().read_only {
            return Err(ClientError::Unsupported { command: "write (read-only export)" });
        }
        let (flags, then_flush) = self.fua(fua);
        self.submit("write", Command::Write, flags, offset, len, Some(data), None).await?;
        self.flush_if(then_flush).await
    }

    /// Makes every completed write durable. A server that advertises no FLUSH has nothing to
    /// flush (it writes through), so this is then a no-op.
    pub async fn flush(&self) -> Result<(), ClientError> {
        if !self.capabilities().flush {
            return Ok(());
        }
        self.submit("flush", Command::Flush, 0, 0, 0, None, None).await.map(drop)
    }

    /// Discards `[offset, offset+len)`; split into several requests if long.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ClientError> {
        if !self.capabilities().trim {
            return Err(ClientError::Unsupported { command: "NBD_CMD_TRIM" });
        }
        let (flags, then_flush) = self.fua(fua);
        self.ranged("trim", Command::Trim, flags, offset, len).await?;
        self.flush_if(then_flush).await
    }

    /// Zeroes `[offset, offset+len)`; `may_trim` lets the server deallocate it.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), ClientError> {
        if !self.capabilities().write_zeroes {
            return Err(ClientError::Unsupported { command: "NBD_CMD_WRITE_ZEROES" });
        }
        let (mut flags, then_flush) = self.fua(fua);
        if !may_trim {
            flags |= CMD_FLAG_NO_HOLE;
        }
        self.ranged("write_zeroes", Command::WriteZeroes, flags, offset, len).await?;
        self.flush_if(then_flush).await
    }

    /// Allocation (`base:allocation`) of `[offset, offset+len)`: contiguous extents from
    /// `offset`, covering at least its first byte, clipped to the request and the export.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ClientError> {
        if self.info.allocation_context.is_none() {
            return Err(ClientError::Unsupported { command: "NBD_CMD_BLOCK_STATUS" });
        }
        let query = len.min(MAX_STATUS_QUERY) as u32;
        match self
            .submit("block_status", Command::BlockStatus, 0, offset, query, None, None)
            .await?
        {
            Reply::Extents(mut ext) => {
                let limit =
                    offset.saturating_add(len).min(self.info.size).saturating_sub(offset).max(1);
                clip_extents(&mut ext, limit);
                Ok(ext)
            }
            _ => Err(ClientError::protocol("block status completed without extents")),
        }
    }

    /// Ends the session at once: requests in flight fail, and a TCP connection is reset
    /// (unsent requests are dropped, never delivered later). For a peer that stopped answering.
    pub fn abort(&self) {
        self.end("client aborted");
    }

    /// Fails everything in flight and stops both tasks; dropping their socket halves closes it.
    fn end(&self, reason: &str) {
        self.shared.kill(reason);
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Ends the session cleanly: refuses new requests, lets those in flight finish (bounded by
    /// `io_timeout`), sends NBD_CMD_DISC and closes. Idempotent.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        if self.shared.is_dead() {
            return Ok(());
        }
        self.shared.begin_close();
        let after = self.opts.io_timeout;
        let n = u32::try_from(self.opts.max_in_flight.max(1)).unwrap_or(u32::MAX);
        let drain = async {
            // Holding every slot means nothing is in flight.
            let _all = self.slots.acquire_many(n).await;
            let (close, closed) = oneshot::channel();
            let disc =
                Request { flags: 0, command: Command::Disc, cookie: 0, offset: 0, length: 0 };
            let msg = Outgoing { header: disc.encode(), payload: None, close: Some(close) };
            if self.tx.send(msg).await.is_ok() {
                let _ = closed.await;
            }
        };
        let res = timeout(after, drain).await;
        self.shared.kill("client disconnected");
        res.map_err(|_| ClientError::Timeout { op: "disconnect", after })
    }

    fn check_len(&self, op: &str, len: u32) -> Result<(), ClientError> {
        let max = self.info.block_sizes.maximum;
        if len > max {
            return Err(ClientError::Invalid {
                reason: format!("{op} of {len} bytes exceeds the export's maximum of {max}"),
            });
        }
        Ok(())
    }

    /// The FUA flag to send, or whether a FLUSH must follow instead.
    fn fua(&self, fua: bool) -> (u16, bool) {
        match (fua, self.capabilities().fua) {
            (false, _) => (0, false),
            (true, true) => (CMD_FLAG_FUA, false),
            (true, false) => (0, true),
        }
    }

    async fn flush_if(&self, needed: bool) -> Result<(), ClientError> {
        if needed { self.flush().await } else { Ok(()) }
    }

    /// Sends a TRIM/WRITE_ZEROES range as requests of at most [`MAX_RANGE_REQUEST`] bytes, all
    /// in flight together.
    async fn ranged(
        &self,
        op: &'static str,
        command: Command,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Result<(), ClientError> {
        let mut parts = Vec::new();
        let mut pos = offset;
        let end = offset.checked_add(len).ok_or_else(|| ClientError::Invalid {
            reason: format!("{op} range {offset}+{len} overflows"),
        })?;
        while pos < end {
            let n = (end - pos).min(MAX_RANGE_REQUEST);
            parts.push(self.submit(op, command, flags, pos, n as u32, None, None));
            pos += n;
        }
        for r in futures::future::join_all(parts).await {
            r?;
        }
        Ok(())
    }

    /// Sends one request and waits for its final reply, all within `io_timeout`.
    #[allow(clippy::too_many_arguments)]
    async fn submit(
        &self,
        op: &'static str,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<IoBuf>,
        read_buf: Option<IoBuf>,
    ) -> Result<Reply, ClientError> {
        if self.shared.is_dead() {
            return Err(self.shared.lost());
        }
        // The wait for a slot is bounded too: slots are held only by requests that are
        // themselves bounded by io_timeout, and a dead connection fails them all at once.
        let _slot = self.slots.acquire().await.map_err(|_| self.shared.lost())?;
        let after = self.opts.io_timeout;
        let exchange = async {
            let cookie = self.cookies.fetch_add(1, Ordering::Relaxed);
            let (pending, rx) = Pending::new(command, offset, length, read_buf);
            // Registered before sending, so the reply can never overtake its entry.
            self.shared.register(cookie, pending)?;
            let header = Request { flags, command, cookie, offset, length }.encode();
            if self.tx.send(Outgoing { header, payload, close: None }).await.is_err() {
                return Err(self.shared.lost());
            }
            rx.await.unwrap_or_else(|_| Err(self.shared.lost()))
        };
        match timeout(after, exchange).await {
            Ok(r) => r,
            Err(_) => {
                self.shared.kill(&format!("{op} timed out after {after:?}"));
                Err(ClientError::Timeout { op, after })
            }
        }
    }
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Cuts extents to cover at most `limit` bytes (servers may describe past the request).
fn clip_extents(ext: &mut Vec<Extent>, limit: u64) {
    let mut total = 0u64;
    let mut keep = 0;
    for e in ext.iter_mut() {
        if total >= limit {
            break;
        }
        e.length = e.length.min(limit - total);
        total += e.length;
        keep += 1;
    }
    ext.truncate(keep);
}

/// A remote export is an export: the nexus can hold a `Client` where it holds a local replica.
#[async_trait]
impl Export for Client {
    fn size(&self) -> u64 {
        Client::size(self)
    }
    fn capabilities(&self) -> Capabilities {
        Client::capabilities(self)
    }
    fn block_sizes(&self) -> BlockSizes {
        Client::block_sizes(self)
    }
    async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, ExportError> {
        Ok(Client::read(self, offset, len).await?)
    }
    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), ExportError> {
        Ok(Client::write(self, offset, data, fua).await?)
    }
    async fn flush(&self) -> Result<(), ExportError> {
        Ok(Client::flush(self).await?)
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        Ok(Client::trim(self, offset, len, fua).await?)
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), ExportError> {
        Ok(Client::write_zeroes(self, offset, len, may_trim, fua).await?)
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        Ok(Client::block_status(self, offset, len).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_extents() {
        let e = |length| Extent { length, hole: false, zero: false };
        let mut v = vec![e(10), e(10), e(10)];
        clip_extents(&mut v, 15);
        assert_eq!(v, vec![e(10), e(5)]);
        let mut v = vec![e(10)];
        clip_extents(&mut v, 100);
        assert_eq!(v, vec![e(10)]);
    }
}
