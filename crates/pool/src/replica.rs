//! An open replica handle: skeleton.

use trireme_iobuf::IoBuf;
use trireme_types::ReplicaId;

use crate::{Allocation, PoolError};

#[derive(Clone)]
pub struct Replica {
    id: ReplicaId,
}

#[allow(unused_variables)]
impl Replica {
    pub fn id(&self) -> ReplicaId {
        self.id
    }
    pub fn size(&self) -> u64 {
        todo!()
    }
    pub async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, PoolError> {
        todo!()
    }
    pub async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), PoolError> {
        todo!()
    }
    pub async fn flush(&self) -> Result<(), PoolError> {
        todo!()
    }
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), PoolError> {
        todo!()
    }
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> Result<(), PoolError> {
        todo!()
    }
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Allocation>, PoolError> {
        todo!()
    }
}
