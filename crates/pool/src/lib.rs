//! Trireme's pool format and pool library: superblocks, metadata journal, thin/thick replicas, COW snapshots and clones, io_uring data path
