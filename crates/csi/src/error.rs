//! The one place where a REST answer from control becomes a gRPC status.
//!
//! Control speaks RFC 9457 problems with HTTP statuses; CSI speaks gRPC codes with meanings the
//! spec fixes per RPC. The generic mapping lives here; the few cases where the same HTTP status
//! means different things for different RPCs (a 404 on `DeleteVolume` is success) are decided
//! by the caller before it gets here, by matching [`ClientError::is_not_found`].

use tonic::{Code, Status};
use trireme_api::ClientError;

/// Maps a failed REST call to the gRPC status the CSI spec prescribes for its cause.
/// `what` names the operation for the message ("create volume pvc-1").
pub(crate) fn api_status(what: &str, err: &ClientError) -> Status {
    let code = match err {
        ClientError::Api(p) => code_for(p.status, &p.kind),
        ClientError::Unreachable { .. } => Code::Unavailable,
        ClientError::Decode { .. } | ClientError::InvalidAddress(_) => Code::Internal,
    };
    Status::new(code, format!("{what}: {err}"))
}

fn code_for(http: u16, kind: &str) -> Code {
    // Out of space is its own code in CSI (RESOURCE_EXHAUSTED); control says it with 507 or a
    // problem type naming capacity.
    let kind = kind.to_ascii_lowercase();
    if http == 507 || ["capacity", "space", "exhausted"].iter().any(|k| kind.contains(k)) {
        return Code::ResourceExhausted;
    }
    match kind.strip_prefix("trireme:").unwrap_or(&kind) {
        // No node set can hold the replicas: CSI's "cannot provision" code.
        "no-placement" => return Code::ResourceExhausted,
        // The volume cannot be attached through that node (yet): the caller must change
        // something first, not retry as is.
        "remote-publish-unavailable" => return Code::FailedPrecondition,
        _ => {}
    }
    match http {
        400 | 422 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        // A conflict with the resource's current state (published, in use, being deleted).
        409 | 412 => Code::FailedPrecondition,
        429 => Code::ResourceExhausted,
        503 | 502 => Code::Unavailable,
        504 | 408 => Code::DeadlineExceeded,
        _ => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trireme_api::Problem;

    fn problem(status: u16, kind: &str) -> ClientError {
        ClientError::Api(Problem {
            kind: kind.into(),
            title: "t".into(),
            status,
            detail: "d".into(),
            instance: None,
        })
    }

    #[test]
    fn codes() {
        assert_eq!(api_status("x", &problem(404, "trireme:not-found")).code(), Code::NotFound);
        assert_eq!(api_status("x", &problem(422, "trireme:invalid")).code(), Code::InvalidArgument);
        assert_eq!(
            api_status("x", &problem(409, "trireme:conflict")).code(),
            Code::FailedPrecondition
        );
        assert_eq!(api_status("x", &problem(507, "about:blank")).code(), Code::ResourceExhausted);
        assert_eq!(
            api_status("x", &problem(409, "trireme:insufficient-capacity")).code(),
            Code::ResourceExhausted
        );
        assert_eq!(api_status("x", &problem(500, "about:blank")).code(), Code::Internal);
        assert_eq!(
            api_status("x", &problem(503, "trireme:no-placement")).code(),
            Code::ResourceExhausted
        );
        assert_eq!(
            api_status("x", &problem(422, "trireme:remote-publish-unavailable")).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            api_status("x", &problem(422, "trireme:replication-unavailable")).code(),
            Code::InvalidArgument
        );
        assert_eq!(api_status("x", &problem(401, "about:blank")).code(), Code::Unauthenticated);
    }
}
