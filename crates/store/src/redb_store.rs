//! The embedded backend: one redb file. redb is synchronous, so every call runs on tokio's
//! blocking pool; redb itself serialises write transactions and commits durably (fsync) by
//! default, which is what a store of specs wants.
//!
//! Layout: table `kv` maps key → (8-byte little-endian revision ‖ value); table `meta` holds the
//! store-wide `revision` counter, bumped once per write transaction.

// redb::Error is large, but it only lives between the blocking worker and `backend()`, which
// boxes it.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};

use crate::{Compare, Op, Store, StoreError, Txn, TxnOutcome, Versioned};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

/// A [`Store`] in one redb file.
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").field("path", &self.path).finish()
    }
}

fn backend(op: &'static str) -> impl Fn(redb::Error) -> StoreError {
    move |e| StoreError::Backend { op, source: Box::new(e) }
}

impl RedbStore {
    /// Opens (or creates) the store file. Fails if another process holds it open.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let p = path.clone();
        let db = tokio::task::spawn_blocking(move || -> Result<Database, redb::Error> {
            let db = Database::create(&p)?;
            // Create the tables up front so read transactions never meet a missing table.
            let tx = db.begin_write()?;
            tx.open_table(KV)?;
            tx.open_table(META)?;
            tx.commit()?;
            Ok(db)
        })
        .await
        .map_err(|_| StoreError::Interrupted { op: "open" })?
        .map_err(|e| StoreError::Open { path: path.clone(), source: Box::new(e) })?;
        Ok(Self { db: Arc::new(db), path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|_| StoreError::Interrupted { op })?
            .map_err(backend(op))
    }
}

fn decode(raw: &[u8]) -> Versioned {
    // Values are always written by `encode`; a shorter one can only come from corruption,
    // which redb's checksums already catch, so treat it as revision 0 rather than panic.
    if raw.len() < 8 {
        return Versioned { value: raw.to_vec(), revision: 0 };
    }
    let (rev, value) = raw.split_at(8);
    let mut b = [0u8; 8];
    b.copy_from_slice(rev);
    Versioned { value: value.to_vec(), revision: u64::from_le_bytes(b) }
}

fn encode(revision: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&revision.to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// Applies `ops` in one write transaction if `compares` hold.
fn apply(db: &Database, compares: &[Compare], ops: &[Op]) -> Result<TxnOutcome, redb::Error> {
    let tx = db.begin_write()?;
    let outcome = {
        let mut kv = tx.open_table(KV)?;
        let mut failed = None;
        for (i, c) in compares.iter().enumerate() {
            let holds = match c {
                Compare::Absent(k) => kv.get(k.as_str())?.is_none(),
                Compare::Present(k) => kv.get(k.as_str())?.is_some(),
                Compare::Revision(k, rev) => {
                    kv.get(k.as_str())?.is_some_and(|v| decode(v.value()).revision == *rev)
                }
            };
            if !holds {
                failed = Some(i);
                break;
            }
        }
        match failed {
            Some(compare) => TxnOutcome::Failed { compare },
            None => {
                let mut meta = tx.open_table(META)?;
                let revision = meta.get(REVISION)?.map(|v| v.value()).unwrap_or(0) + 1;
                meta.insert(REVISION, revision)?;
                for op in ops {
                    match op {
                        Op::Put(k, v) => {
                            kv.insert(k.as_str(), encode(revision, v).as_slice())?;
                        }
                        Op::Delete(k) => {
                            kv.remove(k.as_str())?;
                        }
                    }
                }
                TxnOutcome::Committed { revision }
            }
        }
    };
    if outcome.committed() {
        tx.commit()?;
    } else {
        tx.abort()?;
    }
    Ok(outcome)
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let key = key.to_owned();
        self.blocking("get", move |db| {
            let tx = db.begin_read()?;
            let kv = tx.open_table(KV)?;
            Ok(kv.get(key.as_str())?.map(|v| decode(v.value())))
        })
        .await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        if key.is_empty() {
            return Err(StoreError::EmptyKey);
        }
        let ops = vec![Op::Put(key.to_owned(), value)];
        match self.blocking("put", move |db| apply(db, &[], &ops)).await? {
            TxnOutcome::Committed { revision } => Ok(revision),
            // No compares, so this cannot happen; report it rather than panic.
            TxnOutcome::Failed { .. } => Err(StoreError::Interrupted { op: "put" }),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_owned();
        self.blocking("delete", move |db| {
            let existed = {
                let tx = db.begin_read()?;
                tx.open_table(KV)?.get(key.as_str())?.is_some()
            };
            if existed {
                apply(db, &[Compare::Present(key.clone())], &[Op::Delete(key)])
                    .map(|o| o.committed())
            } else {
                Ok(false)
            }
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking("list", move |db| {
            let tx = db.begin_read()?;
            let kv = tx.open_table(KV)?;
            let mut out = Vec::new();
            for item in kv.range::<&str>(prefix.as_str()..)? {
                let (k, v) = item?;
                let key = k.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                out.push((key.to_owned(), decode(v.value())));
            }
            Ok(out)
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        if txn.ops.iter().any(|op| matches!(op, Op::Put(k, _) | Op::Delete(k) if k.is_empty())) {
            return Err(StoreError::EmptyKey);
        }
        self.blocking("txn", move |db| apply(db, &txn.compares, &txn.ops)).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::conformance_suite;

    #[tokio::test]
    async fn redb_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("store.redb")).await.unwrap();
        conformance_suite(&store).await;
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let rev = {
            let store = RedbStore::open(&path).await.unwrap();
            store.put("volumes/1", b"{\"version\":1}".to_vec()).await.unwrap();
            store.put("volumes/2", b"two".to_vec()).await.unwrap();
            store.delete("volumes/2").await.unwrap();
            store.get("volumes/1").await.unwrap().unwrap().revision
        };
        let store = RedbStore::open(&path).await.unwrap();
        let got = store.get("volumes/1").await.unwrap().unwrap();
        assert_eq!(got.value, b"{\"version\":1}");
        assert_eq!(got.revision, rev);
        assert_eq!(store.get("volumes/2").await.unwrap(), None);
        // The revision counter continues rather than restarting.
        assert!(store.put("volumes/3", Vec::new()).await.unwrap() > rev);
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_file_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let _first = RedbStore::open(&path).await.unwrap();
        assert!(matches!(RedbStore::open(&path).await, Err(StoreError::Open { .. })));
    }
}
