//! Time from CreateVolume to a mounted, writable file system (create, controller publish,
//! stage with mkfs, publish, write + fsync a file), median of 20. A benchmark, not a test:
//!
//! ```text
//! bench/csi.sh
//! ```

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write as _;
use std::time::{Duration, Instant};

use common::*;
use trireme_csi::proto::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark; run with --ignored"]
async fn create_to_mounted_writable() {
    let mut env = Env::start().await;
    let cap = mount_cap("ext4");
    let mut times: Vec<Duration> = Vec::new();
    for i in 0..20 {
        let name = format!("bench-{i}");
        let staging = env.path(&format!("staging/{name}"));
        let target = env.path(&format!("pods/{name}"));
        let start = Instant::now();
        let (id, ctx) = env.create_published(&name, 256 * MIB, cap.clone()).await;
        env.nd.node_stage_volume(env.stage_req(&id, &ctx, &staging, cap.clone())).await.unwrap();
        env.nd
            .node_publish_volume(env.publish_req(&id, &staging, &target, cap.clone(), false))
            .await
            .unwrap();
        let mut f = std::fs::File::create(target.join("hello")).unwrap();
        f.write_all(b"hello").unwrap();
        f.sync_all().unwrap();
        times.push(start.elapsed());
        drop(f);
        env.unpublish(&id, &target).await;
        env.unstage(&id, &staging).await;
        env.ctl
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: env.node_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        env.ctl
            .delete_volume(DeleteVolumeRequest { volume_id: id, ..Default::default() })
            .await
            .unwrap();
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "CreateVolume -> mounted writable ext4 (256 MiB, {REPLICAS} replica(s), {}): median {:.0} ms, min {:.0} ms, max {:.0} ms",
        if env.is_real() { "trireme up" } else { "fake control + nbdkit" },
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1]),
    );
    env.assert_nothing_left();
}
