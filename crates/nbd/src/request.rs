//! Executing one transmission request against an export: validation, the export call, and the
//! encoding of its reply. Runs in its own task, concurrently with other requests of the same
//! connection; the reply goes to the connection's writer.

use std::sync::Arc;

use trireme_iobuf::IoBuf;

use crate::export::{Capabilities, Export, ExportError, Extent};
use crate::proto::{errno, *};

/// Everything a request task needs from its connection.
pub(crate) struct RequestContext {
    pub export: Arc<dyn Export>,
    pub size: u64,
    pub caps: Capabilities,
    pub structured: bool,
    pub allocation_context: Option<u32>,
    /// Largest READ/WRITE payload: the server's limit or the export's, whichever is smaller.
    pub max_request: u32,
    /// The export's minimum block size; offsets and lengths must be multiples of it.
    pub min_block: u32,
}

/// A failed request: the errno sent to the client and a message for humans (structured replies
/// carry it; logs too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub errno: u32,
    pub message: String,
}

impl Failure {
    fn new(errno: u32, message: impl Into<String>) -> Self {
        Self { errno, message: message.into() }
    }
}

/// The one place export errors become NBD error values.
pub fn export_errno(e: &ExportError) -> u32 {
    match e {
        ExportError::Io(_) => errno::EIO,
        ExportError::NoSpace => errno::ENOSPC,
        ExportError::Invalid(_) => errno::EINVAL,
        ExportError::ReadOnly => errno::EPERM,
        ExportError::ShuttingDown => errno::ESHUTDOWN,
        // The protocol reserves ENOTSUP for fast-zero; an unsupported operation is EINVAL.
        ExportError::NotSupported => errno::EINVAL,
    }
}

impl From<ExportError> for Failure {
    fn from(e: ExportError) -> Self {
        Failure { errno: export_errno(&e), message: e.to_string() }
    }
}

/// What a successful request answers with.
pub(crate) enum Success {
    Done,
    Data(IoBuf),
    BlockStatus(Vec<BlockDescriptor>),
}

/// An encoded reply: header bytes, then (for READ) the data straight from the export's buffer.
pub(crate) struct Reply {
    pub head: Vec<u8>,
    pub data: Option<IoBuf>,
}

/// Largest descriptor length we report: u32::MAX rounded down to 512-byte multiples, as the
/// protocol asks for sector-multiple descriptors.
const MAX_DESCRIPTOR: u64 = 0xffff_fe00;
/// Cap on descriptors per block-status chunk (the protocol's hard ceiling is 2^20).
const MAX_DESCRIPTORS: usize = 1 << 16;

fn in_range(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

impl RequestContext {
    /// Validates and runs `req`; `payload` is the WRITE data the reader already received.
    pub async fn execute(&self, req: &Request, payload: Option<IoBuf>) -> Result<Success, Failure> {
        let unknown = req.flags & !req.command.allowed_flags();
        if unknown != 0 {
            return Err(Failure::new(errno::EINVAL, format!("flags {unknown:#x} not valid here")));
        }
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let (offset, len) = (req.offset, u64::from(req.length));
        let range_error = |code: u32| {
            Failure::new(
                code,
                format!("range {offset}+{len} exceeds the export size {}", self.size),
            )
        };
        let data_command = matches!(
            req.command,
            Command::Read | Command::Write | Command::Trim | Command::WriteZeroes
        );
        if data_command && self.min_block > 1 {
            let m = u64::from(self.min_block);
            if offset % m != 0 || len % m != 0 {
                return Err(Failure::new(
                    errno::EINVAL,
                    format!("{offset}+{len} is not aligned to the {m}-byte minimum block size"),
                ));
            }
        }
        match req.command {
            Command::Read => {
                if req.flags & CMD_FLAG_DF != 0 && !self.structured {
                    return Err(Failure::new(errno::EINVAL, "DF without structured replies"));
                }
                if req.length > self.max_request {
                    return Err(self.too_long(req.length));
                }
                if !in_range(offset, len, self.size) {
                    return Err(range_error(errno::EINVAL));
                }
                if len == 0 {
                    return Ok(Success::Data(IoBuf::zeroed(0)));
                }
                let buf = self.export.read(offset, req.length).await?;
                if buf.len() != req.length as usize {
                    return Err(Failure::new(errno::EIO, "export returned a short read"));
                }
                Ok(Success::Data(buf))
            }
            Command::Write => {
                if req.length > self.max_request {
                    return Err(self.too_long(req.length));
                }
                if self.caps.read_only {
                    return Err(Failure::from(ExportError::ReadOnly));
                }
                if !in_range(offset, len, self.size) {
                    return Err(range_error(errno::ENOSPC));
                }
                match payload {
                    Some(data) if !data.is_empty() => {
                        self.export.write(offset, data, fua).await?;
                        Ok(Success::Done)
                    }
                    _ => Ok(Success::Done),
                }
            }
            Command::Flush => {
                if !self.caps.flush {
                    return Err(Failure::new(errno::EINVAL, "flush not supported"));
                }
                self.export.flush().await?;
                Ok(Success::Done)
            }
            Command::Trim => {
                if self.caps.read_only {
                    return Err(Failure::from(ExportError::ReadOnly));
                }
                if !self.caps.trim {
                    return Err(Failure::new(errno::EINVAL, "trim not supported"));
                }
                if !in_range(offset, len, self.size) {
                    return Err(range_error(errno::EINVAL));
                }
                if len > 0 {
                    self.export.trim(offset, len, fua).await?;
                }
                Ok(Success::Done)
            }
            Command::WriteZeroes => {
                if self.caps.read_only {
                    return Err(Failure::from(ExportError::ReadOnly));
                }
                if !self.caps.write_zeroes {
                    return Err(Failure::new(errno::EINVAL, "write zeroes not supported"));
                }
                if req.flags & CMD_FLAG_FAST_ZERO != 0 {
                    return Err(Failure::new(errno::ENOTSUP, "fast zero not supported"));
                }
                if !in_range(offset, len, self.size) {
                    return Err(range_error(errno::ENOSPC));
                }
                if len > 0 {
                    let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
                    self.export.write_zeroes(offset, len, may_trim, fua).await?;
                }
                Ok(Success::Done)
            }
            Command::Cache => {
                if !in_range(offset, len, self.size) {
                    return Err(range_error(errno::EINVAL));
                }
                Ok(Success::Done)
            }
            Command::BlockStatus => {
                if self.allocation_context.is_none() {
                    return Err(Failure::new(errno::EINVAL, "no metadata context selected"));
                }
                if len == 0 {
                    return Err(Failure::new(errno::EINVAL, "zero-length block status"));
                }
                if !in_range(offset, len, self.size) {
                    return Err(range_error(errno::EINVAL));
                }
                let extents = self.export.block_status(offset, len).await?;
                let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
                Ok(Success::BlockStatus(descriptors(&extents, len, req_one)?))
            }
            Command::Disc => Err(Failure::new(errno::EINVAL, "unexpected disconnect request")),
            Command::Unknown(c) => Err(Failure::new(errno::EINVAL, format!("unknown command {c}"))),
        }
    }

    fn too_long(&self, length: u32) -> Failure {
        Failure::new(
            errno::EINVAL,
            format!("length {length} exceeds the maximum request of {}", self.max_request),
        )
    }

    /// Encodes the reply for `req` in the negotiated style.
    pub fn encode(&self, req: &Request, result: Result<Success, Failure>) -> Reply {
        let cookie = req.cookie;
        let mut head = Vec::with_capacity(32);
        match result {
            Ok(Success::Done) => {
                // Allowed even with structured replies, and the cheapest answer.
                head.extend_from_slice(&SimpleReply { error: 0, cookie }.encode());
                Reply { head, data: None }
            }
            Ok(Success::Data(data)) if self.structured => {
                if data.is_empty() {
                    Chunk::None.encode_into(cookie, true, &mut head);
                    return Reply { head, data: None };
                }
                let chunk = Chunk::OffsetData { offset: req.offset, data_len: data.len() as u32 };
                chunk.encode_into(cookie, true, &mut head);
                Reply { head, data: Some(data) }
            }
            Ok(Success::Data(data)) => {
                head.extend_from_slice(&SimpleReply { error: 0, cookie }.encode());
                Reply { head, data: (!data.is_empty()).then_some(data) }
            }
            Ok(Success::BlockStatus(descriptors)) => {
                let context_id = self.allocation_context.unwrap_or(0);
                Chunk::BlockStatus { context_id, descriptors }.encode_into(cookie, true, &mut head);
                Reply { head, data: None }
            }
            Err(f) if self.structured => {
                Chunk::Error { error: f.errno, message: f.message }
                    .encode_into(cookie, true, &mut head);
                Reply { head, data: None }
            }
            Err(f) => {
                head.extend_from_slice(&SimpleReply { error: f.errno, cookie }.encode());
                Reply { head, data: None }
            }
        }
    }
}

/// Converts export extents to wire descriptors under the protocol's rules: contiguous from the
/// request offset; all but the last end before `len`; with REQ_ONE exactly one, no longer than
/// `len`.
fn descriptors(
    extents: &[Extent],
    len: u64,
    req_one: bool,
) -> Result<Vec<BlockDescriptor>, Failure> {
    let mut out = Vec::with_capacity(extents.len().min(64));
    let mut covered = 0u64;
    for e in extents.iter().filter(|e| e.length > 0) {
        let mut l = e.length.min(MAX_DESCRIPTOR);
        if req_one {
            l = l.min(len);
        }
        let flags = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        out.push(BlockDescriptor { length: l as u32, flags });
        covered += l;
        // A clamped extent leaves a gap after it, so nothing more may follow.
        if req_one || covered >= len || out.len() >= MAX_DESCRIPTORS || l < e.length {
            break;
        }
    }
    if out.is_empty() {
        return Err(Failure::new(errno::EIO, "export returned no extents"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(length: u64, hole: bool) -> Extent {
        Extent { length, hole, zero: hole }
    }

    #[test]
    fn descriptors_follow_protocol_rules() {
        let e = [ext(4096, false), ext(8192, true), ext(4096, false)];
        let d = descriptors(&e, 16384, false).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[1].flags, STATE_HOLE | STATE_ZERO);
        // Stops once the request is covered.
        assert_eq!(descriptors(&e, 5000, false).unwrap().len(), 2);
        // REQ_ONE: one descriptor, clipped to the request.
        let one = descriptors(&e, 1000, true).unwrap();
        assert_eq!(one, vec![BlockDescriptor { length: 1000, flags: 0 }]);
        // Huge extents are clamped and end the list.
        let big = descriptors(&[ext(1 << 40, true), ext(4096, false)], 1 << 41, false).unwrap();
        assert_eq!(big.len(), 1);
        assert_eq!(u64::from(big[0].length), MAX_DESCRIPTOR);
        assert!(descriptors(&[], 10, false).is_err());
    }

    #[test]
    fn every_export_error_has_an_errno() {
        for e in [
            ExportError::Io("x".into()),
            ExportError::NoSpace,
            ExportError::Invalid("x".into()),
            ExportError::ReadOnly,
            ExportError::ShuttingDown,
            ExportError::NotSupported,
        ] {
            assert_ne!(export_errno(&e), 0);
        }
        assert_eq!(export_errno(&ExportError::NoSpace), errno::ENOSPC);
    }
}
