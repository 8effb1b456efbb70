//! What can go wrong talking to an NBD server, typed so that a caller (the nexus) can tell a
//! failed request on a healthy connection (`Server`) from a dead connection (everything else).

use std::sync::Arc;
use std::time::Duration;

use crate::export::ExportError;
use crate::proto::errno;

/// An NBD client error. Cheap to clone: one connection failure is reported to every request
/// that was in flight on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The URI could not be parsed.
    #[error("invalid NBD URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: String },
    /// TCP or Unix connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The server refused the negotiation or spoke something we do not accept.
    #[error("NBD handshake with {addr} failed: {reason}")]
    Handshake { addr: String, reason: String },
    /// No answer within the configured timeout; the connection has been closed.
    #[error("{op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    /// The connection is gone (closed, reset, killed after a timeout or protocol error).
    #[error("NBD connection lost: {reason}")]
    Disconnected { reason: String },
    /// The server answered this request with an error; the connection is still usable.
    #[error("server error {} ({errno}): {message}", errno_name(*errno))]
    Server { errno: u32, message: String },
    /// The server broke the protocol; the connection has been closed.
    #[error("NBD protocol violation: {reason}")]
    Protocol { reason: String },
    /// The export does not support this command (from its transmission flags).
    #[error("the export does not support {command}")]
    Unsupported { command: &'static str },
    /// The request cannot be sent as asked (too large for the export's block sizes).
    #[error("invalid request: {reason}")]
    Invalid { reason: String },
}

impl ClientError {
    /// True if the connection this error came from can no longer be used.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            ClientError::Timeout { .. }
                | ClientError::Disconnected { .. }
                | ClientError::Protocol { .. }
                | ClientError::Connect { .. }
                | ClientError::Handshake { .. }
        )
    }

    pub(crate) fn disconnected(reason: impl Into<String>) -> Self {
        ClientError::Disconnected { reason: reason.into() }
    }

    pub(crate) fn protocol(reason: impl Into<String>) -> Self {
        ClientError::Protocol { reason: reason.into() }
    }
}

/// A short name for an NBD errno, for messages.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        errno::EPERM => "EPERM",
        errno::EIO => "EIO",
        errno::ENOMEM => "ENOMEM",
        errno::EINVAL => "EINVAL",
        errno::ENOSPC => "ENOSPC",
        errno::EOVERFLOW => "EOVERFLOW",
        errno::ENOTSUP => "ENOTSUP",
        errno::ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown errno",
    }
}

/// How a client error surfaces through [`Export`](crate::Export): the inverse of the server's
/// errno mapping, so a remote replica fails the way a local one would.
impl From<ClientError> for ExportError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Server { errno: errno::ENOSPC, .. } => ExportError::NoSpace,
            ClientError::Server { errno: errno::EPERM, .. } => ExportError::ReadOnly,
            ClientError::Server { errno: errno::ENOTSUP, .. } => ExportError::NotSupported,
            ClientError::Server { errno: errno::ESHUTDOWN, .. } => ExportError::ShuttingDown,
            ClientError::Server { errno: errno::EINVAL | errno::EOVERFLOW, message } => {
                ExportError::Invalid(message)
            }
            ClientError::Unsupported { .. } => ExportError::NotSupported,
            ClientError::Invalid { reason } => ExportError::Invalid(reason),
            other => ExportError::Io(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errnos_map_to_export_errors() {
        let e = |errno| ClientError::Server { errno, message: "m".into() };
        assert_eq!(ExportError::from(e(errno::ENOSPC)), ExportError::NoSpace);
        assert_eq!(ExportError::from(e(errno::EPERM)), ExportError::ReadOnly);
        assert_eq!(ExportError::from(e(errno::EINVAL)), ExportError::Invalid("m".into()));
        assert!(matches!(ExportError::from(e(errno::EIO)), ExportError::Io(_)));
        let lost = ClientError::disconnected("gone");
        assert!(lost.is_connection_lost());
        assert!(matches!(ExportError::from(lost), ExportError::Io(_)));
        assert!(!e(errno::EIO).is_connection_lost());
        assert!(e(errno::EIO).to_string().contains("EIO"));
    }
}
