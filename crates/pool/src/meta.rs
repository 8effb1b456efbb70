//! The pool's metadata state and the records that change it.
//!
//! [`Meta`] is the in-memory truth: the replica table (with each replica's small engine
//! metadata), one cluster map per replica and per snapshot, and a reference count per physical
//! cluster. Every change is expressed as a [`Record`] and goes through [`Meta::apply`], both
//! live (then the record is also queued for the journal) and at import (replaying the journal on
//! top of a checkpoint), so live and replayed states cannot drift apart.
//!
//! Reference counts are never stored: a checkpoint holds only the maps, and import derives the
//! counts from them. A cluster reserved for an allocation whose record never reached the
//! journal is therefore free again after a crash, with nothing to leak.
//!
//! A cluster whose last reference goes away is *quarantined*, not freed, until the commit that
//! records the release is durable: otherwise it could be handed to another replica and
//! overwritten while a crash could still bring back the old mapping, exposing the new owner's
//! data through the old one.

use std::collections::HashMap;
use std::sync::Arc;

use trireme_types::{ReplicaId, SnapshotId};

use crate::codec::{Dec, Enc};
use crate::map::ClusterMap;
pub(crate) use crate::record::{Extent, Record, decode_record, encode_record};
use crate::record::{decode_extents, decode_meta, encode_extents, encode_meta};
use crate::replica::ReplicaIo;
use crate::{PoolError, ReplicaMeta};

/// Map entry for a hole; otherwise an entry is the physical cluster number plus one.
pub(crate) const HOLE: u32 = 0;
/// Reference count of a quarantined cluster (released, release not yet durable).
const QUARANTINED: u32 = u32::MAX;

pub(crate) fn clusters_for(size: u64, cluster_size: u64) -> u64 {
    size.div_ceil(cluster_size)
}

/// Map length for a stored size, refusing sizes no valid pool could have written.
fn map_len(size: u64, cluster_size: u64) -> Result<u64, PoolError> {
    let n = clusters_for(size, cluster_size);
    if size == 0 || n >= u64::from(u32::MAX) {
        return Err(PoolError::corrupt(format!("stored size {size} is out of range")));
    }
    Ok(n)
}

pub(crate) struct ReplicaState {
    pub(crate) size: u64,
    pub(crate) thin: bool,
    pub(crate) meta: ReplicaMeta,
    pub(crate) parent: Option<SnapshotId>,
    pub(crate) map: ClusterMap,
    pub(crate) mapped: u64,
    /// Runtime I/O state shared with open handles (not persisted).
    pub(crate) io: Arc<ReplicaIo>,
}

pub(crate) struct SnapshotState {
    pub(crate) source: ReplicaId,
    pub(crate) size: u64,
    pub(crate) created: u64,
    pub(crate) map: ClusterMap,
}

pub(crate) struct Meta {
    pub(crate) cluster_size: u64,
    pub(crate) cluster_count: u32,
    refcount: Vec<u32>,
    free: u64,
    /// Free clusters per group of [`GROUP`], so allocation skips full stretches of a big pool.
    group_free: Vec<u32>,
    cursor: u32,
    pub(crate) replicas: HashMap<ReplicaId, ReplicaState>,
    pub(crate) snapshots: HashMap<SnapshotId, SnapshotState>,
    /// Encoded records not yet committed, and their count.
    pub(crate) pending: Enc,
    pub(crate) pending_n: u32,
    /// Clusters released by the pending records.
    pub(crate) quarantine: Vec<u32>,
    /// Virtual clusters being allocated or copied; waiters wait for the semaphore to close.
    pub(crate) inflight: HashMap<(ReplicaId, u32), Arc<tokio::sync::Semaphore>>,
    /// Replicas whose creation has reserved its clusters and not yet journaled them.
    pub(crate) creating: std::collections::HashSet<ReplicaId>,
}

impl Meta {
    pub(crate) fn new(cluster_size: u64, cluster_count: u32) -> Self {
        Self {
            cluster_size,
            cluster_count,
            refcount: vec![0; cluster_count as usize],
            free: u64::from(cluster_count),
            group_free: full_groups(cluster_count),
            cursor: 0,
            replicas: HashMap::new(),
            snapshots: HashMap::new(),
            pending: Enc::default(),
            pending_n: 0,
            quarantine: Vec::new(),
            inflight: HashMap::new(),
            creating: std::collections::HashSet::new(),
        }
    }

    pub(crate) fn free_clusters(&self) -> u64 {
        self.free
    }

    pub(crate) fn used_clusters(&self) -> u64 {
        u64::from(self.cluster_count) - self.free
    }

    pub(crate) fn refcount(&self, p: u32) -> u32 {
        self.refcount.get(p as usize).copied().unwrap_or(0)
    }

    /// Reserves one free cluster (next fit). The caller zeroes or fills it before recording a
    /// mapping to it, or returns it with [`Meta::unreserve`].
    pub(crate) fn reserve(&mut self) -> Option<u32> {
        if self.free == 0 {
            return None;
        }
        let n = u64::from(self.cluster_count);
        let groups = self.group_free.len() as u64;
        let start = u64::from(self.cursor) % n;
        let g0 = start / GROUP;
        // From the cursor to the end of the pool, then from the start back to the cursor.
        for k in 0..=groups {
            let g = (g0 + k) % groups;
            if self.group_free[g as usize] == 0 {
                continue;
            }
            let lo = if k == 0 { start } else { g * GROUP };
            let hi = ((g + 1) * GROUP).min(n);
            for p in lo..hi {
                if self.refcount[p as usize] == 0 {
                    let p = p as u32;
                    self.refcount[p as usize] = 1;
                    self.took(p);
                    self.cursor = ((u64::from(p) + 1) % n) as u32;
                    return Some(p);
                }
            }
        }
        None
    }

    fn took(&mut self, p: u32) {
        self.free -= 1;
        self.group_free[(u64::from(p) / GROUP) as usize] -= 1;
    }

    fn gave(&mut self, p: u32) {
        self.free += 1;
        self.group_free[(u64::from(p) / GROUP) as usize] += 1;
    }

    /// Reserves `count` clusters, coalesced into runs, or none at all.
    pub(crate) fn reserve_many(&mut self, count: u64) -> Option<Vec<Extent>> {
        if count > self.free {
            return None;
        }
        let mut out: Vec<Extent> = Vec::new();
        for v in 0..count {
            // Cannot fail: `count <= free` was checked and nothing else runs under the lock.
            let Some(p) = self.reserve() else { break };
            match out.last_mut() {
                Some(e) if e.p + e.n == p => e.n += 1,
                _ => out.push(Extent { v: v as u32, p, n: 1 }),
            }
        }
        Some(out)
    }

    pub(crate) fn unreserve(&mut self, p: u32) {
        if self.refcount.get(p as usize) == Some(&1) {
            self.refcount[p as usize] = 0;
            self.gave(p);
        }
    }

    pub(crate) fn unreserve_extents(&mut self, extents: &[Extent]) {
        for e in extents {
            for i in 0..e.n {
                self.unreserve(e.p + i);
            }
        }
    }

    fn incref(&mut self, p: u32) -> Result<(), PoolError> {
        let r = self
            .refcount
            .get_mut(p as usize)
            .ok_or_else(|| PoolError::corrupt(format!("cluster {p} is beyond the pool")))?;
        let was_free = *r == 0;
        *r = r.saturating_add(1);
        if was_free {
            self.took(p);
        }
        Ok(())
    }

    fn decref(&mut self, p: u32, live: bool) {
        let Some(r) = self.refcount.get_mut(p as usize) else { return };
        if *r == 0 || *r == QUARANTINED {
            return;
        }
        *r -= 1;
        if *r == 0 {
            if live {
                *r = QUARANTINED;
                self.quarantine.push(p);
            } else {
                self.gave(p);
            }
        }
    }

    /// Returns quarantined clusters to the free pool once their release is durable.
    pub(crate) fn release(&mut self, clusters: Vec<u32>) {
        for p in clusters {
            if let Some(r) = self.refcount.get_mut(p as usize)
                && *r == QUARANTINED
            {
                *r = 0;
                self.gave(p);
            }
        }
    }

    /// Applies `rec` and queues it for the journal.
    pub(crate) fn log(&mut self, rec: Record) -> Result<(), PoolError> {
        self.apply(&rec, true)?;
        encode_record(&mut self.pending, &rec);
        self.pending_n += 1;
        Ok(())
    }

    fn check_extents(&self, extents: &[Extent], map_len: u64) -> Result<(), PoolError> {
        for e in extents {
            let v_end = u64::from(e.v) + u64::from(e.n);
            let p_end = u64::from(e.p) + u64::from(e.n);
            if v_end > map_len || p_end > u64::from(self.cluster_count) {
                return Err(PoolError::corrupt(format!("extent {e:?} out of range")));
            }
        }
        Ok(())
    }

    fn map_extents(
        &mut self,
        map: &mut ClusterMap,
        extents: &[Extent],
        incref: bool,
    ) -> Result<u64, PoolError> {
        let mut mapped = 0;
        for e in extents {
            for i in 0..e.n {
                if map.set(e.v + i, e.p + i + 1) != HOLE {
                    return Err(PoolError::corrupt("extent maps an already mapped cluster"));
                }
                mapped += 1;
                if incref {
                    self.incref(e.p + i)?;
                }
            }
        }
        Ok(mapped)
    }

    /// Applies one record. `live` means the change happens now (reserved clusters already hold
    /// their reference; released clusters are quarantined) rather than in a replay.
    pub(crate) fn apply(&mut self, rec: &Record, live: bool) -> Result<(), PoolError> {
        let cs = self.cluster_size;
        match rec {
            Record::CreateReplica { id, size, thin, meta, extents } => {
                if self.replicas.contains_key(id) {
                    return Err(PoolError::corrupt(format!("replica {id} created twice")));
                }
                let mut map = ClusterMap::new(map_len(*size, cs)?);
                self.check_extents(extents, map.len())?;
                let mapped = self.map_extents(&mut map, extents, !live)?;
                self.replicas.insert(
                    *id,
                    ReplicaState {
                        size: *size,
                        thin: *thin,
                        meta: *meta,
                        parent: None,
                        map,
                        mapped,
                        io: Arc::new(ReplicaIo::new(*size)),
                    },
                );
            }
            Record::Clone { id, snapshot, meta } => {
                if self.replicas.contains_key(id) {
                    return Err(PoolError::corrupt(format!("replica {id} created twice")));
                }
                let s = self.snapshots.get(snapshot).ok_or_else(|| {
                    PoolError::corrupt(format!("clone of unknown snapshot {snapshot}"))
                })?;
                let (map, size) = (s.map.clone(), s.size);
                let mut mapped = 0;
                for (_, e) in map.mapped() {
                    self.incref(e - 1)?;
                    mapped += 1;
                }
                self.replicas.insert(
                    *id,
                    ReplicaState {
                        size,
                        thin: true,
                        meta: *meta,
                        parent: Some(*snapshot),
                        map,
                        mapped,
                        io: Arc::new(ReplicaIo::new(size)),
                    },
                );
            }
            Record::DestroyReplica { id } => {
                let r = self.replicas.remove(id).ok_or_else(|| {
                    PoolError::corrupt(format!("destroy of unknown replica {id}"))
                })?;
                for (_, e) in r.map.mapped() {
                    self.decref(e - 1, live);
                }
            }
            Record::Resize { id, size, extents } => {
                let mut r = self
                    .replicas
                    .remove(id)
                    .ok_or_else(|| PoolError::corrupt(format!("resize of unknown replica {id}")))?;
                let res = (|| {
                    if *size < r.size {
                        return Err(PoolError::corrupt("resize shrinks a replica"));
                    }
                    r.map.resize(map_len(*size, cs)?);
                    self.check_extents(extents, r.map.len())?;
                    r.mapped += self.map_extents(&mut r.map, extents, !live)?;
                    r.size = *size;
                    Ok(())
                })();
                r.io.set_size(r.size);
                self.replicas.insert(*id, r);
                res?;
            }
            Record::SetMeta { id, meta } => {
                let r = self
                    .replicas
                    .get_mut(id)
                    .ok_or_else(|| PoolError::corrupt(format!("meta of unknown replica {id}")))?;
                r.meta = *meta;
            }
            Record::Map { id, v, p } => {
                let count = self.cluster_count;
                let r = self
                    .replicas
                    .get_mut(id)
                    .ok_or_else(|| PoolError::corrupt(format!("map in unknown replica {id}")))?;
                if u64::from(*v) >= r.map.len() || *p >= count {
                    return Err(PoolError::corrupt(format!("map {v}->{p} out of range")));
                }
                let old = r.map.set(*v, p + 1);
                if old == HOLE {
                    r.mapped += 1;
                }
                if !live {
                    self.incref(*p)?;
                }
                if old != HOLE {
                    self.decref(old - 1, live);
                }
            }
            Record::Unmap { id, v } => {
                let r = self
                    .replicas
                    .get_mut(id)
                    .ok_or_else(|| PoolError::corrupt(format!("unmap in unknown replica {id}")))?;
                if u64::from(*v) >= r.map.len() {
                    return Err(PoolError::corrupt(format!("unmap of {v} out of range")));
                }
                let old = r.map.set(*v, HOLE);
                if old != HOLE {
                    r.mapped -= 1;
                    self.decref(old - 1, live);
                }
            }
            Record::Snapshot { id, source, created } => {
                if self.snapshots.contains_key(id) {
                    return Err(PoolError::corrupt(format!("snapshot {id} created twice")));
                }
                let r = self.replicas.get(source).ok_or_else(|| {
                    PoolError::corrupt(format!("snapshot of unknown replica {source}"))
                })?;
                let (map, size) = (r.map.clone(), r.size);
                for (_, e) in map.mapped() {
                    self.incref(e - 1)?;
                }
                self.snapshots
                    .insert(*id, SnapshotState { source: *source, size, created: *created, map });
            }
            Record::DestroySnapshot { id } => {
                let s = self.snapshots.remove(id).ok_or_else(|| {
                    PoolError::corrupt(format!("destroy of unknown snapshot {id}"))
                })?;
                for (_, e) in s.map.mapped() {
                    self.decref(e - 1, live);
                }
            }
        }
        Ok(())
    }

    /// Recomputes every reference count from the maps (after loading a checkpoint).
    pub(crate) fn derive_refcounts(&mut self) -> Result<(), PoolError> {
        self.refcount.iter_mut().for_each(|r| *r = 0);
        self.free = u64::from(self.cluster_count);
        self.group_free = full_groups(self.cluster_count);
        let mut all: Vec<u32> = Vec::new();
        for r in self.replicas.values() {
            all.extend(r.map.mapped().map(|(_, e)| e - 1));
        }
        for s in self.snapshots.values() {
            all.extend(s.map.mapped().map(|(_, e)| e - 1));
        }
        for p in all {
            self.incref(p)?;
        }
        Ok(())
    }

    /// Encodes the whole state for a checkpoint.
    pub(crate) fn encode_state(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(self.encoded_len_estimate());
        let mut ids: Vec<&ReplicaId> = self.replicas.keys().collect();
        ids.sort();
        e.u32(ids.len() as u32);
        for id in ids {
            let r = &self.replicas[id];
            e.bytes(id.as_bytes());
            e.u64(r.size);
            e.u8(u8::from(r.thin));
            encode_meta(&mut e, &r.meta);
            e.opt16(r.parent.as_ref().map(SnapshotId::as_bytes));
            encode_extents(&mut e, &extents_of(&r.map));
        }
        let mut sids: Vec<&SnapshotId> = self.snapshots.keys().collect();
        sids.sort();
        e.u32(sids.len() as u32);
        for id in sids {
            let s = &self.snapshots[id];
            e.bytes(id.as_bytes());
            e.bytes(s.source.as_bytes());
            e.u64(s.size);
            e.u64(s.created);
            encode_extents(&mut e, &extents_of(&s.map));
        }
        e.buf
    }

    /// An upper bound of [`Meta::encode_state`]'s length without encoding (used to refuse a
    /// snapshot or clone whose checkpoint could no longer fit).
    pub(crate) fn encoded_len_estimate(&self) -> usize {
        let maps: usize = self.replicas.values().map(|r| r.mapped as usize).sum::<usize>()
            + self.snapshots.values().map(|s| s.map.mapped().count()).sum::<usize>();
        8 + self.replicas.len() * 96 + self.snapshots.len() * 64 + maps * 12
    }

    /// Loads a checkpoint's state.
    pub(crate) fn decode_state(
        cluster_size: u64,
        cluster_count: u32,
        buf: &[u8],
    ) -> Result<Self, PoolError> {
        let mut m = Self::new(cluster_size, cluster_count);
        let mut d = Dec::new(buf, "checkpoint");
        let n = d.u32()?;
        for _ in 0..n {
            let id = ReplicaId::from_bytes(d.b16()?);
            let size = d.u64()?;
            let thin = d.u8()? != 0;
            let meta = decode_meta(&mut d)?;
            let parent = d.opt16()?.map(SnapshotId::from_bytes);
            let extents = decode_extents(&mut d)?;
            let mut map = ClusterMap::new(map_len(size, cluster_size)?);
            m.check_extents(&extents, map.len())?;
            let mapped = m.map_extents(&mut map, &extents, false)?;
            let io = Arc::new(ReplicaIo::new(size));
            m.replicas.insert(id, ReplicaState { size, thin, meta, parent, map, mapped, io });
        }
        let n = d.u32()?;
        for _ in 0..n {
            let id = SnapshotId::from_bytes(d.b16()?);
            let source = ReplicaId::from_bytes(d.b16()?);
            let size = d.u64()?;
            let created = d.u64()?;
            let extents = decode_extents(&mut d)?;
            let mut map = ClusterMap::new(map_len(size, cluster_size)?);
            m.check_extents(&extents, map.len())?;
            m.map_extents(&mut map, &extents, false)?;
            m.snapshots.insert(id, SnapshotState { source, size, created, map });
        }
        m.derive_refcounts()?;
        Ok(m)
    }

    /// Consistency check for tests: counts derived from the maps match the live counts.
    #[cfg(test)]
    pub(crate) fn check(&self) {
        let mut expect = vec![0u32; self.cluster_count as usize];
        for r in self.replicas.values() {
            let mut mapped = 0;
            for (_, e) in r.map.mapped() {
                expect[(e - 1) as usize] += 1;
                mapped += 1;
            }
            assert_eq!(mapped, r.mapped);
        }
        for s in self.snapshots.values() {
            for (_, e) in s.map.mapped() {
                expect[(e - 1) as usize] += 1;
            }
        }
        let mut free = 0;
        for (p, (&live, &want)) in self.refcount.iter().zip(&expect).enumerate() {
            match live {
                0 | QUARANTINED => {
                    assert_eq!(want, 0, "cluster {p} free but referenced");
                    free += u64::from(live == 0);
                }
                n => assert_eq!(n, want, "cluster {p} refcount"),
            }
        }
        assert_eq!(free, self.free);
        self.check_groups();
    }

    /// The per-group free counts match the reference counts (tests).
    #[cfg(test)]
    pub(crate) fn check_groups(&self) {
        for (g, &gf) in self.group_free.iter().enumerate() {
            let lo = g * GROUP as usize;
            let hi = (lo + GROUP as usize).min(self.refcount.len());
            let real = self.refcount[lo..hi].iter().filter(|&&r| r == 0).count();
            assert_eq!(gf as usize, real, "group {g} free count");
        }
    }
}

/// Allocation groups: 1024 clusters (1 GiB with the default cluster size).
const GROUP: u64 = 1024;

fn full_groups(cluster_count: u32) -> Vec<u32> {
    let n = u64::from(cluster_count);
    (0..n.div_ceil(GROUP)).map(|g| (n - g * GROUP).min(GROUP) as u32).collect()
}

/// Coalesces a map into extents of consecutive virtual and physical clusters.
pub(crate) fn extents_of(map: &ClusterMap) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for (v, e) in map.mapped() {
        let p = e - 1;
        match out.last_mut() {
            Some(x) if x.v + x.n == v && x.p + x.n == p => x.n += 1,
            _ => out.push(Extent { v, p, n: 1 }),
        }
    }
    out
}
