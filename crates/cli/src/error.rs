//! What a CLI command can fail with, each as one sentence for stderr, and its exit code.

use std::path::PathBuf;

use trireme_api::ClientError;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the Trireme API at {url} — is `trireme up` running?")]
    Unreachable { url: String },
    #[error("the Trireme API at {url} did not answer in time")]
    Timeout { url: String },
    #[error("{detail} — pass an admin token with --token or TRIREME_TOKEN")]
    Unauthorized { detail: String },
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    /// Control's own sentence (the problem document's `detail`).
    #[error("{0}")]
    Api(String),
    #[error("{0}")]
    Client(ClientError),
    #[error("`trireme {0}` is not available yet in this version of Trireme")]
    NotAvailable(&'static str),
    #[error("cannot read the admin token at {path}: {source}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {0:?} was published, but control reported no NBD URI for it")]
    NoTarget(String),
    #[error("cannot format the output: {0}")]
    Format(String),
    #[error("cannot write the output: {0}")]
    Write(#[source] std::io::Error),
    #[error("cannot write the support bundle {path}: {source}")]
    Dump {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CliError {
    /// 2 for what this version cannot do (like a usage error), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NotAvailable(_) => 2,
            _ => 1,
        }
    }

    /// Turns a client error into the sentence a user should see. `api` is the base URL the CLI
    /// was pointed at (the client's own errors name the full request URL).
    pub fn from_client(err: ClientError, api: &str) -> Self {
        match err {
            ClientError::Unreachable { source, .. } if source.is_timeout() => {
                Self::Timeout { url: api.to_owned() }
            }
            ClientError::Unreachable { .. } => Self::Unreachable { url: api.to_owned() },
            ClientError::Api(p) if p.status == 401 || p.status == 403 => {
                let detail = if p.detail.is_empty() { p.title } else { p.detail };
                Self::Unauthorized { detail }
            }
            ClientError::Api(p) if !p.detail.is_empty() => Self::Api(p.detail),
            ClientError::Api(p) => Self::Api(format!("{} (HTTP {})", p.title, p.status)),
            other => Self::Client(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use trireme_api::Problem;

    use super::*;

    fn problem(status: u16, detail: &str) -> ClientError {
        ClientError::Api(Problem {
            kind: "trireme:x".into(),
            title: "Title".into(),
            status,
            detail: detail.into(),
            instance: None,
        })
    }

    #[test]
    fn api_errors_read_as_controls_sentence() {
        let e = CliError::from_client(problem(404, "volume \"x\" not found"), "http://h:1");
        assert_eq!(e.to_string(), "volume \"x\" not found");
        assert_eq!(e.exit_code(), 1);
        let e = CliError::from_client(problem(500, ""), "http://h:1");
        assert_eq!(e.to_string(), "Title (HTTP 500)");
    }

    #[test]
    fn auth_errors_say_how_to_fix_them() {
        let e = CliError::from_client(problem(401, "missing bearer token"), "http://h:1");
        assert_eq!(
            e.to_string(),
            "missing bearer token — pass an admin token with --token or TRIREME_TOKEN"
        );
    }

    #[tokio::test]
    async fn an_unreachable_api_names_the_address() {
        // Bind then drop: nothing listens on this port any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}");
        let client = trireme_api::Client::new(&url, None).unwrap();
        let err = CliError::from_client(client.nodes().await.unwrap_err(), &url);
        assert_eq!(
            err.to_string(),
            format!("cannot reach the Trireme API at {url} — is `trireme up` running?")
        );
    }

    #[test]
    fn not_available_is_a_usage_error() {
        let e = CliError::NotAvailable("snapshot");
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("not available yet"));
    }
}
