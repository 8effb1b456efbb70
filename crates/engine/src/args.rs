//! Command-line flags of `trireme engine`; each also read from a `TRIREME_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use trireme_types::NodeId;

#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// This node's name, as control knows it.
    #[arg(long, env = "TRIREME_NODE_ID")]
    pub node_id: NodeId,

    /// Address of the gRPC server control calls.
    #[arg(long, env = "TRIREME_GRPC_LISTEN", default_value = "127.0.0.1:7500")]
    pub grpc_listen: SocketAddr,

    /// host:port control should call (default: the bound gRPC address).
    #[arg(long, env = "TRIREME_GRPC_ADVERTISE")]
    pub grpc_advertise: Option<String>,

    /// Address of the NBD server that shares volumes and replicas.
    #[arg(long, env = "TRIREME_NBD_LISTEN", default_value = "127.0.0.1:10809")]
    pub nbd_listen: SocketAddr,

    /// host:port put in share URIs (default: the bound NBD address). Port 0 means the bound
    /// port.
    #[arg(long, env = "TRIREME_NBD_ADVERTISE")]
    pub nbd_advertise: Option<String>,

    /// Control's gRPC endpoint, a URL or host:port (e.g. http://127.0.0.1:7481). Without it the engine runs
    /// unregistered (useful for tests and manual use).
    #[arg(long, env = "TRIREME_CONTROL")]
    pub control: Option<String>,

    /// Directory for the engine's own state (the list of its pools).
    #[arg(long, env = "TRIREME_STATE_DIR", default_value = "/var/lib/trireme/engine")]
    pub state_dir: PathBuf,

    /// Seconds between heartbeats to control (control's answer to registration wins).
    #[arg(long, env = "TRIREME_HEARTBEAT_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_secs: u64,

    /// Address of the Prometheus `/metrics` endpoint; none when unset.
    #[arg(long, env = "TRIREME_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Milliseconds a remote child (a replica on another node) may take to answer one request
    /// before it is faulted.
    #[arg(long, env = "TRIREME_CHILD_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub child_timeout_ms: u64,

    /// Rebuild bandwidth limit for the whole engine, in MiB/s (0: unlimited).
    #[arg(long, env = "TRIREME_REBUILD_BANDWIDTH_MIB", default_value_t = 0)]
    pub rebuild_bandwidth_mib: u64,

    /// Rebuilds running at once on this engine (the others wait their turn).
    #[arg(long, env = "TRIREME_REBUILD_CONCURRENCY", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    pub rebuild_concurrency: u64,
}

impl EngineArgs {
    /// Arguments for tests and embedding: ephemeral ports on localhost, no control.
    pub fn local(node_id: NodeId, state_dir: PathBuf) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            node_id,
            grpc_listen: any,
            grpc_advertise: None,
            nbd_listen: any,
            nbd_advertise: None,
            control: None,
            state_dir,
            heartbeat_secs: 5,
            metrics_listen: None,
            child_timeout_ms: 5000,
            rebuild_bandwidth_mib: 0,
            rebuild_concurrency: 2,
        }
    }
}

/// The host:port to advertise for a listener bound at `bound`: the explicit one if given (with
/// port 0 replaced by the bound port), else the bound address, with an unspecified IP replaced
/// by loopback (nobody can connect to 0.0.0.0).
pub(crate) fn advertise(explicit: Option<&str>, bound: SocketAddr) -> String {
    if let Some(a) = explicit {
        return match a.rsplit_once(':') {
            Some((host, "0")) => format!("{host}:{}", bound.port()),
            Some(_) => a.to_owned(),
            None => format!("{a}:{}", bound.port()),
        };
    }
    let mut addr = bound;
    if addr.ip().is_unspecified() {
        tracing::warn!(%bound, "listening on all addresses; advertising loopback (set an advertise flag)");
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    addr.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    #[test]
    fn flags_parse_with_defaults() {
        let cli = Cli::try_parse_from(["t", "--node-id", "node-1"]).unwrap();
        assert_eq!(cli.engine.node_id.as_str(), "node-1");
        assert_eq!(cli.engine.grpc_listen, "127.0.0.1:7500".parse().unwrap());
        assert_eq!(cli.engine.nbd_listen, "127.0.0.1:10809".parse().unwrap());
        assert!(Cli::try_parse_from(["t", "--node-id", "Bad Name"]).is_err());
        assert!(Cli::try_parse_from(["t", "--node-id", "n", "--heartbeat-secs", "0"]).is_err());
        assert_eq!(cli.engine.child_timeout_ms, 5000);
        assert_eq!(cli.engine.rebuild_bandwidth_mib, 0);
        assert_eq!(cli.engine.rebuild_concurrency, 2);
        let tuned = Cli::try_parse_from([
            "t",
            "--node-id",
            "n",
            "--child-timeout-ms",
            "1500",
            "--rebuild-bandwidth-mib",
            "40",
            "--rebuild-concurrency",
            "4",
        ])
        .unwrap();
        assert_eq!(tuned.engine.child_timeout_ms, 1500);
        assert_eq!(tuned.engine.rebuild_bandwidth_mib, 40);
        assert_eq!(tuned.engine.rebuild_concurrency, 4);
        assert!(
            Cli::try_parse_from(["t", "--node-id", "n", "--rebuild-concurrency", "0"]).is_err()
        );
    }

    #[test]
    fn advertised_endpoints() {
        let bound: SocketAddr = "0.0.0.0:4000".parse().unwrap();
        assert_eq!(advertise(None, bound), "127.0.0.1:4000");
        assert_eq!(advertise(Some("node-a:0"), bound), "node-a:4000");
        assert_eq!(advertise(Some("node-a"), bound), "node-a:4000");
        assert_eq!(advertise(Some("node-a:9"), bound), "node-a:9");
        assert_eq!(advertise(None, "10.1.2.3:7".parse().unwrap()), "10.1.2.3:7");
    }
}
