//! The reply sink's batching, observed through a writer that logs each write.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use super::*;

/// Logs the size of every write and wakes the stand-in client, as a reply reaching a client
/// prompts its next request.
#[derive(Clone, Default)]
struct Log {
    entries: Arc<Mutex<Vec<String>>>,
    replied: Arc<tokio::sync::Notify>,
}

impl Log {
    fn push(&self, entry: String) {
        self.entries.lock().unwrap().push(entry);
    }
    fn record_write(&self, n: usize) {
        self.push(format!("write {n}"));
        self.replied.notify_one();
    }
    fn entries(&self) -> Vec<String> {
        self.entries.lock().unwrap().clone()
    }
}

impl AsyncWrite for Log {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.record_write(buf.len());
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let n: usize = bufs.iter().map(|b| b.len()).sum();
        self.record_write(n);
        Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

const HEAD: usize = 16;

fn reply(payload: usize) -> Outgoing {
    let data = (payload > 0).then(|| IoBuf::zeroed(payload));
    Outgoing { reply: Reply { head: vec![0; HEAD], data }, _slot: None, _bytes: None }
}

/// Finishes `sizes.len()` requests in the same scheduler pass, as a disk that completes a whole
/// queue at once does, while a task standing in for the connection's reader logs each time a
/// write has woken it and it got to run. Returns the log.
async fn finish_together(sizes: &[usize]) -> Vec<String> {
    let log = Log::default();
    let sink =
        Arc::new(ReplySink::new(log.clone(), Duration::from_secs(5), CancellationToken::new()));
    for _ in sizes {
        sink.begin();
    }
    let mut tasks = JoinSet::new();
    for &size in sizes {
        let sink = Arc::clone(&sink);
        tasks.spawn(async move { sink.send(reply(size)).await });
    }
    let reader = {
        let log = log.clone();
        tokio::spawn(async move {
            loop {
                log.replied.notified().await;
                log.push("reader".into());
            }
        })
    };
    while tasks.join_next().await.is_some() {}
    reader.abort();
    log.entries()
}

/// The writes in `log`, and whether the reader ran between every two of them.
fn writes(log: &[String]) -> (Vec<&str>, bool) {
    let writes = log.iter().filter(|e| e.starts_with("write")).map(String::as_str).collect();
    let reader_between =
        log.windows(2).all(|w| !(w[0].starts_with("write") && w[1].starts_with("write")));
    (writes, reader_between)
}

#[tokio::test(flavor = "current_thread")]
async fn large_replies_finishing_together_leave_one_per_write_with_the_reader_let_in_between() {
    let log = finish_together(&[1 << 20; 4]).await;
    let (writes, interleaved) = writes(&log);
    let one = format!("write {}", HEAD + (1 << 20));
    assert_eq!(writes, vec![one.as_str(); 4], "{log:?}");
    assert!(interleaved, "the reader must run between large replies: {log:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn small_replies_finishing_together_share_one_write() {
    let log = finish_together(&[4096; 32]).await;
    let (writes, _) = writes(&log);
    assert_eq!(writes, vec![format!("write {}", 32 * (HEAD + 4096))], "{log:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_batch_stops_at_the_byte_budget() {
    // 40 replies of 8 KiB: the first write carries BATCH_BYTES of payload, the second the rest.
    let log = finish_together(&[8192; 40]).await;
    let (writes, _) = writes(&log);
    let first = BATCH_BYTES / 8192;
    let expected = [
        format!("write {}", first * (HEAD + 8192)),
        format!("write {}", (40 - first) * (HEAD + 8192)),
    ];
    assert_eq!(writes, expected, "{log:?}");
}
