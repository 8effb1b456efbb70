//! The NBD wire format: constants and pure encode/decode functions, no I/O.
//!
//! Everything here works on byte slices so that it can be fuzzed and property-tested on its
//! own, and so that a future NBD client (the nexus talking to remote replicas) can reuse it.
//! Both directions are implemented for every message even where the server only needs one.
//!
//! ```text
//!  handshake:  S: NBDMAGIC IHAVEOPT hflags   C: cflags
//!              C: IHAVEOPT opt len data      S: REPLY_MAGIC opt type len data   (repeat)
//!  transmission:
//!              C: REQUEST_MAGIC flags type cookie offset length [data]
//!              S: SIMPLE_REPLY_MAGIC error cookie [data]
//!           or S: STRUCTURED_REPLY_MAGIC flags type cookie length payload   (chunks)
//! ```
//! All integers are big-endian.

/// `NBDMAGIC`, first word of the server greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second word of the greeting and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Information types for OPT_INFO / OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Error values of the transmission phase.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// The only metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Longest string (export name, description, context name) the protocol allows.
pub const MAX_STRING: usize = 4096;

pub const GREETING_LEN: usize = 18;
pub const OPTION_HEADER_LEN: usize = 16;
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// A malformed message. The server answers these with an error reply where the protocol allows
/// one and disconnects otherwise; which one is the caller's decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {found:#x}")]
    BadMagic { found: u64 },
    #[error("message truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("malformed {what}")]
    Malformed { what: &'static str },
    #[error("string is not valid UTF-8")]
    NotUtf8,
    #[error("string of {len} bytes exceeds the {MAX_STRING}-byte limit")]
    StringTooLong { len: usize },
}

/// A cursor over a byte slice that never panics.
struct Rd<'a> {
    buf: &'a [u8],
}

impl<'a> Rd<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated { need: n, have: self.buf.len() });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn string(&mut self, len: usize) -> Result<String, ProtoError> {
        if len > MAX_STRING {
            return Err(ProtoError::StringTooLong { len });
        }
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| ProtoError::NotUtf8)
    }
    fn rest(&self) -> &'a [u8] {
        self.buf
    }
    fn finish(&self, what: &'static str) -> Result<(), ProtoError> {
        if self.buf.is_empty() { Ok(()) } else { Err(ProtoError::Malformed { what }) }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// The server's first 18 bytes.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// Parses a greeting, returning the handshake flags.
pub fn decode_greeting(buf: &[u8]) -> Result<u16, ProtoError> {
    let mut r = Rd::new(buf);
    let magic = r.u64()?;
    if magic != NBD_MAGIC {
        return Err(ProtoError::BadMagic { found: magic });
    }
    let opt = r.u64()?;
    if opt != IHAVEOPT {
        return Err(ProtoError::BadMagic { found: opt });
    }
    r.u16()
}

/// Header of an option request; `length` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd::new(buf);
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic { found: magic });
        }
        Ok(Self { option: r.u32()?, length: r.u32()? })
    }
}

/// One option reply: header plus data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

impl OptionReply {
    pub fn ack(option: u32) -> Self {
        Self { option, reply_type: REP_ACK, data: Vec::new() }
    }

    /// An error reply with a human-readable message.
    pub fn error(option: u32, reply_type: u32, message: &str) -> Self {
        let msg = truncate_str(message, MAX_STRING);
        Self { option, reply_type, data: msg.as_bytes().to_vec() }
    }

    /// `NBD_REP_SERVER` for `NBD_OPT_LIST`.
    pub fn server(name: &str, description: &str) -> Self {
        let mut data = Vec::with_capacity(4 + name.len() + description.len());
        put_str(&mut data, name);
        data.extend_from_slice(description.as_bytes());
        Self { option: OPT_LIST, reply_type: REP_SERVER, data }
    }

    pub fn info(option: u32, info: &Info) -> Self {
        Self { option, reply_type: REP_INFO, data: info.encode() }
    }

    pub fn meta_context(option: u32, id: u32, name: &str) -> Self {
        let mut data = Vec::with_capacity(4 + name.len());
        data.extend_from_slice(&id.to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        Self { option, reply_type: REP_META_CONTEXT, data }
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.option.to_be_bytes());
        out.extend_from_slice(&self.reply_type.to_be_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.data);
    }

    /// Decodes one reply from the front of `buf`, returning it and the bytes consumed.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), ProtoError> {
        let mut r = Rd::new(buf);
        let magic = r.u64()?;
        if magic != OPT_REPLY_MAGIC {
            return Err(ProtoError::BadMagic { found: magic });
        }
        let option = r.u32()?;
        let reply_type = r.u32()?;
        let len = r.u32()? as usize;
        let data = r.take(len)?.to_vec();
        Ok((Self { option, reply_type, data }, OPTION_REPLY_HEADER_LEN + len))
    }
}

/// Cuts a string to at most `max` bytes on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    Name(String),
    Description(String),
    BlockSize { minimum: u32, preferred: u32, maximum: u32 },
}

impl Info {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        match self {
            Info::Export { size, flags } => {
                out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
            }
            Info::Name(name) => {
                out.extend_from_slice(&INFO_NAME.to_be_bytes());
                out.extend_from_slice(truncate_str(name, MAX_STRING).as_bytes());
            }
            Info::Description(d) => {
                out.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                out.extend_from_slice(truncate_str(d, MAX_STRING).as_bytes());
            }
            Info::BlockSize { minimum, preferred, maximum } => {
                out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                out.extend_from_slice(&minimum.to_be_bytes());
                out.extend_from_slice(&preferred.to_be_bytes());
                out.extend_from_slice(&maximum.to_be_bytes());
            }
        }
        out
    }

    /// Decodes a known info item; `Ok(None)` for types this codec does not know.
    pub fn decode(buf: &[u8]) -> Result<Option<Self>, ProtoError> {
        let mut r = Rd::new(buf);
        let info = match r.u16()? {
            INFO_EXPORT => {
                let info = Info::Export { size: r.u64()?, flags: r.u16()? };
                r.finish("NBD_INFO_EXPORT")?;
                info
            }
            INFO_NAME => Info::Name(r.string(r.rest().len())?),
            INFO_DESCRIPTION => Info::Description(r.string(r.rest().len())?),
            INFO_BLOCK_SIZE => {
                let info =
                    Info::BlockSize { minimum: r.u32()?, preferred: r.u32()?, maximum: r.u32()? };
                r.finish("NBD_INFO_BLOCK_SIZE")?;
                info
            }
            _ => return Ok(None),
        };
        Ok(Some(info))
    }
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.name.len() + 2 * self.requests.len());
        put_str(&mut out, &self.name);
        out.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            out.extend_from_slice(&r.to_be_bytes());
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd::new(buf);
        let len = r.u32()? as usize;
        let name = r.string(len)?;
        let n = r.u16()? as usize;
        let mut requests = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            requests.push(r.u16()?);
        }
        r.finish("NBD_OPT_INFO/GO data")?;
        Ok(Self { name, requests })
    }
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_str(&mut out, &self.export);
        out.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_str(&mut out, q);
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd::new(buf);
        let len = r.u32()? as usize;
        let export = r.string(len)?;
        let n = r.u32()? as usize;
        // Each query needs at least its 4-byte length, so `n` is bounded by the data we hold;
        // never trust it for a preallocation.
        let mut queries = Vec::with_capacity(n.min(r.rest().len() / 4));
        for _ in 0..n {
            let len = r.u32()? as usize;
            queries.push(r.string(len)?);
        }
        r.finish("meta context data")?;
        Ok(Self { export, queries })
    }
}

/// The server's reply to `NBD_OPT_EXPORT_NAME`.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Transmission

/// A command type, with unknown values kept so they can be answered with `NBD_EINVAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_wire(v: u16) -> Self {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(v) => v,
        }
    }

    /// The command flags that are meaningful for this command (FUA is accepted on all).
    pub fn allowed_flags(self) -> u16 {
        CMD_FLAG_FUA
            | match self {
                Command::Read => CMD_FLAG_DF,
                Command::WriteZeroes => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                Command::BlockStatus => CMD_FLAG_REQ_ONE,
                _ => 0,
            }
    }
}

/// A transmission request header (the WRITE payload, if any, follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd::new(buf);
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic { found: u64::from(magic) });
        }
        Ok(Self {
            flags: r.u16()?,
            command: Command::from_wire(r.u16()?),
            cookie: r.u64()?,
            offset: r.u64()?,
            length: r.u32()?,
        })
    }
}

/// A simple reply header (READ data follows it on success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut out = [0u8; SIMPLE_REPLY_LEN];
        out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.to_be_bytes());
        out[8..].copy_from_slice(&self.cookie.to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd::new(buf);
        let magic = r.u32()?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ProtoError::BadMagic { found: u64::from(magic) });
        }
        Ok(Self { error: r.u32()?, cookie: r.u64()? })
    }
}

/// A structured reply chunk header; `length` payload bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.chunk_type.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    pub fn decode(buf: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd::new(buf);
        let magic = r.u32()?;
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(ProtoError::BadMagic { found: u64::from(magic) });
        }
        Ok(Self { flags: r.u16()?, chunk_type: r.u16()?, cookie: r.u64()?, length: r.u32()? })
    }
}

/// One `base:allocation` descriptor on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub length: u32,
    pub flags: u32,
}

/// The payload of a structured reply chunk. For `OffsetData` only the 8-byte offset is part of
/// the encoded payload: the data is written after it straight from the caller's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    None,
    OffsetData { offset: u64, data_len: u32 },
    OffsetHole { offset: u64, length: u32 },
    BlockStatus { context_id: u32, descriptors: Vec<BlockDescriptor> },
    Error { error: u32, message: String },
    ErrorOffset { error: u32, message: String, offset: u64 },
}

impl Chunk {
    fn chunk_type(&self) -> u16 {
        match self {
            Chunk::None => REPLY_TYPE_NONE,
            Chunk::OffsetData { .. } => REPLY_TYPE_OFFSET_DATA,
            Chunk::OffsetHole { .. } => REPLY_TYPE_OFFSET_HOLE,
            Chunk::BlockStatus { .. } => REPLY_TYPE_BLOCK_STATUS,
            Chunk::Error { .. } => REPLY_TYPE_ERROR,
            Chunk::ErrorOffset { .. } => REPLY_TYPE_ERROR_OFFSET,
        }
    }

    /// Appends header and (for `OffsetData`, the fixed part of the) payload to `out`.
    pub fn encode_into(&self, cookie: u64, done: bool, out: &mut Vec<u8>) {
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        let chunk_type = self.chunk_type();
        let length: u32 = match self {
            Chunk::None => 0,
            Chunk::OffsetData { data_len, .. } => data_len.saturating_add(8),
            Chunk::OffsetHole { .. } => 12,
            Chunk::BlockStatus { descriptors, .. } => 4 + 8 * descriptors.len() as u32,
            Chunk::Error { message, .. } => 6 + truncate_str(message, MAX_STRING).len() as u32,
            Chunk::ErrorOffset { message, .. } => {
                14 + truncate_str(message, MAX_STRING).len() as u32
            }
        };
        ChunkHeader { flags, chunk_type, cookie, length }.encode_into(out);
        match self {
            Chunk::None => {}
            Chunk::OffsetData { offset, .. } => out.extend_from_slice(&offset.to_be_bytes()),
            Chunk::OffsetHole { offset, length } => {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&length.to_be_bytes());
            }
            Chunk::BlockStatus { context_id, descriptors } => {
                out.extend_from_slice(&context_id.to_be_bytes());
                for d in descriptors {
                    out.extend_from_slice(&d.length.to_be_bytes());
                    out.extend_from_slice(&d.flags.to_be_bytes());
                }
            }
            Chunk::Error { error, message } => put_error(out, *error, message),
            Chunk::ErrorOffset { error, message, offset } => {
                put_error(out, *error, message);
                out.extend_from_slice(&offset.to_be_bytes());
            }
        }
    }

    /// Decodes a chunk payload given its header. For `OffsetData` the data bytes after the
    /// offset are not returned (they are the caller's to read); `payload` may hold just the
    /// offset or the whole payload.
    pub fn decode(header: &ChunkHeader, payload: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd::new(payload);
        let chunk = match header.chunk_type {
            REPLY_TYPE_NONE => {
                if header.length != 0 {
                    return Err(ProtoError::Malformed { what: "NONE chunk with payload" });
                }
                Chunk::None
            }
            REPLY_TYPE_OFFSET_DATA => {
                if header.length < 9 {
                    return Err(ProtoError::Malformed { what: "short OFFSET_DATA chunk" });
                }
                let offset = r.u64()?;
                return Ok(Chunk::OffsetData { offset, data_len: header.length - 8 });
            }
            REPLY_TYPE_OFFSET_HOLE => Chunk::OffsetHole { offset: r.u64()?, length: r.u32()? },
            REPLY_TYPE_BLOCK_STATUS => {
                let context_id = r.u32()?;
                if r.rest().is_empty() || !r.rest().len().is_multiple_of(8) {
                    return Err(ProtoError::Malformed { what: "BLOCK_STATUS descriptors" });
                }
                let mut descriptors = Vec::with_capacity(r.rest().len() / 8);
                while !r.rest().is_empty() {
                    descriptors.push(BlockDescriptor { length: r.u32()?, flags: r.u32()? });
                }
                Chunk::BlockStatus { context_id, descriptors }
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                let error = r.u32()?;
                let len = r.u16()? as usize;
                let message = r.string(len)?;
                if header.chunk_type == REPLY_TYPE_ERROR {
                    Chunk::Error { error, message }
                } else {
                    Chunk::ErrorOffset { error, message, offset: r.u64()? }
                }
            }
            _ => return Err(ProtoError::Malformed { what: "unknown chunk type" }),
        };
        if payload.len() != header.length as usize {
            return Err(ProtoError::Malformed { what: "chunk length mismatch" });
        }
        r.finish("chunk payload")?;
        Ok(chunk)
    }
}

fn put_error(out: &mut Vec<u8>, error: u32, message: &str) {
    let msg = truncate_str(message, MAX_STRING);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

#[cfg(test)]
#[path = "proto_tests.rs"]
mod tests;
