//! The cluster harness: a real `trireme up` (control + N engine processes) in a tempdir, on a
//! random free port range, driven through its REST API, its CLI and signals.
//!
//! ```text
//!  test ──spawn──> trireme up --data-dir D --api 127.0.0.1:P   (own process group)
//!                    ├── control   REST :P, gRPC :P+1
//!                    └── engine i  gRPC :P+10+2i, NBD :P+11+2i, pool D/node-i/pool.img
//! ```
//!
//! Every method panics with a full explanation when the cluster misbehaves (these are test
//! helpers). Dropping a [`Cluster`] kills every process it started, and when the test is
//! failing it prints the tail of every log file first, so a failure report names the culprit.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use trireme_api::{Client, CreateVolumeBody, PublishBody, Volume};
use trireme_types::{ByteSize, Name, NodeState};

use crate::procs;
use crate::tools::{self, describe_output, tail};

/// How long a fresh cluster may take to become ready on a loaded 2-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `up` may take to stop after SIGTERM/SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(45);
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// A running (or stopped) local cluster.
pub struct Cluster {
    root: Option<tempfile::TempDir>,
    root_path: PathBuf,
    data_dir: PathBuf,
    nodes: usize,
    pool_size: ByteSize,
    base: u16,
    up: Option<Child>,
    runs: usize,
    admin_token: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("data_dir", &self.data_dir)
            .field("nodes", &self.nodes)
            .field("base", &self.base)
            .finish()
    }
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

impl Cluster {
    /// Starts `trireme up` with `nodes` engines and pools of `pool_size`, and waits until the API
    /// is ready and every node and pool is online.
    pub async fn start(nodes: usize, pool_size: ByteSize) -> Self {
        let root = tempfile::Builder::new()
            .prefix("trireme-test-")
            .tempdir_in(
                std::env::var_os("TRIREME_TEST_TMPDIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(std::env::temp_dir),
            )
            .expect("create tempdir");
        let root_path = root.path().to_path_buf();
        let data_dir = root_path.join("data");
        let mut c = Cluster {
            root: Some(root),
            root_path,
            data_dir,
            nodes,
            pool_size,
            base: 0,
            up: None,
            runs: 0,
            admin_token: String::new(),
        };
        let mut last_err = String::new();
        for attempt in 0..5 {
            c.base = pick_base(nodes);
            c.spawn_up();
            match c.try_wait_ready(READY_TIMEOUT).await {
                Ok(()) => return c,
                Err(e) => {
                    let text = c.logs();
                    let collided = text.contains("in use") || text.contains("AddrInUse");
                    if !collided || attempt == 4 {
                        panic!("the cluster did not become ready: {e}");
                    }
                    last_err = e;
                    c.kill_all();
                    // A fresh data dir: the failed run may have half-initialised it.
                    std::fs::remove_dir_all(&c.data_dir).ok();
                }
            }
        }
        panic!("the cluster did not start after 5 port choices: {last_err}");
    }

    // ------------------------------------------------------------ addresses

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
    pub fn nodes(&self) -> usize {
        self.nodes
    }
    pub fn api_port(&self) -> u16 {
        self.base
    }
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.base)
    }
    pub fn engine_grpc_port(&self, i: usize) -> u16 {
        self.base + 10 + 2 * i as u16
    }
    pub fn engine_nbd_port(&self, i: usize) -> u16 {
        self.base + 11 + 2 * i as u16
    }
    pub fn pool_file(&self, i: usize) -> PathBuf {
        self.data_dir.join(format!("node-{i}")).join("pool.img")
    }
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    // ------------------------------------------------------------ clients

    /// A REST client with the admin token.
    pub fn client(&self) -> Client {
        Client::new(&self.api_url(), Some(self.admin_token.clone())).expect("client")
    }

    /// A REST client with no token at all.
    pub fn anonymous_client(&self) -> Client {
        Client::new(&self.api_url(), None).expect("client")
    }

    /// A REST client with a viewer token, read from `DIR/control/viewer.token`.
    pub fn viewer_client(&self) -> Client {
        let path = self.data_dir.join("control").join("viewer.token");
        let token = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "no viewer token at {} ({e}); `trireme up` is expected to write one next to \
                 admin.token so viewer access can be tested",
                path.display()
            )
        });
        Client::new(&self.api_url(), Some(token.trim().to_owned())).expect("client")
    }

    /// Runs `trireme <args>` against this cluster: the API address and admin token go in
    /// through `TRIREME_API` / `TRIREME_TOKEN` (DESIGN.md's environment for `--api`/`--token`),
    /// so the arguments are exactly what a user would type after exporting them.
    pub async fn cli<S: AsRef<str>>(&self, args: &[S]) -> Output {
        self.cli_env(
            args,
            &[("TRIREME_API", &self.api_url()), ("TRIREME_TOKEN", &self.admin_token)],
        )
        .await
    }

    /// Runs `trireme <args>` with exactly the given `TRIREME_*` environment (others removed).
    pub async fn cli_env<S: AsRef<str>>(&self, args: &[S], env: &[(&str, &str)]) -> Output {
        let bin = tools::trireme_bin();
        let cmd =
            tools::command_line("trireme", &args.iter().map(|a| a.as_ref()).collect::<Vec<_>>());
        let mut c = tokio::process::Command::new(&bin);
        c.args(args.iter().map(|a| a.as_ref()))
            .env_remove("TRIREME_API")
            .env_remove("TRIREME_TOKEN")
            .env_remove("TRIREME_DATA_DIR")
            // No local `up` of the user's may be picked up by the CLI's defaults.
            .env("HOME", &self.root_path)
            .env("XDG_DATA_HOME", self.root_path.join("xdg"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        match tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("`{cmd}`: {e}"),
            Err(_) => panic!("`{cmd}` did not finish within {CLI_TIMEOUT:?}"),
        }
    }

    /// Runs the CLI and panics with its output unless it succeeds; returns stdout.
    pub async fn cli_ok<S: AsRef<str>>(&self, args: &[S]) -> String {
        let out = self.cli(args).await;
        if !out.status.success() {
            let cmd = tools::command_line(
                "trireme",
                &args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
            );
            panic!("the CLI failed\n{}", describe_output(&cmd, &out));
        }
        tools::stdout(&out)
    }

    // ------------------------------------------------------------ processes

    pub fn up_pid(&self) -> Option<i32> {
        self.up.as_ref().map(|c| c.id() as i32)
    }

    /// Whether `up` itself is still running.
    pub fn up_running(&mut self) -> bool {
        match self.up.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Every live process `up` started (directly or not).
    pub fn children(&self) -> Vec<procs::ProcInfo> {
        let mut out = self.up_pid().map(procs::descendants).unwrap_or_default();
        let needle = self.data_dir.to_string_lossy().into_owned();
        for p in procs::mentioning(&needle) {
            if Some(p.pid) != self.up_pid() && !out.iter().any(|o| o.pid == p.pid) {
                out.push(p);
            }
        }
        out.retain(|p| p.state != 'Z' && p.state != 'X');
        out
    }

    /// The pid of engine `i` (1-based), if running.
    pub fn engine_pid(&self, i: usize) -> Option<i32> {
        let node = format!("node-{i}");
        let from_proc = self
            .children()
            .into_iter()
            .filter(|p| {
                p.args.iter().any(|a| a == "engine") && procs::args_name_node(&p.args, &node)
            })
            .map(|p| p.pid)
            .min();
        from_proc.or_else(|| self.pid_from_up_json(&node).filter(|&p| procs::is_alive(p)))
    }

    /// The pid of control, if running.
    pub fn control_pid(&self) -> Option<i32> {
        self.children().into_iter().find(|p| p.args.iter().any(|a| a == "control")).map(|p| p.pid)
    }

    /// A lenient read of `DIR/up.json`: the `pid` of the object that names `node`.
    fn pid_from_up_json(&self, node: &str) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir.join("up.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        fn find(v: &serde_json::Value, node: &str) -> Option<i32> {
            match v {
                serde_json::Value::Object(m) => {
                    let names = m.values().any(|x| x.as_str() == Some(node));
                    if names && let Some(pid) = m.get("pid").and_then(|p| p.as_i64()) {
                        return Some(pid as i32);
                    }
                    if let Some(inner) = m.get(node)
                        && let Some(pid) = inner.get("pid").and_then(|p| p.as_i64())
                    {
                        return Some(pid as i32);
                    }
                    m.values().find_map(|x| find(x, node))
                }
                serde_json::Value::Array(a) => a.iter().find_map(|x| find(x, node)),
                _ => None,
            }
        }
        find(&v, node)
    }

    /// Sends `sig` to engine `i` and returns the pid it had.
    pub fn kill_engine(&self, i: usize, sig: Signal) -> i32 {
        let pid = self.engine_pid(i).unwrap_or_else(|| panic!("engine {i} is not running"));
        assert!(procs::signal(pid, sig), "kill({pid}, {sig}) failed");
        pid
    }

    /// Waits until engine `i` runs under a pid other than `old_pid`, and its node and pool are
    /// online again.
    pub async fn wait_engine_restarted(&self, i: usize, old_pid: i32) -> i32 {
        let since_ms = now_ms();
        let pid = tools::wait_for(
            &format!("engine {i} to be restarted by up"),
            Duration::from_secs(60),
            || async {
                match self.engine_pid(i) {
                    Some(p) if p != old_pid => Ok(p),
                    other => Err(format!("engine pid {other:?}")),
                }
            },
        )
        .await;
        let client = self.client();
        let node = format!("node-{i}");
        let pool = format!("pool-{i}");
        tools::wait_for(
            &format!("{node} and {pool} online after the restart"),
            Duration::from_secs(90),
            || {
                let client = client.clone();
                let (node, pool) = (node.clone(), pool.clone());
                async move {
                    let n = client.node(&node).await.map_err(|e| e.to_string())?;
                    let p = client.pool(&pool).await.map_err(|e| e.to_string())?;
                    if n.status.state == NodeState::Online
                        && p.status.state == trireme_api::PoolState::Online
                        && n.status.last_seen_ms >= since_ms
                    {
                        Ok(())
                    } else {
                        Err(format!(
                            "node {:?}, pool {:?} {:?}",
                            n.status.state, p.status.state, p.status.error
                        ))
                    }
                }
            },
        )
        .await;
        pid
    }

    // ------------------------------------------------------------ lifecycle

    fn spawn_up(&mut self) {
        self.runs += 1;
        std::fs::create_dir_all(&self.data_dir).expect("create data dir");
        let out_path = self.root_path.join(format!("up-run{}.out", self.runs));
        let out = std::fs::File::create(&out_path).expect("create up output file");
        let err = out.try_clone().expect("clone file");
        let bin = tools::trireme_bin();
        let child = {
            use std::os::unix::process::CommandExt;
            let mut cmd = Command::new(&bin);
            cmd.arg("up")
                .arg("--data-dir")
                .arg(&self.data_dir)
                .arg("--nodes")
                .arg(self.nodes.to_string())
                .arg("--pool-size")
                .arg(self.pool_size.to_string())
                .arg("--api")
                .arg(format!("127.0.0.1:{}", self.base))
                .env("RUST_BACKTRACE", "1")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                // Its own process group: cleanup can reach every process it started, and the
                // test runner's own signals do not.
                .process_group(0);
            // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
            // which is async-signal-safe; it touches no memory shared with the parent.
            unsafe {
                // If the test process dies without running Drop (a runner's timeout kills it),
                // `up` dies with it, and `up` takes its own children down (their pdeathsig).
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
                });
            }
            cmd.spawn().unwrap_or_else(|e| panic!("cannot start {} up: {e}", bin.display()))
        };
        self.up = Some(child);
    }

    async fn try_wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let token_path = self.data_dir.join("control").join("admin.token");
        let mut last = String::from("nothing checked yet");
        loop {
            if !self.up_running() {
                let status = self.up.as_mut().and_then(|c| c.try_wait().ok().flatten());
                return Err(format!("`trireme up` exited early with {status:?}"));
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after {timeout:?}: {last}"));
            }
            match self.ready_once(&token_path).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn ready_once(&mut self, token_path: &Path) -> Result<(), String> {
        let token = std::fs::read_to_string(token_path)
            .map_err(|e| format!("no admin token at {}: {e}", token_path.display()))?;
        self.admin_token = token.trim().to_owned();
        let client = self.client();
        client.ready().await.map_err(|e| format!("/readyz: {e}"))?;
        let nodes = client.nodes().await.map_err(|e| format!("node list: {e}"))?;
        let online = nodes.iter().filter(|n| n.status.state == NodeState::Online).count();
        if online != self.nodes {
            return Err(format!("{online} of {} nodes online: {nodes:?}", self.nodes));
        }
        let pools = client.pools().await.map_err(|e| format!("pool list: {e}"))?;
        let online =
            pools.iter().filter(|p| p.status.state == trireme_api::PoolState::Online).count();
        if online != self.nodes {
            return Err(format!("{online} of {} pools online: {pools:?}", self.nodes));
        }
        Ok(())
    }

    /// Waits until the cluster is ready again (API up, every node and pool online).
    pub async fn wait_ready(&mut self) {
        if let Err(e) = self.try_wait_ready(READY_TIMEOUT).await {
            panic!("the cluster did not become ready: {e}");
        }
    }

    /// Sends `sig` to `up` (or, with `group`, to its whole process group as a terminal's
    /// Ctrl-C would) and waits for it to exit. Panics unless it exits 0 and leaves no process
    /// behind.
    pub async fn stop_with(&mut self, sig: Signal, group: bool) -> ExitStatus {
        let pid = self.up_pid().expect("up is not running");
        let before = self.children();
        if group {
            procs::signal_group(pid, sig);
        } else {
            procs::signal(pid, sig);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(s) = self.up.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                break s;
            }
            if Instant::now() > deadline {
                panic!("`trireme up` did not exit within {STOP_TIMEOUT:?} of {sig}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.up = None;
        assert!(
            status.success(),
            "`trireme up` exited with {status} after {sig}, expected a clean exit 0"
        );
        // Children must be gone too (give the kernel a moment to reap them).
        let left = tools::wait_for("every child of up to exit", Duration::from_secs(10), || {
            let before = before.clone();
            async move {
                let alive: Vec<_> =
                    before.iter().filter(|p| procs::is_alive(p.pid)).cloned().collect();
                if alive.is_empty() { Ok(()) } else { Err(format!("still running: {alive:?}")) }
            }
        });
        left.await;
        assert!(self.children().is_empty(), "processes left behind: {:?}", self.children());
        status
    }

    /// SIGTERM to `up` alone; it must stop its children and exit 0.
    pub async fn stop(&mut self) {
        self.stop_with(Signal::SIGTERM, false).await;
    }

    /// Starts a new `up` on the same data dir and ports and waits until ready.
    pub async fn restart(&mut self) {
        assert!(self.up.is_none(), "restart() needs a stopped cluster");
        self.spawn_up();
        self.wait_ready().await;
    }

    /// Starts a new `up` on the same data dir and waits only until the API answers `/readyz`
    /// (for tests where some node or pool is expected to stay unhealthy).
    pub async fn restart_api_only(&mut self) {
        assert!(self.up.is_none(), "restart_api_only() needs a stopped cluster");
        self.spawn_up();
        let deadline = Instant::now() + READY_TIMEOUT;
        let client = self.client();
        loop {
            assert!(self.up_running(), "`trireme up` exited during restart");
            if client.ready().await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the API did not answer /readyz within {READY_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// A crash of the whole machine's worth of processes: SIGKILL to `up` and every process it
    /// started, at once. `restart()` afterwards must resume the cluster.
    pub async fn crash(&mut self) {
        let victims = self.children();
        let pid = self.up_pid().expect("up is not running");
        procs::signal_group(pid, Signal::SIGKILL);
        for p in &victims {
            procs::signal(p.pid, Signal::SIGKILL);
        }
        if let Some(mut c) = self.up.take() {
            c.wait().ok();
        }
        tools::wait_for("every process of the cluster to die", Duration::from_secs(20), || {
            let victims = victims.clone();
            async move {
                let alive: Vec<_> = victims.iter().filter(|p| procs::is_alive(p.pid)).collect();
                if alive.is_empty() { Ok(()) } else { Err(format!("{alive:?}")) }
            }
        })
        .await;
    }

    /// Kills everything without ceremony (also what Drop does).
    pub fn kill_all(&mut self) {
        let mut victims = self.children();
        if let Some(pid) = self.up_pid() {
            procs::signal_group(pid, Signal::SIGKILL);
        }
        if let Some(mut c) = self.up.take() {
            c.kill().ok();
            c.wait().ok();
        }
        victims.extend(self.children());
        for p in victims {
            procs::signal(p.pid, Signal::SIGKILL);
        }
    }

    // ------------------------------------------------------------ logs

    /// The tail of every log file of the cluster, for failure messages.
    pub fn logs(&self) -> String {
        let mut files = Vec::new();
        collect_files(&self.data_dir.join("logs"), &mut files);
        if let Ok(rd) = std::fs::read_dir(&self.root_path) {
            files.extend(
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "out")),
            );
        }
        files.sort();
        let mut out = format!("===== cluster logs ({}) =====\n", self.root_path.display());
        for f in files {
            let text = std::fs::read(&f)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            out.push_str(&format!("----- {} ({} bytes, tail) -----\n", f.display(), text.len()));
            out.push_str(tail(&text, 12_000));
            out.push('\n');
        }
        out
    }

    // ------------------------------------------------------------ volumes

    /// Creates a volume (1 replica, thick) and returns it.
    pub async fn create_volume(&self, name: &str, size: ByteSize) -> Volume {
        self.create_volume_with(name, size, false).await
    }

    /// Creates a 1-replica volume, thin or thick, and returns it.
    pub async fn create_volume_with(&self, name: &str, size: ByteSize, thin: bool) -> Volume {
        let body = CreateVolumeBody {
            name: Name::new(name).expect("valid name"),
            id: None,
            size,
            replicas: 1,
            thin,
        };
        self.client()
            .create_volume(&body)
            .await
            .unwrap_or_else(|e| panic!("create volume {name} of {size}: {e}"))
    }

    /// Publishes a volume and returns its NBD URI once its target reports one.
    pub async fn publish(&self, volume: &str) -> String {
        let v = self
            .client()
            .publish_volume(volume, &PublishBody::default())
            .await
            .unwrap_or_else(|e| panic!("publish volume {volume}: {e}"));
        if let Some(t) = &v.status.target {
            return t.uri.clone();
        }
        self.wait_target(volume).await
    }

    /// Waits until the volume's target reports a URI, and returns it.
    pub async fn wait_target(&self, volume: &str) -> String {
        let client = self.client();
        tools::wait_for(&format!("the target of volume {volume}"), Duration::from_secs(60), || {
            let client = client.clone();
            async move {
                let v = client.volume(volume).await.map_err(|e| e.to_string())?;
                match &v.status.target {
                    Some(t) => Ok(t.uri.clone()),
                    None => Err(format!("no target yet: {:?}", v.status)),
                }
            }
        })
        .await
    }

    /// Creates and publishes a volume; returns it and its NBD URI.
    pub async fn create_published(&self, name: &str, size: ByteSize) -> (Volume, String) {
        let v = self.create_volume(name, size).await;
        let uri = self.publish(name).await;
        assert!(
            uri.starts_with("nbd://") && uri.ends_with(&v.id.to_string()),
            "publish returned {uri:?}, expected nbd://host:port/{}",
            v.id
        );
        (v, uri)
    }

    /// Waits until an NBD client can open the export (e.g. after an engine restart).
    pub async fn wait_nbd(&self, uri: &str) {
        tools::wait_for(
            &format!("NBD export {uri} to accept clients"),
            Duration::from_secs(90),
            || async {
                let opts = trireme_nbd::ClientOptions::default();
                trireme_nbd::Client::connect_uri(uri, opts)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
        )
        .await
    }

    /// The engine index (1-based) of the node a volume is published on.
    pub async fn target_engine(&self, volume: &str) -> usize {
        let v = self
            .client()
            .volume(volume)
            .await
            .unwrap_or_else(|e| panic!("get volume {volume}: {e}"));
        let node =
            v.status.target.map(|t| t.node).or(v.spec.publish).expect("volume is not published");
        node_index(node.as_str())
    }
}

/// `node-3` → 3.
pub fn node_index(node: &str) -> usize {
    node.strip_prefix("node-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("node {node:?} is not named node-<i>"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.filter_map(|e| e.ok()) {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// A random port base with every port the cluster will use free right now.
fn pick_base(nodes: usize) -> u16 {
    use rand::Rng;
    let span = 12 + 2 * nodes as u16;
    let mut rng = rand::rng();
    for _ in 0..200 {
        let base: u16 = rng.random_range(20_000..(60_000 - span));
        let mut ports = vec![base, base + 1];
        for i in 1..=nodes as u16 {
            ports.push(base + 10 + 2 * i);
            ports.push(base + 11 + 2 * i);
        }
        if ports.into_iter().all(port_free) {
            return base;
        }
    }
    panic!("no free port range found");
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if failing {
            eprintln!("{}", self.logs());
            let procs: Vec<String> =
                self.children().iter().map(|p| format!("{} {}", p.pid, p.args.join(" "))).collect();
            eprintln!("===== cluster processes at failure =====\n{}", procs.join("\n"));
        }
        self.kill_all();
        if failing
            && std::env::var_os("TRIREME_TEST_KEEP").is_some()
            && let Some(root) = self.root.take()
        {
            eprintln!("kept the cluster's directory: {}", root.keep().display());
        }
    }
}
