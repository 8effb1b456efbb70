//! Persistence: data survives a clean stop/start of `up`, and every write acknowledged before
//! the last completed FLUSH survives a SIGKILL of the engine under load (proved by
//! `trireme-checker`, not by eye).
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use trireme_tests::checker::format::read_log;
use trireme_tests::tools::{assert_files_equal, describe_output, random_file, run, run_ok};
use trireme_tests::{ByteSize, Cluster};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(180);
const CHECKER: &str = env!("CARGO_BIN_EXE_trireme-checker");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_stop_and_restart_of_up() {
    let mut c = Cluster::start(2, ByteSize::mib(256)).await;
    let tmp = tempfile::tempdir().unwrap();
    let (vol, uri) = c.create_published("persist", ByteSize::mib(32)).await;
    let src = tmp.path().join("src.bin");
    random_file(&src, (32 * MIB) as usize);
    run_ok("nbdcopy", &[src.to_str().unwrap(), &uri], T).await;

    c.stop().await;
    c.restart().await;

    // The volume is still known, with the same id, and still published: control brings its
    // target back by itself (publish again only if the spec lost it, which the assert reports).
    let v =
        c.client().volume("persist").await.unwrap_or_else(|e| panic!("volume after restart: {e}"));
    assert_eq!(v.id, vol.id);
    assert!(v.spec.publish.is_some(), "the volume lost its publish spec across a restart: {v:?}");
    let uri = c.wait_target("persist").await;
    c.wait_nbd(&uri).await;
    let back = tmp.path().join("back.bin");
    run_ok("nbdcopy", &[&uri, back.to_str().unwrap()], T).await;
    assert_files_equal(&src, &back, "data changed across a restart of up");
}

/// Parses "verified N blocks, M covered by flush F, L lost".
fn parse_summary(text: &str) -> Option<(u64, u64, u64, u64)> {
    let line = text.lines().rev().find(|l| l.starts_with("verified "))?;
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    match nums.as_slice() {
        [n, m, f, l, ..] => Some((*n, *m, *f, *l)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_flushed_writes_survive_engine_sigkill() {
    let c = Cluster::start(1, ByteSize::mib(512)).await;
    let tmp = tempfile::tempdir().unwrap();
    // Thin, so that the first round also crashes in the middle of cluster allocations.
    c.create_volume_with("crash", ByteSize::mib(64), true).await;
    let uri = c.publish("crash").await;
    let (_, load_uri) = c.create_published("crash-load", ByteSize::mib(64)).await;
    let engine = c.target_engine("crash").await;
    let log = tmp.path().join("checker.log");
    let log_s = log.to_str().unwrap().to_owned();

    for round in 1..=3u64 {
        let flushes_before =
            if log.exists() { read_log(&log).unwrap().covered.last_flush } else { 0 };
        let writer = tokio::process::Command::new(CHECKER)
            .args([
                "write",
                "--uri",
                &uri,
                "--log",
                &log_s,
                "--seconds",
                "120",
                "--flush-every-ms",
                "100",
            ])
            .args(["--depth", "16", "--fua-percent", "3"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Pressure from a second volume of the same engine.
        let load = tokio::process::Command::new("fio")
            .args(["--name=load", "--ioengine=nbd", &format!("--uri={load_uri}"), "--rw=randwrite"])
            .args([
                "--bs=4k",
                "--iodepth=8",
                "--size=64M",
                "--time_based",
                "--runtime=120",
                "--fsync=32",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();

        // Let it write and complete a number of flushes before pulling the plug.
        let want = flushes_before + 10;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let done = read_log(&log).map(|l| l.covered.last_flush).unwrap_or(0);
            if done >= want {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: the checker completed only {} of {want} flushes in 60s",
                done
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(500 + 700 * round)).await;
        let old = c.kill_engine(engine, Signal::SIGKILL);

        // The checker notices the lost connection and exits 0 having recorded its last flush.
        let out = tokio::time::timeout(Duration::from_secs(60), writer.wait_with_output())
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: the checker did not exit after the engine was killed")
            })
            .unwrap();
        let cmd = format!("trireme-checker write --uri {uri} --log {log_s}");
        assert!(
            out.status.success(),
            "round {round}: checker write failed\n{}",
            describe_output(&cmd, &out)
        );
        drop(load);

        c.wait_engine_restarted(engine, old).await;
        let uri_now = c.wait_target("crash").await;
        assert_eq!(uri_now, uri, "the volume's URI changed across an engine restart");
        c.wait_nbd(&uri).await;

        let out = run(CHECKER, &["verify", "--uri", &uri, "--log", &log_s], T).await.unwrap();
        let cmd = format!("trireme-checker verify --uri {uri} --log {log_s}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "round {round}: acknowledged writes were lost\n{}",
            describe_output(&cmd, &out)
        );
        let (blocks, covered, flush, lost) = parse_summary(&text)
            .unwrap_or_else(|| panic!("no summary line\n{}", describe_output(&cmd, &out)));
        assert_eq!(lost, 0, "{text}");
        assert_eq!(blocks, 64 * MIB / 4096, "{text}");
        assert!(covered > 0 && flush >= want, "the check would be vacuous: {text}");
        eprintln!("round {round}: {}", text.lines().last().unwrap_or(""));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_flushed_writes_survive_a_crash_of_every_process() {
    let mut c = Cluster::start(2, ByteSize::mib(256)).await;
    let tmp = tempfile::tempdir().unwrap();
    let (_, uri) = c.create_published("crash-all", ByteSize::mib(32)).await;
    let log = tmp.path().join("checker.log");
    let log_s = log.to_str().unwrap().to_owned();
    let writer = tokio::process::Command::new(CHECKER)
        .args([
            "write",
            "--uri",
            &uri,
            "--log",
            &log_s,
            "--seconds",
            "120",
            "--flush-every-ms",
            "100",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while read_log(&log).map(|l| l.covered.last_flush).unwrap_or(0) < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the checker completed fewer than 10 flushes in 60s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // up, control and every engine die at once; then a fresh `up` resumes the cluster.
    c.crash().await;
    let out = tokio::time::timeout(Duration::from_secs(60), writer.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{}", describe_output("trireme-checker write", &out));
    c.restart().await;
    let uri = c.wait_target("crash-all").await;
    c.wait_nbd(&uri).await;
    let out = run(CHECKER, &["verify", "--uri", &uri, "--log", &log_s], T).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "acknowledged writes were lost\n{}",
        describe_output("trireme-checker verify", &out)
    );
    let (_, covered, _, lost) = parse_summary(&text).unwrap();
    assert!(covered > 0 && lost == 0, "{text}");
}
