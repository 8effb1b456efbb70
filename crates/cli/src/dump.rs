//! `trireme dump`: one file to attach to a bug report or hand to whoever is paged.
//!
//! ```text
//!   trireme-dump/manifest.json    when, which API, which version, and each part: ok or why not
//!   trireme-dump/api/*.json       nodes, pools, volumes, replicas (spec and status), events,
//!                                 health and readiness: everything the store holds, as the API shows it
//!   trireme-dump/api/metrics.txt  control's Prometheus metrics
//!   trireme-dump/local/…          for a local `trireme up`: up.json, each engine's pools.json and
//!                                 Prometheus metrics (NBD and disk latencies, rebuilds), and
//!                                 the last LOG_TAIL bytes of every server log
//! ```
//! A part that cannot be had is recorded in the manifest with the reason, and the bundle is
//! written anyway: at 3 a.m. the API may be the thing that is down, and the logs say why. Tokens
//! are never included.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use flate2::Compression;
use flate2::write::GzEncoder;
use serde::Serialize;
use trireme_api::{Client, ClientError};
use trireme_up::Layout;

use crate::{CliError, Endpoint, GlobalOpts};

/// The most of each log file kept: its end, where the failure is.
const LOG_TAIL: u64 = 16 << 20;
/// How long one engine may take to give its metrics.
const METRICS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The folder every entry of the archive is under.
const ROOT: &str = "trireme-dump";

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Where to write the bundle [default: trireme-dump-<unix time>.tar.gz in this directory]
    #[arg(short = 'o', long = "output", value_name = "PATH")]
    pub file: Option<PathBuf>,

    /// The Trireme API: a URL or host:port [default: the local `trireme up`, else
    /// http://127.0.0.1:7480]
    #[arg(long, env = "TRIREME_API", value_name = "URL")]
    pub api: Option<String>,

    /// Bearer token [default: the admin token of the local `trireme up`]
    #[arg(long, env = "TRIREME_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// The data directory of a local `trireme up` whose logs and state to include [default:
    /// up's default data directory, if it exists]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Manifest {
    created_unix_secs: u64,
    trireme_version: &'static str,
    api: String,
    parts: Vec<Part>,
}

#[derive(Debug, Serialize)]
struct Part {
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The archive being built, and the record of what went into it.
struct Bundle {
    tar: tar::Builder<GzEncoder<std::fs::File>>,
    parts: Vec<Part>,
    mtime: u64,
}

impl Bundle {
    fn add(&mut self, path: &str, data: &[u8]) -> Result<(), std::io::Error> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(self.mtime);
        header.set_cksum();
        self.tar.append_data(&mut header, format!("{ROOT}/{path}"), data)?;
        self.parts.push(Part { path: path.to_owned(), error: None });
        Ok(())
    }

    /// Adds what `got` produced, or records why there is nothing.
    fn add_or_note(
        &mut self,
        path: &str,
        got: Result<Vec<u8>, String>,
    ) -> Result<(), std::io::Error> {
        match got {
            Ok(data) => self.add(path, &data),
            Err(error) => {
                self.parts.push(Part { path: path.to_owned(), error: Some(error) });
                Ok(())
            }
        }
    }
}

pub(crate) async fn run(args: DumpArgs) -> Result<(), CliError> {
    let opts =
        GlobalOpts { api: args.api.clone(), token: args.token.clone(), ..Default::default() };
    let data_dir = args.data_dir.clone().or_else(trireme_up::default_data_dir);
    let endpoint = Endpoint::resolve(&opts, data_dir.as_deref())?;
    let client = endpoint.client()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let path =
        args.file.clone().unwrap_or_else(|| PathBuf::from(format!("trireme-dump-{now}.tar.gz")));
    let local = data_dir.filter(|d| d.is_dir());

    let write_err = |source| CliError::Dump { path: path.clone(), source };
    let file = std::fs::File::create(&path).map_err(write_err)?;
    let mut bundle = Bundle {
        tar: tar::Builder::new(GzEncoder::new(file, Compression::default())),
        parts: Vec::new(),
        mtime: now,
    };

    api_parts(&mut bundle, &client).await.map_err(write_err)?;
    if let Some(dir) = &local {
        let layout = Layout::new(dir);
        local_parts(&mut bundle, &layout).map_err(write_err)?;
        engine_metrics(&mut bundle, &layout).await.map_err(write_err)?;
    }

    let failed: Vec<String> = bundle
        .parts
        .iter()
        .filter_map(|p| p.error.as_ref().map(|e| format!("{} ({e})", p.path)))
        .collect();
    let manifest = Manifest {
        created_unix_secs: now,
        trireme_version: env!("CARGO_PKG_VERSION"),
        api: endpoint.api.clone(),
        parts: std::mem::take(&mut bundle.parts),
    };
    let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    bundle.add("manifest.json", &json).map_err(write_err)?;
    let gz = bundle.tar.into_inner().map_err(write_err)?;
    gz.finish().and_then(|mut f| f.flush()).map_err(write_err)?;

    println!("{}", path.display());
    if !failed.is_empty() {
        eprintln!("the bundle lacks {} part(s): {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

async fn api_parts(bundle: &mut Bundle, client: &Client) -> Result<(), std::io::Error> {
    fn json<T: Serialize>(r: Result<T, ClientError>) -> Result<Vec<u8>, String> {
        r.map_err(|e| e.to_string())
            .and_then(|v| serde_json::to_vec_pretty(&v).map_err(|e| e.to_string()))
    }
    bundle.add_or_note("api/health.json", json(client.health().await))?;
    bundle.add_or_note("api/ready.json", json(client.ready().await))?;
    bundle.add_or_note("api/nodes.json", json(client.nodes().await))?;
    bundle.add_or_note("api/pools.json", json(client.pools().await))?;
    bundle.add_or_note("api/volumes.json", json(client.volumes().await))?;
    bundle.add_or_note("api/replicas.json", json(client.replicas(None).await))?;
    bundle.add_or_note("api/events.json", json(client.events(None).await))?;
    let metrics = client.get_text("/metrics").await.map(String::into_bytes);
    bundle.add_or_note("api/metrics.txt", metrics.map_err(|e| e.to_string()))
}

/// The local `up`'s state and logs: everything in its data directory but the pool images and
/// the token files.
fn local_parts(bundle: &mut Bundle, layout: &Layout) -> Result<(), std::io::Error> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    bundle.add_or_note("local/up.json", read(&layout.state_file()))?;
    let mut nodes: Vec<PathBuf> =
        entries(layout.root()).into_iter().filter(|p| p.join("pools.json").is_file()).collect();
    nodes.sort();
    for node in nodes {
        let name = node.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        bundle.add_or_note(&format!("local/{name}/pools.json"), read(&node.join("pools.json")))?;
    }
    let mut logs: Vec<PathBuf> = entries(&layout.logs_dir())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let name = log.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        bundle.add_or_note(&format!("local/logs/{name}"), tail(&log, LOG_TAIL))?;
    }
    Ok(())
}

/// Each running engine's own metrics, found through `up.json`: control's cover the cluster,
/// these the data path of each node.
async fn engine_metrics(bundle: &mut Bundle, layout: &Layout) -> Result<(), std::io::Error> {
    let Ok(state) = trireme_up::UpState::read(&layout.state_file()) else {
        return Ok(()); // recorded as missing with local/up.json
    };
    for node in &state.nodes {
        let fetch = async {
            let addr = node.metrics.ok_or("up.json names no metrics address (an older up)")?;
            let client = Client::new(&addr.to_string(), None).map_err(|e| e.to_string())?;
            match tokio::time::timeout(METRICS_TIMEOUT, client.get_text("/metrics")).await {
                Ok(text) => text.map(String::into_bytes).map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer from {addr} within {METRICS_TIMEOUT:?}")),
            }
        };
        bundle.add_or_note(&format!("local/{}/metrics.txt", node.name), fetch.await)?;
    }
    Ok(())
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// The last `max` bytes of a file (a log still being written may grow meanwhile).
fn tail(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let why = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f = std::fs::File::open(path).map_err(why)?;
    let len = f.metadata().map_err(why)?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max))).map_err(why)?;
    let mut out = Vec::new();
    f.take(max).read_to_end(&mut out).map_err(why)?;
    Ok(out)
}
