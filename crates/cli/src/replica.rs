//! `trireme replica …`: the copies of each volume's data, where they live and how they fare.

use clap::{Args, Subcommand};
use trireme_api::Replica;
use trireme_types::Name;

use crate::output::{self, Tabular, emit};
use crate::{CliError, Ctx, GlobalOpts};

#[derive(Debug, Args)]
pub struct ReplicaArgs {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: ReplicaCommand,
}

#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// List replicas, of every volume or of one.
    #[command(visible_alias = "ls")]
    List {
        /// Only this volume's replicas (by name or id).
        #[arg(long)]
        volume: Option<Name>,
    },
}

impl Tabular for Replica {
    const HEADERS: &'static [&'static str] =
        &["ID", "VOLUME", "NODE", "POOL", "SIZE", "STATE", "CHILD"];
    fn row(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.volume.to_string(),
            self.node.to_string(),
            self.pool.to_string(),
            self.size.to_string(),
            output::wire_name(&self.status.state),
            output::or_dash(self.status.child.map(|c| c.to_string())),
        ]
    }
}

pub(crate) async fn run(args: ReplicaArgs) -> Result<(), CliError> {
    let ctx = Ctx::new(&args.global)?;
    match args.command {
        ReplicaCommand::List { volume } => {
            let replicas = ctx
                .client
                .replicas(volume.as_ref().map(Name::as_str))
                .await
                .map_err(|e| ctx.fail(e))?;
            emit(&output::list(&replicas, ctx.output)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use trireme_api::{ReplicaState, ReplicaStatus};
    use trireme_types::{ByteSize, ChildState, FaultReason, NodeId, PoolId, ReplicaId, VolumeId};

    use super::*;
    use crate::output::Output;

    #[test]
    fn replica_rows() {
        let r = Replica {
            id: ReplicaId::from_uuid(uuid::Uuid::nil()),
            volume: VolumeId::from_uuid(uuid::Uuid::max()),
            pool: PoolId::new("pool-2").unwrap(),
            node: NodeId::new("node-2").unwrap(),
            size: ByteSize::mib(1536),
            thin: true,
            status: ReplicaStatus {
                state: ReplicaState::Online,
                allocated: ByteSize::ZERO,
                child: Some(ChildState::Faulted { reason: FaultReason::Timeout }),
                generation: 0,
                last_rebuild: None,
            },
        };
        let t = output::list(&[r], Output::Table).unwrap();
        let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["ID", "VOLUME", "NODE", "POOL", "SIZE", "STATE", "CHILD"]);
        assert_eq!(rows[1][2..], ["node-2", "pool-2", "1536MiB", "online", "faulted(timeout)"]);
    }
}
