//! The checker checks: against nbdkit (no Trireme involved) it passes when data is kept and
//! fails, naming the blocks, when acknowledged-and-flushed data is lost or damaged. Without
//! this, a crash test that "passes" could be passing vacuously.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use trireme_tests::tools::{describe_output, run};

const CHECKER: &str = env!("CARGO_BIN_EXE_trireme-checker");
const T: Duration = Duration::from_secs(120);

struct Nbdkit(Child);

impl Drop for Nbdkit {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `nbdkit -f -p PORT <plugin args>` and waits until it accepts connections.
async fn nbdkit(port: u16, plugin: &[&str]) -> Nbdkit {
    let child = Command::new("nbdkit")
        .args(["-f", "-p", &port.to_string()])
        .args(plugin)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit");
    let k = Nbdkit(child);
    let uri = format!("nbd://127.0.0.1:{port}/");
    trireme_tests::tools::wait_for("nbdkit to listen", Duration::from_secs(20), || async {
        let opts = trireme_nbd::ClientOptions::default();
        trireme_nbd::Client::connect_uri(&uri, opts).await.map(drop).map_err(|e| e.to_string())
    })
    .await;
    k
}

async fn checker(args: &[&str]) -> (bool, String) {
    let out = run(CHECKER, args, T).await.unwrap();
    let desc = describe_output(&format!("trireme-checker {}", args.join(" ")), &out);
    (out.status.success(), desc)
}

fn zero_blocks(disk: &Path, first: u64, count: usize) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    f.seek(SeekFrom::Start(first * 4096)).unwrap();
    f.write_all(&vec![0u8; count * 4096]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_passes_kept_data_and_catches_lost_or_damaged_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let port = free_port();
    let uri = format!("nbd://127.0.0.1:{port}/");
    let log = tmp.path().join("log");
    let log_s = log.to_str().unwrap();

    // A file-backed server keeps everything: verify passes, with real coverage.
    let k = nbdkit(port, &["file", disk.to_str().unwrap()]).await;
    let (ok, out) = checker(&[
        "write",
        "--uri",
        &uri,
        "--log",
        log_s,
        "--seconds",
        "2",
        "--flush-every-ms",
        "50",
        "--fua-percent",
        "20",
    ])
    .await;
    assert!(ok, "{out}");
    let (ok, out) = checker(&["verify", "--uri", &uri, "--log", log_s]).await;
    assert!(ok && out.contains(", 0 lost"), "{out}");
    assert!(out.contains("verified 4096 blocks"), "{out}");

    // Losing the server mid-write: write exits 0 with what it recorded; verify still passes.
    let writer = tokio::process::Command::new(CHECKER)
        .args(["write", "--uri", &uri, "--log", log_s, "--seconds", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(k);
    let out = tokio::time::timeout(Duration::from_secs(30), writer.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{}", describe_output("checker write", &out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("stopped"),
        "{}",
        describe_output("checker write", &out)
    );
    let _k = nbdkit(port, &["file", disk.to_str().unwrap()]).await;
    let (ok, out) = checker(&["verify", "--uri", &uri, "--log", log_s]).await;
    assert!(ok, "{out}");

    // Zeroed (lost) and damaged blocks are caught and named.
    zero_blocks(&disk, 10, 2);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.seek(SeekFrom::Start(20 * 4096 + 100)).unwrap();
        f.write_all(&[0x5a; 3]).unwrap();
    }
    let (ok, out) = checker(&["verify", "--uri", &uri, "--log", log_s]).await;
    assert!(!ok, "verify passed over lost blocks: {out}");
    assert!(out.contains("LOST block 10:") && out.contains("LOST block 11:"), "{out}");
    assert!(out.contains("CORRUPT block 20:"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_catches_a_server_that_forgets_flushed_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let uri = format!("nbd://127.0.0.1:{port}/");
    let log = tmp.path().join("log");
    let log_s = log.to_str().unwrap();
    // The memory plugin acknowledges FLUSH but forgets everything when killed: the checker must
    // report the acknowledged writes as lost.
    let k = nbdkit(port, &["memory", "16M"]).await;
    let (ok, out) = checker(&["write", "--uri", &uri, "--log", log_s, "--seconds", "1"]).await;
    assert!(ok, "{out}");
    drop(k);
    let _k = nbdkit(port, &["memory", "16M"]).await;
    let (ok, out) = checker(&["verify", "--uri", &uri, "--log", log_s]).await;
    assert!(!ok, "verify passed although the server lost everything: {out}");
    assert!(out.contains("LOST block") && !out.contains(" 0 lost"), "{out}");
}
