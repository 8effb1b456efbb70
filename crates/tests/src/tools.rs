//! Running external tools (nbdinfo, nbdcopy, fio, qemu-img, mkfs, …) with a timeout and a
//! failure message that shows everything needed to debug: the command line, the exit status,
//! stdout and stderr. Also small file helpers (random files, sha256).

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use rand::RngCore;
use sha2::{Digest, Sha256};

/// The `trireme` binary under test: `$TRIREME_BIN`, else next to the test executable.
pub fn trireme_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TRIREME_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "TRIREME_BIN={} does not exist", p.display());
        return p;
    }
    // current_exe() is <target>/<profile>/deps/<test>-<hash>.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir =
        exe.parent().and_then(Path::parent).expect("test executable has no parent dir");
    let bin = profile_dir.join("trireme");
    assert!(
        bin.is_file(),
        "the trireme binary was not found at {}: run `cargo build -p trireme` first (the repo's \
         test script does), or point TRIREME_BIN at it",
        bin.display()
    );
    bin
}

/// A command line as people would type it, for messages.
pub fn command_line<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut s = program.to_owned();
    for a in args {
        let a = a.as_ref().to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push_str(&format!(" '{a}'"));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// Describes a finished process for a failure message.
pub fn describe_output(cmd: &str, out: &Output) -> String {
    format!(
        "command: {cmd}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stdout), 8000),
        tail(&String::from_utf8_lossy(&out.stderr), 8000)
    )
}

/// The last `max` bytes of `s` (on a char boundary).
pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Runs a program to completion, killing it after `timeout`. Errs (with a full description) if
/// it could not start or timed out; a non-zero exit is returned as `Ok` for the caller to judge.
pub async fn run<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    timeout: Duration,
) -> Result<Output, String> {
    let cmd = command_line(program, args);
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start `{cmd}`: {e}"))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(format!("waiting for `{cmd}` failed: {e}")),
        // Dropping the future drops the child, which kills it (kill_on_drop).
        Err(_) => Err(format!("`{cmd}` did not finish within {timeout:?} and was killed")),
    }
}

/// Runs a program and panics with a full description unless it exits 0.
pub async fn run_ok<S: AsRef<OsStr>>(program: &str, args: &[S], timeout: Duration) -> Output {
    let cmd = command_line(program, args);
    match run(program, args, timeout).await {
        Ok(out) if out.status.success() => out,
        Ok(out) => panic!("external tool failed\n{}", describe_output(&cmd, &out)),
        Err(e) => panic!("{e}"),
    }
}

/// stdout as a string.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `len` random bytes to `path`.
pub fn random_file(path: &Path, len: usize) {
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut rng = rand::rng();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        left -= n;
    }
    f.sync_all().ok();
}

/// Hex sha256 of a file's first `len` bytes (all of it when `None`).
pub fn sha256_file(path: &Path, len: Option<u64>) -> String {
    use std::io::Read;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut r: Box<dyn Read> = match len {
        Some(n) => Box::new(f.take(n)),
        None => Box::new(f),
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

pub fn sha256_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match f().await {
            Ok(v) => return v,
            Err(why) => why,
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last observation: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A few words about a 4 KiB block, for difference reports.
fn describe_block(b: &[u8]) -> String {
    if b.is_empty() {
        return "missing (file too short)".into();
    }
    if b.iter().all(|&x| x == b[0]) {
        return format!("all bytes {:#04x}", b[0]);
    }
    format!("data starting {:02x?}", &b[..8.min(b.len())])
}

/// Panics unless two files are identical, saying where and how they differ (which 4 KiB
/// blocks, and what each side holds there) so a data-integrity failure can be diagnosed.
pub fn assert_files_equal(expected: &Path, actual: &Path, what: &str) {
    let a = std::fs::read(expected).unwrap_or_else(|e| panic!("read {}: {e}", expected.display()));
    let b = std::fs::read(actual).unwrap_or_else(|e| panic!("read {}: {e}", actual.display()));
    if a == b {
        return;
    }
    const BS: usize = 4096;
    let blocks = a.len().max(b.len()).div_ceil(BS);
    let mut diffs = Vec::new();
    for i in 0..blocks {
        let ra = a.get(i * BS..((i + 1) * BS).min(a.len())).unwrap_or(&[]);
        let rb = b.get(i * BS..((i + 1) * BS).min(b.len())).unwrap_or(&[]);
        if ra != rb {
            diffs.push(i);
        }
    }
    let mut msg = format!(
        "{what}: {} of {blocks} 4 KiB blocks differ (sizes {} and {}); first differences:\n",
        diffs.len(),
        a.len(),
        b.len()
    );
    for &i in diffs.iter().take(12) {
        let ra = a.get(i * BS..((i + 1) * BS).min(a.len())).unwrap_or(&[]);
        let rb = b.get(i * BS..((i + 1) * BS).min(b.len())).unwrap_or(&[]);
        msg.push_str(&format!(
            "  offset {:#x} ({} MiB + {} KiB): expected {}, found {}\n",
            i * BS,
            (i * BS) >> 20,
            (i * BS % (1 << 20)) >> 10,
            describe_block(ra),
            describe_block(rb)
        ));
    }
    if let (Some(first), Some(last)) = (diffs.first(), diffs.last()) {
        msg.push_str(&format!("  differing range: {:#x}..{:#x}\n", first * BS, (last + 1) * BS));
    }
    panic!("{msg}");
}
