//! `trireme volume …`: create, resize, publish over NBD, delete.

use std::time::Duration;

use clap::{Args, Subcommand};
use trireme_api::{CreateVolumeBody, PublishBody, Volume};
use trireme_types::{ByteSize, Name, NodeId};

use crate::output::{self, Output, Tabular, emit};
use crate::pool::deleted;
use crate::replica;
use crate::{CliError, Ctx, GlobalOpts};

/// How long `publish` waits for control to report the NBD URI if its answer lacks it.
const TARGET_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct VolumeArgs {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: VolumeCommand,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// List every volume.
    #[command(visible_alias = "ls")]
    List,
    /// Show one volume (by name or id).
    Get { volume: Name },
    /// Create a volume (idempotent by name).
    Create {
        volume: Name,
        /// Its size (KiB, MiB, GiB, TiB).
        #[arg(long)]
        size: ByteSize,
        /// How many copies of its data to keep.
        #[arg(long, default_value_t = 1)]
        replicas: u8,
        /// Allocate space as it is written rather than up front.
        #[arg(long)]
        thin: bool,
        /// Create it from a snapshot (not available yet).
        #[arg(long, value_name = "SNAPSHOT")]
        from_snapshot: Option<String>,
    },
    /// Delete a volume and its replicas.
    #[command(visible_alias = "rm")]
    Delete { volume: Name },
    /// Grow a volume.
    Resize {
        volume: Name,
        /// The new size (KiB, MiB, GiB, TiB).
        #[arg(long)]
        size: ByteSize,
    },
    /// Change how many replicas a volume keeps: new ones are rebuilt while it stays online;
    /// removing prefers faulted, then rebuilding, then remote replicas.
    SetReplicas {
        volume: Name,
        /// How many replicas to keep (1 up to the number of nodes able to hold one).
        replicas: u8,
    },
    /// Make a volume reachable over NBD; prints its nbd:// URI.
    Publish {
        volume: Name,
        /// The node to run its nexus on [default: a node holding one of its replicas].
        #[arg(long)]
        node: Option<NodeId>,
    },
    /// Stop serving a volume over NBD.
    Unpublish { volume: Name },
}

impl Tabular for Volume {
    const HEADERS: &'static [&'static str] = &["NAME", "ID", "SIZE", "REPLICAS", "STATE", "TARGET"];
    fn row(&self) -> Vec<String> {
        vec![
            self.name.to_string(),
            self.id.to_string(),
            self.spec.size.to_string(),
            self.spec.replicas.to_string(),
            self.status.state.to_string(),
            output::or_dash(self.status.target.as_ref().map(|t| t.uri.clone())),
        ]
    }
}

pub(crate) async fn run(args: VolumeArgs) -> Result<(), CliError> {
    let ctx = Ctx::new(&args.global)?;
    let fail = |e| ctx.fail(e);
    match args.command {
        VolumeCommand::List => {
            let volumes = ctx.client.volumes().await.map_err(fail)?;
            emit(&output::list(&volumes, ctx.output)?)
        }
        VolumeCommand::Get { volume } => {
            let volume = ctx.client.volume(volume.as_str()).await.map_err(fail)?;
            emit(&detail(&volume, ctx.output)?)
        }
        VolumeCommand::Create { from_snapshot: Some(_), .. } => {
            Err(CliError::NotAvailable("volume create --from-snapshot"))
        }
        VolumeCommand::Create { volume, size, replicas, thin, from_snapshot: None } => {
            let body = CreateVolumeBody { name: volume, id: None, size, replicas, thin };
            let volume = ctx.client.create_volume(&body).await.map_err(fail)?;
            emit(&output::one(&volume, ctx.output)?)
        }
        VolumeCommand::Delete { volume } => {
            ctx.client.delete_volume(volume.as_str()).await.map_err(fail)?;
            emit(&deleted("volume", volume.as_str(), ctx.output))
        }
        VolumeCommand::Resize { volume, size } => {
            let volume = ctx.client.resize_volume(volume.as_str(), size).await.map_err(fail)?;
            emit(&output::one(&volume, ctx.output)?)
        }
        VolumeCommand::SetReplicas { volume, replicas } => {
            let volume = ctx.client.set_replicas(volume.as_str(), replicas).await.map_err(fail)?;
            emit(&detail(&volume, ctx.output)?)
        }
        VolumeCommand::Publish { volume, node } => {
            let body = PublishBody { node };
            let published =
                ctx.client.publish_volume(volume.as_str(), &body).await.map_err(fail)?;
            let published = with_target(&ctx, published).await?;
            emit(&published_output(&published, ctx.output)?)
        }
        VolumeCommand::Unpublish { volume } => {
            let unpublished = ctx.client.unpublish_volume(volume.as_str()).await.map_err(fail)?;
            emit(&match ctx.output {
                Output::Table => format!("volume {:?} unpublished", volume.as_str()),
                format => output::one(&unpublished, format)?,
            })
        }
    }
}

/// One volume in full: in table mode its row, then one row per replica (where it lives, its
/// state as a child of the nexus, its generation, rebuild progress and last rebuild), then why
/// it is not online if control says.
fn detail(volume: &Volume, format: Output) -> Result<String, CliError> {
    if format != Output::Table {
        return output::one(volume, format);
    }
    let mut out = output::one(volume, format)?;
    let children = volume.status.target.as_ref().map(|t| t.children.as_slice()).unwrap_or(&[]);
    let rows = volume.status.replicas.iter().map(|r| {
        let child = children.iter().find(|c| c.replica == r.id);
        vec![
            r.id.to_string(),
            r.node.to_string(),
            r.pool.to_string(),
            output::wire_name(&r.status.state),
            replica::child_state(r.status.child.or(child.map(|c| c.state))),
            r.status.generation.to_string(),
            replica::rebuild_progress(r.status.child.or(child.map(|c| c.state))),
            replica::last_rebuild(
                r.status.last_rebuild.as_ref().or(child.and_then(|c| c.last_rebuild.as_ref())),
            ),
        ]
    });
    out.push_str("\n\n");
    out.push_str(&output::table(
        &["REPLICA", "NODE", "POOL", "STATE", "CHILD", "GENERATION", "REBUILD", "LAST-REBUILD"],
        rows,
    ));
    if let Some(message) = &volume.status.message {
        out.push_str(&format!("\n\n{message}"));
    }
    Ok(out)
}

/// Control answers publish once the nexus is up, with its URI; should an answer lack it (the
/// status not observed yet), poll the volume briefly rather than print nothing.
async fn with_target(ctx: &Ctx, mut volume: Volume) -> Result<Volume, CliError> {
    let deadline = tokio::time::Instant::now() + TARGET_WAIT;
    while target_uri(&volume).is_none() {
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::NoTarget(volume.name.to_string()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        volume = ctx.client.volume(&volume.id.to_string()).await.map_err(|e| ctx.fail(e))?;
    }
    Ok(volume)
}

fn target_uri(volume: &Volume) -> Option<&str> {
    volume.status.target.as_ref().map(|t| t.uri.as_str()).filter(|u| !u.is_empty())
}

/// In table mode just the URI, so that `uri=$(trireme volume publish v1)` works.
fn published_output(volume: &Volume, format: Output) -> Result<String, CliError> {
    match format {
        Output::Table => target_uri(volume)
            .map(str::to_owned)
            .ok_or_else(|| CliError::NoTarget(volume.name.to_string())),
        format => output::one(volume, format),
    }
}

#[cfg(test)]
mod tests {
    use trireme_api::{Target, VolumeSpec, VolumeStatus};
    use trireme_types::{NexusState, VolumeId, VolumeState};

    use super::*;

    pub(crate) fn volume(uri: Option<&str>) -> Volume {
        Volume {
            id: VolumeId::from_uuid(uuid::Uuid::nil()),
            name: Name::new("v1").unwrap(),
            spec: VolumeSpec { size: ByteSize::gib(1), replicas: 1, thin: false, publish: None },
            status: VolumeStatus {
                state: VolumeState::Online,
                target: uri.map(|u| Target {
                    node: NodeId::new("node-1").unwrap(),
                    uri: u.into(),
                    state: NexusState::Online,
                    children: vec![],
                }),
                replicas: vec![],
                generation: 0,
                message: None,
            },
        }
    }

    #[test]
    fn volume_rows() {
        let t = output::one(&volume(Some("nbd://127.0.0.1:7493/x")), Output::Table).unwrap();
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines[0], ["NAME", "ID", "SIZE", "REPLICAS", "STATE", "TARGET"]);
        assert_eq!(
            lines[1],
            [
                "v1",
                "00000000-0000-0000-0000-000000000000",
                "1GiB",
                "1",
                "online",
                "nbd://127.0.0.1:7493/x"
            ]
        );
        let t = output::one(&volume(None), Output::Table).unwrap();
        assert!(t.lines().nth(1).unwrap().trim_end().ends_with(" -"), "{t}");
    }

    #[test]
    fn get_shows_each_replica_with_its_child_state_and_rebuilds() {
        use trireme_api::{Child, RebuildInfo, RebuildKind, Replica, ReplicaState, ReplicaStatus};
        use trireme_types::{ChildState, PoolId, ReplicaId};
        let mut v = volume(Some("nbd://127.0.0.1:7493/x"));
        v.spec.replicas = 2;
        v.status.state = VolumeState::Degraded;
        v.status.message = Some("replica r2 is rebuilding".into());
        let replica = |n: u128, node: &str, child: ChildState| Replica {
            id: ReplicaId::from_uuid(uuid::Uuid::from_u128(n)),
            volume: v.id,
            pool: PoolId::new(format!("pool-{n}")).unwrap(),
            node: NodeId::new(node).unwrap(),
            size: ByteSize::gib(1),
            thin: false,
            status: ReplicaStatus {
                state: ReplicaState::Online,
                allocated: ByteSize::gib(1),
                child: Some(child),
                generation: 4,
                last_rebuild: None,
            },
        };
        let rebuilding = ChildState::Rebuilding { done_bytes: 256 << 20, total_bytes: 1 << 30 };
        v.status.replicas =
            vec![replica(1, "node-1", ChildState::Online), replica(2, "node-2", rebuilding)];
        // The last rebuild as the nexus reports it, when the replica's status lacks it.
        if let Some(t) = v.status.target.as_mut() {
            t.children.push(Child {
                replica: v.status.replicas[0].id,
                uri: "replica:///1".into(),
                state: ChildState::Online,
                last_rebuild: Some(RebuildInfo {
                    kind: RebuildKind::Full,
                    copied: ByteSize::mib(1536),
                    duration_ms: 2300,
                }),
            });
        }
        let t = detail(&v, Output::Table).unwrap();
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines[1][4], "degraded", "{t}");
        assert!(lines[2].is_empty(), "{t}");
        assert_eq!(
            lines[3],
            ["REPLICA", "NODE", "POOL", "STATE", "CHILD", "GENERATION", "REBUILD", "LAST-REBUILD"]
        );
        assert_eq!(
            lines[4][1..],
            ["node-1", "pool-1", "online", "online", "4", "-", "full:1.5GiB/2300ms"],
            "{t}"
        );
        assert_eq!(
            lines[5][1..],
            ["node-2", "pool-2", "online", "rebuilding", "4", "256MiB/1GiB", "(25%)", "-"],
            "{t}"
        );
        assert_eq!(t.lines().last(), Some("replica r2 is rebuilding"));
        // JSON stays the resource itself.
        let j: serde_json::Value =
            serde_json::from_str(&detail(&v, Output::Json).unwrap()).unwrap();
        assert_eq!(j["status"]["replicas"][1]["status"]["child"]["state"], "rebuilding");
        assert_eq!(j["status"]["replicas"][1]["status"]["child"]["done_bytes"], 256u64 << 20);
        assert_eq!(j["status"]["target"]["children"][0]["last_rebuild"]["kind"], "full");
    }

    #[test]
    fn publish_prints_only_the_uri_in_table_mode() {
        let v = volume(Some("nbd://127.0.0.1:7493/x"));
        assert_eq!(published_output(&v, Output::Table).unwrap(), "nbd://127.0.0.1:7493/x");
        let j: serde_json::Value =
            serde_json::from_str(&published_output(&v, Output::Json).unwrap()).unwrap();
        assert_eq!(j["status"]["target"]["uri"], "nbd://127.0.0.1:7493/x");
        assert_eq!(j["spec"]["size"], 1u64 << 30);
        assert!(matches!(
            published_output(&volume(None), Output::Table),
            Err(CliError::NoTarget(_))
        ));
    }
}
