//! The hostile selftest, run in the kernel: every refusal the shadow engine documents,
//! each sent as a real MMU_BATCH (or hypercall) and compared with its documented error.
//!
//! Locks: [`SCRATCH`] guards the batch buffer the attacks are sent from.

use crate::arch;
use crate::mem;
use crate::mmu::Mmu;
use crate::serial::Console;
use crate::sync::SpinLock;
use crate::tlb;
use crate::traps;
use crate::vm;
use core::fmt::Write;
use hypercall::{HcError, MmuEntry};

/// One batch more than the ABI allows (for the oversized-batch case). Entries need 8-byte
/// alignment only.
#[repr(C, align(8))]
struct Scratch([MmuEntry; 1025]);

/// The attacks' batch buffer.
static SCRATCH: SpinLock<Scratch> = SpinLock::new(Scratch(
    [MmuEntry {
        kind: 0,
        flags: 0,
        reserved: 0,
        a0: 0,
        a1: 0,
        a2: 0,
    }; 1025],
));

/// Guest-physical address of the scratch buffer (a static in the kernel image).
fn scratch_gpa(s: &Scratch) -> u64 {
    s.0.as_ptr() as u64 - arch::KERNEL_VMA
}

/// Sends `entries` as one batch; returns its status.
fn send(m: &mut Mmu, entries: &[MmuEntry]) -> i64 {
    let mut s = SCRATCH.lock();
    s.0[..entries.len()].copy_from_slice(entries);
    m.batch_raw(scratch_gpa(&s), entries.len() as u64).0
}

/// Prints one hostile-test line; true if `got` is the documented error `want`.
fn report(what: &str, got: i64, want: i64) -> bool {
    let mark = if got == want { "ok" } else { "MISMATCH" };
    let _ = writeln!(
        Console,
        "# hostile: {what}: {} (expected {}) {mark}",
        ename(got),
        ename(want)
    );
    got == want
}

fn ename(s: i64) -> &'static str {
    if s == 0 {
        "OK"
    } else {
        HcError::from_status(s).map_or("?", |e| e.name())
    }
}

/// The scratch user-half chain the attacks aim at: L3 -> L2 -> L1 under the kernel's L4
/// slot 1, plus an ordinary data frame.
struct Chain {
    kl4: u64,
    l3: u64,
    l2: u64,
    l1: u64,
    data: u64,
}

fn build_chain(m: &mut Mmu) -> Result<Chain, &'static str> {
    let kl4 = vm::kernel_l4();
    let mut t = [0u64; 3];
    for f in t.iter_mut() {
        *f = mem::alloc();
        arch::zero_page(mem::va(*f));
    }
    let (l3, l2, l1) = (t[0], t[1], t[2]);
    let ok = send(
        m,
        &[
            MmuEntry::pt_update(kl4 + 8, l3 | vm::P | vm::RW),
            MmuEntry::pt_update(l3, l2 | vm::P | vm::RW),
            MmuEntry::pt_update(l2, l1 | vm::P | vm::RW),
        ],
    );
    if ok != 0 {
        let _ = writeln!(
            Console,
            "# hostile: building the scratch tables failed: {}",
            ename(ok)
        );
        return Err("setup");
    }
    Ok(Chain {
        kl4,
        l3,
        l2,
        l1,
        data: mem::alloc(),
    })
}

/// One attack: (what, entry, documented status).
type Case = (&'static str, MmuEntry, i64);

/// Leaves that would map what a guest must never reach.
fn mapping_cases(c: &Chain) -> [Case; 4] {
    let l1 = c.l1;
    let pool = mem::ram_end().next_multiple_of(2 << 20);
    let e = HcError::Eperm.status();
    [
        (
            "map the shadow pool",
            MmuEntry::pt_update(l1, pool | vm::P),
            e,
        ),
        (
            "map outside RAM (MMIO hole)",
            MmuEntry::pt_update(l1, 0xfee0_0000 | vm::P),
            e,
        ),
        (
            "map past the end of RAM",
            MmuEntry::pt_update(l1, (1 << 40) | vm::P),
            e,
        ),
        (
            "map a reserved range",
            MmuEntry::pt_update(l1, 0x9f000 | vm::P),
            e,
        ),
    ]
}

/// Malformed or ill-placed entries, and operations on the wrong frames.
fn structure_cases(c: &Chain) -> [Case; 10] {
    let (kl4, l3, l2, l1, data) = (c.kl4, c.l3, c.l2, c.l1, c.data);
    let inval = HcError::Einval.status();
    [
        (
            "wrong-level entry (L2 -> L3 table)",
            MmuEntry::pt_update(l2 + 8, l3 | vm::P | vm::RW),
            inval,
        ),
        (
            "recursive entry (L4 -> itself)",
            MmuEntry::pt_update(kl4 + 16, kl4 | vm::P | vm::RW),
            inval,
        ),
        (
            "misaligned PTE pointer",
            MmuEntry::pt_update(l1 + 4, data | vm::P),
            inval,
        ),
        (
            "PT_UPDATE outside a page table",
            MmuEntry::pt_update(data, 0),
            inval,
        ),
        (
            "reserved flag bits (protection key)",
            MmuEntry::pt_update(l1, data | vm::P | (1 << 59)),
            inval,
        ),
        (
            "1 GiB leaf",
            MmuEntry::pt_update(l3 + 8, (1 << 30) | vm::P | vm::PS),
            inval,
        ),
        (
            "unpin the loaded root",
            MmuEntry::unpin(kl4),
            HcError::Ebusy.status(),
        ),
        (
            "NEW_BASEPTR of an unpinned frame",
            MmuEntry::new_baseptr(data),
            HcError::Enoent.status(),
        ),
        (
            "ZERO_FRAME of a typed page table",
            MmuEntry::zero_frame(l1),
            HcError::Ebusy.status(),
        ),
        (
            "unknown entry kind",
            MmuEntry {
                kind: 99,
                flags: 0,
                reserved: 0,
                a0: 0,
                a1: 0,
                a2: 0,
            },
            HcError::Enosys.status(),
        ),
    ]
}

/// `COPY_FRAME` (only when the VMM offers `COPY_FRAMES`): into a page table, out of the
/// shadow pool, onto itself.
fn copy_cases(c: &Chain) -> [Case; 4] {
    let pool = mem::ram_end().next_multiple_of(2 << 20);
    [
        (
            "COPY_FRAME into a typed page table",
            MmuEntry::copy_frame(c.l1, c.data),
            HcError::Ebusy.status(),
        ),
        (
            "COPY_FRAME out of the shadow pool",
            MmuEntry::copy_frame(c.data, pool),
            HcError::Eperm.status(),
        ),
        (
            "COPY_FRAME into the shadow pool",
            MmuEntry::copy_frame(pool, c.data),
            HcError::Eperm.status(),
        ),
        (
            "COPY_FRAME onto itself",
            MmuEntry::copy_frame(c.data, c.data),
            HcError::Einval.status(),
        ),
    ]
}

/// The ABI 1.1 SMP entries (only when the VMM offers `SMP_TLB`): bad targets and flags,
/// a kernel root that is no pinned L4, and detaching the kernel root itself.
fn smp_cases(c: &Chain) -> [Case; 5] {
    let inval = HcError::Einval.status();
    let cpus = tlb::online();
    // A vCPU the VM does not have (with 64 vCPUs every bit exists: then an unknown flag).
    let (mask_flags, mask) = if cpus < 64 {
        (hypercall::flush_target::MASK, 1u64 << cpus)
    } else {
        (hypercall::flush_target::MASK | 1 << 8, 1)
    };
    [
        (
            "FLUSH_TLB mask naming a missing vCPU",
            MmuEntry::flush_tlb_on(mask_flags, mask),
            inval,
        ),
        (
            "FLUSH_TLB with unknown flag bits",
            MmuEntry::flush_tlb_on(1 << 8, 0),
            inval,
        ),
        (
            "UNPIN with unknown flag bits",
            MmuEntry::unpin_with(c.data, 1 << 5),
            inval,
        ),
        (
            "SET_KERNEL_ROOT of a frame that is no pinned L4",
            MmuEntry::set_kernel_root(c.data),
            HcError::Enoent.status(),
        ),
        (
            "UNPIN with DETACH of the registered kernel root",
            MmuEntry::unpin_with(c.kl4, hypercall::unpin_flags::DETACH),
            HcError::Ebusy.status(),
        ),
    ]
}

/// A page-table frame mapped writable by a 4 KiB leaf: the engine may accept it but the
/// shadow must be read-only: a store through it faults. True if it held.
fn writable_table(m: &mut Mmu, c: &Chain) -> bool {
    if m.mode.plain_stores() {
        // Stores through such a mapping trap instead of faulting: hostile_stores checks
        // that they are validated.
        return true;
    }
    let va = 0x80_0000_0000u64; // L4 slot 1, L3 0, L2 0, L1 0
    let s = send(m, &[MmuEntry::pt_update(c.l1, c.l2 | vm::P | vm::RW)]);
    let faulted = if s == 0 { traps::probe_write(va) } else { true };
    let _ = writeln!(
        Console,
        "# hostile: page table mapped writable: {}, store through it {} {}",
        ename(s),
        if s == 0 {
            if faulted {
                "faulted"
            } else {
                "SUCCEEDED"
            }
        } else {
            "not attempted"
        },
        if faulted { "ok" } else { "MISMATCH" }
    );
    faulted
}

/// Batch-level refusals; returns the mismatches.
fn batch_cases(m: &mut Mmu) -> u32 {
    let big = m.batch_raw(scratch_gpa(&SCRATCH.lock()), 1025).0;
    let trunc = m.batch_raw(mem::ram_end() - 32, 2).0;
    let unk = match m.pv.as_mut() {
        Some(pv) => pv.call(99, [0; 4]).0,
        None => 0,
    };
    let mut bad = 0;
    for (what, got, want) in [
        ("oversized batch (1025)", big, HcError::E2big.status()),
        (
            "truncated batch (runs past RAM)",
            trunc,
            HcError::Efault.status(),
        ),
        ("unknown op", unk, HcError::Enosys.status()),
    ] {
        if !report(what, got, want) {
            bad += 1;
        }
    }
    bad
}

/// Runs every attack from the kernel; returns the number of refusals that did not match
/// their documented error (Err if the scratch tables could not even be built).
pub fn attacks(m: &mut Mmu) -> Result<u32, &'static str> {
    m.flush();
    let c = build_chain(m)?;
    let mut bad = 0;
    let smp = if m.smp_tlb { &smp_cases(&c)[..] } else { &[] };
    let copy = if m.copy_vmm { &copy_cases(&c)[..] } else { &[] };
    let cases = mapping_cases(&c).into_iter().chain(structure_cases(&c));
    for (what, entry, want) in cases.chain(smp.iter().copied()).chain(copy.iter().copied()) {
        let got = send(m, &[entry]);
        if !report(what, got, want) {
            bad += 1;
        }
    }
    if !writable_table(m, &c) {
        bad += 1;
    }
    bad += batch_cases(m);
    let t = crate::hostile_stores::Target {
        l2: c.l2,
        l1: c.l1,
        data: c.data,
    };
    bad += crate::hostile_stores::attacks(m, &mut |m, e| send(m, &[e]), &t);
    // Tear the scratch chain down (unlinking untypes it) and free it.
    let s = send(
        m,
        &[
            MmuEntry::pt_update(c.l1, 0),
            MmuEntry::pt_update(c.kl4 + 8, 0),
        ],
    );
    if s != 0 {
        let _ = writeln!(Console, "# hostile: cleanup failed: {}", ename(s));
        bad += 1;
    }
    for f in [c.l3, c.l2, c.l1, c.data] {
        mem::free(f);
    }
    if bad != 0 {
        let _ = writeln!(Console, "# hostile: {bad} mismatches");
    }
    Ok(bad)
}
