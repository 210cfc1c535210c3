//! The engine's side of leaf zaps (`enable_leaf_zap`): a changed leaf the host may have
//! cached lists its old target instead of making its pool chunk stale.

use hypercall::MmuOp;

use crate::pte::*;
use crate::tests::{vm_with_pool, Vm, L1, VA1};

/// Frame number the first leaf of `L1` maps (`Vm::build`).
const FIRST: u64 = 0x100;

fn vm(leaf_zap: bool) -> Vm {
    let mut v = vm_with_pool(64);
    if leaf_zap {
        v.mmu.enable_leaf_zap();
    }
    v.load();
    let s = v.mmu.stale_chunks();
    v.mmu.host_resynced_chunks(&s);
    v
}

/// The first leaf, accessed by the CPU, is repointed at another frame.
fn repoint(v: &mut Vm, cpu_bits: u64) {
    v.cpu_sets(VA1, cpu_bits);
    v.upd(L1, 0x10_5000 | P | RW | US).unwrap();
    v.mmu.end_batch(0);
}

#[test]
fn a_changed_leaf_lists_its_old_target_instead_of_its_chunk() {
    let mut v = vm(true);
    repoint(&mut v, A);
    let list = v.mmu.take_leaf_zaps();
    assert_eq!(list.frames, [FIRST]);
    assert!(
        v.mmu.stale_chunks().is_empty(),
        "no resync for a zapped leaf"
    );
    assert!(v.mmu.take_leaf_zaps().is_empty(), "taken once");
    v.check();

    let mut off = vm(false);
    repoint(&mut off, A);
    assert!(off.mmu.take_leaf_zaps().is_empty());
    assert_eq!(
        off.mmu.stale_chunks().len(),
        1,
        "without zaps the chunk is stale"
    );
}

#[test]
fn a_failed_zap_makes_the_leaf_chunk_stale() {
    let mut v = vm(true);
    repoint(&mut v, A);
    let list = v.mmu.take_leaf_zaps();
    let l1_shadow = v.mmu.frames.shadow(L1 >> 12).unwrap();
    assert_eq!(list.pool_frames, [l1_shadow]);
    v.mmu.leaf_zaps_failed(&list);
    assert_eq!(v.mmu.stale_chunks().len(), 1);
}

#[test]
fn never_accessed_leaves_list_nothing() {
    let mut v = vm(true);
    repoint(&mut v, 0);
    assert!(v.mmu.take_leaf_zaps().is_empty());
    assert!(v.mmu.stale_chunks().is_empty());
}

#[test]
fn clearing_a_dirty_bit_lists_the_frame() {
    let mut v = vm(true);
    v.cpu_sets(VA1, A | D);
    v.op(MmuOp::SyncAd {
        va: VA1,
        pages: 1,
        clear_a: false,
        clear_d: true,
    })
    .unwrap();
    v.mmu.end_batch(0);
    assert_eq!(v.mmu.take_leaf_zaps().frames, [FIRST]);
    assert!(v.mmu.stale_chunks().is_empty());
}
