//! Property test (fuzz substitute) for the decoder: arbitrary bytes never panic, and every
//! entry the encoder builds decodes back to itself.
use hypercall::*;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn arbitrary_request_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        let _ = decode_request(&bytes);
    }

    #[test]
    fn arbitrary_entry_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
        match decode_entry(&bytes) {
            Ok(_) => prop_assert_eq!(bytes.len(), ENTRY_LEN),
            Err(e) => prop_assert!(e.status() < 0),
        }
    }

    #[test]
    fn structured_entries_never_panic(kind in 0u16..20, flags in any::<u16>(), a0 in any::<u64>(), a1 in any::<u64>(), a2 in any::<u64>()) {
        let e = MmuEntry { kind, flags, reserved: 0, a0, a1, a2 };
        let _ = decode_entry(&e.to_bytes());
    }

    #[test]
    fn truncated_batches_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), count in 0u32..2000) {
        let n = batch_entries(&bytes, count).take(10).filter(|r| r.is_err()).count();
        prop_assert!(n <= 10);
    }

    #[test]
    fn pt_updates_round_trip(ptr in any::<u64>(), val in any::<u64>()) {
        let ptr = ptr & !7;
        prop_assert_eq!(
            decode_entry(&MmuEntry::pt_update(ptr, val).to_bytes()),
            Ok(MmuOp::PtUpdate { ptr, val, preserve_ad: false })
        );
    }
}
