//! Child supervision, the way Kubernetes restarts a pod: each server runs as a child process of
//! `up`; one that exits while `up` is not stopping is started again after a backoff that doubles
//! from 0.5 s to 10 s and resets once a run lasted a minute.
//!
//! ```text
//!        spawn ──► running ──exit──► log, wait backoff ──► spawn …
//!                     │
//!                  shutdown ──► SIGTERM ──(10 s)──► SIGKILL ──► reaped
//! ```
//!
//! Each child runs in its own process group (a terminal's Ctrl-C reaches only `up`, which then
//! stops the children in order) and gets SIGTERM from the kernel if `up` dies without cleaning
//! up (`PR_SET_PDEATHSIG`), so a killed `up` does not leave servers holding its ports.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::state::UpState;

/// How long a stopping child gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// How each run of a child starts in its log.
pub const START_MARKER: &str = "==== trireme up: starting";

/// What to run and where its output goes.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    /// `control` or `node-<i>`: the name in logs, `up.json` and the log file.
    pub name: String,
    pub binary: PathBuf,
    pub args: Vec<OsString>,
    /// Set on top of `up`'s own environment, which the child inherits.
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
}

/// Restart delays: doubling from `initial` to `max`, back to `initial` after a run of at least
/// `reset_after`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(10), Duration::from_secs(60))
    }
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, reset_after: Duration) -> Self {
        Self { initial, max, reset_after, next: initial }
    }

    /// The delay before the next start, given how long the last run lasted.
    pub fn after_run(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.reset_after {
            self.next = self.initial;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// Runs `spec` until `shutdown`, restarting it whenever it exits, and records each pid in
/// `state`. Returns once the child is stopped and reaped.
pub async fn supervise(
    spec: ChildSpec,
    state: watch::Sender<UpState>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    let mut restarted = false;
    loop {
        let started = Instant::now();
        match spawn(&spec) {
            Ok(mut child) => {
                let pid = child.id();
                state.send_modify(|s| s.set_pid(&spec.name, pid, restarted));
                tracing::info!(child = %spec.name, pid, "started");
                let mut log_check = tokio::time::interval(LOG_CHECK_EVERY);
                log_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        status = child.wait() => {
                            state.send_modify(|s| s.set_pid(&spec.name, None, false));
                            let status = describe(status);
                            tracing::warn!(
                                child = %spec.name,
                                %status,
                                ran_for = ?started.elapsed(),
                                log = %spec.log.display(),
                                "child exited unexpectedly"
                            );
                            break;
                        }
                        () = shutdown.cancelled() => {
                            stop(&spec.name, &mut child).await;
                            state.send_modify(|s| s.set_pid(&spec.name, None, false));
                            return;
                        }
                        _ = log_check.tick() => {
                            let log = spec.log.clone();
                            let rotated =
                                tokio::task::spawn_blocking(move || rotate_open(&log, LOG_ROTATE_AT))
                                    .await;
                            if let Ok(Err(e)) = rotated {
                                tracing::warn!(child = %spec.name, error = %e, "cannot rotate the log");
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(child = %spec.name, binary = %spec.binary.display(), error = %e, "cannot start child");
            }
        }
        let delay = backoff.after_run(started.elapsed());
        tracing::warn!(child = %spec.name, restart_in = ?delay, "restarting child");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return,
        }
        restarted = true;
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

/// A log past this size is moved to `<name>.log.1` (replacing the previous one), so that a
/// long-lived development cluster does not fill the disk: when its child next starts, or at the
/// next check while it runs.
const LOG_ROTATE_AT: u64 = 64 << 20;
/// How often the log of a running child is checked against [`LOG_ROTATE_AT`].
const LOG_CHECK_EVERY: Duration = Duration::from_secs(60);

/// Rotates the log of a running child if it is past `limit`. The child keeps its descriptor
/// (opened for append), so the log cannot be renamed away from it: it is copied aside and
/// truncated in place instead, and the child's next line lands at the start. A line written
/// between the copy and the truncation is lost. Returns whether it rotated.
pub(crate) fn rotate_open(log: &std::path::Path, limit: u64) -> std::io::Result<bool> {
    if !std::fs::metadata(log).is_ok_and(|m| m.len() > limit) {
        return Ok(false);
    }
    let mut old = log.as_os_str().to_owned();
    old.push(".1");
    std::fs::copy(log, &old)?;
    OpenOptions::new().write(true).open(log)?.set_len(0)?;
    Ok(true)
}

/// Settings that name one server's own addresses or directories. Set in `up`'s environment,
/// every child would inherit the same value: engines fighting over one metrics port, or
/// advertising one address between them. `up` gives each child its own by flag instead.
/// Cluster-wide tunables (heartbeat, rebuild bandwidth, …) are still passed down.
pub(crate) const PER_INSTANCE_ENV: [&str; 10] = [
    "TRIREME_API_LISTEN",
    "TRIREME_GRPC_LISTEN",
    "TRIREME_GRPC_ADVERTISE",
    "TRIREME_NBD_LISTEN",
    "TRIREME_NBD_ADVERTISE",
    "TRIREME_METRICS_LISTEN",
    "TRIREME_NODE_ID",
    "TRIREME_STATE_DIR",
    "TRIREME_DATA_DIR",
    "TRIREME_CONTROL",
];

/// The child's program, arguments and environment: `up`'s own, without the per-instance
/// settings, plus the spec's.
pub(crate) fn command(spec: &ChildSpec) -> Command {
    let mut cmd = Command::new(&spec.binary);
    for var in PER_INSTANCE_ENV {
        cmd.env_remove(var);
    }
    cmd.args(&spec.args).envs(spec.env.iter().map(|(k, v)| (k, v)));
    cmd
}

fn spawn(spec: &ChildSpec) -> std::io::Result<Child> {
    if let Some(dir) = spec.log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::metadata(&spec.log).is_ok_and(|m| m.len() > LOG_ROTATE_AT) {
        let mut old = spec.log.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&spec.log, old)?;
    }
    let mut log = OpenOptions::new().create(true).append(true).open(&spec.log)?;
    // A marker between runs makes restarts easy to find in the appended log.
    writeln!(log, "{START_MARKER} {} ====", spec.name)?;
    let stderr = log.try_clone()?;
    let parent = i32::try_from(std::process::id()).map_err(std::io::Error::other)?;

    let mut cmd = command(spec);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(stderr))
        .process_group(0)
        // Last resort only: `stop` terminates children gracefully first.
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (prctl, getppid); it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)?;
            // `up` may have died between fork and prctl; then nobody would ever signal us.
            // No allocation here (see SAFETY above), hence a bare errno.
            if nix::unistd::getppid().as_raw() != parent {
                return Err(std::io::Error::from(nix::errno::Errno::ESRCH));
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// SIGTERM to the child's process group, SIGKILL after [`STOP_GRACE`], then reap.
async fn stop(name: &str, child: &mut Child) {
    let Some(pid) = child.id() else {
        return; // Already reaped.
    };
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    let group = Pid::from_raw(raw);
    tracing::info!(child = %name, pid, "stopping");
    if let Err(e) = killpg(group, Signal::SIGTERM) {
        tracing::debug!(child = %name, error = %e, "SIGTERM failed; the child is likely gone");
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(status) => {
            tracing::info!(child = %name, status = %describe(status), "stopped");
        }
        Err(_) => {
            tracing::warn!(child = %name, pid, grace = ?STOP_GRACE, "did not stop in time; killing it");
            let _ = killpg(group, Signal::SIGKILL);
            let _ = child.start_kill();
            if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                tracing::error!(child = %name, pid, "could not reap child after SIGKILL");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::default();
        let quick = Duration::from_millis(10);
        let delays: Vec<_> = (0..7).map(|_| b.after_run(quick).as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 10000, 10000]);
        assert_eq!(b.after_run(Duration::from_secs(61)), Duration::from_millis(500));
        assert_eq!(b.after_run(quick), Duration::from_secs(1));
    }
}
