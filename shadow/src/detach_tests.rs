//! `UNPIN` with `DETACH` while another vCPU still runs on the dying root: until that vCPU's
//! root switch is delivered, the freed shadow root keeps its kernel half and its frame is
//! not reused, so the vCPU can still run kernel code.

use hypercall::MmuOp;

use crate::tests::{vm_with_pool, Vm, L4, T};

/// The kernel-only root: L4 `0x20_000`, whose kernel half (entry 511) is the kernel L3
/// `0x21_000` that the user root `L4` shares.
pub(crate) const K4: u64 = 0x20_000;
pub(crate) const K3: u64 = 0x21_000;

/// vCPU 1 runs on the user root `L4` (kernel root `K4` registered); returns its CR3.
fn vcpu1_on_user_root(v: &mut Vm) -> u64 {
    vcpu1_on_root_with(v, None)
}

/// As [`vcpu1_on_user_root`], with `extra` (index, entry) one more entry of `L4` only.
pub(crate) fn vcpu1_on_root_with(v: &mut Vm, extra: Option<(u64, u64)>) -> u64 {
    v.build();
    v.w(K4 + 511 * 8, K3 | T);
    v.w(L4 + 511 * 8, K3 | T);
    if let Some((i, e)) = extra {
        v.w(L4 + i * 8, e);
    }
    for (level, frame) in [(4, K4), (4, L4)] {
        v.op(MmuOp::Pin { level, frame }).unwrap();
    }
    let on1 = |v: &mut Vm, op: MmuOp| v.mmu.apply(&v.mem, 1, &op).unwrap();
    on1(v, MmuOp::SetKernelRoot { frame: Some(K4) });
    on1(v, MmuOp::NewBaseptr { frame: L4 });
    v.mmu
        .end_batch(1)
        .new_cr3
        .expect("vCPU 1 loads the user root")
}

/// vCPU 0 unpins the user root with `DETACH` (the shadow mechanism on or off); returns the
/// freed root's user entry 0 and kernel entry 511 as vCPU 1 still sees them, and vCPU 1's
/// pending switch.
fn detach_while_running(clear_detached: bool) -> (u64, u64, Option<u64>, Vm) {
    let mut v = vm_with_pool(64);
    v.mmu.set_debug_clear_detached(clear_detached);
    let cr3 = vcpu1_on_user_root(&mut v);
    v.op(MmuOp::Unpin {
        frame: L4,
        detach: true,
    })
    .unwrap();
    v.mmu.end_batch(0);
    let (user, kernel) = (v.r(cr3), v.r(cr3 + 511 * 8));
    (user, kernel, v.mmu.root_switch_pending(1).then_some(cr3), v)
}

#[test]
fn a_detached_root_keeps_its_kernel_half_until_the_switch() {
    let (user, kernel, pending, mut v) = detach_while_running(false);
    assert!(
        pending.is_some(),
        "vCPU 1's switch is still to be delivered"
    );
    assert_eq!(user, 0, "the user half is gone");
    let k3_shadow = v
        .mmu
        .frames
        .shadow(K3 >> 12)
        .expect("the kernel L3 is shadowed");
    assert_eq!(
        kernel & crate::pte::ADDR,
        v.mmu.pool.pfn(k3_shadow) << 12,
        "vCPU 1 still reaches the kernel through its old root"
    );
    let old = v.mmu.frames.shadow(L4 >> 12);
    assert_eq!(old, None, "the user root has no shadow any more");
    assert!(v.mmu.detached_shadows.len() == 1 && v.mmu.pool.held_count() == 1);
    v.check();
    // The switch delivered, the frame may be reused.
    let d = v.mmu.take_delivery(1);
    assert!(d.new_cr3.is_some());
    assert_eq!(v.mmu.pool.held_count(), 0, "released once no switch waits");
    assert!(v.mmu.detached_shadows.is_empty());
    v.check();
}

#[test]
fn without_the_mechanism_the_vcpu_loses_the_kernel() {
    let (_, kernel, pending, v) = detach_while_running(true);
    assert!(pending.is_some());
    assert_eq!(
        kernel, 0,
        "switched off: the kernel half is cleared under vCPU 1"
    );
    assert_eq!(v.mmu.pool.held_count(), 0);
}

#[test]
fn a_detach_nobody_runs_on_holds_nothing() {
    let mut v = vm_with_pool(64);
    let _ = vcpu1_on_user_root(&mut v);
    // vCPU 1 moves to its kernel root itself; the user root is then unpinned by vCPU 0.
    v.mmu
        .apply(&v.mem, 1, &MmuOp::NewBaseptr { frame: K4 })
        .unwrap();
    v.mmu.end_batch(1);
    v.op(MmuOp::Unpin {
        frame: L4,
        detach: true,
    })
    .unwrap();
    v.mmu.end_batch(0);
    assert!(v.mmu.detached_shadows.is_empty());
    assert_eq!(v.mmu.pool.held_count(), 0);
}
