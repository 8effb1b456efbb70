//! Growing a file system to fill its (grown) device.
//!
//! Trireme expands volumes offline, so the usual place an ext4 file system grows is NodeStage,
//! before it is mounted: offline `resize2fs` needs no privilege beyond opening the device,
//! while the online resize ioctl also needs CAP_SYS_RESOURCE, which a node plugin in a
//! restricted container may lack. NodeExpandVolume then finds nothing left to do, or grows a
//! mounted file system online (ext4 with the capability, xfs always online).

use std::path::Path;

use super::cmd::{self, QUICK, SLOW, path_str};
use super::error::NodeError;

/// The size an ext4 file system on `device` spans, from its superblock.
pub(crate) async fn ext4_size(device: &Path) -> Result<u64, NodeError> {
    let out = cmd::run("dumpe2fs", &["-h", path_str(device)?], QUICK).await?;
    let field = |name: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    match (field("Block count:"), field("Block size:")) {
        (Some(count), Some(size)) => Ok(count * size),
        _ => Err(NodeError::Command {
            command: cmd::render("dumpe2fs", &["-h", path_str(device)?]),
            code: out.code,
            stderr: "no block count or block size in its output".into(),
        }),
    }
}

/// Grows an unmounted ext4 file system to its device, if the device is larger.
pub(crate) async fn grow_ext4_offline(device: &Path, device_size: u64) -> Result<bool, NodeError> {
    if ext4_size(device).await? >= device_size {
        return Ok(false);
    }
    let dev = path_str(device)?;
    // resize2fs insists on a checked file system; -p repairs only what is safe unattended.
    let fsck = cmd::output("e2fsck", &["-f", "-p", dev], SLOW).await?;
    // Exit codes 0 and 1 mean clean or corrected; anything else needs a person.
    if !matches!(fsck.code, Some(0) | Some(1)) {
        return Err(NodeError::Command {
            command: cmd::render("e2fsck", &["-f", "-p", dev]),
            code: fsck.code,
            stderr: fsck.stderr,
        });
    }
    cmd::run("resize2fs", &[dev], SLOW).await?;
    Ok(true)
}

/// Grows a mounted file system to its device; a no-op when it already fills it.
pub(crate) async fn grow_online(
    fs_type: &str,
    device: &Path,
    mount_point: &Path,
    device_size: u64,
) -> Result<(), NodeError> {
    match fs_type {
        "xfs" => cmd::run("xfs_growfs", &[path_str(mount_point)?], SLOW).await.map(drop),
        _ => {
            if ext4_size(device).await? >= device_size {
                return Ok(());
            }
            cmd::run("resize2fs", &[path_str(device)?], SLOW).await.map(drop)
        }
    }
}
