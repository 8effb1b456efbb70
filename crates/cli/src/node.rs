//! `trireme node …`: the storage nodes control knows.

use clap::{Args, Subcommand};
use trireme_api::Node;
use trireme_types::{NodeId, NodeState};

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
    /// Take no new replicas or nexuses on a node; what it holds stays.
    Cordon { node: NodeId },
    /// Let a node take new work again (stops a drain in progress).
    Uncordon { node: NodeId },
    /// Cordon a node and move its replicas and nexuses to other nodes, volumes staying
    /// online; the node shows `draining` until nothing is left, then `cordoned`.
    Drain { node: NodeId },
}

impl Tabular for Node {
    const HEADERS: &'static [&'static str] = &["NAME", "STATE", "GRPC", "NBD", "VERSION"];
    fn row(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            state(self),
            output::or_dash(Some(self.status.grpc_endpoint.clone())),
            output::or_dash(Some(self.status.nbd_endpoint.clone())),
            output::or_dash(Some(self.status.version.clone())),
        ]
    }
}

/// The node's state; an offline node also says whether it is cordoned or draining, which its
/// state alone (`offline`) would hide.
fn state(node: &Node) -> String {
    let state = node.status.state;
    match (state, node.spec.draining, node.spec.cordoned) {
        (NodeState::Offline, true, _) => format!("{state},draining"),
        (NodeState::Offline, false, true) => format!("{state},cordoned"),
        _ => state.to_string(),
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
        NodeCommand::Cordon { node } => {
            let node = ctx.client.cordon_node(node.as_str()).await.map_err(|e| ctx.fail(e))?;
            emit(&output::one(&node, ctx.output)?)
        }
        NodeCommand::Uncordon { node } => {
            let node = ctx.client.uncordon_node(node.as_str()).await.map_err(|e| ctx.fail(e))?;
            emit(&output::one(&node, ctx.output)?)
        }
        NodeCommand::Drain { node } => {
            let node = ctx.client.drain_node(node.as_str()).await.map_err(|e| ctx.fail(e))?;
            emit(&output::one(&node, ctx.output)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use trireme_api::{NodeSpec, NodeStatus};

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

    fn node(state: NodeState, cordoned: bool, draining: bool) -> Node {
        Node {
            id: NodeId::new("node-2").unwrap(),
            spec: NodeSpec { cordoned, draining },
            status: NodeStatus {
                state,
                grpc_endpoint: "127.0.0.1:7494".into(),
                nbd_endpoint: "127.0.0.1:7495".into(),
                version: "0.1.0".into(),
                last_seen_ms: 1,
            },
        }
    }

    #[test]
    fn cordoned_and_draining_nodes_say_so() {
        let state_of = |n: &Node| {
            output::one(n, Output::Table)
                .unwrap()
                .lines()
                .nth(1)
                .unwrap()
                .split_whitespace()
                .nth(1)
                .unwrap()
                .to_owned()
        };
        assert_eq!(state_of(&node(NodeState::Cordoned, true, false)), "cordoned");
        assert_eq!(state_of(&node(NodeState::Draining, true, true)), "draining");
        assert_eq!(state_of(&node(NodeState::Offline, true, false)), "offline,cordoned");
        assert_eq!(state_of(&node(NodeState::Offline, true, true)), "offline,draining");
        assert_eq!(state_of(&node(NodeState::Online, false, false)), "online");
        let j: serde_json::Value = serde_json::from_str(
            &output::one(&node(NodeState::Draining, true, true), Output::Json).unwrap(),
        )
        .unwrap();
        assert_eq!(j["status"]["state"], "draining");
        assert_eq!(j["spec"]["cordoned"], true);
        assert_eq!(j["spec"]["draining"], true);
        let y = output::one(&node(NodeState::Cordoned, true, false), Output::Yaml).unwrap();
        assert!(y.contains("state: cordoned"), "{y}");
    }
}
