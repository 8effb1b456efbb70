//! Trireme's CSI driver: the Kubernetes Container Storage Interface (v1) served over gRPC on
//! unix sockets, in two plugins.
//!
//! ```text
//!  kubelet ──csi.sock──> node plugin ── nbdfuse + losetup (or nbd-client) ── mkfs, mount
//!                            │                 │ NBD
//!  sidecars ─csi.sock──> controller plugin     └──────> the volume's nexus on an engine
//!                            │ REST (trireme_api::Client)
//!                            └──────> control
//! ```
//!
//! The controller plugin is stateless: every answer is derived from control's REST API, so a
//! restarted controller picks up where the last one stopped. The node plugin changes the
//! machine (FUSE mounts, loop devices, file systems, bind mounts); it records every step in its
//! state dir before and after taking it, so a retry after a crash finds and reuses, or cleans,
//! what the crashed attempt left behind (see [`node`]).
//!
//! Both plugins also serve the Identity service. Snapshot RPCs answer `UNIMPLEMENTED` and are
//! not advertised until Trireme's snapshots reach the REST API.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod args;
mod caps;
mod controller;
mod error;
mod identity;
mod node;
mod server;

pub use args::{CommonArgs, ControllerArgs, NodeArgs};
pub use server::{run_controller, run_node};

/// The CSI driver name (`GetPluginInfo`, the Kubernetes `CSIDriver` object, StorageClasses).
pub const DRIVER_NAME: &str = "csi.trireme.io";

/// The CSI v1 protobuf types, clients and servers (generated from `proto/csi.proto`).
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
    tonic::include_proto!("csi.v1");
}
