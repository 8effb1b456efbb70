//! A quick data-path benchmark of the pool library on a file (not a test):
//! `cargo run --release -p trireme-pool --example pool_bench -- /path/to/dir [size_mib]`.
//! Prints IOPS and MB/s for 4 KiB random writes/reads at QD32, 4 KiB random reads at QD1
//! and 1 MiB sequential writes/reads at QD8 on a fully written thin replica.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use trireme_iobuf::IoBuf;
use trireme_pool::{CreateOptions, Pool, Replica, ReplicaMeta};
use trireme_types::{ByteSize, ReplicaId};

async fn run(r: &Replica, name: &str, qd: u64, bs: u64, write: bool, random: bool) {
    let size = r.size();
    let ops = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..qd {
        let (r, ops) = (r.clone(), ops.clone());
        tasks.spawn(async move {
            let mut x = w.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut seq = w * bs;
            while Instant::now() < deadline {
                let off = if random {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % (size / bs)) * bs
                } else {
                    seq = (seq + qd * bs) % size;
                    seq
                };
                if write {
                    r.write(off, IoBuf::zeroed(bs as usize), false).await.unwrap();
                } else {
                    r.read(off, bs as u32).await.unwrap();
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let n = ops.load(Ordering::Relaxed) as f64 / 5.0;
    println!("{name:<24} {:>10.0} IOPS {:>9.1} MB/s", n, n * bs as f64 / 1e6);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).cloned().unwrap_or_else(|| ".".into()));
    let mib: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let path = dir.join("pool-bench.img");
    let _ = std::fs::remove_file(&path);
    let opts = CreateOptions {
        name: "bench".into(),
        cluster_size: ByteSize::mib(1),
        size: Some(ByteSize::mib(mib + 128)),
    };
    let pool = Pool::create(&path, opts).await.unwrap();
    let id = ReplicaId::new_random();
    pool.create_replica(id, ByteSize::mib(mib), true, ReplicaMeta::default()).await.unwrap();
    let r = pool.open_replica(id).unwrap();
    let t = Instant::now();
    for off in (0..mib).map(|m| m << 20) {
        r.write(off, IoBuf::zeroed(1 << 20), false).await.unwrap();
    }
    r.flush().await.unwrap();
    println!("filled {mib} MiB in {:?}", t.elapsed());
    run(&r, "4k randwrite QD32", 32, 4096, true, true).await;
    run(&r, "4k randread QD32", 32, 4096, false, true).await;
    run(&r, "4k randread QD1", 1, 4096, false, true).await;
    run(&r, "1M seqwrite QD8", 8, 1 << 20, true, false).await;
    run(&r, "1M seqread QD8", 8, 1 << 20, false, false).await;
    pool.close().await.unwrap();
    let _ = std::fs::remove_file(&path);
}
