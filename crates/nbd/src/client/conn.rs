//! One live connection in the transmission phase: the table of requests in flight, the writer
//! task that serialises them onto the socket and the reader task that matches replies to them
//! by cookie.
//!
//! ```text
//!  caller ─ register(cookie) ─> pending table <─ take/put back ─ reader task <── socket
//!    │                                                               (chunks land
//!    └─ Outgoing (header + owned IoBuf) ─> mpsc ─> writer task ──> socket    in the IoBuf)
//! ```
//! The first failure of any kind (I/O error, protocol violation, a request timing out, the
//! client being dropped) "kills" the connection: the table is drained with `Disconnected`, the
//! cancellation token stops both tasks, and every later request fails at registration. So
//! nothing waits on a connection that can no longer answer.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;
use trireme_iobuf::IoBuf;

use super::ClientError;
use crate::export::Extent;
use crate::proto::*;

/// Socket buffering; large payloads bypass these buffers entirely.
const SOCKET_BUFFER: usize = 64 << 10;
/// Largest non-data chunk payload accepted (a block-status reply of 512k extents).
const MAX_META_CHUNK: u32 = 4 << 20;

/// A successful reply, shaped by the command.
#[derive(Debug)]
pub(crate) enum Reply {
    Done,
    Data(IoBuf),
    Extents(Vec<Extent>),
}

type Completion = oneshot::Sender<Result<Reply, ClientError>>;

/// Disjoint ranges of a read, relative to its start. The protocol forbids chunks that overlap;
/// counting bytes alone would let two chunks over the same range pass for a whole reply, with
/// the rest of the buffer never written.
#[derive(Debug, Default)]
pub(crate) struct Coverage {
    /// Start -> end of each range described.
    ranges: std::collections::BTreeMap<u64, u64>,
    total: u64,
}

impl Coverage {
    /// Records `[start, start + len)`; false if it overlaps a range already described.
    pub fn claim(&mut self, start: u64, len: u64) -> bool {
        let end = start + len;
        let before_ok = self.ranges.range(..=start).next_back().is_none_or(|(_, &e)| e <= start);
        let after_ok = self.ranges.range(start..).next().is_none_or(|(&s, _)| end <= s);
        if !(before_ok && after_ok) {
            return false;
        }
        if len > 0 {
            self.ranges.insert(start, end);
        }
        self.total += len;
        true
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

/// A request waiting for its reply.
pub(crate) struct Pending {
    pub command: Command,
    pub offset: u64,
    pub length: u32,
    /// READ target, filled in place by the reader.
    pub buf: Option<IoBuf>,
    /// The parts of a READ's range that chunks have described so far.
    pub covered: Coverage,
    pub extents: Vec<Extent>,
    /// First error chunk seen; reported once the final chunk arrives.
    pub error: Option<ClientError>,
    pub done: Completion,
}

impl Pending {
    pub fn new(
        command: Command,
        offset: u64,
        length: u32,
        buf: Option<IoBuf>,
    ) -> (Self, oneshot::Receiver<Result<Reply, ClientError>>) {
        let (done, rx) = oneshot::channel();
        let p = Pending {
            command,
            offset,
            length,
            buf,
            covered: Coverage::default(),
            extents: Vec::new(),
            error: None,
            done,
        };
        (p, rx)
    }

    /// Fails this request with a protocol violation and returns the error that kills the
    /// connection.
    fn violate(self, reason: String) -> ClientError {
        let e = ClientError::protocol(reason);
        let _ = self.done.send(Err(e.clone()));
        e
    }
}

/// One request on its way to the socket.
pub(crate) struct Outgoing {
    pub header: [u8; REQUEST_LEN],
    pub payload: Option<IoBuf>,
    /// Set on NBD_CMD_DISC: the writer flushes, shuts the socket down and signals.
    pub close: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// Why the connection died; set once.
    dead: Option<String>,
    /// `disconnect` has begun: no new requests.
    closing: bool,
}

/// State shared by the client handle and its two tasks.
pub(crate) struct Shared {
    state: Mutex<State>,
    pub closed: CancellationToken,
}

impl Shared {
    pub fn new() -> Self {
        Self { state: Mutex::new(State::default()), closed: CancellationToken::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The error a request gets on a dead connection.
    pub fn lost(&self) -> ClientError {
        let st = self.lock();
        ClientError::disconnected(st.dead.clone().unwrap_or_else(|| "connection closed".into()))
    }

    /// Requests sent or about to be, whose reply has not arrived.
    pub fn in_flight(&self) -> usize {
        self.lock().pending.len()
    }

    pub fn is_dead(&self) -> bool {
        let st = self.lock();
        st.dead.is_some() || st.closing
    }

    pub fn register(&self, cookie: u64, p: Pending) -> Result<(), ClientError> {
        let mut st = self.lock();
        if let Some(reason) = &st.dead {
            return Err(ClientError::disconnected(reason.clone()));
        }
        if st.closing {
            return Err(ClientError::disconnected("client is disconnecting"));
        }
        st.pending.insert(cookie, p);
        Ok(())
    }

    pub fn begin_close(&self) {
        self.lock().closing = true;
    }

    fn take(&self, cookie: u64) -> Option<Pending> {
        self.lock().pending.remove(&cookie)
    }

    fn put_back(&self, cookie: u64, p: Pending) {
        let mut st = self.lock();
        if let Some(reason) = &st.dead {
            let _ = p.done.send(Err(ClientError::disconnected(reason.clone())));
        } else {
            st.pending.insert(cookie, p);
        }
    }

    /// Ends the connection (idempotent): fails everything in flight and stops both tasks.
    pub fn kill(&self, reason: &str) {
        let drained: Vec<Pending> = {
            let mut st = self.lock();
            if st.dead.is_some() {
                return;
            }
            st.dead = Some(reason.to_owned());
            st.pending.drain().map(|(_, p)| p).collect()
        };
        debug!(reason, in_flight = drained.len(), "NBD client connection closed");
        for p in drained {
            let _ = p.done.send(Err(ClientError::disconnected(reason)));
        }
        self.closed.cancel();
    }
}

/// Writes requests until the channel closes, the connection dies or a DISC was sent.
pub(crate) async fn writer<W>(
    w: W,
    mut rx: mpsc::Receiver<Outgoing>,
    shared: std::sync::Arc<Shared>,
) where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(SOCKET_BUFFER, w);
    let run = async {
        while let Some(mut msg) = rx.recv().await {
            let mut yielded = false;
            // Batch whatever is queued into one flush: under load many small requests share a
            // segment.
            loop {
                w.write_all(&msg.header).await?;
                if let Some(p) = &msg.payload {
                    w.write_all(p).await?;
                }
                if let Some(close) = msg.close.take() {
                    w.flush().await?;
                    w.shutdown().await?;
                    let _ = close.send(());
                    return Ok(());
                }
                match rx.try_recv() {
                    Ok(next) => msg = next,
                    // With other requests in flight, give the tasks already runnable one
                    // scheduler pass to queue theirs before sending: a nexus fans a burst of
                    // writes out to every child, and one segment for the burst costs the peer
                    // one wakeup, not one each.
                    Err(_) if !yielded && shared.in_flight() > 1 => {
                        yielded = true;
                        tokio::task::yield_now().await;
                        match rx.try_recv() {
                            Ok(next) => msg = next,
                            Err(_) => break,
                        }
                    }
                    Err(_) => break,
                }
            }
            w.flush().await?;
        }
        Ok::<(), std::io::Error>(())
    };
    tokio::select! {
        () = shared.closed.cancelled() => {}
        r = run => match r {
            Ok(()) => {}
            Err(e) => shared.kill(&format!("write failed: {e}")),
        },
    }
}

/// Reads replies until the connection dies.
pub(crate) async fn reader<R>(
    r: R,
    shared: std::sync::Arc<Shared>,
    structured: bool,
    context: Option<u32>,
) where
    R: AsyncRead + Unpin,
{
    let mut rd = Replies {
        r: BufReader::with_capacity(SOCKET_BUFFER, r),
        shared: &shared,
        structured,
        context,
    };
    let reason = tokio::select! {
        () = shared.closed.cancelled() => return,
        e = rd.run() => e,
    };
    let reason = match reason {
        ClientError::Protocol { reason } => format!("protocol violation: {reason}"),
        ClientError::Disconnected { reason } => reason,
        other => other.to_string(),
    };
    shared.kill(&reason);
}

struct Replies<'a, R> {
    r: BufReader<R>,
    shared: &'a Shared,
    structured: bool,
    context: Option<u32>,
}

fn io_lost(e: std::io::Error) -> ClientError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ClientError::disconnected("server closed the connection")
    } else {
        ClientError::disconnected(format!("read failed: {e}"))
    }
}

impl<R: AsyncRead + Unpin> Replies<'_, R> {
    /// Returns why the connection ended.
    async fn run(&mut self) -> ClientError {
        loop {
            if let Err(e) = self.one().await {
                return e;
            }
        }
    }

    async fn read(&mut self, buf: &mut [u8]) -> Result<(), ClientError> {
        self.r.read_exact(buf).await.map(|_| ()).map_err(io_lost)
    }

    async fn one(&mut self) -> Result<(), ClientError> {
        let mut head = [0u8; CHUNK_HEADER_LEN];
        self.read(&mut head[..4]).await?;
        match u32::from_be_bytes([head[0], head[1], head[2], head[3]]) {
            SIMPLE_REPLY_MAGIC => {
                self.read(&mut head[4..SIMPLE_REPLY_LEN]).await?;
                let h = SimpleReply::decode(&head[..SIMPLE_REPLY_LEN])
                    .map_err(|e| ClientError::protocol(e.to_string()))?;
                self.simple(h).await
            }
            STRUCTURED_REPLY_MAGIC if self.structured => {
                self.read(&mut head[4..]).await?;
                let h =
                    ChunkHeader::decode(&head).map_err(|e| ClientError::protocol(e.to_string()))?;
                self.chunk(h).await
            }
            STRUCTURED_REPLY_MAGIC => Err(ClientError::protocol("structured reply not negotiated")),
            m => Err(ClientError::protocol(format!("bad reply magic {m:#x}"))),
        }
    }

    fn pending(&self, cookie: u64) -> Result<Pending, ClientError> {
        self.shared
            .take(cookie)
            .ok_or_else(|| ClientError::protocol(format!("reply for unknown cookie {cookie:#x}")))
    }

    async fn simple(&mut self, h: SimpleReply) -> Result<(), ClientError> {
        let mut p = self.pending(h.cookie)?;
        if h.error != 0 {
            let e = ClientError::Server { errno: h.error, message: String::new() };
            let _ = p.done.send(Err(e));
            return Ok(());
        }
        let reply = match p.command {
            Command::Read => {
                let Some(mut buf) = p.buf.take() else {
                    return Err(p.violate("read without a buffer".into()));
                };
                self.read(&mut buf).await?;
                Reply::Data(buf)
            }
            Command::BlockStatus => {
                return Err(p.violate("simple reply to NBD_CMD_BLOCK_STATUS".into()));
            }
            _ => Reply::Done,
        };
        let _ = p.done.send(Ok(reply));
        Ok(())
    }

    /// Reads a whole non-data chunk payload, bounded.
    async fn payload(
        &mut self,
        h: &ChunkHeader,
        p: Pending,
    ) -> Result<(Pending, Chunk), ClientError> {
        if h.length > MAX_META_CHUNK {
            return Err(p.violate(format!("chunk of {} bytes", h.length)));
        }
        let mut data = vec![0u8; h.length as usize];
        self.read(&mut data).await?;
        match Chunk::decode(h, &data) {
            Ok(c) => Ok((p, c)),
            // Unknown error types still carry an errno first: the request failed, nothing more.
            Err(_) if h.chunk_type & (1 << 15) != 0 && data.len() >= 4 => {
                let errno = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                Ok((
                    p,
                    Chunk::Error {
                        error: errno,
                        message: format!("error chunk type {:#x}", h.chunk_type),
                    },
                ))
            }
            Err(e) => Err(p.violate(format!("chunk type {}: {e}", h.chunk_type))),
        }
    }

    /// Checks that `[offset, offset+len)` lies inside the request; returns the start within it.
    fn within(p: &Pending, offset: u64, len: u64) -> Option<usize> {
        let rel = offset.checked_sub(p.offset)?;
        (rel.checked_add(len)? <= u64::from(p.length)).then_some(rel as usize)
    }

    async fn chunk(&mut self, h: ChunkHeader) -> Result<(), ClientError> {
        let mut p = self.pending(h.cookie)?;
        match h.chunk_type {
            REPLY_TYPE_OFFSET_DATA => {
                if p.command != Command::Read || h.length < 9 {
                    return Err(p.violate("unexpected OFFSET_DATA chunk".into()));
                }
                let mut off = [0u8; 8];
                self.read(&mut off).await?;
                let offset = u64::from_be_bytes(off);
                let len = u64::from(h.length - 8);
                let Some(rel) = Self::within(&p, offset, len) else {
                    return Err(
                        p.violate(format!("OFFSET_DATA {offset}+{len} outside the request"))
                    );
                };
                if !p.covered.claim(rel as u64, len) {
                    return Err(
                        p.violate(format!("OFFSET_DATA {offset}+{len} overlaps another chunk"))
                    );
                }
                let Some(buf) = p.buf.as_mut() else {
                    return Err(p.violate("read without a buffer".into()));
                };
                // Straight into the caller's buffer: the only copy is the kernel's.
                self.read(&mut buf[rel..rel + len as usize]).await?;
            }
            REPLY_TYPE_OFFSET_HOLE => {
                if p.command != Command::Read {
                    return Err(p.violate("unexpected OFFSET_HOLE chunk".into()));
                }
                let (q, c) = self.payload(&h, p).await?;
                p = q;
                let Chunk::OffsetHole { offset, length } = c else {
                    return Err(p.violate("bad OFFSET_HOLE".into()));
                };
                let len = u64::from(length);
                let (Some(rel), Some(buf)) = (Self::within(&p, offset, len), p.buf.as_mut()) else {
                    return Err(
                        p.violate(format!("OFFSET_HOLE {offset}+{len} outside the request"))
                    );
                };
                buf[rel..rel + len as usize].fill(0);
                if !p.covered.claim(rel as u64, len) {
                    return Err(
                        p.violate(format!("OFFSET_HOLE {offset}+{len} overlaps another chunk"))
                    );
                }
            }
            REPLY_TYPE_BLOCK_STATUS => {
                if p.command != Command::BlockStatus {
                    return Err(p.violate("unexpected BLOCK_STATUS chunk".into()));
                }
                let (q, c) = self.payload(&h, p).await?;
                p = q;
                let Chunk::BlockStatus { context_id, descriptors } = c else {
                    return Err(p.violate("bad BLOCK_STATUS".into()));
                };
                // Only base:allocation was asked for; anything else is not ours to interpret.
                if Some(context_id) == self.context {
                    if descriptors.iter().any(|d| d.length == 0) {
                        return Err(p.violate("zero-length block status extent".into()));
                    }
                    p.extents.extend(descriptors.iter().map(|d| Extent {
                        length: u64::from(d.length),
                        hole: d.flags & STATE_HOLE != 0,
                        zero: d.flags & STATE_ZERO != 0,
                    }));
                }
            }
            REPLY_TYPE_NONE => {
                if h.length != 0 || h.flags & REPLY_FLAG_DONE == 0 {
                    return Err(p.violate("NONE chunk without DONE".into()));
                }
            }
            t if t & (1 << 15) != 0 => {
                let (q, c) = self.payload(&h, p).await?;
                p = q;
                let (errno, message) = match c {
                    Chunk::Error { error, message } => (error, message),
                    Chunk::ErrorOffset { error, message, offset } => {
                        (error, format!("{message} (at offset {offset})"))
                    }
                    _ => (errno::EIO, String::new()),
                };
                if errno == 0 {
                    return Err(p.violate("error chunk with errno 0".into()));
                }
                p.error.get_or_insert(ClientError::Server { errno, message });
            }
            t => return Err(p.violate(format!("unknown chunk type {t}"))),
        }
        if h.flags & REPLY_FLAG_DONE == 0 {
            self.shared.put_back(h.cookie, p);
            return Ok(());
        }
        if let Some(e) = p.error.take() {
            let _ = p.done.send(Err(e));
            return Ok(());
        }
        let reply = match p.command {
            Command::Read => {
                if p.covered.total() != u64::from(p.length) {
                    let msg =
                        format!("read reply covers {} of {} bytes", p.covered.total(), p.length);
                    return Err(p.violate(msg));
                }
                match p.buf.take() {
                    Some(buf) => Reply::Data(buf),
                    None => return Err(p.violate("read without a buffer".into())),
                }
            }
            Command::BlockStatus => {
                if p.extents.is_empty() {
                    return Err(p.violate("block status reply without extents".into()));
                }
                Reply::Extents(std::mem::take(&mut p.extents))
            }
            _ => Reply::Done,
        };
        let _ = p.done.send(Ok(reply));
        Ok(())
    }
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;

#[cfg(test)]
mod coverage_tests {
    use super::Coverage;

    #[test]
    fn overlapping_chunks_are_caught_in_any_order() {
        let mut c = Coverage::default();
        assert!(c.claim(4096, 4096));
        assert!(c.claim(0, 4096), "adjacent before");
        assert!(c.claim(8192, 100), "adjacent after");
        assert!(!c.claim(4096, 4096), "the same range twice");
        assert!(!c.claim(4000, 200), "straddles a start");
        assert!(!c.claim(8200, 10), "inside a range");
        assert!(!c.claim(0, 16384), "covers several");
        assert!(c.claim(9000, 0));
        assert_eq!(c.total(), 8192 + 100);
    }
}
