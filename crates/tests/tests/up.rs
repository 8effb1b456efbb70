//! `trireme up` as a supervisor: it restarts a child that dies, and Ctrl-C stops everything
//! with nothing left running; a second run resumes the same cluster.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use nix::sys::signal::Signal;
use trireme_tests::tools::{run_ok, wait_for};
use trireme_tests::{ByteSize, Cluster, procs};
use trireme_types::NodeState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_restarts_killed_children() {
    let c = Cluster::start(2, ByteSize::mib(256)).await;
    let e1 = c.engine_pid(1).expect("engine 1 pid");
    let e2 = c.engine_pid(2).expect("engine 2 pid");
    let control = c.control_pid().expect("control pid");
    assert!(e1 != e2 && e1 != control);

    // up.json describes the running cluster.
    let up_json = std::fs::read_to_string(c.data_dir().join("up.json")).expect("DIR/up.json");
    let _: serde_json::Value =
        serde_json::from_str(&up_json).unwrap_or_else(|e| panic!("up.json is not JSON ({e})"));
    for needle in [c.api_port().to_string(), e1.to_string(), e2.to_string()] {
        assert!(up_json.contains(&needle), "up.json does not mention {needle}: {up_json}");
    }

    // SIGKILL an engine: up starts a new one, the node comes back online.
    let old = c.kill_engine(1, Signal::SIGKILL);
    assert_eq!(old, e1);
    let new = c.wait_engine_restarted(1, old).await;
    assert_ne!(new, old);
    assert_eq!(c.engine_pid(2), Some(e2), "the other engine was restarted too");
    let (_, uri) = c.create_published("after-engine-restart", ByteSize::mib(8)).await;
    run_ok("nbdinfo", &["--size", &uri], Duration::from_secs(60)).await;

    // SIGKILL control: up starts a new one and the API answers again with the same state.
    procs::signal(control, Signal::SIGKILL);
    let client = c.client();
    wait_for("control to be restarted", Duration::from_secs(90), || async {
        match c.control_pid() {
            Some(p) if p != control => {}
            other => return Err(format!("control pid {other:?}")),
        }
        let vols = client.volumes().await.map_err(|e| e.to_string())?;
        if vols.iter().any(|v| v.name.as_str() == "after-engine-restart") {
            Ok(())
        } else {
            Err(format!("volumes: {vols:?}"))
        }
    })
    .await;
    assert!(c.up_pid().is_some_and(procs::is_alive));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_everything_and_a_second_run_resumes() {
    let mut c = Cluster::start(2, ByteSize::mib(256)).await;
    let vol = c.create_volume("survivor", ByteSize::mib(8)).await;
    let children = c.children();
    assert!(children.len() >= 3, "expected control and 2 engines under up: {children:?}");

    // As a terminal's Ctrl-C: SIGINT to the whole process group. stop_with asserts exit 0 and
    // that no child of up is left.
    c.stop_with(Signal::SIGINT, true).await;
    for p in &children {
        assert!(!procs::is_alive(p.pid), "{p:?} survived Ctrl-C");
    }

    c.restart().await;
    let v = c.client().volume("survivor").await.unwrap();
    assert_eq!(v.id, vol.id);
    // And SIGTERM to up alone stops its children too.
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_engine_goes_offline_and_comes_back() {
    let c = Cluster::start(2, ByteSize::mib(256)).await;
    let pid = c.engine_pid(2).unwrap();
    let client = c.client();
    let node_state = |want: NodeState| {
        let client = client.clone();
        async move {
            let n = client.node("node-2").await.map_err(|e| e.to_string())?;
            if n.status.state == want { Ok(()) } else { Err(format!("{:?}", n.status)) }
        }
    };
    // SIGSTOP: the process lives but misses heartbeats, as a hung or partitioned node would.
    procs::signal(pid, Signal::SIGSTOP);
    let _resume = Resume(pid);
    wait_for("node-2 to be marked offline", Duration::from_secs(90), || {
        node_state(NodeState::Offline)
    })
    .await;
    let n1 = client.node("node-1").await.unwrap();
    assert_eq!(n1.status.state, NodeState::Online, "the healthy node went offline too");
    procs::signal(pid, Signal::SIGCONT);
    wait_for("node-2 to be online again", Duration::from_secs(90), || {
        node_state(NodeState::Online)
    })
    .await;
    assert_eq!(c.engine_pid(2), Some(pid), "up restarted the engine instead of waiting for it");
}

/// Resumes a stopped process even if the test fails.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        procs::signal(self.0, Signal::SIGCONT);
    }
}
