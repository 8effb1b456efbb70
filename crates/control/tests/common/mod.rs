//! Test harness: control in-process on ephemeral ports, and a fake engine (a tonic `Engine`
//! server with in-memory pools, replicas and nexuses) that registers and heartbeats like the
//! real one. The fake keeps every CreateNexus, AddChild, RemoveChild and SetReplicaGeneration
//! request it answered, so tests can check what control asked for; its nexus children start
//! in the state their `join` implies (online, or rebuilding) and change only when a test says.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use trireme_api::Client;
use trireme_control::ControlArgs;
use trireme_rpc as rpc;

#[derive(Debug, Default)]
pub struct FakeState {
    pub pools: HashMap<String, rpc::Pool>,
    pub replicas: HashMap<String, rpc::Replica>,
    pub nexuses: HashMap<String, rpc::Nexus>,
    pub fail_create_replica: bool,
    pub fail_create_nexus: bool,
    /// ResizeReplica answers Unavailable, as a connection failure would.
    pub resize_unavailable: bool,
    pub calls: Vec<&'static str>,
    pub create_nexus_requests: Vec<rpc::CreateNexusRequest>,
    pub add_child_requests: Vec<rpc::AddChildRequest>,
    pub remove_child_requests: Vec<rpc::RemoveChildRequest>,
    pub generation_requests: Vec<rpc::SetReplicaGenerationRequest>,
}

impl FakeState {
    /// Forgets a replica's claim, as if no nexus of the current epoch ever reached it.
    pub fn unclaim(replica: &str) {
        CLAIMS.lock().remove(replica);
    }

    /// Sets a child of a volume's nexus to `faulted` (what a real nexus does when a replica
    /// stops answering). Panics if there is no such nexus or child.
    pub fn fault_child(&mut self, volume: &str, replica: &str) {
        let n = self.nexuses.get_mut(volume).expect("nexus");
        let c = n.children.iter_mut().find(|c| c.replica_uuid == replica).expect("child");
        c.state = rpc::ChildState::Faulted as i32;
        c.fault_reason = "timeout".into();
    }
}

/// The replica a child URI names: `replica:///<uuid>` (local) or
/// `nbd://host:port/replica-<uuid>` (remote).
fn child_replica(uri: &str) -> Option<(&str, bool)> {
    if let Some(u) = uri.strip_prefix("replica:///") {
        return Some((u, true));
    }
    let rest = uri.strip_prefix("nbd://")?;
    let (_, export) = rest.split_once('/')?;
    Some((export.strip_prefix("replica-")?, false))
}

/// The epoch each replica was last claimed with, shared by every fake engine of the process
/// (a nexus claims remote replicas too). Replica ids are random, so tests do not collide.
static CLAIMS: Mutex<std::collections::BTreeMap<String, u64>> =
    Mutex::new(std::collections::BTreeMap::new());

fn claim(replica: &str, epoch: u64) {
    let mut claims = CLAIMS.lock();
    let e = claims.entry(replica.to_owned()).or_default();
    *e = (*e).max(epoch);
}

fn fake_child(spec: &rpc::ChildSpec) -> rpc::Child {
    let online = spec.join == rpc::ChildJoin::Online as i32;
    rpc::Child {
        uri: spec.uri.clone(),
        replica_uuid: spec.replica_uuid.clone(),
        state: if online { rpc::ChildState::Online } else { rpc::ChildState::Rebuilding } as i32,
        rebuild_kind: if online { 0 } else { spec.join },
        ..Default::default()
    }
}

#[derive(Clone)]
struct FakeEngine {
    node: String,
    state: Arc<Mutex<FakeState>>,
}

fn pool_of<'a>(st: &'a mut FakeState, name: &str) -> Result<&'a mut rpc::Pool, Status> {
    st.pools.get_mut(name).ok_or_else(|| Status::not_found(format!("pool {name}")))
}

#[tonic::async_trait]
impl rpc::engine_server::Engine for FakeEngine {
    async fn get_node(
        &self,
        _: Request<rpc::GetNodeRequest>,
    ) -> Result<Response<rpc::NodeInfo>, Status> {
        Ok(Response::new(rpc::NodeInfo { node_id: self.node.clone(), ..Default::default() }))
    }
    async fn create_pool(
        &self,
        r: Request<rpc::CreatePoolRequest>,
    ) -> Result<Response<rpc::Pool>, Status> {
        let r = r.into_inner();
        let mut st = self.state.lock();
        st.calls.push("CreatePool");
        if r.disk.starts_with("/bad") {
            return Err(Status::failed_precondition(format!("disk {} does not exist", r.disk)));
        }
        let pool = st.pools.entry(r.name.clone()).or_insert_with(|| rpc::Pool {
            name: r.name.clone(),
            uuid: uuid::Uuid::new_v4().to_string(),
            disk: r.disk.clone(),
            capacity_bytes: if r.size_bytes == 0 { 1 << 30 } else { r.size_bytes },
            used_bytes: 0,
            cluster_size: 1 << 20,
            state: rpc::PoolState::Online as i32,
            error: String::new(),
            replica_count: 0,
        });
        Ok(Response::new(pool.clone()))
    }
    async fn destroy_pool(
        &self,
        r: Request<rpc::DestroyPoolRequest>,
    ) -> Result<Response<rpc::Empty>, Status> {
        let r = r.into_inner();
        let mut st = self.state.lock();
        // Like the engine: a pool holding replicas stays.
        if st.replicas.values().any(|rep| rep.pool == r.name) {
            return Err(Status::failed_precondition("pool still holds replicas"));
        }
        st.pools.remove(&r.name).ok_or_else(|| Status::not_found("pool"))?;
        Ok(Response::new(rpc::Empty {}))
    }
    async fn list_pools(
        &self,
        _: Request<rpc::ListPoolsRequest>,
    ) -> Result<Response<rpc::ListPoolsReply>, Status> {
        Ok(Response::new(rpc::ListPoolsReply {
            pools: self.state.lock().pools.values().cloned().collect(),
        }))
    }
    async fn create_replica(
        &self,
        r: Request<rpc::CreateReplicaRequest>,
    ) -> Result<Response<rpc::Replica>, Status> {
        let r = r.into_inner();
        let mut st = self.state.lock();
        st.calls.push("CreateReplica");
        if st.fail_create_replica {
            return Err(Status::internal("injected failure"));
        }
        if let Some(rep) = st.replicas.get(&r.uuid) {
            return Ok(Response::new(rep.clone()));
        }
        let pool = pool_of(&mut st, &r.pool)?;
        if !r.thin && pool.used_bytes + r.size_bytes > pool.capacity_bytes {
            return Err(Status::resource_exhausted("pool full"));
        }
        if !r.thin {
            pool.used_bytes += r.size_bytes;
        }
        pool.replica_count += 1;
        let rep = rpc::Replica {
            uuid: r.uuid.clone(),
            pool: r.pool,
            size_bytes: r.size_bytes,
            thin: r.thin,
            allocated_bytes: if r.thin { 0 } else { r.size_bytes },
            volume_uuid: r.volume_uuid,
            ..Default::default()
        };
        st.replicas.insert(r.uuid, rep.clone());
        Ok(Response::new(rep))
    }
    async fn destroy_replica(
        &self,
        r: Request<rpc::DestroyReplicaRequest>,
    ) -> Result<Response<rpc::Empty>, Status> {
        let r = r.into_inner();
        let mut st = self.state.lock();
        st.calls.push("DestroyReplica");
        let rep = st.replicas.remove(&r.uuid).ok_or_else(|| Status::not_found("replica"))?;
        if let Ok(pool) = pool_of(&mut st, &rep.pool) {
            pool.replica_count -= 1;
            if !rep.thin {
                pool.used_bytes -= rep.size_bytes;
            }
        }
        Ok(Response::new(rpc::Empty {}))
    }
    async fn resize_replica(
        &self,
        r: Request<rpc::ResizeReplicaRequest>,
    ) -> Result<Response<rpc::Replica>, Status> {
        let r = r.into_inner();
        let mut st = self.state.lock();
        if st.resize_unavailable {
            return Err(Status::unavailable("injected connection failure"));
        }
        let rep = st.replicas.get_mut(&r.uuid).ok_or_else(|| Status::not_found("replica"))?;
        let grow = r.size_bytes.saturating_sub(rep.size_bytes);
        rep.size_bytes = rep.size_bytes.max(r.size_bytes);
        let rep = rep.clone();
        if !rep.thin {
            pool_of(&mut st, &rep.pool)?.used_bytes += grow;
        }
        Ok(Response::new(rep))
    }
    async fn list_replicas(
        &self,
        _: Request<rpc::ListReplicasRequest>,
    ) -> Result<Response<rpc::ListReplicasReply>, Status> {
        let claims = CLAIMS.lock();
        let mut replicas: Vec<rpc::Replica> =
            self.state.lock().replicas.values().cloned().collect();
        for r in &mut replicas {
            r.epoch = r.epoch.max(claims.get(&r.uuid).copied().unwrap_or(0));
        }
        Ok(Response::new(rpc::ListReplicasReply { replicas }))
    }
    async fn create_nexus(
        &self,
        r: Request<rpc::CreateNexusRequest>,
    ) -> Result<Response<rpc::Nexus>, Status> {
        let r = r.into_inner();
        let mut st = self.state.lock();
        st.calls.push("CreateNexus");
        st.create_nexus_requests.push(r.clone());
        if st.fail_create_nexus {
            return Err(Status::failed_precondition("injected nexus refusal"));
        }
        for c in &r.children {
            let (uuid, local) =
                child_replica(&c.uri).ok_or_else(|| Status::invalid_argument("child uri"))?;
            if uuid != c.replica_uuid {
                return Err(Status::invalid_argument("child uri names another replica"));
            }
            if local && !st.replicas.contains_key(uuid) {
                return Err(Status::not_found(format!("replica {uuid}")));
            }
        }
        let nexus = rpc::Nexus {
            volume_uuid: r.volume_uuid.clone(),
            size_bytes: r.size_bytes,
            children: r.children.iter().map(fake_child).collect(),
            state: rpc::NexusState::Online as i32,
            share_uri: format!("nbd://127.0.0.1:10809/{}", r.volume_uuid),
            epoch: r.epoch,
            generation: r.generation,
            ..Default::default()
        };
        for c in &r.children {
            claim(&c.replica_uuid, r.epoch);
        }
        st.nexuses.insert(r.volume_uuid, nexus.clone());
        Ok(Response::new(nexus))
    }
    async fn destroy_nexus(
        &self,
        r: Request<rpc::DestroyNexusRequest>,
    ) -> Result<Response<rpc::Empty>, Status> {
        let mut st = self.state.lock();
        st.calls.push("DestroyNexus");
        st.nexuses.remove(&r.into_inner().volume_uuid).ok_or_else(|| Status::not_found("nexus"))?;
        Ok(Response::new(rpc::Empty {}))
    }
    async fn resize_nexus(
        &self,
        r: Request<rpc::ResizeNexusRequest>,
    ) -> Result<Response<rpc::Nexus>, Status> {
        let r = r.into_inner();
        let mut st = self.state.lock();
        let n = st.nexuses.get_mut(&r.volume_uuid).ok_or_else(|| Status::not_found("nexus"))?;
        n.size_bytes = r.size_bytes;
        Ok(Response::new(n.clone()))
    }
    async fn list_nexuses(
        &self,
        _: Request<rpc::ListNexusesRequest>,
    ) -> Result<Response<rpc::ListNexusesReply>, Status> {
        Ok(Response::new(rpc::ListNexusesReply {
            nexuses: self.state.lock().nexuses.values().cloned().collect(),
        }))
    }
    async fn add_child(
        &self,
        r: Request<rpc::AddChildRequest>,
    ) -> Result<Response<rpc::Nexus>, Status> {
        let r = r.into_inner();
        let mut st = self.state.lock();
        st.calls.push("AddChild");
        st.add_child_requests.push(r.clone());
        let spec = r.child.ok_or_else(|| Status::invalid_argument("child"))?;
        child_replica(&spec.uri).ok_or_else(|| Status::invalid_argument("child uri"))?;
        let n = st.nexuses.get_mut(&r.volume_uuid).ok_or_else(|| Status::not_found("nexus"))?;
        if n.epoch != r.epoch {
            return Err(Status::failed_precondition(format!(
                "epoch {} is not the nexus's {}",
                r.epoch, n.epoch
            )));
        }
        claim(&spec.replica_uuid, r.epoch);
        match n.children.iter_mut().find(|c| c.replica_uuid == spec.replica_uuid) {
            // Idempotent: online or rebuilding children are left as they are.
            Some(c) if c.state != rpc::ChildState::Faulted as i32 => {}
            Some(c) => *c = fake_child(&spec),
            None => n.children.push(fake_child(&spec)),
        }
        Ok(Response::new(n.clone()))
    }
    async fn remove_child(
        &self,
        r: Request<rpc::RemoveChildRequest>,
    ) -> Result<Response<rpc::Nexus>, Status> {
        let r = r.into_inner();
        let mut st = self.state.lock();
        st.calls.push("RemoveChild");
        st.remove_child_requests.push(r.clone());
        let n = st.nexuses.get_mut(&r.volume_uuid).ok_or_else(|| Status::not_found("nexus"))?;
        if n.epoch != r.epoch {
            return Err(Status::failed_precondition("epoch"));
        }
        n.children.retain(|c| c.replica_uuid != r.replica_uuid);
        Ok(Response::new(n.clone()))
    }
    async fn set_replica_generation(
        &self,
        r: Request<rpc::SetReplicaGenerationRequest>,
    ) -> Result<Response<rpc::Replica>, Status> {
        let r = r.into_inner();
        let mut st = self.state.lock();
        st.generation_requests.push(r.clone());
        let rep = st.replicas.get_mut(&r.uuid).ok_or_else(|| Status::not_found("replica"))?;
        rep.generation = rep.generation.max(r.generation);
        Ok(Response::new(rep.clone()))
    }
}

/// A running fake engine.
pub struct FakeNode {
    pub id: String,
    pub state: Arc<Mutex<FakeState>>,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FakeNode {
    /// Starts a fake engine that registers with control's gRPC registry at `registry`.
    pub async fn start(id: &str, registry: SocketAddr) -> Self {
        Self::start_with(id, registry, Arc::new(Mutex::new(FakeState::default()))).await
    }

    pub async fn start_with(id: &str, registry: SocketAddr, state: Arc<Mutex<FakeState>>) -> Self {
        let cancel = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = rpc::engine_server::EngineServer::new(FakeEngine {
            node: id.to_owned(),
            state: state.clone(),
        });
        let c = cancel.clone();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    c.cancelled_owned(),
                )
                .await;
        });
        let (node, c) = (id.to_owned(), cancel.clone());
        let heartbeats = tokio::spawn(async move {
            let mut registered = false;
            loop {
                let attempt = async {
                    let mut client =
                        rpc::registry_client::RegistryClient::connect(format!("http://{registry}"))
                            .await
                            .ok()?;
                    if !registered {
                        client
                            .register(rpc::RegisterRequest {
                                node_id: node.clone(),
                                grpc_endpoint: addr.to_string(),
                                nbd_endpoint: "127.0.0.1:10809".into(),
                                version: "fake".into(),
                            })
                            .await
                            .ok()?;
                        return Some(true);
                    }
                    let known = client
                        .heartbeat(rpc::HeartbeatRequest { node_id: node.clone() })
                        .await
                        .ok()?;
                    Some(known.into_inner().known)
                };
                registered = tokio::time::timeout(Duration::from_secs(3), attempt)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(false);
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                }
            }
        });
        Self { id: id.to_owned(), state, cancel, tasks: vec![server, heartbeats] }
    }

    pub async fn stop(self) -> Arc<Mutex<FakeState>> {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        self.state
    }

    /// Simulates an engine restart: the process goes away, comes back on a new port with its
    /// pools and replicas (they are on disk) but no nexuses (they are in memory).
    pub async fn restart(self, registry: SocketAddr) -> Self {
        let id = self.id.clone();
        let state = self.stop().await;
        state.lock().nexuses.clear();
        Self::start_with(&id, registry, state).await
    }
}

/// Control running in this process on ephemeral ports.
pub struct TestControl {
    pub api: SocketAddr,
    pub grpc: SocketAddr,
    pub dir: PathBuf,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestControl {
    pub async fn start(dir: &Path) -> Self {
        Self::start_on(dir, "127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(dir: &Path, api: SocketAddr, grpc: SocketAddr) -> Self {
        Self::start_with(dir, api, grpc, |_| {}).await
    }

    /// Like [`TestControl::start_on`], with flags changed by `tune` (after the test defaults).
    pub async fn start_with(
        dir: &Path,
        api: SocketAddr,
        grpc: SocketAddr,
        tune: impl FnOnce(&mut ControlArgs),
    ) -> Self {
        let mut args = ControlArgs::ephemeral(dir);
        args.api_listen = api;
        args.grpc_listen = grpc;
        args.node_timeout_secs = 3;
        args.reconcile_secs = 1;
        tune(&mut args);
        let cancel = CancellationToken::new();
        let running = trireme_control::start(args, cancel.clone()).await.unwrap();
        let (api, grpc) = (running.api_addr, running.grpc_addr);
        let task = tokio::spawn(running.wait());
        Self { api, grpc, dir: dir.to_owned(), cancel, task }
    }

    pub fn token(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap().trim().to_owned()
    }

    pub fn admin(&self) -> Client {
        Client::new(&self.api.to_string(), Some(self.token(trireme_control::ADMIN_TOKEN_FILE)))
            .unwrap()
    }

    pub fn viewer(&self) -> Client {
        Client::new(&self.api.to_string(), Some(self.token(trireme_control::VIEWER_TOKEN_FILE)))
            .unwrap()
    }

    /// A gRPC client of control's registry, as a nexus uses it.
    pub async fn registry(
        &self,
    ) -> rpc::registry_client::RegistryClient<tonic::transport::Channel> {
        rpc::registry_client::RegistryClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.api, path)
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task).await.unwrap().unwrap().unwrap();
    }
}

/// Polls `check` until it returns `Some`, failing the test after `secs`.
pub async fn eventually<T, F, Fut>(what: &str, secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts fake engines and waits until control sees all of them online.
pub async fn nodes_online(client: &Client, n: usize) {
    eventually("nodes online", 30, || async {
        let nodes = client.nodes().await.ok()?;
        (nodes.iter().filter(|n| n.status.state == trireme_types::NodeState::Online).count() == n)
            .then_some(())
    })
    .await
}

/// Creates a pool and waits until it is online.
pub async fn pool_online(client: &Client, name: &str, node: &str, size: u64) {
    let body = trireme_api::CreatePoolBody {
        name: name.parse().unwrap(),
        node: node.parse().unwrap(),
        disk: format!("/tmp/{name}.img"),
        size: Some(trireme_types::ByteSize::b(size)),
    };
    client.create_pool(&body).await.unwrap();
    eventually("pool online", 30, || async {
        (client.pool(name).await.ok()?.status.state == trireme_api::PoolState::Online).then_some(())
    })
    .await
}
