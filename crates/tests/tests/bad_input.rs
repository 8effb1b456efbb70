//! Bad input gets a clear error, nothing stored is lost, and the process keeps serving:
//! malformed NBD traffic against a live engine, invalid REST requests, a volume larger than
//! free space, missing or weak credentials, and corrupt pool superblocks.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trireme_api::{CreateVolumeBody, PROBLEM_JSON, Problem};
use trireme_tests::nbd::{self, NbdClient};
use trireme_tests::tools::{random_file, run_ok, sha256_file};
use trireme_tests::{ByteSize, Cluster};
use trireme_types::Name;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(120);

// ------------------------------------------------------------------ NBD

/// Reads until the server closes the connection; panics if it keeps it open for 20 s.
async fn expect_closed(s: &mut TcpStream, what: &str) {
    let mut buf = vec![0u8; 1 << 16];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("{what}: the server kept the connection open (expected a disconnect)"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
        }
    }
}

async fn greeted(addr: &str) -> TcpStream {
    let mut s = nbd::connect_tcp(addr).await.unwrap();
    nbd::greet(&mut s).await.unwrap();
    s
}

async fn transmitting(addr: &str, export: &str) -> (TcpStream, nbd::ExportInfo) {
    let mut s = greeted(addr).await;
    let info = nbd::opt_go(&mut s, export).await.unwrap();
    (s, info)
}

/// Sends a request and reads the simple reply's (error, payload when ok and `read_len`).
async fn raw_request(
    s: &mut TcpStream,
    command: u16,
    offset: u64,
    length: u32,
    payload: &[u8],
    read_len: usize,
) -> Option<(u32, Vec<u8>)> {
    let handle = 0xfeed_0000_0000_0000 | u64::from(command);
    s.write_all(&nbd::request_header(0, command, handle, offset, length)).await.ok()?;
    s.write_all(payload).await.ok()?;
    let (err, h) = tokio::time::timeout(Duration::from_secs(20), nbd::read_simple_reply(s))
        .await
        .expect("no reply within 20s")
        .ok()?;
    assert_eq!(h, handle, "reply for the wrong handle");
    let mut data = vec![0u8; if err == 0 { read_len } else { 0 }];
    s.read_exact(&mut data).await.ok()?;
    Some((err, data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_nbd_traffic_gets_errors_and_the_engine_keeps_serving() {
    let c = Cluster::start(1, ByteSize::mib(256)).await;
    let tmp = tempfile::tempdir().unwrap();
    let (vol, uri) = c.create_published("nbd-bad", ByteSize::mib(64)).await;
    let src = tmp.path().join("src.bin");
    random_file(&src, (64 * MIB) as usize);
    run_ok("nbdcopy", &[src.to_str().unwrap(), &uri], T).await;
    let first_block = std::fs::read(&src).unwrap()[..4096].to_vec();
    let (addr, export) = nbd::parse_uri(&uri).unwrap();
    assert_eq!(export, vol.id.to_string());
    let engine = c.target_engine("nbd-bad").await;
    let pid = c.engine_pid(engine).unwrap();

    // Garbage instead of the client flags.
    let mut s = nbd::connect_tcp(&addr).await.unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    s.write_all(&[0xde; 300]).await.ok();
    expect_closed(&mut s, "garbage client flags").await;

    // An option with a bad magic.
    let mut s = greeted(&addr).await;
    let mut bad = 0x1122_3344_5566_7788u64.to_be_bytes().to_vec();
    bad.extend_from_slice(&nbd::OPT_GO.to_be_bytes());
    bad.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&bad).await.ok();
    expect_closed(&mut s, "bad option magic").await;

    // An unknown option: NBD_REP_ERR_UNSUP, and negotiation goes on.
    let mut s = greeted(&addr).await;
    nbd::send_option(&mut s, 0x7777, b"xyz").await.unwrap();
    let (opt, kind, _) = nbd::read_option_reply(&mut s).await.unwrap();
    assert_eq!(
        (opt, kind),
        (0x7777, nbd::REP_ERR_UNSUP),
        "unknown option must get NBD_REP_ERR_UNSUP"
    );
    let info = nbd::opt_go(&mut s, &export).await.expect("OPT_GO after an unknown option");
    assert_eq!(info.size, 64 * MIB);

    // An unknown export name: an error reply, not a crash and not a hang.
    let mut s = greeted(&addr).await;
    match nbd::opt_go(&mut s, "no-such-export").await {
        Err(nbd::NbdError::OptionRefused { reply, .. }) => assert_eq!(reply, nbd::REP_ERR_UNKNOWN),
        other => panic!("OPT_GO of an unknown export answered {other:?}"),
    }

    // OPT_GO whose name length runs past the option's data.
    let mut s = greeted(&addr).await;
    let mut data = 1000u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"abc");
    nbd::send_option(&mut s, nbd::OPT_GO, &data).await.unwrap();
    // A disconnect (Err) is also a valid answer to a malformed option.
    if let Ok((_, kind, _)) = nbd::read_option_reply(&mut s).await {
        assert!(kind & nbd::REP_FLAG_ERROR != 0, "inconsistent OPT_GO accepted: {kind:#x}");
    }

    // A request with a bad magic in the transmission phase.
    let (mut s, _) = transmitting(&addr, &export).await;
    let mut h = nbd::request_header(0, nbd::CMD_READ, 1, 0, 4096);
    h[0] ^= 0xff;
    s.write_all(&h).await.ok();
    expect_closed(&mut s, "bad request magic").await;

    // A truncated request header, then EOF.
    let (mut s, _) = transmitting(&addr, &export).await;
    let h = nbd::request_header(0, nbd::CMD_READ, 1, 0, 4096);
    s.write_all(&h[..10]).await.ok();
    s.shutdown().await.ok();
    expect_closed(&mut s, "truncated header").await;

    // Out of range and oversized requests: error replies, and the connection still works.
    let (mut s, info) = transmitting(&addr, &export).await;
    let size = info.size;
    let (err, _) =
        raw_request(&mut s, nbd::CMD_READ, size, 4096, &[], 4096).await.expect("read past the end");
    assert_ne!(err, 0, "a READ past the end succeeded");
    let (err, _) = raw_request(&mut s, nbd::CMD_READ, u64::MAX - 4095, 4096, &[], 4096)
        .await
        .expect("overflowing read");
    assert_ne!(err, 0, "a READ whose end overflows u64 succeeded");
    let (err, _) = raw_request(&mut s, nbd::CMD_WRITE, size - 2048, 4096, &[0xab; 4096], 0)
        .await
        .expect("write past the end");
    assert_ne!(err, 0, "a WRITE past the end succeeded");
    let (err, data) =
        raw_request(&mut s, nbd::CMD_READ, 0, 4096, &[], 4096).await.expect("read after errors");
    assert_eq!(err, 0);
    assert_eq!(data, first_block, "the connection is confused after error replies");
    // An unknown command: an error reply or a clean disconnect, never success.
    if let Some((err, _)) = raw_request(&mut s, 0x55, 0, 0, &[], 0).await {
        assert_ne!(err, 0, "an unknown command succeeded");
        let (err, data) = raw_request(&mut s, nbd::CMD_READ, 0, 4096, &[], 4096)
            .await
            .expect("read after unknown");
        assert_eq!((err, data), (0, first_block.clone()));
    }

    // A READ over the 32 MiB request limit: an error reply or a clean disconnect.
    let (mut s, _) = transmitting(&addr, &export).await;
    if let Some((err, _)) = raw_request(&mut s, nbd::CMD_READ, 0, 33 << 20, &[], 33 << 20).await {
        assert_ne!(err, 0, "a 33 MiB READ succeeded over the limit");
    }
    // A WRITE header announcing 64 MiB of payload that never comes.
    let (mut s, _) = transmitting(&addr, &export).await;
    s.write_all(&nbd::request_header(0, nbd::CMD_WRITE, 9, 0, 64 << 20)).await.ok();
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
    assert_eq!(
        sha256_file(&src, None),
        sha256_file(&back, None),
        "malformed input changed stored data"
    );
    let client = NbdClient::connect(&uri).await.unwrap();
    assert_eq!(client.read(0, 4096).await.unwrap(), first_block);
}

// ------------------------------------------------------------------ REST

async fn problem(resp: reqwest::Response) -> (u16, Problem) {
    let status = resp.status().as_u16();
    let ct =
        resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let body = resp.text().await.unwrap();
    assert!(
        ct.starts_with(PROBLEM_JSON),
        "HTTP {status} with content-type {ct:?} (want {PROBLEM_JSON}): {body}"
    );
    let p: Problem = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("not a problem document ({e}): {body}"));
    assert_eq!(p.status, status, "problem status differs from HTTP status: {body}");
    assert!(p.detail.trim().len() > 10, "the detail is not a sentence: {body}");
    (status, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_rest_requests_get_problem_documents_and_change_nothing() {
    let c = Cluster::start(1, ByteSize::mib(256)).await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", c.api_url());
    let token = c.admin_token().to_owned();
    let client = c.client();
    c.create_volume("keep", ByteSize::mib(16)).await;
    let volumes_before = client.volumes().await.unwrap();
    let pools_before = client.pools().await.unwrap();

    let bodies: [(&str, String); 6] = [
        ("not JSON", "this is not json".into()),
        ("missing size", r#"{"name":"v1"}"#.into()),
        ("size 0", r#"{"name":"v1","size":0}"#.into()),
        ("bad name", r#"{"name":"Bad Name","size":16777216}"#.into()),
        ("unknown field", r#"{"name":"v1","size":16777216,"colour":"red"}"#.into()),
        ("size not a number", r#"{"name":"v1","size":"lots"}"#.into()),
    ];
    for (what, body) in bodies {
        let resp = http
            .post(url("/v1/volumes"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let (status, p) = problem(resp).await;
        assert!(status == 400 || status == 422, "{what}: HTTP {status} for {body}: {p:?}");
    }

    // Unknown ids.
    for path in [
        format!("/v1/volumes/{}", trireme_types::VolumeId::new_random()),
        "/v1/volumes/no-such-volume".to_owned(),
        "/v1/pools/no-such-pool".to_owned(),
        "/v1/nodes/no-such-node".to_owned(),
        format!("/v1/volumes/{}/replicas", trireme_types::VolumeId::new_random()),
    ] {
        let resp = http.get(url(&path)).bearer_auth(&token).send().await.unwrap();
        let (status, _) = problem(resp).await;
        assert_eq!(status, 404, "GET {path}");
    }
    let resp =
        http.delete(url("/v1/volumes/no-such-volume")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(problem(resp).await.0, 404, "DELETE of an unknown volume");
    let err = client.resize_volume("no-such-volume", ByteSize::mib(32)).await.unwrap_err();
    assert!(err.is_not_found(), "resize of an unknown volume: {err}");

    // Larger than any pool's free space (thick): a clear error and nothing left behind.
    let body = CreateVolumeBody {
        name: Name::new("too-big").unwrap(),
        id: None,
        size: ByteSize::gib(4),
        replicas: 1,
        thin: false,
    };
    let err = client
        .create_volume(&body)
        .await
        .expect_err("a 4 GiB thick volume on a 256 MiB pool was created");
    let status = err.status().unwrap_or_else(|| panic!("not an API error: {err}"));
    assert!((400..500).contains(&status) || status == 507, "HTTP {status}: {err}");
    assert!(err.to_string().len() > 10, "unclear error: {err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        client.volumes().await.unwrap(),
        volumes_before,
        "a failed create left something behind"
    );
    let pools_after = client.pools().await.unwrap();
    for (a, b) in pools_before.iter().zip(&pools_after) {
        assert_eq!(
            a.status.free, b.status.free,
            "pool {} lost free space to a failed create",
            a.id
        );
    }

    // Credentials: none → 401, viewer → may read but not create (403).
    let resp = http.get(url("/v1/volumes")).send().await.unwrap();
    assert_eq!(problem(resp).await.0, 401, "no token");
    let resp = http.get(url("/v1/volumes")).bearer_auth("not-a-token").send().await.unwrap();
    assert_eq!(problem(resp).await.0, 401, "a wrong token");
    let err = c.anonymous_client().volumes().await.unwrap_err();
    assert_eq!(err.status(), Some(401));
    let viewer = c.viewer_client();
    assert_eq!(viewer.volumes().await.unwrap(), volumes_before, "the viewer cannot list volumes");
    let body = CreateVolumeBody {
        name: Name::new("by-viewer").unwrap(),
        id: None,
        size: ByteSize::mib(8),
        replicas: 1,
        thin: false,
    };
    let err = viewer.create_volume(&body).await.expect_err("a viewer created a volume");
    assert_eq!(err.status(), Some(403), "viewer create: {err}");
    let err = viewer.delete_volume("keep").await.expect_err("a viewer deleted a volume");
    assert_eq!(err.status(), Some(403), "viewer delete: {err}");
    assert_eq!(client.volumes().await.unwrap(), volumes_before);
}

// ------------------------------------------------------------------ pool superblocks

fn corrupt(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    use std::io::{Seek, SeekFrom, Write};
    let mut junk = vec![0u8; len];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut junk);
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&junk).unwrap();
    f.sync_all().unwrap();
    junk
}

/// Superblock copy A is the first 4 KiB of the pool, copy B the next 4 KiB (crates/pool
/// `layout.rs`).
const SUPER: u64 = 4096;

/// The journal region of a pool file, read from its superblock (copy A): little-endian
/// `journal_offset` and `journal_size` at bytes 194 and 202 (crates/pool `layout.rs`).
fn journal_region(pool: &std::path::Path, copy: u64) -> (u64, u64) {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(pool).unwrap();
    let mut sb = vec![0u8; SUPER as usize];
    f.seek(SeekFrom::Start(copy * SUPER)).unwrap();
    f.read_exact(&mut sb).unwrap();
    assert_eq!(&sb[..8], b"TRIREMEP", "no pool superblock in {}", pool.display());
    let le = |o: usize| u64::from_le_bytes(sb[o..o + 8].try_into().unwrap());
    let (off, len) = (le(194), le(202));
    assert!(
        off >= 2 * SUPER && len > 0 && off + len < std::fs::metadata(pool).unwrap().len(),
        "odd layout {off} {len}"
    );
    (off, len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_first_superblock_or_journal_loses_nothing() {
    let mut c = Cluster::start(1, ByteSize::mib(256)).await;
    let tmp = tempfile::tempdir().unwrap();
    let (_, uri) = c.create_published("sb1", ByteSize::mib(16)).await;
    let src = tmp.path().join("src.bin");
    random_file(&src, (16 * MIB) as usize);
    run_ok("nbdcopy", &[src.to_str().unwrap(), &uri], T).await;
    c.stop().await;

    // Superblock copy A destroyed: the pool imports from copy B, data intact.
    let (journal_off, journal_len) = journal_region(&c.pool_file(1), 0);
    corrupt(&c.pool_file(1), 0, SUPER as usize);
    c.restart().await;
    let pool = c.client().pool("pool-1").await.unwrap();
    assert_eq!(pool.status.replicas, 1, "{pool:?}");
    let uri = c.wait_target("sb1").await;
    c.wait_nbd(&uri).await;
    let back = tmp.path().join("back.bin");
    run_ok("nbdcopy", &[&uri, back.to_str().unwrap()], T).await;
    assert_eq!(
        sha256_file(&src, None),
        sha256_file(&back, None),
        "data changed after recovering the superblock"
    );
    c.stop().await;

    // Both superblocks are valid again (repaired) and agree about the journal's place.
    assert_eq!(
        journal_region(&c.pool_file(1), 0),
        (journal_off, journal_len),
        "copy A was not repaired"
    );
    assert_eq!(journal_region(&c.pool_file(1), 1), (journal_off, journal_len));

    // Journal garbage (after a clean stop): the pool either imports with every byte intact,
    // or is reported faulted with a clear error. Never online with a different volume.
    corrupt(&c.pool_file(1), journal_off, (journal_len.min(4 << 20)) as usize);
    c.restart_api_only().await;
    let client = c.client();
    let state = trireme_tests::tools::wait_for("pool-1 to settle", Duration::from_secs(90), || {
        let client = client.clone();
        async move {
            let p = client.pool("pool-1").await.map_err(|e| e.to_string())?;
            match p.status.state {
                trireme_api::PoolState::Online | trireme_api::PoolState::Faulted => Ok(p),
                _ => Err(format!("{p:?}")),
            }
        }
    })
    .await;
    if state.status.state == trireme_api::PoolState::Faulted {
        let error = state.status.error.clone().unwrap_or_default();
        assert!(error.len() > 10, "a faulted pool without a clear error: {state:?}");
        eprintln!("journal corruption: pool faulted: {error}");
    } else {
        let uri = c.wait_target("sb1").await;
        c.wait_nbd(&uri).await;
        let back = tmp.path().join("back2.bin");
        run_ok("nbdcopy", &[&uri, back.to_str().unwrap()], T).await;
        assert_eq!(
            sha256_file(&src, None),
            sha256_file(&back, None),
            "journal garbage changed the data"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_superblocks_fault_the_pool_and_the_rest_keeps_serving() {
    let mut c = Cluster::start(2, ByteSize::mib(256)).await;
    let tmp = tempfile::tempdir().unwrap();
    let (_, uri) = c.create_published("healthy", ByteSize::mib(16)).await;
    let healthy = c.target_engine("healthy").await;
    let broken = if healthy == 1 { 2 } else { 1 };
    let src = tmp.path().join("src.bin");
    random_file(&src, (16 * MIB) as usize);
    run_ok("nbdcopy", &[src.to_str().unwrap(), &uri], T).await;
    c.stop().await;

    let junk = corrupt(&c.pool_file(broken), 0, 2 * SUPER as usize);
    c.restart_api_only().await;

    // The broken pool is reported faulted with a clear error…
    let client = c.client();
    let pool_id = format!("pool-{broken}");
    let pool = trireme_tests::tools::wait_for(
        &format!("{pool_id} to be reported faulted"),
        Duration::from_secs(90),
        || {
            let client = client.clone();
            let pool_id = pool_id.clone();
            async move {
                let p = client.pool(&pool_id).await.map_err(|e| e.to_string())?;
                if p.status.state == trireme_api::PoolState::Faulted {
                    Ok(p)
                } else {
                    Err(format!("{p:?}"))
                }
            }
        },
    )
    .await;
    let error = pool.status.error.clone().unwrap_or_default();
    assert!(error.to_lowercase().contains("superblock"), "unclear pool error: {pool:?}");

    // …the pool was not silently re-formatted over (its bytes are still ours)…
    let mut head = vec![0u8; 2 * SUPER as usize];
    std::io::Read::read_exact(&mut std::fs::File::open(c.pool_file(broken)).unwrap(), &mut head)
        .unwrap();
    assert_eq!(head.as_slice(), junk.as_slice(), "the faulted pool's disk was rewritten");

    // …and the rest of the cluster serves as before.
    assert!(c.up_running(), "up exited");
    let uri = c.wait_target("healthy").await;
    c.wait_nbd(&uri).await;
    let back = tmp.path().join("back.bin");
    run_ok("nbdcopy", &[&uri, back.to_str().unwrap()], T).await;
    assert_eq!(sha256_file(&src, None), sha256_file(&back, None));
    let other = client.pool(&format!("pool-{healthy}")).await.unwrap();
    assert_eq!(other.status.state, trireme_api::PoolState::Online);
    let (_, uri2) = c.create_published("after", ByteSize::mib(8)).await;
    run_ok("nbdinfo", &["--size", &uri2], T).await;
}
