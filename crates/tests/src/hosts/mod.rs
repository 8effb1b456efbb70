//! The multi-host harness: control and N engines as real processes, each engine in its own
//! network namespace ("host") on a per-test bridge, so faults are real: SIGKILL, a link taken
//! down, a host cut off from control, a disk that answers EIO.
//!
//! ```text
//!  test (root netns) ── REST ──> control      (netns trn<tag>-c, 10.a.b.2:7480 / gRPC :7481)
//!    │                              ▲ register, heartbeat, RecordChildren
//!    │                              │
//!    ├── fio / checker ── NBD ──> engine node-0 (netns trn<tag>-0, 10.a.b.10:10809) ── NBD ──┐
//!    │                            engine node-1 (netns trn<tag>-1, 10.a.b.11)  <─────────────┤
//!    │                            engine node-2 (netns trn<tag>-2, 10.a.b.12)  <─────────────┘
//!    └── pools: D/node-i/pool.img, or a loop device over nbdkit's error filter (FaultyDisk)
//! ```
//!
//! Needs root (namespaces, bridges, loop devices, FUSE). Every resource is named after the
//! test process's pid plus a counter, so tests can run side by side; everything is torn down
//! on Drop (also when the test panics, and then every log's tail is printed first), and
//! resources of test processes that died without cleaning up are swept at the next start.
//! Waits poll REST with generous deadlines; nothing sleeps blindly.

pub mod disk;
pub mod net;
pub mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use trireme_api::{
    Client, CreatePoolBody, CreateVolumeBody, Event, PoolState, PublishBody, Replica, Volume,
};
use trireme_types::{ByteSize, ChildState, Name, NodeId, NodeState, PoolId};

use crate::procs;
use crate::tools::{self, tail};
pub use disk::FaultyDisk;
pub use net::Net;

/// A fresh process on a loaded 2-core machine may take this long to be ready.
const READY: Duration = Duration::from_secs(120);
const ENGINE_GRPC_PORT: u16 = 7500;
pub const ENGINE_NBD_PORT: u16 = 10809;
const API_PORT: u16 = 7480;
const CONTROL_GRPC_PORT: u16 = 7481;

/// What to build.
#[derive(Debug, Clone)]
pub struct HostsConfig {
    pub hosts: usize,
    pub pool_size: ByteSize,
    /// Hosts whose pool lives on a [`FaultyDisk`] (the others on a plain file).
    pub faulty_disks: Vec<usize>,
    /// Extra `--flag value` pairs for every engine. Flags the binary under test does not know
    /// are left out (and said so on stderr), so tests can name flags before they land.
    pub engine_flags: Vec<(String, String)>,
    /// Extra `--flag value` pairs for control (same rule).
    pub control_flags: Vec<(String, String)>,
}

impl HostsConfig {
    /// `hosts` engines with 512 MiB file pools and the short timeouts fault tests want: a
    /// child times out after 2 s, control retries a returning child after 1 s, a node is
    /// offline after 5 s without heartbeat, and replacement of a lost replica waits 10 minutes
    /// (so a partial rebuild is what tests see unless they ask otherwise).
    pub fn new(hosts: usize) -> Self {
        let f = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        Self {
            hosts,
            pool_size: ByteSize::mib(512),
            faulty_disks: Vec::new(),
            engine_flags: vec![f("--heartbeat-secs", "1"), f("--child-timeout-ms", "2000")],
            control_flags: vec![
                f("--node-timeout-secs", "5"),
                f("--reconcile-secs", "1"),
                f("--child-retry-secs", "1"),
                f("--replica-replace-secs", "600"),
            ],
        }
    }

    /// Sets (or adds) an engine flag.
    pub fn engine_flag(mut self, flag: &str, value: &str) -> Self {
        set_flag(&mut self.engine_flags, flag, value);
        self
    }

    /// Sets (or adds) a control flag.
    pub fn control_flag(mut self, flag: &str, value: &str) -> Self {
        set_flag(&mut self.control_flags, flag, value);
        self
    }

    pub fn faulty_disks(mut self, hosts: &[usize]) -> Self {
        self.faulty_disks = hosts.to_vec();
        self
    }

    pub fn pool_size(mut self, size: ByteSize) -> Self {
        self.pool_size = size;
        self
    }
}

fn set_flag(flags: &mut Vec<(String, String)>, flag: &str, value: &str) {
    match flags.iter_mut().find(|(f, _)| f == flag) {
        Some(slot) => slot.1 = value.to_owned(),
        None => flags.push((flag.to_owned(), value.to_owned())),
    }
}

/// The flags `trireme <subcommand> --help` lists.
fn known_flags(subcommand: &str) -> String {
    let out = Command::new(tools::trireme_bin())
        .args([subcommand, "--help"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run trireme {subcommand} --help: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn supported(flags: &[(String, String)], subcommand: &str) -> Vec<String> {
    let help = known_flags(subcommand);
    let mut out = Vec::new();
    for (f, v) in flags {
        if help.contains(&format!("{f} ")) || help.contains(&format!("{f}=")) {
            out.push(f.clone());
            out.push(v.clone());
        } else {
            eprintln!("note: `trireme {subcommand}` has no {f} yet; running without it");
        }
    }
    out
}

/// One engine host.
#[derive(Debug)]
struct Engine {
    node: String,
    netns: String,
    addr: String,
    state_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    runs: u32,
}

/// A running multi-host cluster. See the module doc.
pub struct Hosts {
    cfg: HostsConfig,
    root_path: PathBuf,
    net: Option<Net>,
    control: Option<Child>,
    control_log: PathBuf,
    control_dir: PathBuf,
    engines: Vec<Engine>,
    disks: BTreeMap<usize, FaultyDisk>,
    engine_args: Vec<String>,
    control_args: Vec<String>,
    admin_token: String,
    root: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Hosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hosts")
            .field("root", &self.root_path)
            .field("net", &self.net)
            .field("engines", &self.engines)
            .finish()
    }
}

fn spawn_logged(mut cmd: Command, log: &Path, banner: &str) -> Child {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
    writeln!(f, "===== {banner} =====").ok();
    let err = f.try_clone().expect("clone log file");
    cmd.env("RUST_BACKTRACE", "1").stdin(Stdio::null()).stdout(f).stderr(err).process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        // If the test process dies without running Drop, its engines die with it.
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    cmd.spawn().unwrap_or_else(|e| panic!("cannot start {banner}: {e}"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Hosts {
    /// Builds the network, starts control and every engine, creates a pool on each, and waits
    /// until every node and pool is online.
    pub async fn start(cfg: HostsConfig) -> Hosts {
        disk::sweep_stale();
        let net = Net::create();
        let root = tempfile::Builder::new()
            .prefix(&format!("trireme-hosts-{}-", net.tag))
            .tempdir_in(
                std::env::var_os("TRIREME_TEST_TMPDIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(std::env::temp_dir),
            )
            .expect("create tempdir");
        let root_path = root.path().to_path_buf();
        std::fs::create_dir_all(root_path.join("logs")).expect("logs dir");
        let engine_args = supported(&cfg.engine_flags, "engine");
        let control_args = supported(&cfg.control_flags, "control");
        let mut h = Hosts {
            control_log: root_path.join("logs").join("control.log"),
            control_dir: root_path.join("control"),
            root_path,
            net: Some(net),
            control: None,
            engines: Vec::new(),
            disks: BTreeMap::new(),
            engine_args,
            control_args,
            admin_token: String::new(),
            root: Some(root),
            cfg,
        };
        h.net_mut().add_host("c", 2);
        for i in 0..h.cfg.hosts {
            let last = 10 + i as u8;
            let netns = h.net_mut().add_host(&i.to_string(), last);
            let addr = h.net().addr(last);
            let node = format!("node-{i}");
            let dir = h.root_path.join(&node);
            std::fs::create_dir_all(&dir).expect("node dir");
            h.engines.push(Engine {
                log: h.root_path.join("logs").join(format!("{node}.log")),
                node,
                netns,
                addr,
                state_dir: dir,
                child: None,
                runs: 0,
            });
        }
        for i in h.cfg.faulty_disks.clone() {
            let dir = h.root_path.join(format!("disk-{i}"));
            h.disks.insert(i, FaultyDisk::create(&dir, h.cfg.pool_size.bytes()));
        }
        h.start_control();
        h.wait_control().await;
        for i in 0..h.cfg.hosts {
            h.start_engine(i);
        }
        let client = h.client();
        for i in 0..h.cfg.hosts {
            h.wait_node_online(i, 0).await;
            let (disk, size) = match h.disks.get(&i) {
                Some(d) => (d.device().to_owned(), None),
                None => (
                    h.engines[i].state_dir.join("pool.img").display().to_string(),
                    Some(h.cfg.pool_size),
                ),
            };
            let body = CreatePoolBody {
                name: PoolId::new(format!("pool-{i}")).expect("pool name"),
                node: NodeId::new(h.engines[i].node.clone()).expect("node name"),
                disk,
                size,
            };
            client.create_pool(&body).await.unwrap_or_else(|e| panic!("create pool-{i}: {e}"));
        }
        for i in 0..h.cfg.hosts {
            h.wait_pool_online(i).await;
        }
        h
    }

    fn net(&self) -> &Net {
        self.net.as_ref().expect("network")
    }

    fn net_mut(&mut self) -> &mut Net {
        self.net.as_mut().expect("network")
    }

    // ------------------------------------------------------------ addresses and clients

    pub fn hosts(&self) -> usize {
        self.engines.len()
    }
    pub fn dir(&self) -> &Path {
        &self.root_path
    }
    pub fn control_addr(&self) -> String {
        self.net().addr(2)
    }
    pub fn api_url(&self) -> String {
        format!("http://{}:{API_PORT}", self.control_addr())
    }
    pub fn node(&self, i: usize) -> &str {
        &self.engines[i].node
    }
    /// The host index of a node name.
    pub fn host_of(&self, node: &str) -> usize {
        self.engines
            .iter()
            .position(|e| e.node == node)
            .unwrap_or_else(|| panic!("no host runs node {node:?}"))
    }
    /// host:port of engine `i`'s NBD server.
    pub fn nbd_endpoint(&self, i: usize) -> String {
        format!("{}:{ENGINE_NBD_PORT}", self.engines[i].addr)
    }
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }
    pub fn client(&self) -> Client {
        Client::new(&self.api_url(), Some(self.admin_token.clone())).expect("client")
    }

    /// Runs `trireme <args>` against this cluster (API and token through the environment);
    /// returns stdout, or panics with the whole output if it fails.
    pub async fn cli_ok(&self, args: &[&str]) -> String {
        let bin = tools::trireme_bin();
        let cmd = tools::command_line("trireme", args);
        let child = tokio::process::Command::new(&bin)
            .args(args)
            .env("TRIREME_API", self.api_url())
            .env("TRIREME_TOKEN", &self.admin_token)
            .env("HOME", &self.root_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let out =
            match tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await {
                Ok(Ok(out)) => out,
                Ok(Err(e)) => panic!("`{cmd}`: {e}"),
                Err(_) => panic!("`{cmd}` did not finish within 120s"),
            };
        if !out.status.success() {
            panic!("the CLI failed\n{}", tools::describe_output(&cmd, &out));
        }
        tools::stdout(&out)
    }

    // ------------------------------------------------------------ processes

    fn start_control(&mut self) {
        let ns = self.net().netns("c");
        let addr = self.control_addr();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns])
            .arg(tools::trireme_bin())
            .arg("control")
            .arg("--api-listen")
            .arg(format!("{addr}:{API_PORT}"))
            .arg("--grpc-listen")
            .arg(format!("{addr}:{CONTROL_GRPC_PORT}"))
            .arg("--data-dir")
            .arg(&self.control_dir)
            .args(&self.control_args);
        self.control = Some(spawn_logged(cmd, &self.control_log, "control"));
    }

    async fn wait_control(&mut self) {
        let anonymous = Client::new(&self.api_url(), None).expect("client");
        let token_path = self.control_dir.join("admin.token");
        let token = tools::wait_for("control to answer /readyz", READY, || {
            let anonymous = anonymous.clone();
            let token_path = token_path.clone();
            let exited = self.control.as_mut().and_then(|c| c.try_wait().ok().flatten());
            async move {
                if let Some(status) = exited {
                    panic!("control exited with {status} during startup");
                }
                anonymous.ready().await.map_err(|e| e.to_string())?;
                let t = std::fs::read_to_string(&token_path).map_err(|e| e.to_string())?;
                Ok(t.trim().to_owned())
            }
        })
        .await;
        self.admin_token = token;
    }

    /// Spawns engine `i` (it must not be running). Does not wait.
    pub fn start_engine(&mut self, i: usize) {
        let control = format!("http://{}:{CONTROL_GRPC_PORT}", self.control_addr());
        let args = self.engine_args.clone();
        let e = &mut self.engines[i];
        assert!(e.child.is_none(), "engine {i} is already running");
        e.runs += 1;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &e.netns])
            .arg(tools::trireme_bin())
            .arg("engine")
            .arg("--node-id")
            .arg(&e.node)
            .arg("--grpc-listen")
            .arg(format!("{}:{ENGINE_GRPC_PORT}", e.addr))
            .arg("--nbd-listen")
            .arg(format!("{}:{ENGINE_NBD_PORT}", e.addr))
            .arg("--control")
            .arg(control)
            .arg("--state-dir")
            .arg(&e.state_dir)
            .args(args);
        let banner = format!("{} run {}", e.node, e.runs);
        e.child = Some(spawn_logged(cmd, &e.log, &banner));
    }

    /// The pid of engine `i`, if this harness runs it.
    pub fn engine_pid(&self, i: usize) -> Option<i32> {
        self.engines[i].child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL to engine `i`; returns once it is reaped.
    pub fn kill9(&mut self, i: usize) {
        let mut c =
            self.engines[i].child.take().unwrap_or_else(|| panic!("engine {i} is not running"));
        c.kill().ok();
        c.wait().ok();
    }

    /// SIGTERM to engine `i`: waits (up to `timeout`) for it to exit and returns its status,
    /// or `None` if it was still running then (it is SIGKILLed in that case).
    pub async fn stop_engine(
        &mut self,
        i: usize,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let mut c =
            self.engines[i].child.take().unwrap_or_else(|| panic!("engine {i} is not running"));
        procs::signal(c.id() as i32, Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                c.kill().ok();
                c.wait().ok();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL to control (engines keep running, unrecorded changes wait for it).
    pub fn kill_control(&mut self) {
        if let Some(mut c) = self.control.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// Starts control again on the same data dir and waits until it answers.
    pub async fn restart_control(&mut self) {
        assert!(self.control.is_none(), "control is running");
        self.start_control();
        self.wait_control().await;
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) engine `i`.
    pub fn signal_engine(&self, i: usize, sig: Signal) {
        let pid = self.engine_pid(i).unwrap_or_else(|| panic!("engine {i} is not running"));
        assert!(procs::signal(pid, sig), "kill({pid}, {sig}) failed");
    }

    /// Starts engine `i` again and waits until its node heartbeats and its pool is online.
    pub async fn restart(&mut self, i: usize) {
        let since = now_ms();
        self.start_engine(i);
        self.wait_node_online(i, since).await;
        self.wait_pool_online(i).await;
    }

    /// Waits until node `i` is online with a heartbeat at or after `since_ms`.
    pub async fn wait_node_online(&mut self, i: usize, since_ms: u64) {
        let client = self.client();
        let node = self.engines[i].node.clone();
        let exited =
            |h: &mut Hosts| h.engines[i].child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        let deadline = tokio::time::Instant::now() + READY;
        loop {
            if let Some(status) = exited(self) {
                panic!("engine {node} exited with {status} while starting");
            }
            let last = match client.node(&node).await {
                Ok(n)
                    if n.status.state != NodeState::Offline
                        && n.status.last_seen_ms >= since_ms =>
                {
                    return;
                }
                Ok(n) => format!("{:?}, last seen {}", n.status.state, n.status.last_seen_ms),
                Err(e) => e.to_string(),
            };
            assert!(
                tokio::time::Instant::now() < deadline,
                "{node} did not come online within {READY:?}: {last}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn wait_pool_online(&self, i: usize) {
        let client = self.client();
        let pool = format!("pool-{i}");
        tools::wait_for(&format!("{pool} online"), READY, || {
            let client = client.clone();
            let pool = pool.clone();
            async move {
                let p = client.pool(&pool).await.map_err(|e| e.to_string())?;
                if p.status.state == PoolState::Online {
                    Ok(())
                } else {
                    Err(format!("{:?} {:?}", p.status.state, p.status.error))
                }
            }
        })
        .await
    }

    // ------------------------------------------------------------ faults

    /// Takes host `i`'s link down: it can reach nobody, nobody can reach it.
    pub fn cut_link(&self, i: usize) {
        self.net().cut(&i.to_string());
    }
    pub fn heal_link(&self, i: usize) {
        self.net().heal(&i.to_string());
    }
    /// Cuts host `i` off from control only (clients and other hosts still reach it).
    pub fn partition_from_control(&self, i: usize) {
        self.net().blackhole(&i.to_string(), &self.control_addr());
    }
    pub fn heal_from_control(&self, i: usize) {
        self.net().unblackhole(&i.to_string(), &self.control_addr());
    }
    /// Every I/O of host `i`'s pool disk fails with EIO (the host needs a faulty disk).
    pub fn fail_disk(&self, i: usize) {
        self.faulty(i).fail();
    }
    pub fn heal_disk(&self, i: usize) {
        self.faulty(i).heal();
    }
    fn faulty(&self, i: usize) -> &FaultyDisk {
        self.disks.get(&i).unwrap_or_else(|| {
            panic!("host {i} has no faulty disk: list it in HostsConfig::faulty_disks")
        })
    }

    // ------------------------------------------------------------ volumes

    /// Creates a thick volume with `replicas` replicas.
    pub async fn create_volume(&self, name: &str, size: ByteSize, replicas: u8) -> Volume {
        self.create_volume_with(name, size, replicas, false).await
    }

    /// Creates a thin or thick volume with `replicas` replicas.
    pub async fn create_volume_with(
        &self,
        name: &str,
        size: ByteSize,
        replicas: u8,
        thin: bool,
    ) -> Volume {
        let body = CreateVolumeBody {
            name: Name::new(name).expect("valid name"),
            id: None,
            size,
            replicas,
            thin,
        };
        self.client()
            .create_volume(&body)
            .await
            .unwrap_or_else(|e| panic!("create volume {name} ({size}, {replicas} replicas): {e}"))
    }

    /// Publishes `volume` on host `i` and waits until its target is online with every child
    /// online; returns the NBD URI.
    pub async fn publish(&self, volume: &str, i: usize) -> String {
        let body = PublishBody { node: Some(NodeId::new(self.node(i)).expect("node")) };
        self.client()
            .publish_volume(volume, &body)
            .await
            .unwrap_or_else(|e| panic!("publish {volume} on {}: {e}", self.node(i)));
        let v = self.wait_all_online(volume, READY).await;
        let t = v.status.target.expect("target");
        assert_eq!(t.node.as_str(), self.node(i), "published on the wrong node: {t:?}");
        t.uri
    }

    pub async fn volume(&self, volume: &str) -> Volume {
        self.client().volume(volume).await.unwrap_or_else(|e| panic!("get volume {volume}: {e}"))
    }

    /// Polls `volume get` until `check` accepts it.
    pub async fn wait_volume<T>(
        &self,
        volume: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Volume) -> Result<T, String>,
    ) -> T {
        let client = self.client();
        let check = &check;
        tools::wait_for(&format!("volume {volume}: {what}"), timeout, || {
            let client = client.clone();
            async move {
                let v = client.volume(volume).await.map_err(|e| e.to_string())?;
                check(&v).map_err(|why| format!("{why}\n  volume: {}", describe_volume(&v)))
            }
        })
        .await
    }

    /// Waits until the volume's target is up and every one of its children is online.
    pub async fn wait_all_online(&self, volume: &str, timeout: Duration) -> Volume {
        self.wait_volume(volume, "target up with every child online", timeout, |v| {
            let t = v.status.target.as_ref().ok_or("no target")?;
            let want = usize::from(v.spec.replicas);
            let online = t.children.iter().filter(|c| c.state == ChildState::Online).count();
            if online == want && t.children.len() == want {
                Ok(v.clone())
            } else {
                Err(format!("{online} of {want} children online"))
            }
        })
        .await
    }

    /// The replica of `volume` on host `i`.
    pub async fn replica_on(&self, volume: &str, i: usize) -> Replica {
        let v = self.volume(volume).await;
        v.status
            .replicas
            .iter()
            .find(|r| r.node.as_str() == self.node(i))
            .cloned()
            .unwrap_or_else(|| panic!("volume {volume} has no replica on {}: {v:?}", self.node(i)))
    }

    /// The read-only NBD URI of a replica (the epoch-less share, for checking its data).
    pub fn replica_uri(&self, r: &Replica) -> String {
        let host = self.host_of(r.node.as_str());
        format!("nbd://{}/replica-{}", self.nbd_endpoint(host), r.id)
    }

    /// The newest event's sequence number (0 if none).
    pub async fn last_event(&self) -> u64 {
        let events = self.client().events(None).await.unwrap_or_default();
        events.iter().map(|e| e.seq).max().unwrap_or(0)
    }

    pub async fn events_after(&self, seq: u64) -> Vec<Event> {
        self.client().events(Some(seq)).await.unwrap_or_else(|e| panic!("list events: {e}"))
    }

    // ------------------------------------------------------------ logs

    /// The tail of every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = format!("===== hosts logs ({}) =====\n", self.root_path.display());
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.root_path.join("logs"))
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        for f in files {
            let text = std::fs::read(&f)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            out.push_str(&format!("----- {} ({} bytes, tail) -----\n", f.display(), text.len()));
            out.push_str(tail(&text, 16_000));
            out.push('\n');
        }
        out
    }

    /// Lines of host `i`'s engine log (all runs) that contain `needle`.
    pub fn engine_log_lines(&self, i: usize, needle: &str) -> Vec<String> {
        let text = std::fs::read_to_string(&self.engines[i].log).unwrap_or_default();
        text.lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
    }

    fn kill_all(&mut self) {
        for e in &mut self.engines {
            if let Some(mut c) = e.child.take() {
                // A frozen engine must be thawed to die promptly on some kernels' accounting.
                procs::signal(c.id() as i32, Signal::SIGCONT);
                c.kill().ok();
                c.wait().ok();
            }
        }
        if let Some(mut c) = self.control.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

/// One line per child: node, state, last rebuild.
pub fn describe_volume(v: &Volume) -> String {
    let node_of = |id: &trireme_types::ReplicaId| {
        v.status
            .replicas
            .iter()
            .find(|r| &r.id == id)
            .map(|r| r.node.to_string())
            .unwrap_or_else(|| "?".into())
    };
    let mut s = format!(
        "{:?} gen {} replicas {} msg {:?}",
        v.status.state, v.status.generation, v.spec.replicas, v.status.message
    );
    match &v.status.target {
        None => s.push_str("; no target"),
        Some(t) => {
            s.push_str(&format!("; target on {} {:?}:", t.node, t.state));
            for c in &t.children {
                s.push_str(&format!(
                    " [{} {} {:?} last_rebuild {:?}]",
                    node_of(&c.replica),
                    c.replica,
                    c.state,
                    c.last_rebuild
                ));
            }
        }
    }
    s
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if failing {
            eprintln!("{}", self.logs());
        }
        self.kill_all();
        // Loop devices, FUSE mounts and nbdkit before the directory they live in.
        self.disks.clear();
        drop(self.net.take());
        if failing
            && std::env::var_os("TRIREME_TEST_KEEP").is_some()
            && let Some(root) = self.root.take()
        {
            eprintln!("kept the hosts' directory: {}", root.keep().display());
        }
    }
}
