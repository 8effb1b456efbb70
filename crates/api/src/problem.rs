//! RFC 9457 problem documents: every REST error, as JSON.

use serde::{Deserialize, Serialize};

/// An error answer. `type` is a stable URI-ish identifier of the kind of error (e.g.
/// `trireme:not-found`) that clients may match on; `detail` is the one clear sentence shown to
/// people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}
