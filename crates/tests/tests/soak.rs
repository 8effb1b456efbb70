//! The long randomised form of the replication fault tests: round after round, a random fault
//! (SIGKILL a replica's engine, cut a replica host's link, SIGKILL the nexus's engine, or kill
//! every engine and restart them in a random order) hits a 3-replica volume while the checker
//! writes; after each round everything is brought back, every child must come back online,
//! and the checker must find no acknowledged-and-flushed write lost. It reports how many
//! rounds it survived.
//!
//! Not part of the normal run (`#[ignore]`): `bench/soak.sh` runs it, with
//! `TRIREME_SOAK_ROUNDS` (default 20) and `TRIREME_SOAK_SEED` (default: random, printed).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use trireme_tests::ByteSize;
use trireme_tests::hosts::workload::{CheckerLoop, checker_verify, compare_replicas};
use trireme_tests::hosts::{Hosts, HostsConfig, describe_volume};
use trireme_types::ChildState;

const VOL: &str = "soak";
const T: Duration = Duration::from_secs(180);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long randomised soak; run by bench/soak.sh"]
async fn soak_random_fault_rounds() {
    let rounds = env_u64("TRIREME_SOAK_ROUNDS").unwrap_or(20);
    let seed = env_u64("TRIREME_SOAK_SEED").unwrap_or_else(|| rand::rng().random());
    eprintln!("soak: {rounds} rounds, seed {seed} (TRIREME_SOAK_SEED={seed} repeats them)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut h = Hosts::start(HostsConfig::new(3)).await;
    h.create_volume(VOL, ByteSize::mib(256), 3).await;
    let uri = h.publish(VOL, 0).await;
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("checker.log");
    let started = Instant::now();

    for round in 1..=rounds {
        let ck = CheckerLoop::start(&uri, &log, 16_384);
        ck.wait_flushes(10, T).await;
        let fault = rng.random_range(0..4u8);
        let replica_host = rng.random_range(1..3usize);
        let victim = h.replica_on(VOL, replica_host).await.id;
        let since = h.last_event().await;
        let what = match fault {
            0 => {
                h.kill9(replica_host);
                wait_faulted(&h, &victim).await;
                ck.wait_flushes(10, T).await;
                h.restart(replica_host).await;
                format!("SIGKILL host {replica_host}")
            }
            1 => {
                h.cut_link(replica_host);
                wait_faulted(&h, &victim).await;
                let d = rng.random_range(1..8u64);
                // Writes go on during the outage; the outage lasts a random number of flushes.
                ck.wait_flushes(10 * d as u32, T).await;
                h.heal_link(replica_host);
                format!("link of host {replica_host} cut for {d}0 flushes")
            }
            2 => {
                h.kill9(0);
                h.restart(0).await;
                "SIGKILL the nexus host".to_owned()
            }
            _ => {
                let mut order = vec![0usize, 1, 2];
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.random_range(0..=i));
                }
                for i in [2, 1, 0] {
                    h.kill9(i);
                }
                for &i in &order {
                    h.restart(i).await;
                }
                format!("kill all, restart in order {order:?}")
            }
        };
        let s = ck.stop().await;
        h.wait_volume(VOL, "every child online", T, |v| {
            let t = v.status.target.as_ref().ok_or("no target")?;
            let online = t.children.iter().filter(|c| c.state == ChildState::Online).count();
            if online == 3 { Ok(()) } else { Err(format!("{online} online")) }
        })
        .await;
        if fault < 2 {
            // The status may still show the old picture for a moment: wait for the rebuild's
            // event, then for every child online again.
            let rid = victim.to_string();
            trireme_tests::tools::wait_for("the returning replica's rebuild", T, || async {
                let events = h.events_after(since).await;
                if events.iter().any(|e| e.reason == "rebuild_finished" && e.message.contains(&rid))
                {
                    Ok(())
                } else {
                    Err("no rebuild_finished event for it yet".to_owned())
                }
            })
            .await;
            h.wait_volume(VOL, "every child online", T, |v| {
                let t = v.status.target.as_ref().ok_or("no target")?;
                let online = t.children.iter().filter(|c| c.state == ChildState::Online).count();
                if online == 3 { Ok(()) } else { Err(format!("{online} online")) }
            })
            .await;
        }
        let summary = checker_verify(&uri, &log).await;
        if fault < 2 {
            // The nexus never went down: the rebuilt replica must equal the others. (After a
            // nexus crash, writes in flight may differ between replicas; decision 0001.)
            compare_replicas(&h, VOL).await;
        }
        let v = h.volume(VOL).await;
        eprintln!(
            "round {round}/{rounds} ({:.0}s): {what}; checker {} acks, {} flushes, ended by {:?}; {summary}; {}",
            started.elapsed().as_secs_f64(),
            s.writes_acked,
            s.flushes,
            s.ended_by,
            describe_volume(&v)
        );
    }
    eprintln!(
        "soak: survived {rounds} fault rounds in {:.0}s (seed {seed})",
        started.elapsed().as_secs_f64()
    );
}

async fn wait_faulted(h: &Hosts, r: &trireme_types::ReplicaId) {
    h.wait_volume(VOL, &format!("child {r} faulted"), T, |v| {
        let t = v.status.target.as_ref().ok_or("no target")?;
        match t.children.iter().find(|c| &c.replica == r).map(|c| &c.state) {
            Some(ChildState::Faulted { .. }) => Ok(()),
            other => Err(format!("child is {other:?}")),
        }
    })
    .await
}
