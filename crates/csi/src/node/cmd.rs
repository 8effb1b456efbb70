//! Running the system tools the node plugin drives, each with a deadline and a clear error.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::error::NodeError;

/// Deadline for quick tools (mount, losetup, blkid).
pub(crate) const QUICK: Duration = Duration::from_secs(30);
/// Deadline for tools that touch the whole device (mkfs, resize2fs).
pub(crate) const SLOW: Duration = Duration::from_secs(300);

/// What a finished command said.
#[derive(Debug)]
pub(crate) struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub(crate) fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `program args…`, returning its output whatever the exit code.
pub(crate) async fn output(
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<Output, NodeError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child =
        cmd.spawn().map_err(|source| NodeError::Spawn { program: program.to_owned(), source })?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| NodeError::Timeout {
            command: render(program, args),
            secs: timeout.as_secs(),
        })?
        .map_err(|source| NodeError::Spawn { program: program.to_owned(), source })?;
    Ok(Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `program args…` and fails unless it exits 0.
pub(crate) async fn run(
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<Output, NodeError> {
    let out = output(program, args, timeout).await?;
    if !out.success() {
        return Err(NodeError::Command {
            command: render(program, args),
            code: out.code,
            stderr: out.stderr.trim().chars().take(500).collect(),
        });
    }
    Ok(out)
}

pub(crate) fn render(program: &str, args: &[&str]) -> String {
    std::iter::once(program).chain(args.iter().copied()).collect::<Vec<_>>().join(" ")
}

pub(crate) fn path_str(p: &Path) -> Result<&str, NodeError> {
    p.to_str().ok_or_else(|| NodeError::BadPath(p.display().to_string()))
}

/// Whether `program` is on the PATH.
pub(crate) fn installed(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_report_failures_and_timeouts() {
        assert!(run("true", &[], QUICK).await.is_ok());
        let err = run("sh", &["-c", "echo boom >&2; exit 3"], QUICK).await.unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        let err = run("sleep", &["10"], Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(err, NodeError::Timeout { .. }), "{err}");
        assert!(installed("sh"));
        assert!(!installed("no-such-tool-here"));
    }
}
