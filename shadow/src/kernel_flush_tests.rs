//! The engine's side of the kernel flush (`enable_kernel_flush`): which targets a zap of the
//! stale frames may flush, and which frames it must zap.

use hypercall::{FlushTarget, MmuOp};

use crate::pte::*;
use crate::tests::{vm_with_pool, Vm, L1, L4, T, VA1};
use crate::*;

/// Second address space: L4 `0x20_000` → L3 `0x21_000` (empty).
const L4B: u64 = 0x20_000;
const L3B: u64 = 0x21_000;

/// A VM in kernel-flush mode with the first address space loaded on vCPU 0.
fn kernel_vm() -> Vm {
    let mut v = vm_with_pool(64);
    v.mmu.enable_kernel_flush();
    v.load();
    v
}

/// Every stale frame counted clean (as after a zap).
fn settle(v: &mut Vm) {
    let s = v.mmu.stale_chunks();
    v.mmu.host_resynced_chunks(&s);
}

fn dropped_root_frame_is_stale(skip_drop_marks: bool) -> bool {
    let mut v = kernel_vm();
    v.mmu.set_debug_skip_drop_marks(skip_drop_marks);
    v.upd(L1, 0x10_0000 | P | RW | US | G).unwrap();
    v.mmu.end_batch(0);
    v.cpu_sets(VA1, A | D);
    v.w(L4B, L3B | T);
    v.w(L3B, 0);
    v.op(MmuOp::Pin {
        level: 4,
        frame: L4B,
    })
    .unwrap();
    v.op(MmuOp::NewBaseptr { frame: L4B }).unwrap();
    v.mmu.end_batch(0);
    settle(&mut v);
    let l1_shadow = v.mmu.frames.shadow(L1 >> 12).unwrap();
    // The global translation survives the CR3 load; UNPIN drops the shadows it came from
    // without changing any entry of a live one.
    v.op(MmuOp::Unpin {
        frame: L4,
        detach: false,
    })
    .unwrap();
    assert_eq!(v.mmu.end_batch(0).flush, Some(FlushReason::ShadowDropped));
    v.mmu.stale_chunks().contains(&l1_shadow)
}

#[test]
fn a_dropped_shadow_the_cpu_used_is_stale_at_once() {
    assert!(
        dropped_root_frame_is_stale(false),
        "the zap must cover the dropped L1 shadow the global translation came from"
    );
    assert!(
        !dropped_root_frame_is_stale(true),
        "the debug switch turns the mark off"
    );
}

#[test]
fn only_frame_derived_flushes_without_root_switches_go_to_the_kernel() {
    let mut v = kernel_vm();
    v.mmu
        .apply(&v.mem, 1, &MmuOp::NewBaseptr { frame: L4 })
        .unwrap();
    v.mmu.end_batch(1);
    settle(&mut v);
    // A guest's own remote flush names no frame: it is kicked.
    v.op(MmuOp::FlushTlb {
        target: FlushTarget::All,
        global: true,
    })
    .unwrap();
    let out = v.mmu.end_batch(0);
    assert!(out.remote.contains(1));
    assert_eq!(v.mmu.kernel_flushable(out.remote), VcpuSet::EMPTY);
    assert!(v.mmu.take_flush(1).is_some());
    // A used leaf removed on the shared root: its frame is stale, vCPU 1 may be zapped.
    v.cpu_sets(VA1, A);
    v.upd(L1, 0).unwrap();
    let out = v.mmu.end_batch(0);
    assert_eq!(v.mmu.kernel_flushable(out.remote), VcpuSet::one(1));
    let frames = v.mmu.stale_chunks();
    assert_eq!(frames.len(), 1, "one frame per chunk: only the L1 shadow");
    v.mmu.kernel_flushed(VcpuSet::one(1), &frames);
    assert_eq!(v.mmu.flush_pending(1), None, "counted as performed");
    assert!(!v.mmu.host_resync_needed(), "the zapped frame is clean");
    // A guest flush merged into a pending frame-derived one still needs the kick.
    v.cpu_sets(VA1 + 0x1000, A);
    v.upd(L1 + 8, 0).unwrap();
    v.op(MmuOp::Invlpg {
        va: VA1,
        target: FlushTarget::All,
    })
    .unwrap();
    let out = v.mmu.end_batch(0);
    assert_eq!(v.mmu.kernel_flushable(out.remote), VcpuSet::EMPTY);
    v.check();
}
