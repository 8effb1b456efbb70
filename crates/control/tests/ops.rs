//! The operator's replication levers through the typed client: cordon and uncordon steer the
//! scheduler, drain moves replicas away, set-replicas grows and shrinks; auth and bad input.
#![allow(clippy::unwrap_used)]

mod common;

use common::{FakeNode, TestControl, eventually, nodes_online, pool_online};
use trireme_api::CreateVolumeBody;
use trireme_types::{ByteSize, NodeState};

fn vol(name: &str, replicas: u8) -> CreateVolumeBody {
    CreateVolumeBody {
        name: name.parse().unwrap(),
        id: None,
        size: ByteSize::mib(16),
        replicas,
        thin: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordon_steers_the_scheduler_and_survives_a_control_restart() {
    let dir = tempfile::tempdir().unwrap();
    let control = TestControl::start(dir.path()).await;
    let api = control.admin();
    let n1 = FakeNode::start("node-1", control.grpc).await;
    let n2 = FakeNode::start("node-2", control.grpc).await;
    nodes_online(&api, 2).await;
    // node-1 has the most room, so it is the scheduler's first choice.
    pool_online(&api, "pool-1", "node-1", 512 << 20).await;
    pool_online(&api, "pool-2", "node-2", 256 << 20).await;

    let node = api.cordon_node("node-1").await.unwrap();
    assert_eq!(node.status.state, NodeState::Cordoned);
    assert!(node.spec.cordoned && !node.spec.draining);
    assert_eq!(api.cordon_node("node-1").await.unwrap(), node, "cordon is idempotent");
    let v = api.create_volume(&vol("vol-a", 1)).await.unwrap();
    assert_eq!(v.status.replicas[0].node.as_str(), "node-2", "a cordoned node gets no replica");
    assert!(n1.state.lock().replicas.is_empty());
    let events = api.events(None).await.unwrap();
    assert!(events.iter().any(|e| e.reason == "cordoned" && e.id == "node-1"), "{events:?}");

    // The flag is persisted: a restarted control still keeps new replicas off the node.
    let (api_addr, grpc_addr) = (control.api, control.grpc);
    control.stop().await;
    let control = TestControl::start_on(dir.path(), api_addr, grpc_addr).await;
    let api = control.admin();
    eventually("node-1 back, still cordoned", 30, || async {
        (api.node("node-1").await.ok()?.status.state == NodeState::Cordoned).then_some(())
    })
    .await;
    eventually("node-2 back online", 30, || async {
        (api.node("node-2").await.ok()?.status.state == NodeState::Online).then_some(())
    })
    .await;
    eventually("pools observed", 30, || async {
        let pools = api.pools().await.ok()?;
        pools.iter().all(|p| p.status.state == trireme_api::PoolState::Online).then_some(())
    })
    .await;
    let v = api.create_volume(&vol("vol-b", 1)).await.unwrap();
    assert_eq!(v.status.replicas[0].node.as_str(), "node-2");

    // Everything cordoned: no placement, in a sentence.
    api.cordon_node("node-2").await.unwrap();
    let err = api.create_volume(&vol("vol-c", 1)).await.unwrap_err();
    assert_eq!(err.status(), Some(503), "{err}");
    assert!(err.to_string().contains("uncordoned"), "{err}");

    // Uncordon: node-1 (still the most room) takes the next replica.
    let node = api.uncordon_node("node-1").await.unwrap();
    assert_eq!(node.status.state, NodeState::Online);
    assert!(!node.spec.cordoned && !node.spec.draining);
    let v = api.create_volume(&vol("vol-c", 1)).await.unwrap();
    assert_eq!(v.status.replicas[0].node.as_str(), "node-1");
    assert_eq!(n1.state.lock().replicas.len(), 1);

    n1.stop().await;
    n2.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_replica_operations_need_an_admin_and_valid_input() {
    let dir = tempfile::tempdir().unwrap();
    let control = TestControl::start(dir.path()).await;
    let api = control.admin();
    let viewer = control.viewer();
    let n1 = FakeNode::start("node-1", control.grpc).await;
    let n2 = FakeNode::start("node-2", control.grpc).await;
    nodes_online(&api, 2).await;
    pool_online(&api, "pool-1", "node-1", 256 << 20).await;
    pool_online(&api, "pool-2", "node-2", 256 << 20).await;
    api.create_volume(&vol("vol-1", 1)).await.unwrap();

    // A viewer may look, not act.
    for err in [
        viewer.cordon_node("node-1").await.unwrap_err(),
        viewer.uncordon_node("node-1").await.unwrap_err(),
        viewer.drain_node("node-1").await.unwrap_err(),
        viewer.set_replicas("vol-1", 2).await.unwrap_err(),
    ] {
        assert_eq!(err.status(), Some(403), "{err}");
        assert!(err.to_string().contains("admin token"), "{err}");
    }
    assert_eq!(api.node("node-1").await.unwrap().status.state, NodeState::Online);

    // Unknown ids: 404 naming them.
    for err in [
        api.cordon_node("ghost").await.unwrap_err(),
        api.uncordon_node("ghost").await.unwrap_err(),
        api.drain_node("Bad Name").await.unwrap_err(),
        api.set_replicas("no-such-vol", 1).await.unwrap_err(),
    ] {
        assert!(err.is_not_found(), "{err}");
        assert!(
            err.to_string().contains("ghost")
                || err.to_string().contains("Bad Name")
                || err.to_string().contains("no-such-vol"),
            "{err}"
        );
    }

    // Replica counts: at least one, at most one per node able to hold one.
    let err = api.set_replicas("vol-1", 0).await.unwrap_err();
    assert_eq!(err.status(), Some(422));
    assert!(err.to_string().contains("at least 1"), "{err}");
    let err = api.set_replicas("vol-1", 3).await.unwrap_err();
    assert_eq!(err.status(), Some(422));
    assert!(err.to_string().contains("only 2 node"), "{err}");
    api.cordon_node("node-2").await.unwrap();
    let err = api.set_replicas("vol-1", 2).await.unwrap_err();
    assert_eq!(err.status(), Some(422), "a cordoned node cannot take the second replica: {err}");
    // The same count is a no-op.
    let v = api.set_replicas("vol-1", 1).await.unwrap();
    assert_eq!(v.spec.replicas, 1);
    assert_eq!(v.status.replicas.len(), 1);

    // Bodies are checked like every other.
    let http = reqwest::Client::new();
    let admin = control.token(trireme_control::ADMIN_TOKEN_FILE);
    for (body, status, needle) in [
        (r#"{"replica":2}"#, 422, "replica"),
        (r#"{"replicas":-1}"#, 422, "invalid request body"),
        ("", 400, "JSON"),
    ] {
        let resp = http
            .post(control.url("/v1/volumes/vol-1/set-replicas"))
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{body}");
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        let p: trireme_api::Problem = resp.json().await.unwrap();
        assert!(p.detail.contains(needle), "{body}: {}", p.detail);
    }

    // All four are in the OpenAPI document, as POSTs.
    let doc: serde_json::Value =
        serde_json::from_str(&api.get_text("/v1/openapi.json").await.unwrap()).unwrap();
    for p in [
        "/v1/nodes/{id}/cordon",
        "/v1/nodes/{id}/uncordon",
        "/v1/nodes/{id}/drain",
        "/v1/volumes/{id}/set-replicas",
    ] {
        assert!(doc["paths"][p].get("post").is_some(), "openapi lacks POST {p}");
    }
    assert!(doc["components"]["schemas"].get("SetReplicasBody").is_some());

    n1.stop().await;
    n2.stop().await;
    control.stop().await;
}

/// Control and `n` fake engines `node-1..n`, each with a 512 MiB pool `pool-i` (equal free
/// space, so placement takes pools in name order).
async fn cluster(dir: &std::path::Path, n: usize) -> (TestControl, Vec<FakeNode>) {
    let control = TestControl::start(dir).await;
    let api = control.admin();
    let mut nodes = Vec::new();
    for i in 1..=n {
        nodes.push(FakeNode::start(&format!("node-{i}"), control.grpc).await);
    }
    nodes_online(&api, n).await;
    for i in 1..=n {
        pool_online(&api, &format!("pool-{i}"), &format!("node-{i}"), 512 << 20).await;
    }
    (control, nodes)
}

fn nodes_of(v: &trireme_api::Volume) -> Vec<String> {
    let mut nodes: Vec<String> = v.status.replicas.iter().map(|r| r.node.to_string()).collect();
    nodes.sort();
    nodes
}

/// What a real nexus does when its rebuilds finish: every child online in the engine, and
/// recorded so through control's registry with the nexus's epoch.
async fn finish_rebuilds(control: &TestControl, host: &FakeNode, volume: &str) {
    let (epoch, children) = {
        let mut st = host.state.lock();
        let n = st.nexuses.get_mut(volume).expect("a nexus on the host");
        for c in &mut n.children {
            c.state = trireme_rpc::ChildState::Online as i32;
        }
        let children: Vec<_> = n
            .children
            .iter()
            .map(|c| trireme_rpc::ChildRecord {
                replica_uuid: c.replica_uuid.clone(),
                state: trireme_rpc::ChildState::Online as i32,
                rebuilt_copied_bytes: 1 << 20,
                rebuilt_millis: 5,
                ..Default::default()
            })
            .collect();
        (n.epoch, children)
    };
    let req = trireme_rpc::RecordChildrenRequest {
        node_id: host.id.clone(),
        volume_uuid: volume.to_owned(),
        epoch,
        children,
        clear_dirty: true,
        clean_shutdown: false,
    };
    control.registry().await.record_children(req).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_replicas_grows_and_shrinks_a_live_volume() {
    let dir = tempfile::tempdir().unwrap();
    let (control, nodes) = cluster(dir.path(), 3).await;
    let api = control.admin();
    let v = api.create_volume(&vol("vol-g", 1)).await.unwrap();
    assert_eq!(nodes_of(&v), ["node-1"]);
    let body = trireme_api::PublishBody { node: Some("node-1".parse().unwrap()) };
    api.publish_volume("vol-g", &body).await.unwrap();
    let vid = v.id.to_string();

    // Grow to 3: a replica on each other node, each joined to the nexus for a full rebuild.
    let v = api.set_replicas("vol-g", 3).await.unwrap();
    assert_eq!(v.spec.replicas, 3);
    assert_eq!(nodes_of(&v), ["node-1", "node-2", "node-3"]);
    for n in &nodes[1..] {
        assert_eq!(n.state.lock().replicas.len(), 1, "a replica on {}", n.id);
    }
    let adds = nodes[0].state.lock().add_child_requests.clone();
    assert_eq!(adds.len(), 2, "{adds:?}");
    for a in &adds {
        let child = a.child.as_ref().unwrap();
        assert_eq!(child.join, trireme_rpc::ChildJoin::Full as i32);
        assert!(child.uri.starts_with("nbd://"), "remote children go over NBD: {}", child.uri);
    }
    assert_eq!(nodes[0].state.lock().nexuses[&vid].children.len(), 3);
    let events = api.events(None).await.unwrap();
    assert!(events.iter().any(|e| e.reason == "replicas_set"), "{events:?}");
    // Repeating is a no-op.
    assert_eq!(api.set_replicas("vol-g", 3).await.unwrap().status.replicas.len(), 3);

    // Shrink to 2 while they rebuild: a rebuilding (remote) one goes, never the current one.
    let original = v.status.replicas.iter().find(|r| r.node.as_str() == "node-1").unwrap().id;
    let v = api.set_replicas("vol-g", 2).await.unwrap();
    assert_eq!(v.spec.replicas, 2);
    assert_eq!(v.status.replicas.len(), 2);
    assert!(v.status.replicas.iter().any(|r| r.id == original));
    assert_eq!(nodes[0].state.lock().remove_child_requests.len(), 1);
    assert_eq!(
        nodes[1].state.lock().replicas.len() + nodes[2].state.lock().replicas.len(),
        1,
        "the removed replica is destroyed"
    );

    // The rebuild finishes: both current. Shrinking to 1 keeps the nexus's local replica.
    finish_rebuilds(&control, &nodes[0], &vid).await;
    let v = eventually("both replicas online", 30, || async {
        let v = api.volume("vol-g").await.ok()?;
        (v.status.state == trireme_types::VolumeState::Online).then_some(v)
    })
    .await;
    assert_eq!(v.status.replicas.len(), 2);
    let v = api.set_replicas("vol-g", 1).await.unwrap();
    assert_eq!(v.status.replicas.iter().map(|r| r.id).collect::<Vec<_>>(), [original]);
    assert_eq!(nodes[0].state.lock().nexuses[&vid].children.len(), 1);
    assert_eq!(nodes[1].state.lock().replicas.len() + nodes[2].state.lock().replicas.len(), 0);

    // An unpublished volume grows too: the new replica waits for a nexus to be rebuilt.
    api.unpublish_volume("vol-g").await.unwrap();
    let v = api.set_replicas("vol-g", 2).await.unwrap();
    assert_eq!(v.status.replicas.len(), 2);

    for n in nodes {
        n.stop().await;
    }
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_replicas_and_the_nexus_then_leaves_the_node_cordoned() {
    let dir = tempfile::tempdir().unwrap();
    let (control, nodes) = cluster(dir.path(), 3).await;
    let api = control.admin();
    // Two replicas, on node-1 and node-2; the nexus on node-1.
    let v = api.create_volume(&vol("vol-d", 2)).await.unwrap();
    assert_eq!(nodes_of(&v), ["node-1", "node-2"]);
    let vid = v.id.to_string();
    let body = trireme_api::PublishBody { node: Some("node-1".parse().unwrap()) };
    api.publish_volume("vol-d", &body).await.unwrap();
    let on_node2 = v.status.replicas.iter().find(|r| r.node.as_str() == "node-2").unwrap().id;

    // Drain node-2: a replacement on node-3 joins the nexus; node-2 keeps its replica until
    // the replacement is online.
    let node = api.drain_node("node-2").await.unwrap();
    assert_eq!(node.status.state, NodeState::Draining);
    assert!(node.spec.cordoned && node.spec.draining);
    eventually("a replacement on node-3", 30, || async {
        (nodes[2].state.lock().replicas.len() == 1
            && nodes[0].state.lock().add_child_requests.len() == 1)
            .then_some(())
    })
    .await;
    // Several passes later, still draining: the new replica is not current yet.
    for _ in 0..3 {
        control.admin().volume("vol-d").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    assert_eq!(api.node("node-2").await.unwrap().status.state, NodeState::Draining);
    assert!(nodes[1].state.lock().replicas.contains_key(&on_node2.to_string()));

    finish_rebuilds(&control, &nodes[0], &vid).await;
    eventually("node-2 drained", 30, || async {
        (api.node("node-2").await.ok()?.status.state == NodeState::Cordoned).then_some(())
    })
    .await;
    let v = api.volume("vol-d").await.unwrap();
    assert_eq!(nodes_of(&v), ["node-1", "node-3"]);
    assert!(nodes[1].state.lock().replicas.is_empty(), "the old replica is destroyed");
    assert!(nodes[0].state.lock().remove_child_requests.len() == 1);
    let node = api.node("node-2").await.unwrap();
    assert!(node.spec.cordoned && !node.spec.draining);
    let events = api.events(None).await.unwrap();
    assert!(events.iter().any(|e| e.reason == "drained" && e.id == "node-2"), "{events:?}");

    // Drain node-1, which runs the nexus: with node-2 cordoned there is nowhere to put a
    // second replica, so the drain waits and says why.
    api.drain_node("node-1").await.unwrap();
    eventually("the drain says why it waits", 30, || async {
        let ev = api.events(None).await.ok()?;
        ev.iter()
            .any(|e| {
                e.id == "node-1"
                    && e.reason == "drain_waiting"
                    && e.message.contains("set-replicas")
            })
            .then_some(())
    })
    .await;
    assert_eq!(api.node("node-1").await.unwrap().status.state, NodeState::Draining);
    // Room again: a replacement goes to node-2, and the nexus moves at once to node-3 (a
    // usable node holding a current replica) with a new epoch; the new nexus rebuilds node-2's
    // replica, and only then does node-1's replica go.
    api.uncordon_node("node-2").await.unwrap();
    eventually("a replacement on node-2", 30, || async {
        (nodes[1].state.lock().replicas.len() == 1).then_some(())
    })
    .await;
    let v = eventually("republished on node-3", 30, || async {
        let v = api.volume("vol-d").await.ok()?;
        (v.status.target.as_ref()?.node.as_str() == "node-3").then_some(v)
    })
    .await;
    assert_eq!(v.spec.publish.as_ref().map(|n| n.as_str()), Some("node-3"));
    assert_eq!(api.node("node-1").await.unwrap().status.state, NodeState::Draining);
    finish_rebuilds(&control, &nodes[2], &vid).await;
    let old_epoch = nodes[0].state.lock().create_nexus_requests[0].epoch;
    let new = nodes[2].state.lock().create_nexus_requests.last().cloned().unwrap();
    assert!(new.epoch > old_epoch, "a new epoch fences the old nexus");
    eventually("node-1 drained", 30, || async {
        (api.node("node-1").await.ok()?.status.state == NodeState::Cordoned).then_some(())
    })
    .await;
    let v = api.volume("vol-d").await.unwrap();
    assert_eq!(nodes_of(&v), ["node-2", "node-3"]);
    eventually("the old nexus and replica are gone from node-1", 30, || async {
        let st = nodes[0].state.lock();
        (st.nexuses.is_empty() && st.replicas.is_empty()).then_some(())
    })
    .await;

    // Uncordon stops a drain: both flags clear at once.
    api.drain_node("node-3").await.unwrap();
    let node = api.uncordon_node("node-3").await.unwrap();
    assert_eq!(node.status.state, NodeState::Online);
    assert!(!node.spec.cordoned && !node.spec.draining);

    for n in nodes {
        n.stop().await;
    }
    control.stop().await;
}
