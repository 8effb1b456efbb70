//! Crash safety: the node plugin is killed with SIGKILL in the middle of NodeStageVolume and of
//! NodeUnstageVolume, restarted on the same state dir, and the RPC retried: it converges, and
//! nothing is leaked or attached twice.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// Polls `cond` every millisecond until it holds (or a generous deadline passes).
fn wait(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn loops_backed_by(file: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let backing = std::fs::read_to_string(e.path().join("loop/backing_file"));
        if backing.is_ok_and(|b| Path::new(b.trim_end()) == file) {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

fn fuse_dir(env: &Env, id: &str) -> PathBuf {
    env.state_dir().join("fuse").join(id)
}

/// Starts NodeStageVolume, kills the plugin once `at` holds, restarts it, retries.
async fn crash_during_stage(
    env: &mut Env,
    name: &str,
    at: impl Fn(&Env, &str) -> bool + Send + Sync,
) {
    let cap = mount_cap("ext4");
    let (id, ctx) = env.create_published(name, 256 * MIB, cap.clone()).await;
    let staging = env.path(&format!("staging/{name}"));
    let req = env.stage_req(&id, &ctx, &staging, cap.clone());
    let mut nd = env.nd.clone();
    let call = tokio::spawn(async move { nd.node_stage_volume(req).await });
    let env_ref: &Env = env;
    tokio::task::block_in_place(|| wait("the crash point", || at(env_ref, &id)));
    env.node.kill9();
    assert!(call.await.unwrap().is_err(), "stage finished before the crash");
    assert!(!is_mounted(&staging), "the crash came after stage had mounted");

    env.restart_node().await;
    env.nd.node_stage_volume(env.stage_req(&id, &ctx, &staging, cap.clone())).await.unwrap();
    assert!(is_mounted(&staging));
    // Exactly one of everything.
    let fuse = fuse_dir(env, &id);
    assert_eq!(nbdfuse_processes(fuse.to_str().unwrap()).len(), 1);
    assert_eq!(loops_backed_by(&fuse.join("nbd")).len(), 1);
    let target = env.path(&format!("pods/{name}"));
    env.nd.node_publish_volume(env.publish_req(&id, &staging, &target, cap, false)).await.unwrap();
    std::fs::write(target.join("ok"), "after crash").unwrap();
    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
    env.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_stage_after_nbdfuse_came_up() {
    let mut env = Env::start().await;
    crash_during_stage(&mut env, "crash-a", |env, id| is_mounted(&fuse_dir(env, id))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_stage_after_the_loop_device_appeared() {
    let mut env = Env::start().await;
    crash_during_stage(&mut env, "crash-b", |env, id| {
        !loops_backed_by(&fuse_dir(env, id).join("nbd")).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_unstage_then_retry_and_stage_again() {
    let mut env = Env::start().await;
    let cap = mount_cap("ext4");
    let (id, ctx) = env.create_published("crash-u", 64 * MIB, cap.clone()).await;
    let staging = env.path("staging/crash-u");
    let target = env.path("pods/crash-u");
    env.nd.node_stage_volume(env.stage_req(&id, &ctx, &staging, cap.clone())).await.unwrap();
    env.nd
        .node_publish_volume(env.publish_req(&id, &staging, &target, cap.clone(), false))
        .await
        .unwrap();
    std::fs::write(target.join("keep"), "survives").unwrap();
    env.unpublish(&id, &target).await;

    // The plugin dies with nothing in flight: the volume stays attached and usable.
    env.restart_node().await;
    let stats = env
        .nd
        .node_get_volume_stats(trireme_csi::proto::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: staging.to_str().unwrap().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);

    let req = trireme_csi::proto::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.to_str().unwrap().into(),
    };
    let mut nd = env.nd.clone();
    let call = tokio::spawn(async move { nd.node_unstage_volume(req).await });
    tokio::task::block_in_place(|| wait("the staging mount to go", || !is_mounted(&staging)));
    env.node.kill9();
    let _ = call.await.unwrap();

    env.restart_node().await;
    env.unstage(&id, &staging).await;
    env.assert_nothing_left();

    env.nd.node_stage_volume(env.stage_req(&id, &ctx, &staging, cap.clone())).await.unwrap();
    env.nd
        .node_publish_volume(env.publish_req(&id, &staging, &target, cap.clone(), false))
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(target.join("keep")).unwrap(), "survives");
    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
    env.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdfuse_dying_is_reported_and_cleaned_up() {
    let mut env = Env::start().await;
    let cap = mount_cap("ext4");
    let (id, ctx) = env.create_published("dies", 64 * MIB, cap.clone()).await;
    let staging = env.path("staging/dies");
    env.nd.node_stage_volume(env.stage_req(&id, &ctx, &staging, cap.clone())).await.unwrap();
    let fuse = fuse_dir(&env, &id);
    let pids = nbdfuse_processes(fuse.to_str().unwrap());
    assert_eq!(pids.len(), 1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    tokio::task::block_in_place(|| {
        wait("nbdfuse to die", || nbdfuse_processes(fuse.to_str().unwrap()).is_empty())
    });
    let stats = env
        .nd
        .node_get_volume_stats(trireme_csi::proto::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: staging.to_str().unwrap().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let cond = stats.volume_condition.unwrap();
    assert!(cond.abnormal, "a dead nbdfuse must be reported: {cond:?}");
    env.unstage(&id, &staging).await;
    env.assert_nothing_left();
    assert!(loops_backed_by(&fuse.join("nbd")).is_empty());
    // And the volume attaches again from scratch.
    env.nd.node_stage_volume(env.stage_req(&id, &ctx, &staging, cap.clone())).await.unwrap();
    env.unstage(&id, &staging).await;
    env.assert_nothing_left();
}
