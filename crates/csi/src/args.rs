//! Command-line arguments of the two plugins (`trireme csi controller|node`).

use std::path::PathBuf;

use anyhow::Context as _;
use trireme_api::Client;

/// Where the plugin listens, and how it reaches control.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// The CSI endpoint: `unix:///path/csi.sock` or a plain socket path.
    #[arg(long, env = "TRIREME_CSI_ENDPOINT", default_value = "unix:///run/trireme/csi.sock")]
    pub endpoint: String,
    /// The Trireme REST API: a URL or host:port.
    #[arg(long, env = "TRIREME_API", default_value = "127.0.0.1:7480")]
    pub api: String,
    /// Bearer token for the REST API.
    #[arg(long, env = "TRIREME_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// A file holding the bearer token (re-read at start; a Kubernetes secret mount).
    #[arg(long, env = "TRIREME_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// `trireme csi controller`.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `trireme csi node`.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// This node's id as the controller sees it: the name of the Trireme node on this machine
    /// (the Kubernetes node name), so a volume's nexus runs next to its user.
    #[arg(long, env = "TRIREME_NODE_ID")]
    pub node_id: String,
    /// Where the plugin records what it attached, for recovery after a crash.
    #[arg(long, env = "TRIREME_CSI_STATE_DIR", default_value = "/var/lib/trireme/csi")]
    pub state_dir: PathBuf,
}

impl CommonArgs {
    /// The socket path of `--endpoint`.
    pub(crate) fn socket_path(&self) -> anyhow::Result<PathBuf> {
        let e = self.endpoint.trim();
        let path = e.strip_prefix("unix://").unwrap_or(e);
        anyhow::ensure!(
            path.starts_with('/'),
            "--endpoint {e:?} must be unix:///absolute/path or an absolute socket path"
        );
        Ok(PathBuf::from(path))
    }

    pub(crate) fn client(&self) -> anyhow::Result<Client> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.trim().to_owned()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --token-file {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        Ok(Client::new(&self.api, token)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(endpoint: &str) -> CommonArgs {
        CommonArgs {
            endpoint: endpoint.into(),
            api: "127.0.0.1:1".into(),
            token: None,
            token_file: None,
        }
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            common("unix:///tmp/x.sock").socket_path().unwrap(),
            PathBuf::from("/tmp/x.sock")
        );
        assert_eq!(common("/tmp/y.sock").socket_path().unwrap(), PathBuf::from("/tmp/y.sock"));
        assert!(common("tcp://1.2.3.4:5").socket_path().is_err());
        assert!(common("unix://relative").socket_path().is_err());
    }
}
