//! A stand-alone launcher for the two plugins, for tests and for running the driver before the
//! `trireme csi controller|node` subcommands are wired into the main binary.

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use trireme_csi::{ControllerArgs, NodeArgs};

#[derive(Parser)]
#[command(name = "trireme-csi", about = "Trireme's CSI plugins")]
struct Cli {
    #[command(subcommand)]
    plugin: Plugin,
}

#[derive(Subcommand)]
enum Plugin {
    /// The controller plugin (Identity + Controller services).
    Controller(ControllerArgs),
    /// The node plugin (Identity + Node services).
    Node(NodeArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        on_signal.cancel();
    });
    match cli.plugin {
        Plugin::Controller(args) => trireme_csi::run_controller(args, shutdown).await,
        Plugin::Node(args) => trireme_csi::run_node(args, shutdown).await,
    }
}
