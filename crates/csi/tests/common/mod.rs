//! The test harness: a REST backend, the two plugins as child processes of the `trireme-csi`
//! test binary on unix sockets, gRPC clients for them, and checks that nothing is left behind.
#![allow(dead_code)]

pub mod fake;
pub mod real;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};
use trireme_csi::proto::controller_client::ControllerClient;
use trireme_csi::proto::identity_client::IdentityClient;
use trireme_csi::proto::node_client::NodeClient;
use trireme_csi::proto::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use trireme_csi::proto::*;

/// Replicas of the volumes the mount tests create: one on each node of the `up` cluster.
pub const REPLICAS: u8 = 3;
pub const NODE_ID: &str = "node-1";
pub const MIB: i64 = 1 << 20;

/// A plugin process; killed (SIGKILL) on drop.
pub struct Plugin {
    pub child: Child,
    pub socket: PathBuf,
}

impl Plugin {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn spawn_plugin(args: &[&str], socket: &Path, backend: &Backend, log: &Path) -> Plugin {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    // The real `trireme csi …` subcommands when the test script names the binary; the crate's
    // own launcher otherwise (`cargo test -p trireme-csi` on its own).
    let mut command = match std::env::var_os("TRIREME_BIN") {
        Some(bin) => {
            let mut c = Command::new(bin);
            c.arg("csi");
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_trireme-csi")),
    };
    let child = command
        .args(args)
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(["--api", &backend.api()])
        .args(backend.token_file().map(|t| format!("--token-file={}", t.display())))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Plugin { child, socket: socket.to_owned() }
}

pub async fn channel(socket: &Path) -> Channel {
    let start = Instant::now();
    loop {
        let path = socket.to_owned();
        let res = Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
            }))
            .await;
        match res {
            Ok(c) => return c,
            Err(e) if start.elapsed() > Duration::from_secs(60) => {
                panic!("cannot reach {}: {e}", socket.display())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// What the plugins talk to: a real `trireme up` cluster when `TRIREME_BIN` names the
/// `trireme` binary (scripts/test.sh sets it), else the fake REST backend.
pub enum Backend {
    Fake(fake::FakeControl),
    Real(real::Cluster),
}

impl Backend {
    pub fn api(&self) -> String {
        match self {
            Self::Fake(f) => f.addr.clone(),
            Self::Real(c) => c.api.clone(),
        }
    }

    pub fn token_file(&self) -> Option<PathBuf> {
        match self {
            Self::Fake(_) => None,
            Self::Real(c) => Some(c.token_file.clone()),
        }
    }
}

/// A backend and both plugins.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub backend: Backend,
    /// The node plugin's node id (in a real cluster: the node holding the volume's replica).
    pub node_id: String,
    pub controller: Plugin,
    pub node: Plugin,
    pub identity_c: IdentityClient<Channel>,
    pub identity_n: IdentityClient<Channel>,
    pub ctl: ControllerClient<Channel>,
    pub nd: NodeClient<Channel>,
}

impl Env {
    pub async fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("trireme-csi-").tempdir().unwrap();
        let backend = match (real::binary(), std::env::var("CSI_TEST_BACKEND").as_deref()) {
            (Some(bin), Ok("real") | Err(_)) => {
                Backend::Real(real::Cluster::start(&bin, dir.path()).await)
            }
            _ => Backend::Fake(fake::FakeControl::start(dir.path()).await),
        };
        let controller = spawn_plugin(
            &["controller"],
            &dir.path().join("controller.sock"),
            &backend,
            &dir.path().join("controller.log"),
        );
        let node = Self::spawn_node_in(dir.path(), &backend, NODE_ID);
        let cch = channel(&controller.socket).await;
        let nch = channel(&node.socket).await;
        Self {
            identity_c: IdentityClient::new(cch.clone()),
            identity_n: IdentityClient::new(nch.clone()),
            ctl: ControllerClient::new(cch),
            nd: NodeClient::new(nch),
            dir,
            backend,
            node_id: NODE_ID.to_owned(),
            controller,
            node,
        }
    }

    fn spawn_node_in(dir: &Path, backend: &Backend, node_id: &str) -> Plugin {
        let state = dir.join("node-state");
        spawn_plugin(
            &["node", "--node-id", node_id, "--state-dir", state.to_str().unwrap()],
            &dir.join("node.sock"),
            backend,
            &dir.join("node.log"),
        )
    }

    /// Kills the node plugin with SIGKILL and starts a new one on the same state dir.
    pub async fn restart_node(&mut self) {
        self.node.kill9();
        self.node = Self::spawn_node_in(self.dir.path(), &self.backend, &self.node_id);
        self.nd = NodeClient::new(channel(&self.node.socket).await);
        self.identity_n = IdentityClient::new(channel(&self.node.socket).await);
    }

    /// The fake backend, if that is what runs.
    pub fn fake(&self) -> Option<&fake::FakeControl> {
        match &self.backend {
            Backend::Fake(f) => Some(f),
            Backend::Real(_) => None,
        }
    }

    pub fn is_real(&self) -> bool {
        matches!(self.backend, Backend::Real(_))
    }

    /// The node a created volume may be published on (its topology), as the CO would pick.
    pub fn node_for(v: &Volume) -> Option<String> {
        v.accessible_topology.first().and_then(|t| t.segments.values().next().cloned())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("node-state")
    }

    /// Creates a volume and publishes it on NODE_ID; returns (volume id, publish context).
    pub async fn create_published(
        &mut self,
        name: &str,
        size: i64,
        cap: VolumeCapability,
    ) -> (String, HashMap<String, String>) {
        let v = self
            .ctl
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange { required_bytes: size, limit_bytes: 0 }),
                volume_capabilities: vec![cap.clone()],
                parameters: HashMap::from([("replicas".into(), REPLICAS.to_string())]),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        if let Backend::Real(cluster) = &self.backend {
            // The volume really is replicated: one replica on each of REPLICAS distinct nodes.
            let got = cluster.client.volume(&v.volume_id).await.unwrap();
            let mut nodes: Vec<_> = got.status.replicas.iter().map(|r| r.node.clone()).collect();
            nodes.sort();
            nodes.dedup();
            assert_eq!(got.spec.replicas, REPLICAS);
            assert_eq!(nodes.len(), usize::from(REPLICAS), "replicas on distinct nodes: {got:?}");
        }
        // Run the node plugin as the node the volume is accessible from, as kubelet would.
        if let Some(node) = Self::node_for(&v).filter(|n| *n != self.node_id) {
            self.node_id = node;
            self.restart_node().await;
        }
        let ctx = self.publish(&v.volume_id, cap).await;
        (v.volume_id, ctx)
    }

    pub async fn publish(&mut self, id: &str, cap: VolumeCapability) -> HashMap<String, String> {
        self.ctl
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: id.into(),
                node_id: self.node_id.clone(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .publish_context
    }

    pub fn stage_req(
        &self,
        id: &str,
        ctx: &HashMap<String, String>,
        staging: &Path,
        cap: VolumeCapability,
    ) -> NodeStageVolumeRequest {
        NodeStageVolumeRequest {
            volume_id: id.into(),
            publish_context: ctx.clone(),
            staging_target_path: staging.to_str().unwrap().into(),
            volume_capability: Some(cap),
            ..Default::default()
        }
    }

    pub fn publish_req(
        &self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: VolumeCapability,
        ro: bool,
    ) -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.to_str().unwrap().into(),
            target_path: target.to_str().unwrap().into(),
            volume_capability: Some(cap),
            readonly: ro,
            ..Default::default()
        }
    }

    pub async fn unstage(&mut self, id: &str, staging: &Path) {
        self.nd
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_str().unwrap().into(),
            })
            .await
            .unwrap();
    }

    pub async fn unpublish(&mut self, id: &str, target: &Path) {
        self.nd
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.to_str().unwrap().into(),
            })
            .await
            .unwrap();
    }

    /// Asserts nothing of this environment is mounted, loop-attached or running nbdfuse.
    pub fn assert_nothing_left(&self) {
        let root = self.dir.path().to_str().unwrap().to_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let left: Vec<_> = mounts.lines().filter(|l| l.contains(&root)).collect();
        assert!(left.is_empty(), "mounts left behind: {left:#?}");
        let losetup = Command::new("losetup").arg("-a").output().unwrap();
        let losetup = String::from_utf8_lossy(&losetup.stdout);
        let left: Vec<_> = losetup.lines().filter(|l| l.contains(&root)).collect();
        assert!(left.is_empty(), "loop devices left behind: {left:#?}");
        let procs = nbdfuse_processes(&root);
        assert!(procs.is_empty(), "nbdfuse processes left behind: {procs:?}");
    }
}

/// Pids of nbdfuse processes whose command line mentions `needle`.
pub fn nbdfuse_processes(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.starts_with("nbdfuse") && cmdline.contains(needle) {
            out.push(pid);
        }
    }
    out
}

pub fn mount_cap(fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

pub fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(p))
}

pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

impl Drop for Env {
    /// Best-effort cleanup, so a failing test does not leave mounts, loop devices or nbdfuse
    /// processes behind for the next one (a passing test has already asserted there are none).
    fn drop(&mut self) {
        let root = self.dir.path().to_str().unwrap().to_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        // File systems and bind mounts first, then the loop devices, then the FUSE mounts
        // they were backed by (unmounting FUSE first would orphan the loop devices).
        let points = |fuse: bool| {
            let mut v: Vec<String> = mounts
                .lines()
                .filter(|l| l.contains(" - fuse") == fuse)
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| p.starts_with(&root))
                .map(str::to_owned)
                .collect();
            v.sort_by_key(|p| std::cmp::Reverse(p.len()));
            v
        };
        for p in points(false) {
            let _ = Command::new("umount").args(["-l", &p]).status();
        }
        for e in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file"));
            if backing.is_ok_and(|b| b.starts_with(&root)) {
                let dev = format!("/dev/{}", e.file_name().to_string_lossy());
                let _ = Command::new("losetup").args(["-d", &dev]).status();
            }
        }
        for p in points(true) {
            let _ = Command::new("umount").args(["-l", &p]).status();
        }
        for pid in nbdfuse_processes(&root) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
