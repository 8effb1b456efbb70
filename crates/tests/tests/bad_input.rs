//! Bad input gets a clear error, nothing stored is lost, and the process keeps serving:
//! invalid REST requests, unknown ids, a volume larger than free space, missing or weak
//! credentials, corrupt pool superblocks and journal, and a full pool. (Malformed NBD traffic
//! is in `bad_nbd.rs`.)
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use trireme_api::{CreateVolumeBody, PROBLEM_JSON, Problem};
use trireme_iobuf::IoBuf;
use trireme_nbd::{Client, ClientError, ClientOptions};
use trireme_tests::tools::{assert_files_equal, random_file, run_ok};
use trireme_tests::{ByteSize, Cluster};
use trireme_types::Name;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(120);

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
    assert_files_equal(&src, &back, "data changed after recovering the superblock");
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
        assert_files_equal(&src, &back, "journal garbage changed the data");
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

    // The broken pool is reported faulted with a clear error, and stays so: nothing
    // re-formats the disk over the data (reconcilers and `up`'s bootstrap get time to try);
    // its first bytes are still the ones we wrote.
    let client = c.client();
    let pool_id = format!("pool-{broken}");
    let pool_file = c.pool_file(broken);
    let check_not_rewritten = || {
        let mut head = vec![0u8; 2 * SUPER as usize];
        std::io::Read::read_exact(&mut std::fs::File::open(&pool_file).unwrap(), &mut head)
            .unwrap();
        if head == junk {
            return;
        }
        let what = if &head[..8] == b"TRIREMEP" {
            let name_len = u16::from_le_bytes([head[40], head[41]]) as usize;
            format!(
                "a freshly formatted pool named {:?} (superblock seq {})",
                String::from_utf8_lossy(&head[42..42 + name_len.min(128)]),
                u64::from_le_bytes(head[16..24].try_into().unwrap())
            )
        } else {
            "other bytes".to_owned()
        };
        panic!(
            "{pool_id}'s disk was rewritten after its superblocks were found corrupt: it now holds {what}; \
             everything stored on it is gone. A pool that fails to import must stay faulted, never be re-created"
        );
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let pool = loop {
        check_not_rewritten();
        let p = client.pool(&pool_id).await.unwrap();
        if p.status.state == trireme_api::PoolState::Faulted {
            break p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{pool_id} was never reported faulted: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let error = pool.status.error.clone().unwrap_or_default();
    assert!(error.to_lowercase().contains("superblock"), "unclear pool error: {pool:?}");
    for _ in 0..20 {
        check_not_rewritten();
        let p = client.pool(&pool_id).await.unwrap();
        assert_eq!(
            p.status.state,
            trireme_api::PoolState::Faulted,
            "the corrupt pool came back online: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // …and the rest of the cluster serves as before.
    assert!(c.up_running(), "up exited");
    let uri = c.wait_target("healthy").await;
    c.wait_nbd(&uri).await;
    let back = tmp.path().join("back.bin");
    run_ok("nbdcopy", &[&uri, back.to_str().unwrap()], T).await;
    assert_files_equal(&src, &back, "data differs");
    let other = client.pool(&format!("pool-{healthy}")).await.unwrap();
    assert_eq!(other.status.state, trireme_api::PoolState::Online);
    let (_, uri2) = c.create_published("after", ByteSize::mib(8)).await;
    run_ok("nbdinfo", &["--size", &uri2], T).await;
}

// ------------------------------------------------------------------ disk full

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_answers_enospc_loses_nothing_and_recovers() {
    let c = Cluster::start(1, ByteSize::mib(256)).await;
    let tmp = tempfile::tempdir().unwrap();
    // Two thin volumes that together promise more than the pool holds.
    let a_size = 200 * MIB;
    c.create_volume_with("full-a", ByteSize::b(a_size), true).await;
    c.create_volume_with("full-b", ByteSize::b(a_size), true).await;
    let uri_a = c.publish("full-a").await;
    let uri_b = c.publish("full-b").await;
    let src = tmp.path().join("a.bin");
    random_file(&src, a_size as usize);
    run_ok("nbdcopy", &[src.to_str().unwrap(), &uri_a], T).await;
    // B starts allocating right away: reading A back first gives a race between A's fresh
    // clusters and B's allocations near pool-full time to settle, and hides it.
    let pid = c.engine_pid(1).unwrap();

    // Fill B one fresh cluster at a time until the pool is full: ENOSPC, not a hang or a crash.
    let b = Client::connect_uri(&uri_b, ClientOptions::default()).await.unwrap();
    let mut written = Vec::new();
    let mut full_at = None;
    for k in 0..(a_size / MIB) {
        let off = k * MIB;
        match b.write(off, IoBuf::copy_from(&[k as u8 | 1; 4096]), false).await {
            Ok(()) => written.push(off),
            Err(ClientError::Server { errno, .. }) => {
                assert_eq!(errno, 28, "a full pool must answer ENOSPC (28), got errno {errno}");
                full_at = Some(off);
                break;
            }
            Err(e) => panic!("writing to a full pool: {e}"),
        }
    }
    let full_at =
        full_at.expect("200 MiB of thin writes fitted in a 256 MiB pool already holding 200 MiB");
    assert!(!written.is_empty(), "B could not allocate anything: {written:?}");
    // The connection and the already written blocks are fine; so is the other volume.
    b.flush().await.unwrap();
    for off in &written {
        let want = vec![(*off / MIB) as u8 | 1; 4096];
        assert_eq!(
            &b.read(*off, 4096).await.unwrap()[..],
            &want[..],
            "block at {off} of B after ENOSPC"
        );
    }
    assert_eq!(
        &b.read(full_at, 4096).await.unwrap()[..],
        &[0u8; 4096][..],
        "a failed write left data behind"
    );
    assert_eq!(c.engine_pid(1), Some(pid), "the engine restarted on a full pool");
    let back = tmp.path().join("a-back.bin");
    run_ok("nbdcopy", &[&uri_a, back.to_str().unwrap()], T).await;
    assert_files_equal(&src, &back, "volume A changed when the pool filled up");

    // Freeing space (deleting A) lets B's writes succeed again.
    c.client().unpublish_volume("full-a").await.unwrap();
    c.client().delete_volume("full-a").await.unwrap();
    let want = vec![0x77u8; 4096];
    trireme_tests::tools::wait_for(
        "B's writes to succeed after space was freed",
        Duration::from_secs(60),
        || async {
            b.write(full_at, IoBuf::copy_from(&want), false).await.map_err(|e| e.to_string())
        },
    )
    .await;
    b.flush().await.unwrap();
    assert_eq!(&b.read(full_at, 4096).await.unwrap()[..], &want[..]);
}
