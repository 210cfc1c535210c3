//! Unit tests of every op and every refusal.
#![allow(clippy::single_range_in_vec_init)]

use hypercall::{HcError, MmuOp};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::pte::*;
use crate::*;

pub(crate) const POOL: u64 = 0x100_0000;
pub(crate) const L4: u64 = 0x10_000;
pub(crate) const L3: u64 = 0x11_000;
pub(crate) const L2: u64 = 0x12_000;
pub(crate) const L1: u64 = 0x13_000;
/// VA of L1[0] (L4[0] → L3[0] → L2[1] → L1).
pub(crate) const VA1: u64 = 0x20_0000;
/// VA of the 2 MiB leaf L2[2] → phys 0x20_0000.
pub(crate) const VA2M: u64 = 0x40_0000;
pub(crate) const T: u64 = P | RW | US | A | D;

pub(crate) struct Vm {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) mmu: ShadowMmu,
}

pub(crate) fn vm_with_pool(pool_frames: u64) -> Vm {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x40_0000),
        (GuestAddress(POOL), (pool_frames * 4096) as usize),
    ])
    .unwrap();
    let layout = Layout {
        ram: vec![0..0x40_0000],
        reserved: vec![0x9_f000..0xa_0000],
        pool_base: POOL,
        pool_frames,
    };
    Vm {
        mem,
        mmu: ShadowMmu::new(layout, 2).unwrap(),
    }
}

fn vm() -> Vm {
    vm_with_pool(64)
}

impl Vm {
    pub(crate) fn w(&self, gpa: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(gpa)).unwrap()
    }
    pub(crate) fn r(&self, gpa: u64) -> u64 {
        self.mem.read_obj(GuestAddress(gpa)).unwrap()
    }
    pub(crate) fn op(&mut self, op: MmuOp) -> Result<(), HcError> {
        self.mmu.apply(&self.mem, 0, &op)
    }
    pub(crate) fn upd(&mut self, ptr: u64, val: u64) -> Result<(), HcError> {
        self.op(MmuOp::PtUpdate {
            ptr,
            val,
            preserve_ad: false,
        })
    }
    pub(crate) fn check(&self) {
        self.mmu.check_invariants(&self.mem).unwrap();
    }
    /// L4 → L3 → L2 → L1 with 4 leaves (frames 0x100..0x104 RW), and a 2 MiB leaf.
    pub(crate) fn build(&mut self) {
        self.w(L4, L3 | T);
        self.w(L3, L2 | T);
        self.w(L2 + 8, L1 | T);
        self.w(L2 + 16, 0x20_0000 | P | RW | PS);
        for i in 0..4 {
            self.w(L1 + 8 * i, (0x10_0000 + 0x1000 * i) | P | RW | US);
        }
    }
    pub(crate) fn load(&mut self) {
        self.build();
        self.op(MmuOp::Pin {
            level: 4,
            frame: L4,
        })
        .unwrap();
        self.op(MmuOp::NewBaseptr { frame: L4 }).unwrap();
        let out = self.mmu.end_batch(0);
        assert!(out.new_cr3.is_some());
        self.check();
    }
    pub(crate) fn leaf(&self, va: u64) -> Option<crate::debug::ShadowLeaf> {
        self.mmu.debug_translate(&self.mem, 0, va)
    }
    /// The CPU sets `bits` in the shadow leaf of `va`.
    pub(crate) fn cpu_sets(&self, va: u64, bits: u64) {
        let l = self.leaf(va).unwrap();
        self.w(l.slot_gpa, l.value | bits);
    }
}

pub(crate) fn upd(ptr: u64, val: u64) -> MmuOp {
    MmuOp::PtUpdate {
        ptr,
        val,
        preserve_ad: false,
    }
}

#[test]
fn pin_and_load_builds_shadows() {
    let mut v = vm();
    v.load();
    let l = v.leaf(VA1 + 0x1000).unwrap();
    assert_eq!(l.value & ADDR, 0x10_1000);
    assert_eq!(l.value & AD, 0);
    assert!(l.writable && l.user);
    // The 2 MiB leaf is split; frames of typed tables inside it are read-only.
    let l = v.leaf(VA2M + 0x5000).unwrap();
    assert_eq!(l.value & ADDR, 0x20_5000);
    assert!(l.writable);
    assert_eq!(v.mmu.frame_type(L1), Some(1));
    assert_eq!(v.mmu.frame_type(L4), Some(4));
    let root = v.mmu.loaded_root(0).unwrap();
    assert_eq!(root.guest_l4, L4);
    assert!(root.shadow_root >= POOL);
    assert_eq!(v.mmu.counters().pins, 1);
    // Four table shadows (L4, L3, L2, L1) and one split: live tables exclude splits.
    let c = v.mmu.counters();
    assert_eq!(c.shadow_tables_live, 4);
    assert_eq!(c.split_tables_live, 1);
    assert_eq!(c.pool_frames_used, 5);
}

#[test]
fn leaf_to_pool_reserved_or_outside_is_eperm() {
    let mut v = vm();
    v.load();
    for (val, rule) in [
        (POOL | P, Rule::LeafMapsPool),
        (0x9_f000 | P, Rule::LeafMapsReserved),
        (0x40_0000 | P, Rule::LeafOutsideRam),
        (0xfee0_0000 | P, Rule::LeafOutsideRam),
    ] {
        assert_eq!(v.upd(L1 + 8 * 10, val), Err(HcError::Eperm));
        assert!(v.mmu.counters().rejected(rule) >= 1, "{rule:?}");
    }
    // A 2 MiB leaf touching a reserved range.
    assert_eq!(v.upd(L2 + 8 * 5, P | PS), Err(HcError::Eperm));
    v.check();
}

#[test]
fn pin_validation_refuses_bad_leaf_and_rolls_back() {
    let mut v = vm();
    v.build();
    v.w(L1 + 8 * 20, POOL | P | RW);
    assert_eq!(
        v.op(MmuOp::Pin {
            level: 4,
            frame: L4
        }),
        Err(HcError::Eperm)
    );
    for f in [L4, L3, L2, L1] {
        assert_eq!(v.mmu.frame_type(f), None);
    }
    assert_eq!(v.mmu.counters().pool_frames_used, 0);
    v.w(L1 + 8 * 20, 0);
    v.op(MmuOp::Pin {
        level: 4,
        frame: L4,
    })
    .unwrap();
    v.check();
}

#[test]
fn flag_whitelist_is_einval() {
    let mut v = vm();
    v.load();
    for (ptr, val, rule) in [
        (L1, 0x10_0000 | P | (1 << 60), Rule::ReservedBits),
        (L1, (1 << 47) | P, Rule::AddrAboveMaxPhys),
        (L2 + 8 * 3, 0x20_2000 | P | PS, Rule::Misaligned2m),
        (L3 + 8, P | PS, Rule::Leaf1g),
        (L2 + 8 * 3, 0x1_4000 | P | G, Rule::ReservedBits),
        (L4 + 8, 0x1_4000 | P | PS, Rule::ReservedBits),
    ] {
        let before = v.mmu.counters().rejected(rule);
        assert_eq!(v.upd(ptr, val), Err(HcError::Einval), "{rule:?}");
        assert_eq!(v.mmu.counters().rejected(rule), before + 1, "{rule:?}");
    }
    // PAT (bit 7) in L1, PAT (bit 12) in a 2 MiB leaf, available bits and NX are legal.
    v.upd(
        L1 + 8 * 5,
        0x10_5000 | P | PAT_4K | G | NX | (1 << 9) | (1 << 52),
    )
    .unwrap();
    v.upd(L2 + 8 * 3, 0x20_0000 | P | PS | PAT_2M).unwrap();
    assert_eq!(v.leaf(VA1 + 0x5000).unwrap().value & PAT_4K, PAT_4K);
    assert_eq!(v.leaf(0x60_0000).unwrap().value & PAT_4K, PAT_4K);
    // Not-present entries are not checked.
    v.upd(L1 + 8 * 6, 0xdead_0000_0000_0000 | 0x1e).unwrap();
    v.check();
}

#[test]
fn wrong_level_self_map_and_linear_map_are_einval() {
    let mut v = vm();
    v.load();
    // L4 entry pointing at an L1.
    assert_eq!(v.upd(L4 + 8, L1 | T), Err(HcError::Einval));
    assert_eq!(v.mmu.counters().rejected(Rule::WrongLevel), 1);
    // Recursive self-map.
    assert_eq!(v.upd(L4 + 8 * 511, L4 | T), Err(HcError::Einval));
    assert_eq!(v.mmu.counters().rejected(Rule::SelfMap), 1);
    // Linear map: L2 entry pointing at the L4.
    assert_eq!(v.upd(L2 + 8 * 4, L4 | T), Err(HcError::Einval));
    assert_eq!(v.mmu.counters().rejected(Rule::WrongLevel), 2);
    // A non-leaf entry at a table in the pool.
    assert_eq!(v.upd(L2 + 8 * 4, POOL | T), Err(HcError::Eperm));
    assert_eq!(v.mmu.counters().rejected(Rule::TableNotRam), 1);
    // An untyped table with a loop back to an ancestor being validated.
    v.w(0x30_000, 0x31_000 | T); // new L3 → new L2
    v.w(0x31_000, 0x30_000 | T); // new L2 → the L3 (wrong level)
    assert_eq!(v.upd(L4 + 8, 0x30_000 | T), Err(HcError::Einval));
    assert_eq!(v.mmu.frame_type(0x30_000), None);
    assert_eq!(v.mmu.frame_type(0x31_000), None);
    v.check();
}

#[test]
fn pt_update_outside_table_is_einval() {
    let mut v = vm();
    v.load();
    assert_eq!(v.upd(0x50_000, 0), Err(HcError::Einval));
    assert_eq!(v.upd(POOL + 8, 0), Err(HcError::Einval));
    assert_eq!(v.mmu.counters().rejected(Rule::PtrNotTable), 2);
}

#[test]
fn pin_rules() {
    let mut v = vm();
    v.load();
    assert_eq!(
        v.op(MmuOp::Pin {
            level: 4,
            frame: L4
        }),
        Err(HcError::Eexist)
    );
    assert_eq!(v.mmu.counters().rejected(Rule::AlreadyPinned), 1);
    assert_eq!(
        v.op(MmuOp::Pin {
            level: 2,
            frame: L1
        }),
        Err(HcError::Eexist)
    );
    assert_eq!(v.mmu.counters().rejected(Rule::TypeConflict), 1);
    assert_eq!(
        v.op(MmuOp::Pin {
            level: 1,
            frame: POOL
        }),
        Err(HcError::Eperm)
    );
    // Pinning a referenced table at its level is fine.
    v.op(MmuOp::Pin {
        level: 1,
        frame: L1,
    })
    .unwrap();
    v.check();
}

#[test]
fn unpin_rules_and_dead_root_harvest() {
    let mut v = vm();
    v.load();
    assert_eq!(
        v.op(MmuOp::Unpin {
            frame: 0x50_000,
            detach: false
        }),
        Err(HcError::Enoent)
    );
    assert_eq!(v.mmu.counters().rejected(Rule::NotPinned), 1);
    assert_eq!(
        v.op(MmuOp::Unpin {
            frame: L4,
            detach: false
        }),
        Err(HcError::Ebusy)
    );
    assert_eq!(v.mmu.counters().rejected(Rule::RootLoaded), 1);
    v.op(MmuOp::Pin {
        level: 1,
        frame: L1,
    })
    .unwrap();
    assert_eq!(
        v.op(MmuOp::Unpin {
            frame: L1,
            detach: false
        }),
        Err(HcError::Ebusy)
    );
    assert_eq!(v.mmu.counters().rejected(Rule::StillReferenced), 1);
    // Load a second root elsewhere, then unpin the dead one: A/D reach the guest PTEs.
    v.cpu_sets(VA1, A | D);
    v.cpu_sets(VA2M + 0x3000, A);
    v.w(0x20_000, L3 | T);
    v.op(MmuOp::Pin {
        level: 4,
        frame: 0x20_000,
    })
    .unwrap();
    v.op(MmuOp::NewBaseptr { frame: 0x20_000 }).unwrap();
    // Drop the shared L3's reference from the old root, then unpin it.
    v.op(upd(L4, 0)).unwrap();
    v.op(MmuOp::Unpin {
        frame: L4,
        detach: false,
    })
    .unwrap();
    assert_eq!(v.mmu.frame_type(L4), None);
    // L1's pin keeps it typed; the L3/L2 stay typed through the new root.
    assert_eq!(v.mmu.frame_type(L3), Some(3));
    v.op(upd(0x20_000, 0)).unwrap();
    assert_eq!(v.mmu.frame_type(L3), None);
    assert_eq!(v.mmu.frame_type(L2), None);
    assert_eq!(v.r(L2 + 16) & AD, A);
    // L1 is still pinned (its shadow keeps the bits); unpinning it harvests and untypes it.
    assert_eq!(v.r(L1) & AD, 0);
    v.op(MmuOp::Unpin {
        frame: L1,
        detach: false,
    })
    .unwrap();
    assert_eq!(v.r(L1) & AD, AD);
    assert_eq!(v.mmu.frame_type(L1), None);
    v.check();
}

#[test]
fn new_baseptr_needs_pinned_l4() {
    let mut v = vm();
    v.load();
    assert_eq!(v.op(MmuOp::NewBaseptr { frame: L3 }), Err(HcError::Enoent));
    assert_eq!(
        v.op(MmuOp::NewBaseptr { frame: 0x50_000 }),
        Err(HcError::Enoent)
    );
    assert_eq!(v.mmu.counters().rejected(Rule::NotPinnedL4), 2);
    assert_eq!(
        v.mmu.apply(
            &v.mem,
            5,
            &MmuOp::FlushTlb {
                target: hypercall::FlushTarget::Local,
                global: false
            }
        ),
        Err(HcError::Einval)
    );
    assert_eq!(v.mmu.counters().rejected(Rule::BadVcpu), 1);
}

#[test]
fn zero_frame_rules() {
    let mut v = vm();
    v.load();
    for off in (0..4096).step_by(8) {
        v.w(0x50_000 + off, 7 + off);
    }
    v.w(0x51_000, 9);
    v.op(MmuOp::ZeroFrame { frame: 0x50_000 }).unwrap();
    assert!((0..4096).step_by(8).all(|off| v.r(0x50_000 + off) == 0));
    assert_eq!(v.r(0x51_000), 9, "only the frame");
    assert_eq!(v.op(MmuOp::ZeroFrame { frame: L1 }), Err(HcError::Ebusy));
    assert_eq!(v.op(MmuOp::ZeroFrame { frame: POOL }), Err(HcError::Eperm));
    assert_eq!(
        v.op(MmuOp::ZeroFrame { frame: 0x40_0000 }),
        Err(HcError::Eperm)
    );
    assert_eq!(
        v.op(MmuOp::ZeroFrame { frame: 0x9_f000 }),
        Err(HcError::Eperm)
    );
    assert_eq!(v.mmu.counters().rejected(Rule::ZeroTyped), 1);
    assert_eq!(v.mmu.counters().rejected(Rule::ZeroNotRam), 3);
    assert_eq!(v.mmu.counters().zeroed_frames, 1);
}

#[test]
fn copy_frame_rules() {
    let mut v = vm();
    v.load();
    for off in (0..4096).step_by(8) {
        v.w(0x50_000 + off, 7 + off);
        v.w(0x52_000 + off, 1);
    }
    v.w(0x53_000, 9);
    let copy = |dst, src| MmuOp::CopyFrame { dst, src };
    v.op(copy(0x52_000, 0x50_000)).unwrap();
    assert!((0..4096)
        .step_by(8)
        .all(|off| v.r(0x52_000 + off) == 7 + off));
    assert_eq!(v.r(0x53_000), 9, "only the frame");
    // A page table may be read, never written.
    v.op(copy(0x52_000, L1)).unwrap();
    assert_eq!(v.r(0x52_000), v.r(L1));
    assert_eq!(v.op(copy(L1, 0x50_000)), Err(HcError::Ebusy));
    assert_eq!(v.r(L1) & P, P, "the table is untouched");
    for (dst, src) in [
        (0x52_000, POOL),
        (POOL, 0x50_000),
        (0x52_000, 0x40_0000),
        (0x9_f000, 0x50_000),
    ] {
        assert_eq!(
            v.op(copy(dst, src)),
            Err(HcError::Eperm),
            "{dst:#x} <- {src:#x}"
        );
    }
    assert_eq!(v.mmu.counters().rejected(Rule::CopyTyped), 1);
    assert_eq!(v.mmu.counters().rejected(Rule::CopyNotRam), 4);
    assert_eq!(v.mmu.counters().copied_frames, 2);
    v.check();
}

#[test]
fn typing_downgrades_writable_mappings_and_untyping_restores() {
    let mut v = vm();
    v.load();
    // VA1+0x2000 maps frame 0x10_2000 RW; the CPU used it.
    v.cpu_sets(VA1 + 0x2000, A);
    v.mmu.end_batch(0);
    v.w(0x10_2000, 0);
    v.op(MmuOp::Pin {
        level: 1,
        frame: 0x10_2000,
    })
    .unwrap();
    let l = v.leaf(VA1 + 0x2000).unwrap();
    assert_eq!(l.value & RW, 0);
    assert_eq!(v.mmu.end_batch(0).flush, Some(FlushReason::TypeDowngrade));
    // Frame 0x20_7000 is mapped only by the split 2 MiB leaf (never accessed).
    v.op(MmuOp::Pin {
        level: 1,
        frame: 0x20_7000,
    })
    .unwrap();
    assert!(!v.leaf(VA2M + 0x7000).unwrap().writable);
    assert!(v.mmu.counters().avoided(AvoidReason::NeverAccessed) >= 1);
    v.check();
    v.op(MmuOp::Unpin {
        frame: 0x10_2000,
        detach: false,
    })
    .unwrap();
    assert!(v.leaf(VA1 + 0x2000).unwrap().writable);
    assert_eq!(v.mmu.end_batch(0).flush, Some(FlushReason::RightsRestored));
    // A writable 4 KiB guest leaf to a typed frame is installed read-only.
    v.upd(L1 + 8 * 9, L2 | P | RW).unwrap();
    assert!(!v.leaf(VA1 + 0x9000).unwrap().writable);
    v.check();
}

#[test]
fn ad_sync_clear_and_flushes() {
    let mut v = vm();
    v.load();
    v.cpu_sets(VA1, A | D);
    v.cpu_sets(VA1 + 0x1000, A);
    v.op(MmuOp::SyncAd {
        va: VA1,
        pages: 4,
        clear_a: false,
        clear_d: false,
    })
    .unwrap();
    assert_eq!(v.r(L1) & AD, AD);
    assert_eq!(v.r(L1 + 8) & AD, A);
    assert_eq!(v.r(L1 + 16) & AD, 0);
    assert_eq!(v.mmu.end_batch(0).flush, None);
    assert_eq!(v.mmu.counters().d_bits_propagated, 1);
    assert_eq!(v.mmu.counters().a_bits_propagated, 2);
    v.op(MmuOp::SyncAd {
        va: VA1,
        pages: 2,
        clear_a: false,
        clear_d: true,
    })
    .unwrap();
    assert_eq!(v.r(L1) & AD, A);
    assert_eq!(v.leaf(VA1).unwrap().value & D, 0);
    assert_eq!(v.mmu.end_batch(0).flush, Some(FlushReason::AdCleared));
    assert_eq!(v.mmu.counters().flushed(FlushReason::AdCleared), 1);
    // 2 MiB leaf: OR over its split leaves.
    v.cpu_sets(VA2M + 0x10_0000, A | D);
    v.op(MmuOp::SyncAd {
        va: VA2M,
        pages: 1,
        clear_a: false,
        clear_d: false,
    })
    .unwrap();
    assert_eq!(v.r(L2 + 16) & AD, AD);
    v.op(MmuOp::SyncAd {
        va: VA2M,
        pages: 1,
        clear_a: true,
        clear_d: true,
    })
    .unwrap();
    assert_eq!(v.r(L2 + 16) & AD, 0);
    assert_eq!(v.leaf(VA2M + 0x10_0000).unwrap().value & AD, 0);
    // Unmapped ranges are skipped.
    v.op(MmuOp::SyncAd {
        va: 0x7f00_0000_0000,
        pages: 1 << 18,
        clear_a: true,
        clear_d: true,
    })
    .unwrap();
    assert_eq!(
        v.mmu.apply(
            &v.mem,
            1,
            &MmuOp::SyncAd {
                va: 0,
                pages: 1,
                clear_a: false,
                clear_d: false
            }
        ),
        Err(HcError::Enoent)
    );
    assert_eq!(v.mmu.counters().rejected(Rule::NoRoot), 1);
    v.check();
}

#[test]
fn pt_update_harvests_and_preserves_ad() {
    let mut v = vm();
    v.load();
    // preserve_ad: remap keeps old A/D (guest and shadow).
    v.cpu_sets(VA1, A | D);
    v.op(MmuOp::PtUpdate {
        ptr: L1,
        val: 0x10_8000 | P | RW,
        preserve_ad: true,
    })
    .unwrap();
    assert_eq!(v.r(L1), 0x10_8000 | P | RW | A | D);
    assert_eq!(v.leaf(VA1).unwrap().value & AD, 0);
    assert_eq!(v.mmu.end_batch(0).flush, Some(FlushReason::LeafRemoved));
    // Plain update on the same frame (RW removed): harvested bits kept in the new value.
    v.cpu_sets(VA1 + 0x1000, A | D);
    v.upd(L1 + 8, 0x10_1000 | P | US).unwrap();
    assert_eq!(v.r(L1 + 8), 0x10_1000 | P | US | A | D);
    assert_eq!(v.mmu.end_batch(0).flush, Some(FlushReason::LeafDowngraded));
    // Upgrade on the same frame: no flush, the shadow keeps its A/D.
    v.cpu_sets(VA1 + 0x1000, A);
    v.upd(L1 + 8, 0x10_1000 | P | US | RW).unwrap();
    assert_eq!(v.leaf(VA1 + 0x1000).unwrap().value & AD, A);
    assert_eq!(v.mmu.end_batch(0).flush, None);
    assert_eq!(v.mmu.counters().avoided(AvoidReason::UpgradeOnly), 1);
    // Plain update to another frame: the guest asked to overwrite.
    v.cpu_sets(VA1 + 0x2000, A | D);
    v.upd(L1 + 16, 0x10_9000 | P).unwrap();
    assert_eq!(v.r(L1 + 16), 0x10_9000 | P);
    // Removing a never-accessed leaf needs no flush.
    v.mmu.end_batch(0);
    v.upd(L1 + 24, 0).unwrap();
    assert_eq!(v.mmu.end_batch(0).flush, None);
    assert!(v.mmu.counters().avoided(AvoidReason::NeverAccessed) >= 1);
    // Identical value modulo A/D: shadow untouched.
    v.cpu_sets(VA1 + 0x1000, D);
    v.upd(L1 + 8, 0x10_1000 | P | US | RW).unwrap();
    assert_eq!(v.leaf(VA1 + 0x1000).unwrap().value & AD, AD);
    v.check();
}

#[test]
fn non_leaf_change_and_guest_flushes() {
    let mut v = vm();
    v.load();
    v.w(0x30_000, 0x10_0000 | P);
    // Replace L2[1] (walked: set A in the shadow L2 entry) by another L1.
    let root = v.mmu.loaded_root(0).unwrap().shadow_root;
    let l3s = v.r(root) & ADDR;
    let l2s = v.r(l3s) & ADDR;
    v.w(l2s + 8, v.r(l2s + 8) | A);
    v.upd(L2 + 8, 0x30_000 | T).unwrap();
    assert_eq!(v.mmu.frame_type(L1), None);
    assert_eq!(v.mmu.frame_type(0x30_000), Some(1));
    assert_eq!(v.mmu.end_batch(0).flush, Some(FlushReason::NonLeafChanged));
    v.op(MmuOp::Invlpg {
        va: 0,
        target: hypercall::FlushTarget::Local,
    })
    .unwrap();
    v.op(MmuOp::FlushTlb {
        target: hypercall::FlushTarget::Local,
        global: false,
    })
    .unwrap();
    assert_eq!(v.mmu.end_batch(0).flush, Some(FlushReason::GuestInvlpg));
    assert_eq!(v.mmu.end_batch(0).flush, None);
    assert_eq!(v.mmu.counters().avoided(AvoidReason::Merged), 1);
    v.check();
}

#[test]
fn query_ad_writes_bitmaps() {
    let mut v = vm();
    v.load();
    v.cpu_sets(VA1 + 0x1000, A | D);
    v.w(L1 + 16, v.r(L1 + 16) | A); // guest already saw A on page 2 (allowed before pin? write raw)
    let bm = 0x60_000;
    v.op(MmuOp::QueryAd {
        va: VA1,
        pages: 70,
        bitmap_gpa: bm,
    })
    .unwrap();
    assert_eq!(hypercall::ad_bitmap_bytes(70), 16);
    assert_eq!(v.r(bm), 0b110);
    assert_eq!(v.r(bm + 16), 0b010);
    assert_eq!(v.r(L1 + 8) & AD, 0, "query does not touch guest PTEs");
    assert_eq!(
        v.op(MmuOp::QueryAd {
            va: VA1,
            pages: 1,
            bitmap_gpa: 0x3f_fff8
        }),
        Err(HcError::Efault)
    );
    assert_eq!(
        v.op(MmuOp::QueryAd {
            va: VA1,
            pages: 1,
            bitmap_gpa: POOL
        }),
        Err(HcError::Efault)
    );
    assert_eq!(
        v.op(MmuOp::QueryAd {
            va: VA1,
            pages: 1,
            bitmap_gpa: L1 + 8
        }),
        Err(HcError::Eperm)
    );
    assert_eq!(v.mmu.counters().rejected(Rule::BitmapNotRam), 2);
    assert_eq!(v.mmu.counters().rejected(Rule::BitmapInTable), 1);
    assert_eq!(v.mmu.counters().queries, 1);
}

#[test]
fn relocate_moves_everything() {
    let mut v = vm();
    v.load();
    v.cpu_sets(VA1, A | D);
    let before = v.leaf(VA1 + 0x1000).unwrap();
    assert_eq!(
        v.op(MmuOp::RelocateTable {
            old: 0x50_000,
            new: 0x51_000
        }),
        Err(HcError::Enoent)
    );
    assert_eq!(
        v.op(MmuOp::RelocateTable { old: L1, new: L2 }),
        Err(HcError::Eexist)
    );
    assert_eq!(
        v.op(MmuOp::RelocateTable { old: L1, new: POOL }),
        Err(HcError::Eperm)
    );
    // The new frame is mapped writable by L1[5]: it gets downgraded.
    v.upd(L1 + 40, 0x50_000 | P | RW).unwrap();
    v.op(MmuOp::RelocateTable {
        old: L1,
        new: 0x50_000,
    })
    .unwrap();
    assert_eq!(v.mmu.frame_type(L1), None);
    assert_eq!(v.mmu.frame_type(0x50_000), Some(1));
    assert_eq!(v.r(L2 + 8) & ADDR, 0x50_000);
    assert_eq!(v.r(0x50_000) & AD, AD);
    assert_eq!(v.leaf(VA1 + 0x1000), Some(before));
    assert!(!v.leaf(VA1 + 0x5000).unwrap().writable);
    v.check();
    // Relocate the loaded root.
    v.op(MmuOp::RelocateTable {
        old: L4,
        new: 0x52_000,
    })
    .unwrap();
    assert_eq!(v.mmu.loaded_root(0).unwrap().guest_l4, 0x52_000);
    assert_eq!(
        v.op(MmuOp::Unpin {
            frame: 0x52_000,
            detach: false
        }),
        Err(HcError::Ebusy)
    );
    v.check();
    assert_eq!(v.mmu.counters().relocations, 2);
    assert_eq!(v.mmu.counters().rejected(Rule::RelocateUntyped), 1);
    assert_eq!(v.mmu.counters().rejected(Rule::RelocateTargetTyped), 1);
}

#[test]
fn pool_exhaustion_reclaims_then_enomem() {
    // 5 shadows per address space (L4, L3, L2, L1, split); pool of 7.
    let mut v = vm_with_pool(7);
    v.load();
    // Second address space sharing L3: only its L4 needs a new shadow.
    v.w(0x20_000, L3 | T);
    v.op(MmuOp::Pin {
        level: 4,
        frame: 0x20_000,
    })
    .unwrap();
    // A third, unshared one needs 2 more (L4 + L3 with nothing below): reclaim drops the
    // unloaded second root's shadow.
    v.w(0x21_000, 0x22_000 | T);
    v.op(MmuOp::Pin {
        level: 4,
        frame: 0x21_000,
    })
    .unwrap();
    assert!(v.mmu.counters().reclaims >= 1);
    v.check();
    // Rebuilt on demand.
    v.op(MmuOp::NewBaseptr { frame: 0x20_000 }).unwrap();
    v.check();
    // Now nothing is reclaimable beyond what the loaded root needs: ENOMEM, no panic.
    let mut v = vm_with_pool(3);
    v.build();
    assert_eq!(
        v.op(MmuOp::Pin {
            level: 4,
            frame: L4
        }),
        Err(HcError::Enomem)
    );
    assert_eq!(v.mmu.frame_type(L4), None);
    assert_eq!(v.mmu.counters().rejected(Rule::PoolExhausted), 1);
    v.check();
}

#[test]
fn counters_by_kind() {
    let mut v = vm();
    v.load();
    v.op(MmuOp::FlushTlb {
        target: hypercall::FlushTarget::Local,
        global: false,
    })
    .unwrap();
    let c = v.mmu.counters();
    assert_eq!(c.op_count(OpKind::Pin), 1);
    assert_eq!(c.op_count(OpKind::NewBaseptr), 1);
    assert_eq!(c.op_count(OpKind::FlushTlb), 1);
    assert_eq!(c.pool_frames_total, 64);
    assert_eq!(c.shadow_tables_high_water, 4);
    assert_eq!(c.pool_frames_high_water, 5);
}

#[test]
fn bad_layouts_refused() {
    let l = Layout {
        ram: vec![0..0x1000],
        reserved: vec![],
        pool_base: 0x10_0000,
        pool_frames: 1,
    };
    assert!(ShadowMmu::new(l.clone(), 0).is_err());
    assert!(ShadowMmu::new(Layout { pool_base: 0, ..l }, 1).is_err());
}
