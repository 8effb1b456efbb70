//! Reconcilers: small pollers that bring the engines to the spec.
//!
//! ```text
//!            timer (--reconcile-secs) ─┐
//!   Registry::wake() (REST, register) ─┼─> pass:
//!                                      │     1. observe   every online node (List*, bounded)
//!                                      │     2. pools     create/import missing, finish deleting
//!                                      │     3. volumes   finish creating / resizing / deleting
//!                                      │     4. nexuses   create for published volumes
//!                                      │    4b. children  re-add returning ones, replace lost
//!                                      │                  ones, stamp generations
//!                                      │    4c. drain     move replicas and nexuses off
//!                                      │                  draining nodes
//!                                      │     5. orphans   destroy_orphaned nexuses and replicas
//!                                      └─> pass_done() (publish waiters re-check)
//! ```
//!
//! Every engine call is bounded by the engine timeout, so one pass is bounded too. After a
//! restart of any process the same pass does the right thing: an engine that restarted has
//! re-imported its pools but lost its nexuses (step 4 recreates them); a control that
//! restarted reloaded the spec from the store and observes before acting.
//! Failures become events, once per distinct failure (not once per pass).

mod children;
mod drain;
mod nexus;
mod pool;
mod volume;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use trireme_rpc as rpc;
use trireme_types::{NodeId, ReplicaId, VolumeId};

use crate::events::Kind;
use crate::registry::{Observation, Registry};

/// How often and how patiently the reconciler acts (from the control flags).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Between passes (they also run when something changes).
    pub period: Duration,
    /// How long a faulted child must be reachable again before it is added back, and the
    /// least time between two attempts.
    pub child_retry: Duration,
    /// How long a child may stay faulted before a new replica replaces it.
    pub replace_after: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            period: Duration::from_secs(2),
            child_retry: Duration::from_secs(3),
            replace_after: Duration::from_secs(300),
        }
    }
}

impl Settings {
    pub fn from_args(args: &crate::ControlArgs) -> Self {
        Self {
            period: Duration::from_secs(args.reconcile_secs.max(1)),
            child_retry: Duration::from_secs(args.child_retry_secs),
            replace_after: Duration::from_secs(args.replica_replace_secs),
        }
    }
}

/// The reconciler's memory between passes (never persisted).
#[derive(Debug, Default)]
pub struct Reconciler {
    settings: Settings,
    /// Faulted children seen reachable again: since when (or since the last attempt).
    joinable_since: children::JoinTimes,
    /// The last failure reported per subject, so a failure is an event once, not every pass.
    failures: HashMap<String, String>,
    pool_states: HashMap<trireme_types::PoolId, trireme_api::PoolState>,
    volume_states: HashMap<VolumeId, trireme_types::VolumeState>,
    /// Volumes whose nexus was observed where the spec wants it; one missing later was lost.
    nexuses_seen: std::collections::HashSet<VolumeId>,
    /// When old tombstones were last looked for.
    tombstones_checked: Option<std::time::Instant>,
}

/// How long the store remembers a deleted volume, so that its replicas on a node that was away
/// when it was deleted are still recognised and destroyed when the node returns.
const TOMBSTONE_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often, and how many per pass, old tombstones are removed.
const TOMBSTONE_CHECK_EVERY: Duration = Duration::from_secs(600);
const TOMBSTONE_BATCH: usize = 1000;

/// Runs passes until cancelled.
pub async fn run(registry: Arc<Registry>, settings: Settings, cancel: CancellationToken) {
    let period = settings.period;
    let mut rec = Reconciler { settings, ..Reconciler::default() };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = rec.pass(&registry) => {}
        }
        registry.pass_done();
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(period) => {}
            _ = registry.woken() => {}
        }
    }
}

impl Reconciler {
    async fn expire_tombstones(&mut self, reg: &Registry) {
        if self.tombstones_checked.is_some_and(|t| t.elapsed() < TOMBSTONE_CHECK_EVERY) {
            return;
        }
        self.tombstones_checked = Some(std::time::Instant::now());
        let now = crate::events::now_ms();
        match reg.expire_tombstones(now, TOMBSTONE_RETENTION, TOMBSTONE_BATCH).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "forgot tombstones of volumes deleted long ago"),
            Err(e) => tracing::warn!(error = %e, "cannot remove old tombstones"),
        }
    }
}

/// Marks nodes offline when their heartbeats stop, until cancelled.
pub async fn watch_liveness(registry: Arc<Registry>, cancel: CancellationToken) {
    let tick =
        (registry.node_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(tick) => registry.check_liveness().await,
        }
    }
}

impl Reconciler {
    pub async fn pass(&mut self, reg: &Registry) {
        self.observe(reg).await;
        self.note_nexuses(reg);
        self.pools(reg).await;
        self.volumes(reg).await;
        self.nexuses(reg).await;
        self.children(reg).await;
        self.drain(reg).await;
        self.destroy_orphaned(reg).await;
        self.expire_tombstones(reg).await;
        self.state_events(reg).await;
    }

    /// Remembers which published volumes have their nexus in place (and forgets unpublished
    /// ones, so a later publish is not mistaken for a recreation).
    fn note_nexuses(&mut self, reg: &Registry) {
        let st = reg.state.read();
        self.nexuses_seen.retain(|id| st.volumes.get(id).is_some_and(|v| v.publish.is_some()));
        for v in st.volumes.values() {
            if crate::registry::view::observed_nexus(&st, v).is_some() {
                self.nexuses_seen.insert(v.id);
            }
        }
    }

    /// Reports a failure of `subject` once until it changes or clears.
    async fn failed(
        &mut self,
        reg: &Registry,
        kind: Kind,
        id: &str,
        subject: String,
        err: impl std::fmt::Display,
    ) {
        let msg = err.to_string();
        if self.failures.get(&subject) != Some(&msg) {
            reg.events().record(kind, id, "reconcile_failed", format!("{subject}: {msg}")).await;
            self.failures.insert(subject, msg);
        }
    }

    fn succeeded(&mut self, subject: &str) {
        self.failures.remove(subject);
    }

    /// Step 1: what every online engine holds.
    async fn observe(&mut self, reg: &Registry) {
        let nodes: Vec<(NodeId, String, u64)> = {
            let st = reg.state.read();
            st.nodes
                .values()
                .filter(|n| n.online)
                .map(|n| {
                    (n.record.id.clone(), n.record.grpc_endpoint.clone(), st.epoch(&n.record.id))
                })
                .collect()
        };
        let results =
            futures::future::join_all(nodes.iter().map(|(id, ep, _)| observe_node(reg, id, ep)))
                .await;
        for ((id, _, epoch), result) in nodes.into_iter().zip(results) {
            let subject = format!("observing node {id}");
            match result {
                Ok(obs) => {
                    self.succeeded(&subject);
                    let mut st = reg.state.write();
                    // Offline nodes keep no observation; and a call that changed the engine
                    // while we listed left fresher data than this listing (next pass).
                    if !st.node_online(&id) || st.epoch(&id) != epoch {
                        continue;
                    }
                    for entry in st.pools.values_mut().filter(|p| p.record.node == id) {
                        entry.observed = obs.pools.get(entry.record.id.as_str()).cloned();
                    }
                    st.observed.insert(id, obs);
                }
                Err(e) => self.failed(reg, Kind::Node, id.as_str(), subject, e).await,
            }
        }
    }

    /// Events for pool and volume state changes seen in this pass.
    async fn state_events(&mut self, reg: &Registry) {
        let (pools, volumes) = {
            let st = reg.state.read();
            let pools: Vec<_> =
                st.pools.values().map(|p| crate::registry::view::pool(&st, p)).collect();
            let volumes: Vec<_> =
                st.volumes.values().map(|v| crate::registry::view::volume(&st, v)).collect();
            (pools, volumes)
        };
        for p in pools {
            let prev = self.pool_states.insert(p.id.clone(), p.status.state);
            if prev != Some(p.status.state)
                && (prev.is_some() || p.status.state != trireme_api::PoolState::Unknown)
            {
                let state = serde_json::to_value(p.status.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let why = p.status.error.map(|e| format!(": {e}")).unwrap_or_default();
                reg.events()
                    .record(
                        Kind::Pool,
                        &p.id,
                        &format!("pool_{state}"),
                        format!("pool {} is {state}{why}", p.id),
                    )
                    .await;
            }
        }
        for v in volumes {
            let prev = self.volume_states.insert(v.id, v.status.state);
            if prev.is_some_and(|s| s != v.status.state) {
                reg.events()
                    .record(
                        Kind::Volume,
                        v.id,
                        &format!("volume_{}", v.status.state),
                        format!("volume {} is {}", v.name, v.status.state),
                    )
                    .await;
            }
        }
    }
}

/// Lists everything on one node; each call bounded by the engine timeout.
async fn observe_node(
    reg: &Registry,
    id: &NodeId,
    endpoint: &str,
) -> Result<Observation, crate::engine_client::EngineError> {
    let mut client = reg.engines.client(id, endpoint)?;
    let pools =
        reg.engines.call(id, "ListPools", client.list_pools(rpc::ListPoolsRequest {})).await?;
    let replicas = reg
        .engines
        .call(id, "ListReplicas", client.list_replicas(rpc::ListReplicasRequest {}))
        .await?;
    let nexuses = reg
        .engines
        .call(id, "ListNexuses", client.list_nexuses(rpc::ListNexusesRequest {}))
        .await?;
    let mut obs = Observation::default();
    for p in pools.pools {
        obs.pools.insert(p.name.clone(), p);
    }
    for r in replicas.replicas {
        match r.uuid.parse::<ReplicaId>() {
            Ok(rid) => {
                obs.replicas.insert(rid, r);
            }
            Err(_) => {
                tracing::warn!(node = %id, uuid = %r.uuid, "engine reported a replica with an invalid uuid")
            }
        }
    }
    for n in nexuses.nexuses {
        match n.volume_uuid.parse::<VolumeId>() {
            Ok(vid) => {
                obs.nexuses.insert(vid, n);
            }
            Err(_) => {
                tracing::warn!(node = %id, uuid = %n.volume_uuid, "engine reported a nexus with an invalid volume uuid")
            }
        }
    }
    Ok(obs)
}
