//! A client that re-establishes its connection on demand.
//!
//! ```text
//!  caller ── client() ──> current connection alive? ── yes ──> Arc<Client>
//!                               │ no
//!                               └─> (one caller at a time) connect, back off, retry ──> event
//! ```
//! It never retries a request: a request that failed on a dead connection is reported as it
//! failed, and the caller (the nexus) decides whether the child is faulted. The next request
//! reconnects. Each new connection, and each failed attempt, is published as a
//! [`ReconnectEvent`] so the owner can log it, count it and decide when to give up.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tracing::{info, warn};
use trireme_iobuf::IoBuf;

use super::{Client, ClientAddr, ClientError, ClientOptions};
use crate::export::{BlockSizes, Capabilities, Export, ExportError, Extent};

/// How hard to try when a connection is needed.
#[derive(Debug, Clone)]
pub struct ReconnectPolicy {
    /// Wait before the second attempt; doubled after each further failure.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Attempts per demand (each bounded by `connect_timeout`); at least one.
    pub max_attempts: u32,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_attempts: 6,
        }
    }
}

impl ReconnectPolicy {
    /// The wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.initial_backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// What happened to the connection.
#[derive(Debug, Clone)]
pub enum ReconnectEvent {
    /// Connection number `generation` (1 for the first) is up after `attempts` tries.
    Connected { generation: u64, attempts: u32 },
    /// One attempt failed; `retry_in` is `None` when this demand has given up.
    AttemptFailed { attempt: u32, error: ClientError, retry_in: Option<Duration> },
}

struct Current {
    client: Option<Arc<Client>>,
    generation: u64,
    size: u64,
    capabilities: Capabilities,
    block_sizes: BlockSizes,
    /// `disconnect` was called: no more connections.
    shut: bool,
}

/// An NBD client for one export that reconnects when asked for a connection and the last
/// one is dead.
pub struct ReconnectingClient {
    addr: ClientAddr,
    export: String,
    opts: ClientOptions,
    policy: ReconnectPolicy,
    current: Mutex<Current>,
    /// Single-flights reconnection: held across connect attempts on purpose, so a burst of
    /// failing requests makes one series of attempts rather than one each. Bounded by
    /// `max_attempts` × (`connect_timeout` + backoff).
    gate: tokio::sync::Mutex<()>,
    events: broadcast::Sender<ReconnectEvent>,
}

impl std::fmt::Debug for ReconnectingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconnectingClient")
            .field("addr", &self.addr)
            .field("export", &self.export)
            .field("generation", &self.generation())
            .finish()
    }
}

impl ReconnectingClient {
    /// Makes the first connection (retrying per `policy`).
    pub async fn connect(
        addr: ClientAddr,
        export: &str,
        opts: ClientOptions,
        policy: ReconnectPolicy,
    ) -> Result<Self, ClientError> {
        let (events, _) = broadcast::channel(64);
        let this = Self {
            addr,
            export: export.to_owned(),
            opts,
            policy,
            current: Mutex::new(Current {
                client: None,
                generation: 0,
                size: 0,
                capabilities: Capabilities::ALL,
                block_sizes: BlockSizes::default(),
                shut: false,
            }),
            gate: tokio::sync::Mutex::new(()),
            events,
        };
        this.client().await?;
        Ok(this)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Events from now on (a lagging receiver loses the oldest).
    pub fn subscribe(&self) -> broadcast::Receiver<ReconnectEvent> {
        self.events.subscribe()
    }

    /// How many connections have been established so far.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// The current connection if it is alive; never connects.
    pub fn current(&self) -> Option<Arc<Client>> {
        self.lock().client.clone().filter(|c| c.is_alive())
    }

    /// A live connection: the current one, or a new one made now.
    pub async fn client(&self) -> Result<Arc<Client>, ClientError> {
        if let Some(c) = self.alive_or_shut()? {
            return Ok(c);
        }
        let _gate = self.gate.lock().await;
        // Someone else may have reconnected while we waited at the gate.
        if let Some(c) = self.alive_or_shut()? {
            return Ok(c);
        }
        self.establish().await
    }

    /// Aborts the current connection (see [`Client::abort`]); the next request connects
    /// anew. For a peer that timed out: its old connection must not deliver anything later.
    pub fn abort_current(&self) {
        let old = self.lock().client.take();
        if let Some(c) = old {
            c.abort();
        }
    }

    /// Drops the current connection (even if alive) and makes a new one.
    pub async fn reconnect(&self) -> Result<Arc<Client>, ClientError> {
        let _gate = self.gate.lock().await;
        let old = self.lock().client.take();
        drop(old);
        self.alive_or_shut()?;
        self.establish().await
    }

    /// Closes the current connection cleanly; later calls fail with `Disconnected`.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        let old = {
            let mut cur = self.lock();
            cur.shut = true;
            cur.client.take()
        };
        match old {
            Some(c) => c.disconnect().await,
            None => Ok(()),
        }
    }

    fn alive_or_shut(&self) -> Result<Option<Arc<Client>>, ClientError> {
        let cur = self.lock();
        if cur.shut {
            return Err(ClientError::disconnected("client was disconnected"));
        }
        Ok(cur.client.clone().filter(|c| c.is_alive()))
    }

    async fn establish(&self) -> Result<Arc<Client>, ClientError> {
        let attempts = self.policy.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Client::connect(self.addr.clone(), &self.export, self.opts.clone()).await {
                Ok(c) => {
                    let c = Arc::new(c);
                    let generation = {
                        let mut cur = self.lock();
                        if cur.shut {
                            None
                        } else {
                            cur.generation += 1;
                            cur.size = c.size();
                            cur.capabilities = c.capabilities();
                            cur.block_sizes = c.block_sizes();
                            cur.client = Some(c.clone());
                            Some(cur.generation)
                        }
                    };
                    let Some(generation) = generation else {
                        // `disconnect` ran while we were connecting.
                        let _ = c.disconnect().await;
                        return Err(ClientError::disconnected("client was disconnected"));
                    };
                    info!(addr = %self.addr, export = %self.export, generation, attempts = attempt,
                        "NBD client connected");
                    let _ = self
                        .events
                        .send(ReconnectEvent::Connected { generation, attempts: attempt });
                    return Ok(c);
                }
                Err(error) => {
                    let retry_in = (attempt < attempts).then(|| self.policy.backoff(attempt));
                    warn!(addr = %self.addr, export = %self.export, attempt, %error,
                        "NBD client connection attempt failed");
                    let _ = self.events.send(ReconnectEvent::AttemptFailed {
                        attempt,
                        error: error.clone(),
                        retry_in,
                    });
                    match retry_in {
                        Some(d) => tokio::time::sleep(d).await,
                        None => return Err(error),
                    }
                }
            }
        }
    }

    /// Export size as of the latest connection.
    pub fn size(&self) -> u64 {
        self.lock().size
    }

    pub fn capabilities(&self) -> Capabilities {
        self.lock().capabilities
    }

    pub fn block_sizes(&self) -> BlockSizes {
        self.lock().block_sizes
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, ClientError> {
        self.client().await?.read(offset, len).await
    }

    pub async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), ClientError> {
        self.client().await?.write(offset, data, fua).await
    }

    pub async fn flush(&self) -> Result<(), ClientError> {
        self.client().await?.flush().await
    }

    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ClientError> {
        self.client().await?.trim(offset, len, fua).await
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), ClientError> {
        self.client().await?.write_zeroes(offset, len, may_trim, fua).await
    }

    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ClientError> {
        self.client().await?.block_status(offset, len).await
    }
}

#[async_trait]
impl Export for ReconnectingClient {
    fn size(&self) -> u64 {
        ReconnectingClient::size(self)
    }
    fn capabilities(&self) -> Capabilities {
        ReconnectingClient::capabilities(self)
    }
    fn block_sizes(&self) -> BlockSizes {
        ReconnectingClient::block_sizes(self)
    }
    async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, ExportError> {
        Ok(ReconnectingClient::read(self, offset, len).await?)
    }
    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), ExportError> {
        Ok(ReconnectingClient::write(self, offset, data, fua).await?)
    }
    async fn flush(&self) -> Result<(), ExportError> {
        Ok(ReconnectingClient::flush(self).await?)
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        Ok(ReconnectingClient::trim(self, offset, len, fua).await?)
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), ExportError> {
        Ok(ReconnectingClient::write_zeroes(self, offset, len, may_trim, fua).await?)
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        Ok(ReconnectingClient::block_status(self, offset, len).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = ReconnectPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_attempts: 10,
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(4), Duration::from_millis(800));
        assert_eq!(p.backoff(5), Duration::from_secs(1));
        assert_eq!(p.backoff(200), Duration::from_secs(1));
    }
}
