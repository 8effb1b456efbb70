//! The nexus's I/O behaviour over in-memory children with injected failures.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use trireme_nbd::{Export, ExportError, Extent};
use trireme_types::{ChildState, FaultReason, NexusState, VolumeId};

use super::testing::{MemChild, pattern};
use super::*;

const SIZE: u64 = 64 * 1024;

fn nexus(n: usize) -> (Nexus, Vec<Arc<MemChild>>) {
    let mems: Vec<Arc<MemChild>> = (0..n).map(|_| Arc::new(MemChild::new(SIZE))).collect();
    let children = mems.iter().map(|m| Arc::clone(m) as Arc<dyn Child>).collect();
    (Nexus::new(VolumeId::new_random(), SIZE, children).unwrap(), mems)
}

#[test]
fn construction_is_validated() {
    let small: Arc<dyn Child> = Arc::new(MemChild::new(4096));
    let v = VolumeId::new_random();
    assert_eq!(Nexus::new(v, 4096, vec![]).err(), Some(NexusError::NoChildren));
    assert!(matches!(
        Nexus::new(v, 8192, vec![Arc::clone(&small)]),
        Err(NexusError::ChildTooSmall { size: 4096, needed: 8192, .. })
    ));
    assert!(matches!(
        Nexus::new(v, 4096, vec![Arc::clone(&small), small]),
        Err(NexusError::DuplicateChild { .. })
    ));
}

#[tokio::test]
async fn writes_reach_every_child_and_read_back() {
    let (n, mems) = nexus(3);
    n.write(4096, pattern(8192, 1), false).await.unwrap();
    for m in &mems {
        assert_eq!(m.contents(4096, 8192), pattern(8192, 1).to_vec());
    }
    assert_eq!(n.read(4096, 8192).await.unwrap().to_vec(), pattern(8192, 1).to_vec());
    n.write_zeroes(4096, 4096, false, true).await.unwrap();
    n.trim(8192, 4096, false).await.unwrap();
    n.flush().await.unwrap();
    for m in &mems {
        assert!(m.contents(4096, 8192).iter().all(|&b| b == 0));
    }
}

#[tokio::test]
async fn a_failing_child_is_faulted_and_io_goes_on() {
    let (n, mems) = nexus(2);
    mems[0].fail.store(true, Ordering::SeqCst);
    // The write succeeds on the healthy child; the failing one is faulted.
    n.write(0, pattern(4096, 7), true).await.unwrap();
    assert_eq!(n.state(), NexusState::Degraded);
    let states: Vec<_> = n.children().into_iter().map(|c| c.state).collect();
    assert_eq!(states[0], ChildState::Faulted { reason: FaultReason::IoError });
    assert_eq!(states[1], ChildState::Online);
    // Faulted children get no more writes and serve no reads, even once they answer again.
    mems[0].fail.store(false, Ordering::SeqCst);
    let before = mems[0].writes.load(Ordering::SeqCst);
    n.write(4096, pattern(4096, 8), false).await.unwrap();
    assert_eq!(mems[0].writes.load(Ordering::SeqCst), before);
    assert_eq!(n.read(4096, 4096).await.unwrap().to_vec(), pattern(4096, 8).to_vec());
}

#[tokio::test]
async fn reads_fail_over_to_another_online_child() {
    let (n, mems) = nexus(2);
    n.write(0, pattern(4096, 3), false).await.unwrap();
    mems[0].fail.store(true, Ordering::SeqCst);
    assert_eq!(n.read(0, 4096).await.unwrap().to_vec(), pattern(4096, 3).to_vec());
    assert_eq!(n.state(), NexusState::Degraded);
}

#[tokio::test]
async fn the_last_online_child_returns_its_error_to_the_client() {
    let (n, mems) = nexus(1);
    mems[0].fail.store(true, Ordering::SeqCst);
    assert!(matches!(n.write(0, pattern(512, 1), false).await, Err(ExportError::Io(_))));
    assert!(matches!(n.read(0, 512).await, Err(ExportError::Io(_))));
    assert!(n.flush().await.is_err());
    // It stays online: the error was transient and it is the only copy.
    assert_eq!(n.state(), NexusState::Online);
    mems[0].fail.store(false, Ordering::SeqCst);
    n.write(0, pattern(512, 2), false).await.unwrap();
    assert_eq!(n.read(0, 512).await.unwrap().to_vec(), pattern(512, 2).to_vec());
}

#[tokio::test]
async fn both_children_failing_faults_one_and_errors_the_client() {
    let (n, mems) = nexus(2);
    for m in &mems {
        m.fail.store(true, Ordering::SeqCst);
    }
    assert!(n.write(0, pattern(512, 1), false).await.is_err());
    assert_eq!(n.state(), NexusState::Degraded);
    let online = n.children().iter().filter(|c| c.state == ChildState::Online).count();
    assert_eq!(online, 1);
}

#[tokio::test]
async fn block_status_follows_the_allocation_map() {
    let (n, _mems) = nexus(1);
    n.write(8192, pattern(8192, 1), false).await.unwrap();
    let extents = n.block_status(0, SIZE).await.unwrap();
    assert_eq!(
        extents,
        vec![
            Extent { length: 8192, hole: true, zero: true },
            Extent { length: 8192, hole: false, zero: false },
            Extent { length: SIZE - 16384, hole: true, zero: true },
        ]
    );
    // An unaligned query is clipped to the asked range.
    let extents = n.block_status(4096 + 100, 8192).await.unwrap();
    assert_eq!(extents[0], Extent { length: 4096 - 100, hole: true, zero: true });
    assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), 8192);
}

#[test]
fn extents_from_odd_maps_stay_safe() {
    // A map that does not cover the start answers "allocated" for the whole range.
    let runs = [ChildExtent { offset: 4096, length: 4096, allocated: false }];
    assert_eq!(to_extents(0, 8192, &runs), vec![Extent { length: 8192, hole: false, zero: false }]);
    // A short map ends the reply early but never passes the asked range.
    let runs = [ChildExtent { offset: 0, length: 1 << 20, allocated: false }];
    assert_eq!(to_extents(512, 1024, &runs), vec![Extent { length: 1024, hole: true, zero: true }]);
    assert_eq!(to_extents(0, 10, &[]), vec![Extent { length: 10, hole: false, zero: false }]);
}

#[tokio::test]
async fn resize_grows_only_within_the_children() {
    let (n, _mems) = nexus(1);
    let n2 =
        Nexus::new(VolumeId::new_random(), SIZE / 2, vec![Arc::new(MemChild::new(SIZE))]).unwrap();
    n2.resize(SIZE).unwrap();
    assert_eq!(n2.size(), SIZE);
    n2.resize(SIZE).unwrap();
    assert!(matches!(n2.resize(SIZE * 2), Err(NexusError::ChildTooSmall { .. })));
    assert!(matches!(n2.resize(SIZE / 4), Err(NexusError::Shrink { .. })));
    assert_eq!(n.size(), SIZE);
}

#[tokio::test]
async fn a_closed_nexus_refuses_io() {
    let (n, _mems) = nexus(1);
    n.close().await.unwrap();
    assert_eq!(n.read(0, 512).await.err(), Some(ExportError::ShuttingDown));
    assert_eq!(n.write(0, pattern(512, 0), false).await.err(), Some(ExportError::ShuttingDown));
}

#[tokio::test]
async fn an_added_child_takes_writes_but_serves_no_reads_until_rebuilt() {
    let (n, mems) = nexus(1);
    let n = Arc::new(n);
    let new = Arc::new(MemChild::new(SIZE));
    n.add_child(Arc::clone(&new) as Arc<dyn Child>, Join::Full).unwrap();
    // Idempotent.
    n.add_child(Arc::clone(&new) as Arc<dyn Child>, Join::Full).unwrap();
    assert_eq!(n.children().len(), 2);
    assert!(matches!(
        n.add_child(Arc::new(MemChild::new(SIZE / 2)), Join::Full),
        Err(NexusError::ChildTooSmall { .. })
    ));
    assert_eq!(n.state(), NexusState::Degraded);
    n.write(0, pattern(4096, 9), false).await.unwrap();
    assert_eq!(new.contents(0, 4096), pattern(4096, 9).to_vec());
    // Reads come from the online child only, even if the new one fails.
    new.fail.store(true, Ordering::SeqCst);
    assert_eq!(n.read(0, 4096).await.unwrap().to_vec(), pattern(4096, 9).to_vec());
    // A failing rebuilding child is faulted by the next write, which still succeeds.
    n.write(0, pattern(4096, 1), false).await.unwrap();
    assert!(matches!(n.children()[1].state, ChildState::Faulted { .. }));
    assert!(matches!(
        n.remove_child(mems[0].replica_id()),
        Err(NexusError::LastOnlineChild { .. })
    ));
    n.remove_child(new.replica_id()).unwrap();
    n.remove_child(new.replica_id()).unwrap();
    assert_eq!(n.state(), NexusState::Online);
}

const MIB: u64 = 1 << 20;

/// Two children large enough for several dirty-log regions (1 MiB each).
fn large_nexus() -> (Nexus, Vec<Arc<MemChild>>) {
    let mems: Vec<Arc<MemChild>> = (0..2).map(|_| Arc::new(MemChild::new(8 * MIB))).collect();
    let children = mems.iter().map(|m| Arc::clone(m) as Arc<dyn Child>).collect();
    (Nexus::new(VolumeId::new_random(), 8 * MIB, children).unwrap(), mems)
}

#[tokio::test]
async fn a_faulting_child_logs_what_it_acknowledged_since_the_last_flush() {
    let (n, mems) = large_nexus();
    n.write(0, pattern(4096, 1), false).await.unwrap();
    n.flush().await.unwrap();
    // After the flush: a plain write (a crashing replica may lose it) and a FUA one (durable
    // once acknowledged).
    n.write(2 * MIB, pattern(4096, 2), false).await.unwrap();
    n.write(4 * MIB, pattern(4096, 3), true).await.unwrap();
    assert!(n.dirty_log().is_empty(), "nothing is logged while every child is online");
    // The child fails a later write and is faulted.
    mems[0].fail.store(true, Ordering::SeqCst);
    n.write(6 * MIB, pattern(4096, 4), false).await.unwrap();
    assert_eq!(n.dirty_log().iter().collect::<Vec<_>>(), vec![2, 6]);
}

#[tokio::test]
async fn a_child_that_fails_a_flush_logs_the_writes_it_held() {
    let (n, mems) = large_nexus();
    n.write(3 * MIB, pattern(4096, 1), false).await.unwrap();
    mems[1].fail.store(true, Ordering::SeqCst);
    n.flush().await.unwrap();
    let states: Vec<_> = n.children().into_iter().map(|c| c.state).collect();
    assert_eq!(states[1], ChildState::Faulted { reason: FaultReason::IoError });
    assert_eq!(n.dirty_log().iter().collect::<Vec<_>>(), vec![3]);
}
