//! Pools: create or import every active pool its engine does not report; finish deletes.
//!
//! A pool the engine reports `faulted` is left alone: the engine retries the import itself
//! when it restarts, and asking it to create the pool again could format over a disk whose
//! superblocks are merely damaged.

use super::Reconciler;
use crate::events::Kind;
use crate::registry::Registry;
use crate::registry::records::PoolPhase;

impl Reconciler {
    pub(super) async fn pools(&mut self, reg: &Registry) {
        let todo: Vec<_> = {
            let st = reg.state.read();
            st.pools
                .values()
                .filter(|p| st.node_online(&p.record.node))
                .filter(|p| {
                    // Observed nodes only: acting on a node we could not list would be a guess.
                    let Some(listed) = st.observed.get(&p.record.node) else { return false };
                    p.record.phase == PoolPhase::Deleting
                        || !listed.pools.contains_key(p.record.id.as_str())
                })
                .map(|p| p.record.clone())
                .collect()
        };
        for record in todo {
            let subject = format!("pool {}", record.id);
            let result = match record.phase {
                PoolPhase::Active => reg.apply_pool(&record).await,
                PoolPhase::Deleting => reg.finish_pool_delete(&record).await,
            };
            match result {
                Ok(()) => self.succeeded(&subject),
                Err(e) => self.failed(reg, Kind::Pool, record.id.as_str(), subject, e).await,
            }
        }
    }
}
