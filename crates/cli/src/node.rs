//! `trireme node …`: the storage nodes control knows.

use clap::{Args, Subcommand};
use trireme_api::Node;
use trireme_types::NodeId;

use crate::output::{self, Tabular, emit};
use crate::{CliError, Ctx, GlobalOpts};

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: NodeCommand,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List every node.
    #[command(visible_alias = "ls")]
    List,
    /// Show one node.
    Get { node: NodeId },
    /// Take no new replicas or nexuses on a node (not available yet).
    Cordon { node: NodeId },
    /// Undo cordon (not available yet).
    Uncordon { node: NodeId },
    /// Move replicas and nexuses off a node (not available yet).
    Drain { node: NodeId },
}

impl Tabular for Node {
    const HEADERS: &'static [&'static str] = &["NAME", "STATE", "GRPC", "NBD", "VERSION"];
    fn row(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.status.state.to_string(),
            output::or_dash(Some(self.status.grpc_endpoint.clone())),
            output::or_dash(Some(self.status.nbd_endpoint.clone())),
            output::or_dash(Some(self.status.version.clone())),
        ]
    }
}

pub(crate) async fn run(args: NodeArgs) -> Result<(), CliError> {
    let ctx = Ctx::new(&args.global)?;
    match args.command {
        NodeCommand::List => {
            let nodes = ctx.client.nodes().await.map_err(|e| ctx.fail(e))?;
            emit(&output::list(&nodes, ctx.output)?)
        }
        NodeCommand::Get { node } => {
            let node = ctx.client.node(node.as_str()).await.map_err(|e| ctx.fail(e))?;
            emit(&output::one(&node, ctx.output)?)
        }
        NodeCommand::Cordon { .. } => Err(CliError::NotAvailable("node cordon")),
        NodeCommand::Uncordon { .. } => Err(CliError::NotAvailable("node uncordon")),
        NodeCommand::Drain { .. } => Err(CliError::NotAvailable("node drain")),
    }
}

#[cfg(test)]
mod tests {
    use trireme_api::{NodeSpec, NodeStatus};
    use trireme_types::NodeState;

    use super::*;
    use crate::output::Output;

    #[test]
    fn node_rows() {
        let n = Node {
            id: NodeId::new("node-1").unwrap(),
            spec: NodeSpec::default(),
            status: NodeStatus {
                state: NodeState::Offline,
                grpc_endpoint: "127.0.0.1:7492".into(),
                nbd_endpoint: String::new(),
                version: "0.1.0".into(),
                last_seen_ms: 0,
            },
        };
        let t = output::one(&n, Output::Table).unwrap();
        let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["NAME", "STATE", "GRPC", "NBD", "VERSION"]);
        assert_eq!(rows[1], ["node-1", "offline", "127.0.0.1:7492", "-", "0.1.0"]);
    }
}
