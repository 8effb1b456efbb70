//! Attaching a volume's NBD export as a block device, and detaching it, idempotently.
//!
//! ```text
//!  kernel nbd:  nbd-client host port /dev/nbdN -N <export>          ──> /dev/nbdN
//!  otherwise:   nbdfuse <state>/fuse/<vol> <uri>  ──> <state>/fuse/<vol>/nbd (a file)
//!               losetup --direct-io=on -f <that file>              ──> /dev/loopN
//! ```
//!
//! Every step first looks for what an earlier, interrupted attempt left: a live FUSE mount of
//! the volume's directory is reused (a dead one is unmounted), a loop device already backed by
//! the volume's file is reused (found through sysfs, which needs no `stat` of a possibly dead
//! FUSE file). nbdfuse runs in its own process group, so it outlives a crash of the plugin and
//! the volume stays attached; only unstage stops it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::cmd::{self, QUICK, path_str};
use super::error::NodeError;
use super::mounts;
use super::state::{Attachment, StateDir};

/// How long nbdfuse may take to connect and mount.
const FUSE_READY: Duration = Duration::from_secs(30);
/// How long nbdfuse may take to exit after its FUSE mount is gone.
const FUSE_EXIT: Duration = Duration::from_secs(10);

/// Which NBD client this node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Client {
    Kernel,
    Fuse,
}

impl Client {
    /// The kernel's client where the kernel has one, else nbdfuse.
    pub(crate) fn detect() -> Self {
        let kernel = Path::new("/sys/module/nbd").exists() || Path::new("/dev/nbd0").exists();
        if kernel && cmd::installed("nbd-client") { Self::Kernel } else { Self::Fuse }
    }

    pub(crate) fn tools(self) -> &'static [&'static str] {
        match self {
            Self::Kernel => &["nbd-client", "blkid", "mount", "umount"],
            Self::Fuse => &["nbdfuse", "fusermount3", "losetup", "blkid", "mount", "umount"],
        }
    }
}

/// Attaches (or finds attached) the volume; `progress` is called with the attachment as soon
/// as it is known, before the step that creates it completes, so it can be recorded.
pub(crate) async fn attach(
    client: Client,
    state: &StateDir,
    volume_id: &str,
    uri: &str,
    previous: Option<&Attachment>,
    mut progress: impl FnMut(&Attachment) -> Result<(), NodeError>,
) -> Result<(Attachment, PathBuf), NodeError> {
    match client {
        Client::Fuse => {
            progress(&Attachment::Fuse { loop_device: None })?;
            ensure_fuse(state, volume_id, uri).await?;
            let file = state.fuse_file(volume_id);
            let device = match loop_backed_by(&file)? {
                Some(dev) => dev,
                None => {
                    let out = cmd::run(
                        "losetup",
                        &["--direct-io=on", "-f", "--show", path_str(&file)?],
                        QUICK,
                    )
                    .await?;
                    PathBuf::from(out.stdout.trim())
                }
            };
            let a = Attachment::Fuse { loop_device: Some(device.clone()) };
            progress(&a)?;
            Ok((a, device))
        }
        Client::Kernel => {
            let device = match previous {
                Some(Attachment::Kernel { device }) => device.clone(),
                _ => free_nbd_device()?,
            };
            let a = Attachment::Kernel { device: device.clone() };
            progress(&a)?;
            if !nbd_connected(&device) {
                let (host, port, export) = parse_nbd_uri(uri)?;
                cmd::run("nbd-client", &[&host, &port, path_str(&device)?, "-N", &export], QUICK)
                    .await?;
            }
            Ok((a, device))
        }
    }
}

/// Detaches whatever `attachment` (and anything else of this volume) left on the node.
pub(crate) async fn detach(
    state: &StateDir,
    volume_id: &str,
    attachment: Option<&Attachment>,
) -> Result<(), NodeError> {
    if let Some(Attachment::Kernel { device }) = attachment {
        if nbd_connected(device) {
            cmd::run("nbd-client", &["-d", path_str(device)?], QUICK).await?;
        }
        return Ok(());
    }
    // The FUSE path: loop devices first (they hold the FUSE file open), then nbdfuse.
    let file = state.fuse_file(volume_id);
    if let Some(Attachment::Fuse { loop_device: Some(dev) }) = attachment {
        // A recorded loop device whose FUSE file was already unmounted under it shows its
        // backing file relative to the gone mount ("/nbd"): still ours, detach it.
        if loop_backing(dev).is_some_and(|b| b == Path::new("/nbd")) {
            cmd::run("losetup", &["-d", path_str(dev)?], QUICK).await?;
        }
    }
    while let Some(dev) = loop_backed_by(&file)? {
        cmd::run("losetup", &["-d", path_str(&dev)?], QUICK).await?;
        wait_until(QUICK, || Ok(loop_backed_by(&file)?.as_ref() != Some(&dev))).await?;
    }
    stop_fuse(state, volume_id).await?;
    for path in [state.fuse_pidfile(volume_id), state.fuse_log(volume_id)] {
        let _ = std::fs::remove_file(path);
    }
    let dir = state.fuse_dir(volume_id);
    match std::fs::remove_dir(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NodeError::io(&dir, e)),
    }
}

/// Whether the attachment still works (for the volume condition).
pub(crate) fn health(
    state: &StateDir,
    volume_id: &str,
    attachment: &Attachment,
) -> Result<(), String> {
    match attachment {
        Attachment::Kernel { device } => {
            if nbd_connected(device) {
                Ok(())
            } else {
                Err(format!("{} is disconnected", device.display()))
            }
        }
        Attachment::Fuse { loop_device } => {
            let file = state.fuse_file(volume_id);
            std::fs::metadata(&file)
                .map_err(|e| format!("the nbdfuse file {} is unusable: {e}", file.display()))?;
            match loop_device {
                Some(dev) if dev.exists() => Ok(()),
                Some(dev) => Err(format!("loop device {} is gone", dev.display())),
                None => Err("no loop device is attached".into()),
            }
        }
    }
}

/// The size of a block device (or of the file a bind mount shows it at).
pub(crate) fn device_size(path: &Path) -> Result<u64, NodeError> {
    use std::io::{Seek as _, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| NodeError::io(path, e))?;
    f.seek(SeekFrom::End(0)).map_err(|e| NodeError::io(path, e))
}

/// Makes a loop device see its backing file's current size (after the file grew).
pub(crate) async fn refresh_size(attachment: &Attachment) -> Result<(), NodeError> {
    if let Attachment::Fuse { loop_device: Some(dev) } = attachment {
        cmd::run("losetup", &["-c", path_str(dev)?], QUICK).await?;
    }
    Ok(())
}

// ------------------------------------------------------------------ nbdfuse

async fn ensure_fuse(state: &StateDir, volume_id: &str, uri: &str) -> Result<(), NodeError> {
    let dir = state.fuse_dir(volume_id);
    let file = state.fuse_file(volume_id);
    if is_fuse_mount(&dir)? {
        if std::fs::metadata(&file).is_ok() {
            return Ok(()); // a previous attempt's nbdfuse is alive: reuse it
        }
        // Its nbdfuse died (ENOTCONN): release loop devices on the dead file, clear the dead
        // mount and start over.
        while let Some(dev) = loop_backed_by(&file)? {
            cmd::run("losetup", &["-d", path_str(&dev)?], QUICK).await?;
            wait_until(QUICK, || Ok(loop_backed_by(&file)?.as_ref() != Some(&dev))).await?;
        }
        stop_fuse(state, volume_id).await?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| NodeError::io(&dir, e))?;
    let pidfile = state.fuse_pidfile(volume_id);
    let _ = std::fs::remove_file(&pidfile);
    let log_path = state.fuse_log(volume_id);
    let log = std::fs::File::create(&log_path).map_err(|e| NodeError::io(&log_path, e))?;
    let log2 = log.try_clone().map_err(|e| NodeError::io(&log_path, e))?;
    let mut child = tokio::process::Command::new("nbdfuse")
        .args(["-P", path_str(&pidfile)?, path_str(&dir)?, uri])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: a signal to the plugin's group (or the plugin's death) must
        // not take the volume's data path down with it.
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| NodeError::Spawn { program: "nbdfuse".into(), source })?;
    let started = Instant::now();
    loop {
        // nbdfuse writes its pid file once it is connected and serving.
        if pidfile.exists() && is_fuse_mount(&dir)? {
            return Ok(());
        }
        let exited = child
            .try_wait()
            .map_err(|source| NodeError::Spawn { program: "nbdfuse".into(), source })?;
        if exited.is_some() || started.elapsed() > FUSE_READY {
            if exited.is_none() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(NodeError::FuseNotReady {
                uri: uri.to_owned(),
                secs: FUSE_READY.as_secs(),
                log: log.trim().chars().take(500).collect(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_fuse_mount(dir: &Path) -> Result<bool, NodeError> {
    Ok(mounts::mount_at(dir)?.is_some_and(|m| m.fs_type.starts_with("fuse")))
}

/// The pid of this volume's nbdfuse, if it runs (checked against its command line, so a
/// recycled pid is never signalled).
fn fuse_pid(state: &StateDir, volume_id: &str) -> Option<i32> {
    let pid: i32 =
        std::fs::read_to_string(state.fuse_pidfile(volume_id)).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let dir = state.fuse_dir(volume_id);
    let dir = dir.to_str()?;
    let is_ours = cmdline.split(|b| *b == 0).any(|arg| arg == dir.as_bytes());
    is_ours.then_some(pid)
}

async fn stop_fuse(state: &StateDir, volume_id: &str) -> Result<(), NodeError> {
    let dir = state.fuse_dir(volume_id);
    let pid = fuse_pid(state, volume_id);
    if is_fuse_mount(&dir)? {
        let d = path_str(&dir)?;
        if let Err(e) = cmd::run("fusermount3", &["-u", d], QUICK).await {
            // A dead nbdfuse leaves a mount nothing can use: detach it lazily. A live, busy
            // one is still someone's device; lazily detaching it would orphan that user.
            if std::fs::metadata(state.fuse_file(volume_id)).is_ok() {
                return Err(e);
            }
            cmd::run("fusermount3", &["-u", "-z", d], QUICK).await?;
        }
    }
    if let Some(pid) = pid {
        let gone = wait_until(FUSE_EXIT, || Ok(fuse_pid(state, volume_id).is_none())).await;
        if gone.is_err() {
            use nix::sys::signal::{Signal, kill};
            let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            wait_until(QUICK, || Ok(fuse_pid(state, volume_id).is_none())).await?;
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ loop devices

/// The backing file of a loop device, if it is attached.
fn loop_backing(dev: &Path) -> Option<PathBuf> {
    let name = dev.file_name()?.to_str()?;
    let b = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(b.trim_end_matches('\n')))
}

/// The loop device whose backing file is `file`, found through sysfs.
fn loop_backed_by(file: &Path) -> Result<Option<PathBuf>, NodeError> {
    let entries = match std::fs::read_dir("/sys/block") {
        Ok(e) => e,
        Err(e) => return Err(NodeError::io("/sys/block", e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("loop")) else { continue };
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(backing.trim_end_matches('\n')) == file {
            return Ok(Some(PathBuf::from(format!("/dev/{name}"))));
        }
    }
    Ok(None)
}

// ------------------------------------------------------------------ kernel nbd

fn nbd_connected(device: &Path) -> bool {
    device
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| Path::new(&format!("/sys/block/{n}/pid")).exists())
}

fn free_nbd_device() -> Result<PathBuf, NodeError> {
    (0..256)
        .map(|i| PathBuf::from(format!("/dev/nbd{i}")))
        .take_while(|d| d.exists())
        .find(|d| !nbd_connected(d))
        .ok_or(NodeError::NoNbdDevice)
}

/// `nbd://host[:port]/export` → (host, port, export).
pub(crate) fn parse_nbd_uri(uri: &str) -> Result<(String, String, String), NodeError> {
    let bad = || NodeError::BadUri(uri.to_owned());
    let rest = uri.strip_prefix("nbd://").ok_or_else(bad)?;
    let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, p),
        _ => (authority, "10809"),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_owned(), port.to_owned(), export.to_owned()))
}

async fn wait_until(
    limit: Duration,
    mut done: impl FnMut() -> Result<bool, NodeError>,
) -> Result<(), NodeError> {
    let start = Instant::now();
    while !done()? {
        if start.elapsed() > limit {
            return Err(NodeError::Timeout {
                command: "waiting for the device to go".into(),
                secs: limit.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_uris() {
        assert_eq!(
            parse_nbd_uri("nbd://10.0.0.1:10810/abc").unwrap(),
            ("10.0.0.1".into(), "10810".into(), "abc".into())
        );
        assert_eq!(parse_nbd_uri("nbd://h/x").unwrap(), ("h".into(), "10809".into(), "x".into()));
        assert_eq!(
            parse_nbd_uri("nbd://[::1]:5/e").unwrap(),
            ("::1".into(), "5".into(), "e".into())
        );
        assert!(parse_nbd_uri("http://h/x").is_err());
        assert!(parse_nbd_uri("nbd:///x").is_err());
    }
}
