//! Every address of a local cluster derives from the API address, so that a test can run a whole
//! cluster on one random port `P` and know where everything else listens:
//!
//! ```text
//!   P          control REST API (and GUI)
//!   P+1        control gRPC (engines register and heartbeat here)
//!   P+10+2i    engine i gRPC   (i = 1..=N)
//!   P+11+2i    engine i NBD
//!   P+11+2N+i  engine i Prometheus /metrics (after every engine's pair, so that the ports
//!              above stay where earlier versions put them)
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::error::UpError;

/// The addresses of one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnginePorts {
    /// 1-based, as in `node-<index>`.
    pub index: u16,
    pub grpc: SocketAddr,
    pub nbd: SocketAddr,
    pub metrics: SocketAddr,
}

/// Every address of a cluster of `nodes` engines whose API listens on `api`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports {
    pub api: SocketAddr,
    pub control_grpc: SocketAddr,
    pub engines: Vec<EnginePorts>,
}

impl Ports {
    pub fn derive(api: SocketAddr, nodes: u16) -> Result<Self, UpError> {
        let p = u32::from(api.port());
        if p == 0 {
            return Err(UpError::ZeroPort);
        }
        let n = u32::from(nodes);
        let highest = p + 11 + 3 * n;
        if highest > u32::from(u16::MAX) {
            return Err(UpError::PortsOverflow { api: api.port(), nodes, highest });
        }
        // Checked above: every offset stays within u16.
        let at = |offset: u32| SocketAddr::new(api.ip(), (p + offset) as u16);
        let engines = (1..=nodes)
            .map(|i| {
                let i32 = u32::from(i);
                EnginePorts {
                    index: i,
                    grpc: at(10 + 2 * i32),
                    nbd: at(11 + 2 * i32),
                    metrics: at(11 + 2 * n + i32),
                }
            })
            .collect();
        Ok(Self { api, control_grpc: at(1), engines })
    }

    /// Every listening address with a human name, for the "already in use" check.
    pub fn all(&self) -> Vec<(String, SocketAddr)> {
        let mut out = vec![
            ("the control API".to_owned(), self.api),
            ("control gRPC".to_owned(), self.control_grpc),
        ];
        for e in &self.engines {
            out.push((format!("node-{} gRPC", e.index), e.grpc));
            out.push((format!("node-{} NBD", e.index), e.nbd));
            out.push((format!("node-{} metrics", e.index), e.metrics));
        }
        out
    }
}

/// The address other processes use to reach a listener: a wildcard listen address is reached
/// through loopback on this machine.
pub fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// The `http://` URL of a listener.
pub fn http_url(addr: SocketAddr) -> String {
    format!("http://{}", reachable(addr))
}

/// Parses `--api`: `host:port` or `http://host:port`, with an IP address and a non-zero port.
pub fn parse_api_addr(s: &str) -> Result<SocketAddr, String> {
    let bare = s.trim().trim_start_matches("http://").trim_end_matches('/');
    let addr: SocketAddr = bare.parse().map_err(|_| {
        format!("{s:?} is not an address: expected IP:PORT, e.g. 127.0.0.1:7480 or [::1]:7480")
    })?;
    if addr.port() == 0 {
        return Err(format!(
            "{s:?} has port 0, but every other port derives from the API port: pick one"
        ));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ports_derive_from_the_api_port() {
        let p = Ports::derive(addr("127.0.0.1:7480"), 3).unwrap();
        assert_eq!(p.control_grpc, addr("127.0.0.1:7481"));
        assert_eq!(p.engines.len(), 3);
        assert_eq!(
            p.engines[0],
            EnginePorts {
                index: 1,
                grpc: addr("127.0.0.1:7492"),
                nbd: addr("127.0.0.1:7493"),
                metrics: addr("127.0.0.1:7498"),
            }
        );
        assert_eq!(p.engines[2].grpc, addr("127.0.0.1:7496"));
        assert_eq!(p.engines[2].nbd, addr("127.0.0.1:7497"));
        // No two listeners share a port.
        let mut all: Vec<u16> = p.all().iter().map(|(_, a)| a.port()).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 2 + 3 * 3);
        assert_eq!(p.engines[2].metrics, addr("127.0.0.1:7500"));
    }

    #[test]
    fn ports_keep_the_api_host() {
        let p = Ports::derive(addr("[::1]:20000"), 1).unwrap();
        assert_eq!(p.engines[0].nbd, addr("[::1]:20013"));
    }

    #[test]
    fn ports_past_the_end_are_refused() {
        assert!(Ports::derive(addr("127.0.0.1:65520"), 1).is_ok());
        assert!(matches!(
            Ports::derive(addr("127.0.0.1:65520"), 3),
            Err(UpError::PortsOverflow { highest: 65540, .. })
        ));
        assert!(matches!(Ports::derive(addr("127.0.0.1:0"), 3), Err(UpError::ZeroPort)));
    }

    #[test]
    fn wildcard_listeners_are_reached_through_loopback() {
        assert_eq!(http_url(addr("0.0.0.0:7480")), "http://127.0.0.1:7480");
        assert_eq!(http_url(addr("[::]:7480")), "http://[::1]:7480");
        assert_eq!(http_url(addr("10.1.2.3:7480")), "http://10.1.2.3:7480");
    }

    #[test]
    fn api_addresses_parse() {
        assert_eq!(parse_api_addr("127.0.0.1:7480").unwrap(), addr("127.0.0.1:7480"));
        assert_eq!(parse_api_addr("http://127.0.0.1:9000/").unwrap(), addr("127.0.0.1:9000"));
        assert!(parse_api_addr("localhost").is_err());
        assert!(parse_api_addr("127.0.0.1:0").unwrap_err().contains("port 0"));
    }
}
