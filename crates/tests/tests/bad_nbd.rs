//! Malformed NBD traffic against a live engine: clear error replies or clean disconnects
//! where the protocol requires them, the engine keeps serving every other client, and no
//! stored byte changes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trireme_iobuf::IoBuf;
use trireme_nbd::proto::{
    self, Command, Info, InfoRequest, OptionHeader, OptionReply, Request, SimpleReply,
};
use trireme_nbd::{Client, ClientAddr, ClientOptions};
use trireme_tests::tools::{assert_files_equal, random_file, run_ok};
use trireme_tests::{ByteSize, Cluster};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(120);
/// Bounds every raw read and connect below.
const RAW_WAIT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------ raw-socket helpers
//
// These speak NBD byte by byte on a bare TcpStream because the tests must send what no client
// would; every well-formed message is built with `trireme_nbd::proto`.

/// `nbd://host:port/export` → (`host:port`, `export`).
fn tcp_target(uri: &str) -> (String, String) {
    match ClientAddr::parse_uri(uri).unwrap() {
        (ClientAddr::Tcp(hp), export) => (hp, export),
        (other, _) => panic!("{uri} is not a TCP NBD URI: {other}"),
    }
}

async fn connect_tcp(addr: &str) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(RAW_WAIT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Reads the greeting and answers with the client flags it allows.
async fn greet(s: &mut TcpStream) -> Result<(), String> {
    let mut greeting = [0u8; proto::GREETING_LEN];
    read_exact(s, &mut greeting).await?;
    let flags = proto::decode_greeting(&greeting).map_err(|e| e.to_string())?;
    if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err("the server does not speak fixed newstyle".into());
    }
    let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
    if flags & proto::FLAG_NO_ZEROES != 0 {
        cflags |= proto::FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).await.map_err(|e| e.to_string())
}

async fn read_exact(s: &mut TcpStream, buf: &mut [u8]) -> Result<(), String> {
    match tokio::time::timeout(RAW_WAIT, s.read_exact(buf)).await {
        Err(_) => Err(format!("no {} bytes within {RAW_WAIT:?}", buf.len())),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(_)) => Ok(()),
    }
}

async fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) -> std::io::Result<()> {
    let mut msg = OptionHeader { option, length: data.len() as u32 }.encode().to_vec();
    msg.extend_from_slice(data);
    s.write_all(&msg).await
}

async fn read_option_reply(s: &mut TcpStream) -> Result<OptionReply, String> {
    let mut all = vec![0u8; proto::OPTION_REPLY_HEADER_LEN];
    read_exact(s, &mut all).await?;
    let len = u32::from_be_bytes([all[16], all[17], all[18], all[19]]) as usize;
    assert!(len <= 64 << 10, "an option reply of {len} bytes");
    all.resize(proto::OPTION_REPLY_HEADER_LEN + len, 0);
    read_exact(s, &mut all[proto::OPTION_REPLY_HEADER_LEN..]).await?;
    OptionReply::decode(&all).map(|(r, _)| r).map_err(|e| e.to_string())
}

/// `NBD_OPT_GO` without extras; `Ok(export size)` once the stream is in transmission, or the
/// error reply (`Err(Some)`) or broken exchange (`Err(None)`) that ended it.
async fn opt_go(s: &mut TcpStream, export: &str) -> Result<u64, Option<OptionReply>> {
    let req = InfoRequest { name: export.into(), requests: Vec::new() };
    send_option(s, proto::OPT_GO, &req.encode()).await.map_err(|_| None)?;
    let mut size = None;
    loop {
        let r = read_option_reply(s).await.map_err(|_| None)?;
        assert_eq!(r.option, proto::OPT_GO, "a reply to another option during OPT_GO");
        match r.reply_type {
            proto::REP_ACK => return size.ok_or(None),
            proto::REP_INFO => {
                if let Ok(Some(Info::Export { size: s, .. })) = Info::decode(&r.data) {
                    size = Some(s);
                }
            }
            t if t & (1 << 31) != 0 => return Err(Some(r)),
            _ => {}
        }
    }
}

async fn greeted(addr: &str) -> TcpStream {
    let mut s = connect_tcp(addr).await.unwrap();
    greet(&mut s).await.unwrap();
    s
}

/// A raw connection in the transmission phase and the export's size.
async fn transmitting(addr: &str, export: &str) -> (TcpStream, u64) {
    let mut s = greeted(addr).await;
    let size = opt_go(&mut s, export).await.unwrap();
    (s, size)
}

fn request(command: Command, cookie: u64, offset: u64, length: u32) -> [u8; proto::REQUEST_LEN] {
    Request { flags: 0, command, cookie, offset, length }.encode()
}

/// Reads until the server closes the connection; panics if it keeps it open for 20 s.
async fn expect_closed(s: &mut TcpStream, what: &str) {
    let mut buf = vec![0u8; 1 << 16];
    let deadline = tokio::time::Instant::now() + RAW_WAIT;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("{what}: the server kept the connection open (expected a disconnect)"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
        }
    }
}

/// Sends a request and reads the simple reply's (error, payload when ok and `read_len`).
async fn raw_request(
    s: &mut TcpStream,
    command: Command,
    offset: u64,
    length: u32,
    payload: &[u8],
    read_len: usize,
) -> Option<(u32, Vec<u8>)> {
    let cookie = 0xfeed_0000_0000_0000 | u64::from(command.to_wire());
    s.write_all(&request(command, cookie, offset, length)).await.ok()?;
    s.write_all(payload).await.ok()?;
    let mut head = [0u8; proto::SIMPLE_REPLY_LEN];
    read_exact(s, &mut head).await.ok()?;
    let reply = SimpleReply::decode(&head).expect("not a simple reply");
    assert_eq!(reply.cookie, cookie, "reply for the wrong cookie");
    let mut data = vec![0u8; if reply.error == 0 { read_len } else { 0 }];
    read_exact(s, &mut data).await.ok()?;
    Some((reply.error, data))
}

// ------------------------------------------------------------------ NBD

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_nbd_traffic_gets_errors_and_the_engine_keeps_serving() {
    let c = Cluster::start(1, ByteSize::mib(256)).await;
    let tmp = tempfile::tempdir().unwrap();
    let (vol, uri) = c.create_published("nbd-bad", ByteSize::mib(64)).await;
    let src = tmp.path().join("src.bin");
    random_file(&src, (64 * MIB) as usize);
    run_ok("nbdcopy", &[src.to_str().unwrap(), &uri], T).await;
    let first_block = std::fs::read(&src).unwrap()[..4096].to_vec();
    let (addr, export) = tcp_target(&uri);
    assert_eq!(export, vol.id.to_string());
    let engine = c.target_engine("nbd-bad").await;
    let pid = c.engine_pid(engine).unwrap();

    // Garbage instead of the client flags.
    let mut s = connect_tcp(&addr).await.unwrap();
    let mut greeting = [0u8; proto::GREETING_LEN];
    s.read_exact(&mut greeting).await.unwrap();
    s.write_all(&[0xde; 300]).await.ok();
    expect_closed(&mut s, "garbage client flags").await;

    // An option with a bad magic.
    let mut s = greeted(&addr).await;
    let mut bad = 0x1122_3344_5566_7788u64.to_be_bytes().to_vec();
    bad.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    bad.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&bad).await.ok();
    expect_closed(&mut s, "bad option magic").await;

    // An unknown option: NBD_REP_ERR_UNSUP, and negotiation goes on.
    let mut s = greeted(&addr).await;
    send_option(&mut s, 0x7777, b"xyz").await.unwrap();
    let r = read_option_reply(&mut s).await.unwrap();
    assert_eq!(
        (r.option, r.reply_type),
        (0x7777, proto::REP_ERR_UNSUP),
        "unknown option must get NBD_REP_ERR_UNSUP"
    );
    let size = opt_go(&mut s, &export).await.expect("OPT_GO after an unknown option");
    assert_eq!(size, 64 * MIB);

    // An unknown export name: an error reply, not a crash and not a hang.
    let mut s = greeted(&addr).await;
    match opt_go(&mut s, "no-such-export").await {
        Err(Some(r)) => assert_eq!(r.reply_type, proto::REP_ERR_UNKNOWN),
        other => panic!("OPT_GO of an unknown export answered {other:?}"),
    }

    // OPT_GO whose name length runs past the option's data.
    let mut s = greeted(&addr).await;
    let mut data = 1000u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"abc");
    send_option(&mut s, proto::OPT_GO, &data).await.unwrap();
    // A disconnect (Err) is also a valid answer to a malformed option.
    if let Ok(r) = read_option_reply(&mut s).await {
        let kind = r.reply_type;
        assert!(kind & (1 << 31) != 0, "inconsistent OPT_GO accepted: {kind:#x}");
    }

    // A request with a bad magic in the transmission phase.
    let (mut s, _) = transmitting(&addr, &export).await;
    let mut h = request(Command::Read, 1, 0, 4096);
    h[0] ^= 0xff;
    s.write_all(&h).await.ok();
    expect_closed(&mut s, "bad request magic").await;

    // A truncated request header, then EOF.
    let (mut s, _) = transmitting(&addr, &export).await;
    let h = request(Command::Read, 1, 0, 4096);
    s.write_all(&h[..10]).await.ok();
    s.shutdown().await.ok();
    expect_closed(&mut s, "truncated header").await;

    // Out of range and oversized requests: error replies, and the connection still works.
    let (mut s, size) = transmitting(&addr, &export).await;
    let (err, _) =
        raw_request(&mut s, Command::Read, size, 4096, &[], 4096).await.expect("read past the end");
    assert_ne!(err, 0, "a READ past the end succeeded");
    let (err, _) = raw_request(&mut s, Command::Read, u64::MAX - 4095, 4096, &[], 4096)
        .await
        .expect("overflowing read");
    assert_ne!(err, 0, "a READ whose end overflows u64 succeeded");
    let (err, _) = raw_request(&mut s, Command::Write, size - 2048, 4096, &[0xab; 4096], 0)
        .await
        .expect("write past the end");
    assert_ne!(err, 0, "a WRITE past the end succeeded");
    let (err, data) =
        raw_request(&mut s, Command::Read, 0, 4096, &[], 4096).await.expect("read after errors");
    assert_eq!(err, 0);
    assert_eq!(data, first_block, "the connection is confused after error replies");
    // An unknown command: an error reply or a clean disconnect, never success.
    if let Some((err, _)) = raw_request(&mut s, Command::Unknown(0x55), 0, 0, &[], 0).await {
        assert_ne!(err, 0, "an unknown command succeeded");
        let (err, data) = raw_request(&mut s, Command::Read, 0, 4096, &[], 4096)
            .await
            .expect("read after unknown");
        assert_eq!((err, data), (0, first_block.clone()));
    }

    // A READ over the 32 MiB request limit: an error reply or a clean disconnect.
    let (mut s, _) = transmitting(&addr, &export).await;
    if let Some((err, _)) = raw_request(&mut s, Command::Read, 0, 33 << 20, &[], 33 << 20).await {
        assert_ne!(err, 0, "a 33 MiB READ succeeded over the limit");
    }
    // A WRITE header announcing 64 MiB of payload that never comes.
    let (mut s, _) = transmitting(&addr, &export).await;
    s.write_all(&request(Command::Write, 9, 0, 64 << 20)).await.ok();
    s.write_all(&[0u8; 1000]).await.ok();
    drop(s);

    // The engine survived all of it, still serves, and the data is intact.
    assert_eq!(
        c.engine_pid(engine),
        Some(pid),
        "the engine restarted (crashed?) during malformed input"
    );
    let out = run_ok("nbdinfo", &["--size", &uri], T).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), (64 * MIB).to_string());
    let back = tmp.path().join("back.bin");
    run_ok("nbdcopy", &[&uri, back.to_str().unwrap()], T).await;
    assert_files_equal(&src, &back, "malformed input changed stored data");
    let client = Client::connect_uri(&uri, ClientOptions::default()).await.unwrap();
    assert_eq!(&client.read(0, 4096).await.unwrap()[..], &first_block[..]);
}

// ------------------------------------------------------------------ options and storms

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_options_work_and_garbage_storms_do_not_disturb_other_clients() {
    let c = Cluster::start(1, ByteSize::mib(256)).await;
    let (vol, uri) = c.create_published("storm", ByteSize::mib(16)).await;
    let (addr, export) = tcp_target(&uri);
    assert_eq!(export, vol.id.to_string());

    // OPT_LIST names the export; OPT_INFO describes it without leaving negotiation.
    let mut s = greeted(&addr).await;
    send_option(&mut s, proto::OPT_LIST, &[]).await.unwrap();
    let mut names = Vec::new();
    loop {
        let OptionReply { option, reply_type, data } = read_option_reply(&mut s).await.unwrap();
        assert_eq!(option, proto::OPT_LIST);
        match reply_type {
            proto::REP_SERVER => {
                let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8_lossy(&data[4..4 + n]).into_owned());
            }
            proto::REP_ACK => break,
            other => panic!("OPT_LIST answered reply type {other:#x}"),
        }
    }
    assert!(names.contains(&export), "OPT_LIST did not name {export}: {names:?}");
    let data = InfoRequest { name: export.clone(), requests: Vec::new() }.encode();
    send_option(&mut s, proto::OPT_INFO, &data).await.unwrap();
    let mut size = None;
    loop {
        let OptionReply { option, reply_type, data } = read_option_reply(&mut s).await.unwrap();
        assert_eq!(option, proto::OPT_INFO);
        match reply_type {
            proto::REP_INFO => {
                if let Some(Info::Export { size: s, .. }) = Info::decode(&data).unwrap() {
                    size = Some(s);
                }
            }
            proto::REP_ACK => break,
            other => panic!("OPT_INFO answered reply type {other:#x}"),
        }
    }
    assert_eq!(size, Some(16 * MIB));
    let size = opt_go(&mut s, &export).await.expect("OPT_GO after OPT_LIST and OPT_INFO");
    assert_eq!(size, 16 * MIB);
    // OPT_ABORT: an acknowledgement (optional) and a disconnect.
    let mut s = greeted(&addr).await;
    send_option(&mut s, proto::OPT_ABORT, &[]).await.unwrap();
    expect_closed(&mut s, "OPT_ABORT").await;

    // A storm of garbage connections while a well-behaved client writes and reads back.
    let client = Client::connect_uri(&uri, ClientOptions::default()).await.unwrap();
    let storm = {
        let addr = addr.clone();
        let export = export.clone();
        tokio::spawn(async move {
            for round in 0..40u32 {
                let mut tasks = Vec::new();
                for k in 0..8u32 {
                    let addr = addr.clone();
                    let export = export.clone();
                    tasks.push(tokio::spawn(async move {
                        let Ok(mut s) = connect_tcp(&addr).await else { return };
                        if (round + k) % 2 == 0 {
                            s.write_all(&[(round * 8 + k) as u8; 777]).await.ok();
                        } else if greet(&mut s).await.is_ok()
                            && opt_go(&mut s, &export).await.is_ok()
                        {
                            let command = Command::from_wire((k % 9) as u16);
                            let mut junk =
                                request(command, 1, u64::from(k) << 40, 1 << 30).to_vec();
                            junk.extend_from_slice(&[0x5a; 500]);
                            s.write_all(&junk).await.ok();
                        }
                        drop(s);
                    }));
                }
                for t in tasks {
                    t.await.ok();
                }
            }
        })
    };
    let mut k = 0u64;
    while !storm.is_finished() || k < 64 {
        let off = (k % 4096) * 4096;
        let data = vec![(k % 251) as u8; 4096];
        client
            .write(off, IoBuf::copy_from(&data), k.is_multiple_of(3))
            .await
            .expect("a well-behaved client failed during the storm");
        assert_eq!(&client.read(off, 4096).await.expect("read during the storm")[..], &data[..]);
        k += 1;
    }
    storm.await.unwrap();
    client.flush().await.unwrap();
    run_ok("nbdinfo", &["--size", &uri], T).await;
}
