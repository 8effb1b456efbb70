//! `trireme-checker`: writes tagged blocks over NBD with periodic flushes and a durable log of
//! what each completed flush covered (`write`), then proves after a crash that every covered
//! write reads back (`verify`). See `trireme_tests::checker` for the method.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use trireme_tests::checker;

#[derive(Parser)]
#[command(name = "trireme-checker", about = "Crash-consistency checker for NBD exports")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Write tagged blocks until killed, the connection fails, or --seconds pass.
    Write {
        #[arg(long)]
        uri: String,
        #[arg(long)]
        log: PathBuf,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        flush_every_ms: u64,
        #[arg(long, default_value_t = 4096)]
        block: usize,
        /// Blocks to use from the start of the export (default: all, at most 65,536).
        #[arg(long)]
        blocks: Option<u64>,
        #[arg(long, default_value_t = 16)]
        depth: usize,
        /// Percentage of writes sent with FUA (recorded as durable once acknowledged).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
        fua_percent: u8,
    },
    /// Read every block back and check it against the log.
    Verify {
        #[arg(long)]
        uri: String,
        #[arg(long)]
        log: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.mode {
        Mode::Write { uri, log, seconds, flush_every_ms, block, blocks, depth, fua_percent } => {
            let opts = checker::WriteOptions {
                uri,
                log,
                seconds,
                flush_every: Duration::from_millis(flush_every_ms.max(1)),
                block_size: block,
                blocks,
                depth,
                fua_percent,
            };
            let started = Instant::now();
            match checker::write(&opts).await {
                Ok(report) => {
                    println!("{}", checker::describe_write(&report, started));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("trireme-checker write: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Mode::Verify { uri, log } => match checker::verify(&uri, &log).await {
            Ok(report) => {
                const SHOWN: usize = 50;
                for f in report.findings.iter().take(SHOWN) {
                    println!("{f}");
                }
                if report.findings.len() > SHOWN {
                    println!("… and {} more findings", report.findings.len() - SHOWN);
                }
                println!("{}", report.summary());
                if report.findings.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
            }
            Err(e) => {
                eprintln!("trireme-checker verify: {e}");
                ExitCode::from(2)
            }
        },
    }
}
