//! Interoperability with real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-io) against the
//! in-memory export. A test is skipped (with a note) only if its tool is not installed.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rand::RngCore;
use trireme_iobuf::IoBuf;
use trireme_nbd::Export;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_flags_and_contexts() {
    let srv = start().await;
    let Some(out) = tool_ok("nbdinfo", &["--json", &srv.uri(NAME)]).await else { return };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], NAME);
    assert_eq!(e["export-size"], SIZE);
    assert_eq!(e["description"], "in-memory test export");
    for flag in ["can_trim", "can_fua", "can_multi_conn", "can_flush", "can_zero", "can_df"] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    let contexts: Vec<_> = e["contexts"].as_array().unwrap().iter().collect();
    assert!(contexts.iter().any(|c| *c == "base:allocation"), "{contexts:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports() {
    let srv = start().await;
    let uri = format!("nbd://{}", srv.addr);
    let Some(out) = tool_ok("nbdinfo", &["--list", "--json", &uri]).await else { return };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut names: Vec<_> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["mem", "small"]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_unknown_export_fails_cleanly() {
    let srv = start().await;
    let Some(out) = tool("nbdinfo", &[&srv.uri("nope")]).await else { return };
    assert!(!out.status.success());
    assert_healthy(srv.addr).await;
    srv.stop().await;
}

/// Random data in, same bytes out, through one connection and through four.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trip_single_and_multi_conn() {
    let srv = start().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    let mut data = vec![0u8; SIZE as usize];
    rand::rng().fill_bytes(&mut data);
    std::fs::write(&src, &data).unwrap();
    let uri = srv.uri(NAME);
    let src_s = src.to_str().unwrap();
    if tool_ok("nbdcopy", &[src_s, &uri]).await.is_none() {
        return;
    }
    // The export itself holds the bytes.
    let inside = srv.export.read(0, SIZE as u32).await.unwrap();
    assert!(inside[..] == data[..], "export content differs after nbdcopy");
    for conns in ["--connections=1", "--connections=4"] {
        let dst = dir.path().join("dst.bin");
        let _ = std::fs::remove_file(&dst);
        tool_ok("nbdcopy", &[conns, "--requests=16", &uri, dst.to_str().unwrap()]).await.unwrap();
        let back = std::fs::read(&dst).unwrap();
        assert!(back == data, "round trip with {conns} differs");
    }
    // And the other direction with four connections.
    rand::rng().fill_bytes(&mut data);
    std::fs::write(&src, &data).unwrap();
    tool_ok("nbdcopy", &["--connections=4", src_s, &uri]).await.unwrap();
    let inside = srv.export.read(0, SIZE as u32).await.unwrap();
    assert!(inside[..] == data[..], "multi-conn write differs");
    let stats = srv.config.stats.export(NAME).unwrap();
    assert!(stats.write_bytes >= 2 * SIZE && stats.read_bytes >= 2 * SIZE, "{stats:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_discard_and_zero() {
    let srv = start().await;
    let uri = srv.uri(NAME);
    let Some(out) = tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "write -P 0xcd -f 1M 64k",
            "-c",
            "read -P 0xcd 1M 64k",
            "-c",
            "discard 0 64k",
            "-c",
            "read -P 0 0 64k",
            "-c",
            "read -P 0xab 64k 64k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "read -P 0 1M 64k",
            "-c",
            "write -P 0x11 2M 128k",
            "-c",
            "write -z -u 2M 128k",
            "-c",
            "read -P 0 2M 128k",
            "-c",
            "flush",
        ],
    )
    .await
    else {
        return;
    };
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    assert!(out.contains("discard 65536/65536"), "{out}");
    assert!(srv.export.flushes() >= 1);
    // The discarded 64 KiB are really gone.
    let bs = srv.export.block_status(0, 65536).await.unwrap();
    assert!(bs[0].hole && bs[0].length == 65536, "{bs:?}");
    // Zeroing with unmap allowed deallocates; without it (NO_HOLE) the range stays allocated.
    let bs = srv.export.block_status(2 << 20, 128 << 10).await.unwrap();
    assert!(bs[0].hole && bs[0].length >= 128 << 10, "{bs:?}");
    let bs = srv.export.block_status(1 << 20, 64 << 10).await.unwrap();
    assert!(!bs[0].hole, "{bs:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_shows_holes_and_data() {
    let srv = start().await;
    srv.export.write(1 << 20, IoBuf::copy_from(&[1u8; 65536]), false).await.unwrap();
    srv.export.write(8 << 20, IoBuf::copy_from(&[2u8; 4096]), false).await.unwrap();
    let Some(out) = tool_ok("nbdinfo", &["--map", "--json", &srv.uri(NAME)]).await else { return };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let map: Vec<(u64, u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        map,
        vec![
            (0, 1 << 20, 3),
            (1 << 20, 65536, 0),
            ((1 << 20) + 65536, (7 << 20) - 65536, 3),
            (8 << 20, 4096, 0),
            ((8 << 20) + 4096, SIZE - (8 << 20) - 4096, 3),
        ]
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_serves_nbdinfo_and_qemu_io() {
    let srv = start_unix().await;
    let uri = srv.uri(NAME);
    let Some(out) = tool_ok("nbdinfo", &["--json", &uri]).await else { return };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["exports"][0]["export-size"], SIZE);
    if let Some(out) = tool_ok(
        "qemu-io",
        &["-f", "raw", &uri, "-c", "write -P 0x5a 0 128k", "-c", "read -P 0x5a 0 128k"],
    )
    .await
    {
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
    srv.stop().await;
}
