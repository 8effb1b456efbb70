//! Replicated volumes under real faults (issue 3, "What it must show"). Every test runs control
//! and its engines as real processes, each engine in its own network namespace, a 256 MiB
//! 3-replica volume published on host 0, and a workload that keeps running through the fault:
//! fio with crc32c verification where "fio sees no I/O error" is the claim, the repo's checker
//! (tagged blocks, a durable log of flushed acknowledgements) where "no acknowledged write is
//! lost" is.
//!
//! Faults hit one window of the volume (fio: 32 MiB at 64 MiB; checker: the first 32 MiB), so
//! the dirty-region log covers at most that window and a partial rebuild must copy about that
//! much, far below the volume's size. After every rebuild, all replicas are read through their
//! read-only shares and must be byte-identical.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use trireme_api::{Child, RebuildInfo, RebuildKind, Volume};
use trireme_tests::ByteSize;
use trireme_tests::hosts::workload::{CheckerLoop, FioLoop, checker_verify, compare_replicas};
use trireme_tests::hosts::{Hosts, HostsConfig, describe_volume};
use trireme_types::{ChildState, ReplicaId, VolumeState};

const MIB: u64 = 1 << 20;
const SIZE: ByteSize = ByteSize::mib(256);
const VOL: &str = "rvol";
/// fio's window: 32 MiB at 64 MiB.
const FIO_OFF: u64 = 64 * MIB;
const FIO_LEN: u64 = 32 * MIB;
/// The checker's window: the first 32 MiB (8,192 blocks of 4 KiB).
const CHECKER_BLOCKS: u64 = 8192;
/// A partial rebuild after an outage confined to a 32 MiB window copies at most the window
/// plus a region on each side.
const PARTIAL_MAX: u64 = 40 * MIB;
/// Fault detection, node timeouts, restarts and rebuilds on a loaded 2-core machine.
const T: Duration = Duration::from_secs(120);

async fn start(cfg: HostsConfig) -> (Hosts, String) {
    let h = Hosts::start(cfg).await;
    let v = h.create_volume(VOL, SIZE, 3).await;
    assert_eq!(v.status.replicas.len(), 3, "3 replicas placed: {}", describe_volume(&v));
    let uri = h.publish(VOL, 0).await;
    (h, uri)
}

fn child<'a>(v: &'a Volume, r: &ReplicaId) -> Option<&'a Child> {
    v.status.target.as_ref()?.children.iter().find(|c| &c.replica == r)
}

async fn wait_faulted(h: &Hosts, r: &ReplicaId) {
    h.wait_volume(VOL, &format!("child {r} faulted"), T, |v| match child(v, r).map(|c| &c.state) {
        Some(ChildState::Faulted { .. }) => Ok(()),
        other => Err(format!("child is {other:?}")),
    })
    .await
}

/// Waits until every child is online and `r` has finished a rebuild; returns that rebuild.
async fn wait_rebuilt(h: &Hosts, r: &ReplicaId) -> RebuildInfo {
    h.wait_volume(VOL, &format!("child {r} rebuilt and every child online"), T, |v| {
        let t = v.status.target.as_ref().ok_or("no target")?;
        let online = t.children.iter().filter(|c| c.state == ChildState::Online).count();
        let c = child(v, r).ok_or("the child is not in the nexus")?;
        match (online == usize::from(v.spec.replicas), c.last_rebuild) {
            (true, Some(info)) => Ok(info),
            (_, info) => Err(format!("{online} online, last rebuild {info:?}")),
        }
    })
    .await
}

fn assert_partial(info: &RebuildInfo, what: &str) {
    assert_eq!(info.kind, RebuildKind::Partial, "{what}: expected a partial rebuild: {info:?}");
    let copied = info.copied.bytes();
    assert!(
        copied > 0 && copied <= PARTIAL_MAX,
        "{what}: a partial rebuild after an outage confined to {} MiB copied {} MiB ({info:?}); \
         expected more than 0 and at most {} MiB of the {} MiB volume",
        FIO_LEN / MIB,
        copied / MIB,
        PARTIAL_MAX / MIB,
        SIZE.bytes() / MIB
    );
    eprintln!(
        "{what}: partial rebuild copied {:.1} MiB in {} ms",
        copied as f64 / MIB as f64,
        info.duration_ms
    );
}

/// Events about replica `r` after `since` must show it faulted, then a rebuild start, then
/// its end (finished or online).
async fn assert_events(h: &Hosts, since: u64, r: &ReplicaId) {
    let rid = r.to_string();
    let events = h.events_after(since).await;
    let mine: Vec<_> = events.iter().filter(|e| e.id == rid || e.message.contains(&rid)).collect();
    let pos = |reason: &str, after: usize| {
        mine.iter().skip(after).position(|e| e.reason == reason).map(|p| p + after)
    };
    let listing = || {
        mine.iter()
            .map(|e| format!("  {} {} {}: {}", e.seq, e.kind, e.reason, e.message))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let faulted = pos("child_faulted", 0)
        .unwrap_or_else(|| panic!("no child_faulted event for {rid}; its events:\n{}", listing()));
    let started = pos("rebuild_started", faulted).unwrap_or_else(|| {
        panic!("no rebuild_started after child_faulted for {rid}; its events:\n{}", listing())
    });
    pos("rebuild_finished", started).or_else(|| pos("child_online", started)).unwrap_or_else(
        || {
            panic!(
                "no rebuild_finished/child_online after rebuild_started for {rid}:\n{}",
                listing()
            )
        },
    );
}

#[derive(Clone, Copy, Debug)]
enum Outage {
    Kill,
    Link,
    Disk,
}

/// The shared shape of the three replica outages: fio runs on the nexus (host 0) throughout;
/// host 1's replica is taken out, misses writes, comes back, and is rebuilt partially.
async fn replica_outage(outage: Outage) {
    let mut cfg = HostsConfig::new(3);
    if matches!(outage, Outage::Disk) {
        cfg = cfg.faulty_disks(&[1]);
    }
    let (mut h, uri) = start(cfg).await;
    let victim = 1;
    let r = h.replica_on(VOL, victim).await.id;
    let fio = FioLoop::start(&uri, FIO_OFF, FIO_LEN);
    fio.wait_runs(1, T).await;
    let since = h.last_event().await;

    match outage {
        Outage::Kill => h.kill9(victim),
        Outage::Link => h.cut_link(victim),
        Outage::Disk => h.fail_disk(victim),
    }
    wait_faulted(&h, &r).await;
    // Writes land while the replica is out.
    fio.wait_runs(2, T).await;
    let healed = std::time::Instant::now();
    match outage {
        Outage::Kill => h.restart(victim).await,
        Outage::Link => h.heal_link(victim),
        Outage::Disk => h.heal_disk(victim),
    }
    let info = wait_rebuilt(&h, &r).await;
    eprintln!("{outage:?}: back online {:?} after the repair", healed.elapsed());
    // And I/O goes on with every child back.
    fio.wait_runs(1, T).await;
    let runs = fio.stop_ok(&format!("{outage:?} outage of host {victim}")).await;
    assert_partial(&info, &format!("{outage:?} outage"));
    assert_events(&h, since, &r).await;
    let n = compare_replicas(&h, VOL).await;
    eprintln!("{outage:?}: {runs} fio runs without error; {n} replicas identical");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_engine_killed_and_restarted_is_rebuilt_partially() {
    replica_outage(Outage::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_host_link_cut_and_healed_is_rebuilt_partially() {
    replica_outage(Outage::Link).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_disk_failing_and_healed_is_rebuilt_partially() {
    replica_outage(Outage::Disk).await;
}

/// SIGKILL the nexus's engine under the checker: I/O stops with an error (never wrong data),
/// and once the engine is back the volume is served again with every flushed write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nexus_engine_killed_then_every_flushed_write_reads_back() {
    let (mut h, uri) = start(HostsConfig::new(3)).await;
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("checker.log");
    let ck = CheckerLoop::start(&uri, &log, CHECKER_BLOCKS);
    ck.wait_flushes(20, T).await;
    h.kill9(0);
    let s = ck.wait_ended(T).await;
    assert!(s.ended_by.is_some(), "the checker did not notice the nexus's death: {s:?}");
    eprintln!("checker before the kill: {s:?}");

    h.restart(0).await;
    let v = h.wait_all_online(VOL, T).await;
    assert_eq!(v.status.target.as_ref().unwrap().uri, uri, "the volume moved: {v:?}");
    let summary = checker_verify(&uri, &log).await;
    eprintln!("after the nexus restart: {summary}");
    // The volume takes writes again.
    let ck = CheckerLoop::start(&uri, &log, CHECKER_BLOCKS);
    ck.wait_flushes(5, T).await;
    let s = ck.stop().await;
    assert!(s.ended_by.is_none(), "writes after the restart failed: {s:?}");
    checker_verify(&uri, &log).await;
}

/// The nexus's engine dies while a replica is out and writes go on: the dirty-region log is in
/// the store, so once everything is back the returning replica is rebuilt partially.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nexus_killed_during_an_outage_still_rebuilds_partially() {
    let (mut h, uri) = start(HostsConfig::new(3)).await;
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("checker.log");
    let r1 = h.replica_on(VOL, 1).await.id;
    let ck = CheckerLoop::start(&uri, &log, CHECKER_BLOCKS);
    ck.wait_flushes(10, T).await;
    h.kill9(1);
    wait_faulted(&h, &r1).await;
    ck.wait_flushes(20, T).await;
    h.kill9(0);
    let s = ck.wait_ended(T).await;
    assert!(s.ended_by.is_some(), "{s:?}");

    h.restart(0).await;
    // The nexus comes back over the two current replicas; host 1's is still out.
    h.wait_volume(VOL, "target back, degraded", T, |v| {
        let t = v.status.target.as_ref().ok_or("no target")?;
        let online = t.children.iter().filter(|c| c.state == ChildState::Online).count();
        if online == 2 { Ok(()) } else { Err(format!("{online} online")) }
    })
    .await;
    h.restart(1).await;
    let info = wait_rebuilt(&h, &r1).await;
    assert_partial(&info, "returning replica after a nexus crash");
    checker_verify(&uri, &log).await;
}

/// An old nexus that keeps running after its volume was republished elsewhere cannot write to
/// the replicas: host 0 is cut off from control (so control cannot tear its nexus down), the
/// volume is republished on host 1 (a new epoch), and a client of the old nexus tries to write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_nexus_cannot_write_after_republish() {
    let (h, uri0) = start(HostsConfig::new(3)).await;
    let opts =
        trireme_nbd::ClientOptions { io_timeout: Duration::from_secs(90), ..Default::default() };
    let old = trireme_nbd::Client::connect_uri(&uri0, opts.clone()).await.unwrap();
    let block = |byte: u8| trireme_iobuf::IoBuf::copy_from(&vec![byte; 4096]);
    const A: u64 = 10 * MIB;
    const B: u64 = 20 * MIB;
    old.write(A, block(0xaa), false).await.unwrap();
    old.flush().await.unwrap();

    h.partition_from_control(0);
    let client = h.client();
    tools_wait_node(&h, 0, trireme_types::NodeState::Offline).await;
    let unpublished = client.unpublish_volume(VOL).await;
    eprintln!("unpublish with the old nexus unreachable: {unpublished:?}");
    let v = republish_on_node1(&h).await;
    let uri1 = v.status.target.as_ref().unwrap().uri.clone();
    assert_ne!(uri1, uri0);

    // The old nexus, still running on host 0, is asked to write B and flush.
    let wrote = old.write(B, block(0xbb), false).await;
    let flushed = if wrote.is_ok() { Some(old.flush().await) } else { None };
    eprintln!("old nexus: write {wrote:?}, flush {flushed:?}");
    assert!(
        wrote.is_err() || matches!(flushed, Some(Err(_))),
        "the old nexus acknowledged a write and a flush after the volume was republished"
    );

    // Nothing of it reached any replica: the new nexus and every replica's own share read
    // zeroes at B and the old data at A.
    let new = trireme_nbd::Client::connect_uri(&uri1, opts.clone()).await.unwrap();
    assert!(new.read(B, 4096).await.unwrap().iter().all(|&b| b == 0), "B through the new nexus");
    assert!(new.read(A, 4096).await.unwrap().iter().all(|&b| b == 0xaa), "A through the new nexus");
    for r in &v.status.replicas {
        let c = trireme_nbd::Client::connect_uri(&h.replica_uri(r), opts.clone()).await.unwrap();
        let data = c.read(B, 4096).await.unwrap();
        assert!(
            data.iter().all(|&b| b == 0),
            "the replica on {} holds the old nexus's write (starts {:02x?})",
            r.node,
            &data[..8]
        );
    }
    // New writes go through the new nexus.
    new.write(B, block(0xcc), true).await.unwrap();
    h.heal_from_control(0);
}

/// Publishes the volume on host 1 and waits until its new nexus there has two children
/// online; returns the volume as then seen.
async fn republish_on_node1(h: &Hosts) -> Volume {
    let body =
        trireme_api::PublishBody { node: Some(trireme_types::NodeId::new(h.node(1)).unwrap()) };
    h.client()
        .publish_volume(VOL, &body)
        .await
        .unwrap_or_else(|e| panic!("republish on node-1: {e}"));
    h.wait_volume(VOL, "republished on node-1 with 2 children online", T, |v| {
        let t = v.status.target.as_ref().ok_or("no target")?;
        let online = t.children.iter().filter(|c| c.state == ChildState::Online).count();
        if t.node.as_str() == "node-1" && online >= 2 {
            Ok(v.clone())
        } else {
            Err(format!("target on {} with {online} online", t.node))
        }
    })
    .await
}

async fn tools_wait_node(h: &Hosts, i: usize, want: trireme_types::NodeState) {
    let client = h.client();
    let node = h.node(i).to_owned();
    trireme_tests::tools::wait_for(&format!("{node} {want:?}"), T, || {
        let (client, node) = (client.clone(), node.clone());
        async move {
            let n = client.node(&node).await.map_err(|e| e.to_string())?;
            if n.status.state == want { Ok(()) } else { Err(format!("{:?}", n.status.state)) }
        }
    })
    .await
}

/// Kill every engine, in rounds that each leave a different replica stale, and restart them
/// in different orders: the freshest replicas serve, the stale one is rebuilt, and the
/// checker finds no acknowledged-and-flushed write lost across all rounds. The last round
/// makes the nexus host's own replica stale (its disk failed) and restarts that host first:
/// the volume must stay faulted, saying which replica it waits for, until a current one is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_engines_killed_restart_orders_freshest_wins() {
    let (mut h, uri) = start(HostsConfig::new(3).faulty_disks(&[0])).await;
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("checker.log");
    let rounds: [(usize, [usize; 3]); 3] = [(2, [2, 1, 0]), (1, [1, 0, 2]), (0, [0, 1, 2])];
    for (round, (stale, order)) in rounds.into_iter().enumerate() {
        let rs = h.replica_on(VOL, stale).await.id;
        let ck = CheckerLoop::start(&uri, &log, CHECKER_BLOCKS);
        ck.wait_flushes(10, T).await;
        if stale == 0 {
            h.fail_disk(0);
        } else {
            h.kill9(stale);
        }
        wait_faulted(&h, &rs).await;
        ck.wait_flushes(10, T).await;
        for i in [2, 1, 0] {
            if h.engine_pid(i).is_some() {
                h.kill9(i);
            }
        }
        let s = ck.wait_ended(T).await;
        eprintln!("round {round}: checker {s:?}");
        if stale == 0 {
            h.heal_disk(0);
        }
        for (k, &i) in order.iter().enumerate() {
            h.restart(i).await;
            if k == 0 && i == 0 && stale == 0 {
                // Only the stale replica is reachable: nothing may serve it, and once control
                // sees the other nodes gone the status names the replicas it waits for.
                let v = h
                    .wait_volume(VOL, "faulted, naming a current replica it waits for", T, |v| {
                        if let Some(t) = &v.status.target {
                            assert!(
                                !t.children.iter().any(|c| c.state == ChildState::Online),
                                "a nexus serves with only the stale replica: {}",
                                describe_volume(v)
                            );
                        }
                        let msg = v.status.message.as_deref().unwrap_or("");
                        if v.status.state == VolumeState::Faulted
                            && (msg.contains("node-1") || msg.contains("node-2"))
                        {
                            Ok(v.clone())
                        } else {
                            Err("not faulted with a message naming node-1 or node-2".into())
                        }
                    })
                    .await;
                eprintln!("only the stale replica back: {:?}", v.status.message);
            }
        }
        let info = wait_rebuilt(&h, &rs).await;
        assert_eq!(info.kind, RebuildKind::Partial, "round {round}: {info:?}");
        let summary = checker_verify(&uri, &log).await;
        eprintln!(
            "round {round} (stale host {stale}, order {order:?}): {summary}; rebuild {info:?}"
        );
    }
}

/// Shrink to 2 replicas, grow back to 3, and drain a node holding a replica (not the
/// nexus's), all while fio writes and verifies: no error, and the replicas end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_replicas_and_drain_under_fio() {
    let h = Hosts::start(HostsConfig::new(4)).await;
    let v = h.create_volume(VOL, SIZE, 3).await;
    let holders: Vec<usize> =
        v.status.replicas.iter().map(|r| h.host_of(r.node.as_str())).collect();
    let nexus = holders[0];
    let uri = h.publish(VOL, nexus).await;
    let fio = FioLoop::start(&uri, FIO_OFF, FIO_LEN);
    fio.wait_runs(1, T).await;

    let settled = |n: usize| {
        move |v: &Volume| {
            let t = v.status.target.as_ref().ok_or("no target")?;
            let online = t.children.iter().filter(|c| c.state == ChildState::Online).count();
            if usize::from(v.spec.replicas) == n
                && v.status.replicas.len() == n
                && t.children.len() == n
                && online == n
            {
                Ok(v.clone())
            } else {
                Err(format!(
                    "{} replicas, {} children, {online} online",
                    v.status.replicas.len(),
                    t.children.len()
                ))
            }
        }
    };
    h.cli_ok(&["volume", "set-replicas", VOL, "2"]).await;
    let v = h.wait_volume(VOL, "2 replicas, both online", T, settled(2)).await;
    assert!(
        v.status.replicas.iter().any(|r| r.node.as_str() == h.node(nexus)),
        "shrinking removed the nexus's local replica: {}",
        describe_volume(&v)
    );
    fio.wait_runs(1, T).await;
    h.cli_ok(&["volume", "set-replicas", VOL, "3"]).await;
    let v = h.wait_volume(VOL, "3 replicas, all online", T, settled(3)).await;
    fio.wait_runs(1, T).await;

    let victim =
        v.status.replicas.iter().map(|r| r.node.to_string()).find(|n| n != h.node(nexus)).unwrap();
    h.cli_ok(&["node", "drain", &victim]).await;
    let v = h
        .wait_volume(VOL, &format!("{victim} drained, 3 replicas online"), T, |v| {
            let v = settled(3)(v)?;
            if v.status.replicas.iter().any(|r| r.node.as_str() == victim) {
                Err(format!("a replica is still on {victim}"))
            } else {
                Ok(v)
            }
        })
        .await;
    fio.wait_runs(1, T).await;
    let runs = fio.stop_ok("set-replicas 3→2→3 and drain").await;
    assert_eq!(v.status.target.as_ref().unwrap().node.as_str(), h.node(nexus));
    compare_replicas(&h, VOL).await;
    eprintln!("{runs} fio runs without error through shrink, grow and drain");
}

/// The same guarantee when the old nexus was frozen (SIGSTOP) rather than partitioned: its
/// engine could not be told anything, the volume is republished on host 1 (host 0's replica
/// cannot be claimed: its engine does not answer), a write is queued to the old nexus, and the
/// engine is thawed. The write must fail, and once host 0's replica is back in the volume and
/// rebuilt, every replica must hold the same bytes: nothing the old nexus wrote may survive in
/// its own local replica either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_old_nexus_thawed_after_republish_leaves_no_trace() {
    let (h, uri0) = start(HostsConfig::new(3)).await;
    let opts =
        trireme_nbd::ClientOptions { io_timeout: Duration::from_secs(90), ..Default::default() };
    let old =
        std::sync::Arc::new(trireme_nbd::Client::connect_uri(&uri0, opts.clone()).await.unwrap());
    let block = |byte: u8| trireme_iobuf::IoBuf::copy_from(&vec![byte; 4096]);
    const A: u64 = 10 * MIB;
    const B: u64 = 200 * MIB;
    old.write(A, block(0xaa), false).await.unwrap();
    old.flush().await.unwrap();

    h.signal_engine(0, nix::sys::signal::Signal::SIGSTOP);
    tools_wait_node(&h, 0, trireme_types::NodeState::Offline).await;
    let client = h.client();
    let unpublished = client.unpublish_volume(VOL).await;
    eprintln!("unpublish with the old nexus frozen: {:?}", unpublished.as_ref().map(|v| &v.status));
    let v = republish_on_node1(&h).await;
    let uri1 = v.status.target.as_ref().unwrap().uri.clone();

    // Queue a write to the frozen nexus, then thaw it.
    let o = old.clone();
    let write = tokio::spawn(async move {
        let w = o.write(B, block(0xbb), false).await;
        let f = if w.is_ok() { Some(o.flush().await) } else { None };
        (w, f)
    });
    // Nothing observable says the request sits in the frozen engine's socket; a moment is
    // enough for the kernel to queue it (and if it were not queued yet, the test would only
    // be weaker, not wrong).
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.signal_engine(0, nix::sys::signal::Signal::SIGCONT);
    let (wrote, flushed) = tokio::time::timeout(T, write).await.unwrap().unwrap();
    eprintln!("thawed old nexus: write {wrote:?}, flush {flushed:?}");
    assert!(
        wrote.is_err() || matches!(flushed, Some(Err(_))),
        "the thawed old nexus acknowledged a write and a flush after the volume was republished"
    );
    drop(old);

    // Host 0's replica comes back into the volume (rebuilt), and then all must agree.
    h.wait_all_online(VOL, T).await;
    let new = trireme_nbd::Client::connect_uri(&uri1, opts.clone()).await.unwrap();
    assert!(new.read(A, 4096).await.unwrap().iter().all(|&b| b == 0xaa), "A through the new nexus");
    for r in &h.volume(VOL).await.status.replicas {
        let c = trireme_nbd::Client::connect_uri(&h.replica_uri(r), opts.clone()).await.unwrap();
        let data = c.read(B, 4096).await.unwrap();
        assert!(
            data.iter().all(|&b| b == 0),
            "the replica on {} holds the old nexus's refused write at {B} (starts {:02x?}) after \
             it rejoined the volume",
            r.node,
            &data[..8]
        );
    }
    compare_replicas(&h, VOL).await;
}

/// A replica whose host does not come back within `--replica-replace-secs` is replaced on
/// another host (the replica count is kept) and the new one is rebuilt fully, under fio. The
/// volume is thin and only fio's window was ever written, so the full rebuild, which skips
/// unallocated regions, copies about that window and not the whole volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stays_away_is_replaced_and_rebuilt_fully() {
    let h = Hosts::start(HostsConfig::new(4).control_flag("--replica-replace-secs", "5")).await;
    let v = h.create_volume_with(VOL, SIZE, 3, true).await;
    let holders: Vec<usize> =
        v.status.replicas.iter().map(|r| h.host_of(r.node.as_str())).collect();
    let nexus = holders[0];
    let gone = holders[1];
    let spare = (0..4).find(|i| !holders.contains(i)).unwrap();
    let uri = h.publish(VOL, nexus).await;
    let fio = FioLoop::start(&uri, FIO_OFF, FIO_LEN);
    fio.wait_runs(1, T).await;

    h.cut_link(gone);
    let v = h
        .wait_volume(VOL, &format!("a new replica on {} online", h.node(spare)), T, |v| {
            let t = v.status.target.as_ref().ok_or("no target")?;
            let new = v
                .status
                .replicas
                .iter()
                .find(|r| r.node.as_str() == h.node(spare))
                .ok_or("no replica on the spare host yet")?;
            let c = child(v, &new.id).ok_or("the new replica is not a child yet")?;
            let online = t.children.iter().filter(|c| c.state == ChildState::Online).count();
            match (&c.state, c.last_rebuild, online) {
                (ChildState::Online, Some(info), 3) => Ok((v.clone(), info)),
                (s, info, n) => Err(format!("new child {s:?}, last rebuild {info:?}, {n} online")),
            }
        })
        .await;
    let (v, info) = v;
    fio.wait_runs(1, T).await;
    let runs = fio.stop_ok("replacement of a lost replica").await;
    assert_eq!(info.kind, RebuildKind::Full, "{info:?}");
    assert!(
        info.copied.bytes() > 0 && info.copied.bytes() <= PARTIAL_MAX,
        "a full rebuild of a thin volume with {} MiB written copied {} MiB: it should skip \
         unallocated regions ({info:?})",
        FIO_LEN / MIB,
        info.copied.bytes() / MIB
    );
    assert!(
        !v.status.replicas.iter().any(|r| r.node.as_str() == h.node(gone)),
        "the lost replica is still listed: {}",
        describe_volume(&v)
    );
    assert_eq!(v.status.replicas.len(), 3, "{}", describe_volume(&v));
    eprintln!("replacement: {info:?} after {runs} fio runs");
    compare_replicas(&h, VOL).await;
    h.heal_link(gone);
}

/// A full rebuild interrupted by a restart of the nexus's engine never ends early: after the
/// restart the new replica still needs (and gets) a full rebuild, and all replicas end equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_rebuild_interrupted_by_a_nexus_restart_is_not_declared_done() {
    // A slow rebuild (16 MiB/s: about 16 s for the 256 MiB volume) leaves time to interrupt it.
    let cfg = HostsConfig::new(3).engine_flag("--rebuild-bandwidth-mib", "16");
    let mut h = Hosts::start(cfg).await;
    h.create_volume(VOL, SIZE, 2).await;
    let uri = h.publish(VOL, 0).await;
    // Data everywhere, so a full rebuild has everything to copy.
    let fill = [
        "--name=fill".to_owned(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=write".into(),
        "--bs=1M".into(),
        "--iodepth=8".into(),
        format!("--size={}", SIZE.bytes()),
    ];
    trireme_tests::tools::run_ok("fio", &fill, Duration::from_secs(300)).await;

    h.cli_ok(&["volume", "set-replicas", VOL, "3"]).await;
    let new = h
        .wait_volume(VOL, "the new replica rebuilding, partly copied", T, |v| {
            let t = v.status.target.as_ref().ok_or("no target")?;
            t.children
                .iter()
                .find_map(|c| match c.state {
                    ChildState::Rebuilding { done_bytes, total_bytes }
                        if done_bytes > 0 && done_bytes < total_bytes =>
                    {
                        Some(c.replica)
                    }
                    _ => None,
                })
                .ok_or_else(|| "no child part-way through a rebuild".to_owned())
        })
        .await;
    h.kill9(0);
    h.restart(0).await;
    let info = wait_rebuilt(&h, &new).await;
    assert_eq!(info.kind, RebuildKind::Full, "an interrupted full rebuild became {info:?}");
    eprintln!("rebuild after the interruption: {info:?}");
    compare_replicas(&h, VOL).await;
}

/// Both remote replicas' engines die one after the other: I/O goes on on the last online child
/// without an error, and when both return each is rebuilt partially and all three agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_lost_io_goes_on_with_the_last_one() {
    let (mut h, uri) = start(HostsConfig::new(3)).await;
    let r1 = h.replica_on(VOL, 1).await.id;
    let r2 = h.replica_on(VOL, 2).await.id;
    let fio = FioLoop::start(&uri, FIO_OFF, FIO_LEN);
    fio.wait_runs(1, T).await;
    h.kill9(1);
    wait_faulted(&h, &r1).await;
    fio.wait_runs(1, T).await;
    h.kill9(2);
    wait_faulted(&h, &r2).await;
    fio.wait_runs(2, T).await;
    h.restart(1).await;
    h.restart(2).await;
    let i1 = wait_rebuilt(&h, &r1).await;
    let i2 = wait_rebuilt(&h, &r2).await;
    fio.wait_runs(1, T).await;
    fio.stop_ok("two replicas lost one after the other").await;
    assert_partial(&i1, "first replica back");
    assert_partial(&i2, "second replica back");
    compare_replicas(&h, VOL).await;
}

/// A clean stop of the nexus's engine closes its pools (a final checkpoint) even when control
/// is gone at the same moment, as when `trireme up` stops everything: the engine must not wait
/// on a recorder that cannot answer until it is killed, leaving its pools to journal replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_stopped_while_control_is_down_still_closes_its_pools() {
    let (mut h, uri) = start(HostsConfig::new(3)).await;
    let fio = FioLoop::start(&uri, FIO_OFF, FIO_LEN);
    fio.wait_runs(1, T).await;
    fio.stop_ok("before the stop").await;
    h.kill_control();
    // `trireme up` gives its children 10 s after SIGTERM before it kills them.
    let started = std::time::Instant::now();
    let status = h.stop_engine(0, Duration::from_secs(10)).await;
    eprintln!("the engine stopped in {:?}: {status:?}", started.elapsed());
    let closed = h.engine_log_lines(0, "pool closed");
    assert!(
        status.is_some_and(|s| s.success()) && !closed.is_empty(),
        "SIGTERM to the nexus's engine with control down: exit {status:?} within 10s, \
         'pool closed' logged {} times; its last lines:\n{}",
        closed.len(),
        h.engine_log_lines(0, "")
            .iter()
            .rev()
            .take(15)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
