//! Backend checks on a real file: io_uring with O_DIRECT is what a pool gets, and the
//! pread/pwrite fallback behaves the same.

use std::os::fd::AsRawFd;
use std::time::Duration;

use trireme_types::{ByteSize, ReplicaId};

use super::*;
use crate::ReplicaMeta;

fn file_flags(dev: &Backend) -> i32 {
    let fd = match &dev.dev {
        Device::Uring(u) => u.file().as_raw_fd(),
        Device::Sync(s) => s.file().as_raw_fd(),
        Device::Mem(_) => return 0,
    };
    // SAFETY: F_GETFL on a descriptor we own reads its flags and touches no memory.
    unsafe { libc::fcntl(fd, libc::F_GETFL) }
}

#[tokio::test]
async fn pools_on_files_use_io_uring_with_o_direct() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.img");
    let opts = CreateOptions {
        name: "p".into(),
        cluster_size: ByteSize::mib(1),
        size: Some(ByteSize::mib(64)),
    };
    let pool = Pool::create(&path, opts).await.unwrap();
    assert_eq!(pool.inner().dev.kind(), "io_uring");
    assert_ne!(
        file_flags(&pool.inner().dev) & libc::O_DIRECT,
        0,
        "pool file not opened with O_DIRECT"
    );
    let id = ReplicaId::new_random();
    pool.create_replica(id, ByteSize::mib(8), true, ReplicaMeta::default()).await.unwrap();
    let r = pool.open_replica(id).unwrap();
    r.write(12_345, buf(&[0x42; 7000]), true).await.unwrap();
    pool.close().await.unwrap();
    drop((r, pool));

    // The same pool through the blocking fallback backend.
    let dev = Backend::open_sync(&path).unwrap();
    assert_eq!(dev.kind(), "sync");
    let pool = Pool::import_on(path.clone(), dev).await.unwrap();
    let r = pool.open_replica(id).unwrap();
    assert_eq!(&r.read(12_345, 7000).await.unwrap()[..], &[0x42; 7000][..]);
    assert!(r.read(12_345 + 7000, 100).await.unwrap().iter().all(|&b| b == 0));
    r.write(0, buf(&[1; 100]), false).await.unwrap();
    r.trim(CS * 16, CS * 16).await.unwrap();
    pool.close().await.unwrap();
}

/// The pool counts what it asks of its disk, so the engine can export it: every data write
/// and read of a replica, the flush, and their latencies (one histogram entry per operation).
#[tokio::test]
async fn the_pool_counts_its_disk_operations() {
    let (_dir, pool) = file_pool().await;
    let id = ReplicaId::new_random();
    pool.create_replica(id, ByteSize::mib(8), true, ReplicaMeta::default()).await.unwrap();
    let r = pool.open_replica(id).unwrap();
    let before = pool.disk_stats();

    r.write(0, buf(&[7; 64 << 10]), false).await.unwrap();
    r.flush().await.unwrap();
    assert_eq!(&r.read(0, 64 << 10).await.unwrap()[..], &[7; 64 << 10][..]);

    let after = pool.disk_stats();
    assert!(after.write_ops > before.write_ops);
    assert!(after.write_bytes - before.write_bytes >= 64 << 10);
    assert!(after.read_ops > before.read_ops);
    assert!(after.read_bytes - before.read_bytes >= 64 << 10);
    assert!(after.sync_ops > before.sync_ops);
    assert_eq!(after.errors, 0);
    assert_eq!(after.write_latency.count(), after.write_ops);
    assert_eq!(after.read_latency.count(), after.read_ops);
    assert_eq!(after.sync_latency.count(), after.sync_ops);
    assert!(after.read_latency.sum > before.read_latency.sum);
    pool.close().await.unwrap();
}

/// Polls `fut` once and drops it: a caller that goes away, as an RPC past its deadline does.
fn abandon<F: std::future::Future>(fut: F) {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(fut.as_mut().poll(&mut cx).is_pending(), "finished in one poll: nothing abandoned");
}

/// A thick create or grow whose caller goes away once its clusters are being zeroed still
/// finishes: giving the clusters back at once would let the zeroing already handed to the
/// kernel land on whichever replica got them next. A retry finds the finished work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_thick_create_or_resize_still_finishes() {
    let (_dir, pool) = file_pool().await;
    let free = pool.info().free.bytes();
    let id = ReplicaId::new_random();

    // The caller goes away while the clusters are reserved and being zeroed.
    let zeroing = pool.inner().zeroing.write().await;
    let caller = tokio::spawn({
        let pool = Arc::clone(&pool);
        async move { pool.create_replica(id, ByteSize::mib(16), false, ReplicaMeta::default()).await }
    });
    wait_until(|| pool.info().free.bytes() < free).await;
    caller.abort();
    let _ = caller.await;
    drop(zeroing);
    wait_until(|| pool.open_replica(id).is_ok()).await;
    assert_eq!(pool.info().free.bytes(), free - ByteSize::mib(16).bytes());
    let again =
        pool.create_replica(id, ByteSize::mib(16), false, ReplicaMeta::default()).await.unwrap();
    assert_eq!(again.size, ByteSize::mib(16));
    assert_eq!(pool.info().free.bytes(), free - ByteSize::mib(16).bytes());

    let grown = free - ByteSize::mib(16).bytes();
    let zeroing = pool.inner().zeroing.write().await;
    let caller = tokio::spawn({
        let pool = Arc::clone(&pool);
        async move { pool.resize_replica(id, ByteSize::mib(32)).await }
    });
    wait_until(|| pool.info().free.bytes() < grown).await;
    caller.abort();
    let _ = caller.await;
    drop(zeroing);
    wait_until(|| pool.replica_info(id).is_ok_and(|r| r.size == ByteSize::mib(32))).await;
    pool.resize_replica(id, ByteSize::mib(32)).await.unwrap();
    assert_eq!(pool.info().free.bytes(), free - ByteSize::mib(32).bytes());
    pool.close().await.unwrap();
}

/// A create whose caller went away while it queued behind another structural operation (an
/// RPC deadline passing behind a long zeroing) is not started: nobody would learn of it, and
/// the caller's undo has already been told the replica does not exist.
#[tokio::test]
async fn a_create_abandoned_while_queued_is_not_started() {
    let (_dir, pool) = file_pool().await;
    let free = pool.info().free;
    let id = ReplicaId::new_random();
    let busy = pool.inner().admin.lock().await;
    abandon(pool.create_replica(id, ByteSize::mib(16), false, ReplicaMeta::default()));
    // This runtime has one thread: the yield lets the abandoned task queue on the lock.
    tokio::task::yield_now().await;
    drop(busy);
    // The lock is fair: a later operation finishes only after the abandoned one had its turn.
    let after = ReplicaId::new_random();
    pool.create_replica(after, ByteSize::mib(1), true, ReplicaMeta::default()).await.unwrap();
    assert!(pool.open_replica(id).is_err(), "an abandoned create ran");
    assert_eq!(pool.info().free, free);
    pool.close().await.unwrap();
}

/// While a creation zeroes its space the replica is not listed yet, but the pool says it is
/// being created: the engine refuses a destroy then rather than answer "already gone".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_being_created_is_known_as_such() {
    let (_dir, pool) = file_pool().await;
    let free = pool.info().free.bytes();
    let id = ReplicaId::new_random();
    assert!(!pool.is_creating(id));
    let zeroing = pool.inner().zeroing.write().await;
    let create = tokio::spawn({
        let pool = Arc::clone(&pool);
        async move { pool.create_replica(id, ByteSize::mib(16), false, ReplicaMeta::default()).await }
    });
    wait_until(|| pool.info().free.bytes() < free).await;
    assert!(pool.is_creating(id));
    assert!(pool.open_replica(id).is_err());
    drop(zeroing);
    create.await.unwrap().unwrap();
    assert!(!pool.is_creating(id));
    pool.close().await.unwrap();
}

async fn wait_until(mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the abandoned operation never finished");
}

/// A 64 MiB pool of 1 MiB clusters on a file (io_uring, O_DIRECT) in a fresh directory.
async fn file_pool() -> (tempfile::TempDir, Arc<Pool>) {
    let dir = tempfile::tempdir().unwrap();
    let opts = CreateOptions {
        name: "p".into(),
        cluster_size: ByteSize::mib(1),
        size: Some(ByteSize::mib(64)),
    };
    let pool = Pool::create(&dir.path().join("p.img"), opts).await.unwrap();
    (dir, pool)
}
