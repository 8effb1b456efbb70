//! Bearer-token auth with two roles: `admin` may do everything, `viewer` may only read.
//!
//! Tokens live in the data dir (`admin.token`, `viewer.token`: 32 random bytes as hex, mode
//! 0600), created at first start and kept afterwards, so `trireme up` and operators can hand
//! them out. `/healthz`, `/readyz` and `/metrics` need no token; everything under `/v1` does.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::ControlError;

pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const VIEWER_TOKEN_FILE: &str = "viewer.token";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Viewer,
}

/// Why the token files could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read or create token file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path} is empty; delete it to have a new token generated")]
    Empty { path: PathBuf },
}

#[derive(Clone)]
pub struct Tokens {
    admin: String,
    viewer: String,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(..)") // never log secrets
    }
}

impl Tokens {
    /// Reads the token files in `dir`, creating missing ones.
    pub fn ensure(dir: &Path) -> Result<Self, TokenError> {
        Ok(Self {
            admin: ensure_token(&dir.join(ADMIN_TOKEN_FILE))?,
            viewer: ensure_token(&dir.join(VIEWER_TOKEN_FILE))?,
        })
    }

    pub fn role(&self, token: &str) -> Option<Role> {
        if constant_time_eq(token.as_bytes(), self.admin.as_bytes()) {
            Some(Role::Admin)
        } else if constant_time_eq(token.as_bytes(), self.viewer.as_bytes()) {
            Some(Role::Viewer)
        } else {
            None
        }
    }
}

fn ensure_token(path: &Path) -> Result<String, TokenError> {
    let io = |source| TokenError::Io { path: path.to_owned(), source };
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let t = s.trim().to_owned();
            if t.is_empty() { Err(TokenError::Empty { path: path.to_owned() }) } else { Ok(t) }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = hex::encode(rand::random::<[u8; 32]>());
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.write_all(format!("{token}\n").as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok(token)
        }
        Err(e) => Err(io(e)),
    }
}

/// Compares without an early exit, so response timing does not reveal a token's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware for `/v1`: 401 without a known token, 403 for a viewer that writes.
pub async fn require_token(
    State(tokens): State<Arc<Tokens>>,
    req: Request,
    next: Next,
) -> Result<Response, ControlError> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or(ControlError::Unauthenticated)?;
    let role = tokens.role(token).ok_or(ControlError::UnknownToken)?;
    let reads = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if role == Role::Viewer && !reads {
        return Err(ControlError::Forbidden { method: req.method().to_string() });
    }
    Ok(next.run(req).await)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tokens_are_created_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let t1 = Tokens::ensure(dir.path()).unwrap();
        let meta = std::fs::metadata(dir.path().join(ADMIN_TOKEN_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let admin = std::fs::read_to_string(dir.path().join(ADMIN_TOKEN_FILE)).unwrap();
        assert_eq!(admin.trim().len(), 64);
        let t2 = Tokens::ensure(dir.path()).unwrap();
        assert_eq!(t2.role(admin.trim()), Some(Role::Admin));
        assert_eq!(t1.admin, t2.admin);
        assert_eq!(t2.role(t2.viewer.as_str()), Some(Role::Viewer));
        assert_eq!(t2.role("nope"), None);
        assert_ne!(t2.admin, t2.viewer);
    }
}
