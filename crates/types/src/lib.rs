//! The vocabulary every Trireme crate shares: identifiers as newtypes, sizes in one unit type,
//! the state enums of DESIGN.md's state machines, and latency histograms in one bucket layout.
//!
//! Nothing here knows about I/O, networking or storage layouts. Crates lower in the stack (the
//! pool format, the NBD codec) may use these types; nothing here may depend on them.

mod ids;
mod latency;
mod size;
mod state;

pub use ids::{IdError, Name, NodeId, PoolId, ReplicaId, SnapshotId, VolumeId};
pub use latency::{LATENCY_BOUNDS_NS, LATENCY_BUCKETS, LatencyHistogram, LatencySnapshot};
pub use size::{ByteSize, ByteSizeError};
pub use state::{ChildState, FaultReason, NexusState, NodeState, VolumeState};
