//! Which volumes have an operation in flight: a second RPC for the same volume is refused with
//! ABORTED (the spec's "operation pending for volume") rather than racing the first.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

#[derive(Debug, Default, Clone)]
pub(crate) struct VolumeLocks(Arc<Mutex<HashSet<String>>>);

/// Held while an operation on a volume runs; releases the volume on drop.
#[derive(Debug)]
pub(crate) struct Guard(Arc<Mutex<HashSet<String>>>, String);

impl VolumeLocks {
    pub(crate) fn try_lock(&self, id: &str) -> Option<Guard> {
        // The set is never left half-updated, so a poisoned lock is still consistent.
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(id.to_owned()).then(|| Guard(self.0.clone(), id.to_owned()))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_operation_per_volume() {
        let locks = VolumeLocks::default();
        let g = locks.try_lock("a").unwrap();
        assert!(locks.try_lock("a").is_none());
        assert!(locks.try_lock("b").is_some());
        drop(g);
        assert!(locks.try_lock("a").is_some());
    }
}
