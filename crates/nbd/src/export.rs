//! What the server serves: an [`Export`] is anything that reads and writes blocks. The engine
//! implements it for its nexus; tests implement it in memory. The NBD layer knows nothing of
//! pools, replicas or the control plane.

use std::sync::Arc;

use async_trait::async_trait;
use trireme_iobuf::IoBuf;

/// What an export supports; advertised to clients in the transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub read_only: bool,
    pub flush: bool,
    pub fua: bool,
    pub trim: bool,
    pub write_zeroes: bool,
    /// Answers `NBD_CMD_BLOCK_STATUS` for the `base:allocation` context.
    pub block_status: bool,
    /// Several connections to the same export see each other's flushed writes (multi-conn).
    pub multi_conn: bool,
}

impl Capabilities {
    pub const ALL: Self = Self {
        read_only: false,
        flush: true,
        fua: true,
        trim: true,
        write_zeroes: true,
        block_status: true,
        multi_conn: true,
    };
}

/// Block-size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        Self { minimum: 1, preferred: 4096, maximum: 32 << 20 }
    }
}

/// One run of a `base:allocation` block-status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// `NBD_STATE_HOLE`: not allocated.
    pub hole: bool,
    /// `NBD_STATE_ZERO`: reads as zeroes.
    pub zero: bool,
}

/// Errors an export returns; the server maps each to an NBD errno in one place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("I/O error: {0}")]
    Io(String),
    #[error("no space left")]
    NoSpace,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("export is read-only")]
    ReadOnly,
    #[error("export is shutting down")]
    ShuttingDown,
    #[error("operation not supported")]
    NotSupported,
}

/// A block device served over NBD. Ranges passed in are already checked against [`size`]
/// (the server rejects out-of-range requests before calling).
///
/// Buffers are owned ([`IoBuf`]) so an implementation may hand them to the kernel (io_uring)
/// without copying and without the caller's future having to outlive the operation.
///
/// [`size`]: Export::size
#[async_trait]
pub trait Export: Send + Sync + 'static {
    /// Current size in bytes; may grow between connections (resize).
    fn size(&self) -> u64;
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }
    /// Reads `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, ExportError>;
    /// Writes `data` at `offset`; with `fua`, durable before returning.
    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), ExportError>;
    /// Makes every completed write durable.
    async fn flush(&self) -> Result<(), ExportError>;
    /// Discards a range; later reads of it return zeroes.
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError>;
    /// Zeroes a range; `may_trim` allows deallocating it (no `NBD_CMD_FLAG_NO_HOLE`).
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), ExportError>;
    /// Allocation of `[offset, offset+len)`: extents covering at least the first byte, in
    /// order, contiguous, never past the end of the export.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError>;
}

/// Finds exports by name for the handshake (`OPT_GO`, `OPT_INFO`, `OPT_LIST`).
pub trait ExportRegistry: Send + Sync + 'static {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>>;
    /// Names and descriptions for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, String)>;
}
