//! The nexus and its recorder: nothing acknowledged on unrecorded state, the dirty-region log
//! recorded before I/O, and a nexus that stops when it cannot record or is fenced.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use trireme_nbd::Export;
use trireme_types::{ChildState, FaultReason, VolumeId};

use super::testing::{Event, MemChild, TestRecorder, eventually, pattern, started};
use super::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;

fn mems(n: usize) -> Vec<Arc<MemChild>> {
    (0..n).map(|_| Arc::new(MemChild::new(SIZE))).collect()
}

fn online(mems: &[Arc<MemChild>]) -> Vec<(Arc<MemChild>, Join)> {
    mems.iter().map(|m| (Arc::clone(m), Join::Online)).collect()
}

async fn nexus(mems: &[Arc<MemChild>], recorder: &Arc<TestRecorder>) -> Arc<Nexus> {
    let limits = Arc::new(RebuildLimits::default());
    started(SIZE, &online(mems), Arc::clone(recorder), DirtyLog::default(), limits).await
}

#[tokio::test]
async fn start_records_the_initial_membership_before_returning() {
    let recorder = Arc::new(TestRecorder::default());
    let m = mems(2);
    let children = vec![
        NewChild::opened(Arc::clone(&m[0]) as Arc<dyn Child>, Join::Online),
        NewChild::unopened(
            ChildUri::Local(m[1].replica_id()),
            m[1].replica_id(),
            Join::Partial,
            FaultReason::Missing,
        ),
    ];
    let config = NexusConfig {
        epoch: 9,
        generation: 4,
        recorder: recorder.clone(),
        dirty: DirtyLog::default(),
        rebuild: Arc::new(RebuildLimits::default()),
    };
    let n = Nexus::create(VolumeId::new_random(), SIZE, children, config).unwrap();
    assert_eq!((n.epoch(), n.generation()), (9, 4));
    recorder.hold();
    let starting = tokio::spawn({
        let n = Arc::clone(&n);
        async move { n.start().await }
    });
    eventually("the recorder call", || recorder.calls.load(Ordering::SeqCst) > 0).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!starting.is_finished(), "start waits for the record");
    recorder.release();
    starting.await.unwrap().unwrap();
    let record = recorder.last_record().unwrap();
    assert_eq!(record.epoch, 9);
    assert!(!record.clear_dirty, "a child is out: the log must stay");
    assert_eq!(record.children[1].state, ChildState::Faulted { reason: FaultReason::Missing });
    assert_eq!(record.children[1].needs, Some(Join::Partial));
    assert_eq!(n.generation(), 1, "the store's reply");
    // The unopened child is listed with what it needs.
    let info = &n.children()[1];
    assert_eq!((info.replica, info.needs), (m[1].replica_id(), Some(Join::Partial)));
}

#[test]
fn creation_needs_an_open_current_child() {
    let m = mems(2);
    let children = vec![
        NewChild::unopened(
            ChildUri::Local(m[0].replica_id()),
            m[0].replica_id(),
            Join::Online,
            FaultReason::Disconnected,
        ),
        NewChild::opened(Arc::clone(&m[1]) as Arc<dyn Child>, Join::Full),
    ];
    let err = Nexus::create(VolumeId::new_random(), SIZE, children, NexusConfig::standalone());
    assert_eq!(err.err(), Some(NexusError::NoCurrentChild));
    let children = vec![NewChild::opened(Arc::clone(&m[0]) as Arc<dyn Child>, Join::Online)];
    let config =
        NexusConfig { dirty: DirtyLog::from_bytes(0, vec![1]), ..NexusConfig::standalone() };
    let err = Nexus::create(VolumeId::new_random(), SIZE, children, config);
    assert_eq!(err.err(), Some(NexusError::InvalidDirtyLog));
    let children = vec![NewChild::opened(Arc::clone(&m[0]) as Arc<dyn Child>, Join::Online)];
    let config = NexusConfig { dirty: DirtyLog::new(1000), ..NexusConfig::standalone() };
    let err = Nexus::create(VolumeId::new_random(), SIZE, children, config);
    assert_eq!(err.err(), Some(NexusError::InvalidDirtyLog));
}

/// Runs `op` with the recorder held; asserts it is not acknowledged until released.
async fn held_until_released<F>(recorder: &Arc<TestRecorder>, op: F)
where
    F: Future<Output = Result<(), trireme_nbd::ExportError>> + Send + 'static,
{
    recorder.hold();
    let calls = recorder.calls.load(Ordering::SeqCst);
    let op = tokio::spawn(op);
    eventually("a recorder call", || recorder.calls.load(Ordering::SeqCst) > calls).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!op.is_finished(), "acknowledged before the recorder returned");
    recorder.release();
    op.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_flush_or_write_that_faults_a_child_is_not_acknowledged_before_the_record() {
    let recorder = Arc::new(TestRecorder::default());
    let m = mems(3);
    let n = nexus(&m, &recorder).await;
    // A flush has no regions to mark: only the membership record holds it.
    m[2].fail.store(true, Ordering::SeqCst);
    let n2 = Arc::clone(&n);
    held_until_released(&recorder, async move { n2.flush().await }).await;
    let record = recorder.last_record().unwrap();
    assert!(matches!(record.children[2].state, ChildState::Faulted { .. }));
    // A write: by the time of the acknowledgement the store knows the child is out.
    m[1].fail.store(true, Ordering::SeqCst);
    let n2 = Arc::clone(&n);
    held_until_released(&recorder, async move { n2.write(0, pattern(4096, 1), false).await }).await;
    let record = recorder.last_record().unwrap();
    assert!(matches!(record.children[1].state, ChildState::Faulted { .. }));
    // A write with nothing new to record does not wait for the recorder.
    recorder.hold();
    tokio::time::timeout(Duration::from_secs(10), n.write(0, pattern(4096, 2), false))
        .await
        .expect("the fast path does not wait")
        .unwrap();
    recorder.release();
}

#[tokio::test]
async fn a_recorder_failure_stops_the_nexus() {
    let recorder = Arc::new(TestRecorder::default());
    let m = mems(2);
    let n = nexus(&m, &recorder).await;
    *recorder.fail.lock() = Some(RecordError::Unavailable("store down".to_owned()));
    m[1].fail.store(true, Ordering::SeqCst);
    assert!(n.write(0, pattern(4096, 1), false).await.is_err());
    let reason = n.stopped_reason().unwrap();
    assert!(reason.contains("store down"), "{reason}");
    // Everything fails from now on, even on the healthy child.
    *recorder.fail.lock() = None;
    m[1].fail.store(false, Ordering::SeqCst);
    assert!(n.read(0, 4096).await.is_err());
    assert!(n.write(0, pattern(4096, 1), false).await.is_err());
    assert!(n.flush().await.is_err());
    assert!(matches!(
        n.add_child(Arc::new(MemChild::new(SIZE)), Join::Full),
        Err(NexusError::Stopped(_))
    ));
}

#[tokio::test]
async fn a_fenced_reply_from_control_stops_the_nexus() {
    let recorder = Arc::new(TestRecorder::default());
    let m = mems(2);
    let n = nexus(&m, &recorder).await;
    *recorder.fail.lock() = Some(RecordError::Fenced("epoch 8 > 7".to_owned()));
    m[0].fail.store(true, Ordering::SeqCst);
    assert!(n.write(0, pattern(4096, 1), false).await.is_err());
    assert!(n.stopped_reason().unwrap().contains("fenced"));
    assert!(n.read(0, 512).await.is_err());
}

#[tokio::test]
async fn a_fenced_child_stops_the_nexus_without_faulting_it() {
    let recorder = Arc::new(TestRecorder::default());
    let m = mems(2);
    let n = nexus(&m, &recorder).await;
    *m[1].fail_with.lock() = Some(ChildError::Fenced("epoch 8".to_owned()));
    assert!(n.write(0, pattern(4096, 1), false).await.is_err());
    assert!(n.stopped_reason().unwrap().contains("fenced"));
    assert!(n.children().iter().all(|c| c.state == ChildState::Online));
    assert!(n.read(0, 512).await.is_err(), "the healthy child serves nothing either");
    // Reads see it too.
    let m = mems(1);
    let n = nexus(&m, &recorder).await;
    *m[0].fail_with.lock() = Some(ChildError::Fenced("epoch 8".to_owned()));
    assert!(n.read(0, 512).await.is_err());
    assert!(n.stopped_reason().is_some());
}

#[tokio::test]
async fn regions_are_recorded_dirty_before_io_reaches_the_children_while_degraded() {
    let recorder = Arc::new(TestRecorder::default());
    let m = mems(2);
    let n = nexus(&m, &recorder).await;
    // Healthy: no marking at all. (Flushed, so that the fault below has no unflushed write
    // to log.)
    n.write(MIB, pattern(4096, 1), false).await.unwrap();
    n.flush().await.unwrap();
    assert!(recorder.marks.lock().is_empty());
    m[1].fail.store(true, Ordering::SeqCst);
    n.write(0, pattern(4096, 1), false).await.unwrap();
    assert!(matches!(n.children()[1].state, ChildState::Faulted { .. }));
    for c in &m {
        *c.journal.lock() = Some(Arc::clone(&recorder.journal));
    }
    recorder.journal.take();
    // A write spanning regions 1 and 2, then a trim and write_zeroes in region 3.
    n.write(2 * MIB - 4096, pattern(8192, 2), false).await.unwrap();
    n.trim(3 * MIB, 4096, false).await.unwrap();
    n.write_zeroes(3 * MIB + 4096, 4096, false, false).await.unwrap();
    let events = recorder.journal.take();
    let first_io = events.iter().position(|e| matches!(e, Event::Io { .. })).unwrap();
    assert_eq!(events[..first_io], [Event::Marked(vec![1, 2])], "marked first: {events:?}");
    let marked_3 = events.iter().position(|e| *e == Event::Marked(vec![3])).unwrap();
    let io_3 = events
        .iter()
        .position(|e| matches!(e, Event::Io { offset, .. } if *offset == 3 * MIB))
        .unwrap();
    assert!(marked_3 < io_3, "{events:?}");
    // Marked once: a second write to a recorded region goes straight to the children.
    n.write(MIB, pattern(4096, 3), false).await.unwrap();
    assert!(recorder.journal.take().iter().all(|e| matches!(e, Event::Io { .. })));
    let log = n.dirty_log();
    assert_eq!(log.iter().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
}

#[tokio::test]
async fn concurrent_writers_share_dirty_marks() {
    let recorder = Arc::new(TestRecorder::default());
    let m = mems(2);
    let n = nexus(&m, &recorder).await;
    m[1].fail.store(true, Ordering::SeqCst);
    n.write(0, pattern(512, 1), false).await.unwrap();
    recorder.hold();
    let calls = recorder.calls.load(Ordering::SeqCst);
    // One writer's mark is in flight; three more queue behind it and share the next call.
    let first = tokio::spawn({
        let n = Arc::clone(&n);
        async move { n.write(MIB, pattern(512, 1), false).await }
    });
    eventually("the first mark", || recorder.calls.load(Ordering::SeqCst) > calls).await;
    let rest: Vec<_> = (2..5u64)
        .map(|r| {
            let n = Arc::clone(&n);
            tokio::spawn(async move { n.write(r * MIB % SIZE, pattern(512, 1), false).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    recorder.release();
    first.await.unwrap().unwrap();
    for w in rest {
        w.await.unwrap().unwrap();
    }
    let marks = recorder.marks.lock().clone();
    assert!(marks.len() <= 3, "writers share calls: {marks:?}");
    assert_eq!(n.dirty_log().count(), 4);
}

#[tokio::test]
async fn a_write_failing_on_a_child_records_its_regions_before_the_acknowledgement() {
    let recorder = Arc::new(TestRecorder::default());
    let m = mems(3);
    let n = nexus(&m, &recorder).await;
    for c in &m {
        *c.journal.lock() = Some(Arc::clone(&recorder.journal));
    }
    m[2].fail.store(true, Ordering::SeqCst);
    // All online when it was issued: nothing marked before; the failure marks after.
    n.write(3 * MIB, pattern(8192, 4), false).await.unwrap();
    let events = recorder.journal.take();
    assert_eq!(events.iter().filter(|e| matches!(e, Event::Io { .. })).count(), 2);
    assert!(events.contains(&Event::Marked(vec![3])), "{events:?}");
    assert!(n.dirty_log().is_set(3));
    let record = recorder.last_record().unwrap();
    assert!(matches!(record.children[2].state, ChildState::Faulted { .. }));
}

#[tokio::test]
async fn the_last_online_child_is_never_faulted() {
    let recorder = Arc::new(TestRecorder::default());
    let m = mems(2);
    let n = nexus(&m, &recorder).await;
    for c in &m {
        c.fail.store(true, Ordering::SeqCst);
    }
    assert!(n.write(0, pattern(512, 1), false).await.is_err());
    assert!(n.read(0, 512).await.is_err());
    let online: Vec<_> =
        n.children().into_iter().filter(|c| c.state == ChildState::Online).collect();
    assert_eq!(online.len(), 1);
    assert!(matches!(n.remove_child(online[0].replica), Err(NexusError::LastOnlineChild { .. })));
    // The store never saw a table without an online child.
    for record in recorder.records.lock().iter() {
        assert!(record.children.iter().any(|c| c.state == ChildState::Online));
    }
}

#[tokio::test]
async fn close_records_a_clean_shutdown() {
    let recorder = Arc::new(TestRecorder::default());
    let m = mems(2);
    let n = nexus(&m, &recorder).await;
    n.write(0, pattern(512, 1), false).await.unwrap();
    n.close().await.unwrap();
    let record = recorder.last_record().unwrap();
    assert!(record.clean_shutdown);
    assert!(record.clear_dirty);
    assert_eq!(record.children.len(), 2);
    assert!(n.write(0, pattern(512, 1), false).await.is_err());
    // Idempotent: no second record.
    let count = recorder.records.lock().len();
    n.close().await.unwrap();
    assert_eq!(recorder.records.lock().len(), count);
}

/// A write admitted before the close (a departed client's, carried out by the NBD server)
/// ends before the clean shutdown is recorded: recorded earlier, the record would claim both
/// replicas online and the log clear while the write was about to fail on one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_records_a_clean_shutdown_only_after_writes_in_flight() {
    let recorder = Arc::new(TestRecorder::default());
    let m = mems(2);
    let n = nexus(&m, &recorder).await;
    m[1].write_delay_us.store(300_000, Ordering::SeqCst);
    let write = tokio::spawn({
        let n = Arc::clone(&n);
        async move { n.write(0, pattern(4096, 7), false).await }
    });
    eventually("the write on the fast child", || m[0].writes.load(Ordering::SeqCst) > 0).await;
    let close = tokio::spawn({
        let n = Arc::clone(&n);
        async move { n.close().await }
    });
    // The close's own flush has succeeded on both by now; the slow write has not ended.
    tokio::time::sleep(Duration::from_millis(100)).await;
    m[1].fail.store(true, Ordering::SeqCst);
    close.await.unwrap().unwrap();
    // Unacknowledged either way: the nexus closed under it.
    let _ = write.await.unwrap();
    let records = recorder.records.lock().clone();
    let clean = records.iter().find(|r| r.clean_shutdown).expect("a clean shutdown record");
    assert!(!clean.clear_dirty, "{clean:?}");
    let b = clean.children.iter().find(|c| c.replica == m[1].replica_id()).unwrap();
    assert_ne!(b.state, ChildState::Online, "{clean:?}");
}

#[tokio::test]
async fn the_log_is_cleared_once_every_child_is_online_again() {
    let recorder = Arc::new(TestRecorder::default());
    let m = mems(2);
    let n = nexus(&m, &recorder).await;
    m[1].fail.store(true, Ordering::SeqCst);
    n.write(MIB, pattern(4096, 1), false).await.unwrap();
    assert!(!n.dirty_log().is_empty());
    assert!(!recorder.last_record().unwrap().clear_dirty);
    n.remove_child(m[1].replica_id()).unwrap();
    n.recorded().await.unwrap();
    let record = recorder.last_record().unwrap();
    assert!(record.clear_dirty);
    assert_eq!(record.children.len(), 1);
    assert!(n.dirty_log().is_empty());
}
