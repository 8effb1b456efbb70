//! The `trireme` binary: every server and the CLI as subcommands of one executable (like Garage
//! or k3s). This file only wires: it parses flags, sets up logging and signals, and hands a
//! cancellation token to the chosen server.
//!
//! ```text
//!   trireme up | control | engine | csi …  servers: run until SIGINT/SIGTERM cancels the token
//!   trireme node | pool | volume | …       CLI: one REST call or a few (trireme-cli)
//! ```

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Trireme: replicated block storage for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "trireme", version, propagate_version = true, max_term_width = 100)]
struct Cli {
    /// Log format (logs go to stderr; filter with RUST_LOG, e.g. RUST_LOG=trireme_engine=debug).
    #[arg(long, value_enum, env = "TRIREME_LOG_FORMAT", default_value_t, global = true)]
    log_format: LogFormat,

    /// Async runtime threads of a server [default: one per CPU].
    #[arg(long, value_name = "N", env = "TRIREME_WORKER_THREADS", global = true)]
    worker_threads: Option<std::num::NonZeroUsize>,

    /// `-o`, `--api` and `--token` of client commands, typed before the noun.
    #[command(flatten)]
    leading: trireme_cli::LeadingOpts,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole cluster on this machine: control and N engines with file-backed pools.
    Up(trireme_up::UpArgs),
    /// Run the control plane: registry, reconcilers, REST API.
    Control(trireme_control::ControlArgs),
    /// Run a storage engine: pools, replicas, nexuses, NBD shares.
    Engine(trireme_engine::EngineArgs),
    /// Run a Kubernetes CSI plugin.
    #[command(subcommand)]
    Csi(CsiCommand),
    #[command(flatten)]
    Client(trireme_cli::Command),
}

#[derive(Debug, Subcommand)]
enum CsiCommand {
    /// The controller plugin: creates, publishes, expands and deletes volumes through control.
    Controller(trireme_csi::ControllerArgs),
    /// The node plugin: attaches, formats, mounts and unmounts volumes on this node.
    Node(trireme_csi::NodeArgs),
}

impl Command {
    fn is_server(&self) -> bool {
        !matches!(self, Self::Client(_))
    }
}

fn main() -> ExitCode {
    let mut cli = match parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_logging(cli.log_format, cli.command.is_server());
    if let Command::Up(args) = &mut cli.command {
        // The servers `up` starts log the way `up` itself does.
        let format = cli.log_format.to_possible_value().map(|v| v.get_name().to_owned());
        args.child_env.extend(format.map(|f| ("TRIREME_LOG_FORMAT".to_owned(), f)));
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.worker_threads {
        builder.worker_threads(n.get());
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command))
}

/// Parses the command line and applies client flags typed before the noun.
fn parse<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::{CommandFactory, FromArgMatches};
    let mut command = Cli::command();
    let matches = command.try_get_matches_from_mut(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    match (&mut cli.command, matches.subcommand()) {
        (Command::Client(client), Some((_, noun))) => client.apply_leading(&cli.leading, noun),
        (_, _) if !cli.leading.is_empty() => {
            return Err(command.error(
                clap::error::ErrorKind::ArgumentConflict,
                "-o, --api and --token before the command are for client commands; \
                 give a server its own flags after its name (e.g. `trireme up --api ADDR`)",
            ));
        }
        _ => {}
    }
    Ok(cli)
}

async fn run(command: Command) -> ExitCode {
    let shutdown = CancellationToken::new();
    if let Err(e) = watch_signals(shutdown.clone()) {
        eprintln!("error: cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    let result = match command {
        Command::Up(args) => trireme_up::run(args, shutdown).await,
        Command::Control(args) => trireme_control::run(args, shutdown).await,
        Command::Engine(args) => trireme_engine::run(args, shutdown).await,
        Command::Csi(CsiCommand::Controller(args)) => {
            trireme_csi::run_controller(args, shutdown).await
        }
        Command::Csi(CsiCommand::Node(args)) => trireme_csi::run_node(args, shutdown).await,
        Command::Client(cmd) => {
            return match trireme_cli::run(cmd, shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code())
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. Some errors already print their cause in their own
/// message; a cause that adds nothing new is left out rather than said twice.
fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The first SIGINT or SIGTERM cancels `shutdown` (servers stop cleanly); a second one exits at
/// once, for when a clean stop hangs.
fn watch_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        for round in 0..2 {
            let name = tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            };
            if round == 0 {
                tracing::info!(signal = name, "shutting down");
                shutdown.cancel();
            } else {
                eprintln!("error: second {name}; exiting without a clean shutdown");
                std::process::exit(130);
            }
        }
    });
    Ok(())
}

/// Servers log at `info` by default; the CLI only warns, so its output stays the answer.
fn init_logging(format: LogFormat, server: bool) {
    let default = if server { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn servers_and_nouns_parse() {
        for line in [
            "trireme up --nodes 1 --api 127.0.0.1:9000",
            "trireme --api 127.0.0.1:1 --token t -o json node list",
            "trireme --log-format json control --data-dir /tmp/c",
            "trireme engine --node-id node-1 --log-format json",
            "trireme volume list -o yaml",
            "trireme node get node-1",
            "trireme snapshot list",
            "trireme dump",
            "trireme --api 127.0.0.1:1 dump -o /tmp/b.tar.gz --data-dir /tmp/up",
        ] {
            let r = parse(line.split_whitespace());
            assert!(r.is_ok(), "{line}: {:?}", r.err());
        }
        let cli = parse(["trireme", "--log-format", "json", "pool", "list"]).unwrap();
        assert!(matches!(cli.log_format, LogFormat::Json));
        assert!(!cli.command.is_server());
        assert!(parse(["trireme", "--log-format", "xml", "up"]).is_err());
        // Client flags before a server are refused rather than silently ignored.
        let err = parse(["trireme", "--api", "127.0.0.1:1", "up"]).unwrap_err();
        assert!(err.to_string().contains("trireme up --api"), "{err}");
    }

    #[test]
    fn errors_fit_on_one_line_without_repeats() {
        let io = std::io::Error::other("disk on fire");
        let e = anyhow::Error::new(io).context("cannot open the pool: disk on fire");
        assert_eq!(one_line(&e), "cannot open the pool: disk on fire");
        let e = anyhow::Error::new(std::io::Error::other("refused")).context("cannot register");
        assert_eq!(one_line(&e), "cannot register: refused");
    }
}
