//! Decoders of on-disk bytes never panic, whatever they are given (the bytes on a pool disk
//! are outside input: a corrupt or hostile disk must give an error, not a crash).

use proptest::prelude::*;

use crate::codec::Dec;
use crate::layout::Superblock;
use crate::meta::{Meta, decode_record};

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Superblock::decode(&bytes);
        let _ = Meta::decode_state(1 << 20, 1000, &bytes);
        let mut d = Dec::new(&bytes, "fuzz");
        while decode_record(&mut d).is_ok() {}
    }

    #[test]
    fn flipped_checkpoints_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut m = Meta::new(1 << 20, 64);
        let id = trireme_types::ReplicaId::from_bytes([1; 16]);
        let rec = crate::meta::Record::CreateReplica {
            id, size: 8 << 20, thin: false, meta: crate::ReplicaMeta::default(),
            extents: vec![crate::meta::Extent { v: 0, p: 3, n: 8 }],
        };
        m.apply(&rec, false).unwrap();
        let mut state = m.encode_state();
        for (i, x) in flips {
            let at = i.index(state.len());
            state[at] ^= x | 1;
        }
        let _ = Meta::decode_state(1 << 20, 64, &state);
    }
}
