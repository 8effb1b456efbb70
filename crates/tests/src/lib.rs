//! Trireme's integration tests: real processes, real NBD clients, real faults.
//!
//! - [`cluster`]: a harness that runs `trireme up` in a tempdir and drives it through REST, the
//!   CLI and signals, cleaning up every process and dumping every log when a test fails.
//! - [`checker`] (and the `trireme-checker` binary): proves that writes acknowledged before a
//!   completed FLUSH survive a crash.
//! - [`nbd`]: a small independent NBD client for the checker and the malformed-input tests.
//! - [`tools`], [`guards`], [`procs`]: external tools with timeouts, mount/loop guards, /proc.
//!
//! The tests themselves live in `tests/`, one file per concern. They need the `trireme`
//! binary: `cargo build -p trireme` first (or set `TRIREME_BIN`).
//!
//! ```text
//!  tests/*.rs ── Cluster ──spawn──> trireme up ──> control + engines
//!       │            └── REST (trireme_api::Client), CLI (trireme …)
//!       └── nbdinfo / nbdcopy / qemu-img / fio / nbdfuse / trireme-checker ──NBD──> engines
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod checker;
pub mod cluster;
pub mod guards;
pub mod nbd;
pub mod procs;
pub mod tools;

pub use cluster::Cluster;
pub use trireme_types::ByteSize;
