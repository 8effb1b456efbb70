//! Pools: create or import every active pool its engine does not report; retry faulted ones
//! now and then (their disk may be back); finish deletes.

use std::time::{Duration, Instant};

use super::Reconciler;
use crate::events::Kind;
use crate::registry::Registry;
use crate::registry::records::PoolPhase;
use crate::registry::view;

/// How often a faulted pool's import is retried.
const FAULTED_RETRY: Duration = Duration::from_secs(30);

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
                    match listed.pools.get(p.record.id.as_str()) {
                        _ if p.record.phase == PoolPhase::Deleting => true,
                        None => true,
                        Some(o) => {
                            view::pool_state(o) == trireme_api::PoolState::Faulted
                                && self
                                    .pool_retries
                                    .get(&p.record.id)
                                    .is_none_or(|t| t.elapsed() >= FAULTED_RETRY)
                        }
                    }
                })
                .map(|p| p.record.clone())
                .collect()
        };
        for record in todo {
            self.pool_retries.insert(record.id.clone(), Instant::now());
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
