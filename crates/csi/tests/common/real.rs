//! A real local cluster: `trireme up` (control plus three engines with file-backed pools) in a
//! temporary data dir, stopped with SIGTERM on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use trireme_api::{Client, PoolState};

pub struct Cluster {
    pub api: String,
    pub token_file: PathBuf,
    pub client: Client,
    child: Child,
}

/// The `trireme` binary: `TRIREME_BIN`, else the workspace's debug build.
pub fn binary() -> Option<PathBuf> {
    if let Some(b) = std::env::var_os("TRIREME_BIN") {
        return Some(PathBuf::from(b));
    }
    None
}

/// A base port P with P, P+1 and P+10..P+20 free (up derives every port from P).
fn free_base_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Tests of one binary run in parallel in one process: each call takes its own slot, so
    // two clusters never pick the same range before either has bound it.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() as u16).wrapping_mul(31);
    loop {
        let slot = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(slot < 1000, "no free port range");
        let p = 20000 + seed.wrapping_add(slot.wrapping_mul(40)) % 40000;
        let ports = [p, p + 1].into_iter().chain(p + 10..p + 20);
        if ports.into_iter().all(|q| std::net::TcpListener::bind(("127.0.0.1", q)).is_ok()) {
            return p;
        }
    }
}

impl Cluster {
    pub async fn start(bin: &Path, dir: &Path) -> Self {
        let data = dir.join("cluster");
        let port = free_base_port();
        let api = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("up.log")).unwrap();
        let child = Command::new(bin)
            .args(["up", "--nodes", "3", "--pool-size", "512MiB", "--data-dir"])
            .arg(&data)
            .args(["--api", &api])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let token_file = data.join("control/admin.token");
        let start = Instant::now();
        let client = loop {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "trireme up did not come up; see {}",
                dir.join("up.log").display()
            );
            if let Ok(token) = std::fs::read_to_string(&token_file) {
                let client = Client::new(&api, Some(token.trim().to_owned())).unwrap();
                let pools = client.pools().await.unwrap_or_default();
                if pools.len() == 3 && pools.iter().all(|p| p.status.state == PoolState::Online) {
                    break client;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Self { api, token_file, client, child }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
