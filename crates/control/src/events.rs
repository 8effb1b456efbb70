//! Events: what changed and why, with an increasing sequence number, persisted in the store
//! with bounded retention. Reads are served from memory (the retained window is loaded at
//! start); a failed store write is logged and the event still reaches readers, because an event
//! is a record of something that already happened and must not fail the operation itself.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use trireme_api::Event;
use trireme_store::Store;

use crate::registry::records::{self, EVENTS, EventRecord, RECORD_VERSION, event_key};

/// How many events are kept.
pub const RETAINED: usize = 10_000;

/// The kinds of resource an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    Pool,
    Volume,
    Replica,
    Nexus,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Pool => "pool",
            Self::Volume => "volume",
            Self::Replica => "replica",
            Self::Nexus => "nexus",
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug)]
pub struct EventLog {
    store: Arc<dyn Store>,
    // Held only for in-memory updates; the store write happens after it is released.
    events: parking_lot::Mutex<VecDeque<Event>>,
    retained: usize,
}

impl EventLog {
    /// Loads the retained events from the store.
    pub async fn load(store: Arc<dyn Store>, retained: usize) -> Result<Self, crate::ControlError> {
        let mut events = VecDeque::new();
        for (key, v) in store.list(EVENTS).await? {
            match records::decode::<EventRecord>(&key, &v.value) {
                Ok(r) => events.push_back(r.event),
                Err(e) => tracing::warn!(%key, "skipping unreadable event: {e}"),
            }
        }
        Ok(Self { store, events: parking_lot::Mutex::new(events), retained: retained.max(1) })
    }

    /// Records an event; returns its sequence number.
    pub async fn record(
        &self,
        kind: Kind,
        id: impl ToString,
        reason: &str,
        message: impl Into<String>,
    ) -> u64 {
        let (event, dropped) = {
            let mut events = self.events.lock();
            let seq = events.back().map(|e| e.seq + 1).unwrap_or(1);
            let event = Event {
                seq,
                time_ms: now_ms(),
                kind: kind.as_str().to_owned(),
                id: id.to_string(),
                reason: reason.to_owned(),
                message: message.into(),
            };
            events.push_back(event.clone());
            let mut dropped = Vec::new();
            while events.len() > self.retained {
                if let Some(old) = events.pop_front() {
                    dropped.push(old.seq);
                }
            }
            (event, dropped)
        };
        tracing::info!(kind = %event.kind, id = %event.id, reason = %event.reason, "{}", event.message);
        let mut txn = trireme_store::Txn::new();
        let key = event_key(event.seq);
        match records::encode(&key, &EventRecord { version: RECORD_VERSION, event: event.clone() })
        {
            Ok(bytes) => txn = txn.put(key, bytes),
            Err(e) => tracing::warn!("cannot encode event: {e}"),
        }
        for seq in dropped {
            txn = txn.delete(event_key(seq));
        }
        if let Err(e) = self.store.txn(txn).await {
            tracing::warn!(seq = event.seq, "cannot persist event: {e}");
        }
        event.seq
    }

    /// Retained events with a sequence number above `after`.
    pub fn after(&self, after: u64) -> Vec<Event> {
        self.events.lock().iter().filter(|e| e.seq > after).cloned().collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sequence_retention_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(trireme_store::RedbStore::open(dir.path().join("s.redb")).await.unwrap());
        let log = EventLog::load(store.clone(), 3).await.unwrap();
        for i in 0..5 {
            log.record(Kind::Volume, "v", "created", format!("n{i}")).await;
        }
        let all = log.after(0);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(log.after(4).len(), 1);
        assert_eq!(
            store.list(EVENTS).await.unwrap().len(),
            3,
            "old events are deleted from the store"
        );
        let again = EventLog::load(store, 3).await.unwrap();
        assert_eq!(again.after(0), all);
        assert_eq!(
            again.record(Kind::Node, "n", "online", "x").await,
            6,
            "seq continues after reload"
        );
    }
}
