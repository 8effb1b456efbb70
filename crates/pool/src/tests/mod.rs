//! Library-level tests on the in-memory disk: format, import, corruption, the data path, and
//! property tests of the allocator, journal replay, snapshots and clones against a model.

mod basic;
mod crash;
mod files;
mod fuzz;
mod golden;
mod model;

use std::path::PathBuf;
use std::sync::Arc;

use trireme_iobuf::IoBuf;
use trireme_types::ByteSize;

use crate::io::mem::MemDev;
use crate::io::{Backend, Device};
use crate::{CreateOptions, Pool, Replica};

pub(crate) const CS: u64 = 64 << 10;

/// Geometry of the small test pools: 64 KiB clusters, 64 KiB checkpoint slots and a 32 KiB
/// journal (eight commits), so checkpoints happen often.
pub(crate) struct Geo {
    pub(crate) clusters: u64,
    pub(crate) ckpt: u64,
    pub(crate) journal: u64,
}

impl Geo {
    pub(crate) fn small() -> Self {
        Self { clusters: 96, ckpt: 64 << 10, journal: 32 << 10 }
    }
    pub(crate) fn disk_size(&self) -> u64 {
        let meta = 8192 + 2 * self.ckpt + self.journal;
        meta.div_ceil(CS) * CS + self.clusters * CS
    }
    pub(crate) fn meta_end(&self) -> u64 {
        8192 + 2 * self.ckpt + self.journal
    }
}

pub(crate) async fn mem_pool(geo: &Geo) -> (Arc<MemDev>, Arc<Pool>) {
    let dev = Arc::new(MemDev::new(geo.disk_size() as usize));
    let opts = CreateOptions { name: "test".into(), cluster_size: ByteSize::b(CS), size: None };
    let pool = Pool::create_on(
        PathBuf::from("mem"),
        Backend::mem(dev.clone()),
        opts,
        Some((geo.ckpt, geo.journal)),
    )
    .await
    .unwrap();
    (dev, pool)
}

pub(crate) async fn import_image(
    image: Vec<u8>,
) -> Result<(Arc<MemDev>, Arc<Pool>), crate::PoolError> {
    let dev = Arc::new(MemDev::from_image(image));
    let pool = Pool::import_on(PathBuf::from("mem"), Backend::mem(dev.clone())).await?;
    Ok((dev, pool))
}

pub(crate) async fn read_all(r: &Replica) -> Vec<u8> {
    let size = r.size();
    let mut out = Vec::with_capacity(size as usize);
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(1 << 20);
        out.extend_from_slice(&r.read(pos, n as u32).await.unwrap());
        pos += n;
    }
    out
}

pub(crate) fn buf(data: &[u8]) -> IoBuf {
    IoBuf::copy_from(data)
}

pub(crate) fn check_meta(pool: &Pool) {
    pool.inner().meta().check();
}
