//! Tests that pin down behaviour cargo-mutants found unchecked by the other tests.
#![allow(clippy::single_range_in_vec_init)]

use hypercall::{FlushTarget, MmuOp};

use crate::pte::*;
use crate::tests::{vm_with_pool, Vm, L1, L2, L3, T, VA1};

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
    assert!(!v.mmu.host_resync_needed(), "only never-used frames so far");
    // Unlink and relink the L1: its shadow is freed, then rebuilt from a dirty frame.
    v.upd(L2 + 8, 0).unwrap();
    v.w(0x30_000, 0x10_0000 | P);
    v.upd(L2 + 8, 0x30_000 | T).unwrap(); // the one clean frame
    v.upd(L2 + 24, 0x13_000 | T).unwrap(); // needs a freed (dirty) frame
    assert!(v.mmu.host_resync_needed());
    assert_eq!(v.mmu.stale_chunks(), [0], "one chunk: the whole pool");
    v.upd(L2 + 24, 0).unwrap(); // freed: dirty until the next resync
    v.mmu.host_resynced_chunks(&[0]);
    assert!(!v.mmu.host_resync_needed());
    v.upd(L2 + 24, 0x13_000 | T).unwrap();
    assert!(!v.mmu.host_resync_needed(), "clean again after a resync");
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

#[test]
fn every_rule_answers_the_error_its_readme_row_documents() {
    // cargo-mutants does not mutate inside `macro_rules!` invocations, so the rule → error
    // table in `rules.rs` is checked here against the README's table instead.
    let readme = include_str!("../README.md");
    let table = readme
        .split("\n\n")
        .find(|p| p.starts_with("| Rule (`name`) | Error |"))
        .unwrap();
    let rows: Vec<(&str, &str)> = table
        .lines()
        .filter_map(|l| {
            let mut cells = l.strip_prefix("| `")?.split(" | ");
            let name = cells.next()?.strip_suffix('`')?;
            Some((name, cells.next()?))
        })
        .collect();
    assert_eq!(rows.len(), crate::Rule::COUNT, "one README row per rule");
    for r in crate::Rule::ALL {
        let row = rows.iter().find(|(n, _)| *n == r.name());
        assert_eq!(
            row.map(|(_, e)| *e),
            Some(r.error().name()),
            "rule {r:?} ({})",
            r.name()
        );
    }
}

/// The mask of bits `lo..hi`.
fn bits(r: std::ops::Range<u32>) -> u64 {
    r.fold(0, |m, b| m | 1 << b)
}

#[test]
fn entry_bits_and_whitelists_are_the_architectural_ones() {
    // Written from bit numbers (Intel SDM vol. 3 §4.5 and the README whitelist), not from
    // the constants: a test built from the constants follows a mutated constant.
    let flags = [P, RW, US, PWT, PCD, A, D, PS, PAT_4K, G, PAT_2M, NX];
    let want = [0, 1, 2, 3, 4, 5, 6, 7, 7, 8, 12, 63].map(|b| 1u64 << b);
    assert_eq!(flags, want);
    assert_eq!(AD, bits(5..7));
    assert_eq!(AVAIL, bits(9..12) | bits(52..59));
    assert_eq!(MAXPHYADDR, 46);
    assert_eq!(ADDR, bits(12..46));
    assert_eq!(ADDR_2M, bits(21..46));
    assert_eq!(ADDR_ABOVE_MAX, bits(46..52));
    assert_eq!(MISALIGNED_2M, bits(13..21));
    let common = bits(0..7) | bits(9..12) | bits(52..59) | 1 << 63;
    assert_eq!(L1_ALLOWED, common | bits(7..9) | bits(12..46));
    assert_eq!(
        L2_LEAF_ALLOWED,
        common | bits(7..9) | 1 << 12 | bits(21..46)
    );
    assert_eq!(NONLEAF_ALLOWED, common | bits(12..46));
    let rights = bits(0..5) | 1 << 63; // P RW US PWT PCD, NX
    assert_eq!(SHADOW_LEAF_KEEP, rights | bits(7..9) | bits(12..46));
    assert_eq!(SHADOW_NONLEAF_KEEP, rights);
    assert_eq!(SPLIT_KEEP, rights | 1 << 8);
    assert_eq!((ENTRIES, FRAMES_2M), (512, 512));
}

#[test]
fn upgrades_keep_frame_and_attributes_and_only_add_rights() {
    let o = 0x5000 | P | RW | US;
    assert!(is_upgrade(o, o));
    assert!(
        is_upgrade(o, o | AD | 1 << 9),
        "A/D and software bits do not count"
    );
    let r = (o & !(RW | US)) | NX;
    assert!(
        is_upgrade(r, r),
        "a read-only, supervisor, NX leaf kept as it is"
    );
    for (less, more) in [(o & !RW, o), (o & !US, o), (o | NX, o), (r, o)] {
        assert!(is_upgrade(less, more), "{less:#x} -> {more:#x}");
        assert!(!is_upgrade(more, less), "{more:#x} -> {less:#x}");
    }
    // Frame, presence and every attribute bit must stay (bit 7 is PAT in a 4 KiB leaf).
    for b in [1 << 0, 1 << 3, 1 << 4, 1 << 7, 1 << 8, 1 << 12, 1 << 45] {
        assert!(!is_upgrade(o, o ^ b), "bit {:#x} changed", b);
        assert!(!is_upgrade(o ^ b, o), "bit {:#x} changed back", b);
    }
}

#[test]
fn cache_attributes_reach_the_shadow_and_software_bits_do_not() {
    let mut v = vm_with_pool(64);
    v.load();
    let soft = bits(9..12) | bits(52..59);
    let cache = 1 << 3 | 1 << 4; // PWT, PCD
                                 // A 4 KiB leaf with PWT, PCD, PAT (bit 7) and every software bit.
    let leaf = 0x10_9000 | P | RW | US | cache | 1 << 7 | soft;
    v.upd(L1 + 8 * 9, leaf).unwrap();
    let va = VA1 + 0x9000;
    assert_eq!(v.leaf(va).unwrap().value, leaf & !soft);
    // Protection-key bits are refused.
    for b in 59..63 {
        assert_eq!(
            v.upd(L1 + 8 * 10, 0x10_a000 | P | 1 << b),
            Err(hypercall::HcError::Einval),
            "bit {b}"
        );
    }
    // A 2 MiB leaf with PWT, PCD and PAT (bit 12): split leaves carry PAT at bit 7.
    v.upd(L2 + 8 * 3, 0x20_0000 | P | RW | PS | cache | 1 << 12 | soft)
        .unwrap();
    let split = v.leaf((3 << 21) + 0x5000).unwrap().value;
    assert_eq!(split, 0x20_5000 | P | RW | cache | 1 << 7);
    // A non-leaf entry with PWT and PCD.
    v.upd(L2 + 8 * 4, 0x30_000 | P | RW | US | cache | soft)
        .unwrap();
    let root = v.mmu.loaded_root(0).unwrap().shadow_root;
    let l2s = v.r(v.r(root) & ADDR) & ADDR;
    assert_eq!(v.r(l2s + 8 * 4) & !ADDR, P | RW | US | cache);
    v.check();
    // Changing a cache attribute of a used leaf is a downgrade: it needs a flush.
    v.mmu.end_batch(0);
    for b in [1 << 3, 1 << 4, 1 << 7] {
        v.cpu_sets(va, A);
        let e = v.r(L1 + 8 * 9);
        v.upd(L1 + 8 * 9, e ^ b).unwrap();
        assert_eq!(
            v.mmu.end_batch(0).flush,
            Some(crate::FlushReason::LeafDowngraded),
            "bit {b:#x}"
        );
    }
    v.check();
}

impl Vm {
    /// GPA of the shadow of typed table `gpa`.
    fn shadow_gpa(&self, gpa: u64) -> u64 {
        let s = self.mmu.frames.shadow(gpa >> 12);
        self.mmu.pool.pfn(s.unwrap()) << 12
    }

    /// The first violation the checker reports (it must report one).
    fn violation(&self) -> crate::InvariantViolation {
        self.mmu.check_invariants(&self.mem).unwrap_err()
    }
}

/// A loaded address space with a clean check (a fresh one per corruption).
fn checked_vm() -> Vm {
    let mut v = vm_with_pool(64);
    v.load();
    v.upd(L1 + 8 * 4, 0x10_4000 | P | US).unwrap(); // a read-only leaf
    v.check();
    v
}

#[test]
fn invariant_names_are_distinct_and_reported() {
    use crate::InvariantKind as K;
    let all = [
        K::UnvalidatedEntry,
        K::References,
        K::WritableTable,
        K::MapsNonRam,
        K::ShadowMismatch,
        K::Pool,
        K::Root,
        K::Unbacked,
    ];
    let mut names: Vec<_> = all.iter().map(|k| k.name()).collect();
    assert!(names
        .iter()
        .all(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), all.len());
    let v = checked_vm();
    v.w(L1 + 8 * 30, crate::tests::POOL | P);
    let e = v.violation();
    assert!(e.to_string().contains("`unvalidated_entry`"), "{e}");
}

#[test]
fn invariant_checker_catches_corrupted_leaves() {
    let kind = |v: &Vm| v.violation().kind;
    let mismatch = crate::InvariantKind::ShadowMismatch;
    // The writable leaf L1[0] (frame 0x100) and the read-only L1[4].
    let (rw, ro) = (v_leaf_slot(0), v_leaf_slot(4));
    // Another RAM frame, same rights.
    let v = checked_vm();
    v.w(rw, v.r(rw) ^ 0x1000);
    assert_eq!(kind(&v), mismatch, "frame");
    for b in [US, PWT, PCD, PAT_4K, G, NX] {
        let v = checked_vm();
        v.w(rw, v.r(rw) ^ b);
        assert_eq!(kind(&v), mismatch, "bit {b:#x}");
    }
    let v = checked_vm();
    v.w(rw, v.r(rw) & !RW);
    assert_eq!(kind(&v), mismatch, "RW lost");
    let v = checked_vm();
    v.w(ro, v.r(ro) | RW);
    assert_eq!(kind(&v), mismatch, "RW gained");
    // A and D are the CPU's to set.
    let v = checked_vm();
    v.w(rw, v.r(rw) | AD);
    v.w(ro, v.r(ro) | A);
    v.check();
}

/// Shadow slot of L1 entry `i` in a [`checked_vm`] (same in every fresh one).
fn v_leaf_slot(i: u64) -> u64 {
    checked_vm().leaf(VA1 + (i << 12)).unwrap().slot_gpa
}

#[test]
fn invariant_checker_catches_corrupted_upper_entries() {
    let kind = |v: &Vm| v.violation().kind;
    let mismatch = crate::InvariantKind::ShadowMismatch;
    let l2s = checked_vm().shadow_gpa(L2);
    // L2[1] → the L1: not present, or with a bit the shadow never carries.
    type Corrupt = fn(u64) -> u64;
    let corrupt: [(&str, Corrupt); 3] = [
        ("P", |s| s & !P),
        ("D", |s| s | D),
        ("software bit", |s| s | 1 << 9),
    ];
    for (what, bad) in corrupt {
        let v = checked_vm();
        v.w(l2s + 8, bad(v.r(l2s + 8)));
        assert_eq!(kind(&v), mismatch, "{what}");
    }
    let v = checked_vm();
    v.w(l2s + 8, v.r(l2s + 8) | A);
    v.check();
    // L2[2] is a 2 MiB leaf: its shadow must point, present, at its split.
    let v = checked_vm();
    v.w(l2s + 16, v.r(l2s + 16) & !P);
    assert_eq!(kind(&v), mismatch, "split pointer not present");
    let v = checked_vm();
    v.w(l2s + 16, (v.r(l2s + 16) & !ADDR) | v.shadow_gpa(L1));
    assert_eq!(kind(&v), mismatch, "split pointer at another shadow");
}

#[test]
fn invariant_checker_catches_bad_pool_records() {
    use crate::pool::Owner;
    use crate::InvariantKind as K;
    // A second shadow of the L1 (an orphan: the L1's record names the first).
    let mut v = checked_vm();
    let owner = Owner::Table {
        pfn: L1 >> 12,
        level: 1,
    };
    v.mmu.pool.alloc(owner, 0).unwrap();
    let e = v.violation();
    assert_eq!(e.kind, K::Pool, "{e}");
    assert!(e.detail.contains("orphan"), "{e}");
    // A split for an entry that is not a 2 MiB leaf (L2[1] references the L1).
    let mut v = checked_vm();
    let split = |idx| Owner::Split { l2: L2 >> 12, idx };
    v.mmu.pool.alloc(split(1), 0).unwrap();
    let e = v.violation();
    assert_eq!(e.kind, K::Pool, "{e}");
    assert!(e.detail.contains("non-2M"), "{e}");
    // A split for a not-present entry with PS set (not-present entries may hold anything).
    let mut v = checked_vm();
    v.upd(L2 + 8 * 5, 0x20_0000 | PS).unwrap();
    v.check();
    v.mmu.pool.alloc(split(5), 0).unwrap();
    let e = v.violation();
    assert_eq!(e.kind, K::Pool, "{e}");
    assert!(e.detail.contains("non-2M"), "{e}");
    // A second split of the 2 MiB leaf L2[2], not linked from the L2 shadow.
    let mut v = checked_vm();
    let s = v.mmu.pool.alloc(split(2), 0).unwrap();
    let l2 = v.shadow_gpa(L2) + 16;
    let first = v.r(l2);
    // Fill it like the real one so only the link is wrong.
    for i in 0..512 {
        let real = v.r((first & ADDR) + 8 * i);
        v.w((v.mmu.pool.pfn(s) << 12) + 8 * i, real);
    }
    let e = v.violation();
    assert_eq!(e.kind, K::Pool, "{e}");
    assert!(e.detail.contains("not linked"), "{e}");
}

#[test]
fn invariant_checker_catches_bad_roots() {
    use crate::InvariantKind as K;
    // vCPU 1 "loads" the L1.
    let mut v = checked_vm();
    v.mmu.roots[1] = Some(L1 >> 12);
    assert_eq!(v.violation().kind, K::Root);
    // vCPU 1 loads a pinned L4 whose shadow is gone.
    let mut v = checked_vm();
    let l4b = 0x50_000;
    v.op(MmuOp::Pin {
        level: 4,
        frame: l4b,
    })
    .unwrap();
    v.check();
    let s = v.mmu.frames.take_shadow(l4b >> 12).unwrap();
    v.mmu.pool.free(s);
    v.check();
    v.mmu.roots[1] = Some(l4b >> 12);
    assert_eq!(v.violation().kind, K::Root);
}

#[test]
fn reverse_map_lists_stay_exact_under_any_add_remove_order() {
    use crate::pool::{Owner, Pool};
    use std::collections::BTreeMap;
    let frames = 2u64;
    let pfns = 6u64;
    let mut p = Pool::new(0x100_0000, frames, pfns);
    for _ in 0..frames {
        p.alloc(Owner::Table { pfn: 1, level: 1 }, 0).unwrap();
    }
    // A fixed pseudo-random walk (64-bit LCG) over 48 slots, compared with a plain map.
    let mut model: BTreeMap<u32, u64> = BTreeMap::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        x >> 33
    };
    for step in 0..3000 {
        let slot = (next() % 48) as u32 * 21; // spread over both frames, slot 0 included
        let pfn = next() % pfns;
        match model.get(&slot) {
            Some(&old) => {
                p.rmap_add(slot, pfn); // already linked: no-op
                assert!(p.rmap_linked(slot));
                p.rmap_remove(slot);
                model.remove(&slot);
                assert!(
                    !p.rmap_linked(slot),
                    "step {step}: {slot} still linked to {old}"
                );
                p.rmap_remove(slot); // not linked: no-op
            }
            None => {
                p.rmap_add(slot, pfn);
                model.insert(slot, pfn);
            }
        }
        for f in 0..pfns {
            let mut got = Vec::new();
            let mut cur = p.rmap_first(f);
            while let Some(s) = cur {
                assert!(got.len() <= model.len(), "step {step}: cycle in list {f}");
                got.push(s);
                cur = p.rmap_next(s);
            }
            got.sort_unstable();
            let want: Vec<u32> = model
                .iter()
                .filter(|(_, &t)| t == f)
                .map(|(&s, _)| s)
                .collect();
            assert_eq!(got, want, "step {step}: list of frame {f}");
        }
    }
    // Frames outside the map are ignored.
    p.rmap_add(5, pfns);
    assert!(!p.rmap_linked(5), "slot 5 is never used above");
    assert_eq!(p.rmap_first(pfns), None);
    assert_eq!(p.rmap_first(u64::MAX), None);
}

#[test]
fn pool_index_bounds() {
    use crate::pool::Pool;
    let p = Pool::new(0x100_0000, 3, 16);
    assert_eq!(p.total(), 3);
    assert_eq!(p.index_of(0x100_0000 - 1), None);
    assert_eq!(p.index_of(0x100_0000), Some(0));
    assert_eq!(p.index_of(0x100_2fff), Some(2));
    assert_eq!(p.index_of(0x100_3000), None);
    assert_eq!(p.pfn(2), 0x1002);
}

#[test]
fn layout_classification_is_exact_at_every_boundary() {
    use crate::{FrameClass as C, Layout};
    // RAM 0..1 MiB with a reserved page inside, the pool right after it, and more RAM
    // right after the pool; two RAM ranges that touch at 16 MiB.
    let l = Layout {
        ram: vec![0..0x10_0000, 0x11_0000..0x100_0000, 0x100_0000..0x200_0000],
        reserved: vec![0x9_f000..0xa_0000],
        pool_base: 0x10_0000,
        pool_frames: 16,
    }
    .validated()
    .unwrap();
    let cases = [
        (0x9e, C::Ram),
        (0x9f, C::Reserved),
        (0xa0, C::Ram),
        (0xff, C::Ram),
        (0x100, C::Pool),
        (0x10f, C::Pool),
        (0x110, C::Ram),
        (0xfff, C::Ram),
        (0x1000, C::Ram),
        (0x1fff, C::Ram),
        (0x2000, C::Outside),
    ];
    for (pfn, want) in cases {
        assert_eq!(l.classify(pfn), want, "frame {pfn:#x}");
    }
    // A range is RAM only inside one RAM range.
    assert_eq!(l.classify_range(0xa_0000, 0x6_0000), C::Ram);
    assert_eq!(l.classify_range(0xa_0000, 0x6_1000), C::Pool);
    assert_eq!(l.classify_range(0x9_e000, 0x1000), C::Ram);
    assert_eq!(l.classify_range(0x9_e000, 0x1001), C::Reserved);
    assert_eq!(l.classify_range(0xff_f000, 0x1000), C::Ram);
    assert_eq!(
        l.classify_range(0xff_f000, 0x2000),
        C::Outside,
        "two ranges"
    );
    assert_eq!(l.classify_range(0x1ff_f000, 0x1000), C::Ram);
    assert_eq!(l.classify_range(0x1ff_f000, 0x1001), C::Outside);
    assert_eq!(l.classify_range(u64::MAX - 0xfff, 0x1000), C::Outside);
    assert_eq!(l.pool_range(), 0x10_0000..0x11_0000);
    assert_eq!(l.ram_end_pfn(), 0x2000);
}

#[test]
fn layout_limits_are_inclusive_where_documented() {
    use crate::{Layout, ShadowError as E};
    let base = || Layout {
        ram: vec![0..0x10_0000],
        reserved: vec![],
        pool_base: 0x10_0000,
        pool_frames: 1,
    };
    assert!(base().validated().is_ok(), "the pool may touch RAM");
    // RAM up to MAX_RAM_END, ranges and the pool up to 2^46.
    let l = Layout {
        ram: vec![0..crate::layout::MAX_RAM_END],
        pool_base: (1 << 46) - 0x1000,
        ..base()
    };
    assert!(l.validated().is_ok());
    let l = Layout {
        ram: vec![0..crate::layout::MAX_RAM_END + 0x1000],
        ..base()
    };
    assert_eq!(l.validated(), Err(E::BadRam));
    let l = Layout {
        reserved: vec![(1 << 46) - 0x1000..1 << 46],
        ..base()
    };
    assert!(l.validated().is_ok());
    let l = Layout {
        reserved: vec![(1 << 46) - 0x1000..(1 << 46) + 0x1000],
        ..base()
    };
    assert!(matches!(l.validated(), Err(E::BadRange(..))));
    let l = Layout {
        pool_base: 1 << 46,
        ..base()
    };
    assert!(matches!(l.validated(), Err(E::BadPool(..))));
    // Pool size: below 2^22 frames.
    let l = Layout {
        pool_base: 1 << 40,
        pool_frames: (1 << 22) - 1,
        ..base()
    };
    assert!(l.validated().is_ok());
    let l = Layout {
        pool_base: 1 << 40,
        pool_frames: 1 << 22,
        ..base()
    };
    assert!(matches!(l.validated(), Err(E::BadPool(..))));
    let l = Layout {
        pool_base: 0x10_0800,
        ..base()
    };
    assert!(matches!(l.validated(), Err(E::BadPool(..))), "unaligned");
    // Unaligned ends and empty ranges.
    for r in [0..0x10_0800, 0x800..0x10_0000, 0x1000..0x1000] {
        let l = Layout {
            ram: vec![r.clone()],
            ..base()
        };
        assert!(matches!(l.validated(), Err(E::BadRange(..))), "{r:x?}");
    }
    // Pool overlapping RAM by one frame at either end.
    for pool_base in [0xf_f000, 0x20_0000 - 0x1000] {
        let l = Layout {
            ram: vec![0..0x10_0000, 0x20_0000..0x30_0000],
            pool_base,
            pool_frames: 2,
            ..base()
        };
        assert_eq!(l.validated(), Err(E::PoolOverlapsRam), "{pool_base:#x}");
    }
    // Touching RAM ranges are fine, overlapping ones are not.
    let l = Layout {
        ram: vec![0x20_0000..0x30_0000, 0..0x20_0000],
        pool_base: 0x30_0000,
        ..base()
    };
    assert_eq!(l.validated().unwrap().ram[0], 0..0x20_0000, "sorted");
    let l = Layout {
        ram: vec![0x1f_f000..0x30_0000, 0..0x20_0000],
        pool_base: 0x30_0000,
        ..base()
    };
    assert_eq!(l.validated(), Err(E::RamOverlap(0x1f_f000)));
}

#[test]
fn split_leaves_of_a_2m_leaf_without_pat_have_no_pat() {
    // L2[2] maps 0x20_0000 with P | RW | PS and PAT (bit 12) clear: bit 7 of a 4 KiB leaf
    // is PAT, so no split leaf may carry it (it would change the memory type).
    let mut v = vm_with_pool(64);
    v.load();
    for j in [0u64, 1, 511] {
        let l = v.leaf(crate::tests::VA2M + (j << 12)).unwrap();
        assert_eq!(l.value, (0x20_0000 + (j << 12)) | P | RW, "page {j}");
    }
    assert_eq!(split_leaf(0x20_0000 | P | PS | 1 << 12, 0) & 1 << 7, 1 << 7);
    assert_eq!(split_leaf(0x20_0000 | P | PS, 0) & 1 << 7, 0);
}

#[test]
fn every_op_kind_is_counted_under_its_own_name() {
    use crate::OpKind;
    let mut v = vm_with_pool(64);
    let ops = [
        MmuOp::PtUpdate {
            ptr: 0,
            val: 0,
            preserve_ad: false,
        },
        MmuOp::Pin {
            level: 1,
            frame: 0x51_000,
        },
        MmuOp::Unpin {
            frame: 0x51_000,
            detach: false,
        },
        MmuOp::NewBaseptr { frame: 0 },
        MmuOp::Invlpg {
            va: 0,
            target: FlushTarget::Local,
        },
        MmuOp::FlushTlb {
            target: FlushTarget::Local,
            global: false,
        },
        MmuOp::SyncAd {
            va: 0,
            pages: 1,
            clear_a: false,
            clear_d: false,
        },
        MmuOp::QueryAd {
            va: 0,
            pages: 1,
            bitmap_gpa: 0x60_000,
        },
        MmuOp::RelocateTable {
            old: 0,
            new: 0x1000,
        },
        MmuOp::ZeroFrame { frame: 0x70_000 },
        MmuOp::SetKernelRoot { frame: None },
        MmuOp::CopyFrame {
            dst: 0x70_000,
            src: 0x71_000,
        },
    ];
    let names = [
        "PT_UPDATE",
        "PIN",
        "UNPIN",
        "NEW_BASEPTR",
        "INVLPG",
        "FLUSH_TLB",
        "SYNC_AD",
        "QUERY_AD",
        "RELOCATE_TABLE",
        "ZERO_FRAME",
        "SET_KERNEL_ROOT",
        "COPY_FRAME",
    ];
    assert_eq!(OpKind::ALL.len(), ops.len());
    for (n, k) in OpKind::ALL.iter().enumerate() {
        assert_eq!(k.index(), n, "{k:?} is counted in its own slot");
    }
    for (n, k) in crate::AvoidReason::ALL.iter().enumerate() {
        assert_eq!(k.index(), n, "{k:?} is counted in its own slot");
    }
    for (n, op) in ops.iter().enumerate() {
        assert_eq!(OpKind::of(op), OpKind::ALL[n]);
        assert_eq!(OpKind::ALL[n].name(), names[n]);
        let _ = v.op(*op); // refused or not, every op is counted
        for (k, kind) in OpKind::ALL.iter().enumerate() {
            let want = u64::from(k <= n);
            assert_eq!(
                v.mmu.counters().op_count(*kind),
                want,
                "{kind:?} after {op:?}"
            );
        }
    }
}

#[test]
fn tables_in_the_last_frame_of_a_memory_region_are_usable() {
    // RAM ends at 0x40_0000 and the pool (6 frames) is a region of its own: the last frame
    // of each must open as a table.
    let mut v = vm_with_pool(6);
    v.load(); // 5 pool frames: L4, L3, L2, L1 and the split
    let last_ram = 0x3f_f000;
    v.w(last_ram + 8, 0x10_0000 | P | RW);
    v.op(MmuOp::Pin {
        level: 1,
        frame: last_ram,
    })
    .unwrap();
    v.upd(L2 + 8 * 7, last_ram | T).unwrap(); // its shadow takes the last pool frame
    let l = v.leaf((7 << 21) + 0x1000).unwrap();
    assert_eq!(l.slot_gpa, crate::tests::POOL + 5 * 0x1000 + 8);
    v.check();
}

#[test]
fn reclaim_keeps_the_shadow_an_update_is_writing_into() {
    // Pool of 8: the loaded tree takes 5, a pinned but not loaded L4B → L3B → L2B the other
    // 3. Linking a new L1 into L2B needs a frame: reclaim may drop L4B's and L3B's
    // shadows, never L2B's, which the update is writing into.
    let mut v = vm_with_pool(8);
    v.load();
    let (l4b, l3b, l2b, l1c) = (0x20_000, 0x21_000, 0x22_000, 0x23_000);
    v.w(l4b, l3b | T);
    v.w(l3b, l2b | T);
    v.op(MmuOp::Pin {
        level: 4,
        frame: l4b,
    })
    .unwrap();
    assert_eq!(v.mmu.counters().pool_frames_used, 8);
    v.w(l1c + 8 * 3, 0x10_5000 | P | RW);
    v.upd(l2b + 8 * 4, l1c | T).unwrap();
    assert!(v.mmu.counters().reclaims >= 1);
    v.check();
    let s = v.shadow_gpa(l2b);
    assert_eq!(v.r(s + 8 * 4) & ADDR, v.shadow_gpa(l1c));
}

#[test]
fn frame_hasher_separates_aligned_frame_numbers() {
    // Page tables often sit at aligned frame numbers; a hasher that maps them to few
    // values turns every frame lookup into a linear scan (a guest-driven slowdown).
    use std::collections::{BTreeSet, HashSet};
    use std::hash::BuildHasher;
    let b = std::hash::BuildHasherDefault::<crate::frames::FrameHasher>::default();
    let keys: BTreeSet<u64> = (0..4096u64).chain((1..4096).map(|k| k << 9)).collect();
    let hashes: HashSet<u64> = keys.iter().map(|&k| b.hash_one(k)).collect();
    assert_eq!(hashes.len(), keys.len(), "distinct frames, distinct hashes");
    let buckets: HashSet<u64> = hashes.iter().map(|h| h & 0xfff).collect();
    assert!(
        buckets.len() > 2048,
        "{} of 4096 low-bit buckets",
        buckets.len()
    );
}

#[test]
fn invariant_checker_catches_a_drifted_table_count() {
    use crate::pool::Owner;
    // A pool-bookkeeping slip: a frame allocated as a table shadow is freed as a split, so
    // the pool's table count stays one too high while every frame record is consistent.
    let mut v = checked_vm();
    let x = v
        .mmu
        .pool
        .alloc(
            Owner::Table {
                pfn: L1 >> 12,
                level: 1,
            },
            0,
        )
        .unwrap();
    v.mmu.pool.meta_mut(x).unwrap().owner = Owner::Split {
        l2: L2 >> 12,
        idx: 2,
    };
    v.mmu.pool.free(x);
    let e = v.violation();
    assert_eq!(e.kind, crate::InvariantKind::Pool, "{e}");
    assert!(e.detail.starts_with("pool counts"), "{e}");
}

#[test]
fn shadows_do_not_rely_on_the_pool_starting_zeroed() {
    // The memory object backs the pool; nothing promises it arrives zeroed. Fill every
    // pool frame with present-looking words: each shadow built there must still hold
    // exactly the entries derived from the guest.
    let mut v = vm_with_pool(8);
    for off in (0..8 * 4096).step_by(8) {
        v.w(crate::tests::POOL + off, 0x10_7000 | P | RW | US);
    }
    v.load();
    assert_eq!(v.leaf(VA1 + 0x5000), None, "L1[5] is empty");
    v.check();
}
