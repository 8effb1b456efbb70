//! Property test: a power cut at every metadata write.
//!
//! A random sequence of operations runs once to count its metadata writes (journal commits,
//! checkpoints). Then, for every one of those writes, the sequence runs again on a fresh
//! in-memory disk that tears that write in half and fails everything after it, and the pool is
//! imported from what a reboot would find — both with the disk cache lost and with it kept.
//!
//! Every 4 KiB block is written whole with one value, so the check is exact: after import each
//! block must be uniform and hold its value at the last durable point (a completed flush, FUA
//! write or structural operation) or a value written after it. Anything else is garbage — a
//! lost acknowledged write or another replica's data.

use proptest::prelude::*;
use trireme_types::{ByteSize, ReplicaId, SnapshotId};

use super::*;
use crate::ReplicaMeta;
use crate::io::mem::Survivors;

const BS: u64 = 4096;

#[derive(Debug, Clone)]
enum Op {
    Create { clusters: u64, thin: bool },
    Write { r: usize, block: u64, n: u64, fua: bool },
    Trim { r: usize, block: u64, n: u64 },
    SnapshotClone { r: usize },
    Destroy { r: usize },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (1..4u64, any::<bool>()).prop_map(|(clusters, thin)| Op::Create { clusters, thin }),
        8 => (any::<usize>(), any::<u64>(), 1..20u64, prop::bool::weighted(0.2))
            .prop_map(|(r, block, n, fua)| Op::Write { r, block, n, fua }),
        2 => (any::<usize>(), any::<u64>(), 1..40u64).prop_map(|(r, block, n)| Op::Trim { r, block, n }),
        1 => any::<usize>().prop_map(|r| Op::SnapshotClone { r }),
        1 => any::<usize>().prop_map(|r| Op::Destroy { r }),
        3 => Just(Op::Flush),
    ]
}

#[derive(Clone)]
struct Block {
    cur: u8,
    durable: u8,
    since: Vec<u8>,
}

impl Block {
    fn set(&mut self, v: u8) {
        self.cur = v;
        self.since.push(v);
    }
    fn allows(&self, v: u8) -> bool {
        v == self.durable || self.since.contains(&v)
    }
}

#[derive(Clone)]
struct Rep {
    id: ReplicaId,
    blocks: Vec<Block>,
    /// Created or destroyed by the operation the crash interrupted: may or may not exist.
    maybe: bool,
}

#[derive(Default)]
struct Model {
    reps: Vec<Rep>,
    snaps: usize,
    next_value: u8,
}

impl Model {
    fn durable_point(&mut self) {
        for r in &mut self.reps {
            for b in &mut r.blocks {
                b.durable = b.cur;
                b.since.clear();
            }
        }
    }
    fn value(&mut self) -> u8 {
        self.next_value = self.next_value % 254 + 1;
        self.next_value
    }
}

/// Runs `ops`, crashing at metadata write `crash_at` (if any). Returns the disk and the model.
async fn run(ops: &[Op], crash_at: Option<u64>, tear: bool) -> (Arc<MemDev>, Model) {
    let geo = Geo::small();
    let (dev, pool) = mem_pool(&geo).await;
    dev.crash_at_meta_write(geo.meta_end(), crash_at.unwrap_or(u64::MAX), tear);
    let mut m = Model::default();
    for op in ops {
        let res: Result<(), crate::PoolError> = match op.clone() {
            Op::Create { clusters, thin } => {
                if m.reps.len() >= 4 {
                    continue;
                }
                let id = ReplicaId::new_random();
                let blocks = vec![
                    Block { cur: 0, durable: 0, since: vec![] };
                    (clusters * CS / BS) as usize
                ];
                m.reps.push(Rep { id, blocks, maybe: true });
                let r = pool
                    .create_replica(id, ByteSize::b(clusters * CS), thin, ReplicaMeta::default())
                    .await;
                if r.is_ok() {
                    m.reps.last_mut().into_iter().for_each(|r| r.maybe = false);
                    m.durable_point();
                }
                r.map(|_| ())
            }
            Op::Write { r, block, n, fua } => {
                if m.reps.is_empty() {
                    continue;
                }
                let i = r % m.reps.len();
                let total = m.reps[i].blocks.len() as u64;
                let (b0, n) = (block % total, n.min(total - block % total));
                let v = m.value();
                for b in &mut m.reps[i].blocks[b0 as usize..(b0 + n) as usize] {
                    b.set(v);
                }
                let h = pool.open_replica(m.reps[i].id).unwrap();
                let res = h.write(b0 * BS, buf(&vec![v; (n * BS) as usize]), fua).await;
                if res.is_ok() && fua {
                    m.durable_point();
                }
                res
            }
            Op::Trim { r, block, n } => {
                if m.reps.is_empty() {
                    continue;
                }
                let i = r % m.reps.len();
                let total = m.reps[i].blocks.len() as u64;
                let (b0, n) = (block % total, n.min(total - block % total));
                for b in &mut m.reps[i].blocks[b0 as usize..(b0 + n) as usize] {
                    b.set(0);
                }
                pool.open_replica(m.reps[i].id).unwrap().trim(b0 * BS, n * BS).await
            }
            Op::SnapshotClone { r } => {
                if m.reps.is_empty() || m.reps.len() >= 4 || m.snaps >= 2 {
                    continue;
                }
                let src = m.reps[r % m.reps.len()].clone();
                let sid = SnapshotId::new_random();
                match pool.create_snapshot(src.id, sid).await {
                    Err(e) => Err(e),
                    Ok(_) => {
                        m.durable_point();
                        m.snaps += 1;
                        let id = ReplicaId::new_random();
                        let blocks = src
                            .blocks
                            .iter()
                            .map(|b| Block { cur: b.cur, durable: b.cur, since: vec![] })
                            .collect();
                        m.reps.push(Rep { id, blocks, maybe: true });
                        let res = pool.create_clone(sid, id, ReplicaMeta::default()).await;
                        if res.is_ok() {
                            m.reps.last_mut().into_iter().for_each(|r| r.maybe = false);
                            m.durable_point();
                        }
                        res.map(|_| ())
                    }
                }
            }
            Op::Destroy { r } => {
                if m.reps.is_empty() {
                    continue;
                }
                let i = r % m.reps.len();
                let res = pool.destroy_replica(m.reps[i].id).await;
                if res.is_ok() {
                    m.reps.remove(i);
                    m.durable_point();
                } else {
                    m.reps[i].maybe = true;
                }
                res
            }
            Op::Flush => {
                let res = pool.flush_for_test_result().await;
                if res.is_ok() {
                    m.durable_point();
                }
                res
            }
        };
        if let Err(e) = res {
            assert!(dev.crashed(), "{op:?} failed without a crash: {e}");
            break;
        }
    }
    (dev, m)
}

async fn check(image: Vec<u8>, m: &Model, what: &str) {
    let (_d, pool) = match import_image(image).await {
        Ok(p) => p,
        Err(e) => panic!("{what}: import after crash failed: {e}"),
    };
    check_meta(&pool);
    let mut expected_max = 0;
    for r in &m.reps {
        let h = match pool.open_replica(r.id) {
            Ok(h) => h,
            Err(_) if r.maybe => continue,
            Err(e) => panic!("{what}: replica lost: {e}"),
        };
        expected_max += 1;
        for (i, b) in r.blocks.iter().enumerate() {
            let got = h.read(i as u64 * BS, BS as u32).await.unwrap();
            let v = got[0];
            assert!(got.iter().all(|&x| x == v), "{what}: block {i} is torn");
            assert!(
                b.allows(v),
                "{what}: block {i} holds {v}, expected {} or one of {:?}",
                b.durable,
                b.since
            );
        }
    }
    assert!(pool.replicas().len() <= expected_max, "{what}: a destroyed replica came back");
    // The recovered pool is usable.
    if let Some(r) = pool.replicas().first() {
        let h = pool.open_replica(r.id).unwrap();
        h.write(0, buf(&[0xee; 4096]), true).await.unwrap();
    }
    pool.close().await.unwrap();
}

async fn crash_everywhere(ops: Vec<Op>) {
    let (dev, _) = run(&ops, None, true).await;
    let writes = dev.meta_writes();
    for n in 1..=writes {
        for tear in [true, false] {
            let (dev, m) = run(&ops, Some(n), tear).await;
            assert!(dev.crashed(), "crash point {n} of {writes} not reached");
            for keep in [Survivors::None, Survivors::All, Survivors::MetadataOnly] {
                let what = format!(
                    "crash at metadata write {n} (torn: {tear}), unsynced writes kept: {keep:?}"
                );
                check(dev.crash_image(keep), &m, &what).await;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn replay_after_crash_at_every_metadata_write(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(crash_everywhere(ops));
    }
}
