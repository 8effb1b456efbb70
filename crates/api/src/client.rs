//! A typed client for the REST API, shared by the CLI, the CSI driver and the tests.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use trireme_types::ByteSize;

use crate::model::*;
use crate::problem::Problem;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Control answered with an error.
    #[error("{0}")]
    Api(Problem),
    #[error("cannot reach the Trireme API at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("unexpected answer from {url} (HTTP {status}): {detail}")]
    Decode { url: String, status: u16, detail: String },
    #[error("invalid API address {0:?}: expected a URL like http://127.0.0.1:7480 or host:port")]
    InvalidAddress(String),
}

impl ClientError {
    /// The HTTP status of an API error, if it was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api(p) => Some(p.status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
}

/// Parses an API address: a URL (`http://host:port`, `https://…`) or `host:port`.
///
/// An address carrying credentials, a query or a fragment is refused: the token travels in a
/// header, and `http://127.0.0.1:7480@example.com` reads as this machine while naming another.
pub fn parse_address(address: &str) -> Result<reqwest::Url, ClientError> {
    let address = address.trim();
    let invalid = || ClientError::InvalidAddress(address.to_owned());
    let url = if address.contains("://") {
        reqwest::Url::parse(address)
    } else {
        reqwest::Url::parse(&format!("http://{address}"))
    }
    .map_err(|_| invalid())?;
    let plain = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some_and(|h| !h.is_empty())
        && url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none();
    if plain { Ok(url) } else { Err(invalid()) }
}

/// Whether `url` names this machine: `localhost` or a loopback address.
pub fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A REST client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// `address` is a URL (`http://host:port`) or `host:port`; see [`parse_address`].
    pub fn new(address: &str, token: Option<String>) -> Result<Self, ClientError> {
        let base = parse_address(address)?.as_str().trim_end_matches('/').to_owned();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Publish waits for the nexus to come up on its node; everything else is quick.
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|source| ClientError::Unreachable { url: base.clone(), source })?;
        Ok(Self { base, token, http })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let (url, status, bytes) = self.send(method, path, body).await?;
        let bytes = if status == StatusCode::NO_CONTENT || bytes.is_empty() {
            b"null".as_slice().into()
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            url,
            status: status.as_u16(),
            detail: e.to_string(),
        })
    }

    /// Sends one request; a status other than success is an error, with control's problem
    /// document when it sent one.
    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(String, StatusCode, bytes::Bytes), ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| ClientError::Unreachable { url: url.clone(), source })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Unreachable { url: url.clone(), source })?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<Problem>(&bytes) {
                Ok(p) => ClientError::Api(p),
                Err(_) => ClientError::Api(Problem {
                    kind: "about:blank".into(),
                    title: status.canonical_reason().unwrap_or("error").into(),
                    status: status.as_u16(),
                    detail: format!(
                        "HTTP {} from {url}: {}",
                        status.as_u16(),
                        String::from_utf8_lossy(&bytes).chars().take(200).collect::<String>()
                    ),
                    instance: None,
                }),
            });
        }
        Ok((url, status, bytes))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get("/healthz").await
    }

    pub async fn ready(&self) -> Result<Health, ClientError> {
        self.get("/readyz").await
    }

    // ------------------------------------------------------------ nodes

    pub async fn nodes(&self) -> Result<Vec<Node>, ClientError> {
        self.get("/v1/nodes").await
    }

    pub async fn node(&self, id: &str) -> Result<Node, ClientError> {
        self.get(&format!("/v1/nodes/{}", seg(id))).await
    }

    /// Takes no new replicas or nexuses on the node; returns it `cordoned`.
    pub async fn cordon_node(&self, id: &str) -> Result<Node, ClientError> {
        self.node_op(id, "cordon").await
    }

    /// Undoes a cordon (and stops a drain); returns the node.
    pub async fn uncordon_node(&self, id: &str) -> Result<Node, ClientError> {
        self.node_op(id, "uncordon").await
    }

    /// Cordons the node and moves its replicas and nexuses away; returns it `draining` (it
    /// shows `cordoned` once nothing is left on it).
    pub async fn drain_node(&self, id: &str) -> Result<Node, ClientError> {
        self.node_op(id, "drain").await
    }

    async fn node_op(&self, id: &str, op: &str) -> Result<Node, ClientError> {
        self.call::<(), Node>(Method::POST, &format!("/v1/nodes/{}/{op}", seg(id)), None).await
    }

    // ------------------------------------------------------------ pools

    pub async fn pools(&self) -> Result<Vec<Pool>, ClientError> {
        self.get("/v1/pools").await
    }

    pub async fn pool(&self, id: &str) -> Result<Pool, ClientError> {
        self.get(&format!("/v1/pools/{}", seg(id))).await
    }

    pub async fn create_pool(&self, body: &CreatePoolBody) -> Result<Pool, ClientError> {
        self.call(Method::POST, "/v1/pools", Some(body)).await
    }

    pub async fn delete_pool(&self, id: &str) -> Result<(), ClientError> {
        self.call::<(), ()>(Method::DELETE, &format!("/v1/pools/{}", seg(id)), None).await
    }

    // ------------------------------------------------------------ volumes

    pub async fn volumes(&self) -> Result<Vec<Volume>, ClientError> {
        self.get("/v1/volumes").await
    }

    /// `id` is the volume's UUID or its name.
    pub async fn volume(&self, id: &str) -> Result<Volume, ClientError> {
        self.get(&format!("/v1/volumes/{}", seg(id))).await
    }

    pub async fn create_volume(&self, body: &CreateVolumeBody) -> Result<Volume, ClientError> {
        self.call(Method::POST, "/v1/volumes", Some(body)).await
    }

    pub async fn delete_volume(&self, id: &str) -> Result<(), ClientError> {
        self.call::<(), ()>(Method::DELETE, &format!("/v1/volumes/{}", seg(id)), None).await
    }

    pub async fn resize_volume(&self, id: &str, size: ByteSize) -> Result<Volume, ClientError> {
        let body = ResizeVolumeBody { size };
        self.call(Method::POST, &format!("/v1/volumes/{}/resize", seg(id)), Some(&body)).await
    }

    /// Grows or shrinks the number of replicas the volume keeps; returns the volume.
    pub async fn set_replicas(&self, id: &str, replicas: u8) -> Result<Volume, ClientError> {
        let body = SetReplicasBody { replicas };
        self.call(Method::POST, &format!("/v1/volumes/{}/set-replicas", seg(id)), Some(&body)).await
    }

    /// Publishes the volume (creates its nexus) and returns it with `status.target.uri` set.
    pub async fn publish_volume(
        &self,
        id: &str,
        body: &PublishBody,
    ) -> Result<Volume, ClientError> {
        self.call(Method::PUT, &format!("/v1/volumes/{}/target", seg(id)), Some(body)).await
    }

    pub async fn unpublish_volume(&self, id: &str) -> Result<Volume, ClientError> {
        self.call::<(), Volume>(Method::DELETE, &format!("/v1/volumes/{}/target", seg(id)), None)
            .await
    }

    // ------------------------------------------------------------ replicas

    pub async fn replicas(&self, volume: Option<&str>) -> Result<Vec<Replica>, ClientError> {
        match volume {
            Some(v) => self.get(&format!("/v1/volumes/{}/replicas", seg(v))).await,
            None => self.get("/v1/replicas").await,
        }
    }

    // ------------------------------------------------------------ events

    /// Events with a sequence number above `after` (all retained events when `None`).
    pub async fn events(&self, after: Option<u64>) -> Result<Vec<Event>, ClientError> {
        match after {
            Some(a) => self.get(&format!("/v1/events?after={a}")).await,
            None => self.get("/v1/events").await,
        }
    }

    /// The raw text of a path (for `/metrics` and `/v1/openapi.json`); an error status is an
    /// error, not text.
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let (_, _, bytes) = self.send::<()>(Method::GET, path, None).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Percent-encodes a path segment; ids are validated names or UUIDs, but a user may type
/// anything on the command line and it must not change the path.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            Client::new("127.0.0.1:7480", None).unwrap().base_url(),
            "http://127.0.0.1:7480"
        );
        assert_eq!(
            Client::new("http://localhost:7480/", None).unwrap().base_url(),
            "http://localhost:7480"
        );
        assert_eq!(
            Client::new("https://Example.com:8443/trireme/", None).unwrap().base_url(),
            "https://example.com:8443/trireme"
        );
        for bad in [
            "ftp://x:1",
            "",
            "http://",
            "http://127.0.0.1:7480@example.com",
            "http://user:pw@127.0.0.1:7480",
            "127.0.0.1:7480/?x=1",
            "127.0.0.1:7480#frag",
        ] {
            assert!(Client::new(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_addresses() {
        let local = |a: &str| parse_address(a).is_ok_and(|u| is_loopback(&u));
        for a in ["127.0.0.1:7480", "http://127.0.0.1:7480/", "localhost:1", "http://[::1]:7480"] {
            assert!(local(a), "{a}");
        }
        for a in [
            "10.0.0.1:7480",
            "https://example.com",
            "http://[2001:db8::1]:80",
            "http://[::1]@example.com",
        ] {
            assert!(!local(a), "{a}");
        }
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(seg("vol-1"), "vol-1");
        assert_eq!(seg("../x y"), "..%2Fx%20y");
    }
}
