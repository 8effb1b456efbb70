//! The transmission phase of one connection.
//!
//! ```text
//!   socket ──> reader (this task) ──spawn──> request task ──> ReplySink ──> socket
//!                 │ parses headers, reads WRITE            (the first finished request that
//!                 │ payloads into IoBufs                    finds the socket free writes the
//!                 └── early error replies ──> ReplySink     queued replies, batch by batch)
//! ```
//! Requests run concurrently and may complete out of order; each reply carries its cookie.
//! There is no writer task: a request that finishes queues its reply and, if no other task is
//! writing, writes the queue itself. At queue depth 1 that saves a cross-task wakeup per
//! request. Under load a reply waits one scheduler pass before writing, so replies finishing
//! together (completions are reaped in batches) are written together: small ones share one
//! vectored write (one syscall and one wakeup of the client), large ones go one per write with
//! the reader let in between, so the client's next requests reach the disk while the rest of
//! the replies are copied out.
//! Backpressure: the reader takes a slot permit (and, for READ/WRITE, a byte-budget permit)
//! before accepting a request; permits travel with the reply and are released only once it
//! has been written, so a client that does not read its replies stops being read from.
//!
//! Waiting for the next request has no deadline (idle NBD connections are normal), but once a
//! request has started arriving, the rest of it and every reply write must finish within the
//! I/O timeout.

use std::io::IoSlice;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};
use trireme_iobuf::IoBuf;

use crate::handshake::Session;
use crate::proto::{errno, *};
use crate::request::{Failure, Reply, RequestContext};
use crate::server::ServerConfig;
use crate::stats::ExportStats;

/// Unit of the per-connection byte budget.
const BUDGET_UNIT: usize = 4096;
/// Replies gathered into one vectored write.
const MAX_BATCH: usize = 64;
/// Payload written in one go after which the writer lets the reader run before writing more.
const YIELD_AFTER: usize = 64 << 10;
/// Payload bytes one vectored write gathers before the writer lets the reader run; the first
/// reply of a batch always goes, however large.
const BATCH_BYTES: usize = 256 << 10;

/// A reply on its way to the socket, holding the permits it consumed.
struct Outgoing {
    reply: Reply,
    _slot: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Outgoing {
    fn payload_len(&self) -> usize {
        self.reply.data.as_ref().map_or(0, |d| d.len())
    }
}

/// Why the reader stopped.
#[derive(Debug)]
enum End {
    Eof,
    Disconnect,
    Shutdown,
    Violation(String),
    Io(std::io::Error),
}

/// Serves requests until the client disconnects, breaks the protocol, or `cancel` fires.
pub(crate) async fn run<R, W>(
    session: Session,
    mut reader: R,
    writer: W,
    config: &ServerConfig,
    stats: Arc<ExportStats>,
    cancel: CancellationToken,
) where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let caps = session.export.capabilities();
    let sizes = session.export.block_sizes();
    let ctx = Arc::new(RequestContext {
        export: session.export,
        size: session.size,
        caps,
        structured: session.structured,
        allocation_context: session.allocation_context,
        max_request: config.max_request.min(sizes.maximum).max(1),
        min_block: sizes.minimum.max(1),
    });
    let max_in_flight = config.max_in_flight.max(1);
    // The sink cancels the connection if the socket fails, which stops the reader.
    let conn = cancel.child_token();
    let sink = Arc::new(ReplySink::new(writer, config.io_timeout, conn.clone()));

    let slots = Arc::new(Semaphore::new(max_in_flight));
    let budget_units = (config.max_buffered_bytes / BUDGET_UNIT).clamp(1, u32::MAX as usize);
    let budget = Arc::new(Semaphore::new(budget_units));
    let mut tasks = JoinSet::new();

    let end = loop {
        let ready = tokio::select! {
            biased;
            () = conn.cancelled() => break End::Shutdown,
            r = reader.fill_buf() => r.map(|b| !b.is_empty()),
        };
        match ready {
            Ok(true) => {}
            Ok(false) => break End::Eof,
            Err(e) => break End::Io(e),
        }
        let mut raw = [0u8; REQUEST_LEN];
        match timeout(config.io_timeout, reader.read_exact(&mut raw)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break End::Violation(format!("truncated request header: {e}")),
            Err(_) => break End::Violation("request header timed out".into()),
        }
        let req = match Request::decode(&raw) {
            Ok(req) => req,
            Err(e) => break End::Violation(format!("bad request: {e}")),
        };
        if req.command == Command::Disc {
            break End::Disconnect;
        }
        let slot = tokio::select! {
            () = conn.cancelled() => break End::Shutdown,
            p = Arc::clone(&slots).acquire_owned() => p.ok(),
        };
        let carries_data = matches!(req.command, Command::Read | Command::Write);
        let bytes = if carries_data && req.length > 0 && req.length <= config.max_request {
            let units = (req.length as usize).div_ceil(BUDGET_UNIT).min(budget_units) as u32;
            tokio::select! {
                () = conn.cancelled() => break End::Shutdown,
                p = Arc::clone(&budget).acquire_many_owned(units) => p.ok(),
            }
        } else {
            None
        };
        let mut payload = None;
        if req.command == Command::Write {
            if req.length > config.max_request {
                // The payload cannot be skipped safely: answer, then drop the client.
                let f = Failure {
                    errno: errno::EINVAL,
                    message: format!("write of {} bytes exceeds the maximum", req.length),
                };
                let reply = ctx.encode(&req, Err(f));
                sink.begin();
                sink.send(Outgoing { reply, _slot: slot, _bytes: None }).await;
                break End::Violation(format!("oversized write of {} bytes", req.length));
            }
            match timeout(config.io_timeout, read_payload(&mut reader, req.length as usize)).await {
                Ok(Ok(buf)) => payload = Some(buf),
                Ok(Err(e)) => break End::Violation(format!("truncated write payload: {e}")),
                Err(_) => break End::Violation("write payload timed out".into()),
            }
        }
        let ctx = Arc::clone(&ctx);
        let sink = Arc::clone(&sink);
        let stats = Arc::clone(&stats);
        sink.begin();
        let arrived = Instant::now();
        tasks.spawn(async move {
            // A panic in the export must still answer this cookie, or the client waits forever.
            let result = match AssertUnwindSafe(ctx.execute(&req, payload)).catch_unwind().await {
                Ok(result) => result,
                Err(_) => {
                    error!(cookie = req.cookie, command = ?req.command, "export panicked");
                    Err(Failure { errno: errno::EIO, message: "internal error".into() })
                }
            };
            stats.record(&req, result.is_ok(), arrived.elapsed());
            if let Err(f) = &result {
                debug!(cookie = req.cookie, command = ?req.command, errno = f.errno, "{}", f.message);
            }
            let reply = ctx.encode(&req, result);
            sink.send(Outgoing { reply, _slot: slot, _bytes: bytes }).await;
        });
        while let Some(done) = tasks.try_join_next() {
            log_join(done);
        }
    };

    match &end {
        End::Eof | End::Disconnect => debug!(?end, "client closed the connection"),
        End::Shutdown => debug!("connection closing for shutdown"),
        End::Violation(why) => warn!("dropping client: {why}"),
        End::Io(e) => debug!("connection read failed: {e}"),
    }
    // Let in-flight requests finish (the protocol asks it for DISC and shutdown), bounded.
    let drained = timeout(config.shutdown_grace, async {
        while let Some(done) = tasks.join_next().await {
            log_join(done);
        }
    })
    .await;
    if drained.is_err() {
        // The requests are carried out all the same: a write cancelled half way could leave
        // the export's copies of the data (a nexus's replicas) different, with nothing
        // recording it. Only their replies are given up, since the connection closes now.
        warn!(
            remaining = tasks.len(),
            "in-flight requests did not finish in time; closing without their replies"
        );
        sink.abandon();
        tasks.detach_all();
    } else {
        sink.drain().await;
    }
    drop(ctx);
    sink.shutdown().await;
}

/// Reads a WRITE payload of `len` bytes into a fresh buffer without zeroing it first: the
/// socket overwrites every byte, and zeroing a 1 MiB payload costs as much as receiving it.
async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> std::io::Result<IoBuf> {
    // SAFETY: the loop below writes all of 0..len (through the uninitialised view, which never
    // exposes uninitialised bytes as u8) before the buffer is returned; on error it is dropped
    // unread.
    let mut buf = unsafe { IoBuf::uninit(len) };
    let mut filled = 0;
    while filled < len {
        let n = std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::uninit(&mut buf.as_uninit_mut()[filled..]);
            match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
    Ok(buf)
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        error!("request task panicked: {e}");
    }
}

/// The connection's reply path, shared by every request task: a queue of finished replies and
/// the socket, written by whichever task finds it free.
struct ReplySink<W> {
    queue: Mutex<Vec<Outgoing>>,
    writer: tokio::sync::Mutex<W>,
    io_timeout: Duration,
    /// Requests begun whose reply has not been queued yet.
    executing: AtomicUsize,
    /// Set once a write failed: later replies are dropped (their permits with them).
    broken: AtomicBool,
    conn: CancellationToken,
}

impl<W: AsyncWrite + Unpin> ReplySink<W> {
    fn new(writer: W, io_timeout: Duration, conn: CancellationToken) -> Self {
        Self {
            queue: Mutex::new(Vec::with_capacity(MAX_BATCH)),
            writer: tokio::sync::Mutex::new(writer),
            io_timeout,
            executing: AtomicUsize::new(0),
            broken: AtomicBool::new(false),
            conn,
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Outgoing>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a request whose reply will come through `send`.
    fn begin(&self) {
        self.executing.fetch_add(1, Ordering::AcqRel);
    }

    /// Queues `out` and writes the queue unless another task is already writing it.
    async fn send(&self, out: Outgoing) {
        let others = self.executing.fetch_sub(1, Ordering::AcqRel) > 1;
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        self.queue().push(out);
        if others {
            // Other requests are running and may finish in this same pass of the scheduler
            // (completions are reaped in batches, and some disks complete a whole queue at
            // once). Yielding once lets them queue their replies first: small ones then share
            // one vectored write (one syscall, one wakeup of the client), and large ones are
            // written one per pass by `drain`, with the reader let in between.
            tokio::task::yield_now().await;
        }
        self.drain().await;
    }

    /// Writes queued replies until the queue is empty or another task holds the socket.
    ///
    /// No reply is stranded: a task that queues while another writes fails `try_lock`, but the
    /// writer looks at the queue again after unlocking and takes over if anything is left.
    async fn drain(&self) {
        loop {
            let Ok(mut w) = self.writer.try_lock() else { return };
            loop {
                let batch = self.next_batch();
                if batch.is_empty() {
                    break;
                }
                let bytes: usize = batch.iter().map(Outgoing::payload_len).sum();
                let result = timeout(self.io_timeout, write_batch(&mut *w, &batch)).await;
                drop(batch);
                let failed = match result {
                    Ok(Ok(())) => false,
                    Ok(Err(e)) => {
                        debug!("reply write failed: {e}");
                        true
                    }
                    Err(_) => {
                        warn!("reply write timed out; client is not reading");
                        true
                    }
                };
                if failed {
                    self.broken.store(true, Ordering::Release);
                    self.queue().clear();
                    self.conn.cancel();
                    return;
                }
                if bytes >= YIELD_AFTER && !self.queue().is_empty() {
                    // Copying a large reply into the socket keeps this thread busy for
                    // hundreds of microseconds. Before the next one, let the runtime poll the
                    // socket: the client answers each reply with a new request, and reading
                    // it now keeps the disk busy while the rest are written. Without this, a
                    // disk that completes a queue at once gets the next queue only after every
                    // reply is out, and sits idle meanwhile.
                    tokio::task::yield_now().await;
                }
            }
            drop(w);
            if self.broken.load(Ordering::Acquire) || self.queue().is_empty() {
                return;
            }
        }
    }

    /// Takes the replies for one vectored write: up to `MAX_BATCH` of them, and up to
    /// `BATCH_BYTES` of payload unless the first alone is larger.
    fn next_batch(&self) -> Vec<Outgoing> {
        let mut q = self.queue();
        let mut bytes = 0;
        let n = q
            .iter()
            .take(MAX_BATCH)
            .take_while(|m| {
                let first = bytes == 0;
                bytes += m.payload_len();
                first || bytes <= BATCH_BYTES
            })
            .count();
        q.drain(..n).collect()
    }

    /// Drops every reply not yet written, and any sent later.
    fn abandon(&self) {
        self.broken.store(true, Ordering::Release);
        self.queue().clear();
    }

    /// Ends the write side once every reply has been written.
    async fn shutdown(&self) {
        let mut w = self.writer.lock().await;
        let _ = timeout(self.io_timeout, w.shutdown()).await;
    }
}

async fn write_batch<W: AsyncWrite + Unpin>(w: &mut W, batch: &[Outgoing]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
    for m in batch {
        slices.push(IoSlice::new(&m.reply.head));
        if let Some(data) = &m.reply.data {
            slices.push(IoSlice::new(data));
        }
    }
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    w.flush().await
}

#[cfg(test)]
#[path = "transmission_tests.rs"]
mod tests;
