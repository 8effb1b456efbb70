//! Fixed newstyle negotiation: from the greeting to the transmission phase.
//!
//! ```text
//!  greeting ─> client flags ─> option loop ──GO/EXPORT_NAME──> Session (transmission)
//!                                  │  INFO, LIST, STRUCTURED_REPLY, *_META_CONTEXT: reply, loop
//!                                  └─ ABORT / EOF / violation ──> closed
//! ```
//! A client that breaks a MUST of the protocol (bad magic, unknown client flags) is dropped;
//! everything the protocol lets us answer (unknown options, unknown exports, malformed option
//! data, oversized options we can skip) gets an error reply and the loop goes on. The caller
//! bounds the whole negotiation with a timeout.

use std::sync::Arc;

use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::export::{Capabilities, Export, ExportRegistry};
use crate::proto::*;

/// Option data we parse; anything longer is refused (no valid option comes close).
const MAX_OPTION_DATA: u32 = 64 << 10;
/// Oversized option data up to this much is read and dropped so the session can go on; beyond
/// it reading would itself be the denial of service, so the client is dropped.
const MAX_OPTION_DISCARD: u32 = 1 << 20;
/// The id of `base:allocation` in block-status replies.
pub(crate) const ALLOCATION_CONTEXT_ID: u32 = 1;

/// What the handshake agreed on, for the transmission phase.
pub(crate) struct Session {
    pub export: Arc<dyn Export>,
    pub name: String,
    /// The size announced to the client; requests are checked against it.
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    /// Set when `base:allocation` was selected for this export.
    pub allocation_context: Option<u32>,
}

/// How a negotiation ended without entering transmission.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("client aborted the negotiation")]
    Aborted,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl From<ProtoError> for HandshakeError {
    fn from(e: ProtoError) -> Self {
        HandshakeError::Protocol(e.to_string())
    }
}

/// Transmission flags for an export, per its capabilities and the negotiated reply style.
pub(crate) fn transmission_flags(caps: Capabilities, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_CACHE;
    if caps.read_only {
        flags |= FLAG_READ_ONLY;
    }
    if caps.flush {
        flags |= FLAG_SEND_FLUSH;
    }
    if caps.fua {
        flags |= FLAG_SEND_FUA;
    }
    if caps.trim && !caps.read_only {
        flags |= FLAG_SEND_TRIM;
    }
    if caps.write_zeroes && !caps.read_only {
        // FAST_ZERO is always answered with ENOTSUP, which the protocol allows and which lets
        // clients skip a slow pre-zeroing pass.
        flags |= FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if caps.multi_conn {
        flags |= FLAG_CAN_MULTI_CONN;
    }
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

struct Negotiator<'a, R, W> {
    reader: &'a mut R,
    writer: &'a mut W,
    registry: &'a dyn ExportRegistry,
    max_request: u32,
    no_zeroes: bool,
    structured: bool,
    /// `(export name, context id)` chosen by the last `NBD_OPT_SET_META_CONTEXT`.
    selected: Option<(String, u32)>,
    out: Vec<u8>,
}

/// Runs the negotiation on a fresh connection. Returns the session to serve, or why not.
pub(crate) async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    registry: &dyn ExportRegistry,
    max_request: u32,
) -> Result<Session, HandshakeError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)).await?;
    writer.flush().await?;
    let client_flags = reader.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let mut n = Negotiator {
        reader,
        writer,
        registry,
        max_request,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        selected: None,
        out: Vec::with_capacity(256),
    };
    loop {
        if let Some(session) = n.one_option().await? {
            return Ok(session);
        }
    }
}

impl<R, W> Negotiator<'_, R, W>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Handles one option; `Some` when transmission begins.
    async fn one_option(&mut self) -> Result<Option<Session>, HandshakeError> {
        let mut raw = [0u8; OPTION_HEADER_LEN];
        self.reader.read_exact(&mut raw).await?;
        let header = OptionHeader::decode(&raw)?;
        let opt = header.option;
        if header.length > MAX_OPTION_DATA {
            // NBD_OPT_EXPORT_NAME never gets an option reply (the client would read it as the
            // export's size and flags): the protocol's only answer to a bad one is to close.
            if opt == OPT_EXPORT_NAME {
                return Err(HandshakeError::Protocol(format!(
                    "NBD_OPT_EXPORT_NAME with {} bytes of data",
                    header.length
                )));
            }
            self.reply(OptionReply::error(opt, REP_ERR_TOO_BIG, "option data too large")).await?;
            if header.length > MAX_OPTION_DISCARD {
                return Err(HandshakeError::Protocol(format!(
                    "option {opt} with {} bytes of data",
                    header.length
                )));
            }
            self.discard(u64::from(header.length)).await?;
            return Ok(None);
        }
        let mut data = vec![0u8; header.length as usize];
        self.reader.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => return self.export_name(&data).await.map(Some),
            OPT_ABORT => {
                // The client may already have gone; a failed ACK changes nothing.
                let _ = self.reply(OptionReply::ack(opt)).await;
                return Err(HandshakeError::Aborted);
            }
            OPT_LIST => self.list(&data).await?,
            OPT_INFO | OPT_GO => return self.info_or_go(opt, &data).await,
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured = true;
                    self.reply(OptionReply::ack(opt)).await?;
                } else {
                    self.invalid(opt, "NBD_OPT_STRUCTURED_REPLY takes no data").await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(opt, &data).await?,
            _ => {
                let msg = format!("option {opt} is not supported");
                self.reply(OptionReply::error(opt, REP_ERR_UNSUP, &msg)).await?;
            }
        }
        Ok(None)
    }

    async fn reply(&mut self, r: OptionReply) -> std::io::Result<()> {
        self.out.clear();
        r.encode_into(&mut self.out);
        self.writer.write_all(&self.out).await?;
        self.writer.flush().await
    }

    async fn invalid(&mut self, opt: u32, why: &str) -> std::io::Result<()> {
        self.reply(OptionReply::error(opt, REP_ERR_INVALID, why)).await
    }

    async fn discard(&mut self, len: u64) -> std::io::Result<()> {
        let copied =
            tokio::io::copy(&mut (&mut *self.reader).take(len), &mut tokio::io::sink()).await?;
        if copied < len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    fn allocation_context_for(&self, name: &str) -> Option<u32> {
        match &self.selected {
            Some((export, id)) if self.structured && export == name => Some(*id),
            _ => None,
        }
    }

    fn session(&self, name: String, export: Arc<dyn Export>) -> Session {
        let caps = export.capabilities();
        let allocation_context =
            if caps.block_status { self.allocation_context_for(&name) } else { None };
        Session {
            size: export.size(),
            flags: transmission_flags(caps, self.structured),
            structured: self.structured,
            allocation_context,
            name,
            export,
        }
    }

    async fn export_name(&mut self, data: &[u8]) -> Result<Session, HandshakeError> {
        // This option cannot carry an error reply: an unusable name ends the session.
        let name = std::str::from_utf8(data)
            .map_err(|_| HandshakeError::Protocol("export name is not UTF-8".into()))?;
        let export = self
            .registry
            .lookup(name)
            .ok_or_else(|| HandshakeError::Protocol(format!("unknown export {name:?}")))?;
        let session = self.session(name.to_owned(), export);
        let reply = encode_export_name_reply(session.size, session.flags, self.no_zeroes);
        self.writer.write_all(&reply).await?;
        self.writer.flush().await?;
        Ok(session)
    }

    async fn list(&mut self, data: &[u8]) -> std::io::Result<()> {
        if !data.is_empty() {
            return self.invalid(OPT_LIST, "NBD_OPT_LIST takes no data").await;
        }
        self.out.clear();
        for (name, description) in self.registry.list() {
            OptionReply::server(&name, truncate_str(&description, MAX_STRING))
                .encode_into(&mut self.out);
        }
        OptionReply::ack(OPT_LIST).encode_into(&mut self.out);
        self.writer.write_all(&self.out).await?;
        self.writer.flush().await
    }

    async fn info_or_go(
        &mut self,
        opt: u32,
        data: &[u8],
    ) -> Result<Option<Session>, HandshakeError> {
        let req = match InfoRequest::decode(data) {
            Ok(req) => req,
            Err(e) => {
                self.invalid(opt, &format!("malformed request: {e}")).await?;
                return Ok(None);
            }
        };
        let Some(export) = self.registry.lookup(&req.name) else {
            let msg = format!("no export named {:?}", req.name);
            self.reply(OptionReply::error(opt, REP_ERR_UNKNOWN, &msg)).await?;
            return Ok(None);
        };
        let session = self.session(req.name.clone(), Arc::clone(&export));
        let sizes = export.block_sizes();
        let mut infos = vec![Info::Export { size: session.size, flags: session.flags }];
        if req.requests.contains(&INFO_NAME) {
            infos.push(Info::Name(req.name.clone()));
        }
        if req.requests.contains(&INFO_DESCRIPTION) {
            let description = self
                .registry
                .list()
                .into_iter()
                .find(|(n, _)| *n == req.name)
                .map(|(_, d)| d)
                .unwrap_or_default();
            infos.push(Info::Description(description));
        }
        // Always sent: clients that did not ask may still use it, and it is what we enforce.
        infos.push(Info::BlockSize {
            minimum: sizes.minimum,
            preferred: sizes.preferred,
            maximum: sizes.maximum.min(self.max_request),
        });
        self.out.clear();
        for info in &infos {
            OptionReply::info(opt, info).encode_into(&mut self.out);
        }
        OptionReply::ack(opt).encode_into(&mut self.out);
        self.writer.write_all(&self.out).await?;
        self.writer.flush().await?;
        Ok((opt == OPT_GO).then_some(session))
    }

    async fn meta_context(&mut self, opt: u32, data: &[u8]) -> std::io::Result<()> {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the previous selection even when it fails.
            self.selected = None;
        }
        if !self.structured {
            return self.invalid(opt, "negotiate structured replies first").await;
        }
        let req = match MetaContextRequest::decode(data) {
            Ok(req) => req,
            Err(e) => return self.invalid(opt, &format!("malformed request: {e}")).await,
        };
        let Some(export) = self.registry.lookup(&req.export) else {
            let msg = format!("no export named {:?}", req.export);
            return self.reply(OptionReply::error(opt, REP_ERR_UNKNOWN, &msg)).await;
        };
        let supported = export.capabilities().block_status;
        let matches = |q: &str| {
            if set {
                q == BASE_ALLOCATION
            } else {
                // For LIST the namespace alone is a wildcard.
                q == BASE_ALLOCATION || q == "base:"
            }
        };
        let chosen = supported
            && if set {
                req.queries.iter().any(|q| matches(q))
            } else {
                req.queries.is_empty() || req.queries.iter().any(|q| matches(q))
            };
        self.out.clear();
        if chosen {
            // LIST names contexts without selecting one: its id is reserved, zero.
            let id = if set { ALLOCATION_CONTEXT_ID } else { 0 };
            OptionReply::meta_context(opt, id, BASE_ALLOCATION).encode_into(&mut self.out);
            if set {
                self.selected = Some((req.export.clone(), ALLOCATION_CONTEXT_ID));
            }
        }
        OptionReply::ack(opt).encode_into(&mut self.out);
        self.writer.write_all(&self.out).await?;
        self.writer.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_follow_capabilities() {
        let all = transmission_flags(Capabilities::ALL, true);
        for f in [
            FLAG_HAS_FLAGS,
            FLAG_SEND_FLUSH,
            FLAG_SEND_FUA,
            FLAG_SEND_TRIM,
            FLAG_SEND_WRITE_ZEROES,
            FLAG_SEND_FAST_ZERO,
            FLAG_CAN_MULTI_CONN,
            FLAG_SEND_DF,
        ] {
            assert_ne!(all & f, 0, "{f:#x}");
        }
        assert_eq!(all & FLAG_READ_ONLY, 0);
        // DF only with structured replies.
        assert_eq!(transmission_flags(Capabilities::ALL, false) & FLAG_SEND_DF, 0);
        let none = Capabilities {
            read_only: true,
            flush: false,
            fua: false,
            trim: true,
            write_zeroes: true,
            block_status: false,
            multi_conn: false,
        };
        let f = transmission_flags(none, false);
        assert_eq!(f, FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_CACHE);
    }
}
