//! A small stand-in for control's REST API (the routes the CSI driver uses), serving each
//! published volume's data from a file through a real `nbdkit` on a unix socket, so the node
//! plugin attaches real NBD exports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use trireme_api::*;
use trireme_types::{ByteSize, NexusState, NodeId, NodeState, PoolId, VolumeId, VolumeState};

pub const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
pub const POOL_SIZE: u64 = 512 * ByteSize::MIB;

struct Vol {
    v: Volume,
    file: PathBuf,
    nbdkit: Option<Child>,
}

impl Drop for Vol {
    fn drop(&mut self) {
        if let Some(mut c) = self.nbdkit.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Default)]
struct Inner {
    volumes: BTreeMap<VolumeId, Vol>,
}

#[derive(Clone)]
struct App {
    inner: Arc<Mutex<Inner>>,
    dir: PathBuf,
}

pub struct FakeControl {
    pub addr: String,
    app: App,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeControl {
    fn drop(&mut self) {
        self.task.abort();
        self.app.inner.lock().unwrap().volumes.clear();
    }
}

fn problem(status: u16, kind: &str, detail: String) -> Response {
    let p = Problem { kind: kind.into(), title: kind.into(), status, detail, instance: None };
    (StatusCode::from_u16(status).unwrap(), Json(p)).into_response()
}

fn node(id: &str) -> Node {
    Node {
        id: NodeId::new(id).unwrap(),
        spec: NodeSpec::default(),
        status: NodeStatus {
            state: NodeState::Online,
            grpc_endpoint: "127.0.0.1:1".into(),
            nbd_endpoint: "127.0.0.1:2".into(),
            version: "fake".into(),
            last_seen_ms: 0,
        },
    }
}

impl App {
    fn pools(&self) -> Vec<Pool> {
        let inner = self.inner.lock().unwrap();
        NODES
            .iter()
            .enumerate()
            .map(|(i, n)| {
                // Replica k of every volume lives on pool k.
                let used: u64 = inner
                    .volumes
                    .values()
                    .filter(|v| usize::from(v.v.spec.replicas) > i)
                    .map(|v| v.v.spec.size.bytes())
                    .sum();
                Pool {
                    id: PoolId::new(format!("pool-{}", i + 1)).unwrap(),
                    spec: PoolSpec {
                        node: NodeId::new(*n).unwrap(),
                        disk: "fake".into(),
                        size: None,
                    },
                    status: PoolStatus {
                        state: PoolState::Online,
                        capacity: ByteSize::b(POOL_SIZE),
                        used: ByteSize::b(used),
                        free: ByteSize::b(POOL_SIZE.saturating_sub(used)),
                        replicas: 0,
                        error: None,
                    },
                }
            })
            .collect()
    }

    fn find(inner: &Inner, key: &str) -> Option<VolumeId> {
        inner
            .volumes
            .values()
            .find(|v| v.v.id.to_string() == key || v.v.name.as_str() == key)
            .map(|v| v.v.id)
    }
}

async fn readyz() -> Json<Health> {
    Json(Health { status: "ok".into(), version: "fake".into() })
}

async fn nodes() -> Json<Vec<Node>> {
    Json(NODES.iter().map(|n| node(n)).collect())
}

async fn get_node(UrlPath(id): UrlPath<String>) -> Response {
    if NODES.contains(&id.as_str()) {
        Json(node(&id)).into_response()
    } else {
        problem(404, "trireme:not-found", format!("node {id} does not exist"))
    }
}

async fn pools(State(app): State<App>) -> Json<Vec<Pool>> {
    Json(app.pools())
}

async fn volumes(State(app): State<App>) -> Json<Vec<Volume>> {
    Json(app.inner.lock().unwrap().volumes.values().map(|v| v.v.clone()).collect())
}

async fn get_volume(State(app): State<App>, UrlPath(id): UrlPath<String>) -> Response {
    let inner = app.inner.lock().unwrap();
    match App::find(&inner, &id) {
        Some(vid) => Json(inner.volumes[&vid].v.clone()).into_response(),
        None => problem(404, "trireme:not-found", format!("volume {id} does not exist")),
    }
}

async fn create_volume(State(app): State<App>, Json(body): Json<CreateVolumeBody>) -> Response {
    let free = app.pools().iter().map(|p| p.status.free.bytes()).min().unwrap_or(0);
    let mut inner = app.inner.lock().unwrap();
    if let Some(vid) = App::find(&inner, body.name.as_str()) {
        let v = &inner.volumes[&vid].v;
        if v.spec.size == body.size && v.spec.replicas == body.replicas && v.spec.thin == body.thin
        {
            return Json(v.clone()).into_response();
        }
        return problem(
            409,
            "trireme:conflict",
            format!("volume {} exists with another spec", body.name),
        );
    }
    if body.size.bytes() > free {
        return problem(507, "trireme:insufficient-capacity", "no pool has room".into());
    }
    let id = body.id.unwrap_or_else(VolumeId::new_random);
    let file = app.dir.join(format!("{id}.img"));
    std::fs::File::create(&file).unwrap().set_len(body.size.bytes()).unwrap();
    let v = Volume {
        id,
        name: body.name,
        spec: VolumeSpec {
            size: body.size,
            replicas: body.replicas,
            thin: body.thin,
            publish: None,
        },
        status: VolumeStatus {
            state: VolumeState::Unknown,
            target: None,
            replicas: vec![],
            generation: 0,
            message: None,
        },
    };
    inner.volumes.insert(id, Vol { v: v.clone(), file, nbdkit: None });
    (StatusCode::CREATED, Json(v)).into_response()
}

async fn delete_volume(State(app): State<App>, UrlPath(id): UrlPath<String>) -> Response {
    let mut inner = app.inner.lock().unwrap();
    match App::find(&inner, &id) {
        Some(vid) => {
            if inner.volumes[&vid].v.spec.publish.is_some() {
                return problem(409, "trireme:conflict", "volume is published".into());
            }
            if let Some(v) = inner.volumes.remove(&vid) {
                let _ = std::fs::remove_file(&v.file);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        None => problem(404, "trireme:not-found", format!("volume {id} does not exist")),
    }
}

async fn resize(
    State(app): State<App>,
    UrlPath(id): UrlPath<String>,
    Json(body): Json<ResizeVolumeBody>,
) -> Response {
    let mut inner = app.inner.lock().unwrap();
    let Some(vid) = App::find(&inner, &id) else {
        return problem(404, "trireme:not-found", format!("volume {id} does not exist"));
    };
    let v = inner.volumes.get_mut(&vid).unwrap();
    if body.size < v.v.spec.size {
        return problem(400, "trireme:invalid", "volumes do not shrink".into());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&v.file)
        .unwrap()
        .set_len(body.size.bytes())
        .unwrap();
    v.v.spec.size = body.size;
    Json(v.v.clone()).into_response()
}

fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nbdkit did not create {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

async fn publish(
    State(app): State<App>,
    UrlPath(id): UrlPath<String>,
    Json(body): Json<PublishBody>,
) -> Response {
    let mut inner = app.inner.lock().unwrap();
    let Some(vid) = App::find(&inner, &id) else {
        return problem(404, "trireme:not-found", format!("volume {id} does not exist"));
    };
    let node = body.node.unwrap_or_else(|| NodeId::new(NODES[0]).unwrap());
    if !NODES.contains(&node.as_str()) {
        return problem(404, "trireme:not-found", format!("node {node} does not exist"));
    }
    let v = inner.volumes.get_mut(&vid).unwrap();
    if let Some(on) = &v.v.spec.publish {
        if *on != node {
            return problem(409, "trireme:conflict", format!("published on {on}"));
        }
        return Json(v.v.clone()).into_response();
    }
    let sock = app.dir.join(format!("{vid}.sock"));
    let _ = std::fs::remove_file(&sock);
    let child = Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-U"])
        .arg(&sock)
        .arg("file")
        .arg(&v.file)
        .stdout(Stdio::null())
        .spawn()
        .expect("nbdkit");
    wait_for(&sock);
    v.nbdkit = Some(child);
    v.v.spec.publish = Some(node.clone());
    v.v.status.state = VolumeState::Online;
    v.v.status.target = Some(Target {
        node,
        uri: format!("nbd+unix:///?socket={}", sock.display()),
        state: NexusState::Online,
        children: vec![],
    });
    Json(v.v.clone()).into_response()
}

async fn unpublish(State(app): State<App>, UrlPath(id): UrlPath<String>) -> Response {
    let mut inner = app.inner.lock().unwrap();
    let Some(vid) = App::find(&inner, &id) else {
        return problem(404, "trireme:not-found", format!("volume {id} does not exist"));
    };
    let v = inner.volumes.get_mut(&vid).unwrap();
    if let Some(mut c) = v.nbdkit.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    v.v.spec.publish = None;
    v.v.status.target = None;
    v.v.status.state = VolumeState::Unknown;
    Json(v.v.clone()).into_response()
}

impl FakeControl {
    pub async fn start(dir: &Path) -> Self {
        let app = App { inner: Arc::default(), dir: dir.to_owned() };
        let router = Router::new()
            .route("/readyz", get(readyz))
            .route("/healthz", get(readyz))
            .route("/v1/nodes", get(nodes))
            .route("/v1/nodes/{id}", get(get_node))
            .route("/v1/pools", get(pools))
            .route("/v1/volumes", get(volumes).post(create_volume))
            .route("/v1/volumes/{id}", get(get_volume).delete(delete_volume))
            .route("/v1/volumes/{id}/resize", post(resize))
            .route("/v1/volumes/{id}/target", put(publish).delete(unpublish))
            .with_state(app.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { addr, app, task }
    }

    /// Marks a volume's state (to test the volume condition).
    pub fn set_state(&self, id: &str, state: VolumeState) {
        let mut inner = self.app.inner.lock().unwrap();
        let vid = App::find(&inner, id).unwrap();
        inner.volumes.get_mut(&vid).unwrap().v.status.state = state;
    }
}
