//! The reply reader against hand-written server bytes: multi-chunk reads, holes, error
//! chunks, block status, and the violations that must kill the connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, DuplexStream};

use super::*;

const CTX: u32 = 7;

struct Rig {
    shared: Arc<Shared>,
    server: DuplexStream,
    _reader: tokio::task::JoinHandle<()>,
}

fn rig() -> Rig {
    let (client, server) = tokio::io::duplex(1 << 20);
    let shared = Arc::new(Shared::new());
    let reader = tokio::spawn(reader(client, shared.clone(), true, Some(CTX)));
    Rig { shared, server, _reader: reader }
}

type Rx = oneshot::Receiver<Result<Reply, ClientError>>;

impl Rig {
    fn expect(&self, cookie: u64, command: Command, offset: u64, length: u32) -> Rx {
        // A dirty buffer: anything the reply does not overwrite would show.
        let buf = (command == Command::Read).then(|| {
            let mut b = IoBuf::zeroed(length as usize);
            b.fill(0xAA);
            b
        });
        let (p, rx) = Pending::new(command, offset, length, buf);
        self.shared.register(cookie, p).unwrap();
        rx
    }

    async fn send_chunk(&mut self, cookie: u64, done: bool, chunk: Chunk, data: &[u8]) {
        let mut out = Vec::new();
        chunk.encode_into(cookie, done, &mut out);
        out.extend_from_slice(data);
        self.server.write_all(&out).await.unwrap();
    }
}

async fn got(rx: Rx) -> Result<Reply, ClientError> {
    tokio::time::timeout(Duration::from_secs(30), rx).await.unwrap().unwrap()
}

#[tokio::test]
async fn read_assembled_from_data_and_hole_chunks_in_any_order() {
    let mut r = rig();
    let rx = r.expect(5, Command::Read, 1000, 300);
    r.send_chunk(5, false, Chunk::OffsetData { offset: 1200, data_len: 100 }, &[2; 100]).await;
    r.send_chunk(5, false, Chunk::OffsetHole { offset: 1100, length: 100 }, &[]).await;
    r.send_chunk(5, true, Chunk::OffsetData { offset: 1000, data_len: 100 }, &[1; 100]).await;
    let Reply::Data(buf) = got(rx).await.unwrap() else { panic!("not data") };
    assert!(buf[..100].iter().all(|&b| b == 1));
    assert!(buf[100..200].iter().all(|&b| b == 0));
    assert!(buf[200..].iter().all(|&b| b == 2));
}

#[tokio::test]
async fn error_chunks_fail_only_their_request() {
    let mut r = rig();
    let rx = r.expect(1, Command::Read, 0, 4096);
    let other = r.expect(2, Command::Flush, 0, 0);
    let e = Chunk::ErrorOffset { error: errno::EIO, message: "bad sector".into(), offset: 512 };
    r.send_chunk(1, false, e, &[]).await;
    r.send_chunk(1, true, Chunk::None, &[]).await;
    match got(rx).await {
        Err(ClientError::Server { errno: errno::EIO, message }) => {
            assert!(message.contains("bad sector") && message.contains("512"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    r.server.write_all(&SimpleReply { error: 0, cookie: 2 }.encode()).await.unwrap();
    assert!(matches!(got(other).await, Ok(Reply::Done)));
    let rx = r.expect(3, Command::Trim, 0, 4096);
    r.server.write_all(&SimpleReply { error: errno::ENOSPC, cookie: 3 }.encode()).await.unwrap();
    assert!(matches!(got(rx).await, Err(ClientError::Server { errno: errno::ENOSPC, .. })));
    assert!(!r.shared.is_dead());
}

#[tokio::test]
async fn block_status_keeps_only_our_context() {
    let mut r = rig();
    let rx = r.expect(9, Command::BlockStatus, 0, 1 << 20);
    let foreign = Chunk::BlockStatus {
        context_id: CTX + 1,
        descriptors: vec![BlockDescriptor { length: 1 << 20, flags: 0 }],
    };
    r.send_chunk(9, false, foreign, &[]).await;
    let ours = Chunk::BlockStatus {
        context_id: CTX,
        descriptors: vec![
            BlockDescriptor { length: 4096, flags: 0 },
            BlockDescriptor { length: 8192, flags: STATE_HOLE | STATE_ZERO },
        ],
    };
    r.send_chunk(9, true, ours, &[]).await;
    let Reply::Extents(ext) = got(rx).await.unwrap() else { panic!("not extents") };
    assert_eq!(
        ext,
        vec![
            Extent { length: 4096, hole: false, zero: false },
            Extent { length: 8192, hole: true, zero: true },
        ]
    );
}

#[tokio::test]
async fn short_read_reply_is_a_violation_that_kills_everything() {
    let mut r = rig();
    let rx = r.expect(1, Command::Read, 0, 200);
    let bystander = r.expect(2, Command::Flush, 0, 0);
    r.send_chunk(1, true, Chunk::OffsetData { offset: 0, data_len: 100 }, &[1; 100]).await;
    assert!(matches!(got(rx).await, Err(ClientError::Protocol { .. })));
    match got(bystander).await {
        Err(ClientError::Disconnected { reason }) => {
            assert!(reason.contains("protocol"), "{reason}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(r.shared.is_dead());
    let (p, _rx) = Pending::new(Command::Flush, 0, 0, None);
    assert!(matches!(r.shared.register(3, p), Err(ClientError::Disconnected { .. })));
}

#[tokio::test]
async fn reply_to_unknown_cookie_kills_the_connection() {
    let mut r = rig();
    let pending = r.expect(1, Command::Flush, 0, 0);
    r.server.write_all(&SimpleReply { error: 0, cookie: 99 }.encode()).await.unwrap();
    match got(pending).await {
        Err(ClientError::Disconnected { reason }) => {
            assert!(reason.contains("unknown cookie"), "{reason}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn data_chunk_for_a_write_is_a_violation() {
    let mut r = rig();
    let rx = r.expect(1, Command::Write, 0, 4096);
    r.send_chunk(1, true, Chunk::OffsetData { offset: 0, data_len: 16 }, &[0; 16]).await;
    assert!(matches!(got(rx).await, Err(ClientError::Protocol { .. })));
}

#[tokio::test]
async fn eof_fails_pending_requests() {
    let r = rig();
    let rx = r.expect(1, Command::Read, 0, 4096);
    drop(r.server);
    match got(rx).await {
        Err(ClientError::Disconnected { reason }) => assert!(reason.contains("closed"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
}
