//! Regression tests for the isolation holes of issue 11 (engine side) and the meaning of
//! the counters: each fails on the engine before the fix.

use hypercall::{HcError, MmuOp};

use crate::pte::*;
use crate::tests::{vm_with_pool, Vm, L1, L2, L3, L4, POOL, T, VA1, VA2M};
use crate::*;

/// Second address space: L4 `0x20_000` → L3 `0x21_000` → L2 `0x22_000` (empty).
const L4B: u64 = 0x20_000;
const L3B: u64 = 0x21_000;
const L2B: u64 = 0x22_000;

impl Vm {
    fn on(&mut self, vcpu: usize, op: MmuOp) -> Result<(), HcError> {
        self.mmu.apply(&self.mem, vcpu, &op)
    }
    fn pin(&mut self, level: u8, frame: u64) -> Result<(), HcError> {
        self.op(MmuOp::Pin { level, frame })
    }
    /// GPA of the shadow of typed table `gpa`.
    fn shadow_of(&self, gpa: u64) -> u64 {
        let s = self.mmu.frames.shadow(gpa >> 12).unwrap();
        self.mmu.pool.pfn(s) << 12
    }
}

#[test]
fn garbage_word_in_a_typed_table_is_not_linked_when_the_shadow_is_rebuilt() {
    // Issue 11, hole 1 (engine side): a word that reached a typed table without validation
    // (the dispatcher wrote its response into it) must never reach a shadow.
    let mut v = vm_with_pool(9);
    v.load(); // 5 shadows: L4, L3, L2, L1, split
    v.w(L4B, L3B | T);
    v.w(L3B, L2B | T);
    v.pin(4, L4B).unwrap(); // + 3
    let x = 0x23_000;
    v.w(x, 0x10_5000 | P | RW | US);
    v.pin(1, x).unwrap(); // + 1: the pool is full
                          // `value = done = 7` lands in the typed L2B: a present entry pointing at frame x, an
                          // L1, with no back-reference recorded.
    v.w(L2B + 8 * 5, x | P | RW | US);
    let e = v.mmu.check_invariants(&v.mem).unwrap_err();
    assert_eq!(e.kind, InvariantKind::References, "{e}");
    // Reclaim drops the unloaded address space; loading it rebuilds its shadows.
    v.pin(1, 0x24_000).unwrap();
    assert!(v.mmu.counters().reclaims >= 1);
    v.on(1, MmuOp::NewBaseptr { frame: L4B }).unwrap();
    let va = 5 << 21;
    assert_eq!(v.mmu.debug_translate(&v.mem, 1, va), None, "garbage linked");
    assert_eq!(v.r(v.shadow_of(L2B) + 8 * 5), 0);
    // Unpinning x (it has no reference) cannot leave a shadow pointing at a freed frame.
    v.op(MmuOp::Unpin {
        frame: x,
        detach: false,
    })
    .unwrap();
    v.pin(1, 0x25_000).unwrap();
    assert_eq!(v.mmu.debug_translate(&v.mem, 1, va), None);
    assert_eq!(v.r(v.shadow_of(L2B) + 8 * 5), 0);
}

#[test]
fn unpin_of_a_dead_root_with_a_used_global_leaf_requests_a_flush() {
    // Issue 11, hole 2: the G translation survives the CR3 load; UNPIN drops its shadow.
    let mut v = vm_with_pool(64);
    v.load();
    v.upd(L1, 0x10_0000 | P | RW | US | G).unwrap();
    v.mmu.end_batch(0);
    v.cpu_sets(VA1, A | D);
    v.w(L4B, L3B | T);
    v.w(L3B, 0);
    v.pin(4, L4B).unwrap();
    v.op(MmuOp::NewBaseptr { frame: L4B }).unwrap();
    let out = v.mmu.end_batch(0);
    assert!(out.new_cr3.is_some());
    assert_eq!(
        out.flush, None,
        "a CR3 load alone keeps global translations"
    );
    v.op(MmuOp::Unpin {
        frame: L4,
        detach: false,
    })
    .unwrap();
    assert_eq!(v.mmu.frame_type(L1), None);
    assert_eq!(v.r(L1) & AD, AD, "harvested");
    // vCPU 1 never had the dead root: it holds nothing of it and is not interrupted.
    assert_eq!(v.mmu.flush_pending(1), None);
    assert_eq!(v.mmu.vcpus_needing_flush(), vec![0]);
    assert_eq!(
        v.mmu.end_batch(0).flush,
        Some(FlushReason::ShadowDropped),
        "the dropped leaf was used"
    );
    assert_eq!(v.mmu.take_flush(1), None);
    assert_eq!(v.mmu.counters().flushed(FlushReason::ShadowDropped), 1);
    assert_eq!(
        v.mmu.held_roots(0),
        [L4B >> 12],
        "the flush ends the lazy hold"
    );
    assert!(v.mmu.vcpus_needing_flush().is_empty());
    // Typing the frame now finds no shadow leaf to downgrade: only that flush protected it.
    v.pin(1, 0x10_0000).unwrap();
    assert_eq!(v.mmu.end_batch(0).flush, None);
    v.check();
}

#[test]
fn untyping_a_child_with_used_leaves_requests_a_flush() {
    // The last reference goes away through PT_UPDATE: the child's shadow is dropped.
    let mut v = vm_with_pool(64);
    v.load();
    v.cpu_sets(VA1 + 0x1000, A);
    v.mmu.end_batch(0);
    v.upd(L2 + 8, 0).unwrap();
    assert_eq!(v.mmu.frame_type(L1), None);
    assert_eq!(v.mmu.end_batch(0).flush, Some(FlushReason::ShadowDropped));
    // An unused child drops without a flush.
    v.w(0x30_000, 0x10_0000 | P);
    v.upd(L2 + 8, 0x30_000 | P | RW | US).unwrap();
    v.mmu.end_batch(0);
    v.upd(L2 + 8, 0).unwrap();
    assert_eq!(v.mmu.end_batch(0).flush, None);
    v.check();
}

#[test]
fn reclaiming_a_shadow_whose_upper_entries_were_used_requests_a_flush() {
    let mut v = vm_with_pool(7);
    v.load();
    v.w(L4B, L3 | T);
    v.pin(4, L4B).unwrap(); // shares L3: one new shadow (6)
                            // The CPU walked L4B's shadow entry (paging-structure caches may hold it).
    let s = v.shadow_of(L4B);
    v.w(s, v.r(s) | A);
    v.mmu.end_batch(0);
    v.w(0x24_000, 0x25_000 | T);
    v.pin(4, 0x24_000).unwrap(); // needs 2: reclaim drops L4B's shadow
    assert_eq!(v.mmu.counters().reclaimed_tables, 1);
    assert_eq!(v.mmu.end_batch(0).flush, Some(FlushReason::Reclaim));
    v.check();
}

#[test]
fn pt_update_counts_harvested_bits_only_when_they_reach_the_guest() {
    let mut v = vm_with_pool(64);
    v.load();
    // A plain update of the 2 MiB leaf to not-present discards its split's A/D.
    v.cpu_sets(VA2M + 0x3000, A | D);
    v.upd(L2 + 16, 0).unwrap();
    assert_eq!(v.r(L2 + 16), 0);
    let c = v.mmu.counters();
    assert_eq!((c.a_bits_propagated, c.d_bits_propagated), (0, 0));
    // PRESERVE_AD to another frame: the harvested bits are written, and counted.
    v.cpu_sets(VA1, A | D);
    v.op(MmuOp::PtUpdate {
        ptr: L1,
        val: 0x10_8000 | P | RW,
        preserve_ad: true,
    })
    .unwrap();
    assert_eq!(v.r(L1) & AD, AD);
    let c = v.mmu.counters();
    assert_eq!((c.a_bits_propagated, c.d_bits_propagated), (1, 1));
    // A plain update on the same frame keeps them (counted); one the guest already gave is
    // not new.
    v.cpu_sets(VA1 + 0x1000, A | D);
    v.upd(L1 + 8, 0x10_1000 | P | US | D).unwrap();
    assert_eq!(v.r(L1 + 8) & AD, AD);
    let c = v.mmu.counters();
    assert_eq!((c.a_bits_propagated, c.d_bits_propagated), (2, 1));
    // A plain update to another frame discards (not counted).
    v.cpu_sets(VA1 + 0x2000, A | D);
    v.upd(L1 + 16, 0x10_9000 | P).unwrap();
    let c = v.mmu.counters();
    assert_eq!((c.a_bits_propagated, c.d_bits_propagated), (2, 1));
    // A 2 MiB remap of the same frame carries the split's bits into the guest entry.
    v.upd(L2 + 16, 0x20_0000 | P | RW | PS).unwrap();
    v.cpu_sets(VA2M + 0x5000, A | D);
    v.upd(L2 + 16, 0x20_0000 | P | PS).unwrap();
    assert_eq!(v.r(L2 + 16) & AD, AD);
    let c = v.mmu.counters();
    assert_eq!((c.a_bits_propagated, c.d_bits_propagated), (3, 2));
    v.check();
}

#[test]
fn relocation_counts_the_bits_it_copies() {
    let mut v = vm_with_pool(64);
    v.load();
    v.cpu_sets(VA1, A | D);
    v.cpu_sets(VA2M, D);
    v.op(MmuOp::RelocateTable {
        old: L1,
        new: 0x50_000,
    })
    .unwrap();
    assert_eq!(v.r(0x50_000) & AD, AD);
    v.op(MmuOp::RelocateTable {
        old: L2,
        new: 0x51_000,
    })
    .unwrap();
    assert_eq!(v.r(0x51_000 + 16) & AD, D);
    let c = v.mmu.counters();
    assert_eq!((c.a_bits_propagated, c.d_bits_propagated), (1, 2));
}

#[test]
fn merged_means_every_targeted_vcpu_already_had_a_flush() {
    let mut v = vm_with_pool(64);
    v.load();
    // vCPU 1 runs the same address space: engine flushes target both.
    v.on(1, MmuOp::NewBaseptr { frame: L4 }).unwrap();
    v.mmu.end_batch(1);
    // The caller has a flush pending, vCPU 1 has none: an engine flush is not merged.
    v.op(MmuOp::FlushTlb {
        target: hypercall::FlushTarget::Local,
        global: false,
    })
    .unwrap();
    v.cpu_sets(VA1, A);
    v.op(MmuOp::SyncAd {
        va: VA1,
        pages: 1,
        clear_a: true,
        clear_d: false,
    })
    .unwrap();
    assert_eq!(v.mmu.counters().avoided(AvoidReason::Merged), 0);
    assert_eq!(v.mmu.flush_pending(1), Some(FlushReason::AdCleared));
    // Now both are pending: the next one is merged.
    v.cpu_sets(VA1, A);
    v.op(MmuOp::SyncAd {
        va: VA1,
        pages: 1,
        clear_a: true,
        clear_d: false,
    })
    .unwrap();
    assert_eq!(v.mmu.counters().avoided(AvoidReason::Merged), 1);
    assert_eq!(v.mmu.end_batch(0).flush, Some(FlushReason::GuestFlushTlb));
    assert_eq!(v.mmu.take_flush(1), Some(FlushReason::AdCleared));
    // A guest flush of vCPU 1 while only vCPU 0 is pending is not merged either.
    v.op(MmuOp::FlushTlb {
        target: hypercall::FlushTarget::Local,
        global: false,
    })
    .unwrap();
    v.on(
        1,
        MmuOp::Invlpg {
            va: 0,
            target: hypercall::FlushTarget::Local,
        },
    )
    .unwrap();
    assert_eq!(v.mmu.counters().avoided(AvoidReason::Merged), 1);
    v.on(
        1,
        MmuOp::FlushTlb {
            target: hypercall::FlushTarget::Local,
            global: false,
        },
    )
    .unwrap();
    assert_eq!(v.mmu.counters().avoided(AvoidReason::Merged), 2);
}

#[test]
fn typed_frame_queries_for_the_response_write() {
    let mut v = vm_with_pool(64);
    v.load();
    assert!(v.mmu.is_typed_frame(L1 + 64));
    assert!(!v.mmu.is_typed_frame(0x50_000));
    assert!(!v.mmu.range_has_table(0x50_000 - 8, 16));
    assert!(!v.mmu.range_has_table(L1, 0));
    assert!(v.mmu.range_has_table(u64::MAX - 8, 64), "wrapping range");
    // A batch that pins the block's frame makes it typed under the same lock.
    assert!(!v.mmu.is_typed_frame(0x50_000 + 64));
    v.pin(1, 0x50_000).unwrap();
    assert!(v.mmu.is_typed_frame(0x50_000 + 64));
    assert!(
        v.mmu.range_has_table(0x50_000 - 8, 16),
        "straddles into the table"
    );
    assert!(!v.mmu.range_has_table(0x50_000 - 64, 64));
}

#[test]
fn invariant_checker_catches_corrupted_shadows() {
    let fresh = || {
        let mut v = vm_with_pool(64);
        v.load();
        v.upd(L1 + 8 * 9, L2 | P | RW).unwrap(); // a leaf onto a table: read-only
        v.check();
        v
    };
    let kind = |v: &Vm| v.mmu.check_invariants(&v.mem).unwrap_err().kind;
    let v = fresh();
    let slot = v.leaf(VA1 + 0x9000).unwrap().slot_gpa;
    v.w(slot, v.r(slot) | RW);
    assert_eq!(kind(&v), InvariantKind::WritableTable);
    let v = fresh();
    v.w(slot, POOL | P | RW);
    assert_eq!(kind(&v), InvariantKind::MapsNonRam);
    let v = fresh();
    v.w(slot, 0x10_7000 | P);
    assert_eq!(kind(&v), InvariantKind::ShadowMismatch);
    let v = fresh();
    v.w(slot, v.r(slot) | (1 << 9));
    assert_eq!(kind(&v), InvariantKind::ShadowMismatch, "stray bits");
    let v = fresh();
    v.w(slot, 0);
    assert_eq!(kind(&v), InvariantKind::ShadowMismatch, "leaf not shadowed");
    // A shadow for an absent guest entry.
    let v = fresh();
    let l1s = v.shadow_of(L1);
    v.w(l1s + 8 * 100, 0x10_0000 | P);
    assert_eq!(kind(&v), InvariantKind::ShadowMismatch);
    // A non-leaf shadow entry pointing elsewhere, or with other flags.
    let v = fresh();
    let l2s = v.shadow_of(L2);
    v.w(l2s + 8, v.r(l2s + 8) ^ 0x1000);
    assert_eq!(kind(&v), InvariantKind::ShadowMismatch);
    let v = fresh();
    v.w(l2s + 8, v.r(l2s + 8) & !US);
    assert_eq!(kind(&v), InvariantKind::ShadowMismatch);
    // An unvalidated word in a guest table.
    let v = fresh();
    v.w(L1 + 8 * 30, POOL | P);
    assert_eq!(kind(&v), InvariantKind::UnvalidatedEntry);
    let v = fresh();
    v.w(L2 + 8 * 30, 0x70_000 | P);
    assert_eq!(kind(&v), InvariantKind::UnvalidatedEntry, "untyped child");
    // A 2 MiB leaf whose split went missing.
    let v = fresh();
    v.w(l2s + 16, 0);
    assert_eq!(kind(&v), InvariantKind::ShadowMismatch);
    // A reverse-map mismatch: the guest leaf loses RW behind the engine's back.
    let v = fresh();
    v.w(L1 + 8, v.r(L1 + 8) & !RW);
    assert!(matches!(
        kind(&v),
        InvariantKind::ShadowMismatch | InvariantKind::Pool
    ));
    let e = v.mmu.check_invariants(&v.mem).unwrap_err();
    assert!(e.to_string().starts_with("shadow invariant `"), "{e}");
    assert!(String::from(e).contains("shadow "));
}
