//! Serves one in-memory export over NBD, for manual interop checks:
//!
//! ```text
//! cargo run -p trireme-nbd --features testing --example memserve -- 127.0.0.1:10809 mem 1GiB
//! nbdinfo nbd://127.0.0.1:10809/mem
//! ```
//! Arguments: listen address (default 127.0.0.1:10809), export name (default `mem`), size in
//! bytes or with a KiB/MiB/GiB suffix (default 1GiB). Ctrl-C stops it.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use trireme_nbd::testing::{MemExport, MemRegistry};
use trireme_nbd::{ServerConfig, serve_tcp};

fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = [("KiB", 1u64 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40)]
        .iter()
        .find_map(|(suffix, m)| s.strip_suffix(suffix).map(|n| (n, *m)))
        .unwrap_or((s, 1));
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let name = args.next().unwrap_or_else(|| "mem".into());
    let size_arg = args.next().unwrap_or_else(|| "1GiB".into());
    let size = parse_size(&size_arg).ok_or(format!("bad size {size_arg:?}"))?;

    let registry = Arc::new(MemRegistry::new());
    registry.insert(&name, "in-memory test export", Arc::new(MemExport::new(size)));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("serving nbd://{}/{name} ({size} bytes)", listener.local_addr()?);

    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    serve_tcp(listener, registry, ServerConfig::default(), shutdown).await?;
    Ok(())
}
