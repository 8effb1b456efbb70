//! Bringing a freshly started (or resumed) cluster to "ready": control answers `/readyz`, every
//! engine has registered and is online, and every engine has its pool. Each step polls with a
//! bounded deadline; pool creation is idempotent on the server, so a resumed cluster passes
//! through the same steps and finds everything already there.

use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use trireme_api::{Client, ClientError, CreatePoolBody, PoolState};
use trireme_types::{ByteSize, NodeId, NodeState, PoolId};

use crate::error::UpError;
use crate::layout::{Layout, node_name, pool_name};
use crate::state::UpState;

/// How long each step may take. Generous: a loaded CI machine starts processes slowly.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one request may take while polling.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(200);

/// A child restarted this often during startup will not come up by waiting longer.
const CRASH_LOOP: u32 = 3;

/// Waits until control answers `/readyz`, then returns a client carrying the admin token.
pub async fn wait_for_control(
    api_url: &str,
    layout: &Layout,
    state: &watch::Receiver<UpState>,
) -> Result<Client, UpError> {
    let anonymous = Client::new(api_url, None)?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match tokio::time::timeout(CALL_TIMEOUT, anonymous.ready()).await {
            Ok(Ok(_)) => break,
            Ok(Err(e)) => tracing::debug!(error = %e, "control not ready yet"),
            Err(_) => tracing::debug!("control's /readyz timed out"),
        }
        let restarts = state.borrow().control.restarts;
        let problem = if restarts >= CRASH_LOOP {
            format!("keeps exiting (restarted {restarts} times)")
        } else if Instant::now() >= deadline {
            format!("did not become ready within {}s", STEP_TIMEOUT.as_secs())
        } else {
            tokio::time::sleep(POLL).await;
            continue;
        };
        return Err(UpError::child("control", problem, layout.log_file("control")));
    }
    let token = read_token(&layout.admin_token()).await?;
    Ok(Client::new(api_url, Some(token))?)
}

/// Control writes its token files before it reports ready, but give a slow file system a moment.
async fn read_token(path: &Path) -> Result<String, UpError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::fs::read_to_string(path).await {
            Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
            Ok(_) if Instant::now() < deadline => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {}
            Ok(_) => {
                let source =
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty");
                return Err(UpError::Token { path: path.to_owned(), source });
            }
            Err(source) => return Err(UpError::Token { path: path.to_owned(), source }),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until engines `1..=nodes` are registered and not offline.
pub async fn wait_for_nodes(
    client: &Client,
    nodes: u16,
    layout: &Layout,
    state: &watch::Receiver<UpState>,
) -> Result<(), UpError> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let missing = match tokio::time::timeout(CALL_TIMEOUT, client.nodes()).await {
            Ok(Ok(listed)) => (1..=nodes).find(|&i| {
                let name = node_name(i);
                !listed
                    .iter()
                    .any(|n| n.id.as_str() == name && n.status.state != NodeState::Offline)
            }),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot list nodes yet");
                Some(1)
            }
            Err(_) => Some(1),
        };
        let Some(missing) = missing else {
            return Ok(());
        };
        crash_loop(state, layout)?;
        let (node, problem) = if Instant::now() >= deadline {
            (node_name(missing), format!("did not come online within {}s", STEP_TIMEOUT.as_secs()))
        } else {
            tokio::time::sleep(POLL).await;
            continue;
        };
        return Err(UpError::child(&node, problem, layout.log_file(&node)));
    }
}

/// Fails at once, quoting its log, if an engine keeps exiting: waiting out a step's timeout
/// for a node that cannot stay up would only delay the same answer.
pub(crate) fn crash_loop(state: &watch::Receiver<UpState>, layout: &Layout) -> Result<(), UpError> {
    let crashing = state
        .borrow()
        .nodes
        .iter()
        .find(|n| n.restarts >= CRASH_LOOP)
        .map(|n| (n.name.clone(), n.restarts));
    match crashing {
        Some((node, restarts)) => Err(UpError::child(
            &node,
            format!("keeps exiting (restarted {restarts} times)"),
            layout.log_file(&node),
        )),
        None => Ok(()),
    }
}

/// Creates `pool-<i>` on `node-<i>` backed by `DIR/node-<i>/pool.img`, or finds it there.
pub async fn ensure_pool(
    client: &Client,
    index: u16,
    size: ByteSize,
    layout: &Layout,
    state: &watch::Receiver<UpState>,
) -> Result<(), UpError> {
    let (pool, node) = (pool_name(index), node_name(index));
    let invalid = |e: trireme_types::IdError| UpError::Pool {
        pool: pool.clone(),
        node: node.clone(),
        reason: e.to_string(),
    };
    let body = CreatePoolBody {
        name: PoolId::new(pool.clone()).map_err(invalid)?,
        node: NodeId::new(node.clone()).map_err(invalid)?,
        disk: layout.pool_image(index).display().to_string(),
        size: Some(size),
    };
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let err = match tokio::time::timeout(STEP_TIMEOUT, client.create_pool(&body)).await {
            Ok(Ok(p)) => {
                if p.status.state != PoolState::Online {
                    tracing::info!(pool = %pool, state = ?p.status.state, "pool created; not online yet");
                }
                return Ok(());
            }
            Ok(Err(e)) => e,
            Err(_) => {
                return Err(UpError::Pool { pool, node, reason: "control did not answer".into() });
            }
        };
        // A pool of that name with another spec (say, `up` restarted with another --pool-size)
        // is still this node's pool: keep it rather than refuse to start.
        if err.status() == Some(409)
            && let Ok(Ok(existing)) = tokio::time::timeout(CALL_TIMEOUT, client.pool(&pool)).await
            && existing.spec.node.as_str() == node
        {
            tracing::warn!(pool = %pool, error = %err, "keeping the existing pool");
            return Ok(());
        }
        crash_loop(state, layout)?;
        if !retryable(&err) || Instant::now() >= deadline {
            return Err(UpError::Pool { pool, node, reason: err.to_string() });
        }
        tracing::debug!(pool = %pool, error = %err, "pool not created yet; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits until pools `1..=nodes` are online: control creates (or imports) them on their
/// engines asynchronously, and a volume can only be placed on an online pool.
pub async fn wait_for_pools(
    client: &Client,
    nodes: u16,
    layout: &Layout,
    state: &watch::Receiver<UpState>,
) -> Result<(), UpError> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let listed = match tokio::time::timeout(CALL_TIMEOUT, client.pools()).await {
            Ok(Ok(listed)) => listed,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot list pools yet");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        let pending = (1..=nodes).find_map(|i| {
            let name = pool_name(i);
            match listed.iter().find(|p| p.id.as_str() == name) {
                Some(p) if p.status.state == PoolState::Online => None,
                Some(p) => Some((
                    i,
                    p.status
                        .error
                        .clone()
                        .unwrap_or_else(|| format!("it is {}", serde_name(&p.status.state))),
                )),
                None => Some((i, "control does not list it".to_owned())),
            }
        });
        let Some((index, reason)) = pending else {
            return Ok(());
        };
        crash_loop(state, layout)?;
        if Instant::now() >= deadline {
            return Err(UpError::PoolNotOnline {
                pool: pool_name(index),
                reason,
                after: STEP_TIMEOUT,
                log: layout.log_file(&node_name(index)),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

fn serde_name(state: &PoolState) -> String {
    match serde_json::to_value(state) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{state:?}"),
    }
}

/// Right after registration an engine may still be importing its pools, and control may not
/// have seen the node yet: "unavailable", other server-side errors and "not found" clear on
/// their own.
fn retryable(err: &ClientError) -> bool {
    match err {
        ClientError::Api(p) => p.status >= 500 || p.status == 404,
        ClientError::Unreachable { .. } => true,
        ClientError::Decode { .. } | ClientError::InvalidAddress(_) => false,
    }
}
