//! Volume capabilities: which access types, access modes and file systems Trireme serves.
//!
//! A Trireme volume is attached to one node at a time (one nexus, one NBD client), so every
//! single-node access mode is served and every multi-node mode is refused.

use tonic::Status;

use crate::proto::VolumeCapability;
use crate::proto::volume_capability::{AccessType, access_mode::Mode};

/// The file systems the node plugin formats and grows.
pub(crate) const FS_TYPES: [&str; 2] = ["ext4", "xfs"];
pub(crate) const DEFAULT_FS_TYPE: &str = "ext4";

/// What a capability asks for, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Access {
    Block,
    Mount { fs_type: Option<String>, flags: Vec<String> },
}

impl Access {
    pub(crate) fn is_block(&self) -> bool {
        matches!(self, Self::Block)
    }
}

/// Why a capability cannot be served; one sentence.
pub(crate) fn unsupported(cap: &VolumeCapability) -> Option<String> {
    parse(cap).err()
}

/// Validates a capability and returns what it asks for.
pub(crate) fn parse(cap: &VolumeCapability) -> Result<Access, String> {
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .ok_or("volume capability has no access mode")?;
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => {}
        Mode::Unknown => return Err("volume capability has an unknown access mode".into()),
        other => {
            return Err(format!(
                "access mode {} is not supported: a Trireme volume is attached to one node at a time",
                other.as_str_name()
            ));
        }
    }
    match &cap.access_type {
        Some(AccessType::Block(_)) => Ok(Access::Block),
        Some(AccessType::Mount(m)) => {
            let fs = m.fs_type.trim();
            if !fs.is_empty() && !FS_TYPES.contains(&fs) {
                return Err(format!("file system {fs:?} is not supported (ext4 or xfs)"));
            }
            Ok(Access::Mount {
                fs_type: (!fs.is_empty()).then(|| fs.to_owned()),
                flags: m.mount_flags.clone(),
            })
        }
        None => Err("volume capability has neither block nor mount access type".into()),
    }
}

/// Validates a required capability field of a node request: a missing one is
/// INVALID_ARGUMENT, one the volume cannot serve FAILED_PRECONDITION ("exceeds capabilities").
pub(crate) fn require_on_node(cap: Option<&VolumeCapability>) -> Result<Access, Status> {
    let cap = cap.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    parse(cap).map_err(Status::failed_precondition)
}

/// Validates a required capability field of a controller request.
pub(crate) fn require(cap: Option<&VolumeCapability>) -> Result<Access, Status> {
    let cap = cap.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    parse(cap).map_err(Status::invalid_argument)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(mode: Mode, access: Option<AccessType>) -> VolumeCapability {
        VolumeCapability {
            access_type: access,
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn modes_and_types() {
        let mount = |fs: &str| {
            Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            }))
        };
        assert_eq!(
            parse(&cap(Mode::SingleNodeWriter, Some(AccessType::Block(BlockVolume {})))),
            Ok(Access::Block)
        );
        assert!(parse(&cap(Mode::SingleNodeWriter, mount("xfs"))).is_ok());
        assert!(parse(&cap(Mode::SingleNodeWriter, mount(""))).is_ok());
        assert!(parse(&cap(Mode::SingleNodeWriter, mount("btrfs"))).is_err());
        assert!(parse(&cap(Mode::MultiNodeMultiWriter, mount("ext4"))).is_err());
        assert!(parse(&cap(Mode::SingleNodeWriter, None)).is_err());
        assert!(
            parse(&VolumeCapability { access_type: mount("ext4"), access_mode: None }).is_err()
        );
    }
}
