//! Lazy `DETACH` root switches (`lazy_switch`): a target whose freed root translates as its
//! kernel root stays on it past the hypercall, and every change that could part the two
//! makes the switch eager again.

use hypercall::MmuOp;

use crate::detach_tests::{vcpu1_on_root_with, K3, K4};
use crate::tests::{vm_with_pool, Vm, L4, T};
use crate::VcpuSet;

/// A second kernel L3, for kernel halves that differ.
const K3B: u64 = 0x22_000;

/// With the kernel flush on, vCPU 1 runs on the user root `L4` (kernel root `K4`); `extra`
/// is one more entry of `L4` only. Returns vCPU 1's CR3.
fn vcpu1_on_user_root(v: &mut Vm, extra: Option<(u64, u64)>) -> u64 {
    v.mmu.enable_kernel_flush();
    vcpu1_on_root_with(v, extra)
}

/// vCPU 0 tears the user root down with `DETACH`; the batch's remote targets.
fn detach(v: &mut Vm) -> VcpuSet {
    v.op(MmuOp::Unpin {
        frame: L4,
        detach: true,
    })
    .unwrap();
    v.mmu.end_batch(0).remote
}

/// The shadow root of the kernel root.
fn kernel_cr3(v: &Vm) -> u64 {
    v.mmu.pool.pfn(v.mmu.frames.shadow(K4 >> 12).unwrap()) << 12
}

#[test]
fn matching_kernel_halves_leave_the_switch_to_the_targets_next_batch() {
    let mut v = vm_with_pool(64);
    let cr3 = vcpu1_on_user_root(&mut v, None);
    let remote = detach(&mut v);
    // No user entry was used: nothing to flush, and the switch waits: no delivery at all.
    assert!(remote.is_empty(), "{remote:?}");
    assert_eq!(
        v.mmu.lazy_root(1),
        Some(cr3),
        "vCPU 1 stays on the freed root"
    );
    assert!(v.mmu.root_switch_pending(1));
    assert_eq!(v.mmu.counters().detached_lazily, 1);
    assert_eq!(v.r(cr3), 0, "its user half is gone");
    v.check();
    // A later batch of vCPU 0 does not deliver it either.
    v.op(MmuOp::FlushTlb {
        target: hypercall::FlushTarget::Local,
        global: false,
    })
    .unwrap();
    assert!(v.mmu.end_batch(0).remote.is_empty());
    // vCPU 1's own next batch loads its kernel root and lets the frame go.
    let own = v.mmu.end_batch(1);
    assert_eq!(own.new_cr3, Some(kernel_cr3(&v)));
    assert_eq!(v.mmu.lazy_root(1), None);
    assert_eq!(v.mmu.pool.held_count(), 0);
    v.check();
}

#[test]
fn a_used_user_half_gets_a_flush_the_kernel_flush_can_do() {
    let mut v = vm_with_pool(64);
    let cr3 = vcpu1_on_user_root(&mut v, None);
    // vCPU 1 walked the user half (the CPU set A in the shadow's entry 0).
    v.w(cr3, v.r(cr3) | crate::pte::A);
    let remote = detach(&mut v);
    assert_eq!(
        remote,
        VcpuSet::one(1),
        "the dropped user half needs vCPU 1 flushed"
    );
    let flushable = v.mmu.kernel_flushable(remote);
    assert_eq!(flushable, VcpuSet::one(1), "lazy: no kick needed for it");
    let frames = v.mmu.stale_chunks();
    assert!(
        !frames.is_empty(),
        "the freed root's frame is stale: a zap flushes"
    );
    v.mmu.kernel_flushed(flushable, &frames);
    assert_eq!(v.mmu.lazy_root(1), Some(cr3), "still lazy after its flush");
    assert!(
        !v.mmu.host_resync_needed(),
        "the flushed frames are clean again"
    );
    v.check();
}

#[test]
fn differing_kernel_halves_switch_at_once() {
    let mut v = vm_with_pool(64);
    let _ = vcpu1_on_user_root(&mut v, Some((510, K3B | T)));
    let remote = detach(&mut v);
    assert_eq!(
        remote,
        VcpuSet::one(1),
        "delivered before the hypercall returns"
    );
    assert_eq!(v.mmu.lazy_root(1), None);
    assert!(
        v.mmu.kernel_flushable(remote).is_empty(),
        "a kick, on its thread"
    );
    assert_eq!(v.mmu.counters().detached_lazily, 0);
}

/// A lazy switch, then vCPU 0 adds a kernel-half entry to the kernel root; the batch's
/// remote targets.
fn kernel_half_changes_under_a_lazy_switch(unforced: bool) -> (VcpuSet, Vm) {
    let mut v = vm_with_pool(64);
    v.mmu.debug_lazy_unforced = unforced;
    let _ = vcpu1_on_user_root(&mut v, None);
    assert!(detach(&mut v).is_empty());
    v.upd(K4 + 510 * 8, K3B | T).unwrap();
    (v.mmu.end_batch(0).remote, v)
}

#[test]
fn a_kernel_half_update_makes_a_lazy_switch_eager() {
    let (remote, v) = kernel_half_changes_under_a_lazy_switch(false);
    assert_eq!(remote, VcpuSet::one(1), "the switch is delivered now");
    assert_eq!(v.mmu.lazy_root(1), None);
    assert_eq!(v.mmu.counters().lazy_switches_forced, 1);
    v.check();
}

#[test]
fn a_new_address_space_taking_the_kernel_half_keeps_it_lazy() {
    let mut v = vm_with_pool(64);
    let cr3 = vcpu1_on_user_root(&mut v, None);
    assert!(detach(&mut v).is_empty());
    // A fresh L4 (another process's) gets its kernel half, entry by entry.
    const NEW4: u64 = 0x23_000;
    v.op(MmuOp::Pin {
        level: 4,
        frame: NEW4,
    })
    .unwrap();
    v.upd(NEW4 + 511 * 8, K3 | T).unwrap();
    assert!(v.mmu.end_batch(0).remote.is_empty());
    assert_eq!(v.mmu.lazy_root(1), Some(cr3));
    v.check();
}

#[test]
fn without_the_forcing_the_checker_finds_the_parted_remnant() {
    let (remote, v) = kernel_half_changes_under_a_lazy_switch(true);
    assert!(remote.is_empty());
    let e = v.mmu.check_invariants(&v.mem).unwrap_err();
    assert_eq!(e.kind, crate::InvariantKind::LazyRemnant, "{e}");
}

#[test]
fn an_l3_the_remnant_links_is_held_when_its_shadow_goes() {
    let mut v = vm_with_pool(64);
    let _ = vcpu1_on_user_root(&mut v, None);
    assert!(detach(&mut v).is_empty());
    let held = v.mmu.pool.held_count();
    let k3 = v.mmu.frames.shadow(K3 >> 12).unwrap();
    // The kernel root drops its only link to K3: K3's shadow is freed.
    v.upd(K4 + 511 * 8, 0).unwrap();
    assert_eq!(v.mmu.frames.shadow(K3 >> 12), None);
    assert!(!v.mmu.debug_pool_frame_used(k3));
    assert_eq!(v.mmu.pool.held_count(), held + 1, "not reusable yet");
    assert_eq!(v.mmu.end_batch(0).remote, VcpuSet::one(1));
    // Delivered: every held frame may be reused.
    assert!(v.mmu.take_delivery(1).new_cr3.is_some());
    assert_eq!(v.mmu.pool.held_count(), 0);
    v.check();
}
