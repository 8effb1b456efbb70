//! The NBD protocol (fixed newstyle), as in the protocol document of the NBD project: a pure
//! wire codec ([`proto`]) and an async server over the [`Export`] trait.
//!
//! ```text
//!   serve_tcp / serve_unix ──> connection ──> handshake ──> transmission
//!                                                            reader ─> request tasks ─> writer
//!                                                                         │
//!                                                                 Arc<dyn Export> (nexus, …)
//! ```
//! [`Client`] is the other side: the nexus reaches replicas on other engines through it.
//! The server knows nothing of pools or replicas: the engine implements [`Export`] for its
//! nexus and an [`ExportRegistry`] to name them. With the `testing` feature, [`testing`]
//! provides an in-memory sparse export for tests.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod client;
mod export;
mod handshake;
pub mod proto;
mod request;
mod server;
mod stats;
#[cfg(feature = "testing")]
pub mod testing;
mod transmission;

pub use client::{
    Client, ClientAddr, ClientError, ClientOptions, DEFAULT_PORT, ReconnectEvent, ReconnectPolicy,
    ReconnectingClient, errno_name,
};
pub use export::{BlockSizes, Capabilities, Export, ExportError, ExportRegistry, Extent};
pub use request::export_errno;
pub use server::{ServerConfig, serve_tcp, serve_unix};
pub use stats::{ExportStats, OpKind, ServerStats, StatsSnapshot};
