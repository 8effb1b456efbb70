//! `trireme dump` against a live cluster: the bundle holds what the API knows and the local
//! `up`'s logs, never a token; with the API down it still holds the logs and says what is
//! missing.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use trireme_tests::tools::stdout;
use trireme_tests::{ByteSize, Cluster};

/// Every file in the bundle, by its path inside `trireme-dump/`.
fn unpack(bundle: &Path) -> BTreeMap<String, String> {
    let gz = flate2::read::GzDecoder::new(std::fs::File::open(bundle).unwrap());
    let mut archive = tar::Archive::new(gz);
    let mut files = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut text = String::new();
        entry.read_to_string(&mut text).unwrap();
        let inner = path.strip_prefix("trireme-dump/").unwrap_or_else(|| panic!("{path}"));
        files.insert(inner.to_owned(), text);
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_bundles_the_cluster_and_its_logs_without_tokens() {
    let c = Cluster::start(1, ByteSize::mib(256)).await;
    c.cli_ok(&["volume", "create", "dumped", "--size", "16MiB"]).await;
    let out_dir = tempfile::tempdir().unwrap();
    let bundle = out_dir.path().join("b.tar.gz");
    let data_dir = c.data_dir().to_string_lossy().into_owned();
    let bundle_arg = bundle.to_string_lossy().into_owned();

    let printed = c.cli_ok(&["dump", "-o", &bundle_arg, "--data-dir", &data_dir]).await;
    assert_eq!(printed.trim(), bundle_arg, "dump prints the bundle's path");
    let files = unpack(&bundle);
    for part in [
        "manifest.json",
        "api/nodes.json",
        "api/pools.json",
        "api/volumes.json",
        "api/replicas.json",
        "api/events.json",
        "api/metrics.txt",
        "local/up.json",
        "local/logs/control.log",
        "local/logs/node-1.log",
        "local/node-1/pools.json",
        "local/node-1/metrics.txt",
    ] {
        assert!(files.contains_key(part), "no {part} in the bundle: {:?}", files.keys());
    }
    assert!(files["api/volumes.json"].contains("\"dumped\""), "{}", files["api/volumes.json"]);
    assert!(files["api/metrics.txt"].contains("trireme_volumes"));
    // The engine's own: its pool's disk, which control's metrics do not have.
    let engine = &files["local/node-1/metrics.txt"];
    assert!(engine.contains("trireme_pool_disk_latency_seconds"), "{engine}");
    let manifest: serde_json::Value = serde_json::from_str(&files["manifest.json"]).unwrap();
    let failed: Vec<_> =
        manifest["parts"].as_array().unwrap().iter().filter(|p| p.get("error").is_some()).collect();
    assert!(failed.is_empty(), "parts missing with the API up: {failed:?}");
    for (path, text) in &files {
        assert!(!text.contains(c.admin_token()), "{path} holds the admin token");
    }
    assert!(!files.keys().any(|p| p.ends_with(".img")), "a pool image went into the bundle");

    // With the API unreachable the bundle still holds the logs, and says what it lacks.
    let down = out_dir.path().join("down.tar.gz");
    let down_arg = down.to_string_lossy().into_owned();
    let out = c
        .cli_env(
            &["dump", "-o", &down_arg, "--data-dir", &data_dir],
            &[("TRIREME_API", "http://127.0.0.1:1")],
        )
        .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout(&out).trim(), down_arg);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("api/volumes.json"),
        "stderr does not name the missing parts: {stderr}"
    );
    let files = unpack(&down);
    assert!(files.contains_key("local/logs/control.log"), "{:?}", files.keys());
    assert!(!files.contains_key("api/volumes.json"));
    let manifest: serde_json::Value = serde_json::from_str(&files["manifest.json"]).unwrap();
    let volumes = manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["path"] == "api/volumes.json")
        .unwrap();
    assert!(volumes["error"].as_str().is_some_and(|e| !e.is_empty()), "{volumes}");
}
