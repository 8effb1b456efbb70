//! The multi-host harness itself: engines in their own network namespaces register with
//! control across the bridge, serve NBD to the root namespace, and every fault the
//! replication tests rely on has the effect it claims (a cut link makes the node offline, a
//! failed disk answers EIO, a partition from control leaves clients connected), and Drop
//! leaves nothing behind.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use trireme_api::PoolState;
use trireme_tests::ByteSize;
use trireme_tests::hosts::{Hosts, HostsConfig, net};
use trireme_tests::tools::run_ok;
use trireme_types::NodeState;

const MIB: u64 = 1 << 20;

fn leftovers(tag_prefix: &str) -> String {
    let links = net::sh("ip", &["-o", "link", "show"]).unwrap();
    let ns = net::sh("ip", &["netns", "list"]).unwrap();
    let loops = net::sh("losetup", &["-l", "-n"]).unwrap();
    let mut out = String::new();
    for l in links.lines().chain(ns.lines()).chain(loops.lines()) {
        if l.contains(tag_prefix) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_run_in_namespaces_and_faults_take_effect() {
    let h = Hosts::start(HostsConfig::new(2).faulty_disks(&[1])).await;
    let tag_dir = h.dir().to_string_lossy().into_owned();
    let client = h.client();

    // Each node advertises its own namespace's address, not loopback.
    for i in 0..2 {
        let n = client.node(h.node(i)).await.unwrap();
        assert_eq!(n.status.nbd_endpoint, h.nbd_endpoint(i), "{n:?}");
    }

    // A volume on node-0 is reachable from the root namespace.
    let v = h.create_volume("harness", ByteSize::mib(64), 1).await;
    let node0 = h.replica_on("harness", 0).await.node.as_str() == h.node(0);
    let host = if node0 { 0 } else { 1 };
    let uri = h.publish("harness", host).await;
    assert!(uri.contains(&h.nbd_endpoint(host)), "{uri}");
    run_ok(
        "fio",
        &[
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=8M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ],
        Duration::from_secs(120),
    )
    .await;

    // node-1's pool lives on the faulty-disk chain (a loop device), and is online.
    let p = client.pool("pool-1").await.unwrap();
    assert_eq!(p.status.state, PoolState::Online, "{p:?}");
    assert!(p.spec.disk.starts_with("/dev/loop"), "{p:?}");

    // A cut link makes the node offline (missed heartbeats); healing brings it back.
    h.cut_link(1);
    let c = client.clone();
    let node1 = h.node(1).to_owned();
    trireme_tests::tools::wait_for("node-1 offline", Duration::from_secs(60), || {
        let (c, node1) = (c.clone(), node1.clone());
        async move {
            let n = c.node(&node1).await.map_err(|e| e.to_string())?;
            if n.status.state == NodeState::Offline { Ok(()) } else { Err(format!("{n:?}")) }
        }
    })
    .await;
    h.heal_link(1);
    trireme_tests::tools::wait_for("node-1 online again", Duration::from_secs(60), || {
        let (c, node1) = (c.clone(), node1.clone());
        async move {
            let n = c.node(&node1).await.map_err(|e| e.to_string())?;
            if n.status.state == NodeState::Online { Ok(()) } else { Err(format!("{n:?}")) }
        }
    })
    .await;

    // A partition from control keeps clients connected to the host's NBD server.
    h.partition_from_control(host);
    run_ok("nbdinfo", &["--size", &uri], Duration::from_secs(60)).await;
    h.heal_from_control(host);
    assert_eq!(v.spec.size.bytes(), 64 * MIB);

    let tag = h.dir().file_name().unwrap().to_string_lossy().into_owned();
    let tag = tag.trim_start_matches("trireme-hosts-").split('-').next().unwrap().to_owned();
    drop(h);
    let left = leftovers(&tag);
    assert!(left.is_empty(), "left behind after Drop:\n{left}");
    assert!(!std::path::Path::new(&tag_dir).exists(), "{tag_dir} still exists");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_disk_answers_eio() {
    let dir = tempfile::tempdir().unwrap();
    let d = trireme_tests::hosts::FaultyDisk::create(dir.path(), 16 * MIB);
    let dev = d.device().to_owned();
    let read = |dev: &str| {
        net::sh("dd", &[&format!("if={dev}"), "of=/dev/null", "bs=4096", "count=1", "iflag=direct"])
    };
    read(&dev).unwrap();
    d.fail();
    let err = read(&dev).unwrap_err();
    assert!(err.contains("Input/output error"), "{err}");
    d.heal();
    read(&dev).unwrap();
    drop(d);
    let loops = net::sh("losetup", &["-l", "-n"]).unwrap();
    assert!(
        !loops.lines().any(|l| l.split_whitespace().next() == Some(dev.as_str())),
        "{dev} still attached: {loops}"
    );
}
