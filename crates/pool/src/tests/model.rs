//! Property test: random operation sequences against a plain in-memory model.
//!
//! The model of a replica is a byte vector; of a snapshot, a frozen copy. After every
//! operation every replica must read back exactly as modelled, the allocation map must only
//! call zero ranges holes, and the pool's reference counts must match its maps. Flushes,
//! checkpoints (the test journal is tiny) and close/re-import cycles are part of the sequence.

use proptest::prelude::*;
use trireme_types::{ByteSize, ReplicaId, SnapshotId};

use super::*;
use crate::ReplicaMeta;

#[derive(Debug, Clone)]
pub(crate) enum Op {
    Create {
        clusters: u64,
        tail: u64,
        thin: bool,
    },
    Write {
        r: usize,
        off: u64,
        len: u64,
        aligned: bool,
        byte: u8,
        fua: bool,
    },
    Trim {
        r: usize,
        off: u64,
        len: u64,
    },
    Zeroes {
        r: usize,
        off: u64,
        len: u64,
        may_trim: bool,
    },
    Snapshot {
        r: usize,
    },
    Clone {
        s: usize,
    },
    Destroy {
        r: usize,
    },
    DestroySnapshot {
        s: usize,
    },
    Resize {
        r: usize,
        add: u64,
    },
    Flush,
    Reopen,
    /// Flush, then lose power: import must replay the journal to the same state.
    Kill,
}

pub(crate) fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (1..4u64, 0..3u64, any::<bool>()).prop_map(|(clusters, tail, thin)| Op::Create { clusters, tail, thin }),
        8 => (any::<usize>(), any::<u64>(), 1..(3 * CS / 2), any::<bool>(), 1..=255u8, any::<bool>())
            .prop_map(|(r, off, len, aligned, byte, fua)| Op::Write { r, off, len, aligned, byte, fua }),
        2 => (any::<usize>(), any::<u64>(), 1..(3 * CS)).prop_map(|(r, off, len)| Op::Trim { r, off, len }),
        2 => (any::<usize>(), any::<u64>(), 1..(3 * CS), any::<bool>())
            .prop_map(|(r, off, len, may_trim)| Op::Zeroes { r, off, len, may_trim }),
        2 => any::<usize>().prop_map(|r| Op::Snapshot { r }),
        1 => any::<usize>().prop_map(|s| Op::Clone { s }),
        1 => any::<usize>().prop_map(|r| Op::Destroy { r }),
        1 => any::<usize>().prop_map(|s| Op::DestroySnapshot { s }),
        1 => (any::<usize>(), 1..(2 * CS)).prop_map(|(r, add)| Op::Resize { r, add }),
        2 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Kill),
    ]
}

/// Clamps a generated range into a replica of `size` bytes.
pub(crate) fn range(size: u64, off: u64, len: u64, aligned: bool) -> (u64, u64) {
    let mut off = off % size;
    let mut len = len.min(size - off).max(1);
    if aligned {
        off -= off % 4096;
        len = len.div_ceil(4096) * 4096;
        len = len.min(size - off);
    }
    (off, len)
}

struct ModelReplica {
    id: ReplicaId,
    data: Vec<u8>,
}

async fn run(ops: Vec<Op>) {
    let geo = Geo { clusters: 160, ..Geo::small() };
    let (mut dev, mut pool) = mem_pool(&geo).await;
    let mut reps: Vec<ModelReplica> = Vec::new();
    let mut snaps: Vec<(SnapshotId, Vec<u8>)> = Vec::new();
    for op in ops {
        match op {
            Op::Create { clusters, tail, thin } => {
                if reps.len() >= 4 {
                    continue;
                }
                let size = clusters * CS + tail * 1536;
                let id = ReplicaId::new_random();
                pool.create_replica(id, ByteSize::b(size), thin, ReplicaMeta::default())
                    .await
                    .unwrap();
                reps.push(ModelReplica { id, data: vec![0; size as usize] });
            }
            Op::Write { r, off, len, aligned, byte, fua } => {
                let Some(m) = (!reps.is_empty()).then(|| r % reps.len()).map(|i| &mut reps[i])
                else {
                    continue;
                };
                let (off, len) = range(m.data.len() as u64, off, len, aligned);
                let data = vec![byte; len as usize];
                pool.open_replica(m.id).unwrap().write(off, buf(&data), fua).await.unwrap();
                m.data[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Trim { r, off, len } | Op::Zeroes { r, off, len, .. } => {
                let Some(m) = (!reps.is_empty()).then(|| r % reps.len()).map(|i| &mut reps[i])
                else {
                    continue;
                };
                let (off, len) = range(m.data.len() as u64, off, len, false);
                let h = pool.open_replica(m.id).unwrap();
                match op {
                    Op::Trim { .. } => h.trim(off, len).await.unwrap(),
                    Op::Zeroes { may_trim, .. } => {
                        h.write_zeroes(off, len, may_trim).await.unwrap()
                    }
                    _ => unreachable!(),
                }
                m.data[off as usize..(off + len) as usize].fill(0);
            }
            Op::Snapshot { r } => {
                if reps.is_empty() || snaps.len() >= 3 {
                    continue;
                }
                let m = &reps[r % reps.len()];
                let sid = SnapshotId::new_random();
                pool.create_snapshot(m.id, sid).await.unwrap();
                snaps.push((sid, m.data.clone()));
            }
            Op::Clone { s } => {
                if snaps.is_empty() || reps.len() >= 4 {
                    continue;
                }
                let (sid, data) = &snaps[s % snaps.len()];
                let id = ReplicaId::new_random();
                let info = pool.create_clone(*sid, id, ReplicaMeta::default()).await.unwrap();
                assert_eq!(info.snapshot_of, Some(*sid));
                reps.push(ModelReplica { id, data: data.clone() });
            }
            Op::Destroy { r } => {
                if reps.is_empty() {
                    continue;
                }
                let m = reps.remove(r % reps.len());
                pool.destroy_replica(m.id).await.unwrap();
            }
            Op::DestroySnapshot { s } => {
                if snaps.is_empty() {
                    continue;
                }
                let (sid, _) = snaps.remove(s % snaps.len());
                pool.destroy_snapshot(sid).await.unwrap();
            }
            Op::Resize { r, add } => {
                let Some(m) = (!reps.is_empty()).then(|| r % reps.len()).map(|i| &mut reps[i])
                else {
                    continue;
                };
                let size = m.data.len() as u64 + add;
                if size > 6 * CS {
                    continue;
                }
                pool.resize_replica(m.id, ByteSize::b(size)).await.unwrap();
                m.data.resize(size as usize, 0);
            }
            Op::Flush => pool.flush_for_test().await,
            Op::Reopen => {
                pool.close().await.unwrap();
                let (d, p) =
                    import_image(dev.crash_image(crate::io::mem::Survivors::None)).await.unwrap();
                dev = d;
                pool = p;
            }
            Op::Kill => {
                pool.flush_for_test().await;
                let (d, p) =
                    import_image(dev.crash_image(crate::io::mem::Survivors::None)).await.unwrap();
                dev = d;
                pool = p;
            }
        }
        check_meta(&pool);
        for m in &reps {
            let h = pool.open_replica(m.id).unwrap();
            let got = read_all(&h).await;
            assert!(got == m.data, "replica {} differs from the model after {op:?}", m.id);
            for a in h.allocation(0, h.size()).await.unwrap() {
                if !a.allocated {
                    let hole = &m.data[a.offset as usize..(a.offset + a.length) as usize];
                    assert!(hole.iter().all(|&b| b == 0), "a hole holds data");
                }
            }
        }
    }
    pool.close().await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn pool_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops));
    }
}

/// The allocator on its own: reservations never hand out a cluster twice, never exceed the
/// pool, and releases come back only when released.
mod allocator {
    use proptest::prelude::*;

    use crate::meta::Meta;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn reserve_unreserve(ops in proptest::collection::vec((any::<bool>(), 0..1200u64), 1..40)) {
            let mut m = Meta::new(64 << 10, 2500);
            let mut held: Vec<u32> = Vec::new();
            for (take, n) in ops {
                if take {
                    let before = m.free_clusters();
                    match m.reserve_many(n) {
                        Some(xs) => {
                            let got: Vec<u32> = xs.iter().flat_map(|x| x.p..x.p + x.n).collect();
                            prop_assert_eq!(got.len() as u64, n);
                            for p in got {
                                prop_assert!(p < 2500);
                                prop_assert!(!held.contains(&p), "cluster {} handed out twice", p);
                                held.push(p);
                            }
                            prop_assert_eq!(m.free_clusters(), before - n);
                        }
                        None => prop_assert!(n > before),
                    }
                } else {
                    for _ in 0..n.min(held.len() as u64) {
                        let p = held.swap_remove(0);
                        m.unreserve(p);
                    }
                }
                prop_assert_eq!(m.free_clusters() + held.len() as u64, 2500);
                m.check_groups();
            }
        }
    }
}
