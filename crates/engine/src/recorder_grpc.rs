//! The [`Recorder`] a nexus uses when the engine runs under control: membership changes and
//! dirty regions go to control's `Registry` service (RecordChildren, MarkDirty), which
//! persists them in the store.
//!
//! ```text
//!   Nexus ── record_children / mark_dirty ──> GrpcRecorder ──(timeout, retries)──> control
//!                                                   │ FAILED_PRECONDITION ──> Fenced
//!                                                   └ still failing at the deadline ──> Unavailable
//! ```
//!
//! Each attempt is bounded by [`RecorderTimeouts::call`] and all attempts of one call by
//! [`RecorderTimeouts::total`] (~15 s): the nexus holds acknowledgements while it waits, so it
//! must learn soon whether to go on or stop serving. Only transient failures are retried
//! (unreachable control, timeouts, a busy store); a refusal that will not change (an invalid
//! request) is final at once.

use std::time::Duration;

use async_trait::async_trait;
use tonic::Code;
use tonic::transport::Channel;
use trireme_rpc as rpc;
use trireme_rpc::registry_client::RegistryClient;
use trireme_types::{ChildState, NodeId, VolumeId};

use crate::nexus::recorder::{ChildRecord, Join};
use crate::nexus::recorder::{MembershipRecord, RecordError, Recorder};

/// Time limits of a recorder call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecorderTimeouts {
    /// One attempt.
    pub call: Duration,
    /// Every attempt of one call together, backoff included.
    pub total: Duration,
}

impl Default for RecorderTimeouts {
    fn default() -> Self {
        Self { call: Duration::from_secs(5), total: Duration::from_secs(15) }
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Records through control's `Registry` gRPC service.
#[derive(Debug, Clone)]
pub struct GrpcRecorder {
    client: RegistryClient<Channel>,
    node_id: NodeId,
    timeouts: RecorderTimeouts,
}

impl GrpcRecorder {
    /// A recorder for control at `control` (a URL or host:port). Connects lazily; needs a
    /// Tokio runtime.
    pub fn new(
        control: &str,
        node_id: NodeId,
        timeouts: RecorderTimeouts,
    ) -> Result<Self, crate::registration::BadEndpoint> {
        let channel = crate::registration::control_endpoint(control)?
            .connect_timeout(timeouts.call)
            .timeout(timeouts.call)
            .connect_lazy();
        Ok(Self { client: RegistryClient::new(channel), node_id, timeouts })
    }

    /// Runs `call` until it succeeds, is refused for good, or the total time is spent.
    async fn with_retries<T, F, Fut>(
        &self,
        what: &'static str,
        mut call: F,
    ) -> Result<T, RecordError>
    where
        F: FnMut(RegistryClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeouts.total;
        let mut backoff = BACKOFF_MIN;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let limit = self.timeouts.call.min(left);
            let error = match tokio::time::timeout(limit, call(self.client.clone())).await {
                Ok(Ok(reply)) => return Ok(reply.into_inner()),
                Ok(Err(status)) => match status.code() {
                    Code::FailedPrecondition => {
                        return Err(RecordError::Fenced(status.message().to_owned()));
                    }
                    code if !retryable(code) => {
                        return Err(RecordError::Unavailable(format!(
                            "{what} refused by control: {} ({code:?})",
                            status.message()
                        )));
                    }
                    code => format!("{} ({code:?})", status.message()),
                },
                Err(_) => format!("no answer within {limit:?}"),
            };
            let now = tokio::time::Instant::now();
            if now + backoff >= deadline {
                tracing::warn!(what, attempt, %error, "recording failed; giving up");
                return Err(RecordError::Unavailable(format!(
                    "{what}: control did not record it within {:?} ({attempt} attempts; last: {error})",
                    self.timeouts.total
                )));
            }
            tracing::debug!(what, attempt, %error, ?backoff, "recording failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Whether a failure may pass by itself (control restarting, the store busy, the network).
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Internal
            | Code::Unknown
            | Code::Cancelled
    )
}

fn join_wire(join: Join) -> rpc::ChildJoin {
    match join {
        Join::Online => rpc::ChildJoin::Online,
        Join::Partial => rpc::ChildJoin::Partial,
        Join::Full => rpc::ChildJoin::Full,
    }
}

fn child_record(c: &ChildRecord) -> rpc::ChildRecord {
    let mut r = rpc::ChildRecord {
        replica_uuid: c.replica.to_string(),
        needs: c.needs.map_or(rpc::ChildJoin::Online, join_wire) as i32,
        ..Default::default()
    };
    r.state = match c.state {
        ChildState::Online => rpc::ChildState::Online,
        ChildState::Faulted { reason } => {
            r.fault_reason = reason.to_string();
            rpc::ChildState::Faulted
        }
        ChildState::Rebuilding { done_bytes, total_bytes } => {
            r.rebuild_done_bytes = done_bytes;
            r.rebuild_total_bytes = total_bytes;
            rpc::ChildState::Rebuilding
        }
    } as i32;
    if let Some(rebuilt) = c.rebuilt {
        r.rebuilt_copied_bytes = rebuilt.copied_bytes;
        r.rebuilt_millis = rebuilt.millis;
    }
    r
}

#[async_trait]
impl Recorder for GrpcRecorder {
    async fn record_children(&self, record: MembershipRecord) -> Result<u64, RecordError> {
        let req = rpc::RecordChildrenRequest {
            node_id: self.node_id.to_string(),
            volume_uuid: record.volume.to_string(),
            epoch: record.epoch,
            children: record.children.iter().map(child_record).collect(),
            clear_dirty: record.clear_dirty,
            clean_shutdown: record.clean_shutdown,
        };
        let reply = self
            .with_retries("RecordChildren", |mut c| {
                let req = req.clone();
                async move { c.record_children(req).await }
            })
            .await?;
        Ok(reply.generation)
    }

    async fn mark_dirty(
        &self,
        volume: VolumeId,
        epoch: u64,
        region_bytes: u64,
        regions: Vec<u64>,
    ) -> Result<(), RecordError> {
        let req = rpc::MarkDirtyRequest {
            node_id: self.node_id.to_string(),
            volume_uuid: volume.to_string(),
            epoch,
            region_bytes,
            regions,
        };
        self.with_retries("MarkDirty", |mut c| {
            let req = req.clone();
            async move { c.mark_dirty(req).await }
        })
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use parking_lot::Mutex;
    use tokio_util::sync::CancellationToken;
    use tonic::{Request, Response, Status};
    use trireme_types::{FaultReason, ReplicaId};

    use super::*;
    use crate::nexus::recorder::RebuildSummary;

    /// A Registry that fails the first `fail_first` calls with UNAVAILABLE, then answers as
    /// `answer` says, remembering what it got.
    struct Fake {
        calls: AtomicUsize,
        fail_first: usize,
        fenced: bool,
        records: Mutex<Vec<rpc::RecordChildrenRequest>>,
        dirty: Mutex<Vec<rpc::MarkDirtyRequest>>,
    }

    impl Fake {
        fn new(fail_first: usize, fenced: bool) -> Arc<Self> {
            Arc::new(Self {
                calls: AtomicUsize::new(0),
                fail_first,
                fenced,
                records: Mutex::new(Vec::new()),
                dirty: Mutex::new(Vec::new()),
            })
        }

        fn answer(&self) -> Result<(), Status> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail_first {
                return Err(Status::unavailable("store busy"));
            }
            if self.fenced {
                return Err(Status::failed_precondition("fenced: epoch 3 < 4"));
            }
            Ok(())
        }
    }

    struct Svc(Arc<Fake>);

    #[tonic::async_trait]
    impl rpc::registry_server::Registry for Svc {
        async fn register(
            &self,
            _: Request<rpc::RegisterRequest>,
        ) -> Result<Response<rpc::RegisterReply>, Status> {
            Err(Status::unimplemented("not here"))
        }
        async fn heartbeat(
            &self,
            _: Request<rpc::HeartbeatRequest>,
        ) -> Result<Response<rpc::HeartbeatReply>, Status> {
            Err(Status::unimplemented("not here"))
        }
        async fn record_children(
            &self,
            req: Request<rpc::RecordChildrenRequest>,
        ) -> Result<Response<rpc::RecordChildrenReply>, Status> {
            self.0.answer()?;
            self.0.records.lock().push(req.into_inner());
            Ok(Response::new(rpc::RecordChildrenReply { generation: 9 }))
        }
        async fn mark_dirty(
            &self,
            req: Request<rpc::MarkDirtyRequest>,
        ) -> Result<Response<rpc::Empty>, Status> {
            self.0.answer()?;
            self.0.dirty.lock().push(req.into_inner());
            Ok(Response::new(rpc::Empty {}))
        }
    }

    async fn serve(fake: Arc<Fake>) -> (SocketAddr, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(rpc::registry_server::RegistryServer::new(Svc(fake)))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    token.cancelled_owned(),
                )
                .await;
        });
        (addr, stop)
    }

    fn recorder(addr: SocketAddr, total: Duration) -> GrpcRecorder {
        let timeouts = RecorderTimeouts { call: Duration::from_secs(2), total };
        GrpcRecorder::new(&addr.to_string(), NodeId::new("node-a").unwrap(), timeouts).unwrap()
    }

    fn membership(volume: VolumeId) -> (MembershipRecord, ReplicaId, ReplicaId) {
        let (a, b) = (ReplicaId::new_random(), ReplicaId::new_random());
        let record = MembershipRecord {
            volume,
            epoch: 4,
            children: vec![
                ChildRecord {
                    replica: a,
                    state: ChildState::Online,
                    needs: None,
                    rebuilt: Some(RebuildSummary {
                        kind: Join::Partial,
                        copied_bytes: 4096,
                        millis: 12,
                    }),
                },
                ChildRecord {
                    replica: b,
                    state: ChildState::Faulted { reason: FaultReason::Timeout },
                    needs: Some(Join::Partial),
                    rebuilt: None,
                },
            ],
            clear_dirty: false,
            clean_shutdown: false,
        };
        (record, a, b)
    }

    #[tokio::test]
    async fn transient_failures_are_retried_and_records_arrive_whole() {
        let fake = Fake::new(2, false);
        let (addr, stop) = serve(Arc::clone(&fake)).await;
        let rec = recorder(addr, Duration::from_secs(15));
        let volume = VolumeId::new_random();
        let (record, a, b) = membership(volume);
        assert_eq!(rec.record_children(record).await.unwrap(), 9);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 3, "two failures, then success");
        let got = fake.records.lock()[0].clone();
        assert_eq!((got.node_id.as_str(), got.epoch), ("node-a", 4));
        assert_eq!(got.volume_uuid, volume.to_string());
        assert_eq!(got.children[0].replica_uuid, a.to_string());
        assert_eq!(got.children[0].state, rpc::ChildState::Online as i32);
        assert_eq!(
            (got.children[0].rebuilt_copied_bytes, got.children[0].rebuilt_millis),
            (4096, 12)
        );
        assert_eq!(got.children[1].replica_uuid, b.to_string());
        assert_eq!(got.children[1].state, rpc::ChildState::Faulted as i32);
        assert_eq!(got.children[1].fault_reason, "timeout");
        assert_eq!(got.children[1].needs, rpc::ChildJoin::Partial as i32);

        rec.mark_dirty(volume, 4, 1 << 20, vec![1, 5]).await.unwrap();
        let dirty = fake.dirty.lock()[0].clone();
        assert_eq!((dirty.region_bytes, dirty.regions), (1 << 20, vec![1, 5]));
        stop.cancel();
    }

    #[tokio::test]
    async fn a_refusal_for_the_epoch_is_fenced_at_once() {
        let fake = Fake::new(0, true);
        let (addr, stop) = serve(Arc::clone(&fake)).await;
        let rec = recorder(addr, Duration::from_secs(15));
        let (record, _, _) = membership(VolumeId::new_random());
        let result = rec.record_children(record).await;
        assert!(
            matches!(result, Err(RecordError::Fenced(ref m)) if m.contains("epoch")),
            "{result:?}"
        );
        let result = rec.mark_dirty(VolumeId::new_random(), 3, 1 << 20, vec![0]).await;
        assert!(matches!(result, Err(RecordError::Fenced(_))), "{result:?}");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2, "a fenced call is not retried");
        stop.cancel();
    }

    #[tokio::test]
    async fn an_unreachable_control_is_unavailable_within_the_bound() {
        // A port nobody listens on.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let rec = recorder(addr, Duration::from_secs(1));
        let started = Instant::now();
        let (record, _, _) = membership(VolumeId::new_random());
        let result = rec.record_children(record).await;
        assert!(matches!(result, Err(RecordError::Unavailable(_))), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }
}
