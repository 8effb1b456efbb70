//! `trireme volume …`: create, resize, publish over NBD, delete.

use std::time::Duration;

use clap::{Args, Subcommand};
use trireme_api::{CreateVolumeBody, PublishBody, Volume};
use trireme_types::{ByteSize, Name, NodeId};

use crate::output::{self, Output, Tabular, emit};
use crate::pool::deleted;
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
    /// Change how many replicas a volume keeps (not available yet).
    SetReplicas { volume: Name, replicas: u8 },
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
            emit(&output::one(&volume, ctx.output)?)
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
        VolumeCommand::SetReplicas { .. } => Err(CliError::NotAvailable("volume set-replicas")),
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
