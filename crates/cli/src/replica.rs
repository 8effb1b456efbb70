//! `trireme replica …`: the copies of each volume's data, where they live and how they fare.

use clap::{Args, Subcommand};
use trireme_api::{RebuildInfo, Replica};
use trireme_types::{ChildState, Name};

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
        &["ID", "VOLUME", "NODE", "POOL", "SIZE", "STATE", "CHILD", "GENERATION", "REBUILD"];
    fn row(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.volume.to_string(),
            self.node.to_string(),
            self.pool.to_string(),
            self.size.to_string(),
            output::wire_name(&self.status.state),
            child_state(self.status.child),
            self.status.generation.to_string(),
            rebuild_progress(self.status.child),
        ]
    }
}

/// A child's state without its progress (that has its own column): `online`,
/// `faulted(timeout)`, `rebuilding`; `-` when the replica is no nexus's child.
pub(crate) fn child_state(child: Option<ChildState>) -> String {
    match child {
        Some(ChildState::Rebuilding { .. }) => "rebuilding".to_owned(),
        Some(c) => c.to_string(),
        None => "-".to_owned(),
    }
}

/// `done/total (pct%)` while a child rebuilds, else `-`.
pub(crate) fn rebuild_progress(child: Option<ChildState>) -> String {
    match child {
        Some(ChildState::Rebuilding { done_bytes, total_bytes }) => {
            let pct = if total_bytes == 0 {
                100
            } else {
                u128::from(done_bytes) * 100 / u128::from(total_bytes)
            };
            format!("{}/{} ({pct}%)", output::human(done_bytes), output::human(total_bytes))
        }
        _ => "-".to_owned(),
    }
}

/// The last finished rebuild, in one cell: `full:1GiB/2300ms`.
pub(crate) fn last_rebuild(info: Option<&RebuildInfo>) -> String {
    match info {
        Some(r) => format!(
            "{}:{}/{}ms",
            output::wire_name(&r.kind),
            output::human(r.copied.bytes()),
            r.duration_ms
        ),
        None => "-".to_owned(),
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
    use trireme_api::RebuildKind;
    use trireme_api::{ReplicaState, ReplicaStatus};
    use trireme_types::{ByteSize, FaultReason, NodeId, PoolId, ReplicaId, VolumeId};

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
        let mut rebuilding = r.clone();
        rebuilding.status.child =
            Some(ChildState::Rebuilding { done_bytes: 384 << 20, total_bytes: 1536 << 20 });
        rebuilding.status.generation = 7;
        let t = output::list(&[r, rebuilding], Output::Table).unwrap();
        let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(
            rows[0],
            ["ID", "VOLUME", "NODE", "POOL", "SIZE", "STATE", "CHILD", "GENERATION", "REBUILD"]
        );
        assert_eq!(
            rows[1][2..],
            ["node-2", "pool-2", "1536MiB", "online", "faulted(timeout)", "0", "-"]
        );
        assert_eq!(rows[2][6..], ["rebuilding", "7", "384MiB/1.5GiB", "(25%)"]);
    }

    #[test]
    fn rebuild_cells() {
        assert_eq!(rebuild_progress(Some(ChildState::Online)), "-");
        assert_eq!(
            rebuild_progress(Some(ChildState::Rebuilding { done_bytes: 0, total_bytes: 0 })),
            "0B/0B (100%)"
        );
        let info =
            RebuildInfo { kind: RebuildKind::Partial, copied: ByteSize::mib(3), duration_ms: 41 };
        assert_eq!(last_rebuild(Some(&info)), "partial:3MiB/41ms");
        assert_eq!(last_rebuild(None), "-");
    }
}
