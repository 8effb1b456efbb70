//! The `trireme` command-line client: `trireme <noun> <verb>` over the REST API, through the
//! typed [`trireme_api::Client`].
//!
//! ```text
//!   trireme volume create v1 --size 1GiB -o json
//!      │        │            └ GlobalOpts (-o, --api, --token) on every noun, anywhere after it
//!      │        └ verb: one REST call (or a few), rendered by `output`
//!      └ noun: node | pool | volume | replica | event
//! ```
//!
//! With no flags the CLI reaches the local `trireme up`: the API address comes from
//! `--api`/`TRIREME_API`, else the `up.json` of `up`'s default data directory, else
//! `127.0.0.1:7480`; the token from `--token`/`TRIREME_TOKEN`, else that directory's admin
//! token, sent only to a local API so it never leaks to another host.
//!
//! Errors are one sentence on stderr (the binary prints [`CliError`]); exit code 1, or 2 for a
//! command this version does not have yet.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod dump;
mod error;
mod event;
mod node;
pub mod output;
mod pool;
mod replica;
mod volume;

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;
use trireme_api::{Client, ClientError};
use trireme_up::{Layout, UpState};

pub use dump::DumpArgs;
pub use error::CliError;
pub use event::EventArgs;
pub use node::NodeArgs;
pub use output::Output;
pub use pool::PoolArgs;
pub use replica::ReplicaArgs;
pub use volume::VolumeArgs;

/// The client commands, to be flattened into the `trireme` binary's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Storage nodes (engines) registered with control.
    Node(NodeArgs),
    /// Pools: the disks or files each node carves replicas from.
    Pool(PoolArgs),
    /// Volumes: create, resize, publish over NBD, delete.
    Volume(VolumeArgs),
    /// Replicas: the copies of each volume's data.
    Replica(ReplicaArgs),
    /// Events: what changed in the cluster, and why.
    Event(EventArgs),
    /// Snapshots (not available yet).
    Snapshot(NotYetArgs),
    /// A support bundle (.tar.gz) of topology, store, events, metrics and, for a local `up`, logs.
    Dump(DumpArgs),
}

/// Accepts anything, so that a command from a later version answers "not available yet"
/// rather than a usage error.
#[derive(Debug, Args)]
pub struct NotYetArgs {
    #[arg(hide = true, trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<String>,
}

/// Flags every noun takes, before or after its verb.
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalOpts {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t, global = true)]
    pub output: Output,

    /// The Trireme API: a URL or host:port [default: the local `trireme up`, else
    /// http://127.0.0.1:7480]
    #[arg(long, env = "TRIREME_API", value_name = "URL", global = true)]
    pub api: Option<String>,

    /// Bearer token [default: the admin token of the local `trireme up`]
    #[arg(
        long,
        env = "TRIREME_TOKEN",
        value_name = "TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub token: Option<String>,
}

/// The same flags typed before the noun (`trireme --api URL -o json node list`), as the
/// binary's top-level options. They are not `global` there, because servers (`up --api`) have
/// flags of the same name.
#[derive(Debug, Clone, Default, Args)]
pub struct LeadingOpts {
    /// Client commands: output format (also after the noun).
    #[arg(short = 'o', long = "output", value_enum, value_name = "FORMAT")]
    pub output: Option<Output>,
    /// Client commands: the Trireme API, a URL or host:port (also after the noun).
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
    /// Client commands: bearer token (also after the noun).
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
}

impl LeadingOpts {
    pub fn is_empty(&self) -> bool {
        self.output.is_none() && self.api.is_none() && self.token.is_none()
    }
}

impl Command {
    fn global_mut(&mut self) -> Option<&mut GlobalOpts> {
        match self {
            Self::Node(a) => Some(&mut a.global),
            Self::Pool(a) => Some(&mut a.global),
            Self::Volume(a) => Some(&mut a.global),
            Self::Replica(a) => Some(&mut a.global),
            Self::Event(a) => Some(&mut a.global),
            Self::Snapshot(_) | Self::Dump(_) => None,
        }
    }

    /// Applies flags typed before the noun. `noun` is the noun's `ArgMatches`: a flag typed
    /// after the noun wins, and a leading flag wins over an environment variable or a default.
    pub fn apply_leading(&mut self, leading: &LeadingOpts, noun: &clap::ArgMatches) {
        use clap::parser::ValueSource;
        let typed_after = |id: &str| noun.value_source(id) == Some(ValueSource::CommandLine);
        let (output, api, token) = match self {
            // Its -o names the bundle file: only where to connect carries over.
            Self::Dump(dump) => (None, &mut dump.api, &mut dump.token),
            _ => match self.global_mut() {
                Some(g) => (Some(&mut g.output), &mut g.api, &mut g.token),
                None => return,
            },
        };
        if let (Some(leading), Some(output)) = (leading.output, output)
            && !typed_after("output")
        {
            *output = leading;
        }
        if let Some(leading) = &leading.api
            && !typed_after("api")
        {
            *api = Some(leading.clone());
        }
        if let Some(leading) = &leading.token
            && !typed_after("token")
        {
            *token = Some(leading.clone());
        }
    }
}

/// Runs one client command.
pub async fn run(command: Command, shutdown: CancellationToken) -> Result<(), CliError> {
    match command {
        Command::Node(args) => node::run(args).await,
        Command::Pool(args) => pool::run(args).await,
        Command::Volume(args) => volume::run(args).await,
        Command::Replica(args) => replica::run(args).await,
        Command::Event(args) => event::run(args, shutdown).await,
        Command::Snapshot(_) => Err(CliError::NotAvailable("snapshot")),
        Command::Dump(args) => dump::run(args).await,
    }
}

/// Where the CLI sends its requests, and with which token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub api: String,
    pub token: Option<String>,
}

impl Endpoint {
    /// Resolves the API address and token from the flags and, failing those, from the local
    /// `up` whose data directory is `data_dir` (`trireme_up::default_data_dir()` in real use).
    pub fn resolve(opts: &GlobalOpts, data_dir: Option<&Path>) -> Result<Self, CliError> {
        let layout = data_dir.map(Layout::new);
        let up_api =
            layout.as_ref().and_then(|l| UpState::read(&l.state_file()).ok()).map(|s| s.api_url);
        let api = opts
            .api
            .clone()
            .filter(|a| !a.trim().is_empty())
            .or_else(|| up_api.clone())
            .unwrap_or_else(|| trireme_up::http_url(default_api()));
        let token = match (&opts.token, &layout) {
            (Some(t), _) if !t.trim().is_empty() => Some(t.trim().to_owned()),
            (_, Some(layout)) if is_local(&api) || up_api.as_deref() == Some(api.as_str()) => {
                read_token(&layout.admin_token())?
            }
            _ => None,
        };
        Ok(Self { api, token })
    }

    pub fn client(&self) -> Result<Client, CliError> {
        Client::new(&self.api, self.token.clone()).map_err(CliError::Client)
    }
}

fn default_api() -> std::net::SocketAddr {
    trireme_up::parse_api_addr(trireme_up::DEFAULT_API)
        .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 7480)))
}

/// Whether an API address (URL or host:port) names this machine. An address that does not
/// parse is not local: no token is read for it, and the client refuses it with its own error.
fn is_local(api: &str) -> bool {
    trireme_api::parse_address(api).is_ok_and(|url| trireme_api::is_loopback(&url))
}

fn read_token(path: &Path) -> Result<Option<String>, CliError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t.trim().to_owned()).filter(|t| !t.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CliError::TokenFile { path: PathBuf::from(path), source }),
    }
}

/// What every verb needs: a client, where it points (for error messages) and the format.
pub(crate) struct Ctx {
    pub client: Client,
    pub api: String,
    pub output: Output,
}

impl Ctx {
    pub fn new(opts: &GlobalOpts) -> Result<Self, CliError> {
        let data_dir = trireme_up::default_data_dir();
        let endpoint = Endpoint::resolve(opts, data_dir.as_deref())?;
        let client = endpoint.client()?;
        Ok(Self { api: client.base_url().to_owned(), client, output: opts.output })
    }

    /// Maps a client error to the sentence the user sees.
    pub fn fail(&self, err: ClientError) -> CliError {
        CliError::from_client(err, &self.api)
    }
}

#[cfg(test)]
mod tests;
