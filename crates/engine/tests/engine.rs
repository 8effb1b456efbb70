//! The engine in-process, driven like control drives it: a real gRPC client, a fake control
//! `Registry` that records what the engine tells it, and real NBD clients (`nbdcopy`,
//! `nbdinfo`) against the shared volume.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use trireme_engine::{EngineArgs, RunningEngine};
use trireme_rpc as rpc;
use trireme_rpc::engine_client::EngineClient;
use trireme_types::NodeId;

const WAIT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

// ---- a fake control plane

#[derive(Default)]
struct FakeRegistry {
    registrations: Mutex<Vec<rpc::RegisterRequest>>,
    heartbeats: AtomicUsize,
    forget: AtomicBool,
}

struct Svc(Arc<FakeRegistry>);

#[tonic::async_trait]
impl rpc::registry_server::Registry for Svc {
    async fn register(
        &self,
        req: Request<rpc::RegisterRequest>,
    ) -> Result<Response<rpc::RegisterReply>, Status> {
        self.0.registrations.lock().push(req.into_inner());
        self.0.forget.store(false, Ordering::SeqCst);
        Ok(Response::new(rpc::RegisterReply { heartbeat_interval_secs: 1 }))
    }

    async fn heartbeat(
        &self,
        _: Request<rpc::HeartbeatRequest>,
    ) -> Result<Response<rpc::HeartbeatReply>, Status> {
        self.0.heartbeats.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(rpc::HeartbeatReply { known: !self.0.forget.load(Ordering::SeqCst) }))
    }
    async fn record_children(
        &self,
        req: Request<rpc::RecordChildrenRequest>,
    ) -> Result<Response<rpc::RecordChildrenReply>, Status> {
        let _ = req;
        Ok(Response::new(rpc::RecordChildrenReply { generation: 1 }))
    }

    async fn mark_dirty(
        &self,
        _: Request<rpc::MarkDirtyRequest>,
    ) -> Result<Response<rpc::Empty>, Status> {
        Ok(Response::new(rpc::Empty {}))
    }
}

async fn start_registry() -> (Arc<FakeRegistry>, SocketAddr, CancellationToken) {
    start_registry_on("127.0.0.1:0".parse().unwrap()).await
}

async fn start_registry_on(addr: SocketAddr) -> (Arc<FakeRegistry>, SocketAddr, CancellationToken) {
    let registry = Arc::new(FakeRegistry::default());
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let svc = rpc::registry_server::RegistryServer::new(Svc(Arc::clone(&registry)));
    let stop = token.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stop.cancelled_owned(),
            )
            .await
            .unwrap();
    });
    (registry, addr, token)
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- helpers

struct Started {
    running: RunningEngine,
    token: CancellationToken,
    client: EngineClient<Channel>,
}

async fn start_engine(state_dir: &Path, control: Option<SocketAddr>) -> Started {
    let mut args = EngineArgs::local(NodeId::new("node-1").unwrap(), state_dir.to_owned());
    args.control = control.map(|a| format!("http://{a}"));
    args.heartbeat_secs = 1;
    args.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let token = CancellationToken::new();
    let running = trireme_engine::start(args, token.clone()).await.unwrap();
    let client = EngineClient::connect(format!("http://{}", running.grpc_addr())).await.unwrap();
    Started { running, token, client }
}

async fn stop_engine(s: Started) {
    s.token.cancel();
    tokio::time::timeout(WAIT, s.running.wait()).await.expect("engine stops in time").unwrap();
}

async fn tool(program: &str, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(program).args(args).kill_on_drop(true).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} timed out"))
    .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out)).await.unwrap().unwrap();
    assert!(out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the sample whose line starts with `prefix` (metric name and labels).
fn sample(metrics: &str, prefix: &str) -> f64 {
    let line = metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {metrics}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// `(offset, length, hole)` runs of the export's `base:allocation` map, from `nbdinfo --map`.
async fn allocation_map(uri: &str) -> Vec<(u64, u64, bool)> {
    let out = tool("nbdinfo", &["--map", uri]).await;
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags: u32 = f[2].parse().unwrap();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), flags & 1 == 1)
        })
        .collect()
}

fn code<T: std::fmt::Debug>(r: Result<Response<T>, Status>) -> Code {
    r.expect_err("expected an error status").code()
}

fn random_bytes(len: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

fn create_pool_req(name: &str, disk: &Path, size: u64) -> rpc::CreatePoolRequest {
    rpc::CreatePoolRequest {
        name: name.into(),
        disk: disk.display().to_string(),
        size_bytes: size,
        cluster_size: 0,
    }
}

fn nexus_req(volume: &str, size: u64, replica: &str) -> rpc::CreateNexusRequest {
    rpc::CreateNexusRequest {
        volume_uuid: volume.into(),
        size_bytes: size,
        children: vec![rpc::ChildSpec {
            uri: format!("replica:///{replica}"),
            replica_uuid: replica.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

// ---- the tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_lifecycle_through_grpc_and_nbd_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let disk: PathBuf = dir.path().join("pool-1.img");
    let (registry, control_addr, control_stop) = start_registry().await;

    let mut e = start_engine(&state, Some(control_addr)).await;

    // Registration advertises the actually bound endpoints, then heartbeats follow.
    wait_for("registration", || !registry.registrations.lock().is_empty()).await;
    {
        let reg = registry.registrations.lock()[0].clone();
        assert_eq!(reg.node_id, "node-1");
        assert_eq!(reg.grpc_endpoint, e.running.grpc_addr().to_string());
        assert_eq!(reg.nbd_endpoint, e.running.nbd_addr().to_string());
    }
    wait_for("a heartbeat", || registry.heartbeats.load(Ordering::SeqCst) > 0).await;
    // Control forgetting the node makes the engine register again.
    registry.forget.store(true, Ordering::SeqCst);
    wait_for("re-registration", || registry.registrations.lock().len() >= 2).await;

    // Pool: created, then idempotent.
    let pool = e
        .client
        .create_pool(create_pool_req("pool-1", &disk, 256 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pool.state, rpc::PoolState::Online as i32);
    assert!(pool.capacity_bytes > 0 && pool.capacity_bytes <= 256 * MIB);
    let again = e
        .client
        .create_pool(create_pool_req("pool-1", &disk, 256 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.uuid, pool.uuid);
    assert!(Path::new(&state).join("pools.json").exists());

    // Replica: created, then idempotent.
    let replica_id = uuid::Uuid::new_v4().to_string();
    let volume_id = uuid::Uuid::new_v4().to_string();
    let create_replica = rpc::CreateReplicaRequest {
        uuid: replica_id.clone(),
        pool: "pool-1".into(),
        size_bytes: 32 * MIB,
        thin: true,
        volume_uuid: volume_id.clone(),
    };
    let replica = e.client.create_replica(create_replica.clone()).await.unwrap().into_inner();
    assert_eq!((replica.size_bytes, replica.pool.as_str()), (32 * MIB, "pool-1"));
    assert_eq!(replica.volume_uuid, volume_id);
    e.client.create_replica(create_replica.clone()).await.unwrap();
    let replicas = e.client.list_replicas(rpc::ListReplicasRequest {}).await.unwrap().into_inner();
    assert_eq!(replicas.replicas.len(), 1);

    // Nexus: created and shared, then idempotent.
    let nexus = e
        .client
        .create_nexus(nexus_req(&volume_id, 32 * MIB, &replica_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nexus.state, rpc::NexusState::Online as i32);
    assert_eq!(nexus.children.len(), 1);
    assert_eq!(nexus.children[0].state, rpc::ChildState::Online as i32);
    let uri = format!("nbd://{}/{}", e.running.nbd_addr(), volume_id);
    assert_eq!(nexus.share_uri, uri);
    let again = e
        .client
        .create_nexus(nexus_req(&volume_id, 32 * MIB, &replica_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.share_uri, uri);
    assert_eq!(
        code(e.client.create_nexus(nexus_req(&volume_id, 16 * MIB, &replica_id)).await),
        Code::AlreadyExists
    );
    let other_child = nexus_req(&volume_id, 32 * MIB, &uuid::Uuid::new_v4().to_string());
    assert_eq!(code(e.client.create_nexus(other_child).await), Code::AlreadyExists);

    // Data through NBD with a real client: written data reads back, the rest reads as zeroes.
    let data = random_bytes(4 * MIB as usize);
    let src = dir.path().join("src.bin");
    std::fs::write(&src, &data).unwrap();
    tool("nbdcopy", &[src.to_str().unwrap(), &uri]).await;
    let out = dir.path().join("out.bin");
    tool("nbdcopy", &[&uri, out.to_str().unwrap()]).await;
    let back = std::fs::read(&out).unwrap();
    assert_eq!(back.len() as u64, 32 * MIB);
    assert!(back[..data.len()] == data[..], "data read back differs");
    assert!(back[data.len()..].iter().all(|&b| b == 0), "unwritten region is not zero");

    // Metrics show the pool, the nexus and the NBD traffic.
    let m = scrape(e.running.metrics_addr().unwrap()).await;
    assert_eq!(sample(&m, "trireme_pool_online{pool=\"pool-1\"}"), 1.0);
    assert!(sample(&m, "trireme_pool_capacity_bytes{pool=\"pool-1\"}") > 0.0);
    // The pool's disk saw the volume's data written, and each write has a latency sample.
    let pool_disk = |name: &str, op: &str| {
        sample(&m, &format!("trireme_pool_disk_{name}{{pool=\"pool-1\",op=\"{op}\"}}"))
    };
    assert!(pool_disk("bytes_total", "write") >= data.len() as f64);
    assert!(pool_disk("ops_total", "sync") >= 1.0);
    assert_eq!(pool_disk("latency_seconds_count", "write"), pool_disk("ops_total", "write"));
    assert_eq!(
        sample(&m, &format!("trireme_nexus_state{{volume=\"{volume_id}\",state=\"online\"}}")),
        1.0
    );
    let written = sample(&m, &format!("trireme_nbd_write_bytes_total{{export=\"{volume_id}\"}}"));
    assert!(written >= data.len() as f64, "{written}");
    // Every write is in the latency histogram, and its buckets add up.
    let writes = sample(&m, &format!("trireme_nbd_write_ops_total{{export=\"{volume_id}\"}}"));
    let hist = |suffix: &str, le: &str| {
        let labels = format!("{le}export=\"{volume_id}\",op=\"write\"");
        sample(&m, &format!("trireme_nbd_latency_seconds_{suffix}{{{labels}}}"))
    };
    assert!(writes >= 1.0);
    assert_eq!(hist("count", ""), writes);
    assert_eq!(hist("bucket", "le=\"+Inf\","), writes);
    assert!(hist("bucket", "le=\"0.00005\",") <= hist("bucket", "le=\"10.0\","));
    assert!(hist("sum", "") > 0.0);

    // The replica is shared too, for remote nexuses.
    let replica_uri = format!("nbd://{}/replica-{}", e.running.nbd_addr(), replica_id);
    assert_eq!(tool("nbdinfo", &["--size", &replica_uri]).await.trim(), (32 * MIB).to_string());

    // Guarded operations.
    assert_eq!(
        code(
            e.client.destroy_replica(rpc::DestroyReplicaRequest { uuid: replica_id.clone() }).await
        ),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(
            e.client
                .destroy_pool(rpc::DestroyPoolRequest { name: "pool-1".into(), wipe: false })
                .await
        ),
        Code::FailedPrecondition
    );

    // Resize: the replica grows, then the nexus; a new connection sees the new size.
    let grown = e
        .client
        .resize_replica(rpc::ResizeReplicaRequest {
            uuid: replica_id.clone(),
            size_bytes: 64 * MIB,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.size_bytes, 64 * MIB);
    let resize_nexus =
        rpc::ResizeNexusRequest { volume_uuid: volume_id.clone(), size_bytes: 64 * MIB };
    let n = e.client.resize_nexus(resize_nexus).await.unwrap().into_inner();
    assert_eq!(n.size_bytes, 64 * MIB);
    assert_eq!(tool("nbdinfo", &["--size", &uri]).await.trim(), (64 * MIB).to_string());
    let too_big = rpc::ResizeNexusRequest { volume_uuid: volume_id.clone(), size_bytes: 128 * MIB };
    assert_eq!(code(e.client.resize_nexus(too_big).await), Code::FailedPrecondition);

    // Restart on the same state directory: the pool comes back by itself, with the replica
    // and its data.
    stop_engine(e).await;
    let e2_started = start_engine(&state, None).await;
    let mut e = e2_started;
    let pools = e.client.list_pools(rpc::ListPoolsRequest {}).await.unwrap().into_inner().pools;
    assert_eq!(pools.len(), 1);
    assert_eq!((pools[0].name.as_str(), pools[0].state), ("pool-1", rpc::PoolState::Online as i32));
    assert_eq!(pools[0].uuid, pool.uuid);
    assert_eq!(pools[0].replica_count, 1);
    let replicas =
        e.client.list_replicas(rpc::ListReplicasRequest {}).await.unwrap().into_inner().replicas;
    assert_eq!(replicas.len(), 1);
    assert_eq!(
        (replicas[0].uuid.as_str(), replicas[0].size_bytes),
        (replica_id.as_str(), 64 * MIB)
    );
    assert!(
        e.client
            .list_nexuses(rpc::ListNexusesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nexuses
            .is_empty()
    );
    let nexus = e
        .client
        .create_nexus(nexus_req(&volume_id, 64 * MIB, &replica_id))
        .await
        .unwrap()
        .into_inner();
    let out2 = dir.path().join("out2.bin");
    tool("nbdcopy", &[&nexus.share_uri, out2.to_str().unwrap()]).await;
    let back = std::fs::read(&out2).unwrap();
    assert_eq!(back.len() as u64, 64 * MIB);
    assert!(back[..data.len()] == data[..], "data differs after restart");
    assert!(back[data.len()..].iter().all(|&b| b == 0));

    // Block status through the nexus: the written region is data, the rest a hole.
    let map = allocation_map(&nexus.share_uri).await;
    assert_eq!(map[0], (0, data.len() as u64, false), "{map:?}");
    assert!(map[1..].iter().all(|&(_, _, hole)| hole), "{map:?}");
    // TRIM through the nexus frees whole clusters, which then read as zeroes.
    tool("qemu-io", &["-f", "raw", "-c", "discard 0 1M", &nexus.share_uri]).await;
    let map = allocation_map(&nexus.share_uri).await;
    assert_eq!(map[0], (0, MIB, true), "{map:?}");
    let out3 = dir.path().join("out3.bin");
    tool("nbdcopy", &[&nexus.share_uri, out3.to_str().unwrap()]).await;
    let back = std::fs::read(&out3).unwrap();
    assert!(back[..MIB as usize].iter().all(|&b| b == 0));
    assert!(back[MIB as usize..data.len()] == data[MIB as usize..]);

    // Teardown, every step idempotent.
    let destroy_nexus = rpc::DestroyNexusRequest { volume_uuid: volume_id.clone() };
    e.client.destroy_nexus(destroy_nexus.clone()).await.unwrap();
    e.client.destroy_nexus(destroy_nexus).await.unwrap();
    let destroy_replica = rpc::DestroyReplicaRequest { uuid: replica_id.clone() };
    e.client.destroy_replica(destroy_replica.clone()).await.unwrap();
    e.client.destroy_replica(destroy_replica).await.unwrap();
    assert!(
        e.client
            .list_replicas(rpc::ListReplicasRequest {})
            .await
            .unwrap()
            .into_inner()
            .replicas
            .is_empty()
    );
    let destroy_pool = rpc::DestroyPoolRequest { name: "pool-1".into(), wipe: false };
    e.client.destroy_pool(destroy_pool.clone()).await.unwrap();
    e.client.destroy_pool(destroy_pool).await.unwrap();
    assert!(
        e.client.list_pools(rpc::ListPoolsRequest {}).await.unwrap().into_inner().pools.is_empty()
    );
    stop_engine(e).await;
    control_stop.cancel();

    // A destroyed pool stays forgotten across restarts; its disk can be imported again.
    let mut e = start_engine(&state, None).await;
    assert!(
        e.client.list_pools(rpc::ListPoolsRequest {}).await.unwrap().into_inner().pools.is_empty()
    );
    let imported =
        e.client.create_pool(create_pool_req("pool-1", &disk, 0)).await.unwrap().into_inner();
    assert_eq!(imported.uuid, pool.uuid);
    stop_engine(e).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_status_codes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let disk = dir.path().join("p.img");
    let mut e = start_engine(&state, None).await;
    // A second engine on the same state directory would import the same pools: refused.
    let second = EngineArgs::local(NodeId::new("node-2").unwrap(), state.clone());
    let refused = trireme_engine::start(second, CancellationToken::new()).await.err().unwrap();
    assert!(refused.to_string().contains("another engine"), "{refused:#}");
    let c = &mut e.client;

    // Pools.
    assert_eq!(
        code(c.create_pool(create_pool_req("Bad Name", &disk, 64 * MIB)).await),
        Code::InvalidArgument
    );
    let mut relative = create_pool_req("p", &disk, 64 * MIB);
    relative.disk = "relative.img".into();
    assert_eq!(code(c.create_pool(relative).await), Code::InvalidArgument);
    assert_eq!(code(c.create_pool(create_pool_req("p", &disk, 1000)).await), Code::InvalidArgument);
    assert_eq!(
        code(c.create_pool(create_pool_req("p", &dir.path().join("missing.img"), 0)).await),
        Code::FailedPrecondition
    );
    c.create_pool(create_pool_req("p", &disk, 64 * MIB)).await.unwrap();
    // Same name on another disk, or another name on the same disk.
    assert_eq!(
        code(c.create_pool(create_pool_req("p", &dir.path().join("q.img"), 64 * MIB)).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.create_pool(create_pool_req("q", &disk, 64 * MIB)).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.destroy_pool(rpc::DestroyPoolRequest { name: "p".into(), wipe: true }).await),
        Code::Unimplemented
    );

    // Replicas.
    let replica = |uuid: &str, pool: &str, size: u64| rpc::CreateReplicaRequest {
        uuid: uuid.into(),
        pool: pool.into(),
        size_bytes: size,
        thin: false,
        volume_uuid: String::new(),
    };
    let id = uuid::Uuid::new_v4().to_string();
    assert_eq!(
        code(c.create_replica(replica("not-a-uuid", "p", MIB)).await),
        Code::InvalidArgument
    );
    assert_eq!(code(c.create_replica(replica(&id, "p", 0)).await), Code::InvalidArgument);
    assert_eq!(code(c.create_replica(replica(&id, "p", MIB + 1)).await), Code::InvalidArgument);
    assert_eq!(code(c.create_replica(replica(&id, "nope", MIB)).await), Code::NotFound);
    assert_eq!(code(c.create_replica(replica(&id, "p", 1 << 40)).await), Code::ResourceExhausted);
    c.create_replica(replica(&id, "p", 4 * MIB)).await.unwrap();
    assert_eq!(code(c.create_replica(replica(&id, "p", 8 * MIB)).await), Code::AlreadyExists);
    let resize =
        |uuid: &str, size: u64| rpc::ResizeReplicaRequest { uuid: uuid.into(), size_bytes: size };
    assert_eq!(
        code(c.resize_replica(resize(&uuid::Uuid::new_v4().to_string(), MIB)).await),
        Code::NotFound
    );
    assert_eq!(code(c.resize_replica(resize(&id, 7)).await), Code::InvalidArgument);
    // Destroying an absent replica succeeds: control retries destroys.
    c.destroy_replica(rpc::DestroyReplicaRequest { uuid: uuid::Uuid::new_v4().to_string() })
        .await
        .unwrap();
    assert_eq!(
        code(c.destroy_replica(rpc::DestroyReplicaRequest { uuid: "x".into() }).await),
        Code::InvalidArgument
    );

    // Nexuses.
    let vol = uuid::Uuid::new_v4().to_string();
    let unknown = uuid::Uuid::new_v4().to_string();
    // An unknown replica cannot be opened: with no other child there is no current replica.
    assert_eq!(
        code(c.create_nexus(nexus_req(&vol, 4 * MIB, &unknown)).await),
        Code::FailedPrecondition
    );
    assert_eq!(code(c.create_nexus(nexus_req(&vol, 8 * MIB, &id)).await), Code::FailedPrecondition);
    assert_eq!(code(c.create_nexus(nexus_req("nope", 4 * MIB, &id)).await), Code::InvalidArgument);
    let mut no_children = nexus_req(&vol, 4 * MIB, &id);
    no_children.children.clear();
    assert_eq!(code(c.create_nexus(no_children).await), Code::InvalidArgument);
    let mut remote = nexus_req(&vol, 4 * MIB, &id);
    remote.children[0] = rpc::ChildSpec {
        uri: "nbd://10.0.0.1:10809/replica-x".into(),
        replica_uuid: String::new(),
        ..Default::default()
    };
    // A remote child must name a replica share.
    assert_eq!(code(c.create_nexus(remote).await), Code::InvalidArgument);
    let resize_nexus = rpc::ResizeNexusRequest { volume_uuid: vol.clone(), size_bytes: 4 * MIB };
    assert_eq!(code(c.resize_nexus(resize_nexus).await), Code::NotFound);
    c.destroy_nexus(rpc::DestroyNexusRequest { volume_uuid: vol.clone() }).await.unwrap();

    // The engine keeps serving after all that.
    let node = c.get_node(rpc::GetNodeRequest {}).await.unwrap().into_inner();
    assert_eq!(node.node_id, "node-1");
    stop_engine(e).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_disk_is_gone_is_listed_as_faulted_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let disk = dir.path().join("p.img");
    let mut e = start_engine(&state, None).await;
    e.client.create_pool(create_pool_req("p", &disk, 64 * MIB)).await.unwrap();
    stop_engine(e).await;
    std::fs::remove_file(&disk).unwrap();

    let mut e = start_engine(&state, None).await;
    let pools = e.client.list_pools(rpc::ListPoolsRequest {}).await.unwrap().into_inner().pools;
    assert_eq!(pools.len(), 1);
    assert_eq!(pools[0].state, rpc::PoolState::Faulted as i32);
    assert!(!pools[0].error.is_empty());
    let r = rpc::CreateReplicaRequest {
        uuid: uuid::Uuid::new_v4().to_string(),
        pool: "p".into(),
        size_bytes: MIB,
        thin: true,
        volume_uuid: String::new(),
    };
    assert_eq!(code(e.client.create_replica(r).await), Code::FailedPrecondition);
    // Creating it again (the disk is recreated) brings it back online.
    let p = e.client.create_pool(create_pool_req("p", &disk, 64 * MIB)).await.unwrap().into_inner();
    assert_eq!(p.state, rpc::PoolState::Online as i32);
    stop_engine(e).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_serves_while_control_is_down_and_registers_once_it_is_up() {
    let dir = tempfile::tempdir().unwrap();
    // A port where nothing listens yet.
    let control_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut e = start_engine(&dir.path().join("state"), Some(control_addr)).await;
    // Registration retries in the background; the gRPC API answers meanwhile.
    let node = e.client.get_node(rpc::GetNodeRequest {}).await.unwrap().into_inner();
    assert_eq!(node.grpc_endpoint, e.running.grpc_addr().to_string());
    let (registry, _, control_stop) = start_registry_on(control_addr).await;
    wait_for("registration once control is up", || !registry.registrations.lock().is_empty()).await;
    wait_for("heartbeats", || registry.heartbeats.load(Ordering::SeqCst) >= 2).await;
    stop_engine(e).await;
    control_stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_with_clients_still_connected() {
    let dir = tempfile::tempdir().unwrap();
    let e = start_engine(&dir.path().join("state"), None).await;
    // One client stuck in the handshake, one idle gRPC connection (the test's client).
    let _stuck = tokio::net::TcpStream::connect(e.running.nbd_addr()).await.unwrap();
    let started = std::time::Instant::now();
    stop_engine(e).await;
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
}
