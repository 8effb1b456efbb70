//! The `Engine` gRPC service control calls: validates each request into typed arguments, calls
//! [`Engine`](crate::engine::Engine), and converts the answer. Errors become status codes in
//! one place, [`to_status`].

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use tonic::{Code, Request, Response, Status};
use trireme_pool::{PoolError, PoolInfo, ReplicaInfo};
use trireme_rpc as rpc;
use trireme_types::{ByteSize, ChildState, IdError, NexusState, PoolId, ReplicaId, VolumeId};

use crate::engine::{ChildRequest, Engine, NexusRequest};
use crate::error::EngineError;
use crate::nexus::recorder::RecordError;
use crate::nexus::remote::remote_replica;
use crate::nexus::{ChildUri, DirtyLog, Join, Nexus, NexusError};
use crate::pools::{PoolStatus, PoolView};

/// Sizes of replicas and nexuses are whole 512-byte sectors.
const SECTOR: u64 = 512;
const DEFAULT_CLUSTER_SIZE: ByteSize = ByteSize::mib(1);

/// The one mapping from engine errors to gRPC status codes.
pub fn to_status(e: EngineError) -> Status {
    use EngineError as E;
    let code = match &e {
        E::InvalidArgument { .. } | E::ChildUri(_) | E::RemoteUri(_) => Code::InvalidArgument,
        E::PoolNotFound(_) | E::ReplicaNotFound(_) | E::NexusNotFound(_) => Code::NotFound,
        E::PoolExists { .. }
        | E::DiskInUse { .. }
        | E::DiskHoldsOtherPool { .. }
        | E::ReplicaInOtherPool { .. }
        | E::NexusMismatch(_) => Code::AlreadyExists,
        E::DiskMissing { .. }
        | E::PoolNotEmpty { .. }
        | E::PoolFaulted { .. }
        | E::ReplicaInUse { .. }
        | E::Fenced { .. }
        | E::EpochMismatch { .. } => Code::FailedPrecondition,
        // The store could not be reached: worth retrying, unlike the other nexus refusals.
        E::Nexus(NexusError::Record(RecordError::Unavailable(_)) | NexusError::Closed) => {
            Code::Unavailable
        }
        E::Nexus(_) => Code::FailedPrecondition,
        E::ChildUnavailable { .. } | E::ReplicaMeta { .. } | E::ReplicaCreating { .. } => {
            Code::Unavailable
        }
        E::PoolBusy(_) => Code::Aborted,
        E::WipeUnsupported => Code::Unimplemented,
        E::StateFile { .. } | E::PoolTask { .. } => Code::Internal,
        E::Pool { source, .. } => match source {
            PoolError::NotFound(_) | PoolError::SnapshotNotFound(_) | PoolError::Destroyed(_) => {
                Code::NotFound
            }
            PoolError::AlreadyExists { .. } | PoolError::AlreadyFormatted { .. } => {
                Code::AlreadyExists
            }
            PoolError::NoSpace { .. } | PoolError::MetadataFull { .. } => Code::ResourceExhausted,
            PoolError::InvalidArgument(_) | PoolError::OutOfRange { .. } => Code::InvalidArgument,
            PoolError::ShrinkRefused { .. }
            | PoolError::Corrupt { .. }
            | PoolError::Truncated { .. }
            | PoolError::BadSuperblock { .. }
            | PoolError::NotBlank { .. }
            | PoolError::UnsupportedVersion { .. } => Code::FailedPrecondition,
            PoolError::Closed | PoolError::Failed => Code::Unavailable,
            PoolError::Abandoned => Code::Cancelled,
            _ => Code::Internal,
        },
    };
    if code == Code::Internal {
        tracing::error!(error = %e, "internal error");
    }
    Status::new(code, e.to_string())
}

// ---- input validation

fn parse_id<T: FromStr<Err = IdError>>(field: &'static str, s: &str) -> Result<T, EngineError> {
    s.parse().map_err(|e: IdError| EngineError::invalid(field, e.to_string()))
}

fn parse_size(field: &'static str, bytes: u64) -> Result<ByteSize, EngineError> {
    if bytes == 0 {
        return Err(EngineError::invalid(field, "must be greater than zero"));
    }
    if !bytes.is_multiple_of(SECTOR) {
        return Err(EngineError::invalid(field, format!("{bytes} is not a multiple of {SECTOR}")));
    }
    Ok(ByteSize::b(bytes))
}

/// `/path` or `file:///path`; absolute, since the engine's working directory means nothing
/// to control.
fn parse_disk(disk: &str) -> Result<PathBuf, EngineError> {
    let path = disk.strip_prefix("file://").unwrap_or(disk);
    if path.is_empty() {
        return Err(EngineError::invalid("disk", "must not be empty"));
    }
    if disk.contains("://") && !disk.starts_with("file://") {
        return Err(EngineError::invalid("disk", format!("{disk:?}: only file:// URIs and paths")));
    }
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(EngineError::invalid("disk", format!("{disk:?} is not an absolute path")));
    }
    Ok(path)
}

fn parse_cluster_size(bytes: u64) -> Result<ByteSize, EngineError> {
    match bytes {
        0 => Ok(DEFAULT_CLUSTER_SIZE),
        b if b.is_power_of_two() => Ok(ByteSize::b(b)),
        b => Err(EngineError::invalid("cluster_size", format!("{b} is not a power of two"))),
    }
}

fn parse_join(field: &'static str, join: i32) -> Result<Join, EngineError> {
    match rpc::ChildJoin::try_from(join) {
        Ok(rpc::ChildJoin::Online) => Ok(Join::Online),
        Ok(rpc::ChildJoin::Partial) => Ok(Join::Partial),
        Ok(rpc::ChildJoin::Full) => Ok(Join::Full),
        Err(_) => Err(EngineError::invalid(field, format!("unknown join {join}"))),
    }
}

fn parse_child(spec: &rpc::ChildSpec) -> Result<ChildRequest, EngineError> {
    let replica: Option<ReplicaId> = match spec.replica_uuid.as_str() {
        "" => None,
        s => Some(parse_id("children.replica_uuid", s)?),
    };
    let uri = match (spec.uri.as_str(), replica) {
        ("", None) => {
            return Err(EngineError::invalid("children", "a child needs a uri or a replica_uuid"));
        }
        ("", Some(id)) => ChildUri::Local(id),
        (s, _) => s.parse()?,
    };
    let in_uri = match &uri {
        ChildUri::Local(id) => *id,
        remote => remote_replica(remote)?,
    };
    if let Some(id) = replica
        && in_uri != id
    {
        return Err(EngineError::invalid(
            "children",
            format!("uri {uri} names another replica than {id}"),
        ));
    }
    Ok(ChildRequest { uri, join: parse_join("children.join", spec.join)? })
}

fn parse_dirty(dirty: Option<&rpc::DirtyLog>) -> Result<DirtyLog, EngineError> {
    let Some(d) = dirty else { return Ok(DirtyLog::default()) };
    if d.region_bytes != 0 && (!d.region_bytes.is_power_of_two() || d.region_bytes < SECTOR) {
        return Err(EngineError::invalid(
            "dirty.region_bytes",
            format!("{} is not a power of two of at least {SECTOR}", d.region_bytes),
        ));
    }
    if d.region_bytes == 0 && d.bitmap.iter().any(|&b| b != 0) {
        return Err(EngineError::invalid("dirty", "regions without a region size"));
    }
    Ok(DirtyLog::from_bytes(d.region_bytes, d.bitmap.clone()))
}

// ---- conversions to the wire

fn pool_reply(view: PoolView) -> rpc::Pool {
    let mut p = rpc::Pool {
        name: view.name.to_string(),
        disk: view.disk.display().to_string(),
        ..Default::default()
    };
    match view.status {
        PoolStatus::Online(info) => {
            fill_pool(&mut p, &info);
            p.state = rpc::PoolState::Online as i32;
        }
        PoolStatus::Faulted { error } => {
            p.state = rpc::PoolState::Faulted as i32;
            p.error = error;
        }
        PoolStatus::Busy => {
            p.state = rpc::PoolState::Degraded as i32;
            p.error = "an operation on the pool is in progress".to_owned();
        }
    }
    p
}

fn fill_pool(p: &mut rpc::Pool, info: &PoolInfo) {
    p.uuid = info.uuid.to_string();
    p.capacity_bytes = info.capacity.bytes();
    p.used_bytes = info.used.bytes();
    p.cluster_size = info.cluster_size.bytes();
    p.replica_count = u32::try_from(info.replica_count).unwrap_or(u32::MAX);
}

fn replica_reply(pool: &PoolId, r: &ReplicaInfo) -> rpc::Replica {
    rpc::Replica {
        uuid: r.id.to_string(),
        pool: pool.to_string(),
        size_bytes: r.size.bytes(),
        thin: r.thin,
        allocated_bytes: r.allocated.bytes(),
        volume_uuid: r.meta.volume.map(|v| v.to_string()).unwrap_or_default(),
        generation: r.meta.generation,
        epoch: r.meta.epoch,
    }
}

fn join_reply(join: Join) -> i32 {
    let wire = match join {
        Join::Online => rpc::ChildJoin::Online,
        Join::Partial => rpc::ChildJoin::Partial,
        Join::Full => rpc::ChildJoin::Full,
    };
    wire as i32
}

fn nexus_reply(engine: &Engine, n: &Nexus) -> rpc::Nexus {
    use trireme_nbd::Export;
    let children = n
        .children()
        .into_iter()
        .map(|c| {
            let mut child = rpc::Child {
                uri: c.uri.to_string(),
                replica_uuid: c.replica.to_string(),
                rebuild_kind: c.needs.map_or(rpc::ChildJoin::Online as i32, join_reply),
                ..Default::default()
            };
            if let Some(last) = c.last_rebuild {
                child.last_rebuild_copied_bytes = last.copied_bytes;
                child.last_rebuild_millis = last.millis;
                child.last_rebuild_kind = join_reply(last.kind);
            }
            child.state = match c.state {
                ChildState::Online => rpc::ChildState::Online as i32,
                ChildState::Faulted { reason } => {
                    child.fault_reason = reason.to_string();
                    rpc::ChildState::Faulted as i32
                }
                ChildState::Rebuilding { done_bytes, total_bytes } => {
                    child.rebuild_done_bytes = done_bytes;
                    child.rebuild_total_bytes = total_bytes;
                    rpc::ChildState::Rebuilding as i32
                }
            };
            child
        })
        .collect();
    rpc::Nexus {
        volume_uuid: n.volume().to_string(),
        size_bytes: n.size(),
        children,
        state: match n.state() {
            NexusState::Online => rpc::NexusState::Online,
            NexusState::Degraded => rpc::NexusState::Degraded,
            NexusState::Faulted => rpc::NexusState::Faulted,
        } as i32,
        share_uri: engine.share_uri(n.volume()),
        epoch: n.epoch(),
        generation: n.generation(),
        stopped_reason: n.stopped_reason().unwrap_or_default(),
    }
}

/// The gRPC face of an [`Engine`].
pub struct EngineService {
    engine: Arc<Engine>,
}

impl EngineService {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    pub fn into_server(self) -> rpc::engine_server::EngineServer<Self> {
        rpc::engine_server::EngineServer::new(self)
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl rpc::engine_server::Engine for EngineService {
    async fn get_node(&self, _: Request<rpc::GetNodeRequest>) -> Reply<rpc::NodeInfo> {
        let e = &self.engine;
        Ok(Response::new(rpc::NodeInfo {
            node_id: e.node_id().to_string(),
            grpc_endpoint: e.endpoints().grpc.clone(),
            nbd_endpoint: e.endpoints().nbd.clone(),
            version: crate::VERSION.to_owned(),
        }))
    }

    async fn create_pool(&self, req: Request<rpc::CreatePoolRequest>) -> Reply<rpc::Pool> {
        let req = req.into_inner();
        let run = async {
            let name: PoolId = parse_id("name", &req.name)?;
            let disk = parse_disk(&req.disk)?;
            let size = match req.size_bytes {
                0 => None,
                b => Some(parse_size("size_bytes", b)?),
            };
            let cluster = parse_cluster_size(req.cluster_size)?;
            let info = self.engine.create_pool(&name, &disk, size, cluster).await?;
            let mut p = rpc::Pool {
                name: name.to_string(),
                disk: disk.display().to_string(),
                state: rpc::PoolState::Online as i32,
                ..Default::default()
            };
            fill_pool(&mut p, &info);
            Ok(p)
        };
        run.await.map(Response::new).map_err(to_status)
    }

    async fn destroy_pool(&self, req: Request<rpc::DestroyPoolRequest>) -> Reply<rpc::Empty> {
        let req = req.into_inner();
        let run = async {
            let name: PoolId = parse_id("name", &req.name)?;
            if req.wipe {
                return Err(EngineError::WipeUnsupported);
            }
            self.engine.destroy_pool(&name).await?;
            Ok(rpc::Empty {})
        };
        run.await.map(Response::new).map_err(to_status)
    }

    async fn list_pools(&self, _: Request<rpc::ListPoolsRequest>) -> Reply<rpc::ListPoolsReply> {
        let pools = self.engine.list_pools().into_iter().map(pool_reply).collect();
        Ok(Response::new(rpc::ListPoolsReply { pools }))
    }

    async fn create_replica(&self, req: Request<rpc::CreateReplicaRequest>) -> Reply<rpc::Replica> {
        let req = req.into_inner();
        let run = async {
            let id = parse_id("uuid", &req.uuid)?;
            let pool: PoolId = parse_id("pool", &req.pool)?;
            let size = parse_size("size_bytes", req.size_bytes)?;
            let volume: Option<VolumeId> = match req.volume_uuid.as_str() {
                "" => None,
                s => Some(parse_id("volume_uuid", s)?),
            };
            let info = self.engine.create_replica(id, &pool, size, req.thin, volume).await?;
            Ok(replica_reply(&pool, &info))
        };
        run.await.map(Response::new).map_err(to_status)
    }

    async fn destroy_replica(&self, req: Request<rpc::DestroyReplicaRequest>) -> Reply<rpc::Empty> {
        let req = req.into_inner();
        let run = async {
            let id = parse_id("uuid", &req.uuid)?;
            self.engine.destroy_replica(id).await?;
            Ok(rpc::Empty {})
        };
        run.await.map(Response::new).map_err(to_status)
    }

    async fn resize_replica(&self, req: Request<rpc::ResizeReplicaRequest>) -> Reply<rpc::Replica> {
        let req = req.into_inner();
        let run = async {
            let id = parse_id("uuid", &req.uuid)?;
            let size = parse_size("size_bytes", req.size_bytes)?;
            let (pool, info) = self.engine.resize_replica(id, size).await?;
            Ok(replica_reply(&pool, &info))
        };
        run.await.map(Response::new).map_err(to_status)
    }

    async fn list_replicas(
        &self,
        _: Request<rpc::ListReplicasRequest>,
    ) -> Reply<rpc::ListReplicasReply> {
        let replicas =
            self.engine.list_replicas().iter().map(|(pool, r)| replica_reply(pool, r)).collect();
        Ok(Response::new(rpc::ListReplicasReply { replicas }))
    }

    async fn create_nexus(&self, req: Request<rpc::CreateNexusRequest>) -> Reply<rpc::Nexus> {
        let req = req.into_inner();
        let run = async {
            let volume = parse_id("volume_uuid", &req.volume_uuid)?;
            let size = parse_size("size_bytes", req.size_bytes)?;
            if req.children.is_empty() {
                return Err(EngineError::invalid("children", "a nexus needs at least one child"));
            }
            let children = req.children.iter().map(parse_child).collect::<Result<Vec<_>, _>>()?;
            let nexus = self
                .engine
                .create_nexus(NexusRequest {
                    volume,
                    size,
                    children,
                    epoch: req.epoch,
                    generation: req.generation,
                    dirty: parse_dirty(req.dirty.as_ref())?,
                })
                .await?;
            Ok(nexus_reply(&self.engine, &nexus))
        };
        run.await.map(Response::new).map_err(to_status)
    }

    async fn destroy_nexus(&self, req: Request<rpc::DestroyNexusRequest>) -> Reply<rpc::Empty> {
        let req = req.into_inner();
        let run = async {
            let volume = parse_id("volume_uuid", &req.volume_uuid)?;
            self.engine.destroy_nexus(volume).await?;
            Ok(rpc::Empty {})
        };
        run.await.map(Response::new).map_err(to_status)
    }

    async fn resize_nexus(&self, req: Request<rpc::ResizeNexusRequest>) -> Reply<rpc::Nexus> {
        let req = req.into_inner();
        let run = async {
            let volume = parse_id("volume_uuid", &req.volume_uuid)?;
            let size = parse_size("size_bytes", req.size_bytes)?;
            let nexus = self.engine.resize_nexus(volume, size).await?;
            Ok(nexus_reply(&self.engine, &nexus))
        };
        run.await.map(Response::new).map_err(to_status)
    }

    async fn list_nexuses(
        &self,
        _: Request<rpc::ListNexusesRequest>,
    ) -> Reply<rpc::ListNexusesReply> {
        let nexuses =
            self.engine.list_nexuses().iter().map(|n| nexus_reply(&self.engine, n)).collect();
        Ok(Response::new(rpc::ListNexusesReply { nexuses }))
    }

    async fn add_child(&self, req: Request<rpc::AddChildRequest>) -> Reply<rpc::Nexus> {
        let req = req.into_inner();
        let run = async {
            let volume = parse_id("volume_uuid", &req.volume_uuid)?;
            let spec =
                req.child.as_ref().ok_or_else(|| EngineError::invalid("child", "missing"))?;
            let child = parse_child(spec)?;
            let nexus = self.engine.add_child(volume, req.epoch, child).await?;
            Ok(nexus_reply(&self.engine, &nexus))
        };
        run.await.map(Response::new).map_err(to_status)
    }

    async fn remove_child(&self, req: Request<rpc::RemoveChildRequest>) -> Reply<rpc::Nexus> {
        let req = req.into_inner();
        let run = async {
            let volume = parse_id("volume_uuid", &req.volume_uuid)?;
            let replica = parse_id("replica_uuid", &req.replica_uuid)?;
            let nexus = self.engine.remove_child(volume, req.epoch, replica).await?;
            Ok(nexus_reply(&self.engine, &nexus))
        };
        run.await.map(Response::new).map_err(to_status)
    }

    async fn set_replica_generation(
        &self,
        req: Request<rpc::SetReplicaGenerationRequest>,
    ) -> Reply<rpc::Replica> {
        let req = req.into_inner();
        let run = async {
            let id = parse_id("uuid", &req.uuid)?;
            let (pool, info) = self.engine.set_replica_generation(id, req.generation).await?;
            Ok(replica_reply(&pool, &info))
        };
        run.await.map(Response::new).map_err(to_status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_validated() {
        assert!(parse_size("s", 0).is_err());
        assert!(parse_size("s", 513).is_err());
        assert_eq!(parse_size("s", 4096).unwrap(), ByteSize::b(4096));
        assert_eq!(parse_disk("file:///a/b").unwrap(), PathBuf::from("/a/b"));
        assert_eq!(parse_disk("/dev/sdb").unwrap(), PathBuf::from("/dev/sdb"));
        for bad in ["", "rel/path", "file://rel", "http://x/y", "file://"] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_cluster_size(0).unwrap(), DEFAULT_CLUSTER_SIZE);
        assert!(parse_cluster_size(3 << 20).is_err());
        let id = trireme_types::ReplicaId::new_random();
        let spec = |uri: &str, r: &str| rpc::ChildSpec {
            uri: uri.into(),
            replica_uuid: r.into(),
            ..Default::default()
        };
        let local = ChildRequest { uri: ChildUri::Local(id), join: Join::Online };
        assert_eq!(parse_child(&spec("", &id.to_string())).unwrap(), local);
        assert_eq!(parse_child(&spec(&format!("replica:///{id}"), "")).unwrap(), local);
        let other = trireme_types::ReplicaId::new_random().to_string();
        assert!(parse_child(&spec(&format!("replica:///{id}"), &other)).is_err());
        assert!(parse_child(&spec("", "")).is_err());
        assert!(parse_child(&spec("bogus", "")).is_err());
        // Remote children name a replica share, without an epoch (the engine adds it).
        let remote = format!("nbd://10.0.0.2:10809/replica-{id}");
        let parsed = parse_child(&rpc::ChildSpec {
            uri: remote.clone(),
            replica_uuid: id.to_string(),
            join: rpc::ChildJoin::Full as i32,
        })
        .unwrap();
        assert_eq!((parsed.uri.to_string(), parsed.join), (remote.clone(), Join::Full));
        assert!(parse_child(&spec(&remote, &other)).is_err());
        assert!(parse_child(&spec(&format!("{remote}@3"), "")).is_err());
        assert!(parse_child(&spec("nbd://10.0.0.2:10809/volume", "")).is_err());
        let mut bad_join = spec(&remote, "");
        bad_join.join = 9;
        assert!(parse_child(&bad_join).is_err());
        // Dirty-region logs.
        assert_eq!(parse_dirty(None).unwrap(), DirtyLog::default());
        let dirty =
            |region_bytes, bitmap: &[u8]| rpc::DirtyLog { region_bytes, bitmap: bitmap.to_vec() };
        assert_eq!(
            parse_dirty(Some(&dirty(1 << 20, &[0b101]))).unwrap(),
            DirtyLog::from_bytes(1 << 20, vec![0b101])
        );
        assert!(parse_dirty(Some(&dirty(3 << 20, &[1]))).is_err());
        assert!(parse_dirty(Some(&dirty(0, &[1]))).is_err());
    }

    #[test]
    fn errors_map_to_codes() {
        let pool = PoolId::new("p").unwrap();
        let id = trireme_types::ReplicaId::new_random();
        let cases = [
            (EngineError::invalid("x", "y"), Code::InvalidArgument),
            (EngineError::PoolNotFound(pool.clone()), Code::NotFound),
            (EngineError::ReplicaNotFound(id), Code::NotFound),
            (
                EngineError::PoolNotEmpty { pool: pool.clone(), replicas: 1 },
                Code::FailedPrecondition,
            ),
            (
                EngineError::pool(
                    &pool,
                    PoolError::NoSpace { needed: ByteSize::b(1), free: ByteSize::b(0) },
                ),
                Code::ResourceExhausted,
            ),
            (
                EngineError::pool(&pool, PoolError::AlreadyExists { what: "replica".into() }),
                Code::AlreadyExists,
            ),
            (EngineError::pool(&pool, PoolError::Closed), Code::Unavailable),
            (
                EngineError::Fenced { uri: "u".into(), epoch: 1, reason: "r".into() },
                Code::FailedPrecondition,
            ),
            (
                EngineError::EpochMismatch {
                    volume: VolumeId::new_random(),
                    nexus: 2,
                    requested: 1,
                },
                Code::FailedPrecondition,
            ),
            (EngineError::Nexus(NexusError::NoCurrentChild), Code::FailedPrecondition),
            (
                EngineError::Nexus(NexusError::Record(RecordError::Unavailable("x".into()))),
                Code::Unavailable,
            ),
            (
                EngineError::ChildUnavailable {
                    uri: "u".into(),
                    error: crate::nexus::ChildError::Timeout,
                },
                Code::Unavailable,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(to_status(e).code(), code);
        }
    }
}
