//! Trireme's pool format and pool library: superblocks, metadata journal, thin/thick replicas,
//! COW snapshots and clones, io_uring data path.

mod error;
mod info;
mod pool;
mod replica;

pub use error::PoolError;
pub use info::{Allocation, CreateOptions, PoolInfo, ReplicaInfo, ReplicaMeta, SnapshotInfo};
pub use pool::Pool;
pub use replica::Replica;
