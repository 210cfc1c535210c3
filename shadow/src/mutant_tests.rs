//! Tests that pin down behaviour cargo-mutants found unchecked by the other tests.

use hypercall::MmuOp;

use crate::pte::*;
use crate::tests::{vm_with_pool, Vm, L2, L3, T, VA1};

impl Vm {
    /// `QUERY_AD` of `pages` from `va` into `bm`; the accessed bitmap as bytes.
    fn query(&mut self, va: u64, pages: u64, bm: u64) -> Vec<u8> {
        self.op(MmuOp::QueryAd {
            va,
            pages,
            bitmap_gpa: bm,
        })
        .unwrap();
        let mut b = vec![0u8; hypercall::ad_bitmap_bytes(pages) as usize];
        vm_memory::Bytes::read_slice(&self.mem, &mut b, vm_memory::GuestAddress(bm)).unwrap();
        b
    }
}

#[test]
fn ad_walks_skip_unmapped_entries_exactly_to_the_next_boundary() {
    let mut v = vm_with_pool(64);
    v.load();
    // L2[0] is empty, L2[1] maps VA1 = 0x20_0000: a range starting one page into L2[0]
    // reaches VA1 at its page 511.
    v.cpu_sets(VA1, A);
    let b = v.query(0x1000, 512, 0x60_000);
    assert_eq!(
        b[511 / 8] >> (511 % 8) & 1,
        1,
        "first page after an empty L2 entry"
    );
    // L3[1] is empty, L3[2] maps 0x8000_0000: from one page into L3[1], 2^18 pages end
    // exactly there.
    v.w(0x30_000, 0x31_000 | T);
    v.w(0x31_000, 0x10_0000 | P | RW);
    v.upd(L3 + 16, 0x30_000 | T).unwrap();
    v.cpu_sets(0x8000_0000, A);
    let b = v.query(0x4000_1000, 1 << 18, 0x60_000);
    let last = (1usize << 18) - 1;
    assert_eq!(
        b[last / 8] >> (last % 8) & 1,
        1,
        "first page after an empty L3 entry"
    );
    assert_eq!(b.iter().map(|x| x.count_ones()).sum::<u32>(), 1);
    // The same walk for SYNC_AD.
    v.op(MmuOp::SyncAd {
        va: 0x1000,
        pages: 512,
        clear_a: false,
        clear_d: false,
    })
    .unwrap();
    assert_eq!(v.r(0x13_000) & A, A);
    v.check();
}

#[test]
fn engine_getters_and_host_resync() {
    // Two frames: a load needs 5, so use a pool of 6 and force reuse of freed frames.
    let mut v = vm_with_pool(6);
    assert_eq!(v.mmu.layout().pool_frames, 6);
    assert_eq!(v.mmu.layout().pool_base, crate::tests::POOL);
    v.load();
    assert!(
        !v.mmu.take_host_resync_needed(),
        "only never-used frames so far"
    );
    // Unlink and relink the L1: its shadow is freed, then rebuilt from a dirty frame.
    v.upd(L2 + 8, 0).unwrap();
    v.w(0x30_000, 0x10_0000 | P);
    v.upd(L2 + 8, 0x30_000 | T).unwrap(); // the one clean frame
    v.upd(L2 + 24, 0x13_000 | T).unwrap(); // needs a freed (dirty) frame
    assert!(v.mmu.take_host_resync_needed());
    assert!(!v.mmu.take_host_resync_needed(), "reported once");
    v.upd(L2 + 24, 0).unwrap(); // freed: dirty until the next resync
    v.mmu.host_resynced();
    v.upd(L2 + 24, 0x13_000 | T).unwrap();
    assert!(
        !v.mmu.take_host_resync_needed(),
        "clean again after a resync"
    );
    v.check();
}

#[test]
fn ad_walks_skip_from_any_offset_inside_an_empty_entry() {
    let mut v = vm_with_pool(64);
    v.load();
    v.cpu_sets(VA1, A);
    // From page 0x104 of the empty L2[0]: VA1 is page 0xfc of the range.
    let b = v.query(0x10_4000, 0x100, 0x60_000);
    assert_eq!(b[0xfc / 8] >> (0xfc % 8) & 1, 1);
    assert_eq!(b.iter().map(|x| x.count_ones()).sum::<u32>(), 1);
}

#[test]
fn ad_ranges_end_at_their_last_page() {
    let mut v = vm_with_pool(64);
    v.load();
    // Pages VA1 .. VA1 + 64 and the page right after them, all accessed and dirty but the
    // first (only accessed).
    v.upd(0x13_000 + 8 * 64, 0x10_9000 | P | RW).unwrap();
    v.cpu_sets(VA1 + (64 << 12), A | D);
    v.cpu_sets(VA1, A);
    v.op(MmuOp::QueryAd {
        va: VA1,
        pages: 64,
        bitmap_gpa: 0x60_000,
    })
    .unwrap();
    assert_eq!(v.r(0x60_000), 1, "accessed: page 0 only");
    assert_eq!(v.r(0x60_008), 0, "dirty: none (page 64 is outside)");
    // SYNC_AD of one page leaves the next one alone.
    v.cpu_sets(VA1 + 0x1000, A);
    v.op(MmuOp::SyncAd {
        va: VA1,
        pages: 1,
        clear_a: true,
        clear_d: true,
    })
    .unwrap();
    assert_eq!(v.leaf(VA1 + 0x1000).unwrap().value & A, A);
    assert_eq!(v.r(0x13_008) & A, 0);
    v.check();
}

#[test]
fn a_range_entering_a_table_late_is_clipped_at_its_end() {
    let mut v = vm_with_pool(64);
    v.load();
    for i in 0..3 {
        v.cpu_sets(VA1 + (i << 12), A);
    }
    // Two pages: the last of the empty L2[0] and VA1. Padding bits stay 0.
    let b = v.query(VA1 - 0x1000, 2, 0x60_000);
    assert_eq!(b, vec![0b10, 0, 0, 0, 0, 0, 0, 0]);
    v.op(MmuOp::SyncAd {
        va: VA1 - 0x1000,
        pages: 2,
        clear_a: true,
        clear_d: false,
    })
    .unwrap();
    assert_eq!(
        v.leaf(VA1 + 0x1000).unwrap().value & A,
        A,
        "outside the range"
    );
    assert_eq!(v.leaf(VA1).unwrap().value & A, 0);
}

#[test]
fn repeated_syncs_keep_what_the_guest_already_has() {
    let mut v = vm_with_pool(64);
    v.load();
    v.cpu_sets(VA1, A | D);
    for _ in 0..2 {
        v.op(MmuOp::SyncAd {
            va: VA1,
            pages: 1,
            clear_a: false,
            clear_d: false,
        })
        .unwrap();
        assert_eq!(v.r(0x13_000) & AD, AD);
    }
    assert_eq!(v.mmu.counters().a_bits_propagated, 1, "counted once");
}

#[test]
fn query_bitmaps_are_checked_over_both_halves() {
    use hypercall::HcError;
    let mut v = vm_with_pool(64);
    v.load();
    let q = |v: &mut Vm, bitmap_gpa| {
        v.op(MmuOp::QueryAd {
            va: VA1,
            pages: 128, // 16 bytes per bitmap
            bitmap_gpa,
        })
    };
    let ram_end = 0x40_0000;
    assert_eq!(
        q(&mut v, ram_end - 24),
        Err(HcError::Efault),
        "dirty half past RAM"
    );
    assert_eq!(q(&mut v, ram_end - 32), Ok(()));
    let reserved = 0x9_f000;
    assert_eq!(
        q(&mut v, reserved - 24),
        Err(HcError::Efault),
        "dirty half reserved"
    );
    assert_eq!(v.r(reserved), 0, "nothing written there");
    let l1 = 0x51_000;
    v.op(MmuOp::Pin {
        level: 1,
        frame: l1,
    })
    .unwrap();
    assert_eq!(
        q(&mut v, l1 - 24),
        Err(HcError::Eperm),
        "dirty half in a table"
    );
    let before = v.r(l1);
    assert_eq!(q(&mut v, l1 - 32), Ok(()), "ends right before the table");
    assert_eq!(v.r(l1), before);
}

#[test]
fn dropping_unused_shadows_with_splits_needs_no_flush() {
    let mut v = vm_with_pool(64);
    v.load();
    v.mmu.end_batch(0);
    // L3[0] → L2 (with a split 2 MiB leaf) → L1: nothing was accessed.
    v.upd(L3, 0).unwrap();
    assert_eq!(v.mmu.frame_type(L2), None);
    assert_eq!(v.mmu.end_batch(0).flush, None);
    assert_eq!(v.mmu.counters().split_tables_live, 0);
    v.check();
}

#[test]
fn relocating_an_l2_copies_the_or_of_its_split_leaves() {
    let mut v = vm_with_pool(64);
    v.load();
    // Two split pages accessed, one written: the copy gets A|D (an XOR would lose A).
    v.cpu_sets(crate::tests::VA2M, A);
    v.cpu_sets(crate::tests::VA2M + 0x1000, A | D);
    v.op(MmuOp::RelocateTable {
        old: L2,
        new: 0x51_000,
    })
    .unwrap();
    assert_eq!(v.r(0x51_000 + 16) & AD, AD);
    v.check();
}

#[test]
fn dropping_a_used_split_pointer_flushes_even_if_no_split_leaf_was_used() {
    // A walk that faulted at a split leaf still set A in the shadow L2 entry (a
    // paging-structure cache may hold it): dropping that L2 shadow needs a flush.
    let mut v = vm_with_pool(64);
    v.load();
    let root = v.mmu.loaded_root(0).unwrap().shadow_root;
    let l3s = v.r(root) & ADDR;
    let l2s = v.r(l3s) & ADDR;
    v.w(l2s + 16, v.r(l2s + 16) | A);
    v.mmu.end_batch(0);
    v.upd(L3, 0).unwrap();
    assert_eq!(
        v.mmu.end_batch(0).flush,
        Some(crate::FlushReason::ShadowDropped)
    );
}

#[test]
fn ad_walks_never_follow_an_unvalidated_word() {
    // A garbage word in a typed L2 (the response-write hole) pointing at an untyped frame
    // full of "leaves": SYNC_AD must not walk into it, nor write there.
    let mut v = vm_with_pool(64);
    v.load();
    v.w(0x70_000, 0x10_0000 | P | RW | A | D);
    v.w(L2 + 8 * 5, 0x70_000 | P | RW | US);
    v.op(MmuOp::SyncAd {
        va: 5 << 21,
        pages: 1,
        clear_a: true,
        clear_d: true,
    })
    .unwrap();
    assert_eq!(v.r(0x70_000), 0x10_0000 | P | RW | A | D);
    assert_eq!(v.query(5 << 21, 1, 0x60_000), vec![0; 8]);
}

#[test]
fn success_counters_count_each_op() {
    let mut v = vm_with_pool(64);
    v.load();
    v.upd(0x13_000 + 8 * 9, 0x10_9000 | P).unwrap();
    v.upd(0x13_000 + 8 * 9, 0).unwrap();
    v.op(MmuOp::Pin {
        level: 1,
        frame: 0x51_000,
    })
    .unwrap();
    v.op(MmuOp::Unpin {
        frame: 0x51_000,
        detach: false,
    })
    .unwrap();
    for _ in 0..2 {
        v.op(MmuOp::SyncAd {
            va: VA1,
            pages: 1,
            clear_a: false,
            clear_d: false,
        })
        .unwrap();
    }
    v.query(VA1, 1, 0x60_000);
    let c = v.mmu.counters();
    assert_eq!((c.updates, c.pins, c.unpins), (2, 2, 1));
    assert_eq!((c.ad_syncs, c.queries), (2, 1));
}

#[test]
fn a_failed_validation_rolls_back_every_reference_it_took() {
    let mut v = vm_with_pool(64);
    v.load();
    // An L2 whose entries 1 and 3 type two fresh L1s before entry 4 fails.
    let (l2, a, b) = (0x50_000, 0x51_000, 0x52_000);
    v.w(l2 + 8, a | T);
    v.w(l2 + 24, b | T);
    v.w(l2 + 32, crate::tests::POOL | T);
    assert!(v
        .op(MmuOp::Pin {
            level: 2,
            frame: l2
        })
        .is_err());
    for f in [l2, a, b] {
        assert_eq!(v.mmu.frame_type(f), None, "{f:#x} rolled back");
    }
    v.check();
}
