//! Property: any sequence of I/O through the client against the in-memory export behaves like
//! a plain byte array (writes land, trims and zeroes read back as zeroes, out-of-range requests
//! fail without effect, block status never calls data a hole), including batches of writes in
//! flight together.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trireme_iobuf::IoBuf;
use trireme_nbd::testing::{MemExport, MemRegistry};
use trireme_nbd::{Client, ClientError, ClientOptions, ServerConfig, serve_tcp};

const SIZE: u64 = 1 << 20;
const MAX_LEN: u64 = 96 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u8,
        fua: bool,
    },
    Read {
        off: u64,
        len: u64,
    },
    Trim {
        off: u64,
        len: u64,
    },
    Zero {
        off: u64,
        len: u64,
        may_trim: bool,
    },
    Flush,
    Status {
        off: u64,
        len: u64,
    },
    /// Disjoint writes, all in flight at once.
    Parallel(Vec<(u64, u64, u8)>),
}

/// Mostly in range, sometimes straddling or past the end.
fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        8 => (0..SIZE, 1..=MAX_LEN).prop_map(|(o, l)| (o, l.min(SIZE - o))),
        1 => (SIZE - 8192..SIZE + 4096, 1..=16384u64),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u8>(), any::<bool>())
            .prop_map(|((off, len), seed, fua)| Op::Write { off, len, seed, fua }),
        4 => range().prop_map(|(off, len)| Op::Read { off, len }),
        1 => range().prop_map(|(off, len)| Op::Trim { off, len }),
        1 => (range(), any::<bool>()).prop_map(|((off, len), may_trim)| Op::Zero { off, len, may_trim }),
        1 => Just(Op::Flush),
        1 => range().prop_map(|(off, len)| Op::Status { off, len }),
        2 => prop::collection::vec((0..16u64, 1..=32768u64, any::<u8>()), 1..8).prop_map(|v| {
            // Slot i owns [i*64K, (i+1)*64K): writes in different slots never overlap.
            let mut seen = std::collections::HashSet::new();
            Op::Parallel(
                v.into_iter()
                    .filter(|(slot, ..)| seen.insert(*slot))
                    .map(|(slot, len, seed)| (slot * 65536 + (65536 - len.min(65536)) / 2, len.min(65536), seed))
                    .collect(),
            )
        }),
    ]
}

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i as u8).wrapping_mul(31)) ^ (i >> 8) as u8).collect()
}

fn in_range(off: u64, len: u64) -> bool {
    off + len <= SIZE
}

async fn run(ops: Vec<Op>) {
    let registry = Arc::new(MemRegistry::new());
    registry.insert("m", "model test", Arc::new(MemExport::new(SIZE)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve_tcp(listener, registry, ServerConfig::default(), stop.clone()));
    let opts = ClientOptions { io_timeout: Duration::from_secs(60), ..Default::default() };
    let c = Arc::new(Client::connect(addr.into(), "m", opts).await.unwrap());
    let mut model = vec![0u8; SIZE as usize];

    for op in ops {
        match op {
            Op::Write { off, len, seed, fua } => {
                let data = pattern(len, seed);
                let r = c.write(off, IoBuf::copy_from(&data), fua).await;
                if in_range(off, len) {
                    r.unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                } else {
                    assert!(matches!(r, Err(ClientError::Server { .. })), "{r:?}");
                }
            }
            Op::Read { off, len } => {
                let r = c.read(off, len as u32).await;
                if in_range(off, len) {
                    assert!(
                        r.unwrap()[..] == model[off as usize..(off + len) as usize],
                        "read {off}+{len}"
                    );
                } else {
                    assert!(matches!(r, Err(ClientError::Server { .. })), "{r:?}");
                }
            }
            Op::Trim { off, len } | Op::Zero { off, len, .. } => {
                let r = match op {
                    Op::Zero { may_trim, .. } => c.write_zeroes(off, len, may_trim, false).await,
                    _ => c.trim(off, len, false).await,
                };
                if in_range(off, len) {
                    r.unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                } else {
                    assert!(matches!(r, Err(ClientError::Server { .. })), "{r:?}");
                }
            }
            Op::Flush => c.flush().await.unwrap(),
            Op::Status { off, len } => {
                let r = c.block_status(off, len).await;
                if off >= SIZE || !in_range(off, len) {
                    assert!(matches!(r, Err(ClientError::Server { .. })), "{r:?}");
                    continue;
                }
                let ext = r.unwrap();
                let total: u64 = ext.iter().map(|e| e.length).sum();
                assert!(total > 0 && total <= len, "{ext:?} for {off}+{len}");
                let mut pos = off;
                for e in ext {
                    if e.zero || e.hole {
                        let span = &model[pos as usize..(pos + e.length) as usize];
                        assert!(span.iter().all(|&b| b == 0), "data reported as hole at {pos}");
                    }
                    pos += e.length;
                }
            }
            Op::Parallel(writes) => {
                let futs = writes.iter().map(|&(off, len, seed)| {
                    let c = c.clone();
                    let data = IoBuf::copy_from(&pattern(len, seed));
                    async move { c.write(off, data, false).await }
                });
                for r in futures::future::join_all(futs).await {
                    r.unwrap();
                }
                for (off, len, seed) in writes {
                    model[off as usize..(off + len) as usize].copy_from_slice(&pattern(len, seed));
                }
            }
        }
        assert!(c.is_alive());
    }

    // The whole device, in 16 reads in flight together.
    let chunk = SIZE / 16;
    let reads = (0..16u64).map(|i| {
        let c = c.clone();
        async move { c.read(i * chunk, chunk as u32).await.unwrap() }
    });
    for (i, got) in futures::future::join_all(reads).await.into_iter().enumerate() {
        let start = i * chunk as usize;
        assert!(got[..] == model[start..start + chunk as usize], "final chunk {i}");
    }
    c.disconnect().await.unwrap();
    stop.cancel();
    server.await.unwrap().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn client_behaves_like_a_byte_array(ops in prop::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(ops));
    }
}
