//! The transmission phase of one connection.
//!
//! ```text
//!   socket ──> reader (this task) ──spawn──> request task ─┐   (up to max_in_flight at once)
//!                 │ parses headers, reads WRITE            ├─> mpsc ──> writer task ──> socket
//!                 │ payloads into IoBufs                   │   (batches replies into one
//!                 └── early error replies ─────────────────┘    vectored write; no copies)
//! ```
//! Requests run concurrently and may complete out of order; each reply carries its cookie.
//! Backpressure: the reader takes a slot permit (and, for READ/WRITE, a byte-budget permit)
//! before accepting a request; permits travel with the reply and are released only once it
//! has been written, so a client that does not read its replies stops being read from.
//!
//! Waiting for the next request has no deadline (idle NBD connections are normal), but once a
//! request has started arriving, the rest of it and every reply write must finish within the
//! I/O timeout.

use std::io::IoSlice;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
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

/// A reply on its way to the socket, holding the permits it consumed.
struct Outgoing {
    reply: Reply,
    _slot: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
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
    let (tx, rx) = mpsc::channel::<Outgoing>(max_in_flight);
    // The writer cancels the connection if the socket fails, which stops the reader.
    let conn = cancel.child_token();
    let writer_task = tokio::spawn(write_loop(writer, rx, config.io_timeout, conn.clone()));

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
                let _ = tx.send(Outgoing { reply, _slot: slot, _bytes: None }).await;
                break End::Violation(format!("oversized write of {} bytes", req.length));
            }
            let mut buf = IoBuf::zeroed(req.length as usize);
            match timeout(config.io_timeout, reader.read_exact(&mut buf)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => break End::Violation(format!("truncated write payload: {e}")),
                Err(_) => break End::Violation("write payload timed out".into()),
            }
            payload = Some(buf);
        }
        let ctx = Arc::clone(&ctx);
        let tx = tx.clone();
        let stats = Arc::clone(&stats);
        tasks.spawn(async move {
            // A panic in the export must still answer this cookie, or the client waits forever.
            let result = match AssertUnwindSafe(ctx.execute(&req, payload)).catch_unwind().await {
                Ok(result) => result,
                Err(_) => {
                    error!(cookie = req.cookie, command = ?req.command, "export panicked");
                    Err(Failure { errno: errno::EIO, message: "internal error".into() })
                }
            };
            stats.record(&req, result.is_ok());
            if let Err(f) = &result {
                debug!(cookie = req.cookie, command = ?req.command, errno = f.errno, "{}", f.message);
            }
            let reply = ctx.encode(&req, result);
            // A closed channel means the writer is gone; the client will not get the reply.
            let _ = tx.send(Outgoing { reply, _slot: slot, _bytes: bytes }).await;
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
        warn!(remaining = tasks.len(), "in-flight requests did not finish in time; aborting them");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    drop(tx);
    drop(ctx);
    // The writer ends once every sender is gone and the queue is flushed.
    if timeout(config.io_timeout + Duration::from_secs(1), writer_task).await.is_err() {
        warn!("reply writer did not finish in time");
    }
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        error!("request task panicked: {e}");
    }
}

/// Writes replies in batches: everything queued is gathered into one vectored write.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<Outgoing>,
    io_timeout: Duration,
    conn: CancellationToken,
) {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let result = timeout(io_timeout, write_batch(&mut writer, &batch)).await;
        batch.clear();
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!("reply write failed: {e}");
                conn.cancel();
                return;
            }
            Err(_) => {
                warn!("reply write timed out; client is not reading");
                conn.cancel();
                return;
            }
        }
    }
    let _ = timeout(io_timeout, writer.shutdown()).await;
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
