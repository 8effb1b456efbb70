//! Golden encodings of format version 1. If one of these fails, the on-disk format changed:
//! bump the format version and add a migration (and a test decoding the old bytes) instead of
//! editing the expected values.

use trireme_types::{ReplicaId, SnapshotId, VolumeId};
use uuid::Uuid;

use crate::ReplicaMeta;
use crate::codec::{Dec, Enc};
use crate::layout::{Layout, Superblock};
use crate::meta::{Extent, Meta, Record, decode_record, encode_record};

fn id(n: u8) -> [u8; 16] {
    [n; 16]
}

fn records() -> Vec<Record> {
    let meta = ReplicaMeta { volume: Some(VolumeId::from_bytes(id(3))), generation: 9, epoch: 4 };
    let r = ReplicaId::from_bytes(id(1));
    let s = SnapshotId::from_bytes(id(2));
    vec![
        Record::CreateReplica {
            id: r,
            size: 3 << 20,
            thin: false,
            meta,
            extents: vec![Extent { v: 0, p: 5, n: 3 }],
        },
        Record::Map { id: r, v: 1, p: 9 },
        Record::Unmap { id: r, v: 2 },
        Record::SetMeta { id: r, meta: ReplicaMeta::default() },
        Record::Resize { id: r, size: 4 << 20, extents: vec![] },
        Record::Snapshot { id: s, source: r, created: 1_700_000_000 },
        Record::Clone { id: ReplicaId::from_bytes(id(4)), snapshot: s, meta },
        Record::DestroySnapshot { id: s },
        Record::DestroyReplica { id: r },
    ]
}

#[test]
fn superblock_v1_bytes() {
    let sb = Superblock {
        seq: 7,
        uuid: Uuid::from_bytes(id(9)),
        name: "golden".into(),
        layout: Layout::compute(1 << 30, 1 << 20).unwrap(),
    };
    let enc = sb.encode();
    assert_eq!(
        crc32c::crc32c(&enc),
        0x4867_4bc7,
        "update after a deliberate format change: {:#x}",
        crc32c::crc32c(&enc)
    );
}

#[test]
fn records_and_checkpoint_v1_bytes() {
    let mut e = Enc::default();
    for r in records() {
        encode_record(&mut e, &r);
    }
    let mut d = Dec::new(&e.buf, "golden");
    for r in records() {
        assert_eq!(decode_record(&mut d).unwrap(), r);
    }
    assert_eq!(crc32c::crc32c(&e.buf), 0x7104_e15d, "records: {:#x}", crc32c::crc32c(&e.buf));

    let mut m = Meta::new(1 << 20, 64);
    for r in records().into_iter().take(6) {
        m.apply(&r, false).unwrap();
    }
    let state = m.encode_state();
    assert_eq!(crc32c::crc32c(&state), 0xe677_a46d, "checkpoint: {:#x}", crc32c::crc32c(&state));
    let back = Meta::decode_state(1 << 20, 64, &state).unwrap();
    assert_eq!(back.encode_state(), state);
}
