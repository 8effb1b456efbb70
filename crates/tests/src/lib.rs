//! Trireme's integration tests: real processes, real NBD clients, real faults.
//!
//! - [`cluster`]: a harness that runs `trireme up` in a tempdir and drives it through REST, the
//!   CLI and signals, cleaning up every process and dumping every log when a test fails.
//! - [`checker`] (and the `trireme-checker` binary): proves that writes acknowledged before a
//!   completed FLUSH survive a crash.
//! - [`hosts`]: control and engines in network namespaces ("hosts") on a per-test bridge,
//!   with real faults: SIGKILL, links taken down, partitions from control, failing disks.
//! - [`tools`], [`guards`], [`procs`]: external tools with timeouts, mount/loop guards, /proc.
//!
//! NBD traffic from Rust goes through `trireme_nbd::Client`; the malformed-traffic tests build
//! their deliberately broken bytes from `trireme_nbd::proto`. Independent clients (nbdinfo,
//! nbdcopy, qemu-img, fio, nbdfuse) cover what sharing the server's codec could hide.
//!
//! The tests themselves live in `tests/`, one file per concern, each test with its own cluster.
//! They need the `trireme` binary: `cargo build -p trireme` first (`scripts/test.sh` does).
//!
//! Environment: `TRIREME_BIN` (the binary under test; default `<target>/debug/trireme`),
//! `TRIREME_TEST_TMPDIR` (where clusters live; default the system temp dir — it must support
//! `O_DIRECT`, so not tmpfs), `TRIREME_TEST_KEEP=1` (keep a failed test's data dir and logs).
//! The [`hosts`] tests (`tests/hosts.rs`, `tests/replication.rs`, `tests/soak.rs`) need root:
//! they create network namespaces, a bridge, veth pairs, loop devices and FUSE mounts.
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
pub mod hosts;
pub mod procs;
pub mod tools;

pub use cluster::Cluster;
pub use trireme_types::ByteSize;
