//! `trireme control` flags (each also read from `TRIREME_*` environment variables).

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct ControlArgs {
    /// Where the REST API (and /metrics, /healthz) listens.
    #[arg(long, env = "TRIREME_API_LISTEN", default_value = "127.0.0.1:7480")]
    pub api_listen: SocketAddr,
    /// Where the gRPC registry that engines register with listens.
    #[arg(long, env = "TRIREME_GRPC_LISTEN", default_value = "127.0.0.1:7481")]
    pub grpc_listen: SocketAddr,
    /// Holds the store (control.redb) and the admin.token / viewer.token files.
    #[arg(long, env = "TRIREME_DATA_DIR", default_value = "/var/lib/trireme/control")]
    pub data_dir: PathBuf,
    /// Seconds without a heartbeat after which a node is offline.
    #[arg(long, env = "TRIREME_NODE_TIMEOUT_SECS", default_value_t = 10)]
    pub node_timeout_secs: u64,
    /// Seconds one call to an engine may take (below the engines' own 120 s limit). A thick
    /// replica's create zeroes its space within one call: raise this for large thick volumes
    /// on disks without a zeroing offload.
    #[arg(long, env = "TRIREME_ENGINE_CALL_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=110))]
    pub engine_call_secs: u64,
    /// Seconds between reconcile passes (they also run when something changes).
    #[arg(long, env = "TRIREME_RECONCILE_SECS", default_value_t = 2)]
    pub reconcile_secs: u64,
    /// Seconds a faulted replica must be reachable again before it is added back to its
    /// nexus (and between two attempts).
    #[arg(long, env = "TRIREME_CHILD_RETRY_SECS", default_value_t = 3)]
    pub child_retry_secs: u64,
    /// Seconds a replica may stay faulted before control places a new one elsewhere and drops
    /// it.
    #[arg(long, env = "TRIREME_REPLICA_REPLACE_SECS", default_value_t = 300)]
    pub replica_replace_secs: u64,
}

impl ControlArgs {
    /// Defaults with a given data dir and ephemeral ports (for tests and embedding).
    pub fn ephemeral(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            api_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.into(),
            node_timeout_secs: 10,
            engine_call_secs: 10,
            reconcile_secs: 2,
            child_retry_secs: 3,
            replica_replace_secs: 300,
        }
    }
}
