//! The control plane's state store: a small transactional key-value trait with an embedded redb
//! backend.
//!
//! Control persists every spec through [`Store`]. The trait is deliberately shaped like etcd's
//! KV API so that an etcd backend can implement it without changing any caller:
//!
//! ```text
//!   control ──> dyn Store ──┬── RedbStore  (one file under the data dir; this crate)
//!                           └── etcd       (later: several control instances)
//! ```
//!
//! - Keys are UTF-8 strings (control uses `kind/id` paths, so "list by prefix" lists a kind).
//! - Every write bumps one store-wide **revision**; each value remembers the revision that last
//!   wrote it (etcd's `mod_revision`). Compare-and-swap compares that revision.
//! - [`Txn`] applies a list of operations atomically if every [`Compare`] holds, which is enough
//!   for "create if absent" and optimistic concurrency.
//!
//! Every backend must pass [`conformance_suite`].

mod conformance;
mod redb_store;

pub use conformance::conformance_suite;
pub use redb_store::RedbStore;

/// A stored value with the revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    /// The store revision of the write that produced this value; never 0.
    pub revision: u64,
}

/// A condition a transaction checks before applying its operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists (with any value).
    Present(String),
    /// The key exists and was last written at exactly this revision.
    Revision(String, u64),
}

/// One write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(String, Vec<u8>),
    /// Deleting a missing key is not an error.
    Delete(String),
}

/// An atomic, conditional batch of writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn when(mut self, compare: Compare) -> Self {
        self.compares.push(compare);
        self
    }
    pub fn put(mut self, key: impl Into<String>, value: Vec<u8>) -> Self {
        self.ops.push(Op::Put(key.into(), value));
        self
    }
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete(key.into()));
        self
    }
}

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every compare held; the operations were applied at this revision.
    Committed { revision: u64 },
    /// A compare failed (the first failing one's index); nothing was written.
    Failed { compare: usize },
}

impl TxnOutcome {
    pub fn committed(&self) -> bool {
        matches!(self, Self::Committed { .. })
    }
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("store {op} failed: {source}")]
    Backend {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The blocking worker running the call panicked or was cancelled.
    #[error("store {op} was interrupted")]
    Interrupted { op: &'static str },
    #[error("store key must not be empty")]
    EmptyKey,
}

/// The store every control-plane object is persisted through. Implementations must be safe to
/// share between tasks; every call is atomic on its own.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// Writes unconditionally; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError>;
    /// Returns whether the key existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;
    /// Every key starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;
}
