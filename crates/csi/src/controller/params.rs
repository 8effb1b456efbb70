//! Translating CSI requests into Trireme terms: sizes, StorageClass parameters, names.

use std::collections::HashMap;

use sha2::{Digest as _, Sha256};
use tonic::Status;
use trireme_api::Volume;
use trireme_types::{ByteSize, Name, VolumeState};

use crate::caps::{DEFAULT_FS_TYPE, FS_TYPES};
use crate::proto::{self, CapacityRange, VolumeCondition};

/// Volumes are sized in whole MiB (the pool's allocation granule divides it).
pub(crate) const SIZE_UNIT: u64 = ByteSize::MIB;
/// The size of a volume created without a capacity range.
pub(crate) const DEFAULT_SIZE: u64 = ByteSize::GIB;
/// Replicas of a volume whose StorageClass does not say.
pub(crate) const DEFAULT_REPLICAS: u8 = 1;

/// The topology key: a volume is accessible from the nodes holding its replicas, because
/// control runs a volume's nexus on one of them, and the CSI node is the nexus's node.
pub(crate) const TOPOLOGY_KEY: &str = "topology.csi.trireme.io/node";

/// volume_context keys (what the node plugin and ValidateVolumeCapabilities read back).
pub(crate) const CTX_FS_TYPE: &str = "fsType";
pub(crate) const CTX_REPLICAS: &str = "replicas";
pub(crate) const CTX_THIN: &str = "thin";
pub(crate) const CTX_POOL_SELECTOR: &str = "poolSelector";
pub(crate) const CTX_NAME: &str = "name";

/// The size to create for a capacity range: the required size rounded up to [`SIZE_UNIT`],
/// within the limit. `Err` is the OUT_OF_RANGE message.
pub(crate) fn size_for(range: Option<&CapacityRange>) -> Result<ByteSize, String> {
    let (required, limit) = range.map(|r| (r.required_bytes, r.limit_bytes)).unwrap_or((0, 0));
    if required < 0 || limit < 0 {
        return Err(format!("capacity range {required}..{limit} has a negative bound"));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && required > limit {
        return Err(format!("required_bytes {required} exceeds limit_bytes {limit}"));
    }
    let size = if required == 0 {
        // No minimum: the default size, shrunk to the limit if there is one.
        match limit {
            0 => DEFAULT_SIZE,
            l => DEFAULT_SIZE.min(l / SIZE_UNIT * SIZE_UNIT),
        }
    } else {
        required.div_ceil(SIZE_UNIT).checked_mul(SIZE_UNIT).ok_or("required_bytes is too large")?
    };
    if size == 0 || (limit != 0 && size > limit) {
        return Err(format!(
            "no size in whole MiB fits the capacity range {required}..{limit} bytes"
        ));
    }
    Ok(ByteSize::b(size))
}

/// Whether an existing volume of `size` satisfies a capacity range.
pub(crate) fn fits(size: ByteSize, range: Option<&CapacityRange>) -> bool {
    let Some(r) = range else { return true };
    let s = size.bytes() as i128;
    s >= i128::from(r.required_bytes) && (r.limit_bytes == 0 || s <= i128::from(r.limit_bytes))
}

/// The StorageClass parameters Trireme understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Params {
    pub replicas: u8,
    pub thin: bool,
    pub fs_type: String,
    /// Comma-separated pool names the volume's replicas may use.
    pub pool_selector: Vec<String>,
}

impl Params {
    pub(crate) fn parse(map: &HashMap<String, String>) -> Result<Self, Status> {
        let mut p = Params {
            replicas: DEFAULT_REPLICAS,
            thin: false,
            fs_type: DEFAULT_FS_TYPE.to_owned(),
            pool_selector: Vec::new(),
        };
        for (key, value) in map {
            let value = value.trim();
            match key.as_str() {
                "replicas" => {
                    p.replicas = value.parse().ok().filter(|r| *r >= 1).ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "parameter replicas={value:?} is not a count from 1 to 255"
                        ))
                    })?
                }
                "thin" => {
                    p.thin = value.parse().map_err(|_| {
                        Status::invalid_argument(format!(
                            "parameter thin={value:?} is not true or false"
                        ))
                    })?
                }
                "fsType" | "csi.storage.k8s.io/fstype" => {
                    if !FS_TYPES.contains(&value) {
                        return Err(Status::invalid_argument(format!(
                            "parameter fsType={value:?} is not supported (ext4 or xfs)"
                        )));
                    }
                    p.fs_type = value.to_owned();
                }
                "poolSelector" => {
                    p.pool_selector = value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                }
                // The external-provisioner's own keys (PVC name and namespace, secrets).
                k if k.starts_with("csi.storage.k8s.io/") => {}
                other => {
                    return Err(Status::invalid_argument(format!(
                        "unknown parameter {other:?} (known: replicas, thin, fsType, poolSelector)"
                    )));
                }
            }
        }
        Ok(p)
    }

    pub(crate) fn context(&self, name: &Name) -> HashMap<String, String> {
        let mut ctx = HashMap::from([
            (CTX_FS_TYPE.to_owned(), self.fs_type.clone()),
            (CTX_REPLICAS.to_owned(), self.replicas.to_string()),
            (CTX_THIN.to_owned(), self.thin.to_string()),
            (CTX_NAME.to_owned(), name.to_string()),
        ]);
        if !self.pool_selector.is_empty() {
            ctx.insert(CTX_POOL_SELECTOR.to_owned(), self.pool_selector.join(","));
        }
        ctx
    }
}

/// The Trireme name for a CSI volume name. Kubernetes names (`pvc-<uuid>`) are valid Trireme
/// names and are kept; anything else maps to a stable digest so retries find the same volume.
pub(crate) fn trireme_name(csi_name: &str) -> Result<Name, Status> {
    if let Ok(name) = Name::new(csi_name) {
        return Ok(name);
    }
    let digest = Sha256::digest(csi_name.as_bytes());
    Name::new(format!("csi-{}", hex::encode(&digest[..16])))
        .map_err(|e| Status::invalid_argument(format!("volume name {csi_name:?}: {e}")))
}

/// The CSI view of a Trireme volume. The context is rebuilt from what control stores.
pub(crate) fn csi_volume(v: &Volume, fs_type: Option<&str>) -> proto::Volume {
    let mut ctx = HashMap::from([
        (CTX_REPLICAS.to_owned(), v.spec.replicas.to_string()),
        (CTX_THIN.to_owned(), v.spec.thin.to_string()),
        (CTX_NAME.to_owned(), v.name.to_string()),
    ]);
    if let Some(fs) = fs_type {
        ctx.insert(CTX_FS_TYPE.to_owned(), fs.to_owned());
    }
    proto::Volume {
        capacity_bytes: i64::try_from(v.spec.size.bytes()).unwrap_or(i64::MAX),
        volume_id: v.id.to_string(),
        volume_context: ctx,
        content_source: None,
        accessible_topology: topology(v),
    }
}

/// The nodes a volume can be published on, one topology segment each.
pub(crate) fn topology(v: &Volume) -> Vec<proto::Topology> {
    let mut nodes: Vec<&str> = v.status.replicas.iter().map(|r| r.node.as_str()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes
        .into_iter()
        .map(|n| proto::Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), n.to_owned())]),
        })
        .collect()
}

/// The nodes a volume is published to, as CSI node ids.
pub(crate) fn published_nodes(v: &Volume) -> Vec<String> {
    v.spec.publish.iter().map(ToString::to_string).collect()
}

/// A volume's condition: abnormal when it has lost redundancy or its data is unreachable.
pub(crate) fn condition(v: &Volume) -> VolumeCondition {
    let published = v.spec.publish.is_some();
    let (abnormal, message) = match v.status.state {
        VolumeState::Online => (false, "online".to_owned()),
        VolumeState::Degraded => (true, "degraded: not every replica is online".to_owned()),
        VolumeState::Faulted => (true, "faulted: no replica is online, I/O fails".to_owned()),
        VolumeState::Unknown if published => {
            (true, "unknown: the node of the volume's nexus is unreachable".to_owned())
        }
        VolumeState::Unknown => (false, "not published".to_owned()),
    };
    VolumeCondition { abnormal, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> Option<CapacityRange> {
        Some(CapacityRange { required_bytes: required, limit_bytes: limit })
    }

    #[test]
    fn sizes_round_up_to_mib_within_the_limit() {
        const M: u64 = SIZE_UNIT;
        assert_eq!(size_for(None).unwrap().bytes(), DEFAULT_SIZE);
        assert_eq!(size_for(range(1, 0).as_ref()).unwrap().bytes(), M);
        assert_eq!(size_for(range(M as i64 + 1, 0).as_ref()).unwrap().bytes(), 2 * M);
        assert_eq!(size_for(range(0, 10 * M as i64).as_ref()).unwrap().bytes(), 10 * M);
        assert_eq!(size_for(range(M as i64, M as i64).as_ref()).unwrap().bytes(), M);
        assert!(size_for(range(M as i64 + 1, M as i64 + 100).as_ref()).is_err());
        assert!(size_for(range(0, 1000).as_ref()).is_err());
        assert!(size_for(range(5, 4).as_ref()).is_err());
        assert!(size_for(range(-1, 0).as_ref()).is_err());
        assert!(fits(ByteSize::b(2 * M), range(M as i64, 0).as_ref()));
        assert!(!fits(ByteSize::b(2 * M), range(M as i64, M as i64).as_ref()));
    }

    #[test]
    fn parameters() {
        let m = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let p = Params::parse(&m(&[
            ("replicas", "3"),
            ("thin", "true"),
            ("fsType", "xfs"),
            ("poolSelector", "a, b"),
        ]))
        .unwrap();
        assert_eq!((p.replicas, p.thin, p.fs_type.as_str()), (3, true, "xfs"));
        assert_eq!(p.pool_selector, ["a", "b"]);
        assert!(Params::parse(&m(&[("replicas", "0")])).is_err());
        assert!(Params::parse(&m(&[("fsType", "ntfs")])).is_err());
        assert!(Params::parse(&m(&[("colour", "red")])).is_err());
        assert!(Params::parse(&m(&[("csi.storage.k8s.io/pvc/name", "x")])).is_ok());
    }

    #[test]
    fn names() {
        assert_eq!(trireme_name("pvc-1234").unwrap().as_str(), "pvc-1234");
        let odd = trireme_name("Weird Name/1").unwrap();
        assert!(odd.as_str().starts_with("csi-"));
        assert_eq!(odd, trireme_name("Weird Name/1").unwrap());
        assert_ne!(odd, trireme_name("Weird Name/2").unwrap());
    }
}
