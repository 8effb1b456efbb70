//! The CLI end to end against a live cluster: every verb in table, json and yaml, and errors
//! as one sentence on stderr with a non-zero exit.
#![allow(clippy::unwrap_used)]

use std::process::Output;
use std::time::Duration;

use trireme_api::{Node, Pool, Replica, Volume};
use trireme_tests::tools::run_ok;
use trireme_tests::{ByteSize, Cluster};

const MIB: u64 = 1 << 20;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts a failed command: exit ≠ 0, nothing on stdout, one clear line on stderr.
fn assert_one_sentence_error(out: &Output, what: &str) -> String {
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "{what}: succeeded but should fail; stdout: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).trim().is_empty(),
        "{what}: errors go to stderr, stdout had: {}",
        text(&out.stdout)
    );
    let err_t = err.trim();
    assert!(err_t.len() > 10, "{what}: no clear error on stderr: {err:?}");
    // Argument errors may carry clap's standard "For more information, try '--help'." hint.
    let lines: Vec<&str> = err_t
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("For more information"))
        .collect();
    assert_eq!(lines.len(), 1, "{what}: the error is not one sentence: {err:?}");
    assert!(!err_t.contains("panicked"), "{what}: the CLI panicked: {err}");
    err_t.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_lifecycle_in_every_output_format() {
    let c = Cluster::start(2, ByteSize::mib(256)).await;

    // create
    let out = c.cli_ok(&["volume", "create", "cli-a", "--size", "32MiB"]).await;
    assert!(out.contains("cli-a"), "create printed: {out}");
    c.cli_ok(&["volume", "create", "cli-thin", "--size", "16MiB", "--thin"]).await;

    // list: table, json, yaml
    let table = c.cli_ok(&["volume", "list"]).await;
    assert!(table.contains("cli-a") && table.contains("cli-thin"), "table: {table}");
    assert!(table.lines().count() >= 3, "a table has a header and a row per volume: {table}");
    let vols: Vec<Volume> =
        serde_json::from_str(&c.cli_ok(&["volume", "list", "-o", "json"]).await).unwrap();
    let a = vols.iter().find(|v| v.name.as_str() == "cli-a").expect("cli-a in json list");
    assert_eq!(a.spec.size, ByteSize::mib(32));
    assert_eq!(a.spec.replicas, 1);
    assert!(vols.iter().any(|v| v.name.as_str() == "cli-thin" && v.spec.thin));
    let yaml = c.cli_ok(&["volume", "list", "-o", "yaml"]).await;
    let y: serde_norway::Value =
        serde_norway::from_str(&yaml).unwrap_or_else(|e| panic!("bad yaml ({e}): {yaml}"));
    let seq = y.as_sequence().unwrap_or_else(|| panic!("yaml list is not a sequence: {yaml}"));
    assert_eq!(seq.len(), 2, "{yaml}");

    // get: by name and by id, in each format
    let v: Volume =
        serde_json::from_str(&c.cli_ok(&["volume", "get", "cli-a", "-o", "json"]).await).unwrap();
    assert_eq!(v.id, a.id);
    let by_id: Volume =
        serde_json::from_str(&c.cli_ok(&["volume", "get", &a.id.to_string(), "-o", "json"]).await)
            .unwrap();
    assert_eq!(by_id.id, a.id);
    let yv: Volume =
        serde_norway::from_str(&c.cli_ok(&["volume", "get", "cli-a", "-o", "yaml"]).await).unwrap();
    assert_eq!(yv.id, a.id);
    let t = c.cli_ok(&["volume", "get", "cli-a"]).await;
    assert!(t.contains("cli-a") && t.contains("32MiB"), "table get: {t}");

    // publish prints the NBD URI, which works
    let out = c.cli_ok(&["volume", "publish", "cli-a"]).await;
    let uri = out
        .split_whitespace()
        .find(|w| w.starts_with("nbd://"))
        .unwrap_or_else(|| panic!("publish printed no NBD URI: {out}"))
        .to_owned();
    assert!(uri.starts_with("nbd://127.0.0.1:") && uri.ends_with(&a.id.to_string()), "{uri}");
    let info = run_ok("nbdinfo", &["--size", &uri], Duration::from_secs(60)).await;
    assert_eq!(text(&info.stdout).trim(), (32 * MIB).to_string());
    let v: Volume =
        serde_json::from_str(&c.cli_ok(&["volume", "get", "cli-a", "-o", "json"]).await).unwrap();
    assert!(v.spec.publish.is_some() && v.status.target.is_some(), "{v:?}");

    // replicas
    let reps: Vec<Replica> = serde_json::from_str(
        &c.cli_ok(&["replica", "list", "--volume", "cli-a", "-o", "json"]).await,
    )
    .unwrap();
    assert_eq!(reps.len(), 1, "{reps:?}");
    assert_eq!(reps[0].volume, a.id);
    let all: Vec<Replica> =
        serde_json::from_str(&c.cli_ok(&["replica", "list", "-o", "json"]).await).unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(c.cli_ok(&["replica", "list"]).await.contains(&reps[0].id.to_string()[..8]));

    // resize (grow)
    c.cli_ok(&["volume", "resize", "cli-a", "--size", "64MiB"]).await;
    let v: Volume =
        serde_json::from_str(&c.cli_ok(&["volume", "get", "cli-a", "-o", "json"]).await).unwrap();
    assert_eq!(v.spec.size, ByteSize::mib(64));

    // unpublish
    c.cli_ok(&["volume", "unpublish", "cli-a"]).await;
    let v: Volume =
        serde_json::from_str(&c.cli_ok(&["volume", "get", "cli-a", "-o", "json"]).await).unwrap();
    assert!(v.spec.publish.is_none() && v.status.target.is_none(), "still published: {v:?}");
    // …and the resized volume publishes at its new size
    let out = c.cli_ok(&["volume", "publish", "cli-a"]).await;
    let uri = out.split_whitespace().find(|w| w.starts_with("nbd://")).unwrap().to_owned();
    let info = run_ok("nbdinfo", &["--size", &uri], Duration::from_secs(60)).await;
    assert_eq!(text(&info.stdout).trim(), (64 * MIB).to_string());
    c.cli_ok(&["volume", "unpublish", "cli-a"]).await;

    // nodes, pools, events
    let nodes: Vec<Node> =
        serde_json::from_str(&c.cli_ok(&["node", "list", "-o", "json"]).await).unwrap();
    assert_eq!(nodes.len(), 2);
    let n: Node =
        serde_norway::from_str(&c.cli_ok(&["node", "get", "node-1", "-o", "yaml"]).await).unwrap();
    assert_eq!(n.id.as_str(), "node-1");
    assert!(c.cli_ok(&["node", "list"]).await.contains("node-2"));
    let pools: Vec<Pool> =
        serde_json::from_str(&c.cli_ok(&["pool", "list", "-o", "json"]).await).unwrap();
    assert_eq!(pools.len(), 2);
    assert!(c.cli_ok(&["pool", "get", "pool-1"]).await.contains("pool-1"));
    let events = c.cli_ok(&["event", "list"]).await;
    assert!(
        events.contains("cli-a") || events.contains(&a.id.to_string()),
        "no event about cli-a: {events}"
    );

    // delete
    c.cli_ok(&["volume", "delete", "cli-a"]).await;
    let out = c.cli(&["volume", "get", "cli-a"]).await;
    assert_one_sentence_error(&out, "get of a deleted volume");
    let vols: Vec<Volume> =
        serde_json::from_str(&c.cli_ok(&["volume", "list", "-o", "json"]).await).unwrap();
    assert_eq!(vols.len(), 1);
    let reps: Vec<Replica> =
        serde_json::from_str(&c.cli_ok(&["replica", "list", "-o", "json"]).await).unwrap();
    assert_eq!(reps.len(), 1, "the deleted volume's replica is still listed: {reps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_sentence_on_stderr() {
    let c = Cluster::start(1, ByteSize::mib(256)).await;
    let cases: [(&str, &[&str]); 8] = [
        ("unknown volume", &["volume", "get", "no-such-volume"]),
        ("unknown node", &["node", "get", "no-such-node"]),
        ("unknown pool", &["pool", "get", "no-such-pool"]),
        ("bad name", &["volume", "create", "Bad_Name", "--size", "16MiB"]),
        ("bad size", &["volume", "create", "v1", "--size", "lots"]),
        ("zero size", &["volume", "create", "v1", "--size", "0"]),
        ("too big", &["volume", "create", "v1", "--size", "64GiB"]),
        ("delete unknown", &["volume", "delete", "no-such-volume"]),
    ];
    for (what, args) in cases {
        let out = c.cli(args).await;
        assert_one_sentence_error(&out, what);
    }
    let out = c.cli(&["volume", "create", "v2", "--size", "16MiB", "--replicas", "2"]).await;
    let err = assert_one_sentence_error(&out, "--replicas 2");
    assert!(
        err.contains("replica") && err.contains("node"),
        "--replicas 2 on a 1-node cluster should say each replica needs its own node: {err}"
    );
    // Nothing was created by any of the failures.
    let vols: Vec<Volume> =
        serde_json::from_str(&c.cli_ok(&["volume", "list", "-o", "json"]).await).unwrap();
    assert!(vols.is_empty(), "failed creates left volumes behind: {vols:?}");

    // An unreachable API, a wrong token and no token are one sentence too.
    let out = c.cli_env(&["volume", "list", "--api", "127.0.0.1:1"], &[]).await;
    let err = assert_one_sentence_error(&out, "unreachable API");
    assert!(err.contains("127.0.0.1:1"), "the error should name the address: {err}");
    let out = c
        .cli_env(&["volume", "list"], &[("TRIREME_API", &c.api_url()), ("TRIREME_TOKEN", "wrong")])
        .await;
    assert_one_sentence_error(&out, "wrong token");
    let out = c.cli_env(&["volume", "list"], &[("TRIREME_API", &c.api_url())]).await;
    assert_one_sentence_error(&out, "no token");
}

/// The agreed surface is `trireme [--api URL] [--token T] [-o FORMAT] <noun> <verb>`: the
/// global flags must work before the noun (as typed from the docs) as well as after the verb.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_flags_work_before_the_noun_and_after_the_verb() {
    let c = Cluster::start(1, ByteSize::mib(256)).await;
    let url = c.api_url();
    let token = c.admin_token().to_owned();
    let after =
        c.cli_env(&["node", "list", "--api", &url, "--token", &token, "-o", "json"], &[]).await;
    assert!(after.status.success(), "flags after the verb: {}", text(&after.stderr));
    let nodes: Vec<Node> = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(nodes.len(), 1);
    let before =
        c.cli_env(&["--api", &url, "--token", &token, "-o", "json", "node", "list"], &[]).await;
    assert!(
        before.status.success(),
        "`trireme --api URL --token T -o json node list` failed: {}",
        text(&before.stderr)
    );
    let nodes: Vec<Node> = serde_json::from_slice(&before.stdout).unwrap();
    assert_eq!(nodes.len(), 1);
}
