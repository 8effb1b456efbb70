//! Replication through the engine's gRPC API, with two engines in this process: a nexus over a
//! local and a remote replica, children added and removed, fencing by epochs (also across an
//! engine restart), generations, and recording through a (fake) control.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use trireme_engine::{EngineArgs, RunningEngine};
use trireme_iobuf::IoBuf;
use trireme_nbd::{Client, ClientAddr, ClientError, ClientOptions};
use trireme_rpc as rpc;
use trireme_rpc::engine_client::EngineClient;
use trireme_types::NodeId;

const WAIT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

// ---- engines

struct Node {
    running: RunningEngine,
    token: CancellationToken,
    client: EngineClient<Channel>,
    state_dir: PathBuf,
}

impl Node {
    async fn start(name: &str, state_dir: &Path, control: Option<SocketAddr>) -> Self {
        let mut args = EngineArgs::local(NodeId::new(name).unwrap(), state_dir.to_owned());
        args.control = control.map(|a| format!("http://{a}"));
        args.child_timeout_ms = 2000;
        args.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        let token = CancellationToken::new();
        let running = trireme_engine::start(args, token.clone()).await.unwrap();
        let client =
            EngineClient::connect(format!("http://{}", running.grpc_addr())).await.unwrap();
        Self { running, token, client, state_dir: state_dir.to_owned() }
    }

    /// A node with a pool `pool` of 256 MiB on a file in `dir`.
    async fn with_pool(name: &str, dir: &Path, control: Option<SocketAddr>) -> Self {
        let mut node = Self::start(name, &dir.join("state"), control).await;
        node.client
            .create_pool(rpc::CreatePoolRequest {
                name: "pool".into(),
                disk: dir.join("disk.img").display().to_string(),
                size_bytes: 256 * MIB,
                cluster_size: 0,
            })
            .await
            .unwrap();
        node
    }

    async fn stop(self) -> PathBuf {
        self.token.cancel();
        tokio::time::timeout(WAIT, self.running.wait()).await.expect("engine stops").unwrap();
        self.state_dir
    }

    async fn replica(&mut self, size: u64) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        self.client
            .create_replica(rpc::CreateReplicaRequest {
                uuid: id.clone(),
                pool: "pool".into(),
                size_bytes: size,
                thin: true,
                volume_uuid: String::new(),
            })
            .await
            .unwrap();
        id
    }

    async fn replica_info(&mut self, id: &str) -> rpc::Replica {
        let list = self.client.list_replicas(rpc::ListReplicasRequest {}).await.unwrap();
        list.into_inner().replicas.into_iter().find(|r| r.uuid == id).unwrap()
    }

    async fn nexus(&mut self, volume: &str) -> rpc::Nexus {
        let list = self.client.list_nexuses(rpc::ListNexusesRequest {}).await.unwrap();
        list.into_inner().nexuses.into_iter().find(|n| n.volume_uuid == volume).unwrap()
    }

    /// Waits until `cond` holds for the volume's nexus.
    async fn wait_nexus(&mut self, volume: &str, what: &str, cond: impl Fn(&rpc::Nexus) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let n = self.nexus(volume).await;
            if cond(&n) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {n:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn local_uri(replica: &str) -> String {
        format!("replica:///{replica}")
    }

    fn remote_uri(&self, replica: &str) -> String {
        format!("nbd://{}/replica-{replica}", self.running.nbd_addr())
    }

    /// An NBD connection to one of this engine's exports.
    async fn nbd(&self, export: &str) -> Result<Client, ClientError> {
        let opts = ClientOptions {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(20),
            ..Default::default()
        };
        Client::connect(ClientAddr::from(self.running.nbd_addr()), export, opts).await
    }
}

fn child(uri: String, join: rpc::ChildJoin) -> rpc::ChildSpec {
    rpc::ChildSpec { uri, replica_uuid: String::new(), join: join as i32 }
}

fn create_req(
    volume: &str,
    size: u64,
    epoch: u64,
    children: Vec<rpc::ChildSpec>,
) -> rpc::CreateNexusRequest {
    rpc::CreateNexusRequest {
        volume_uuid: volume.into(),
        size_bytes: size,
        children,
        epoch,
        generation: 1,
        dirty: None,
    }
}

fn code<T: std::fmt::Debug>(r: Result<Response<T>, Status>) -> Code {
    r.expect_err("expected an error status").code()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed)).collect()
}

async fn read_all(c: &Client, offset: u64, len: u32) -> Vec<u8> {
    c.read(offset, len).await.unwrap().to_vec()
}

fn state(c: &rpc::Child) -> rpc::ChildState {
    rpc::ChildState::try_from(c.state).unwrap()
}

async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out)).await.unwrap().unwrap();
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

// ---- a fake control plane recording what nexuses record

#[derive(Default)]
struct FakeControl {
    records: Mutex<Vec<rpc::RecordChildrenRequest>>,
    /// Epochs below this are refused (FAILED_PRECONDITION), as control does.
    min_epoch: Mutex<u64>,
}

struct Svc(Arc<FakeControl>);

#[tonic::async_trait]
impl rpc::registry_server::Registry for Svc {
    async fn register(
        &self,
        _: Request<rpc::RegisterRequest>,
    ) -> Result<Response<rpc::RegisterReply>, Status> {
        Ok(Response::new(rpc::RegisterReply { heartbeat_interval_secs: 1 }))
    }
    async fn heartbeat(
        &self,
        _: Request<rpc::HeartbeatRequest>,
    ) -> Result<Response<rpc::HeartbeatReply>, Status> {
        Ok(Response::new(rpc::HeartbeatReply { known: true }))
    }
    async fn record_children(
        &self,
        req: Request<rpc::RecordChildrenRequest>,
    ) -> Result<Response<rpc::RecordChildrenReply>, Status> {
        let req = req.into_inner();
        if req.epoch < *self.0.min_epoch.lock() {
            return Err(Status::failed_precondition("fenced: a newer nexus exists"));
        }
        self.0.records.lock().push(req);
        Ok(Response::new(rpc::RecordChildrenReply { generation: 7 }))
    }
    async fn mark_dirty(
        &self,
        req: Request<rpc::MarkDirtyRequest>,
    ) -> Result<Response<rpc::Empty>, Status> {
        if req.into_inner().epoch < *self.0.min_epoch.lock() {
            return Err(Status::failed_precondition("fenced: a newer nexus exists"));
        }
        Ok(Response::new(rpc::Empty {}))
    }
}

async fn start_control() -> (Arc<FakeControl>, SocketAddr, CancellationToken) {
    let control = Arc::new(FakeControl::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let svc = rpc::registry_server::RegistryServer::new(Svc(Arc::clone(&control)));
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
    (control, addr, token)
}

// ---- the tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nexus_mirrors_a_local_and_a_remote_replica_and_a_newer_epoch_fences_it() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Node::with_pool("node-a", dir_a.path(), None).await;
    let mut b = Node::with_pool("node-b", dir_b.path(), None).await;
    let ra = a.replica(16 * MIB).await;
    let rb = b.replica(16 * MIB).await;
    let volume = uuid::Uuid::new_v4().to_string();

    let children = vec![
        child(Node::local_uri(&ra), rpc::ChildJoin::Online),
        child(b.remote_uri(&rb), rpc::ChildJoin::Online),
    ];
    let n = a.client.create_nexus(create_req(&volume, 16 * MIB, 1, children.clone())).await;
    let n = n.unwrap().into_inner();
    assert_eq!((n.epoch, n.stopped_reason.as_str()), (1, ""));
    assert_eq!(n.children.len(), 2);
    assert!(n.children.iter().all(|c| state(c) == rpc::ChildState::Online), "{n:?}");
    assert!(n.children.iter().any(|c| c.uri == b.remote_uri(&rb)), "URI reported as given");
    // Idempotent: the same request returns the same nexus.
    let again = a.client.create_nexus(create_req(&volume, 16 * MIB, 1, children)).await;
    assert_eq!(again.unwrap().into_inner().children.len(), 2);
    // Both replicas are claimed for epoch 1, durably.
    assert_eq!(a.replica_info(&ra).await.epoch, 1);
    assert_eq!(b.replica_info(&rb).await.epoch, 1);

    // Writes through the volume land on both replicas.
    let vol = a.nbd(&volume).await.unwrap();
    let data = pattern(256 << 10, 3);
    vol.write(MIB, IoBuf::copy_from(&data), true).await.unwrap();
    let on_a = a.nbd(&format!("replica-{ra}")).await.unwrap();
    let on_b = b.nbd(&format!("replica-{rb}")).await.unwrap();
    assert!(read_all(&on_a, MIB, 256 << 10).await == data, "local replica differs");
    assert!(read_all(&on_b, MIB, 256 << 10).await == data, "remote replica differs");
    // The epoch-less shares are read-only.
    assert!(on_b.capabilities().read_only);
    assert!(on_b.write(0, IoBuf::copy_from(&[1u8; 512]), false).await.is_err());

    // Grow the volume: both replicas first, then the nexus (the remote child reconnects to
    // learn its new size); a write past the old end reaches both replicas.
    for (node, replica) in [(&mut a, &ra), (&mut b, &rb)] {
        let grow = rpc::ResizeReplicaRequest { uuid: replica.clone(), size_bytes: 32 * MIB };
        node.client.resize_replica(grow).await.unwrap();
    }
    let grow = rpc::ResizeNexusRequest { volume_uuid: volume.clone(), size_bytes: 32 * MIB };
    let n = a.client.resize_nexus(grow).await.unwrap().into_inner();
    assert_eq!(n.size_bytes, 32 * MIB);
    assert!(n.children.iter().all(|c| state(c) == rpc::ChildState::Online), "{n:?}");
    let grown = a.nbd(&volume).await.unwrap();
    grown.write(20 * MIB, IoBuf::copy_from(&data[..4096]), true).await.unwrap();
    let on_b_grown = b.nbd(&format!("replica-{rb}")).await.unwrap();
    assert!(read_all(&on_b_grown, 20 * MIB, 4096).await == data[..4096], "remote missed it");
    drop((grown, on_b_grown));

    // Control moves the volume to node B with epoch 2: A's nexus is fenced by its first I/O.
    let volume_b = create_req(
        &volume,
        16 * MIB,
        2,
        vec![
            child(a.remote_uri(&ra), rpc::ChildJoin::Online),
            child(Node::local_uri(&rb), rpc::ChildJoin::Online),
        ],
    );
    let nb = b.client.create_nexus(volume_b).await.unwrap().into_inner();
    assert_eq!(nb.epoch, 2);
    assert!(nb.children.iter().all(|c| state(c) == rpc::ChildState::Online), "{nb:?}");
    assert_eq!(a.replica_info(&ra).await.epoch, 2);
    let stale = vol.write(0, IoBuf::copy_from(&pattern(4096, 9)), true).await;
    assert!(stale.is_err(), "the superseded nexus acknowledged a write");
    a.wait_nexus(&volume, "the stale nexus to stop", |n| !n.stopped_reason.is_empty()).await;
    // The new nexus serves the data the old one acknowledged.
    let vol_b = b.nbd(&volume).await.unwrap();
    assert!(read_all(&vol_b, MIB, 256 << 10).await == data, "data lost across the move");
    assert!(read_all(&vol_b, 0, 4096).await.iter().all(|&x| x == 0), "a stale write landed");

    // A stale CreateNexus (epoch 1) on node B is refused: its children are fenced.
    let stale_create = create_req(
        &uuid::Uuid::new_v4().to_string(),
        16 * MIB,
        1,
        vec![child(a.remote_uri(&ra), rpc::ChildJoin::Online)],
    );
    assert_eq!(code(b.client.create_nexus(stale_create).await), Code::FailedPrecondition);

    drop((vol, vol_b, on_a, on_b));
    b.client.destroy_nexus(rpc::DestroyNexusRequest { volume_uuid: volume.clone() }).await.unwrap();
    a.client.destroy_nexus(rpc::DestroyNexusRequest { volume_uuid: volume.clone() }).await.unwrap();
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_children_start_faulted_and_a_nexus_needs_a_current_one() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Node::with_pool("node-a", dir_a.path(), None).await;
    let mut b = Node::with_pool("node-b", dir_b.path(), None).await;
    let ra = a.replica(8 * MIB).await;
    let rb = b.replica(8 * MIB).await;
    let remote = b.remote_uri(&rb);

    // A nexus whose remote child's engine dies keeps serving; the child is faulted within
    // the child timeout.
    let serving = uuid::Uuid::new_v4().to_string();
    let both = vec![
        child(Node::local_uri(&ra), rpc::ChildJoin::Online),
        child(remote.clone(), rpc::ChildJoin::Online),
    ];
    a.client.create_nexus(create_req(&serving, 8 * MIB, 1, both)).await.unwrap();
    let vol = a.nbd(&serving).await.unwrap();
    vol.write(0, IoBuf::copy_from(&pattern(4096, 1)), true).await.unwrap();
    b.stop().await;
    let started = tokio::time::Instant::now();
    vol.write(4096, IoBuf::copy_from(&pattern(4096, 2)), true).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "a dead peer held a write up");
    let n = a.nexus(&serving).await;
    let lost = n.children.iter().find(|c| c.uri == remote).unwrap();
    assert_eq!(state(lost), rpc::ChildState::Faulted, "{n:?}");
    assert_eq!(lost.fault_reason, "disconnected");
    assert!(read_all(&vol, 0, 8192).await[4096..] == pattern(4096, 2)[..]);
    drop(vol);
    a.client.destroy_nexus(rpc::DestroyNexusRequest { volume_uuid: serving }).await.unwrap();

    // Only the unreachable child was current: nothing to serve.
    let volume = uuid::Uuid::new_v4().to_string();
    let only_remote = create_req(
        &volume,
        8 * MIB,
        1,
        vec![
            child(remote.clone(), rpc::ChildJoin::Online),
            child(Node::local_uri(&ra), rpc::ChildJoin::Full),
        ],
    );
    let refused = a.client.create_nexus(only_remote).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("no current replica reachable"), "{refused:?}");

    // With a current local child, the unreachable one starts faulted and still needs a rebuild.
    let started = tokio::time::Instant::now();
    let n = a
        .client
        .create_nexus(create_req(
            &volume,
            8 * MIB,
            1,
            vec![
                child(Node::local_uri(&ra), rpc::ChildJoin::Online),
                child(remote.clone(), rpc::ChildJoin::Partial),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(started.elapsed() < Duration::from_secs(10), "opening was not bounded");
    let faulted = n.children.iter().find(|c| c.uri == remote).unwrap();
    assert_eq!(state(faulted), rpc::ChildState::Faulted);
    assert_eq!(faulted.rebuild_kind, rpc::ChildJoin::Partial as i32);
    assert_eq!(n.state, rpc::NexusState::Degraded as i32);
    let vol = a.nbd(&volume).await.unwrap();
    vol.write(0, IoBuf::copy_from(&pattern(4096, 1)), true).await.unwrap();
    drop(vol);
    a.client.destroy_nexus(rpc::DestroyNexusRequest { volume_uuid: volume }).await.unwrap();
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_are_added_and_removed_idempotently_within_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Node::with_pool("node-a", dir.path(), None).await;
    let (r1, r2) = (a.replica(8 * MIB).await, a.replica(8 * MIB).await);
    let volume = uuid::Uuid::new_v4().to_string();
    let create =
        create_req(&volume, 8 * MIB, 3, vec![child(Node::local_uri(&r1), rpc::ChildJoin::Online)]);
    a.client.create_nexus(create).await.unwrap();
    let vol = a.nbd(&volume).await.unwrap();
    let data = pattern(MIB as usize, 5);
    vol.write(2 * MIB, IoBuf::copy_from(&data), true).await.unwrap();

    let add = |epoch| rpc::AddChildRequest {
        volume_uuid: volume.clone(),
        epoch,
        child: Some(child(Node::local_uri(&r2), rpc::ChildJoin::Full)),
    };
    assert_eq!(code(a.client.add_child(add(2)).await), Code::FailedPrecondition);
    let n = a.client.add_child(add(3)).await.unwrap().into_inner();
    assert_eq!(n.children.len(), 2);
    a.wait_nexus(&volume, "the added child to be rebuilt", |n| {
        n.children.iter().all(|c| state(c) == rpc::ChildState::Online)
    })
    .await;
    // Rebuilt: the new replica holds the data written before it joined.
    let on_r2 = a.nbd(&format!("replica-{r2}")).await.unwrap();
    assert!(read_all(&on_r2, 2 * MIB, MIB as u32).await == data, "the rebuild missed data");
    drop(on_r2);
    let n = a.nexus(&volume).await;
    let added = n.children.iter().find(|c| c.replica_uuid == r2).unwrap();
    assert_eq!(added.last_rebuild_kind, rpc::ChildJoin::Full as i32);
    assert!(added.last_rebuild_copied_bytes >= MIB, "{added:?}");
    let m = scrape(a.running.metrics_addr().unwrap()).await;
    let rebuilt = sample(&m, &format!("trireme_rebuild_bytes_total{{volume=\"{volume}\"}}"));
    assert!(rebuilt >= MIB as f64, "{rebuilt}");
    let online =
        format!("trireme_child_state{{volume=\"{volume}\",replica=\"{r2}\",state=\"online\"}}");
    assert_eq!(sample(&m, &online), 1.0);
    // Again: nothing changes.
    let n = a.client.add_child(add(3)).await.unwrap().into_inner();
    assert_eq!(n.children.len(), 2);
    assert!(n.children.iter().all(|c| state(c) == rpc::ChildState::Online));
    assert_eq!(a.replica_info(&r2).await.epoch, 3);

    let remove = |epoch, replica: &str| rpc::RemoveChildRequest {
        volume_uuid: volume.clone(),
        epoch,
        replica_uuid: replica.into(),
    };
    assert_eq!(code(a.client.remove_child(remove(4, &r1)).await), Code::FailedPrecondition);
    let n = a.client.remove_child(remove(3, &r1)).await.unwrap().into_inner();
    assert_eq!(n.children.len(), 1);
    let n = a.client.remove_child(remove(3, &r1)).await.unwrap().into_inner();
    assert_eq!(n.children.len(), 1, "removing twice is a no-op");
    // The last online child stays.
    assert_eq!(code(a.client.remove_child(remove(3, &r2)).await), Code::FailedPrecondition);
    assert!(read_all(&vol, 2 * MIB, MIB as u32).await == data);
    let absent = rpc::RemoveChildRequest {
        volume_uuid: uuid::Uuid::new_v4().to_string(),
        epoch: 3,
        replica_uuid: r1.clone(),
    };
    assert_eq!(code(a.client.remove_child(absent).await), Code::NotFound);
    drop(vol);
    a.client.destroy_nexus(rpc::DestroyNexusRequest { volume_uuid: volume }).await.unwrap();
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_never_lower_and_fences_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Node::with_pool("node-a", dir.path(), None).await;
    let r = a.replica(8 * MIB).await;
    let set = |generation| rpc::SetReplicaGenerationRequest { uuid: r.clone(), generation };
    assert_eq!(a.client.set_replica_generation(set(5)).await.unwrap().into_inner().generation, 5);
    assert_eq!(a.client.set_replica_generation(set(3)).await.unwrap().into_inner().generation, 5);
    let unknown =
        rpc::SetReplicaGenerationRequest { uuid: uuid::Uuid::new_v4().to_string(), generation: 1 };
    assert_eq!(code(a.client.set_replica_generation(unknown).await), Code::NotFound);

    // Claim epoch 7 through a remote-style share of the replica, then restart the engine.
    let e7 = a.nbd(&format!("replica-{r}@7")).await.unwrap();
    e7.write(0, IoBuf::copy_from(&pattern(4096, 7)), true).await.unwrap();
    drop(e7);
    let info = a.replica_info(&r).await;
    assert_eq!((info.epoch, info.generation), (7, 5));
    let state_dir = a.stop().await;
    let mut a = Node::start("node-a", &state_dir, None).await;
    let info = a.replica_info(&r).await;
    assert_eq!((info.epoch, info.generation), (7, 5), "the fence did not survive the restart");

    // A stale epoch is refused on every path, a newer one is admitted.
    let e6 = a.nbd(&format!("replica-{r}@6")).await.unwrap();
    let refused = e6.write(0, IoBuf::copy_from(&pattern(4096, 6)), false).await.unwrap_err();
    assert!(matches!(refused, ClientError::Server { errno: 1, .. }), "{refused:?}"); // EPERM
    assert!(e6.read(0, 4096).await.is_err());
    let volume = uuid::Uuid::new_v4().to_string();
    let stale =
        create_req(&volume, 8 * MIB, 6, vec![child(Node::local_uri(&r), rpc::ChildJoin::Online)]);
    assert_eq!(code(a.client.create_nexus(stale).await), Code::FailedPrecondition);
    let e8 = a.nbd(&format!("replica-{r}@8")).await.unwrap();
    assert!(read_all(&e8, 0, 4096).await == pattern(4096, 7));
    assert_eq!(a.replica_info(&r).await.epoch, 8);
    drop((e6, e8));
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nexuses_record_their_membership_with_control_and_stop_when_refused() {
    let (control, addr, stop_control) = start_control().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = Node::with_pool("node-a", dir.path(), Some(addr)).await;
    let r = a.replica(8 * MIB).await;
    let volume = uuid::Uuid::new_v4().to_string();
    let create =
        create_req(&volume, 8 * MIB, 4, vec![child(Node::local_uri(&r), rpc::ChildJoin::Online)]);
    let n = a.client.create_nexus(create).await.unwrap().into_inner();
    assert_eq!((n.epoch, n.generation), (4, 7), "the generation is control's answer");
    {
        let records = control.records.lock();
        let first = records.first().expect("CreateNexus recorded nothing");
        assert_eq!(
            (first.volume_uuid.as_str(), first.epoch, first.node_id.as_str()),
            (volume.as_str(), 4, "node-a")
        );
        assert_eq!(first.children.len(), 1);
        assert_eq!(first.children[0].replica_uuid, r);
    }
    a.client.destroy_nexus(rpc::DestroyNexusRequest { volume_uuid: volume.clone() }).await.unwrap();

    // Control has moved on to epoch 6: a nexus of epoch 5 is refused at creation.
    *control.min_epoch.lock() = 6;
    let stale =
        create_req(&volume, 8 * MIB, 5, vec![child(Node::local_uri(&r), rpc::ChildJoin::Online)]);
    assert_eq!(code(a.client.create_nexus(stale).await), Code::FailedPrecondition);
    let list = a.client.list_nexuses(rpc::ListNexusesRequest {}).await.unwrap().into_inner();
    assert!(list.nexuses.is_empty(), "a nexus that could not record was kept: {list:?}");
    a.stop().await;
    stop_control.cancel();
}
