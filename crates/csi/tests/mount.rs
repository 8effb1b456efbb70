//! Real attach and mount on this machine: stage, publish, write, tear down, stage again; grow
//! the file system; raw block access. Needs root, /dev/fuse, nbdfuse, nbdkit, losetup.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};

use common::*;
use trireme_csi::proto::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_publish_write_teardown_restage_and_expand() {
    let mut env = Env::start().await;
    let cap = mount_cap("ext4");
    let (id, ctx) = env.create_published("mount-1", 64 * MIB, cap.clone()).await;
    let staging = env.path("staging/mount-1");
    let target = env.path("pods/a/mount");

    env.nd.node_stage_volume(env.stage_req(&id, &ctx, &staging, cap.clone())).await.unwrap();
    assert!(is_mounted(&staging));
    // Idempotent: a repeat finds it staged.
    env.nd.node_stage_volume(env.stage_req(&id, &ctx, &staging, cap.clone())).await.unwrap();
    env.nd
        .node_publish_volume(env.publish_req(&id, &staging, &target, cap.clone(), false))
        .await
        .unwrap();
    env.nd
        .node_publish_volume(env.publish_req(&id, &staging, &target, cap.clone(), false))
        .await
        .unwrap();
    assert!(is_mounted(&target));
    let before = nix::sys::statvfs::statvfs(&target).unwrap();

    for i in 0..20 {
        std::fs::write(target.join(format!("file-{i}")), format!("payload {i}").repeat(1000))
            .unwrap();
    }
    nix::unistd::sync();

    // A second, read-only publish of the same staged volume.
    let ro_target = env.path("pods/b/mount");
    env.nd
        .node_publish_volume(env.publish_req(&id, &staging, &ro_target, cap.clone(), true))
        .await
        .unwrap();
    assert!(std::fs::write(ro_target.join("nope"), "x").is_err(), "read-only publish is writable");
    assert_eq!(
        std::fs::read_to_string(ro_target.join("file-3")).unwrap(),
        "payload 3".repeat(1000)
    );

    // Stats: bytes and inodes of the file system.
    let stats = env
        .nd
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.to_str().unwrap().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage.len(), 2);
    assert!(stats.usage[0].total > 40 * MIB && stats.usage[0].used > 0, "{stats:?}");
    assert!(stats.usage[1].total > 0 && stats.usage[1].used >= 20, "{stats:?}");
    assert!(!stats.volume_condition.unwrap().abnormal);

    env.unpublish(&id, &ro_target).await;
    env.unpublish(&id, &target).await;
    env.unpublish(&id, &target).await; // idempotent
    assert!(!target.exists());
    env.unstage(&id, &staging).await;
    env.unstage(&id, &staging).await; // idempotent
    env.assert_nothing_left();

    // Stage again: the files are intact.
    env.nd.node_stage_volume(env.stage_req(&id, &ctx, &staging, cap.clone())).await.unwrap();
    env.nd
        .node_publish_volume(env.publish_req(&id, &staging, &target, cap.clone(), false))
        .await
        .unwrap();
    for i in 0..20 {
        assert_eq!(
            std::fs::read_to_string(target.join(format!("file-{i}"))).unwrap(),
            format!("payload {i}").repeat(1000)
        );
    }
    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;

    // Expand (offline: unpublished from the node), stage again, NodeExpandVolume: the file
    // system fills the grown volume (grown at stage when the plugin may not resize online).
    env.ctl
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: env.node_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let grown = env
        .ctl
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 128 * MIB);
    assert!(grown.node_expansion_required);
    let ctx = env.publish(&id, cap.clone()).await;
    env.nd.node_stage_volume(env.stage_req(&id, &ctx, &staging, cap.clone())).await.unwrap();
    env.nd
        .node_publish_volume(env.publish_req(&id, &staging, &target, cap.clone(), false))
        .await
        .unwrap();
    let expanded = env
        .nd
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.to_str().unwrap().into(),
            capacity_range: Some(CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
            staging_target_path: staging.to_str().unwrap().into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 128 * MIB);
    let after = nix::sys::statvfs::statvfs(&target).unwrap();
    let size = |s: &nix::sys::statvfs::Statvfs| s.blocks() * s.fragment_size();
    assert!(
        size(&after) > size(&before) + 50 * MIB as u64,
        "file system did not grow: {} -> {}",
        size(&before),
        size(&after)
    );
    assert_eq!(std::fs::read_to_string(target.join("file-7")).unwrap(), "payload 7".repeat(1000));

    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
    env.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_is_formatted_and_mounted() {
    let mut env = Env::start().await;
    let cap = mount_cap("xfs");
    let (id, ctx) = env.create_published("xfs-1", 320 * MIB, cap.clone()).await;
    let staging = env.path("staging/xfs-1");
    let target = env.path("pods/x/mount");
    env.nd.node_stage_volume(env.stage_req(&id, &ctx, &staging, cap.clone())).await.unwrap();
    env.nd
        .node_publish_volume(env.publish_req(&id, &staging, &target, cap.clone(), false))
        .await
        .unwrap();
    std::fs::write(target.join("hello"), "xfs").unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(mounts.lines().any(|l| l.contains(staging.to_str().unwrap()) && l.contains(" - xfs ")));
    let size = |p: &std::path::Path| {
        let s = nix::sys::statvfs::statvfs(p).unwrap();
        s.blocks() * s.fragment_size()
    };
    let before = size(&target);
    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
    env.assert_nothing_left();

    // Offline expansion, then xfs_growfs on the mounted file system.
    env.ctl
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: env.node_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let range = Some(CapacityRange { required_bytes: 400 * MIB, limit_bytes: 0 });
    env.ctl
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: range,
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let ctx = env.publish(&id, cap.clone()).await;
    env.nd.node_stage_volume(env.stage_req(&id, &ctx, &staging, cap.clone())).await.unwrap();
    env.nd
        .node_publish_volume(env.publish_req(&id, &staging, &target, cap.clone(), false))
        .await
        .unwrap();
    let expanded = env
        .nd
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.to_str().unwrap().into(),
            capacity_range: range,
            staging_target_path: staging.to_str().unwrap().into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 400 * MIB);
    let after = size(&target);
    assert!(after > before + 60 * MIB as u64, "xfs did not grow: {before} -> {after}");
    assert_eq!(std::fs::read_to_string(target.join("hello")).unwrap(), "xfs");
    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
    env.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_block_reads_back_what_was_written() {
    let mut env = Env::start().await;
    let cap = block_cap();
    let (id, ctx) = env.create_published("block-1", 16 * MIB, cap.clone()).await;
    let staging = env.path("staging/block-1");
    let target = env.path("pods/c/dev");
    env.nd.node_stage_volume(env.stage_req(&id, &ctx, &staging, cap.clone())).await.unwrap();
    env.nd
        .node_publish_volume(env.publish_req(&id, &staging, &target, cap.clone(), false))
        .await
        .unwrap();
    env.nd
        .node_publish_volume(env.publish_req(&id, &staging, &target, cap.clone(), false))
        .await
        .unwrap();

    let pattern: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    {
        let mut dev = std::fs::OpenOptions::new().read(true).write(true).open(&target).unwrap();
        assert_eq!(dev.seek(SeekFrom::End(0)).unwrap(), 16 * MIB as u64);
        dev.seek(SeekFrom::Start(3 * MIB as u64)).unwrap();
        dev.write_all(&pattern).unwrap();
        dev.sync_all().unwrap();
    }
    let stats = env
        .nd
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.to_str().unwrap().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, 16 * MIB);

    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
    env.assert_nothing_left();

    // Attach again and read through a fresh device: the data is on the volume.
    env.nd.node_stage_volume(env.stage_req(&id, &ctx, &staging, cap.clone())).await.unwrap();
    env.nd
        .node_publish_volume(env.publish_req(&id, &staging, &target, cap.clone(), false))
        .await
        .unwrap();
    let mut back = vec![0u8; pattern.len()];
    let mut dev = std::fs::File::open(&target).unwrap();
    dev.seek(SeekFrom::Start(3 * MIB as u64)).unwrap();
    dev.read_exact(&mut back).unwrap();
    drop(dev);
    assert!(back == pattern, "raw block data differs");
    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
    env.assert_nothing_left();
}
