//! Replication in control, against fake engines: placement of N replicas, the epoch fence on
//! RecordChildren/MarkDirty, nexus recreation from the store (joins, dirty log, new epoch),
//! refusing to serve stale replicas only, returning children, replacement, generation stamps.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{FakeNode, TestControl, eventually, nodes_online, pool_online};
use trireme_api::{Client, CreateVolumeBody, PublishBody, RebuildKind, Volume};
use trireme_control::ControlArgs;
use trireme_rpc as rpc;
use trireme_types::{ByteSize, ReplicaId, VolumeState};

struct Cluster {
    _dir: tempfile::TempDir,
    control: TestControl,
    api: Client,
    nodes: Vec<FakeNode>,
}

/// Control and `n` fake engines `node-1..n`, each with a 512 MiB pool `pool-i` (equal free
/// space, so placement takes pools in name order).
async fn cluster(n: usize, tune: impl FnOnce(&mut ControlArgs)) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let control = TestControl::start_with(dir.path(), any, any, tune).await;
    let api = control.admin();
    let mut nodes = Vec::new();
    for i in 1..=n {
        nodes.push(FakeNode::start(&format!("node-{i}"), control.grpc).await);
    }
    nodes_online(&api, n).await;
    for i in 1..=n {
        pool_online(&api, &format!("pool-{i}"), &format!("node-{i}"), 512 << 20).await;
    }
    Cluster { _dir: dir, control, api, nodes }
}

fn vol(name: &str, replicas: u8) -> CreateVolumeBody {
    CreateVolumeBody {
        name: name.parse().unwrap(),
        id: None,
        size: ByteSize::mib(16),
        replicas,
        thin: false,
    }
}

/// A two-replica volume (on node-1 and node-2) published on node-1.
async fn published(c: &Cluster) -> (Volume, ReplicaId, ReplicaId) {
    let v = c.api.create_volume(&vol("vol-r", 2)).await.unwrap();
    let on = |node: &str| v.status.replicas.iter().find(|r| r.node.as_str() == node).unwrap().id;
    let (a, b) = (on("node-1"), on("node-2"));
    let body = PublishBody { node: Some("node-1".parse().unwrap()) };
    let v = c.api.publish_volume(&v.id.to_string(), &body).await.unwrap();
    (v, a, b)
}

fn child(r: ReplicaId, state: rpc::ChildState, needs: rpc::ChildJoin) -> rpc::ChildRecord {
    rpc::ChildRecord {
        replica_uuid: r.to_string(),
        state: state as i32,
        fault_reason: if state == rpc::ChildState::Faulted {
            "timeout".into()
        } else {
            String::new()
        },
        needs: needs as i32,
        ..Default::default()
    }
}

async fn record(
    c: &Cluster,
    v: &Volume,
    epoch: u64,
    children: Vec<rpc::ChildRecord>,
) -> Result<u64, tonic::Status> {
    let req = rpc::RecordChildrenRequest {
        node_id: "node-1".into(),
        volume_uuid: v.id.to_string(),
        epoch,
        children,
        clear_dirty: false,
        clean_shutdown: false,
    };
    c.control.registry().await.record_children(req).await.map(|r| r.into_inner().generation)
}

async fn has_event(api: &Client, reason: &str) -> bool {
    api.events(None).await.unwrap().iter().any(|e| e.reason == reason)
}

/// Events are recorded after the change they report: wait for one.
async fn wait_event(api: &Client, reason: &str) {
    eventually(&format!("event {reason}"), 30, || async {
        has_event(api, reason).await.then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_go_to_distinct_nodes_and_never_more_than_nodes() {
    let c = cluster(3, |_| {}).await;
    let v = c.api.create_volume(&vol("vol-3", 3)).await.unwrap();
    let mut nodes: Vec<_> = v.status.replicas.iter().map(|r| r.node.to_string()).collect();
    nodes.sort();
    assert_eq!(nodes, ["node-1", "node-2", "node-3"]);
    for n in &c.nodes {
        assert_eq!(n.state.lock().replicas.len(), 1, "one replica on {}", n.id);
    }
    let err = c.api.create_volume(&vol("vol-4", 4)).await.unwrap_err();
    assert_eq!(err.status(), Some(422));
    assert!(err.to_string().contains("replicas is 4, but only 3 node(s)"), "{err}");
    assert!(c.api.volume("vol-4").await.unwrap_err().is_not_found());
    c.control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_fences_old_nexuses_and_a_crashed_nexus_comes_back_from_the_store() {
    use rpc::{ChildJoin as J, ChildState as S};
    let c = cluster(2, |_| {}).await;
    let n1 = &c.nodes[0];
    let (v, a, b) = published(&c).await;

    // The nexus goes over both replicas: the local one directly, the other over NBD.
    let first = n1.state.lock().create_nexus_requests[0].clone();
    assert_eq!(first.epoch, 1);
    assert!(first.dirty.is_none());
    let uri = |req: &rpc::CreateNexusRequest, r: ReplicaId| {
        let c = req.children.iter().find(|c| c.replica_uuid == r.to_string()).unwrap();
        (c.uri.clone(), c.join)
    };
    assert_eq!(uri(&first, a), (format!("replica:///{a}"), J::Online as i32));
    assert_eq!(uri(&first, b), (format!("nbd://127.0.0.1:10809/replica-{b}"), J::Online as i32));

    // An older epoch is refused; the current one is recorded and bumps the generation.
    let err = record(&c, &v, 0, vec![child(b, S::Faulted, J::Partial)]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().starts_with("fenced"), "{}", err.message());
    let generation =
        record(&c, &v, 1, vec![child(a, S::Online, J::Online), child(b, S::Faulted, J::Partial)])
            .await
            .unwrap();
    assert_eq!(generation, 1);
    wait_event(&c.api, "child_faulted").await;
    assert_eq!(c.api.volume("vol-r").await.unwrap().status.generation, 1);
    // A repeat changes nothing.
    assert_eq!(record(&c, &v, 1, vec![child(b, S::Faulted, J::Partial)]).await.unwrap(), 1);
    // The current replica gets the new generation stamped.
    eventually("generation stamped on the online replica", 30, || async {
        let st = n1.state.lock();
        st.generation_requests
            .iter()
            .any(|g| g.uuid == a.to_string() && g.generation == 1)
            .then_some(())
    })
    .await;

    // Writes while b is out go to the dirty log.
    let mut reg = c.control.registry().await;
    let dirty = |epoch| rpc::MarkDirtyRequest {
        node_id: "node-1".into(),
        volume_uuid: v.id.to_string(),
        epoch,
        region_bytes: 1 << 20,
        regions: vec![0, 3],
    };
    reg.mark_dirty(dirty(1)).await.unwrap();
    let beyond = rpc::MarkDirtyRequest { regions: vec![16], ..dirty(1) };
    assert_eq!(reg.mark_dirty(beyond).await.unwrap_err().code(), tonic::Code::InvalidArgument);

    // The nexus crashes (its engine lost it): control recreates it from the store, with a new
    // epoch, the dirty log, and b joining for a partial rebuild.
    n1.state.lock().nexuses.clear();
    let second = eventually("nexus recreated", 30, || async {
        n1.state.lock().create_nexus_requests.get(1).cloned()
    })
    .await;
    assert_eq!(second.epoch, 2);
    assert_eq!(second.generation, 1);
    assert_eq!(uri(&second, a).1, J::Online as i32);
    assert_eq!(uri(&second, b).1, J::Partial as i32);
    let log = second.dirty.unwrap();
    assert_eq!((log.region_bytes, log.bitmap), (1 << 20, vec![0b1001]));
    eventually("nexus_recreated event", 30, || async {
        has_event(&c.api, "nexus_recreated").await.then_some(())
    })
    .await;

    // The old nexus is fenced from now on.
    let err = record(&c, &v, 1, vec![child(b, S::Faulted, J::Partial)]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reg.mark_dirty(dirty(1)).await.unwrap_err().code(), tonic::Code::FailedPrecondition);

    // When every child is online again the log is cleared.
    let all_online = rpc::RecordChildrenRequest {
        node_id: "node-1".into(),
        volume_uuid: v.id.to_string(),
        epoch: 2,
        children: vec![child(a, S::Online, J::Online), child(b, S::Online, J::Online)],
        clear_dirty: true,
        clean_shutdown: false,
    };
    assert_eq!(reg.record_children(all_online).await.unwrap().into_inner().generation, 2);
    wait_event(&c.api, "rebuild_finished").await;
    n1.state.lock().nexuses.clear();
    let third = eventually("nexus recreated again", 30, || async {
        n1.state.lock().create_nexus_requests.get(2).cloned()
    })
    .await;
    assert_eq!(third.epoch, 3);
    assert!(third.dirty.is_none(), "the log was cleared");
    assert!(third.children.iter().all(|c| c.join == J::Online as i32));
    c.control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_with_only_stale_replicas_reachable_waits_faulted() {
    use rpc::{ChildJoin as J, ChildState as S};
    let mut c = cluster(2, |_| {}).await;
    let (v, a, b) = published(&c).await;
    // a (local to the nexus) missed writes; only b is current. Then b's node goes away and
    // the nexus is lost.
    record(&c, &v, 1, vec![child(a, S::Faulted, J::Partial), child(b, S::Online, J::Online)])
        .await
        .unwrap();
    let n2 = c.nodes.pop().unwrap();
    let n2_state = n2.stop().await;
    eventually("node-2 offline", 30, || async {
        (c.api.node("node-2").await.ok()?.status.state == trireme_types::NodeState::Offline)
            .then_some(())
    })
    .await;
    let n1 = &c.nodes[0];
    n1.state.lock().nexuses.clear();
    let got = eventually("volume faulted with a reason", 30, || async {
        let v = c.api.volume("vol-r").await.ok()?;
        (v.status.state == VolumeState::Faulted).then_some(v)
    })
    .await;
    let message = got.status.message.unwrap();
    assert!(
        message.contains("no current replica reachable")
            && message.contains(&b.to_string())
            && message.contains("node-2"),
        "{message}"
    );
    assert_eq!(n1.state.lock().create_nexus_requests.len(), 1, "never over stale replicas only");
    wait_event(&c.api, "volume_waiting").await;

    // Publishing again (after an unpublish) answers at once with the reason, not after the
    // 30 s publish wait; the publish stands.
    let id = v.id.to_string();
    c.api.unpublish_volume(&id).await.unwrap();
    let started = Instant::now();
    let body = PublishBody { node: Some("node-1".parse().unwrap()) };
    let err = c.api.publish_volume(&id, &body).await.unwrap_err();
    assert_eq!(err.status(), Some(503), "{err}");
    assert!(err.to_string().contains("no current replica reachable"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15), "answered in {:?}", started.elapsed());
    let spec = c.api.volume(&id).await.unwrap();
    assert_eq!(spec.spec.publish.as_ref().map(|n| n.as_str()), Some("node-1"), "{spec:?}");

    // b returns: the nexus comes back, with a rebuilding from it.
    let _n2 = FakeNode::start_with("node-2", c.control.grpc, n2_state).await;
    let again = eventually("nexus created once b is back", 30, || async {
        n1.state.lock().create_nexus_requests.get(1).cloned()
    })
    .await;
    let join = |r: ReplicaId| {
        again.children.iter().find(|c| c.replica_uuid == r.to_string()).unwrap().join
    };
    assert_eq!((join(a), join(b)), (J::Partial as i32, J::Online as i32));
    eventually("message cleared", 30, || async {
        let v = c.api.volume("vol-r").await.ok()?;
        (v.status.target.is_some() && v.status.state != VolumeState::Faulted).then_some(())
    })
    .await;
    c.control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_child_is_added_back_and_its_rebuild_recorded() {
    use rpc::{ChildJoin as J, ChildState as S};
    let c = cluster(2, |a| a.child_retry_secs = 2).await;
    let n1 = &c.nodes[0];
    let (v, a, b) = published(&c).await;
    let faulted_at = Instant::now();
    n1.state.lock().fault_child(&v.id.to_string(), &b.to_string());
    record(&c, &v, 1, vec![child(a, S::Online, J::Online), child(b, S::Faulted, J::Partial)])
        .await
        .unwrap();
    // b's node is up and its pool has it: after the retry delay, AddChild(PARTIAL).
    let add = eventually("AddChild for the returning child", 30, || async {
        n1.state.lock().add_child_requests.first().cloned()
    })
    .await;
    assert!(faulted_at.elapsed() >= Duration::from_millis(1500), "waited the retry delay");
    let spec = add.child.unwrap();
    assert_eq!(add.epoch, 1);
    assert_eq!(spec.replica_uuid, b.to_string());
    assert_eq!(spec.join, J::Partial as i32);
    assert_eq!(spec.uri, format!("nbd://127.0.0.1:10809/replica-{b}"));
    wait_event(&c.api, "child_returning").await;

    // The nexus records the rebuild: started, then finished with what it copied.
    record(&c, &v, 1, vec![child(b, S::Rebuilding, J::Partial)]).await.unwrap();
    wait_event(&c.api, "rebuild_started").await;
    let done = rpc::ChildRecord {
        rebuilt_copied_bytes: 4 << 20,
        rebuilt_millis: 120,
        ..child(b, S::Online, J::Online)
    };
    assert_eq!(record(&c, &v, 1, vec![done]).await.unwrap(), 2, "b counts again");
    let events = c.api.events(None).await.unwrap();
    let finished = events.iter().find(|e| e.reason == "rebuild_finished").unwrap();
    assert!(
        finished.message.contains("4MiB") && finished.message.contains("120 ms"),
        "{finished:?}"
    );
    let reps = c.api.replicas(Some("vol-r")).await.unwrap();
    let rb = reps.iter().find(|r| r.id == b).unwrap();
    let last = rb.status.last_rebuild.unwrap();
    assert_eq!(
        (last.kind, last.copied, last.duration_ms),
        (RebuildKind::Partial, ByteSize::mib(4), 120)
    );
    c.control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_faulted_too_long_is_replaced_elsewhere() {
    use rpc::{ChildJoin as J, ChildState as S};
    let mut c = cluster(3, |a| a.replica_replace_secs = 2).await;
    let (v, a, b) = published(&c).await;
    record(&c, &v, 1, vec![child(a, S::Online, J::Online), child(b, S::Faulted, J::Partial)])
        .await
        .unwrap();
    let n2 = c.nodes.remove(1);
    let _n2_state = n2.stop().await;
    let n1 = &c.nodes[0];
    let n3 = &c.nodes[1];
    let replaced = eventually("b replaced by a replica on node-3", 30, || async {
        let v = c.api.volume("vol-r").await.ok()?;
        let ids: Vec<_> = v.status.replicas.iter().map(|r| (r.id, r.node.to_string())).collect();
        (ids.len() == 2 && !ids.iter().any(|(id, _)| *id == b)).then_some(ids)
    })
    .await;
    let new = replaced.iter().find(|(_, n)| n == "node-3").unwrap().0;
    assert_eq!(n3.state.lock().replicas.len(), 1, "created on node-3");
    {
        let st = n1.state.lock();
        let add = st
            .add_child_requests
            .iter()
            .find(|r| r.child.as_ref().is_some_and(|c| c.replica_uuid == new.to_string()));
        let spec = add.unwrap().child.clone().unwrap();
        assert_eq!(spec.join, J::Full as i32);
        assert!(spec.uri.ends_with(&format!("/replica-{new}")), "{}", spec.uri);
        assert!(st.remove_child_requests.iter().any(|r| r.replica_uuid == b.to_string()));
    }
    eventually("replacement events", 30, || async {
        (has_event(&c.api, "replica_replaced").await && has_event(&c.api, "child_removed").await)
            .then_some(())
    })
    .await;
    let v = c.api.volume("vol-r").await.unwrap();
    assert_eq!(v.spec.replicas, 2, "the replica count is unchanged");
    // The newcomer is rebuilding; it counts as current only once the nexus records it online.
    let newcomer = v.status.replicas.iter().find(|r| r.id == new).unwrap();
    assert!(
        matches!(newcomer.status.child, Some(trireme_types::ChildState::Rebuilding { .. })),
        "{newcomer:?}"
    );
    c.control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nexus_that_stopped_serving_is_recreated_with_a_new_epoch() {
    let c = cluster(2, |_| {}).await;
    let n1 = &c.nodes[0];
    let (v, _, _) = published(&c).await;
    n1.state.lock().nexuses.get_mut(&v.id.to_string()).unwrap().stopped_reason =
        "could not record the nexus's state: control unreachable".into();
    let again = eventually("nexus recreated", 30, || async {
        n1.state.lock().create_nexus_requests.get(1).cloned()
    })
    .await;
    assert_eq!(again.epoch, 2);
    assert!(n1.state.lock().calls.contains(&"DestroyNexus"));
    wait_event(&c.api, "nexus_stopped").await;
    c.control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_the_current_nexus_never_claimed_rejoins_with_a_full_rebuild() {
    use rpc::{ChildJoin as J, ChildState as S};
    let c = cluster(2, |a| a.child_retry_secs = 1).await;
    let n1 = &c.nodes[0];
    let (v, a, b) = published(&c).await;
    // As if b's node was cut off when this nexus was created: only an older nexus claimed it,
    // and that one may have written to it without telling anyone.
    common::FakeState::unclaim(&b.to_string());
    n1.state.lock().fault_child(&v.id.to_string(), &b.to_string());
    record(&c, &v, 1, vec![child(a, S::Online, J::Online), child(b, S::Faulted, J::Partial)])
        .await
        .unwrap();
    let add = eventually("AddChild for b", 30, || async {
        n1.state.lock().add_child_requests.first().cloned()
    })
    .await;
    assert_eq!(add.child.unwrap().join, J::Full as i32, "not partial: the log cannot cover it");
    c.control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_nexus_creations_do_not_turn_a_partial_rebuild_into_a_full_one() {
    use rpc::{ChildJoin as J, ChildState as S};
    let c = cluster(2, |_| {}).await;
    let n1 = &c.nodes[0];
    let (v, a, b) = published(&c).await;
    record(&c, &v, 1, vec![child(a, S::Online, J::Online), child(b, S::Faulted, J::Partial)])
        .await
        .unwrap();
    // The nexus is lost and the engine refuses to recreate it twice (each attempt takes a new
    // epoch, but no nexus of those epochs ever ran).
    {
        let mut st = n1.state.lock();
        st.fail_create_nexus = true;
        st.nexuses.clear();
    }
    eventually("two refused creations", 30, || async {
        (n1.state.lock().create_nexus_requests.len() >= 3).then_some(())
    })
    .await;
    // Control restarts meanwhile: which nexus recorded b out is kept in the store.
    let (api_addr, grpc_addr, dir) = (c.control.api, c.control.grpc, c.control.dir.clone());
    let Cluster { _dir, control, nodes, .. } = c;
    control.stop().await;
    let control = TestControl::start_with(&dir, api_addr, grpc_addr, |_| {}).await;
    let api = control.admin();
    nodes_online(&api, 2).await;
    let n1 = &nodes[0];
    n1.state.lock().fail_create_nexus = false;
    let created = eventually("nexus created", 30, || async {
        let st = n1.state.lock();
        st.nexuses.contains_key(&v.id.to_string()).then(|| st.create_nexus_requests.last().cloned())
    })
    .await
    .unwrap();
    assert!(created.epoch >= 4, "every attempt took a new epoch: {}", created.epoch);
    let join = created.children.iter().find(|c| c.replica_uuid == b.to_string()).unwrap().join;
    assert_eq!(join, J::Partial as i32, "b was claimed by the nexus that recorded it out");
    control.stop().await;
}
