//! Rebuilds over in-memory children: what they copy, that racing writes never leave the
//! target different from its source, and that only online children feed them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use trireme_nbd::Export;
use trireme_types::ChildState;

use super::testing::{MemChild, TestRecorder, eventually, pattern, started};
use super::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

fn mem() -> Arc<MemChild> {
    Arc::new(MemChild::new(SIZE))
}

fn unlimited() -> Arc<RebuildLimits> {
    Arc::new(RebuildLimits::default())
}

fn info(n: &Nexus, replica: ReplicaId) -> ChildInfo {
    n.children().into_iter().find(|c| c.replica == replica).unwrap()
}

async fn until_online(n: &Nexus, c: &MemChild) -> RebuildSummary {
    eventually("the rebuild", || info(n, c.replica_id()).state == ChildState::Online).await;
    info(n, c.replica_id()).last_rebuild.unwrap()
}

/// Fills whole regions of `c` with data derived from `seed`.
fn fill(c: &MemChild, regions: &[u64], seed: u8) {
    for &r in regions {
        c.poke(r * MIB, &pattern(MIB as usize, seed.wrapping_add(r as u8)));
    }
}

#[tokio::test]
async fn a_partial_rebuild_copies_exactly_the_dirty_regions() {
    let (source, target) = (mem(), mem());
    // Both hold the same data everywhere, except that the target missed regions 1 and 5.
    fill(&source, &(0..8).collect::<Vec<_>>(), 1);
    fill(&target, &(0..8).collect::<Vec<_>>(), 1);
    fill(&target, &[1, 5], 99);
    let mut dirty = DirtyLog::new(MIB);
    dirty.set(1);
    dirty.set(5);
    let recorder = Arc::new(TestRecorder::default());
    let n = started(
        SIZE,
        &[(source.clone(), Join::Online), (target.clone(), Join::Partial)],
        recorder.clone(),
        dirty,
        unlimited(),
    )
    .await;
    let summary = until_online(&n, &target).await;
    assert_eq!(summary.kind, Join::Partial);
    assert_eq!(summary.copied_bytes, 2 * MIB, "exactly the two dirty regions");
    assert!(target.all() == source.all(), "the target equals its source");
    assert_eq!(n.rebuild_bytes_total(), 2 * MIB);
    // The record that turned it online carries the summary, and clears the log.
    n.recorded().await.unwrap();
    let records = recorder.records.lock().clone();
    let online = records.iter().find(|r| r.children[1].state == ChildState::Online).unwrap();
    assert_eq!(online.children[1].rebuilt, Some(summary));
    assert!(online.clear_dirty);
    assert!(n.dirty_log().is_empty());
}

#[tokio::test]
async fn a_full_rebuild_copies_allocated_data_and_zeroes_holes() {
    let (source, target) = (mem(), mem());
    source.poke(64 * 1024, &pattern(64 * 1024, 3));
    source.poke(5 * MIB, &pattern(MIB as usize, 4));
    // A reused replica: garbage everywhere, which must not survive.
    target.poke(0, &vec![0xee; SIZE as usize]);
    let n = started(
        SIZE,
        &[(source.clone(), Join::Online), (target.clone(), Join::Full)],
        Arc::new(TestRecorder::default()),
        DirtyLog::default(),
        unlimited(),
    )
    .await;
    let summary = until_online(&n, &target).await;
    assert_eq!(summary.kind, Join::Full);
    assert_eq!(summary.copied_bytes, source.allocated_bytes(), "holes are not copied");
    assert_eq!(summary.copied_bytes, 64 * 1024 + MIB);
    assert!(target.all() == source.all());
    assert_eq!(target.allocated_bytes(), source.allocated_bytes(), "holes trimmed on the target");
}

#[tokio::test]
async fn a_child_added_after_a_fault_rebuilds_what_it_missed() {
    let (a, b) = (mem(), mem());
    let recorder = Arc::new(TestRecorder::default());
    let n = started(
        SIZE,
        &[(a.clone(), Join::Online), (b.clone(), Join::Online)],
        recorder.clone(),
        DirtyLog::default(),
        unlimited(),
    )
    .await;
    n.write(0, pattern(MIB as usize, 1), false).await.unwrap();
    // Flushed: only what the child misses from here on is to rebuild.
    n.flush().await.unwrap();
    b.fail.store(true, Ordering::SeqCst);
    n.write(2 * MIB, pattern(MIB as usize, 2), false).await.unwrap();
    n.write(6 * MIB + 512, pattern(4096, 3), false).await.unwrap();
    assert!(matches!(info(&n, b.replica_id()).state, ChildState::Faulted { .. }));
    assert_eq!(info(&n, b.replica_id()).needs, Some(Join::Partial));
    b.fail.store(false, Ordering::SeqCst);
    n.add_child(b.clone(), Join::Partial).unwrap();
    let summary = until_online(&n, &b).await;
    // Region 2 fully, and the one 4 KiB block written in region 6 (the rest of it is a hole).
    assert_eq!(summary.copied_bytes, MIB + 8192);
    assert!(a.all() == b.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writes_never_leave_the_target_different_from_the_source() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..6 {
        let (source, target) = (mem(), mem());
        fill(&source, &[0, 2, 3, 7], round);
        target.poke(MIB, &vec![0xaa; 3 * MIB as usize]);
        // Slow reads stretch the rebuild so the writes really race it.
        source.read_delay_us.store(2_000, Ordering::SeqCst);
        let (kind, dirty) = if round % 2 == 0 {
            (Join::Full, DirtyLog::default())
        } else {
            // Partial: the target is current except for the logged regions.
            let mut d = DirtyLog::new(MIB);
            for r in [1, 2, 3] {
                d.set(r);
            }
            target.poke(0, &source.contents(0, MIB as usize));
            target.poke(4 * MIB, &source.contents(4 * MIB, 4 * MIB as usize));
            (Join::Partial, d)
        };
        let n = started(
            SIZE,
            &[(source.clone(), Join::Online), (target.clone(), kind)],
            Arc::new(TestRecorder::default()),
            dirty,
            unlimited(),
        )
        .await;
        let writers: Vec<_> = (0..3)
            .map(|w| {
                let n = Arc::clone(&n);
                let seed: u64 = rng.random();
                let target = Arc::clone(&target);
                tokio::spawn(async move {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                    let mut ops = 0;
                    while info(&n, target.replica_id()).state != ChildState::Online || ops < 20 {
                        // Concurrent overlapping writes may land in different orders on
                        // different children (their result is undefined for any block
                        // device), so each writer owns every third 384 KiB chunk: chunks
                        // straddle region boundaries, and writers never overlap.
                        const CHUNK: u64 = 384 * 1024;
                        let chunk = rng.random_range(0..SIZE / CHUNK / 3) * 3 + u64::from(w);
                        let first = rng.random_range(0..CHUNK / 4096);
                        let blocks = rng.random_range(1..=CHUNK / 4096 - first);
                        let (offset, len) = (chunk * CHUNK + first * 4096, blocks * 4096);
                        match rng.random_range(0..6) {
                            0 => n.trim(offset, len, false).await.unwrap(),
                            1 => n.write_zeroes(offset, len, rng.random(), false).await.unwrap(),
                            _ => {
                                let data = pattern(len as usize, rng.random::<u8>() ^ w);
                                n.write(offset, data, false).await.unwrap();
                            }
                        }
                        ops += 1;
                        // In-memory children never yield; real ones do.
                        tokio::task::yield_now().await;
                    }
                    ops
                })
            })
            .collect();
        for w in writers {
            assert!(w.await.unwrap() >= 20);
        }
        until_online(&n, &target).await;
        let (s, t) = (source.all(), target.all());
        if let Some(first) = s.iter().zip(&t).position(|(a, b)| a != b) {
            panic!("round {round} ({kind:?}): target differs from source at byte {first}");
        }
    }
}

#[tokio::test]
async fn a_faulted_child_is_never_a_rebuild_source_or_a_reader() {
    let (good, stale, target) = (Arc::new(MemChild::remote(SIZE)), mem(), mem());
    good.poke(0, &pattern(2 * MIB as usize, 5));
    stale.poke(0, &vec![0x55; 2 * MIB as usize]);
    let n = started(
        SIZE,
        &[(good.clone(), Join::Online), (stale.clone(), Join::Online)],
        Arc::new(TestRecorder::default()),
        DirtyLog::default(),
        unlimited(),
    )
    .await;
    // The local child is read first; it fails once and is out for good, even once it
    // answers again.
    stale.fail.store(true, Ordering::SeqCst);
    assert_eq!(n.read(0, 4096).await.unwrap().to_vec(), pattern(4096, 5).to_vec());
    stale.fail.store(false, Ordering::SeqCst);
    let reads = stale.reads.load(Ordering::SeqCst);
    n.add_child(target.clone(), Join::Full).unwrap();
    until_online(&n, &target).await;
    assert_eq!(n.read(0, 4096).await.unwrap().to_vec(), pattern(4096, 5).to_vec());
    assert!(target.all() == good.all());
    assert_eq!(stale.reads.load(Ordering::SeqCst), reads, "no read from a faulted child");
    assert!(matches!(info(&n, stale.replica_id()).state, ChildState::Faulted { .. }));
}

#[tokio::test]
async fn a_rebuild_whose_target_fails_leaves_it_faulted_with_its_need() {
    let (source, target) = (mem(), mem());
    fill(&source, &[0, 1], 1);
    source.read_delay_us.store(50_000, Ordering::SeqCst);
    let n = started(
        SIZE,
        &[(source.clone(), Join::Online), (target.clone(), Join::Full)],
        Arc::new(TestRecorder::default()),
        DirtyLog::default(),
        unlimited(),
    )
    .await;
    target.fail.store(true, Ordering::SeqCst);
    eventually("the fault", || {
        matches!(info(&n, target.replica_id()).state, ChildState::Faulted { .. })
    })
    .await;
    assert_eq!(info(&n, target.replica_id()).needs, Some(Join::Full), "still needs a full copy");
    assert_eq!(info(&n, target.replica_id()).last_rebuild, None);
}

#[tokio::test]
async fn the_bandwidth_limit_slows_a_rebuild() {
    let run = |limits: Arc<RebuildLimits>| async move {
        let (source, target) = (mem(), mem());
        fill(&source, &[0, 1], 1);
        let begun = Instant::now();
        let n = started(
            SIZE,
            &[(source.clone(), Join::Online), (target.clone(), Join::Full)],
            Arc::new(TestRecorder::default()),
            DirtyLog::default(),
            limits,
        )
        .await;
        let summary = until_online(&n, &target).await;
        assert_eq!(summary.copied_bytes, 2 * MIB);
        begun.elapsed()
    };
    let limited = run(Arc::new(RebuildLimits::new(1, 2))).await;
    // 2 MiB at 1 MiB/s with a quarter second of burst: at least 1.75 s.
    assert!(limited >= Duration::from_millis(1500), "took {limited:?}");
    let free = run(unlimited()).await;
    assert!(free < limited, "unlimited {free:?} vs limited {limited:?}");
}

#[tokio::test]
async fn the_concurrency_limit_queues_rebuilds_across_nexuses() {
    let limits = Arc::new(RebuildLimits::new(0, 1));
    let mut nexuses = Vec::new();
    for _ in 0..2 {
        let (source, target) = (mem(), mem());
        fill(&source, &[0], 1);
        source.read_delay_us.store(1_500_000, Ordering::SeqCst);
        let n = started(
            SIZE,
            &[(source, Join::Online), (target.clone(), Join::Full)],
            Arc::new(TestRecorder::default()),
            DirtyLog::default(),
            Arc::clone(&limits),
        )
        .await;
        nexuses.push((n, target));
    }
    // While one copies, the other has not started (no total yet).
    let started_count = || {
        nexuses
            .iter()
            .filter(|(n, t)| match info(n, t.replica_id()).state {
                ChildState::Rebuilding { total_bytes, .. } => total_bytes > 0,
                ChildState::Online => true,
                ChildState::Faulted { .. } => false,
            })
            .count()
    };
    eventually("one rebuild running", || started_count() == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(started_count(), 1, "the second rebuild waits for a permit");
    for (n, t) in &nexuses {
        until_online(n, t).await;
    }
}

#[tokio::test]
async fn removing_or_closing_cancels_a_rebuild() {
    let (source, target) = (mem(), mem());
    fill(&source, &(0..8).collect::<Vec<_>>(), 1);
    let recorder = Arc::new(TestRecorder::default());
    let n = started(
        SIZE,
        &[(source.clone(), Join::Online), (target.clone(), Join::Full)],
        recorder.clone(),
        DirtyLog::default(),
        Arc::new(RebuildLimits::new(1, 2)),
    )
    .await;
    eventually("copying", || target.writes.load(Ordering::SeqCst) > 0).await;
    n.remove_child(target.replica_id()).unwrap();
    assert!(!n.has_child(target.replica_id()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let writes = target.writes.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(target.writes.load(Ordering::SeqCst), writes, "the rebuild stopped");
    // Added again and closed mid-way: close returns promptly and records a clean shutdown.
    n.add_child(target.clone(), Join::Full).unwrap();
    eventually("copying again", || target.writes.load(Ordering::SeqCst) > writes).await;
    tokio::time::timeout(Duration::from_secs(10), n.close()).await.unwrap().unwrap();
    let record = recorder.last_record().unwrap();
    assert!(record.clean_shutdown);
    assert!(!record.clear_dirty, "the target was still rebuilding");
    assert_eq!(record.children[1].needs, Some(Join::Full));
}

#[tokio::test]
async fn a_rebuild_goes_on_from_another_online_child_when_its_source_fails() {
    // Many more regions than a rebuild copies at once, so most are still to come when the
    // first source fails.
    const BIG: u64 = 32 * MIB;
    let (first, second, target) = (
        Arc::new(MemChild::new(BIG)),
        Arc::new(MemChild::remote(BIG)),
        Arc::new(MemChild::new(BIG)),
    );
    for c in [&first, &second] {
        fill(c, &(0..32).collect::<Vec<_>>(), 9);
    }
    first.read_delay_us.store(100_000, Ordering::SeqCst);
    let n = started(
        BIG,
        &[(first.clone(), Join::Online), (second.clone(), Join::Online)],
        Arc::new(TestRecorder::default()),
        DirtyLog::default(),
        unlimited(),
    )
    .await;
    n.add_child(target.clone(), Join::Full).unwrap();
    eventually("copying from the local child", || target.writes.load(Ordering::SeqCst) > 0).await;
    first.fail.store(true, Ordering::SeqCst);
    let summary = until_online(&n, &target).await;
    assert!(matches!(info(&n, first.replica_id()).state, ChildState::Faulted { .. }));
    assert_eq!(summary.copied_bytes, BIG, "every region copied once, from one source or the other");
    assert!(target.all() == second.all());
}

#[tokio::test]
async fn a_stopped_nexus_stops_its_rebuilds() {
    let (source, other, target) = (mem(), mem(), mem());
    fill(&source, &(0..8).collect::<Vec<_>>(), 1);
    source.read_delay_us.store(100_000, Ordering::SeqCst);
    let recorder = Arc::new(TestRecorder::default());
    let n = started(
        SIZE,
        &[(source.clone(), Join::Online), (other.clone(), Join::Online)],
        recorder.clone(),
        DirtyLog::default(),
        unlimited(),
    )
    .await;
    n.add_child(target.clone(), Join::Full).unwrap();
    eventually("copying", || target.writes.load(Ordering::SeqCst) > 0).await;
    // A fault whose record control refuses: a newer nexus owns the volume.
    *recorder.fail.lock() = Some(RecordError::Fenced("epoch 8".to_owned()));
    other.fail.store(true, Ordering::SeqCst);
    assert!(n.write(0, pattern(4096, 1), false).await.is_err());
    assert!(n.stopped_reason().is_some());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let writes = target.writes.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(target.writes.load(Ordering::SeqCst), writes, "the rebuild stopped");
    assert!(matches!(info(&n, target.replica_id()).state, ChildState::Rebuilding { .. }));
}

#[tokio::test]
async fn a_write_still_in_flight_to_a_faulted_child_is_not_missed_by_its_partial_rebuild() {
    let (old, good) = (mem(), mem());
    let n = started(
        SIZE,
        &[(old.clone(), Join::Online), (good.clone(), Join::Online)],
        Arc::new(TestRecorder::default()),
        DirtyLog::default(),
        unlimited(),
    )
    .await;
    // Issued while every child is online (nothing logged), slow to fail on `old`.
    old.write_delay_us.store(500_000, Ordering::SeqCst);
    let write = tokio::spawn({
        let n = Arc::clone(&n);
        async move { n.write(2 * MIB, pattern(4096, 8), false).await }
    });
    eventually("the write on the good child", || good.writes.load(Ordering::SeqCst) > 0).await;
    // Meanwhile the child is faulted by a read and re-opened (a new instance) as partial.
    old.fail.store(true, Ordering::SeqCst);
    assert_eq!(n.read(2 * MIB, 4096).await.unwrap().to_vec(), pattern(4096, 8).to_vec());
    let reopened = Arc::new(MemChild::with_id(SIZE, old.replica_id()));
    n.add_child(reopened.clone(), Join::Partial).unwrap();
    write.await.unwrap().unwrap();
    // The late failure of the old instance neither faults the new one nor escapes the log.
    let summary = until_online(&n, &reopened).await;
    assert_eq!(summary.kind, Join::Partial);
    assert_eq!(summary.copied_bytes, 4096);
    assert!(reopened.all() == good.all());
}
