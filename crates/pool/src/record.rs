//! The journal records and their encoding (format version 1).
//!
//! A record is a one-byte type tag followed by fixed-width little-endian fields; ids are 16
//! raw bytes, optional ids a presence byte and 16 bytes, extent lists a u32 count and
//! (v, p, n) triples of u32. Records carry no checksum of their own: the commit block that
//! holds them does (see `journal.rs`).

use trireme_types::{ReplicaId, SnapshotId, VolumeId};

use crate::codec::{Dec, Enc};
use crate::{PoolError, ReplicaMeta};

/// A run of `n` virtual clusters from `v` mapped to physical clusters from `p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) v: u32,
    pub(crate) p: u32,
    pub(crate) n: u32,
}

/// One metadata change, as journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    CreateReplica {
        id: ReplicaId,
        size: u64,
        thin: bool,
        meta: ReplicaMeta,
        extents: Vec<Extent>,
    },
    Clone {
        id: ReplicaId,
        snapshot: SnapshotId,
        meta: ReplicaMeta,
    },
    DestroyReplica {
        id: ReplicaId,
    },
    Resize {
        id: ReplicaId,
        size: u64,
        extents: Vec<Extent>,
    },
    SetMeta {
        id: ReplicaId,
        meta: ReplicaMeta,
    },
    /// Point virtual cluster `v` at the freshly written cluster `p`, releasing what it held.
    Map {
        id: ReplicaId,
        v: u32,
        p: u32,
    },
    Unmap {
        id: ReplicaId,
        v: u32,
    },
    Snapshot {
        id: SnapshotId,
        source: ReplicaId,
        created: u64,
    },
    DestroySnapshot {
        id: SnapshotId,
    },
}

pub(crate) fn encode_meta(e: &mut Enc, m: &ReplicaMeta) {
    e.opt16(m.volume.as_ref().map(VolumeId::as_bytes));
    e.u64(m.generation);
    e.u64(m.epoch);
}

pub(crate) fn decode_meta(d: &mut Dec<'_>) -> Result<ReplicaMeta, PoolError> {
    Ok(ReplicaMeta {
        volume: d.opt16()?.map(VolumeId::from_bytes),
        generation: d.u64()?,
        epoch: d.u64()?,
    })
}

pub(crate) fn encode_extents(e: &mut Enc, xs: &[Extent]) {
    e.u32(xs.len() as u32);
    for x in xs {
        e.u32(x.v);
        e.u32(x.p);
        e.u32(x.n);
    }
}

pub(crate) fn decode_extents(d: &mut Dec<'_>) -> Result<Vec<Extent>, PoolError> {
    let n = d.u32()? as usize;
    if n > d.remaining() / 12 {
        return Err(d.bad(format!("{n} extents do not fit")));
    }
    let mut xs = Vec::with_capacity(n);
    for _ in 0..n {
        xs.push(Extent { v: d.u32()?, p: d.u32()?, n: d.u32()? });
    }
    Ok(xs)
}

const T_CREATE: u8 = 1;
const T_CLONE: u8 = 2;
const T_DESTROY: u8 = 3;
const T_RESIZE: u8 = 4;
const T_SETMETA: u8 = 5;
const T_MAP: u8 = 6;
const T_UNMAP: u8 = 7;
const T_SNAPSHOT: u8 = 8;
const T_DESTROY_SNAPSHOT: u8 = 9;

pub(crate) fn encode_record(e: &mut Enc, rec: &Record) {
    match rec {
        Record::CreateReplica { id, size, thin, meta, extents } => {
            e.u8(T_CREATE);
            e.bytes(id.as_bytes());
            e.u64(*size);
            e.u8(u8::from(*thin));
            encode_meta(e, meta);
            encode_extents(e, extents);
        }
        Record::Clone { id, snapshot, meta } => {
            e.u8(T_CLONE);
            e.bytes(id.as_bytes());
            e.bytes(snapshot.as_bytes());
            encode_meta(e, meta);
        }
        Record::DestroyReplica { id } => {
            e.u8(T_DESTROY);
            e.bytes(id.as_bytes());
        }
        Record::Resize { id, size, extents } => {
            e.u8(T_RESIZE);
            e.bytes(id.as_bytes());
            e.u64(*size);
            encode_extents(e, extents);
        }
        Record::SetMeta { id, meta } => {
            e.u8(T_SETMETA);
            e.bytes(id.as_bytes());
            encode_meta(e, meta);
        }
        Record::Map { id, v, p } => {
            e.u8(T_MAP);
            e.bytes(id.as_bytes());
            e.u32(*v);
            e.u32(*p);
        }
        Record::Unmap { id, v } => {
            e.u8(T_UNMAP);
            e.bytes(id.as_bytes());
            e.u32(*v);
        }
        Record::Snapshot { id, source, created } => {
            e.u8(T_SNAPSHOT);
            e.bytes(id.as_bytes());
            e.bytes(source.as_bytes());
            e.u64(*created);
        }
        Record::DestroySnapshot { id } => {
            e.u8(T_DESTROY_SNAPSHOT);
            e.bytes(id.as_bytes());
        }
    }
}

pub(crate) fn decode_record(d: &mut Dec<'_>) -> Result<Record, PoolError> {
    let rid = |d: &mut Dec<'_>| d.b16().map(ReplicaId::from_bytes);
    let sid = |d: &mut Dec<'_>| d.b16().map(SnapshotId::from_bytes);
    Ok(match d.u8()? {
        T_CREATE => Record::CreateReplica {
            id: rid(d)?,
            size: d.u64()?,
            thin: d.u8()? != 0,
            meta: decode_meta(d)?,
            extents: decode_extents(d)?,
        },
        T_CLONE => Record::Clone { id: rid(d)?, snapshot: sid(d)?, meta: decode_meta(d)? },
        T_DESTROY => Record::DestroyReplica { id: rid(d)? },
        T_RESIZE => Record::Resize { id: rid(d)?, size: d.u64()?, extents: decode_extents(d)? },
        T_SETMETA => Record::SetMeta { id: rid(d)?, meta: decode_meta(d)? },
        T_MAP => Record::Map { id: rid(d)?, v: d.u32()?, p: d.u32()? },
        T_UNMAP => Record::Unmap { id: rid(d)?, v: d.u32()? },
        T_SNAPSHOT => Record::Snapshot { id: sid(d)?, source: rid(d)?, created: d.u64()? },
        T_DESTROY_SNAPSHOT => Record::DestroySnapshot { id: sid(d)? },
        t => return Err(d.bad(format!("unknown record type {t}"))),
    })
}
