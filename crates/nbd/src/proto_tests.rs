//! Round trips of every message, and "decoding arbitrary bytes never panics" (the codec is a
//! fuzz target).

use proptest::prelude::*;

use super::*;

fn command() -> impl Strategy<Value = Command> {
    any::<u16>().prop_map(Command::from_wire)
}

fn request() -> impl Strategy<Value = Request> {
    (any::<u16>(), command(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(
        |(flags, command, cookie, offset, length)| Request {
            flags,
            command,
            cookie,
            offset,
            length,
        },
    )
}

fn short_string() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9:/ _\\-é]{0,40}"
}

fn chunk() -> impl Strategy<Value = Chunk> {
    prop_oneof![
        Just(Chunk::None),
        (any::<u64>(), 1u32..1 << 20)
            .prop_map(|(offset, data_len)| Chunk::OffsetData { offset, data_len }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(offset, length)| Chunk::OffsetHole { offset, length }),
        (any::<u32>(), prop::collection::vec((any::<u32>(), any::<u32>()), 1..20)).prop_map(
            |(context_id, d)| Chunk::BlockStatus {
                context_id,
                descriptors: d
                    .into_iter()
                    .map(|(length, flags)| BlockDescriptor { length, flags })
                    .collect(),
            }
        ),
        (any::<u32>(), short_string()).prop_map(|(error, message)| Chunk::Error { error, message }),
        (any::<u32>(), short_string(), any::<u64>())
            .prop_map(|(error, message, offset)| Chunk::ErrorOffset { error, message, offset }),
    ]
}

fn info() -> impl Strategy<Value = Info> {
    prop_oneof![
        (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| Info::Export { size, flags }),
        short_string().prop_map(Info::Name),
        short_string().prop_map(Info::Description),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(minimum, preferred, maximum)| {
            Info::BlockSize { minimum, preferred, maximum }
        }),
    ]
}

proptest! {
    #[test]
    fn request_round_trip(req in request()) {
        prop_assert_eq!(Request::decode(&req.encode())?, req);
    }

    #[test]
    fn simple_reply_round_trip(error in any::<u32>(), cookie in any::<u64>()) {
        let r = SimpleReply { error, cookie };
        prop_assert_eq!(SimpleReply::decode(&r.encode())?, r);
    }

    #[test]
    fn chunk_round_trip(c in chunk(), cookie in any::<u64>(), done in any::<bool>()) {
        let mut buf = Vec::new();
        c.encode_into(cookie, done, &mut buf);
        let header = ChunkHeader::decode(&buf)?;
        prop_assert_eq!(header.cookie, cookie);
        prop_assert_eq!(header.flags & REPLY_FLAG_DONE != 0, done);
        let payload = &buf[CHUNK_HEADER_LEN..];
        if let Chunk::OffsetData { .. } = c {
            prop_assert_eq!(payload.len(), 8);
        } else {
            prop_assert_eq!(payload.len(), header.length as usize);
        }
        prop_assert_eq!(Chunk::decode(&header, payload)?, c);
    }

    #[test]
    fn option_header_round_trip(option in any::<u32>(), length in any::<u32>()) {
        let h = OptionHeader { option, length };
        prop_assert_eq!(OptionHeader::decode(&h.encode())?, h);
    }

    #[test]
    fn option_reply_round_trip(option in any::<u32>(), reply_type in any::<u32>(),
                               data in prop::collection::vec(any::<u8>(), 0..100)) {
        let r = OptionReply { option, reply_type, data };
        let mut buf = Vec::new();
        r.encode_into(&mut buf);
        let (back, used) = OptionReply::decode(&buf)?;
        prop_assert_eq!(used, buf.len());
        prop_assert_eq!(back, r);
    }

    #[test]
    fn info_round_trip(i in info()) {
        prop_assert_eq!(Info::decode(&i.encode())?, Some(i));
    }

    #[test]
    fn info_request_round_trip(name in short_string(), requests in prop::collection::vec(any::<u16>(), 0..10)) {
        let r = InfoRequest { name, requests };
        prop_assert_eq!(InfoRequest::decode(&r.encode())?, r);
    }

    #[test]
    fn meta_request_round_trip(export in short_string(), queries in prop::collection::vec(short_string(), 0..5)) {
        let r = MetaContextRequest { export, queries };
        prop_assert_eq!(MetaContextRequest::decode(&r.encode())?, r);
    }

    #[test]
    fn greeting_round_trip(flags in any::<u16>()) {
        prop_assert_eq!(decode_greeting(&encode_greeting(flags))?, flags);
    }

    /// Garbage in: every decoder returns an error or a value, never panics.
    #[test]
    fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), ty in any::<u16>()) {
        let _ = Request::decode(&bytes);
        let _ = SimpleReply::decode(&bytes);
        let _ = OptionHeader::decode(&bytes);
        let _ = OptionReply::decode(&bytes);
        let _ = InfoRequest::decode(&bytes);
        let _ = MetaContextRequest::decode(&bytes);
        let _ = Info::decode(&bytes);
        let _ = decode_greeting(&bytes);
        let header = ChunkHeader { flags: 0, chunk_type: ty, cookie: 0, length: bytes.len() as u32 };
        let _ = Chunk::decode(&header, &bytes);
    }
}

#[test]
fn request_bad_magic_is_reported() {
    let mut raw =
        Request { flags: 0, command: Command::Read, cookie: 1, offset: 0, length: 512 }.encode();
    assert!(matches!(Request::decode(&raw[..10]), Err(ProtoError::Truncated { .. })));
    raw[0] ^= 0xff;
    assert!(matches!(Request::decode(&raw), Err(ProtoError::BadMagic { .. })));
}

#[test]
fn meta_request_with_huge_count_fails_cleanly() {
    let mut data = Vec::new();
    data.extend_from_slice(&0u32.to_be_bytes());
    data.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(MetaContextRequest::decode(&data).is_err());
}

#[test]
fn export_name_reply_honours_no_zeroes() {
    assert_eq!(encode_export_name_reply(1, 1, false).len(), 134);
    assert_eq!(encode_export_name_reply(1, 1, true).len(), 10);
}

#[test]
fn truncate_respects_char_boundaries() {
    assert_eq!(truncate_str("héllo", 2), "h");
    assert_eq!(truncate_str("abc", 10), "abc");
}
