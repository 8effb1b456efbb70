//! Bad input over raw TCP: each case checks the protocol's answer (error reply or clean
//! disconnect), and that a fresh well-behaved client still works on the same server.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use std::sync::Arc;

use common::*;
use trireme_iobuf::IoBuf;
use trireme_nbd::ServerConfig;
use trireme_nbd::proto::{errno, *};
use trireme_nbd::testing::MemExport;
use trireme_nbd::{BlockSizes, Export, ExportError, Extent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_handshake() {
    let srv = start().await;
    // Half of the client flags, then gone.
    let mut c = Raw::connect(srv.addr).await;
    c.send(&[0, 0]).await;
    drop(c);
    // Half an option header, then gone.
    let mut c = Raw::negotiating(srv.addr).await;
    c.send(&IHAVEOPT.to_be_bytes()[..5]).await;
    drop(c);
    // Option data shorter than announced, then gone.
    let mut c = Raw::negotiating(srv.addr).await;
    c.send(&OptionHeader { option: OPT_GO, length: 100 }.encode()).await;
    c.send(&[0; 10]).await;
    drop(c);
    assert_healthy(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_after_handshake_timeout() {
    let config =
        ServerConfig { handshake_timeout: Duration::from_millis(300), ..Default::default() };
    let srv = start_with(config).await;
    let mut c = Raw::connect(srv.addr).await;
    assert!(c.closed().await);
    assert_healthy(srv.addr).await;
    srv.stop().await;
}

/// A client that asks for far more than the socket holds and never reads is dropped at the I/O
/// timeout, instead of holding the connection and its buffers forever, and others keep being
/// served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_large_replies_is_dropped_after_io_timeout() {
    let config = ServerConfig { io_timeout: Duration::from_millis(500), ..Default::default() };
    let srv = start_with(config).await;
    let mut c = Raw::ready(srv.addr, true).await;
    for i in 0..64u64 {
        c.request(Command::Read, 0, i, i << 20, 1 << 20).await;
    }
    // Nothing is read until the server has given up on this client.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_healthy(srv.addr).await;
    assert!(c.closed().await, "the connection stayed open past the I/O timeout");
    assert_healthy(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_client_flags_disconnect() {
    let srv = start().await;
    let mut c = Raw::connect(srv.addr).await;
    c.send(&0x8000_0001u32.to_be_bytes()).await;
    assert!(c.closed().await);
    assert_healthy(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_option_magic_disconnects() {
    let srv = start().await;
    let mut c = Raw::negotiating(srv.addr).await;
    let mut h = OptionHeader { option: OPT_GO, length: 0 }.encode();
    h[0] ^= 0x55;
    c.send(&h).await;
    assert!(c.closed().await);
    assert_healthy(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_option_is_unsupported_and_session_continues() {
    let srv = start().await;
    let mut c = Raw::negotiating(srv.addr).await;
    c.option(999, b"whatever").await;
    let r = c.option_reply().await;
    assert_eq!((r.option, r.reply_type), (999, REP_ERR_UNSUP));
    c.option(OPT_STARTTLS, &[]).await;
    assert_eq!(c.option_reply().await.reply_type, REP_ERR_UNSUP);
    // Malformed data of known options: ERR_INVALID, still negotiating.
    c.option(OPT_STRUCTURED_REPLY, b"x").await;
    assert_eq!(c.option_reply().await.reply_type, REP_ERR_INVALID);
    c.option(OPT_GO, &[0, 0, 0, 200, b'a']).await;
    assert_eq!(c.option_reply().await.reply_type, REP_ERR_INVALID);
    c.option(OPT_LIST, b"junk").await;
    assert_eq!(c.option_reply().await.reply_type, REP_ERR_INVALID);
    // Meta contexts need structured replies first.
    let meta = MetaContextRequest { export: NAME.into(), queries: vec![BASE_ALLOCATION.into()] };
    c.option(OPT_SET_META_CONTEXT, &meta.encode()).await;
    assert_eq!(c.option_reply().await.reply_type, REP_ERR_INVALID);
    // The session goes on to transmission and serves a read.
    assert_eq!(c.go(NAME).await, Ok((SIZE, c_flags())));
    c.request(Command::Read, 0, 7, 0, 512).await;
    assert_eq!(c.simple_reply().await, (0, 7));
    assert_healthy(srv.addr).await;
    srv.stop().await;
}

fn c_flags() -> u16 {
    FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_SEND_FAST_ZERO
        | FLAG_CAN_MULTI_CONN
        | FLAG_SEND_CACHE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_option_length() {
    let srv = start().await;
    // Skippable (100 KiB): TOO_BIG, and the session continues.
    let mut c = Raw::negotiating(srv.addr).await;
    c.option(OPT_GO, &vec![0u8; 100 << 10]).await;
    assert_eq!(c.option_reply().await.reply_type, REP_ERR_TOO_BIG);
    assert!(c.go(NAME).await.is_ok());
    // Not skippable (4 GiB announced): TOO_BIG, then disconnect.
    let mut c = Raw::negotiating(srv.addr).await;
    c.send(&OptionHeader { option: OPT_GO, length: u32::MAX }.encode()).await;
    assert_eq!(c.option_reply().await.reply_type, REP_ERR_TOO_BIG);
    assert!(c.closed().await);
    // NBD_OPT_EXPORT_NAME never gets an option reply, not even TOO_BIG (the client would read
    // it as the export's size and flags): the server closes without a word.
    let mut c = Raw::negotiating(srv.addr).await;
    c.send(&OptionHeader { option: OPT_EXPORT_NAME, length: 100 << 10 }.encode()).await;
    assert!(c.closed_silently().await);
    assert_healthy(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_export_name() {
    let srv = start().await;
    // OPT_GO / OPT_INFO: ERR_UNKNOWN and negotiation continues.
    let mut c = Raw::negotiating(srv.addr).await;
    assert_eq!(c.go("nope").await, Err(REP_ERR_UNKNOWN));
    let info = InfoRequest { name: "nope".into(), requests: vec![] };
    c.option(OPT_INFO, &info.encode()).await;
    assert_eq!(c.option_reply().await.reply_type, REP_ERR_UNKNOWN);
    assert!(c.go(NAME).await.is_ok());
    // OPT_EXPORT_NAME cannot carry an error: the server must hang up.
    let mut c = Raw::negotiating(srv.addr).await;
    c.option(OPT_EXPORT_NAME, b"nope").await;
    assert!(c.closed().await);
    assert_healthy(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_and_abort() {
    let srv = start().await;
    // Old-style end of negotiation, without and with the 124 zero bytes.
    for (flags, len) in
        [(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10), (FLAG_C_FIXED_NEWSTYLE, 134)]
    {
        let mut c = Raw::connect(srv.addr).await;
        c.send(&flags.to_be_bytes()).await;
        c.option(OPT_EXPORT_NAME, NAME.as_bytes()).await;
        let mut reply = vec![0u8; len];
        c.read_exact(&mut reply).await.unwrap();
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), SIZE);
        c.request(Command::Read, 0, 9, 0, 4096).await;
        assert_eq!(c.simple_reply().await, (0, 9));
    }
    let mut c = Raw::negotiating(srv.addr).await;
    c.option(OPT_ABORT, &[]).await;
    assert_eq!(c.option_reply().await.reply_type, REP_ACK);
    assert!(c.closed().await);
    assert_healthy(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_disconnects() {
    let srv = start().await;
    let mut c = Raw::ready(srv.addr, false).await;
    let mut r =
        Request { flags: 0, command: Command::Read, cookie: 1, offset: 0, length: 512 }.encode();
    r[3] ^= 1;
    c.send(&r).await;
    assert!(c.closed().await);
    assert_healthy(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_request_header_and_payload() {
    let srv = start().await;
    let mut c = Raw::ready(srv.addr, false).await;
    let r =
        Request { flags: 0, command: Command::Read, cookie: 1, offset: 0, length: 512 }.encode();
    c.send(&r[..10]).await;
    drop(c);
    let mut c = Raw::ready(srv.addr, true).await;
    c.request(Command::Write, 0, 2, 0, 65536).await;
    c.send(&[1u8; 1000]).await;
    drop(c);
    assert_healthy(srv.addr).await;
    // The partial write never reached the export.
    assert_eq!(srv.export.allocated_blocks(), 2);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_requests_get_errors_and_the_connection_keeps_working() {
    let srv = start().await;
    for structured in [false, true] {
        let mut c = Raw::ready(srv.addr, structured).await;
        let cases: [(Command, u64, u32, u32); 6] = [
            (Command::Read, SIZE, 512, errno::EINVAL),
            (Command::Read, SIZE - 512, 1024, errno::EINVAL),
            (Command::Read, u64::MAX - 10, 512, errno::EINVAL),
            (Command::Trim, SIZE, 4096, errno::EINVAL),
            (Command::WriteZeroes, SIZE - 4096, 8192, errno::ENOSPC),
            (Command::Cache, SIZE + 1, 1, errno::EINVAL),
        ];
        for (i, (cmd, off, len, want)) in cases.into_iter().enumerate() {
            c.request(cmd, 0, i as u64, off, len).await;
            let (error, cookie, _, _) = c.any_reply().await;
            assert_eq!((error, cookie), (want, i as u64), "{cmd:?} {off}+{len}");
        }
        // WRITE past the end: ENOSPC, the payload is consumed, the stream stays in sync.
        c.request(Command::Write, 0, 50, SIZE - 100, 200).await;
        c.send(&[9u8; 200]).await;
        assert_eq!(c.any_reply().await.0, errno::ENOSPC);
        // Over the limit: READ is refused, connection stays.
        c.request(Command::Read, 0, 51, 0, 64 << 20).await;
        assert_eq!(c.any_reply().await.0, errno::EINVAL);
        // Unknown command and bad flags: EINVAL.
        c.request(Command::Unknown(99), 0, 52, 0, 0).await;
        assert_eq!(c.any_reply().await.0, errno::EINVAL);
        c.request(Command::Flush, 1 << 9, 53, 0, 0).await;
        assert_eq!(c.any_reply().await.0, errno::EINVAL);
        c.request(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, 54, 0, 4096).await;
        assert_eq!(c.any_reply().await.0, errno::ENOTSUP);
        // No metadata context negotiated: block status is EINVAL.
        c.request(Command::BlockStatus, 0, 55, 0, 4096).await;
        assert_eq!(c.any_reply().await.0, errno::EINVAL);
        // A valid read on the same connection still works.
        c.request(Command::Read, 0, 56, 0, 4096).await;
        let (error, cookie, payload, ty) = c.any_reply().await;
        assert_eq!((error, cookie), (0, 56));
        if structured {
            assert_eq!(ty, REPLY_TYPE_OFFSET_DATA);
            assert_eq!(payload.len(), 8 + 4096);
        } else {
            let mut data = vec![0u8; 4096];
            c.read_exact(&mut data).await.unwrap();
        }
    }
    assert_eq!(srv.export.allocated_blocks(), 0, "an erroring write reached the export");
    assert_healthy(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_write_is_refused_and_disconnects() {
    let srv = start().await;
    let mut c = Raw::ready(srv.addr, false).await;
    c.request(Command::Write, 0, 1, 0, 64 << 20).await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 1));
    assert!(c.closed().await);
    assert_healthy(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_with_base_allocation() {
    let srv = start().await;
    let mut c = Raw::negotiating(srv.addr).await;
    c.structured().await;
    let list = MetaContextRequest { export: NAME.into(), queries: vec!["base:".into()] };
    c.option(OPT_LIST_META_CONTEXT, &list.encode()).await;
    let replies = c.option_replies().await;
    assert_eq!(replies.len(), 2);
    assert_eq!(&replies[0].data[4..], BASE_ALLOCATION.as_bytes());
    // LIST selects nothing: the id in its replies is reserved and zero.
    assert_eq!(&replies[0].data[..4], &[0; 4]);
    let set = MetaContextRequest {
        export: NAME.into(),
        queries: vec!["x-other:thing".into(), BASE_ALLOCATION.into()],
    };
    c.option(OPT_SET_META_CONTEXT, &set.encode()).await;
    let replies = c.option_replies().await;
    assert_eq!(replies[0].reply_type, REP_META_CONTEXT);
    let id = u32::from_be_bytes(replies[0].data[..4].try_into().unwrap());
    assert_ne!(id, 0);
    assert!(c.go(NAME).await.is_ok());
    // 8 KiB of data at 64 KiB.
    c.request(Command::Write, 0, 1, 65536, 8192).await;
    c.send(&[3u8; 8192]).await;
    assert_eq!(c.any_reply().await.0, 0);
    c.request(Command::BlockStatus, 0, 2, 0, 1 << 20).await;
    let (error, _, payload, ty) = c.any_reply().await;
    assert_eq!((error, ty), (0, REPLY_TYPE_BLOCK_STATUS));
    let header = ChunkHeader { flags: 1, chunk_type: ty, cookie: 2, length: payload.len() as u32 };
    let Chunk::BlockStatus { context_id, descriptors } = Chunk::decode(&header, &payload).unwrap()
    else {
        panic!()
    };
    assert_eq!(context_id, id);
    let d: Vec<_> = descriptors.iter().map(|d| (d.length, d.flags)).collect();
    assert_eq!(d[..2], [(65536, STATE_HOLE | STATE_ZERO), (8192, 0)]);
    // REQ_ONE: exactly one descriptor, within the request.
    c.request(Command::BlockStatus, CMD_FLAG_REQ_ONE, 3, 0, 1000).await;
    let (_, _, payload, _) = c.any_reply().await;
    assert_eq!(payload.len(), 4 + 8);
    assert_eq!(u32::from_be_bytes(payload[4..8].try_into().unwrap()), 1000);
    srv.stop().await;
}

/// Many requests in flight on one connection; every reply arrives with its cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_all_answered() {
    let srv = start().await;
    let mut c = Raw::ready(srv.addr, true).await;
    let n = 300u64;
    let writer = async {
        for i in 0..n {
            c.request(Command::Write, 0, i, i * 4096, 4096).await;
            c.send(&[i as u8; 4096]).await;
        }
    };
    writer.await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let (error, cookie, _, _) = c.any_reply().await;
        assert_eq!(error, 0);
        assert!(seen.insert(cookie));
    }
    for i in 0..n {
        c.request(Command::Read, 0, 1000 + i, i * 4096, 4096).await;
    }
    for _ in 0..n {
        let (error, cookie, payload, _) = c.any_reply().await;
        assert_eq!(error, 0);
        let i = cookie - 1000;
        assert!(payload[8..].iter().all(|&b| b == i as u8));
        assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), i * 4096);
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_and_returns() {
    let srv = start().await;
    let mut idle = Raw::ready(srv.addr, false).await;
    let mut negotiating = Raw::negotiating(srv.addr).await;
    srv.shutdown.cancel();
    tokio::time::timeout(TIMEOUT, srv.handle).await.unwrap().unwrap().unwrap();
    assert!(idle.closed().await);
    assert!(negotiating.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes() {
    let srv = start().await;
    let mut c = Raw::negotiating(srv.addr).await;
    let (size, flags) = c.go("small").await.unwrap();
    assert_eq!(size, 1 << 20);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
    c.request(Command::Write, 0, 1, 0, 512).await;
    c.send(&[1u8; 512]).await;
    assert_eq!(c.simple_reply().await, (errno::EPERM, 1));
    c.request(Command::Trim, 0, 2, 0, 4096).await;
    assert_eq!(c.simple_reply().await, (errno::EPERM, 2));
    c.request(Command::Read, 0, 3, 0, 512).await;
    assert_eq!(c.simple_reply().await, (0, 3));
    srv.stop().await;
}

/// An export whose reads panic: the client gets EIO for that request, nothing else breaks.
struct Panicky(MemExport);

#[async_trait::async_trait]
impl Export for Panicky {
    fn size(&self) -> u64 {
        self.0.size()
    }
    async fn read(&self, _: u64, _: u32) -> Result<IoBuf, ExportError> {
        panic!("bug in the export")
    }
    async fn write(&self, o: u64, d: IoBuf, f: bool) -> Result<(), ExportError> {
        self.0.write(o, d, f).await
    }
    async fn flush(&self) -> Result<(), ExportError> {
        Err(ExportError::Io("disk on fire".into()))
    }
    async fn trim(&self, o: u64, l: u64, f: bool) -> Result<(), ExportError> {
        self.0.trim(o, l, f).await
    }
    async fn write_zeroes(&self, o: u64, l: u64, t: bool, f: bool) -> Result<(), ExportError> {
        self.0.write_zeroes(o, l, t, f).await
    }
    async fn block_status(&self, o: u64, l: u64) -> Result<Vec<Extent>, ExportError> {
        self.0.block_status(o, l).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_panics_and_errors_become_error_replies() {
    let (registry, export) = registry();
    registry.insert(NAME, "panics on read", Arc::new(Panicky(MemExport::new(SIZE))));
    let srv = start_registry(registry, export, ServerConfig::default()).await;
    for structured in [false, true] {
        let mut c = Raw::ready(srv.addr, structured).await;
        c.request(Command::Read, 0, 1, 0, 4096).await;
        assert_eq!(c.any_reply().await.0, errno::EIO);
        c.request(Command::Flush, 0, 2, 0, 0).await;
        assert_eq!(c.any_reply().await.0, errno::EIO);
        c.request(Command::Write, 0, 3, 0, 512).await;
        c.send(&[1u8; 512]).await;
        assert_eq!(c.any_reply().await.0, 0);
    }
    srv.stop().await;
}

/// An export with 4 KiB minimum and 64 KiB maximum blocks: the server refuses what breaks them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_size_constraints_are_enforced() {
    let (registry, export) = registry();
    let sizes = BlockSizes { minimum: 4096, preferred: 4096, maximum: 65536 };
    registry.insert(NAME, "4k", Arc::new(MemExport::new(SIZE).with_block_sizes(sizes)));
    let srv = start_registry(registry, export, ServerConfig::default()).await;
    let mut c = Raw::negotiating(srv.addr).await;
    let req = InfoRequest { name: NAME.into(), requests: vec![INFO_BLOCK_SIZE] };
    c.option(OPT_INFO, &req.encode()).await;
    let advertised: Vec<_> = c
        .option_replies()
        .await
        .iter()
        .filter_map(|r| Info::decode(&r.data).ok().flatten())
        .collect();
    assert!(advertised.contains(&Info::BlockSize {
        minimum: 4096,
        preferred: 4096,
        maximum: 65536
    }));
    c.go(NAME).await.unwrap();
    c.request(Command::Read, 0, 1, 512, 4096).await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 1));
    c.request(Command::Write, 0, 2, 0, 1000).await;
    c.send(&[1u8; 1000]).await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 2));
    // Over the export's maximum but within the server's: read and refused, stream in sync.
    c.request(Command::Write, 0, 3, 0, 131072).await;
    c.send(&vec![1u8; 131072]).await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 3));
    c.request(Command::Read, 0, 4, 0, 131072).await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 4));
    c.request(Command::Read, 0, 5, 4096, 4096).await;
    assert_eq!(c.simple_reply().await, (0, 5));
    srv.stop().await;
}

/// An export whose writes wait until the test lets them go, as a stalled disk would.
struct Stalled {
    inner: MemExport,
    go: Arc<tokio::sync::Semaphore>,
}

#[async_trait::async_trait]
impl Export for Stalled {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, o: u64, l: u32) -> Result<IoBuf, ExportError> {
        self.inner.read(o, l).await
    }
    async fn write(&self, o: u64, d: IoBuf, f: bool) -> Result<(), ExportError> {
        let _go = self.go.acquire().await;
        self.inner.write(o, d, f).await
    }
    async fn flush(&self) -> Result<(), ExportError> {
        self.inner.flush().await
    }
    async fn trim(&self, o: u64, l: u64, f: bool) -> Result<(), ExportError> {
        self.inner.trim(o, l, f).await
    }
    async fn write_zeroes(&self, o: u64, l: u64, t: bool, f: bool) -> Result<(), ExportError> {
        self.inner.write_zeroes(o, l, t, f).await
    }
    async fn block_status(&self, o: u64, l: u64) -> Result<Vec<Extent>, ExportError> {
        self.inner.block_status(o, l).await
    }
}

/// NBD_CMD_DISC asks the server to finish every outstanding request. One that outlasts the
/// shutdown grace loses its reply, but is still carried out: cancelling a write half way
/// could leave a nexus's replicas different with nothing recording it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_outlasting_the_grace_after_disc_is_still_carried_out() {
    let (registry, export) = registry();
    let go = Arc::new(tokio::sync::Semaphore::new(0));
    let stalled = Arc::new(Stalled { inner: MemExport::new(SIZE), go: Arc::clone(&go) });
    registry.insert("stalled", "writes wait", Arc::clone(&stalled) as Arc<dyn Export>);
    let config = ServerConfig { shutdown_grace: Duration::from_millis(100), ..Default::default() };
    let srv = start_registry(registry, export, config).await;

    let mut c = Raw::ready_on(srv.addr, "stalled", true).await;
    c.request(Command::Write, 0, 1, 4096, 512).await;
    c.send(&[7u8; 512]).await;
    c.request(Command::Disc, 0, 2, 0, 0).await;
    assert!(c.closed().await, "the server did not close after DISC and its grace");

    go.add_permits(1);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let back = stalled.inner.read(4096, 512).await.unwrap();
        if back.iter().all(|&b| b == 7) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the write was cancelled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_healthy(srv.addr).await;
    srv.stop().await;
}
