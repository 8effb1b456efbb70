//! What is mounted where, read from `/proc/self/mountinfo`, and mounting and unmounting.

use std::path::{Path, PathBuf};

use super::cmd::{self, QUICK, path_str};
use super::error::NodeError;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    /// The path inside the mounted file system that is mounted (`/loop0` for a bind mount of
    /// a device node out of devtmpfs).
    pub root: String,
    pub mount_point: PathBuf,
    pub options: Vec<String>,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    pub(crate) fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                root: unescape(l.get(3)?),
                mount_point: PathBuf::from(unescape(l.get(4)?)),
                options: l.get(5)?.split(',').map(str::to_owned).collect(),
                fs_type: (*r.first()?).to_owned(),
                source: unescape(r.get(1)?),
            })
        })
        .collect()
}

pub(crate) fn mounts() -> Result<Vec<MountEntry>, NodeError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| NodeError::io("/proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text))
}

/// Where `device` is in use apart from `except`: file systems on it (and bind mounts of
/// them), and bind mounts of its device node.
pub(crate) fn users_of(device: &Path, except: &Path) -> Result<Vec<PathBuf>, NodeError> {
    let dev = device.to_string_lossy();
    let node = device.file_name().map(|n| format!("/{}", n.to_string_lossy()));
    Ok(mounts()?
        .into_iter()
        .filter(|m| m.mount_point != except)
        .filter(|m| m.source == dev || (m.fs_type == "devtmpfs" && Some(&m.root) == node.as_ref()))
        .map(|m| m.mount_point)
        .collect())
}

/// The topmost mount at exactly `path`, if any.
pub(crate) fn mount_at(path: &Path) -> Result<Option<MountEntry>, NodeError> {
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

pub(crate) async fn mount(
    source: &str,
    target: &Path,
    fs_type: Option<&str>,
    options: &[String],
) -> Result<(), NodeError> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(fs) = fs_type {
        args.extend(["-t", fs]);
    }
    let joined = options.join(",");
    if !joined.is_empty() {
        args.extend(["-o", &joined]);
    }
    args.extend([source, path_str(target)?]);
    cmd::run("mount", &args, QUICK).await.map(drop)
}

pub(crate) async fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), NodeError> {
    cmd::run("mount", &["--bind", path_str(source)?, path_str(target)?], QUICK).await?;
    if read_only {
        remount_read_only(target).await?;
    }
    Ok(())
}

pub(crate) async fn remount_read_only(target: &Path) -> Result<(), NodeError> {
    cmd::run("mount", &["-o", "remount,bind,ro", path_str(target)?], QUICK).await.map(drop)
}

/// Unmounts everything stacked at `path` (a retried mount may have stacked two).
pub(crate) async fn unmount_all(path: &Path) -> Result<(), NodeError> {
    for _ in 0..8 {
        if mount_at(path)?.is_none() {
            return Ok(());
        }
        cmd::run("umount", &[path_str(path)?], QUICK).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext4 /dev/loop0 rw,errors=continue\n\
                    40 35 0:50 / /var/x/fuse rw,nosuid shared:3 - fuse /dev/fuse rw,user_id=0\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!((m[0].fs_type.as_str(), m[0].source.as_str()), ("ext4", "/dev/loop0"));
        assert!(!m[0].read_only());
        assert_eq!(m[1].fs_type, "fuse");
        assert_eq!(m[0].root, "/");
    }
}
