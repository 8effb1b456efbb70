//! Example-based tests of the pool on the in-memory disk.

use trireme_types::{ByteSize, ReplicaId, SnapshotId, VolumeId};

use super::*;
use crate::{Allocation, PoolError, ReplicaMeta};

#[tokio::test]
async fn write_read_trim_zeroes_allocation() {
    let (_dev, pool) = mem_pool(&Geo::small()).await;
    let id = ReplicaId::new_random();
    let info =
        pool.create_replica(id, ByteSize::b(4 * CS), true, ReplicaMeta::default()).await.unwrap();
    assert_eq!(info.allocated, ByteSize::ZERO);
    let r = pool.open_replica(id).unwrap();
    // Unwritten reads as zeroes.
    assert!(r.read(0, 8192).await.unwrap().iter().all(|&b| b == 0));
    // Unaligned write across a cluster boundary.
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
    let off = CS - 1234;
    r.write(off, buf(&data), false).await.unwrap();
    assert_eq!(&r.read(off, data.len() as u32).await.unwrap()[..], &data[..]);
    assert_eq!(&r.read(off - 5, 5).await.unwrap()[..], &[0; 5]);
    let alloc = r.allocation(0, 4 * CS).await.unwrap();
    assert_eq!(
        alloc,
        vec![
            Allocation { offset: 0, length: 2 * CS, allocated: true },
            Allocation { offset: 2 * CS, length: 2 * CS, allocated: false },
        ]
    );
    // Trim of the whole first cluster frees it; partial trim of the second zeroes.
    r.trim(0, CS + 100).await.unwrap();
    assert!(r.read(0, (CS + 100) as u32).await.unwrap().iter().all(|&b| b == 0));
    let rest = r.read(CS + 100, (off + data.len() as u64 - CS - 100) as u32).await.unwrap();
    assert_eq!(&rest[..], &data[(CS + 100 - off) as usize..]);
    assert!(!r.allocation(0, CS).await.unwrap()[0].allocated);
    r.write_zeroes(CS, CS, false).await.unwrap();
    assert!(r.allocation(CS, CS).await.unwrap()[0].allocated);
    assert!(read_all(&r).await.iter().all(|&b| b == 0));
    r.write_zeroes(CS, CS, true).await.unwrap();
    assert_eq!(r.allocated().unwrap(), ByteSize::ZERO);
    r.flush().await.unwrap();
    check_meta(&pool);
}

#[tokio::test]
async fn errors_are_typed() {
    let (_dev, pool) = mem_pool(&Geo::small()).await;
    let id = ReplicaId::new_random();
    assert!(matches!(pool.open_replica(id), Err(PoolError::NotFound(_))));
    assert!(matches!(pool.destroy_replica(id).await, Err(PoolError::NotFound(_))));
    pool.create_replica(id, ByteSize::b(2 * CS), true, ReplicaMeta::default()).await.unwrap();
    // Idempotent create, conflicting create.
    pool.create_replica(id, ByteSize::b(2 * CS), true, ReplicaMeta::default()).await.unwrap();
    assert!(matches!(
        pool.create_replica(id, ByteSize::b(3 * CS), true, ReplicaMeta::default()).await,
        Err(PoolError::AlreadyExists { .. })
    ));
    let r = pool.open_replica(id).unwrap();
    assert!(matches!(r.read(2 * CS - 1, 2).await, Err(PoolError::OutOfRange { .. })));
    assert!(matches!(r.write(u64::MAX, buf(&[1]), false).await, Err(PoolError::OutOfRange { .. })));
    assert!(matches!(
        pool.resize_replica(id, ByteSize::b(CS)).await,
        Err(PoolError::ShrinkRefused { .. })
    ));
    // Thick replica larger than the pool.
    let big = ReplicaId::new_random();
    assert!(matches!(
        pool.create_replica(big, ByteSize::b(1000 * CS), false, ReplicaMeta::default()).await,
        Err(PoolError::NoSpace { .. })
    ));
    pool.destroy_replica(id).await.unwrap();
    assert!(matches!(r.write(0, buf(&[1]), false).await, Err(PoolError::Destroyed(_))));
    assert!(matches!(r.read(0, 1).await, Err(PoolError::Destroyed(_))));
    pool.close().await.unwrap();
    assert!(matches!(
        pool.create_replica(id, ByteSize::b(CS), true, ReplicaMeta::default()).await,
        Err(PoolError::Closed)
    ));
}

#[tokio::test]
async fn thick_resize_meta_and_reimport() {
    let (dev, pool) = mem_pool(&Geo::small()).await;
    let id = ReplicaId::new_random();
    let meta = ReplicaMeta { volume: Some(VolumeId::new_random()), generation: 7, epoch: 3 };
    let info = pool.create_replica(id, ByteSize::b(3 * CS - 512), false, meta).await.unwrap();
    assert_eq!(info.allocated, ByteSize::b(3 * CS));
    let r = pool.open_replica(id).unwrap();
    r.write(100, buf(b"hello"), true).await.unwrap();
    let grown = pool.resize_replica(id, ByteSize::b(5 * CS)).await.unwrap();
    assert_eq!(grown.allocated, ByteSize::b(5 * CS));
    assert_eq!(r.size(), 5 * CS);
    // The bytes that were past the old end read as zeroes.
    assert!(r.read(3 * CS - 512, 512).await.unwrap().iter().all(|&b| b == 0));
    let meta2 = ReplicaMeta { generation: 8, ..meta };
    pool.set_replica_meta(id, meta2).await.unwrap();
    // Trim on a thick replica zeroes but keeps the allocation.
    r.write(CS, buf(&[9; 4096]), false).await.unwrap();
    r.trim(CS, CS).await.unwrap();
    assert!(r.read(CS, 4096).await.unwrap().iter().all(|&b| b == 0));
    assert_eq!(r.allocated().unwrap(), ByteSize::b(5 * CS));
    check_meta(&pool);
    let used = pool.info().used;
    pool.close().await.unwrap();
    assert!(matches!(r.write(0, buf(&[1]), false).await, Err(PoolError::Closed)));
    let (_d, again) = import_image(dev.crash_image(crate::io::mem::Survivors::None)).await.unwrap();
    let ri = again.replica_info(id).unwrap();
    assert_eq!(ri.meta, meta2);
    assert_eq!(ri.size, ByteSize::b(5 * CS));
    assert!(!ri.thin);
    assert_eq!(again.info().used, used);
    let r2 = again.open_replica(id).unwrap();
    assert_eq!(&r2.read(100, 5).await.unwrap()[..], b"hello");
    check_meta(&again);
}

#[tokio::test]
async fn snapshot_and_clone_copy_on_write() {
    let (dev, pool) = mem_pool(&Geo::small()).await;
    let id = ReplicaId::new_random();
    pool.create_replica(id, ByteSize::b(2 * CS), true, ReplicaMeta::default()).await.unwrap();
    let r = pool.open_replica(id).unwrap();
    r.write(0, buf(&[1; 8192]), false).await.unwrap();
    let sid = SnapshotId::new_random();
    let s = pool.create_snapshot(id, sid).await.unwrap();
    assert_eq!(s.source, id);
    let used_before = pool.info().used;
    r.write(4096, buf(&[2; 4096]), false).await.unwrap();
    // COW allocated one new cluster; the snapshot keeps the old one.
    assert_eq!(pool.info().used.bytes(), used_before.bytes() + CS);
    let cid = ReplicaId::new_random();
    let c = pool.create_clone(sid, cid, ReplicaMeta::default()).await.unwrap();
    assert_eq!(c.snapshot_of, Some(sid));
    let cr = pool.open_replica(cid).unwrap();
    assert_eq!(&cr.read(0, 8192).await.unwrap()[..], &[1; 8192][..]);
    cr.write(0, buf(&[3; 4096]), false).await.unwrap();
    assert_eq!(&r.read(0, 8192).await.unwrap()[..4096], &[1; 4096][..]);
    assert_eq!(&r.read(4096, 4096).await.unwrap()[..], &[2; 4096][..]);
    assert_eq!(&cr.read(0, 8192).await.unwrap()[4096..], &[1; 4096][..]);
    pool.destroy_snapshot(sid).await.unwrap();
    pool.destroy_replica(id).await.unwrap();
    assert_eq!(&cr.read(0, 4096).await.unwrap()[..], &[3; 4096][..]);
    check_meta(&pool);
    pool.flush_for_test().await;
    let (_d, again) = import_image(dev.crash_image(crate::io::mem::Survivors::None)).await.unwrap();
    let cr2 = again.open_replica(cid).unwrap();
    assert_eq!(&cr2.read(0, 4096).await.unwrap()[..], &[3; 4096][..]);
    assert_eq!(&cr2.read(4096, 4096).await.unwrap()[..], &[1; 4096][..]);
    check_meta(&again);
}

#[tokio::test]
async fn superblock_copies_and_truncation() {
    let (dev, pool) = mem_pool(&Geo::small()).await;
    let id = ReplicaId::new_random();
    pool.create_replica(id, ByteSize::b(CS), true, ReplicaMeta::default()).await.unwrap();
    pool.close().await.unwrap();
    let image = dev.crash_image(crate::io::mem::Survivors::None);

    // Copy A corrupt: import uses B, and repairs A.
    let mut a_bad = image.clone();
    a_bad[100] ^= 0xff;
    let (d2, p2) = import_image(a_bad).await.unwrap();
    assert!(p2.replica_info(id).is_ok());
    let repaired = d2.crash_image(crate::io::mem::Survivors::None);
    assert_eq!(repaired[..4096], image[..4096]);

    // Both corrupt: a clear error.
    let mut both = image.clone();
    both[100] ^= 0xff;
    both[4096 + 100] ^= 0xff;
    match import_image(both).await {
        Err(PoolError::BadSuperblock { reason, .. }) => {
            assert!(reason.contains("copy A"), "{reason}")
        }
        other => panic!("expected BadSuperblock, got {:?}", other.map(|_| ())),
    }

    // Truncated disks.
    let half = image[..image.len() / 2].to_vec();
    assert!(matches!(import_image(half).await, Err(PoolError::Truncated { .. })));
    let tiny = image[..1000].to_vec();
    assert!(matches!(import_image(tiny).await, Err(PoolError::BadSuperblock { .. })));
    assert!(matches!(import_image(vec![0; 1 << 20]).await, Err(PoolError::BadSuperblock { .. })));

    // Formatting over a pool is refused.
    let dev3 = Arc::new(MemDev::from_image(image));
    let opts = CreateOptions::new("again");
    let r = Pool::create_on(PathBuf::from("mem"), Backend::mem(dev3), opts, None).await;
    assert!(matches!(r, Err(PoolError::AlreadyFormatted { .. })));
}

#[tokio::test]
async fn formatting_refuses_a_disk_that_is_not_blank() {
    let (dev, pool) = mem_pool(&Geo::small()).await;
    let id = ReplicaId::new_random();
    pool.create_replica(id, ByteSize::b(CS), true, ReplicaMeta::default()).await.unwrap();
    pool.close().await.unwrap();
    let image = dev.crash_image(crate::io::mem::Survivors::None);
    let create = |image: Vec<u8>| async move {
        let dev = Arc::new(MemDev::from_image(image));
        Pool::create_on(PathBuf::from("mem"), Backend::mem(dev), CreateOptions::new("new"), None)
            .await
    };

    // Both superblock copies damaged: the pool's data is still there and must not be replaced.
    let mut damaged = image.clone();
    damaged[100] ^= 0xff;
    damaged[4096 + 100] ^= 0xff;
    assert!(matches!(create(damaged).await, Err(PoolError::NotBlank { .. })));

    // Another file system's signature (ext4 keeps its magic at 1080).
    let mut foreign = vec![0u8; image.len()];
    foreign[1080] = 0x53;
    foreign[1081] = 0xef;
    assert!(matches!(create(foreign).await, Err(PoolError::NotBlank { .. })));

    // Zeroes format fine.
    assert!(create(vec![0u8; image.len()]).await.is_ok());
}

#[tokio::test]
async fn torn_journal_tail_replays_valid_prefix() {
    let geo = Geo::small();
    let (dev, pool) = mem_pool(&geo).await;
    let id = ReplicaId::new_random();
    pool.create_replica(id, ByteSize::b(4 * CS), true, ReplicaMeta::default()).await.unwrap();
    let r = pool.open_replica(id).unwrap();
    r.write(0, buf(&[5; 4096]), false).await.unwrap();
    r.flush().await.unwrap();
    let tail_before = pool.inner().journal_state().await.tail;
    r.write(CS, buf(&[6; 4096]), false).await.unwrap();
    r.flush().await.unwrap();
    let j = pool.inner().journal_state().await;
    assert!(j.tail > tail_before, "second flush wrote a commit");
    let mut image = dev.crash_image(crate::io::mem::Survivors::None);
    // Corrupt the last commit: replay must stop before it.
    let at = (pool.inner().sb.layout.journal_offset + tail_before + 40) as usize;
    image[at] ^= 0x55;
    let (_d, again) = import_image(image.clone()).await.unwrap();
    let r2 = again.open_replica(id).unwrap();
    assert_eq!(&r2.read(0, 4096).await.unwrap()[..], &[5; 4096][..]);
    assert!(r2.read(CS, 4096).await.unwrap().iter().all(|&b| b == 0));
    check_meta(&again);
    // Corrupt both checkpoint slots: a clear error, no panic.
    let mut nock = image;
    let l = pool.inner().sb.layout;
    nock[l.ckpt_offset as usize + 20] ^= 1;
    nock[(l.ckpt_offset + l.ckpt_slot_size) as usize + 20] ^= 1;
    assert!(matches!(import_image(nock).await, Err(PoolError::Corrupt { .. })));
}

#[tokio::test]
async fn journal_rolls_over_into_checkpoints() {
    let geo = Geo::small();
    let (dev, pool) = mem_pool(&geo).await;
    let id = ReplicaId::new_random();
    pool.create_replica(id, ByteSize::b(40 * CS), true, ReplicaMeta::default()).await.unwrap();
    let r = pool.open_replica(id).unwrap();
    for i in 0..40u64 {
        r.write(i * CS, buf(&[i as u8 + 1; 4096]), false).await.unwrap();
        r.flush().await.unwrap();
    }
    let j = pool.inner().journal_state().await;
    assert!(j.checkpoints >= 3, "checkpoints: {}", j.checkpoints);
    let (_d, again) = import_image(dev.crash_image(crate::io::mem::Survivors::None)).await.unwrap();
    let r2 = again.open_replica(id).unwrap();
    for i in 0..40u64 {
        assert_eq!(&r2.read(i * CS, 4096).await.unwrap()[..], &[i as u8 + 1; 4096][..]);
    }
    check_meta(&again);
}

#[tokio::test]
async fn concurrent_writes_to_one_unallocated_cluster() {
    let (_dev, pool) = mem_pool(&Geo::small()).await;
    let id = ReplicaId::new_random();
    pool.create_replica(id, ByteSize::b(2 * CS), true, ReplicaMeta::default()).await.unwrap();
    let r = pool.open_replica(id).unwrap();
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            r.write(i * 4096, buf(&[i as u8 + 1; 4096]), false).await
        }));
    }
    for i in 0..8u64 {
        // Unaligned 512-byte writes into the second cluster, two per block.
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            r.write(CS + i * 512, buf(&[0xa0 + i as u8; 512]), false).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for i in 0..16u64 {
        assert_eq!(&r.read(i * 4096, 4096).await.unwrap()[..], &[i as u8 + 1; 4096][..]);
    }
    for i in 0..8u64 {
        assert_eq!(&r.read(CS + i * 512, 512).await.unwrap()[..], &[0xa0 + i as u8; 512][..]);
    }
    assert_eq!(r.allocated().unwrap(), ByteSize::b(2 * CS));
    check_meta(&pool);
}

#[tokio::test]
async fn released_cluster_is_not_reused_before_release_is_durable() {
    use crate::io::mem::Survivors;
    let geo = Geo { clusters: 4, ..Geo::small() };
    let (dev, pool) = mem_pool(&geo).await;
    let (a, b) = (ReplicaId::new_random(), ReplicaId::new_random());
    pool.create_replica(a, ByteSize::b(2 * CS), true, ReplicaMeta::default()).await.unwrap();
    pool.create_replica(b, ByteSize::b(3 * CS), true, ReplicaMeta::default()).await.unwrap();
    let (ra, rb) = (pool.open_replica(a).unwrap(), pool.open_replica(b).unwrap());
    ra.write(0, buf(&vec![0xaa; 2 * CS as usize]), true).await.unwrap();
    ra.trim(0, CS).await.unwrap();
    rb.write(0, buf(&[0xbb; 4096]), false).await.unwrap();
    rb.write(CS, buf(&[0xbb; 4096]), false).await.unwrap();
    // The pool is full but for the trimmed cluster: taking it must first make the trim durable.
    rb.write(2 * CS, buf(&[0xbb; 4096]), false).await.unwrap();
    let (_d, again) = import_image(dev.crash_image(Survivors::All)).await.unwrap();
    let ra2 = again.open_replica(a).unwrap();
    let first = ra2.read(0, 4096).await.unwrap();
    assert!(first.iter().all(|&x| x == 0), "replica a sees replica b's data");
    // And a full pool with nothing to release answers NoSpace.
    assert!(matches!(rb.write(2 * CS - 4096, buf(&[1; 4096]), false).await, Ok(())));
    let c = ReplicaId::new_random();
    pool.create_replica(c, ByteSize::b(CS), true, ReplicaMeta::default()).await.unwrap();
    let rc = pool.open_replica(c).unwrap();
    assert!(matches!(rc.write(0, buf(&[1; 4096]), false).await, Err(PoolError::NoSpace { .. })));
    check_meta(&pool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_touches_the_disk_after_close() {
    use crate::io::mem::Survivors;
    let (dev, pool) = mem_pool(&Geo::small()).await;
    let id = ReplicaId::new_random();
    pool.create_replica(id, ByteSize::b(4 * CS), true, ReplicaMeta::default()).await.unwrap();
    let r = pool.open_replica(id).unwrap();
    // Structural operations and writes racing with close either finish before it or fail.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8u64 {
        let (pool, r) = (pool.clone(), r.clone());
        tasks.spawn(async move {
            let _ = pool
                .create_replica(
                    ReplicaId::new_random(),
                    ByteSize::b(CS),
                    true,
                    ReplicaMeta::default(),
                )
                .await;
            let _ = r.write(i * 4096, buf(&[i as u8; 4096]), true).await;
        });
    }
    pool.close().await.unwrap();
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    let after_close = dev.crash_image(Survivors::All);
    assert!(matches!(
        pool.create_replica(ReplicaId::new_random(), ByteSize::b(CS), true, ReplicaMeta::default())
            .await,
        Err(PoolError::Closed)
    ));
    assert!(matches!(
        pool.set_replica_meta(id, ReplicaMeta::default()).await,
        Err(PoolError::Closed)
    ));
    assert!(matches!(
        pool.create_snapshot(id, SnapshotId::new_random()).await,
        Err(PoolError::Closed)
    ));
    assert!(matches!(r.write(0, buf(&[1; 4096]), true).await, Err(PoolError::Closed)));
    assert!(matches!(r.flush().await, Err(PoolError::Closed)));
    assert!(matches!(r.trim(0, 4096).await, Err(PoolError::Closed)));
    assert!(dev.crash_image(Survivors::All) == after_close, "the disk changed after close");
    // And what was acknowledged before close is all there.
    let (_d, again) = import_image(after_close).await.unwrap();
    check_meta(&again);
}
