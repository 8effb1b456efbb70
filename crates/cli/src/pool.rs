//! `trireme pool …`: the disks or files each node carves replicas from.

use clap::{Args, Subcommand};
use trireme_api::{CreatePoolBody, Pool};
use trireme_types::{ByteSize, NodeId, PoolId};

use crate::output::{self, Output, Tabular, emit};
use crate::{CliError, Ctx, GlobalOpts};

#[derive(Debug, Args)]
pub struct PoolArgs {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: PoolCommand,
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// List every pool.
    #[command(visible_alias = "ls")]
    List,
    /// Show one pool.
    Get { pool: PoolId },
    /// Create a pool on a node's disk or file (idempotent).
    Create {
        pool: PoolId,
        /// The node whose engine owns the disk.
        #[arg(long)]
        node: NodeId,
        /// A block device or file path, or a file:// URI.
        #[arg(long, value_name = "URI")]
        disk: String,
        /// For a file that does not exist yet: its size (KiB, MiB, GiB, TiB).
        #[arg(long)]
        size: Option<ByteSize>,
    },
    /// Delete a pool that holds no replicas.
    #[command(visible_alias = "rm")]
    Delete { pool: PoolId },
}

impl Tabular for Pool {
    const HEADERS: &'static [&'static str] =
        &["NAME", "NODE", "STATE", "CAPACITY", "USED", "FREE", "REPLICAS"];
    fn row(&self) -> Vec<String> {
        let s = &self.status;
        vec![
            self.id.to_string(),
            self.spec.node.to_string(),
            output::wire_name(&s.state),
            s.capacity.to_string(),
            s.used.to_string(),
            s.free.to_string(),
            s.replicas.to_string(),
        ]
    }
}

pub(crate) async fn run(args: PoolArgs) -> Result<(), CliError> {
    let ctx = Ctx::new(&args.global)?;
    let fail = |e| ctx.fail(e);
    match args.command {
        PoolCommand::List => {
            let pools = ctx.client.pools().await.map_err(fail)?;
            emit(&output::list(&pools, ctx.output)?)
        }
        PoolCommand::Get { pool } => {
            let pool = ctx.client.pool(pool.as_str()).await.map_err(fail)?;
            emit(&output::one(&pool, ctx.output)?)
        }
        PoolCommand::Create { pool, node, disk, size } => {
            let body = CreatePoolBody { name: pool, node, disk, size };
            let pool = ctx.client.create_pool(&body).await.map_err(fail)?;
            emit(&output::one(&pool, ctx.output)?)
        }
        PoolCommand::Delete { pool } => {
            ctx.client.delete_pool(pool.as_str()).await.map_err(fail)?;
            emit(&deleted("pool", pool.as_str(), ctx.output))
        }
    }
}

/// What a successful delete prints: a sentence for people, nothing for programs (the exit code
/// says it all).
pub(crate) fn deleted(kind: &str, id: &str, format: Output) -> String {
    match format {
        Output::Table => format!("{kind} {id:?} deleted"),
        Output::Json | Output::Yaml => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use trireme_api::{PoolSpec, PoolState, PoolStatus};

    use super::*;

    #[test]
    fn pool_rows_print_sizes() {
        let p = Pool {
            id: PoolId::new("pool-1").unwrap(),
            spec: PoolSpec {
                node: NodeId::new("node-1").unwrap(),
                disk: "/d/node-1/pool.img".into(),
                size: Some(ByteSize::gib(4)),
            },
            status: PoolStatus {
                state: PoolState::Online,
                capacity: ByteSize::mib(4000),
                used: ByteSize::gib(1),
                free: ByteSize::mib(2976),
                replicas: 1,
                error: None,
            },
        };
        let t = output::list(&[p], Output::Table).unwrap();
        let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["NAME", "NODE", "STATE", "CAPACITY", "USED", "FREE", "REPLICAS"]);
        assert_eq!(rows[1], ["pool-1", "node-1", "online", "4000MiB", "1GiB", "2976MiB", "1"]);
    }

    #[test]
    fn deletes_say_so_only_to_people() {
        assert_eq!(deleted("pool", "p1", Output::Table), "pool \"p1\" deleted");
        assert_eq!(deleted("pool", "p1", Output::Json), "");
    }
}
