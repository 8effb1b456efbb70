//! CSI conformance, written from the CSI v1 spec: every RPC's success path, idempotent
//! repeats, and the error code the spec prescribes for each failure, driven over the plugins'
//! unix sockets by a gRPC client.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use common::*;
use tonic::Code;
use trireme_csi::proto::controller_service_capability::rpc::Type as CRpc;
use trireme_csi::proto::node_service_capability::rpc::Type as NRpc;
use trireme_csi::proto::plugin_capability::{self, service, volume_expansion};
use trireme_csi::proto::volume_capability::{AccessMode, access_mode::Mode};
use trireme_csi::proto::*;
use trireme_types::VolumeState;

fn create(name: &str, required: i64, limit: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: required, limit_bytes: limit }),
        volume_capabilities: vec![mount_cap("ext4")],
        ..Default::default()
    }
}

const UNKNOWN_ID: &str = "00000000-0000-4000-8000-000000000000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity() {
    let mut env = Env::start().await;
    for id in [&mut env.identity_c, &mut env.identity_n] {
        let info = id.get_plugin_info(GetPluginInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.name, "csi.trireme.io");
        assert!(!info.vendor_version.is_empty());
        let probe = id.probe(ProbeRequest {}).await.unwrap().into_inner();
        assert_eq!(probe.ready, Some(true));
    }
    let services = |caps: &[PluginCapability]| -> Vec<i32> {
        caps.iter()
            .filter_map(|c| match &c.r#type {
                Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
                _ => None,
            })
            .collect()
    };
    let c = env
        .identity_c
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        services(&c.capabilities),
        [
            service::Type::ControllerService as i32,
            service::Type::VolumeAccessibilityConstraints as i32
        ]
    );
    assert!(c.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(plugin_capability::Type::VolumeExpansion(e)) if e.r#type == volume_expansion::Type::Offline as i32)));
    let n = env
        .identity_n
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(services(&n.capabilities).is_empty(), "the node plugin serves no controller");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_and_delete_volume() {
    let mut env = Env::start().await;
    let ctl = &mut env.ctl;

    // Success, rounded up to whole MiB, context carrying the parameters.
    let mut req = create("pvc-a", 3 * MIB / 2, 0);
    req.parameters =
        HashMap::from([("fsType".into(), "xfs".into()), ("thin".into(), "true".into())]);
    let v = ctl.create_volume(req.clone()).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(v.capacity_bytes, 2 * MIB);
    assert_eq!(v.volume_context["fsType"], "xfs");
    assert_eq!(v.volume_context["thin"], "true");
    assert_eq!(v.volume_context["replicas"], "1");
    // Idempotent: the same request gives the same volume.
    let again = ctl.create_volume(req.clone()).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    assert_eq!(again.capacity_bytes, v.capacity_bytes);
    // Incompatible re-create with the same name.
    let mut bigger = req.clone();
    bigger.capacity_range = Some(CapacityRange { required_bytes: 100 * MIB, limit_bytes: 0 });
    assert_eq!(code(ctl.create_volume(bigger).await), Code::AlreadyExists);
    let mut thick = req.clone();
    thick.parameters.insert("thin".into(), "false".into());
    assert_eq!(code(ctl.create_volume(thick).await), Code::AlreadyExists);
    // Names Trireme would not accept as-is map to a stable name.
    let odd =
        ctl.create_volume(create("Odd Name/1", MIB, 0)).await.unwrap().into_inner().volume.unwrap();
    let odd2 =
        ctl.create_volume(create("Odd Name/1", MIB, 0)).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(odd.volume_id, odd2.volume_id);

    // Errors.
    assert_eq!(code(ctl.create_volume(create("", MIB, 0)).await), Code::InvalidArgument);
    let mut no_caps = create("pvc-b", MIB, 0);
    no_caps.volume_capabilities.clear();
    assert_eq!(code(ctl.create_volume(no_caps).await), Code::InvalidArgument);
    let mut multi = create("pvc-b", MIB, 0);
    multi.volume_capabilities[0].access_mode =
        Some(AccessMode { mode: Mode::MultiNodeMultiWriter as i32 });
    assert_eq!(code(ctl.create_volume(multi).await), Code::InvalidArgument);
    assert_eq!(
        code(ctl.create_volume(create("pvc-b", MIB + 1, MIB + 100)).await),
        Code::OutOfRange
    );
    assert_eq!(code(ctl.create_volume(create("pvc-b", 10 * MIB, MIB)).await), Code::OutOfRange);
    assert_eq!(
        code(ctl.create_volume(create("pvc-b", 64 * 1024 * MIB, 0)).await),
        Code::ResourceExhausted
    );
    let mut unknown_param = create("pvc-b", MIB, 0);
    unknown_param.parameters.insert("colour".into(), "red".into());
    assert_eq!(code(ctl.create_volume(unknown_param).await), Code::InvalidArgument);
    let mut bad_replicas = create("pvc-b", MIB, 0);
    bad_replicas.parameters.insert("replicas".into(), "0".into());
    assert_eq!(code(ctl.create_volume(bad_replicas).await), Code::InvalidArgument);
    let mut from_snapshot = create("pvc-b", MIB, 0);
    from_snapshot.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource { snapshot_id: "s".into() },
        )),
    });
    assert_eq!(code(ctl.create_volume(from_snapshot).await), Code::InvalidArgument);
    let mut bad_pool = create("pvc-b", MIB, 0);
    bad_pool.parameters.insert("poolSelector".into(), "no-such-pool".into());
    assert_eq!(code(ctl.create_volume(bad_pool).await), Code::InvalidArgument);

    // Delete: idempotent; unknown ids are already deleted.
    assert_eq!(
        code(
            ctl.delete_volume(DeleteVolumeRequest {
                volume_id: String::new(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    ctl.delete_volume(DeleteVolumeRequest { volume_id: UNKNOWN_ID.into(), ..Default::default() })
        .await
        .unwrap();
    ctl.delete_volume(DeleteVolumeRequest { volume_id: "not-a-uuid".into(), ..Default::default() })
        .await
        .unwrap();
    ctl.delete_volume(DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() })
        .await
        .unwrap();
    ctl.delete_volume(DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(
        code(
            ctl.controller_get_volume(ControllerGetVolumeRequest {
                volume_id: v.volume_id.clone()
            })
            .await
        ),
        Code::NotFound
    );
    // After a delete, the name can be reused for a different volume.
    let fresh =
        ctl.create_volume(create("pvc-a", 8 * MIB, 0)).await.unwrap().into_inner().volume.unwrap();
    assert_ne!(fresh.volume_id, v.volume_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_unpublish_get_and_delete_in_use() {
    let mut env = Env::start().await;
    let created = env
        .ctl
        .create_volume(create("pvc-p", 4 * MIB, 0))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    // The node the volume is accessible from (its replica's), and one it is not published on.
    let node = Env::node_for(&created).unwrap_or_else(|| NODE_ID.to_owned());
    let other = fake::NODES.iter().find(|n| **n != node).unwrap().to_string();
    let id = created.volume_id;
    let ctl = &mut env.ctl;
    let publish = |volume_id: &str, node_id: &str, cap: Option<VolumeCapability>| {
        ControllerPublishVolumeRequest {
            volume_id: volume_id.into(),
            node_id: node_id.into(),
            volume_capability: cap,
            ..Default::default()
        }
    };
    let cap = Some(mount_cap("ext4"));
    assert_eq!(
        code(ctl.controller_publish_volume(publish("", &node, cap.clone())).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.controller_publish_volume(publish(&id, "", cap.clone())).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.controller_publish_volume(publish(&id, &node, None)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.controller_publish_volume(publish(UNKNOWN_ID, &node, cap.clone())).await),
        Code::NotFound
    );
    assert_eq!(
        code(ctl.controller_publish_volume(publish(&id, "no-such-node", cap.clone())).await),
        Code::NotFound
    );

    let ctx = ctl
        .controller_publish_volume(publish(&id, &node, cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert!(ctx["uri"].starts_with("nbd"), "{ctx:?}");
    assert_eq!(ctx["node"], node);
    let again = ctl
        .controller_publish_volume(publish(&id, &node, cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(again, ctx);
    assert_eq!(
        code(ctl.controller_publish_volume(publish(&id, &other, cap.clone())).await),
        Code::FailedPrecondition
    );

    let got = ctl
        .controller_get_volume(ControllerGetVolumeRequest { volume_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let status = got.status.unwrap();
    assert_eq!(status.published_node_ids, [node.as_str()]);
    assert!(!status.volume_condition.unwrap().abnormal);
    assert_eq!(got.volume.unwrap().capacity_bytes, 4 * MIB);
    if let Some(fake) = env.fake() {
        fake.set_state(&id, VolumeState::Degraded);
        let got = env
            .ctl
            .clone()
            .controller_get_volume(ControllerGetVolumeRequest { volume_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        let cond = got.status.unwrap().volume_condition.unwrap();
        assert!(cond.abnormal && cond.message.contains("degraded"), "{cond:?}");
        fake.set_state(&id, VolumeState::Online);
    }
    let ctl = &mut env.ctl;
    assert_eq!(
        code(
            ctl.controller_get_volume(ControllerGetVolumeRequest { volume_id: String::new() })
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.controller_get_volume(ControllerGetVolumeRequest { volume_id: UNKNOWN_ID.into() })
                .await
        ),
        Code::NotFound
    );

    // In use: cannot be deleted.
    assert_eq!(
        code(
            ctl.delete_volume(DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() })
                .await
        ),
        Code::FailedPrecondition
    );

    let unpublish = |volume_id: &str, node_id: &str| ControllerUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node_id.into(),
        ..Default::default()
    };
    assert_eq!(
        code(ctl.controller_unpublish_volume(unpublish("", &node)).await),
        Code::InvalidArgument
    );
    ctl.controller_unpublish_volume(unpublish(UNKNOWN_ID, &node)).await.unwrap();
    // Not published on node-2: nothing to do, and it stays published on node-1.
    ctl.controller_unpublish_volume(unpublish(&id, &other)).await.unwrap();
    let still = ctl
        .controller_get_volume(ControllerGetVolumeRequest { volume_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.status.unwrap().published_node_ids, [node.as_str()]);
    ctl.controller_unpublish_volume(unpublish(&id, &node)).await.unwrap();
    ctl.controller_unpublish_volume(unpublish(&id, &node)).await.unwrap();
    let after = ctl
        .controller_get_volume(ControllerGetVolumeRequest { volume_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(after.status.unwrap().published_node_ids.is_empty());
    // Publish again, unpublish from every node (no node id), delete.
    ctl.controller_publish_volume(publish(&id, &node, cap.clone())).await.unwrap();
    ctl.controller_unpublish_volume(unpublish(&id, "")).await.unwrap();
    ctl.delete_volume(DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_list_capacity_expand_and_capabilities() {
    let mut env = Env::start().await;
    let ctl = &mut env.ctl;
    let caps = ctl
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let rpcs: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type.as_ref().map(|controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for want in [
        CRpc::CreateDeleteVolume,
        CRpc::PublishUnpublishVolume,
        CRpc::ListVolumes,
        CRpc::GetCapacity,
        CRpc::ExpandVolume,
        CRpc::ListVolumesPublishedNodes,
        CRpc::VolumeCondition,
        CRpc::GetVolume,
    ] {
        assert!(rpcs.contains(&(want as i32)), "{want:?} not advertised");
    }
    for not in [CRpc::CreateDeleteSnapshot, CRpc::ListSnapshots, CRpc::CloneVolume] {
        assert!(!rpcs.contains(&(not as i32)), "{not:?} advertised");
    }
    // Snapshots answer UNIMPLEMENTED until they reach the REST API.
    assert_eq!(
        code(ctl.create_snapshot(CreateSnapshotRequest::default()).await),
        Code::Unimplemented
    );
    assert_eq!(
        code(ctl.delete_snapshot(DeleteSnapshotRequest::default()).await),
        Code::Unimplemented
    );
    assert_eq!(
        code(ctl.list_snapshots(ListSnapshotsRequest::default()).await),
        Code::Unimplemented
    );

    // GetCapacity: three pools of 512 MiB.
    let full = ctl.get_capacity(GetCapacityRequest::default()).await.unwrap().into_inner();
    let max = full.maximum_volume_size.unwrap();
    assert!(
        full.available_capacity > 2 * 400 * MIB && full.available_capacity <= 3 * 512 * MIB,
        "{full:?}"
    );
    assert!(max > 400 * MIB && max <= 512 * MIB, "{full:?}");
    let three = ctl
        .get_capacity(GetCapacityRequest {
            parameters: HashMap::from([("replicas".into(), "3".into())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!((full.available_capacity / 3 - three.available_capacity).abs() <= MIB, "{three:?}");
    assert_eq!(
        code(
            ctl.get_capacity(GetCapacityRequest {
                parameters: HashMap::from([("colour".into(), "red".into())]),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );

    let mut ids = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..5 {
        let v = ctl
            .create_volume(create(&format!("pvc-{i}"), 10 * MIB, 0))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        nodes.push(Env::node_for(&v).unwrap_or_else(|| "node-3".to_owned()));
        ids.push(v.volume_id);
    }
    let after = ctl.get_capacity(GetCapacityRequest::default()).await.unwrap().into_inner();
    assert!(full.available_capacity - after.available_capacity >= 50 * MIB, "{full:?} {after:?}");

    // ValidateVolumeCapabilities.
    let validate = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = ctl
        .validate_volume_capabilities(validate(&ids[0], vec![mount_cap("ext4"), block_cap()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.confirmed.unwrap().volume_capabilities.len(), 2);
    let mut multi = mount_cap("ext4");
    multi.access_mode = Some(AccessMode { mode: Mode::MultiNodeReaderOnly as i32 });
    let no = ctl
        .validate_volume_capabilities(validate(&ids[0], vec![multi]))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());
    assert_eq!(
        code(ctl.validate_volume_capabilities(validate("", vec![block_cap()])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.validate_volume_capabilities(validate(&ids[0], vec![])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.validate_volume_capabilities(validate(UNKNOWN_ID, vec![block_cap()])).await),
        Code::NotFound
    );

    // ListVolumes with paging, and published nodes.
    ctl.controller_publish_volume(ControllerPublishVolumeRequest {
        volume_id: ids[2].clone(),
        node_id: nodes[2].clone(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = ctl
            .list_volumes(ListVolumesRequest { max_entries: 2, starting_token: token.clone() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        for e in &page.entries {
            let v = e.volume.as_ref().unwrap();
            let published = &e.status.as_ref().unwrap().published_node_ids;
            if v.volume_id == ids[2] {
                assert_eq!(published, &[nodes[2].clone()]);
            } else {
                assert!(published.is_empty());
            }
            seen.push(v.volume_id.clone());
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "paging must return every volume exactly once");
    let all = ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(all.entries.len(), 5);
    assert!(all.next_token.is_empty());
    assert_eq!(
        code(
            ctl.list_volumes(ListVolumesRequest { max_entries: 0, starting_token: "bogus".into() })
                .await
        ),
        Code::Aborted
    );
    assert_eq!(
        code(
            ctl.list_volumes(ListVolumesRequest { max_entries: 0, starting_token: "99".into() })
                .await
        ),
        Code::Aborted
    );
    assert_eq!(
        code(
            ctl.list_volumes(ListVolumesRequest { max_entries: -1, starting_token: String::new() })
                .await
        ),
        Code::InvalidArgument
    );

    // ControllerExpandVolume.
    let expand = |id: &str, required: i64, limit: i64, cap: Option<VolumeCapability>| {
        ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: Some(CapacityRange { required_bytes: required, limit_bytes: limit }),
            volume_capability: cap,
            ..Default::default()
        }
    };
    let grown = ctl
        .controller_expand_volume(expand(&ids[0], 20 * MIB, 0, Some(mount_cap("ext4"))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((grown.capacity_bytes, grown.node_expansion_required), (20 * MIB, true));
    let again = ctl
        .controller_expand_volume(expand(&ids[0], 20 * MIB, 0, Some(mount_cap("ext4"))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.capacity_bytes, 20 * MIB);
    let smaller =
        ctl.controller_expand_volume(expand(&ids[0], 5 * MIB, 0, None)).await.unwrap().into_inner();
    assert_eq!(smaller.capacity_bytes, 20 * MIB, "volumes never shrink");
    let block = ctl
        .controller_expand_volume(expand(&ids[1], 12 * MIB, 0, Some(block_cap())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((block.capacity_bytes, block.node_expansion_required), (12 * MIB, false));
    assert_eq!(
        code(ctl.controller_expand_volume(expand("", MIB, 0, None)).await),
        Code::InvalidArgument
    );
    let mut no_range = expand(&ids[0], MIB, 0, None);
    no_range.capacity_range = None;
    assert_eq!(code(ctl.controller_expand_volume(no_range).await), Code::InvalidArgument);
    assert_eq!(
        code(ctl.controller_expand_volume(expand(UNKNOWN_ID, 30 * MIB, 0, None)).await),
        Code::NotFound
    );
    assert_eq!(
        code(ctl.controller_expand_volume(expand(&ids[0], 30 * MIB + 1, 30 * MIB + 2, None)).await),
        Code::OutOfRange
    );
    // Published: offline expansion only.
    assert_eq!(
        code(ctl.controller_expand_volume(expand(&ids[2], 30 * MIB, 0, None)).await),
        Code::FailedPrecondition
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_rpcs_and_their_errors() {
    let mut env = Env::start().await;
    let info = env.nd.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.node_id, env.node_id);
    let segments = info.accessible_topology.unwrap().segments;
    assert_eq!(segments["topology.csi.trireme.io/node"], env.node_id);
    let caps =
        env.nd.node_get_capabilities(NodeGetCapabilitiesRequest {}).await.unwrap().into_inner();
    let rpcs: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| c.r#type.as_ref().map(|node_service_capability::Type::Rpc(r)| r.r#type))
        .collect();
    for want in
        [NRpc::StageUnstageVolume, NRpc::GetVolumeStats, NRpc::ExpandVolume, NRpc::VolumeCondition]
    {
        assert!(rpcs.contains(&(want as i32)), "{want:?} not advertised");
    }

    let cap = mount_cap("ext4");
    let (id, ctx) = env.create_published("pvc-n", 32 * MIB, cap.clone()).await;
    let staging = env.path("staging/n");
    let target = env.path("pods/n/mount");

    // NodeStageVolume errors.
    let mut r = env.stage_req(&id, &ctx, &staging, cap.clone());
    r.volume_id.clear();
    assert_eq!(code(env.nd.node_stage_volume(r).await), Code::InvalidArgument);
    let mut r = env.stage_req(&id, &ctx, &staging, cap.clone());
    r.staging_target_path.clear();
    assert_eq!(code(env.nd.node_stage_volume(r).await), Code::InvalidArgument);
    let mut r = env.stage_req(&id, &ctx, &staging, cap.clone());
    r.volume_capability = None;
    assert_eq!(code(env.nd.node_stage_volume(r).await), Code::InvalidArgument);
    let r = env.stage_req(&id, &ctx, &staging, mount_cap("btrfs"));
    assert_eq!(code(env.nd.node_stage_volume(r).await), Code::FailedPrecondition);
    // Without a publish context the node asks control, which knows no such volume.
    let r = env.stage_req(UNKNOWN_ID, &HashMap::new(), &env.path("staging/x"), cap.clone());
    assert_eq!(code(env.nd.node_stage_volume(r).await), Code::NotFound);

    // NodePublishVolume before stage.
    let r = env.publish_req(&id, &staging, &target, cap.clone(), false);
    assert_eq!(code(env.nd.node_publish_volume(r).await), Code::FailedPrecondition);

    // Stage (without a publish context too: the URI comes from control), then the conflicts.
    env.nd
        .node_stage_volume(env.stage_req(&id, &HashMap::new(), &staging, cap.clone()))
        .await
        .unwrap();
    let r = env.stage_req(&id, &ctx, &staging, block_cap());
    assert_eq!(code(env.nd.node_stage_volume(r).await), Code::AlreadyExists);

    let mut r = env.publish_req(&id, &staging, &target, cap.clone(), false);
    r.target_path.clear();
    assert_eq!(code(env.nd.node_publish_volume(r).await), Code::InvalidArgument);
    let mut r = env.publish_req(&id, &staging, &target, cap.clone(), false);
    r.staging_target_path.clear();
    assert_eq!(code(env.nd.node_publish_volume(r).await), Code::FailedPrecondition);
    let mut r = env.publish_req(&id, &staging, &target, cap.clone(), false);
    r.volume_capability = None;
    assert_eq!(code(env.nd.node_publish_volume(r).await), Code::InvalidArgument);
    env.nd
        .node_publish_volume(env.publish_req(&id, &staging, &target, cap.clone(), true))
        .await
        .unwrap();
    // Published read-only; a read-write publish at the same target is incompatible.
    let r = env.publish_req(&id, &staging, &target, cap.clone(), false);
    assert_eq!(code(env.nd.node_publish_volume(r).await), Code::AlreadyExists);

    // NodeGetVolumeStats.
    let stats = |id: &str, path: &str| NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    let s = env
        .nd
        .node_get_volume_stats(stats(&id, target.to_str().unwrap()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.usage.len(), 2);
    assert_eq!(
        code(env.nd.node_get_volume_stats(stats("", target.to_str().unwrap())).await),
        Code::InvalidArgument
    );
    assert_eq!(code(env.nd.node_get_volume_stats(stats(&id, "")).await), Code::InvalidArgument);
    assert_eq!(
        code(env.nd.node_get_volume_stats(stats(&id, "/no/such/path")).await),
        Code::NotFound
    );

    // NodeExpandVolume.
    let expand = |id: &str, path: &str| NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    let e = env
        .nd
        .node_expand_volume(expand(&id, target.to_str().unwrap()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.capacity_bytes, 32 * MIB);
    assert_eq!(
        code(env.nd.node_expand_volume(expand("", target.to_str().unwrap())).await),
        Code::InvalidArgument
    );
    assert_eq!(code(env.nd.node_expand_volume(expand(&id, "")).await), Code::InvalidArgument);
    assert_eq!(code(env.nd.node_expand_volume(expand(&id, "/no/such/path")).await), Code::NotFound);
    assert_eq!(
        code(env.nd.node_expand_volume(expand(UNKNOWN_ID, target.to_str().unwrap())).await),
        Code::NotFound
    );

    // Unpublish and unstage: errors, success, repeats, unknowns.
    // Unstage while still published: refused, nothing torn down under the user.
    let r = NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.to_str().unwrap().into(),
    };
    assert_eq!(code(env.nd.node_unstage_volume(r).await), Code::FailedPrecondition);
    assert!(is_mounted(&staging) && is_mounted(&target));

    let unpub = |id: &str, path: &str| NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: path.into(),
    };
    assert_eq!(
        code(env.nd.node_unpublish_volume(unpub("", target.to_str().unwrap())).await),
        Code::InvalidArgument
    );
    assert_eq!(code(env.nd.node_unpublish_volume(unpub(&id, "")).await), Code::InvalidArgument);
    env.unpublish(&id, &target).await;
    env.unpublish(&id, &target).await;
    env.nd.node_unpublish_volume(unpub(UNKNOWN_ID, "/no/such/target")).await.unwrap();
    let unstage = |id: &str, path: &str| NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path.into(),
    };
    assert_eq!(
        code(env.nd.node_unstage_volume(unstage("", staging.to_str().unwrap())).await),
        Code::InvalidArgument
    );
    assert_eq!(code(env.nd.node_unstage_volume(unstage(&id, "")).await), Code::InvalidArgument);
    env.unstage(&id, &staging).await;
    env.unstage(&id, &staging).await;
    env.nd.node_unstage_volume(unstage(UNKNOWN_ID, "/no/such/staging")).await.unwrap();
    env.assert_nothing_left();
}
