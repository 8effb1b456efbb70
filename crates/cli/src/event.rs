//! `trireme event list [--follow]`: what changed in the cluster, and why. `--follow` polls for
//! events after the last one seen (control numbers them) until Ctrl-C.

use std::time::Duration;

use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;
use trireme_api::Event;

use crate::output::{self, Output, Tabular, emit};
use crate::{CliError, Ctx, GlobalOpts};

const FOLLOW_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Args)]
pub struct EventArgs {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: EventCommand,
}

#[derive(Debug, Subcommand)]
pub enum EventCommand {
    /// List recent events.
    #[command(visible_alias = "ls")]
    List {
        /// Keep printing new events until Ctrl-C.
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

impl Tabular for Event {
    const HEADERS: &'static [&'static str] = &["SEQ", "TIME", "KIND", "ID", "REASON", "MESSAGE"];
    fn row(&self) -> Vec<String> {
        vec![
            self.seq.to_string(),
            output::timestamp(self.time_ms),
            self.kind.clone(),
            self.id.clone(),
            self.reason.clone(),
            self.message.clone(),
        ]
    }
}

pub(crate) async fn run(args: EventArgs, shutdown: CancellationToken) -> Result<(), CliError> {
    let ctx = Ctx::new(&args.global)?;
    match args.command {
        EventCommand::List { follow: false } => {
            let events = ctx.client.events(None).await.map_err(|e| ctx.fail(e))?;
            emit(&output::list(&events, ctx.output)?)
        }
        EventCommand::List { follow: true } => follow(&ctx, shutdown).await,
    }
}

/// Prints events as they come. A table cannot be laid out before its last row exists, so rows
/// are fixed-width lines; JSON is one object per line, YAML one document per event.
async fn follow(ctx: &Ctx, shutdown: CancellationToken) -> Result<(), CliError> {
    if ctx.output == Output::Table {
        emit(&streamed_header())?;
    }
    let mut after = None;
    let mut reported_outage = false;
    loop {
        let fetched = tokio::select! {
            r = ctx.client.events(after) => r,
            () = shutdown.cancelled() => return Ok(()),
        };
        match fetched {
            Ok(events) => {
                reported_outage = false;
                for e in &events {
                    emit(&streamed(e, ctx.output)?)?;
                }
                if let Some(last) = events.last() {
                    after = Some(last.seq);
                }
            }
            // `up` restarts a crashed control: keep following through the gap.
            Err(e @ trireme_api::ClientError::Unreachable { .. }) => {
                if !reported_outage {
                    eprintln!("{}; still trying", ctx.fail(e));
                    reported_outage = true;
                }
            }
            Err(e) => return Err(ctx.fail(e)),
        }
        tokio::select! {
            () = tokio::time::sleep(FOLLOW_EVERY) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

const WIDTHS: [usize; 5] = [6, 20, 8, 36, 16];

fn streamed_header() -> String {
    fixed(&Event::HEADERS.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>())
}

fn streamed(event: &Event, format: Output) -> Result<String, CliError> {
    match format {
        Output::Table => Ok(fixed(&event.row())),
        Output::Json => serde_json::to_string(event).map_err(|e| CliError::Format(e.to_string())),
        Output::Yaml => Ok(format!("---\n{}", output::yaml(event)?)),
    }
}

/// Left-aligned columns of at least `WIDTHS`, the last one free.
fn fixed(cells: &[String]) -> String {
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        match WIDTHS.get(i) {
            Some(w) => line.push_str(&format!("{cell:<w$}  ")),
            None => line.push_str(cell),
        }
    }
    line.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            seq: 7,
            time_ms: 1_700_000_000_000,
            kind: "volume".into(),
            id: "00000000-0000-0000-0000-000000000000".into(),
            reason: "published".into(),
            message: "published on node-1".into(),
        }
    }

    #[test]
    fn event_rows() {
        let t = output::list(&[event()], Output::Table).unwrap();
        let row: Vec<&str> = t.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            row[..5],
            [
                "7",
                "2023-11-14T22:13:20Z",
                "volume",
                "00000000-0000-0000-0000-000000000000",
                "published"
            ]
        );
    }

    #[test]
    fn streamed_lines_line_up_with_the_header() {
        let header = streamed_header();
        let line = streamed(&event(), Output::Table).unwrap();
        assert_eq!(header.find("REASON"), line.find("published"));
        assert_eq!(header.find("MESSAGE"), line.find("published on"));
        let json = streamed(&event(), Output::Json).unwrap();
        assert!(!json.contains('\n'));
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), event());
        assert!(streamed(&event(), Output::Yaml).unwrap().starts_with("---\nseq: 7\n"));
    }
}
