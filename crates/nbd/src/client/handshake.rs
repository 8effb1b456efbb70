//! The client side of the fixed-newstyle negotiation.
//!
//! ```text
//!  S: greeting (FIXED_NEWSTYLE [| NO_ZEROES])     C: client flags
//!  C: OPT_STRUCTURED_REPLY                        S: ACK | ERR_UNSUP  (then simple replies only)
//!  C: OPT_SET_META_CONTEXT export base:allocation S: META_CONTEXT id*, ACK
//!  C: OPT_GO export [INFO_BLOCK_SIZE]             S: INFO*, ACK       -> transmission
//! ```
//! Optional features degrade quietly (no structured replies means no block status); a missing
//! export or an unusable greeting is a [`ClientError::Handshake`]. The caller bounds the whole
//! exchange with `connect_timeout`.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ClientError;
use crate::export::BlockSizes;
use crate::proto::*;

/// Largest option reply we accept; real ones are a few hundred bytes.
const MAX_OPTION_REPLY: usize = 64 << 10;

/// What the negotiation settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub size: u64,
    pub flags: u16,
    pub block_sizes: BlockSizes,
    pub structured: bool,
    /// The server's id for `base:allocation`, if it agreed to it.
    pub allocation_context: Option<u32>,
}

pub(crate) async fn negotiate<S>(
    s: &mut S,
    addr: &str,
    export: &str,
) -> Result<Negotiated, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let fail = |reason: String| ClientError::Handshake { addr: addr.to_owned(), reason };
    let io = |what: &str, e: std::io::Error| fail(format!("{what}: {e}"));

    let mut greeting = [0u8; GREETING_LEN];
    s.read_exact(&mut greeting).await.map_err(|e| io("reading greeting", e))?;
    let hflags = decode_greeting(&greeting).map_err(|e| fail(format!("bad greeting: {e}")))?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(fail("server does not speak fixed newstyle".into()));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).await.map_err(|e| io("sending client flags", e))?;

    let mut opts = Options { s, addr };

    let structured = match opts.exchange(OPT_STRUCTURED_REPLY, &[]).await?.last {
        Final::Ack => true,
        Final::Err(..) => false,
    };

    let mut allocation_context = None;
    if structured {
        let req =
            MetaContextRequest { export: export.into(), queries: vec![BASE_ALLOCATION.into()] };
        let res = opts.exchange(OPT_SET_META_CONTEXT, &req.encode()).await?;
        if matches!(res.last, Final::Ack) {
            for r in res.replies.iter().filter(|r| r.reply_type == REP_META_CONTEXT) {
                let (id, name) = decode_meta_context(&r.data)
                    .ok_or_else(|| fail("malformed NBD_REP_META_CONTEXT".into()))?;
                if name == BASE_ALLOCATION {
                    allocation_context = Some(id);
                }
            }
        }
    }

    let req = InfoRequest { name: export.into(), requests: vec![INFO_BLOCK_SIZE] };
    let res = opts.exchange(OPT_GO, &req.encode()).await?;
    if let Final::Err(ty, msg) = res.last {
        let what = match ty {
            REP_ERR_UNKNOWN => "no such export",
            REP_ERR_UNSUP => "server does not support NBD_OPT_GO",
            REP_ERR_POLICY => "refused by policy",
            REP_ERR_TLS_REQD => "server requires TLS",
            REP_ERR_SHUTDOWN => "server is shutting down",
            REP_ERR_BLOCK_SIZE_REQD => "server requires block size negotiation",
            _ => "export refused",
        };
        return Err(fail(format!("{what} ({export:?}): {msg}")));
    }
    let mut export_info = None;
    let mut block_sizes = BlockSizes::default();
    for r in res.replies.iter().filter(|r| r.reply_type == REP_INFO) {
        match Info::decode(&r.data) {
            Ok(Some(Info::Export { size, flags })) => export_info = Some((size, flags)),
            Ok(Some(Info::BlockSize { minimum, preferred, maximum })) => {
                if minimum == 0 || maximum < minimum || preferred < minimum {
                    return Err(fail(format!(
                        "nonsensical block sizes {minimum}/{preferred}/{maximum}"
                    )));
                }
                block_sizes = BlockSizes { minimum, preferred, maximum };
            }
            Ok(_) => {}
            Err(e) => return Err(fail(format!("malformed NBD_REP_INFO: {e}"))),
        }
    }
    let (size, flags) = export_info.ok_or_else(|| fail("no NBD_INFO_EXPORT before ACK".into()))?;
    if flags & FLAG_HAS_FLAGS == 0 {
        return Err(fail("transmission flags lack NBD_FLAG_HAS_FLAGS".into()));
    }
    Ok(Negotiated { size, flags, block_sizes, structured, allocation_context })
}

fn decode_meta_context(data: &[u8]) -> Option<(u32, String)> {
    let id = u32::from_be_bytes(data.get(..4)?.try_into().ok()?);
    let name = std::str::from_utf8(data.get(4..)?).ok()?;
    Some((id, name.to_owned()))
}

enum Final {
    Ack,
    Err(u32, String),
}

struct Exchange {
    replies: Vec<OptionReply>,
    last: Final,
}

struct Options<'a, S> {
    s: &'a mut S,
    addr: &'a str,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Options<'_, S> {
    fn fail(&self, reason: String) -> ClientError {
        ClientError::Handshake { addr: self.addr.to_owned(), reason }
    }

    /// Sends one option and reads its replies up to the final ACK or error.
    async fn exchange(&mut self, option: u32, data: &[u8]) -> Result<Exchange, ClientError> {
        let len = u32::try_from(data.len()).map_err(|_| self.fail("option too long".into()))?;
        let mut msg = OptionHeader { option, length: len }.encode().to_vec();
        msg.extend_from_slice(data);
        self.s.write_all(&msg).await.map_err(|e| self.fail(format!("sending option: {e}")))?;
        let mut replies = Vec::new();
        loop {
            let r = self.reply().await?;
            if r.option != option {
                return Err(
                    self.fail(format!("reply to option {} while asking {option}", r.option))
                );
            }
            if r.reply_type == REP_ACK {
                return Ok(Exchange { replies, last: Final::Ack });
            }
            if r.reply_type & (1 << 31) != 0 {
                let msg = String::from_utf8_lossy(&r.data).into_owned();
                return Ok(Exchange { replies, last: Final::Err(r.reply_type, msg) });
            }
            if replies.len() >= 1024 {
                return Err(self.fail("too many option replies".into()));
            }
            replies.push(r);
        }
    }

    async fn reply(&mut self) -> Result<OptionReply, ClientError> {
        let mut all = vec![0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut all).await.map_err(|e| self.fail(format!("reading reply: {e}")))?;
        let len = u32::from_be_bytes([all[16], all[17], all[18], all[19]]) as usize;
        if len > MAX_OPTION_REPLY {
            return Err(self.fail(format!("option reply of {len} bytes")));
        }
        all.resize(OPTION_REPLY_HEADER_LEN + len, 0);
        self.s
            .read_exact(&mut all[OPTION_REPLY_HEADER_LEN..])
            .await
            .map_err(|e| self.fail(format!("reading reply: {e}")))?;
        let (r, _) = OptionReply::decode(&all).map_err(|e| self.fail(format!("bad reply: {e}")))?;
        Ok(r)
    }
}
