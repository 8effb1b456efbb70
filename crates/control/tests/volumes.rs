//! Scheduling, idempotent creates, capacity errors, publish, resize and delete against fake
//! engines, all through the typed client the CLI uses.
#![allow(clippy::unwrap_used)]

mod common;

use common::{FakeNode, TestControl, eventually, nodes_online, pool_online};
use trireme_api::{CreatePoolBody, CreateVolumeBody, PublishBody};
use trireme_rpc as rpc;
use trireme_types::{ByteSize, VolumeState};

fn vol(name: &str, size: ByteSize) -> CreateVolumeBody {
    CreateVolumeBody { name: name.parse().unwrap(), id: None, size, replicas: 1, thin: false }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let control = TestControl::start(dir.path()).await;
    let api = control.admin();
    let n1 = FakeNode::start("node-1", control.grpc).await;
    let n2 = FakeNode::start("node-2", control.grpc).await;
    nodes_online(&api, 2).await;

    // Pools: idempotent by name; a different spec conflicts.
    pool_online(&api, "pool-1", "node-1", 256 << 20).await;
    pool_online(&api, "pool-2", "node-2", 512 << 20).await;
    let again = CreatePoolBody {
        name: "pool-1".parse().unwrap(),
        node: "node-1".parse().unwrap(),
        disk: "/tmp/pool-1.img".into(),
        size: Some(ByteSize::b(256 << 20)),
    };
    assert_eq!(api.create_pool(&again).await.unwrap().id.as_str(), "pool-1");
    let other = CreatePoolBody { disk: "/dev/other".into(), ..again.clone() };
    assert_eq!(api.create_pool(&other).await.unwrap_err().status(), Some(409));

    // Scheduling: the pool with the most free space.
    let v = api.create_volume(&vol("vol-1", ByteSize::mib(100))).await.unwrap();
    assert_eq!(v.status.replicas.len(), 1);
    assert_eq!(v.status.replicas[0].pool.as_str(), "pool-2");
    assert_eq!(n2.state.lock().replicas.len(), 1);
    let rep = n2.state.lock().replicas.values().next().cloned().unwrap();
    assert_eq!(rep.volume_uuid, v.id.to_string(), "the replica records its owner");

    // Idempotent create: same spec, same volume; by client id too; different spec, 409.
    let same = api.create_volume(&vol("vol-1", ByteSize::mib(100))).await.unwrap();
    assert_eq!(same.id, v.id);
    let by_id = CreateVolumeBody { id: Some(v.id), ..vol("vol-1", ByteSize::mib(100)) };
    assert_eq!(api.create_volume(&by_id).await.unwrap().id, v.id);
    let err = api.create_volume(&vol("vol-1", ByteSize::mib(200))).await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("size"), "{err}");
    let thin = CreateVolumeBody { thin: true, ..vol("vol-1", ByteSize::mib(100)) };
    assert_eq!(api.create_volume(&thin).await.unwrap_err().status(), Some(409));

    // More replicas than nodes: each replica needs its own node.
    let three = CreateVolumeBody { replicas: 3, ..vol("vol-3", ByteSize::mib(1)) };
    let err = api.create_volume(&three).await.unwrap_err();
    assert_eq!(err.status(), Some(422));
    assert!(err.to_string().contains("only 2 node(s) can take a replica"), "{err}");
    assert!(api.volume("vol-3").await.unwrap_err().is_not_found());

    // Too large: a clear sentence, and nothing left behind.
    let err = api.create_volume(&vol("huge", ByteSize::gib(10))).await.unwrap_err();
    assert_eq!(err.status(), Some(507));
    let msg = err.to_string();
    assert!(msg.contains("10GiB") && msg.contains("412MiB"), "{msg}");
    assert!(api.volume("huge").await.unwrap_err().is_not_found());
    assert_eq!(n1.state.lock().replicas.len() + n2.state.lock().replicas.len(), 1);

    // The second thick volume goes where the space now is: pool-1 (256 MiB) vs pool-2 (412 MiB).
    let v2 = api.create_volume(&vol("vol-2", ByteSize::mib(300))).await.unwrap();
    assert_eq!(v2.status.replicas[0].pool.as_str(), "pool-2");
    let v3 = api.create_volume(&vol("vol-3", ByteSize::mib(100))).await.unwrap();
    assert_eq!(
        v3.status.replicas[0].pool.as_str(),
        "pool-1",
        "free space is accounted before the next observation"
    );

    // Publish waits for the nexus and answers with its URI.
    let published = api.publish_volume("vol-1", &PublishBody::default()).await.unwrap();
    let target = published.status.target.clone().unwrap();
    assert_eq!(target.uri, format!("nbd://127.0.0.1:10809/{}", v.id));
    assert_eq!(target.node.as_str(), "node-2");
    assert_eq!(published.status.state, VolumeState::Online);
    let nexus = n2.state.lock().nexuses.get(&v.id.to_string()).cloned().unwrap();
    assert_eq!(nexus.children[0].uri, format!("replica:///{}", rep.uuid));
    // Publishing again is idempotent; on another node while published is refused.
    assert_eq!(
        api.publish_volume(&v.id.to_string(), &PublishBody::default()).await.unwrap().id,
        v.id
    );
    let elsewhere = PublishBody { node: Some("node-1".parse().unwrap()) };
    // A node without the replica reaches it over NBD.
    let remote = api
        .publish_volume("vol-3", &PublishBody { node: Some("node-2".parse().unwrap()) })
        .await
        .unwrap();
    let target = remote.status.target.unwrap();
    assert_eq!(target.node.as_str(), "node-2");
    assert!(target.children[0].uri.starts_with("nbd://"), "{:?}", target.children);
    api.unpublish_volume("vol-3").await.unwrap();
    assert_eq!(api.publish_volume("vol-1", &elsewhere).await.unwrap_err().status(), Some(409));

    // Resize: grow replicas then nexus; shrink refused.
    let grown = api.resize_volume("vol-1", ByteSize::mib(110)).await.unwrap();
    assert_eq!(grown.spec.size, ByteSize::mib(110));
    assert_eq!(n2.state.lock().replicas[&rep.uuid].size_bytes, 110 << 20);
    assert_eq!(n2.state.lock().nexuses[&v.id.to_string()].size_bytes, 110 << 20);
    assert_eq!(
        api.resize_volume("vol-1", ByteSize::mib(50)).await.unwrap_err().status(),
        Some(422)
    );
    // An engine that cannot be reached is no refusal: the resize stays pending and the
    // reconciler finishes it once the engine answers again.
    n2.state.lock().resize_unavailable = true;
    assert!(api.resize_volume("vol-1", ByteSize::mib(120)).await.is_err());
    n2.state.lock().resize_unavailable = false;
    eventually("the interrupted resize finished", 30, || async {
        let v = api.volume("vol-1").await.unwrap();
        (v.spec.size == ByteSize::mib(120)).then_some(())
    })
    .await;
    assert_eq!(n2.state.lock().replicas[&rep.uuid].size_bytes, 120 << 20);

    // Replicas by volume and overall.
    let reps = api.replicas(Some("vol-1")).await.unwrap();
    assert_eq!(reps.len(), 1);
    assert_eq!(reps[0].id.to_string(), rep.uuid);
    assert_eq!(api.replicas(None).await.unwrap().len(), 3);

    // A pool with replicas cannot be deleted.
    let err = api.delete_pool("pool-2").await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("vol-1"), "{err}");

    // Unpublish, then delete: nexus and replica are gone, the volume is 404.
    let un = api.unpublish_volume("vol-1").await.unwrap();
    assert!(un.status.target.is_none() && un.spec.publish.is_none());
    assert!(n2.state.lock().nexuses.is_empty());
    api.publish_volume("vol-1", &PublishBody::default()).await.unwrap();
    api.delete_volume("vol-1").await.unwrap();
    assert!(n2.state.lock().nexuses.is_empty(), "delete unpublishes");
    assert!(!n2.state.lock().replicas.contains_key(&rep.uuid));
    let err = api.volume(&v.id.to_string()).await.unwrap_err();
    assert!(err.is_not_found() && err.to_string().contains(&v.id.to_string()), "{err}");
    assert!(api.delete_volume("vol-1").await.unwrap_err().is_not_found());

    // Events tell the story.
    let events = api.events(None).await.unwrap();
    let reasons: Vec<&str> = events.iter().map(|e| e.reason.as_str()).collect();
    for r in ["online", "created", "published", "resized", "unpublished", "deleted"] {
        assert!(reasons.contains(&r), "missing event {r}: {reasons:?}");
    }
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    let last = events.last().unwrap().seq;
    assert!(api.events(Some(last)).await.unwrap().is_empty());

    // An empty pool can go. If the engine still holds a replica there (one placed while the
    // delete checked), the delete is refused and the pool stays usable, not half deleted.
    api.delete_volume("vol-3").await.unwrap();
    let stray = rpc::Replica { uuid: "stray".into(), pool: "pool-1".into(), ..Default::default() };
    n1.state.lock().replicas.insert("stray".into(), stray);
    assert_eq!(api.delete_pool("pool-1").await.unwrap_err().status(), Some(409));
    assert!(n1.state.lock().pools.contains_key("pool-1"));
    // Still offered for placement: a 2-replica volume needs both nodes' pools.
    let two = CreateVolumeBody { replicas: 2, ..vol("vol-4", ByteSize::mib(8)) };
    api.create_volume(&two).await.unwrap();
    let pools: Vec<String> =
        api.replicas(Some("vol-4")).await.unwrap().iter().map(|r| r.pool.to_string()).collect();
    assert!(pools.contains(&"pool-1".to_owned()), "{pools:?}");
    api.delete_volume("vol-4").await.unwrap();
    n1.state.lock().replicas.remove("stray");
    api.delete_pool("pool-1").await.unwrap();
    assert!(api.pool("pool-1").await.unwrap_err().is_not_found());
    assert!(n1.state.lock().pools.is_empty());

    n1.stop().await;
    n2.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_refusals_are_clear_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let control = TestControl::start(dir.path()).await;
    let api = control.admin();
    let n1 = FakeNode::start("node-1", control.grpc).await;
    nodes_online(&api, 1).await;
    pool_online(&api, "pool-1", "node-1", 256 << 20).await;
    n1.state.lock().fail_create_replica = true;
    let err = api.create_volume(&vol("vol-1", ByteSize::mib(10))).await.unwrap_err();
    assert_eq!(err.status(), Some(502), "{err}");
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert!(api.volumes().await.unwrap().is_empty());
    n1.state.lock().fail_create_replica = false;
    // The name is free again.
    api.create_volume(&vol("vol-1", ByteSize::mib(10))).await.unwrap();

    // An engine that refuses the nexus makes publish fail fast with its reason, not time out.
    n1.state.lock().fail_create_nexus = true;
    let started = std::time::Instant::now();
    let err = api.publish_volume("vol-1", &PublishBody::default()).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("injected nexus refusal"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    // Once the engine accepts, the reconciler (or a repeated publish) gets it published.
    n1.state.lock().fail_create_nexus = false;
    let v = api.publish_volume("vol-1", &PublishBody::default()).await.unwrap();
    assert!(v.status.target.is_some());
    n1.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_restart_gets_its_nexus_back_and_offline_is_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let control = TestControl::start(dir.path()).await;
    let api = control.admin();
    let n1 = FakeNode::start("node-1", control.grpc).await;
    nodes_online(&api, 1).await;
    pool_online(&api, "pool-1", "node-1", 256 << 20).await;
    let v = api.create_volume(&vol("vol-1", ByteSize::mib(10))).await.unwrap();
    api.publish_volume("vol-1", &PublishBody::default()).await.unwrap();

    // The engine restarts: replicas kept (on disk), nexus lost (in memory).
    let n1 = n1.restart(control.grpc).await;
    assert!(n1.state.lock().nexuses.is_empty());
    eventually("nexus recreated", 30, || async {
        n1.state.lock().nexuses.contains_key(&v.id.to_string()).then_some(())
    })
    .await;
    eventually("volume online", 30, || async {
        (api.volume("vol-1").await.ok()?.status.state == VolumeState::Online).then_some(())
    })
    .await;
    assert_eq!(n1.state.lock().replicas.len(), 1, "the replica is never recreated or destroyed");
    let events = api.events(None).await.unwrap();
    assert!(events.iter().any(|e| e.reason == "nexus_recreated"), "{events:?}");

    // The engine goes away: the node goes offline and the volume's state is unknown.
    let state = n1.stop().await;
    eventually("node offline", 30, || async {
        (api.node("node-1").await.ok()?.status.state == trireme_types::NodeState::Offline)
            .then_some(())
    })
    .await;
    let got = api.volume("vol-1").await.unwrap();
    assert_eq!(got.status.state, VolumeState::Unknown);
    assert!(got.status.target.is_none());
    assert_eq!(got.status.replicas[0].status.state, trireme_api::ReplicaState::Unknown);
    drop(state);
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_restart_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let control = TestControl::start(dir.path()).await;
    let api = control.admin();
    let n1 = FakeNode::start("node-1", control.grpc).await;
    nodes_online(&api, 1).await;
    pool_online(&api, "pool-1", "node-1", 256 << 20).await;
    let v = api.create_volume(&vol("vol-1", ByteSize::mib(10))).await.unwrap();
    let published = api.publish_volume("vol-1", &PublishBody::default()).await.unwrap();
    let admin_token = control.token(trireme_control::ADMIN_TOKEN_FILE);
    let events = api.events(None).await.unwrap().len();
    let (api_addr, grpc_addr) = (control.api, control.grpc);
    control.stop().await;

    // Same data dir and ports: everything is remembered, the token is kept.
    let control = TestControl::start_on(dir.path(), api_addr, grpc_addr).await;
    assert_eq!(control.token(trireme_control::ADMIN_TOKEN_FILE), admin_token);
    let api = control.admin();
    assert_eq!(api.nodes().await.unwrap().len(), 1, "nodes are persisted");
    assert_eq!(api.pools().await.unwrap().len(), 1);
    let got = api.volume("vol-1").await.unwrap();
    assert_eq!(got.id, v.id);
    assert_eq!(got.spec, published.spec);
    assert!(api.events(None).await.unwrap().len() >= events, "events are persisted");
    nodes_online(&api, 1).await;
    let got = eventually("target observed again", 30, || async {
        let v = api.volume("vol-1").await.ok()?;
        v.status.target.is_some().then_some(v)
    })
    .await;
    assert_eq!(got.status.target.unwrap().uri, published.status.target.unwrap().uri);
    // The same create is still idempotent after the restart.
    assert_eq!(api.create_volume(&vol("vol-1", ByteSize::mib(10))).await.unwrap().id, v.id);
    assert_eq!(n1.state.lock().replicas.len(), 1);
    n1.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_creates_make_one_volume() {
    let dir = tempfile::tempdir().unwrap();
    let control = TestControl::start(dir.path()).await;
    let api = control.admin();
    let n1 = FakeNode::start("node-1", control.grpc).await;
    nodes_online(&api, 1).await;
    pool_online(&api, "pool-1", "node-1", 256 << 20).await;
    let body = vol("pvc-1", ByteSize::mib(16));
    let results = futures::future::join_all((0..6).map(|_| api.create_volume(&body))).await;
    let ids: Vec<_> = results.into_iter().map(|r| r.unwrap().id).collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    assert_eq!(n1.state.lock().replicas.len(), 1);
    assert_eq!(api.volumes().await.unwrap().len(), 1);
    n1.stop().await;
    control.stop().await;
}
