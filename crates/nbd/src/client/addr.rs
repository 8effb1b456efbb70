//! Where an NBD server is: a TCP `host:port` or a Unix socket path, and the NBD URI forms
//! (`nbd://host[:port]/export`, `nbd+unix:///export?socket=/path`) that name one.

use std::fmt;
use std::path::PathBuf;

use super::ClientError;

/// The IANA port for NBD, used when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// The address of an NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAddr {
    /// `host:port` as given to `TcpStream::connect` (a name, IPv4, or `[v6]`).
    Tcp(String),
    Unix(PathBuf),
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientAddr::Tcp(hp) => f.write_str(hp),
            ClientAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl From<std::net::SocketAddr> for ClientAddr {
    fn from(a: std::net::SocketAddr) -> Self {
        ClientAddr::Tcp(a.to_string())
    }
}

impl ClientAddr {
    /// Parses an NBD URI into the server address and the export name.
    ///
    /// Accepts `nbd://host[:port][/export]` and `nbd+unix:///[export]?socket=PATH`; the export
    /// name is percent-decoded. TLS schemes (`nbds`) are refused: we do not speak TLS.
    pub fn parse_uri(uri: &str) -> Result<(ClientAddr, String), ClientError> {
        let bad = |reason: &str| ClientError::InvalidUri { uri: uri.into(), reason: reason.into() };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("missing scheme"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).ok_or_else(|| bad("bad percent-encoding"))?;
        match scheme {
            "nbd" | "nbd+tcp" => {
                if query.is_some_and(|q| !q.is_empty()) {
                    return Err(bad("query parameters are not supported for nbd://"));
                }
                if authority.is_empty() {
                    return Err(bad("missing host"));
                }
                Ok((ClientAddr::Tcp(with_port(authority).ok_or_else(|| bad("bad port"))?), export))
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad("nbd+unix takes no host"));
                }
                let mut socket = None;
                for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
                    match pair.split_once('=') {
                        Some(("socket", v)) => {
                            socket = Some(percent_decode(v).ok_or_else(|| bad("bad socket"))?);
                        }
                        _ => return Err(bad("unknown query parameter")),
                    }
                }
                let socket =
                    socket.filter(|s| !s.is_empty()).ok_or_else(|| bad("missing socket="))?;
                Ok((ClientAddr::Unix(PathBuf::from(socket)), export))
            }
            "nbds" | "nbds+unix" | "nbds+tcp" => Err(bad("TLS is not supported")),
            _ => Err(bad("unknown scheme")),
        }
    }
}

/// Appends the default port unless the authority has one (`[v6]` literals kept intact).
fn with_port(authority: &str) -> Option<String> {
    let has_port = if let Some(end) = authority.strip_prefix('[') {
        let close = end.find(']')?;
        match &end[close + 1..] {
            "" => false,
            p => {
                p.strip_prefix(':')?.parse::<u16>().ok()?;
                true
            }
        }
    } else {
        match authority.rsplit_once(':') {
            Some((_, p)) => {
                p.parse::<u16>().ok()?;
                true
            }
            None => false,
        }
    };
    Some(if has_port { authority.to_owned() } else { format!("{authority}:{DEFAULT_PORT}") })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(uri: &str) -> (ClientAddr, String) {
        ClientAddr::parse_uri(uri).unwrap()
    }

    #[test]
    fn tcp_uris() {
        assert_eq!(
            ok("nbd://127.0.0.1:1234/vol-1"),
            (ClientAddr::Tcp("127.0.0.1:1234".into()), "vol-1".into())
        );
        assert_eq!(ok("nbd://host/e"), (ClientAddr::Tcp("host:10809".into()), "e".into()));
        assert_eq!(ok("nbd://host:99"), (ClientAddr::Tcp("host:99".into()), String::new()));
        assert_eq!(ok("nbd://[::1]:5/a%20b"), (ClientAddr::Tcp("[::1]:5".into()), "a b".into()));
        assert_eq!(ok("nbd://[::1]/x").0, ClientAddr::Tcp("[::1]:10809".into()));
        assert_eq!(ok("nbd://h/a/b").1, "a/b");
    }

    #[test]
    fn unix_uris() {
        let (a, e) = ok("nbd+unix:///exp?socket=/run/x.sock");
        assert_eq!(a, ClientAddr::Unix("/run/x.sock".into()));
        assert_eq!(e, "exp");
        assert_eq!(ok("nbd+unix://?socket=/s").1, "");
    }

    #[test]
    fn bad_uris() {
        for uri in [
            "nbd:/x",
            "http://h/e",
            "nbd:///e",
            "nbd://h:notaport/e",
            "nbd://h:99999/e",
            "nbd+unix:///e",
            "nbd+unix://host/e?socket=/s",
            "nbd+unix:///e?sock=/s",
            "nbds://h/e",
            "nbd://h/%zz",
            "nbd://h/e?x=1",
        ] {
            assert!(
                matches!(ClientAddr::parse_uri(uri), Err(ClientError::InvalidUri { .. })),
                "{uri}"
            );
        }
    }
}
