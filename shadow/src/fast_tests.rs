//! The straight-line `PT_UPDATE` path against the general one where the TLB model cannot
//! reach: a shadowed leaf whose guest entry was cleared by a store the engine did not see.

use hypercall::MmuOp;
use vm_memory::{Bytes, GuestAddress};

use crate::pte::*;
use crate::tests::{upd, vm_with_pool, L1, POOL, VA1};
use crate::{BatchOutcome, Counters};

/// A second, empty L4.
const L4B: u64 = 0x14_000;

/// vCPU 0 used VA1 through L4, then loaded L4B (it still holds L4's global translations);
/// the guest entry of VA1 is then cleared behind the engine's back and updated. Returns the
/// outcome of the update's batch, the counters and the pool and RAM contents.
fn unseen_clear_then_update(fast: bool, global: bool) -> (BatchOutcome, Counters, Vec<u8>) {
    let mut vm = vm_with_pool(64);
    vm.mmu.set_fast_path(fast);
    vm.load();
    if global {
        vm.upd(L1, 0x10_0000 | P | RW | US | G).unwrap();
        vm.mmu.end_batch(0);
    }
    vm.cpu_sets(VA1, A);
    vm.op(MmuOp::Pin {
        level: 4,
        frame: L4B,
    })
    .unwrap();
    vm.op(MmuOp::NewBaseptr { frame: L4B }).unwrap();
    vm.mmu.end_batch(0);
    vm.w(L1, 0);
    vm.mmu
        .apply(&vm.mem, 0, &upd(L1, 0x10_5000 | P | RW | US))
        .unwrap();
    let out = vm.mmu.end_batch(0);
    vm.check();
    let mut bytes = vec![0u8; 0x40_0000 + 64 * 4096];
    let (ram, pool) = bytes.split_at_mut(0x40_0000);
    vm.mem.read_slice(ram, GuestAddress(0)).unwrap();
    vm.mem.read_slice(pool, GuestAddress(POOL)).unwrap();
    (out, vm.mmu.counters().clone(), bytes)
}

#[test]
fn unseen_clear_of_a_used_leaf_flushes_like_the_general_path() {
    for global in [false, true] {
        let (fo, fc, fm) = unseen_clear_then_update(true, global);
        let (go, gc, gm) = unseen_clear_then_update(false, global);
        assert_eq!(fo, go, "global {global}");
        assert_eq!(fc, gc, "global {global}");
        assert!(fm == gm, "memory differs (global {global})");
        // The general path treats the replaced shadow entry as a non-leaf (possibly global)
        // one: vCPU 0 held L4 and is flushed.
        assert_eq!(go.flush, Some(crate::FlushReason::NonLeafChanged));
    }
}
