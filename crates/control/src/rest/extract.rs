//! Request extractors whose failures are problem documents, never axum's plain-text
//! rejections: a JSON body checked for syntax, unknown fields and validity (names, sizes), and
//! a path id.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use trireme_api::{
    CreatePoolBody, CreateVolumeBody, PublishBody, ResizeVolumeBody, SetReplicasBody,
};

use crate::ControlError;

/// The fields a request body may have. Unknown fields are refused so that a typo (`"szie"`)
/// is an error rather than a silently ignored setting.
pub trait KnownFields {
    const FIELDS: &'static [&'static str];
    /// Whether an empty body means `{}`.
    const EMPTY_OK: bool = false;
}

impl KnownFields for CreatePoolBody {
    const FIELDS: &'static [&'static str] = &["name", "node", "disk", "size"];
}
impl KnownFields for CreateVolumeBody {
    const FIELDS: &'static [&'static str] = &["name", "id", "size", "replicas", "thin"];
}
impl KnownFields for ResizeVolumeBody {
    const FIELDS: &'static [&'static str] = &["size"];
}
impl KnownFields for SetReplicasBody {
    const FIELDS: &'static [&'static str] = &["replicas"];
}
impl KnownFields for PublishBody {
    const FIELDS: &'static [&'static str] = &["node"];
    const EMPTY_OK: bool = true;
}

/// A validated JSON body.
#[derive(Debug)]
pub struct Body<T>(pub T);

/// Parses and validates a body (separate from the extractor so it can be unit-tested).
pub fn parse_body<T: DeserializeOwned + KnownFields>(bytes: &[u8]) -> Result<T, ControlError> {
    let bytes: &[u8] =
        if T::EMPTY_OK && bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { bytes };
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ControlError::MalformedBody { detail: format!("the request body is not valid JSON: {e}") }
    })?;
    let Some(obj) = value.as_object() else {
        return Err(ControlError::MalformedBody {
            detail: "the request body must be a JSON object".into(),
        });
    };
    if let Some(unknown) = obj.keys().find(|k| !T::FIELDS.contains(&k.as_str())) {
        return Err(ControlError::InvalidBody {
            detail: format!("unknown field {unknown:?}; expected one of: {}", T::FIELDS.join(", ")),
        });
    }
    serde_json::from_value(value)
        .map_err(|e| ControlError::InvalidBody { detail: format!("invalid request body: {e}") })
}

impl<S: Send + Sync, T: DeserializeOwned + KnownFields> FromRequest<S> for Body<T> {
    type Rejection = ControlError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let detail = format!("cannot read the request body: {e}");
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ControlError::BodyTooLarge { detail }
            } else {
                ControlError::MalformedBody { detail }
            }
        })?;
        parse_body(&bytes).map(Body)
    }
}

/// The `{id}` path segment, as typed by the user (resolved by the registry, which answers 404
/// naming it when unknown).
#[derive(Debug)]
pub struct Id(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ControlError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| Id(id))
            .map_err(|e| ControlError::MalformedBody { detail: format!("invalid path: {e}") })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_checked() {
        let ok: CreateVolumeBody = parse_body(br#"{"name":"vol-1","size":1048576}"#).unwrap();
        assert_eq!(ok.replicas, 1);
        let e = parse_body::<CreateVolumeBody>(b"{not json").unwrap_err();
        assert_eq!(e.status(), 400);
        let e =
            parse_body::<CreateVolumeBody>(br#"{"name":"Bad Name","size":1048576}"#).unwrap_err();
        assert_eq!(e.status(), 422);
        assert!(e.to_string().contains("Bad Name"), "{e}");
        let e = parse_body::<CreateVolumeBody>(br#"{"name":"v","size":1,"szie":2}"#).unwrap_err();
        assert!(e.to_string().contains("szie"));
        let e = parse_body::<CreateVolumeBody>(br#"{"name":"v"}"#).unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
        let e = parse_body::<CreateVolumeBody>(b"[1]").unwrap_err();
        assert_eq!(e.status(), 400);
        let s: SetReplicasBody = parse_body(br#"{"replicas":3}"#).unwrap();
        assert_eq!(s.replicas, 3);
        let e = parse_body::<SetReplicasBody>(br#"{"replica":3}"#).unwrap_err();
        assert!(e.to_string().contains("replica"), "{e}");
        assert_eq!(parse_body::<SetReplicasBody>(b"").unwrap_err().status(), 400);
        let p: PublishBody = parse_body(b"").unwrap();
        assert_eq!(p.node, None);
    }
}
