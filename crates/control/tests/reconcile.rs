//! The reconciler after crashes: operations logged in the spec are finished, orphans are
//! destroyed, and replicas this store never knew are left alone.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{FakeNode, TestControl, eventually, nodes_online, pool_online};
use trireme_api::CreateVolumeBody;
use trireme_control::registry::records::{
    self, PendingOp, ReplicaRecord, VolumePhase, VolumeRecord,
};
use trireme_rpc as rpc;
use trireme_store::{RedbStore, Store};
use trireme_types::{ByteSize, ReplicaId, VolumeId};

fn vol(name: &str, mib: u64) -> CreateVolumeBody {
    CreateVolumeBody {
        name: name.parse().unwrap(),
        id: None,
        size: ByteSize::mib(mib),
        replicas: 1,
        thin: false,
    }
}

async fn put(store: &RedbStore, rec: &VolumeRecord) {
    let key = records::volume_key(&rec.id);
    store.put(&key, records::encode(&key, rec).unwrap()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_operations_are_finished_after_a_control_crash() {
    let dir = tempfile::tempdir().unwrap();
    let control = TestControl::start(dir.path()).await;
    let api = control.admin();
    let n1 = FakeNode::start("node-1", control.grpc).await;
    nodes_online(&api, 1).await;
    pool_online(&api, "pool-1", "node-1", 256 << 20).await;
    let a = api.create_volume(&vol("vol-a", 10)).await.unwrap();
    let b = api.create_volume(&vol("vol-b", 10)).await.unwrap();
    let (api_addr, grpc_addr) = (control.api, control.grpc);
    control.stop().await;

    // What a crash halfway through three operations leaves in the store.
    let c_id = VolumeId::new_random();
    let c_replica = ReplicaId::new_random();
    {
        let store = RedbStore::open(dir.path().join(trireme_control::STORE_FILE)).await.unwrap();
        let load = |id: VolumeId| {
            let store = store.clone();
            async move {
                let key = records::volume_key(&id);
                records::decode::<VolumeRecord>(
                    &key,
                    &store.get(&key).await.unwrap().unwrap().value,
                )
                .unwrap()
            }
        };
        let mut ra = load(a.id).await;
        ra.phase = VolumePhase::Deleting; // crashed after logging the delete
        put(&store, &ra).await;
        let mut rb = load(b.id).await;
        rb.pending = Some(PendingOp::Resize { size: ByteSize::mib(20) }); // crashed mid-resize
        put(&store, &rb).await;
        let rc = VolumeRecord {
            version: records::RECORD_VERSION,
            id: c_id,
            name: "vol-c".parse().unwrap(),
            size: ByteSize::mib(10),
            replica_count: 1,
            thin: true,
            publish: None,
            replicas: vec![ReplicaRecord {
                id: c_replica,
                pool: "pool-1".parse().unwrap(),
                node: "node-1".parse().unwrap(),
            }],
            phase: VolumePhase::Creating, // crashed before creating the replica
            pending: None,
            epoch: 0,
            generation: 0,
            children: Default::default(),
        };
        put(&store, &rc).await;
    }

    let control = TestControl::start_on(dir.path(), api_addr, grpc_addr).await;
    let api = control.admin();
    eventually("interrupted operations finished", 30, || async {
        let st = n1.state.lock();
        let a_gone = !st.replicas.values().any(|r| r.volume_uuid == a.id.to_string());
        let b_grown = st
            .replicas
            .values()
            .any(|r| r.volume_uuid == b.id.to_string() && r.size_bytes == 20 << 20);
        let c_made = st.replicas.contains_key(&c_replica.to_string());
        (a_gone && b_grown && c_made).then_some(())
    })
    .await;
    eventually("specs committed", 30, || async {
        let a_gone = api.volume("vol-a").await.err()?.is_not_found();
        let b = api.volume("vol-b").await.ok()?;
        let c = api.volume("vol-c").await.ok()?;
        (a_gone
            && b.spec.size == ByteSize::mib(20)
            && c.status.replicas[0].status.state == trireme_api::ReplicaState::Online)
            .then_some(())
    })
    .await;
    n1.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_destroyed_and_unknown_replicas_kept() {
    let dir = tempfile::tempdir().unwrap();
    let control = TestControl::start(dir.path()).await;
    let api = control.admin();
    let n1 = FakeNode::start("node-1", control.grpc).await;
    nodes_online(&api, 1).await;
    pool_online(&api, "pool-1", "node-1", 256 << 20).await;
    let v = api.create_volume(&vol("vol-1", 10)).await.unwrap();
    let keep = api.create_volume(&vol("vol-keep", 10)).await.unwrap();

    // Delete while the node is away: the record goes, the replica stays behind on the engine.
    let state = n1.stop().await;
    eventually("node offline", 30, || async {
        (api.node("node-1").await.ok()?.status.state == trireme_types::NodeState::Offline)
            .then_some(())
    })
    .await;
    api.delete_volume("vol-1").await.unwrap();
    assert!(api.volume("vol-1").await.unwrap_err().is_not_found());
    let stranger = ReplicaId::new_random().to_string();
    {
        let mut st = state.lock();
        assert!(st.replicas.values().any(|r| r.volume_uuid == v.id.to_string()));
        // A replica of a volume this store never knew, and a nexus nobody wants.
        st.replicas.insert(
            stranger.clone(),
            rpc::Replica {
                uuid: stranger.clone(),
                pool: "pool-1".into(),
                size_bytes: 1 << 20,
                thin: true,
                allocated_bytes: 0,
                volume_uuid: VolumeId::new_random().to_string(),
                ..Default::default()
            },
        );
        st.nexuses.insert(
            v.id.to_string(),
            rpc::Nexus {
                volume_uuid: v.id.to_string(),
                share_uri: "nbd://x/y".into(),
                ..Default::default()
            },
        );
    }

    let n1 = FakeNode::start_with("node-1", control.grpc, Arc::clone(&state)).await;
    eventually("orphans destroyed", 30, || async {
        let st = n1.state.lock();
        (!st.replicas.values().any(|r| r.volume_uuid == v.id.to_string()) && st.nexuses.is_empty())
            .then_some(())
    })
    .await;
    {
        let st = n1.state.lock();
        assert!(
            st.replicas.contains_key(&stranger),
            "a replica of an unknown volume is never destroyed"
        );
        assert!(
            st.replicas.values().any(|r| r.volume_uuid == keep.id.to_string()),
            "owned replicas stay"
        );
    }
    let events = api.events(None).await.unwrap();
    assert!(
        events.iter().any(|e| e.reason == "orphan_destroyed" && e.kind == "replica"),
        "{events:?}"
    );
    n1.stop().await;
    control.stop().await;
}

/// `set-replicas` records the new count as pending before adding replicas: after a crash in
/// between, the reconciler adds them, and a resize waits until it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_replica_count_change_is_finished() {
    let dir = tempfile::tempdir().unwrap();
    let control = TestControl::start(dir.path()).await;
    let api = control.admin();
    let n1 = FakeNode::start("node-1", control.grpc).await;
    let n2 = FakeNode::start("node-2", control.grpc).await;
    nodes_online(&api, 2).await;
    pool_online(&api, "pool-1", "node-1", 256 << 20).await;
    pool_online(&api, "pool-2", "node-2", 256 << 20).await;
    let v = api.create_volume(&vol("vol-a", 10)).await.unwrap();
    let (api_addr, grpc_addr) = (control.api, control.grpc);
    control.stop().await;
    {
        // Crashed right after recording the intent.
        let store = RedbStore::open(dir.path().join(trireme_control::STORE_FILE)).await.unwrap();
        let key = records::volume_key(&v.id);
        let mut rec =
            records::decode::<VolumeRecord>(&key, &store.get(&key).await.unwrap().unwrap().value)
                .unwrap();
        assert_eq!(rec.replicas.len(), 1);
        rec.replica_count = 2;
        rec.pending = Some(PendingOp::Replicas);
        put(&store, &rec).await;
    }
    let control = TestControl::start_on(dir.path(), api_addr, grpc_addr).await;
    let api = control.admin();
    eventually("the second replica added", 30, || async {
        let v = api.volume("vol-a").await.ok()?;
        (v.status.replicas.len() == 2).then_some(())
    })
    .await;
    let holders = [&n1, &n2]
        .iter()
        .filter(|n| n.state.lock().replicas.values().any(|r| r.volume_uuid == v.id.to_string()))
        .count();
    assert_eq!(holders, 2, "one replica on each node");
    // Settled: a resize goes through.
    eventually("the pending mark cleared", 30, || async {
        api.resize_volume("vol-a", ByteSize::mib(20)).await.ok().map(drop)
    })
    .await;
    n1.stop().await;
    n2.stop().await;
    control.stop().await;
}
