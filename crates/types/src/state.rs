//! The state enums of DESIGN.md's state machines. Transitions live with their owners (the nexus
//! in the engine, reconcilers in control); these types only name the states so that every
//! surface (gRPC, REST, CLI, metrics) spells them the same way.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a child was faulted. Recoverable reasons let the same replica come back and be rebuilt
/// partially; the others need a new replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FaultReason {
    /// The child returned an I/O error.
    IoError,
    /// The child did not answer within its timeout.
    Timeout,
    /// The connection to the child's node was lost.
    Disconnected,
    /// The replica is gone (its pool or engine says it no longer exists).
    Missing,
    /// The child was removed by an operator or by control (shrink, drain).
    Removed,
}

impl FaultReason {
    /// Whether the same replica may come back and be rebuilt from where it left off.
    pub const fn is_recoverable(self) -> bool {
        matches!(self, Self::IoError | Self::Timeout | Self::Disconnected)
    }
}

/// A nexus's view of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ChildState {
    /// Up to date; serves reads and writes.
    Online,
    /// Missed writes or failed; never read from, never a rebuild source.
    Faulted { reason: FaultReason },
    /// Receives writes while being brought up to date; `done_bytes` of `total_bytes` copied.
    Rebuilding { done_bytes: u64, total_bytes: u64 },
}

impl ChildState {
    /// Only online children serve reads and are rebuild sources.
    pub const fn is_readable(&self) -> bool {
        matches!(self, Self::Online)
    }
    /// Online and rebuilding children receive every write.
    pub const fn receives_writes(&self) -> bool {
        matches!(self, Self::Online | Self::Rebuilding { .. })
    }
}

/// The state of a nexus, derived from its children.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NexusState {
    /// Every child online.
    Online,
    /// At least one child online, others faulted or rebuilding.
    Degraded,
    /// No online child: I/O fails, nothing is served from a stale copy.
    Faulted,
}

impl NexusState {
    /// Derives the nexus state from its children's states.
    pub fn from_children<'a>(children: impl IntoIterator<Item = &'a ChildState>) -> Self {
        let (mut online, mut total) = (0usize, 0usize);
        for c in children {
            total += 1;
            if c.is_readable() {
                online += 1;
            }
        }
        match (online, total) {
            (0, _) => Self::Faulted,
            (o, t) if o == t => Self::Online,
            _ => Self::Degraded,
        }
    }
}

/// The state of a volume as control observes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    Online,
    Degraded,
    Faulted,
    /// The node of the volume's nexus is unreachable, or the volume is not published.
    Unknown,
}

impl From<NexusState> for VolumeState {
    fn from(s: NexusState) -> Self {
        match s {
            NexusState::Online => Self::Online,
            NexusState::Degraded => Self::Degraded,
            NexusState::Faulted => Self::Faulted,
        }
    }
}

/// The state of a node as control observes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Online,
    /// Missed heartbeats.
    Offline,
    /// Takes no new replicas or nexuses.
    Cordoned,
    /// Cordoned, and its replicas and nexuses are being moved away.
    Draining,
}

macro_rules! display_as_serde {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // The serde names are the canonical spelling on every surface.
                let v = serde_json::to_value(self).map_err(|_| fmt::Error)?;
                match v {
                    serde_json::Value::String(s) => f.write_str(&s),
                    other => write!(f, "{other}"),
                }
            }
        }
    )*};
}
display_as_serde!(FaultReason, NexusState, VolumeState, NodeState);

impl fmt::Display for ChildState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Online => f.write_str("online"),
            Self::Faulted { reason } => write!(f, "faulted({reason})"),
            Self::Rebuilding { done_bytes, total_bytes } => {
                let pct = if *total_bytes == 0 { 100 } else { done_bytes * 100 / total_bytes };
                write!(f, "rebuilding({pct}%)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nexus_state_follows_children() {
        let on = ChildState::Online;
        let off = ChildState::Faulted { reason: FaultReason::Timeout };
        let rb = ChildState::Rebuilding { done_bytes: 1, total_bytes: 2 };
        assert_eq!(NexusState::from_children([&on, &on]), NexusState::Online);
        assert_eq!(NexusState::from_children([&on, &off]), NexusState::Degraded);
        assert_eq!(NexusState::from_children([&on, &rb]), NexusState::Degraded);
        assert_eq!(NexusState::from_children([&rb, &off]), NexusState::Faulted);
        assert_eq!(NexusState::from_children([]), NexusState::Faulted);
    }

    #[test]
    fn states_print_like_their_json() {
        assert_eq!(NodeState::Cordoned.to_string(), "cordoned");
        assert_eq!(FaultReason::IoError.to_string(), "io_error");
        assert_eq!(
            ChildState::Faulted { reason: FaultReason::Timeout }.to_string(),
            "faulted(timeout)"
        );
    }
}
