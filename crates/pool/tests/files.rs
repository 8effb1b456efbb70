//! The pool on real files in a temporary directory, through the io_uring + O_DIRECT path.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use trireme_iobuf::IoBuf;
use trireme_pool::{CreateOptions, Pool, PoolError, ReplicaMeta};
use trireme_types::{ByteSize, ReplicaId, SnapshotId, VolumeId};

const MIB: u64 = 1 << 20;

fn opts(size: u64) -> CreateOptions {
    CreateOptions {
        name: "pool-1".into(),
        cluster_size: ByteSize::mib(1),
        size: Some(ByteSize::b(size)),
    }
}

async fn pool_in(dir: &Path, size: u64) -> Arc<Pool> {
    Pool::create(&dir.join("pool.img"), opts(size)).await.unwrap()
}

/// A pool of `pool_mib` MiB in `dir` holding one open thin replica of `replica_mib` MiB.
async fn thin_replica_in(
    dir: &Path,
    pool_mib: u64,
    replica_mib: u64,
) -> (Arc<Pool>, ReplicaId, trireme_pool::Replica) {
    let pool = pool_in(dir, pool_mib * MIB).await;
    let id = ReplicaId::new_random();
    pool.create_replica(id, ByteSize::mib(replica_mib), true, ReplicaMeta::default())
        .await
        .unwrap();
    let r = pool.open_replica(id).unwrap();
    (pool, id, r)
}

/// A deterministic pseudo-random pattern so reads can be checked without storing them.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aligned_and_unaligned_io_survive_close_and_import() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool_in(dir.path(), 256 * MIB).await;
    let info = pool.info();
    assert_eq!(info.name, "pool-1");
    assert_eq!(info.cluster_size, ByteSize::mib(1));
    assert!(info.capacity.bytes() > 200 * MIB && info.capacity.bytes() < 256 * MIB);
    let id = ReplicaId::new_random();
    let meta = ReplicaMeta { volume: Some(VolumeId::new_random()), generation: 1, epoch: 2 };
    pool.create_replica(id, ByteSize::mib(64), true, meta).await.unwrap();
    let r = pool.open_replica(id).unwrap();

    let big = pattern(1, 3 * MIB as usize);
    r.write(MIB / 2, IoBuf::copy_from(&big), false).await.unwrap();
    let odd = pattern(2, 10_007);
    r.write(40 * MIB - 333, IoBuf::copy_from(&odd), true).await.unwrap();
    let sector = pattern(3, 512);
    r.write(5 * MIB + 512, IoBuf::copy_from(&sector), false).await.unwrap();
    r.flush().await.unwrap();

    assert_eq!(&r.read(MIB / 2, big.len() as u32).await.unwrap()[..], &big[..]);
    assert_eq!(&r.read(40 * MIB - 333, odd.len() as u32).await.unwrap()[..], &odd[..]);
    assert_eq!(&r.read(5 * MIB + 512, 512).await.unwrap()[..], &sector[..]);
    assert!(r.read(5 * MIB, 512).await.unwrap().iter().all(|&b| b == 0));
    let runs = r.allocation(0, 64 * MIB).await.unwrap();
    let allocated: u64 = runs.iter().filter(|a| a.allocated).map(|a| a.length).sum();
    assert_eq!(allocated, 7 * MIB, "{runs:?}");
    assert_eq!(runs.iter().map(|a| a.length).sum::<u64>(), 64 * MIB);

    pool.close().await.unwrap();
    assert!(matches!(r.read(0, 1).await, Err(PoolError::Closed)));
    drop(pool);

    let pool = Pool::import(&dir.path().join("pool.img")).await.unwrap();
    let ri = pool.replica_info(id).unwrap();
    assert_eq!(ri.meta, meta);
    assert_eq!(ri.allocated, ByteSize::mib(7));
    let r = pool.open_replica(id).unwrap();
    assert_eq!(&r.read(MIB / 2, big.len() as u32).await.unwrap()[..], &big[..]);
    assert_eq!(&r.read(40 * MIB - 333, odd.len() as u32).await.unwrap()[..], &odd[..]);
    assert_eq!(&r.read(5 * MIB + 512, 512).await.unwrap()[..], &sector[..]);
    pool.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thick_replica_and_space_accounting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.img");
    // Dirty the file first (all but its head, which formatting requires to be blank, as after
    // `wipefs`): a thick replica must still read as zeroes.
    let mut dirty = vec![0x5a; 128 * MIB as usize];
    dirty[..64 * 1024].fill(0);
    std::fs::write(&path, dirty).unwrap();
    let pool = Pool::create(&path, opts(128 * MIB)).await.unwrap();
    let free = pool.info().free;
    let id = ReplicaId::new_random();
    let info =
        pool.create_replica(id, ByteSize::mib(32), false, ReplicaMeta::default()).await.unwrap();
    assert_eq!(info.allocated, ByteSize::mib(32));
    assert_eq!(pool.info().free.bytes(), free.bytes() - 32 * MIB);
    let r = pool.open_replica(id).unwrap();
    for off in [0, 7 * MIB + 4096, 32 * MIB - 4096] {
        assert!(r.read(off, 4096).await.unwrap().iter().all(|&b| b == 0), "old data at {off}");
    }
    let thin = ReplicaId::new_random();
    pool.create_replica(thin, ByteSize::mib(16), true, ReplicaMeta::default()).await.unwrap();
    let t = pool.open_replica(thin).unwrap();
    t.write(3 * MIB + 100, IoBuf::copy_from(&[1; 100]), false).await.unwrap();
    let got = t.read(3 * MIB, 4096).await.unwrap();
    assert!(got[..100].iter().all(|&b| b == 0), "a new cluster shows old disk contents");
    assert!(got[200..].iter().all(|&b| b == 0));
    let huge = ReplicaId::new_random();
    let err = pool
        .create_replica(huge, ByteSize::gib(1), false, ReplicaMeta::default())
        .await
        .unwrap_err();
    assert!(matches!(err, PoolError::NoSpace { .. }), "{err}");
    pool.destroy_replica(id).await.unwrap();
    assert_eq!(pool.info().free.bytes(), free.bytes() - MIB);
    pool.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_32_random_io() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, _, r) = thin_replica_in(dir.path(), 128, 32).await;
    // 32 writers, each owning every 32nd 4 KiB block, several rounds; then verify all.
    let blocks = 32 * MIB / 4096;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..32u64 {
        let r = r.clone();
        tasks.spawn(async move {
            for round in 0..8u64 {
                let mut b = (w * 7919 + round * 104_729) % blocks;
                b = b - b % 32 + w;
                if b >= blocks {
                    continue;
                }
                r.write(b * 4096, IoBuf::copy_from(&pattern(b, 4096)), round % 4 == 0)
                    .await
                    .unwrap();
                assert_eq!(&r.read(b * 4096, 4096).await.unwrap()[..], &pattern(b, 4096)[..]);
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    r.flush().await.unwrap();
    pool.close().await.unwrap();
}

/// Reads dropped at any point, also while they wait to share a submission with others, leave
/// nothing stuck: later I/O completes and the pool closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_reads_leave_the_ring_working() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, _, r) = thin_replica_in(dir.path(), 64, 16).await;
    r.write(0, IoBuf::copy_from(&pattern(9, 4 * MIB as usize)), true).await.unwrap();
    let bounded = std::time::Duration::from_secs(30);
    for round in 0..20u64 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64u64 {
            let r = r.clone();
            tasks.spawn(async move { r.read(((i * 31 + round) % 1024) * 4096, 4096).await });
        }
        // Drop some at once and the rest after they started.
        for _ in 0..round % 5 {
            tokio::task::yield_now().await;
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let got = tokio::time::timeout(bounded, r.read(4096, 4096)).await.unwrap().unwrap();
        assert_eq!(&got[..], &pattern(9, 2 * 4096)[4096..]);
    }
    tokio::time::timeout(bounded, pool.close()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_clone_on_files() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, id, r) = thin_replica_in(dir.path(), 128, 8).await;
    r.write(0, IoBuf::copy_from(&pattern(9, 2 * MIB as usize)), false).await.unwrap();
    let sid = SnapshotId::new_random();
    pool.create_snapshot(id, sid).await.unwrap();
    r.write(4096, IoBuf::copy_from(&[7; 4096]), true).await.unwrap();
    let cid = ReplicaId::new_random();
    pool.create_clone(sid, cid, ReplicaMeta::default()).await.unwrap();
    let c = pool.open_replica(cid).unwrap();
    assert_eq!(&c.read(0, 2 * MIB as u32).await.unwrap()[..], &pattern(9, 2 * MIB as usize)[..]);
    assert_eq!(&r.read(4096, 4096).await.unwrap()[..], &[7; 4096][..]);
    assert_eq!(pool.snapshots().len(), 1);
    pool.close().await.unwrap();
    let pool = Pool::import(&dir.path().join("pool.img")).await.unwrap();
    let c = pool.open_replica(cid).unwrap();
    assert_eq!(&c.read(0, 2 * MIB as u32).await.unwrap()[..], &pattern(9, 2 * MIB as usize)[..]);
    assert_eq!(pool.snapshots()[0].source, id);
    pool.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_truncated_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.img");
    let pool = Pool::create(&path, opts(64 * MIB)).await.unwrap();
    let id = ReplicaId::new_random();
    pool.create_replica(id, ByteSize::mib(4), true, ReplicaMeta::default()).await.unwrap();
    pool.close().await.unwrap();
    drop(pool);

    let again = Pool::create(&path, opts(64 * MIB)).await;
    assert!(matches!(again, Err(PoolError::AlreadyFormatted { .. })));

    // A disk is never open in two pool instances at once. A second import waits (bounded) for
    // the first to let go, as after a crash whose io_uring teardown still holds the file, and
    // fails clearly when the owner never lets go.
    let first = Pool::import(&path).await.unwrap();
    let waiter = tokio::spawn({
        let path = path.clone();
        async move { Pool::import(&path).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!waiter.is_finished(), "a second import must wait while the disk is locked");
    first.close().await.unwrap();
    drop(first);
    let second = waiter.await.unwrap().unwrap();
    let err = Pool::import(&path).await.err().unwrap();
    assert!(matches!(err, PoolError::Io { .. }) && err.to_string().contains("in use"), "{err}");
    second.close().await.unwrap();
    Pool::import(&path).await.unwrap().close().await.unwrap();

    let pristine = std::fs::read(&path).unwrap();
    let mut bytes = pristine.clone();
    bytes[64] ^= 0xff; // superblock copy A
    std::fs::write(&path, &bytes).unwrap();
    let pool = Pool::import(&path).await.unwrap();
    assert!(pool.replica_info(id).is_ok());
    pool.close().await.unwrap();
    drop(pool);

    bytes[64] ^= 0xff;
    bytes[64] ^= 0x0f;
    bytes[4096 + 64] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let err = Pool::import(&path).await.err().unwrap();
    assert!(matches!(err, PoolError::BadSuperblock { .. }), "{err}");
    println!("both copies corrupt: {err}");

    std::fs::write(&path, &pristine[..pristine.len() / 2]).unwrap();
    let err = Pool::import(&path).await.err().unwrap();
    assert!(matches!(err, PoolError::Truncated { .. }), "{err}");
    println!("truncated: {err}");

    std::fs::write(&path, b"tiny").unwrap();
    assert!(matches!(Pool::import(&path).await, Err(PoolError::BadSuperblock { .. })));
    assert!(matches!(Pool::import(&dir.path().join("missing")).await, Err(PoolError::Io { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_replicas_import_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.img");
    let pool = Pool::create(&path, opts(4 << 30)).await.unwrap();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let ids: Vec<ReplicaId> = (0..1000).map(|_| ReplicaId::new_random()).collect();
    for chunk in ids.chunks(50) {
        let (pool, chunk) = (pool.clone(), chunk.to_vec());
        tasks.spawn(async move {
            for (i, id) in chunk.into_iter().enumerate() {
                let meta = ReplicaMeta { volume: None, generation: i as u64, epoch: 0 };
                // 100 GiB thin replicas on a 4 GiB pool: overcommitted, as thin pools are.
                pool.create_replica(id, ByteSize::gib(100), true, meta).await.unwrap();
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    println!("created 1000 replicas in {:?}", started.elapsed());
    // Some data in a few of them, left in the journal (no final checkpoint: kill, not close).
    for id in &ids[..10] {
        let r = pool.open_replica(*id).unwrap();
        r.write(0, IoBuf::copy_from(&pattern(5, 4096)), true).await.unwrap();
    }
    drop(pool);

    let rss_before = rss_bytes();
    let started = Instant::now();
    let pool = Pool::import(&path).await.unwrap();
    let elapsed = started.elapsed();
    let grown = rss_bytes().saturating_sub(rss_before);
    println!("import grew RSS by {} KiB", grown >> 10);
    // Dense maps would need 400 MB here; the sparse ones need a few MB.
    assert!(grown < 96 * MIB, "1000 idle thin replicas cost {grown} bytes");
    println!("imported 1000 replicas in {elapsed:?}");
    assert_eq!(pool.replicas().len(), 1000);
    let bound = if cfg!(debug_assertions) { 3.0 } else { 1.0 };
    assert!(elapsed.as_secs_f64() < bound, "import took {elapsed:?}");
    let r = pool.open_replica(ids[3]).unwrap();
    assert_eq!(&r.read(0, 4096).await.unwrap()[..], &pattern(5, 4096)[..]);
    pool.close().await.unwrap();
    let started = Instant::now();
    let pool = Pool::import(&path).await.unwrap();
    println!("imported 1000 replicas from a checkpoint in {:?}", started.elapsed());
    assert_eq!(pool.replicas().len(), 1000);
}

/// The engine spawns these futures on a multi-threaded runtime: they must be Send.
#[allow(dead_code, clippy::let_underscore_future)]
fn futures_are_send(pool: Arc<Pool>, r: trireme_pool::Replica, id: ReplicaId, sid: SnapshotId) {
    fn send<T: Send>(_: T) {}
    let p: &Path = Path::new("x");
    send(Pool::create(p, opts(1)));
    send(Pool::import(p));
    send(pool.create_replica(id, ByteSize::mib(1), true, ReplicaMeta::default()));
    send(pool.destroy_replica(id));
    send(pool.resize_replica(id, ByteSize::mib(1)));
    send(pool.set_replica_meta(id, ReplicaMeta::default()));
    send(pool.create_snapshot(id, sid));
    send(pool.destroy_snapshot(sid));
    send(pool.create_clone(sid, id, ReplicaMeta::default()));
    send(pool.close());
    send(r.read(0, 1));
    send(r.write(0, IoBuf::zeroed(1), false));
    send(r.flush());
    send(r.trim(0, 1));
    send(r.write_zeroes(0, 1, true));
    send(r.allocation(0, 1));
    fn sync<T: Send + Sync + Clone>(_: &T) {}
    sync(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_copy_on_write_see_old_or_new_data() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, id, r) = thin_replica_in(dir.path(), 128, 4).await;
    let old = pattern(11, 2 * MIB as usize);
    r.write(0, IoBuf::copy_from(&old), false).await.unwrap();
    for round in 0..4u64 {
        pool.create_snapshot(id, SnapshotId::new_random()).await.unwrap();
        let before = r.read(0, 2 * MIB as u32).await.unwrap().to_vec();
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..16u64 {
            let r = r.clone();
            let block = t * 97 % 512;
            let new = pattern(1000 + round * 100 + t, 4096);
            let before_block = before[(block * 4096) as usize..][..4096].to_vec();
            tasks.spawn(async move {
                if t % 2 == 0 {
                    r.write(block * 4096, IoBuf::copy_from(&new), false).await.unwrap();
                } else {
                    // Readers of other blocks of the clusters being copied.
                    let got = r.read(block * 4096, 4096).await.unwrap();
                    assert_eq!(&got[..], &before_block[..], "a read during COW saw wrong data");
                }
            });
        }
        while let Some(t) = tasks.join_next().await {
            t.unwrap();
        }
        for t in (0..16u64).step_by(2) {
            let block = t * 97 % 512;
            let got = r.read(block * 4096, 4096).await.unwrap();
            assert_eq!(&got[..], &pattern(1000 + round * 100 + t, 4096)[..]);
        }
    }
    let info = pool.replica_info(id).unwrap();
    assert_eq!(info.allocated, ByteSize::mib(2));
    pool.close().await.unwrap();
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// Several writes racing into the same unallocated cluster must all land: exactly one of them
/// allocates it, the others wait and write in place. The pool is full, with released clusters
/// still waiting for their release to be committed, so every writer sees a hole, waits for that
/// commit (real disk I/O, so the writers interleave), and only then allocates: the widest form
/// of the race between looking a cluster up and allocating it. Allocating the same cluster twice
/// would silently drop the data of every write but the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_into_one_new_cluster_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool_in(dir.path(), 64 * MIB).await;
    let free = pool.info().free.bytes();
    let filler = ReplicaId::new_random();
    pool.create_replica(filler, ByteSize::b(free), true, ReplicaMeta::default()).await.unwrap();
    let f = pool.open_replica(filler).unwrap();
    for c in 0..free / MIB {
        f.write(c * MIB, IoBuf::copy_from(&vec![0xee; MIB as usize]), false).await.unwrap();
    }
    f.flush().await.unwrap();
    assert_eq!(pool.info().free.bytes(), 0);

    let id = ReplicaId::new_random();
    pool.create_replica(id, ByteSize::mib(16), true, ReplicaMeta::default()).await.unwrap();
    let r = pool.open_replica(id).unwrap();
    let pieces = 16u64;
    let piece = MIB / pieces;
    for round in 0..4u64 {
        // Released but not yet committed: quarantined, not free. More clusters than one, so
        // that a double allocation would find room and lose data instead of failing.
        f.trim(round * 8 * MIB, 8 * MIB).await.unwrap();
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..pieces {
            let r = r.clone();
            let data = IoBuf::copy_from(&pattern(round * 100 + i, piece as usize));
            writes.spawn(async move { r.write(round * MIB + i * piece, data, false).await });
        }
        while let Some(res) = writes.join_next().await {
            res.unwrap().unwrap();
        }
        for i in 0..pieces {
            let got = r.read(round * MIB + i * piece, piece as u32).await.unwrap();
            assert!(
                got[..] == pattern(round * 100 + i, piece as usize)[..],
                "round {round}: piece {i} of the new cluster was lost"
            );
        }
    }
    assert_eq!(r.allocated().unwrap(), ByteSize::mib(4), "a cluster was allocated twice");
    pool.close().await.unwrap();
}
