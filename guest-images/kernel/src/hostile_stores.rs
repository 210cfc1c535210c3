//! The hostile selftest's plain-store half (mmu=emulate and mmu=wrpt): the attacks the
//! batch half sends as PT_UPDATEs, made as ordinary stores into typed tables. Each one must
//! be refused: after the next MMU hypercall (which re-hooks an unhooked L1 in wrpt) the
//! entry reads back as it was.

use crate::mem;
use crate::mmu::Mmu;
use crate::serial::Console;
use crate::vm;
use core::fmt::Write;
use hypercall::MmuEntry;

/// The tables a case writes into: (L2, L1) of the hostile test's scratch chain, and the VA
/// that L1[0] maps (L4 slot 1).
pub struct Target {
    /// Scratch L2 frame.
    pub l2: u64,
    /// Scratch L1 frame.
    pub l1: u64,
    /// Scratch data frame.
    pub data: u64,
}

/// VA mapped by the scratch L1's entry 0.
const VA: u64 = 0x80_0000_0000;

/// Sends one MMU entry as a batch; returns its status (the hostile test's sender).
pub type Send<'a> = &'a mut dyn FnMut(&mut Mmu, MmuEntry) -> i64;

/// Sends an empty-effect batch (FLUSH_TLB): in wrpt every unhooked L1 is re-validated.
fn rehook(m: &mut Mmu, send: Send<'_>) -> i64 {
    m.flush();
    send(m, MmuEntry::flush_tlb())
}

/// Stores `val` at `pa` (direct map), re-hooks, and checks the entry reads back as before.
fn refused(m: &mut Mmu, send: Send<'_>, what: &str, pa: u64, val: u64) -> bool {
    let before = mem::rd(pa);
    mem::wr(pa, val);
    let s = rehook(m, send);
    let after = mem::rd(pa);
    let ok = s == 0 && after == before;
    let _ = writeln!(
        Console,
        "# hostile: plain store ({what}): entry {:#x} after {} {}",
        after,
        if after == before {
            "(dropped)"
        } else {
            "(KEPT)"
        },
        if ok { "ok" } else { "MISMATCH" }
    );
    ok
}

/// A writable mapping of a page table gives no way around validation: a store through it
/// of a hostile entry is refused too.
fn through_writable_mapping(m: &mut Mmu, send: Send<'_>, t: &Target) -> bool {
    mem::wr(t.l1, t.l2 | vm::P | vm::RW);
    if rehook(m, send) != 0 {
        return false;
    }
    let pool = mem::ram_end().next_multiple_of(2 << 20);
    let slot = 5u64;
    let before = mem::rd(t.l2 + 8 * slot);
    // SAFETY: VA maps the scratch L2 (L1[0] above); with trapped stores the shadow maps it
    // at the alias, so the store exits to the VMM instead of reaching the table.
    unsafe {
        core::ptr::write_volatile((VA + 8 * slot) as *mut u64, pool | vm::P | vm::RW | vm::PS)
    };
    let after = mem::rd(t.l2 + 8 * slot);
    mem::wr(t.l1, 0);
    let ok = after == before && rehook(m, send) == 0;
    let _ = writeln!(
        Console,
        "# hostile: store of a pool mapping through a writable mapping of a page table: entry {after:#x} {}",
        if ok { "ok" } else { "MISMATCH" }
    );
    ok
}

/// wrpt: the dirty bit the CPU recorded in the shadow before an unhook is in the guest's
/// entry while the L1 is unhooked (the guest may read it there before replacing the entry).
fn dirty_survives_the_unhook(m: &mut Mmu, send: Send<'_>, t: &Target) -> bool {
    if m.mode != crate::mmu::Mode::Wrpt {
        return true;
    }
    let slot = 3u64;
    mem::wr(t.l1 + 8 * slot, t.data | vm::P | vm::RW);
    if rehook(m, send) != 0 {
        return false;
    }
    // SAFETY: VA + slot pages maps the scratch data frame (L1[slot] above), hooked again.
    unsafe { core::ptr::write_volatile((VA + slot * 4096) as *mut u64, 1) };
    // A store into another entry of the same L1 unhooks it.
    mem::wr(t.l1 + 8 * (slot + 1), 0);
    let dirty = mem::rd(t.l1 + 8 * slot) & 0x40 != 0;
    mem::wr(t.l1 + 8 * slot, 0);
    let ok = rehook(m, send) == 0 && dirty;
    let _ = writeln!(
        Console,
        "# hostile: wrpt: dirty bit in the unhooked L1's entry: {} {}",
        if dirty { "set" } else { "LOST" },
        if ok { "ok" } else { "MISMATCH" }
    );
    ok
}

/// Runs the plain-store attacks; returns the mismatches.
pub fn attacks(m: &mut Mmu, send: Send<'_>, t: &Target) -> u32 {
    if !m.mode.plain_stores() {
        return 0;
    }
    let pool = mem::ram_end().next_multiple_of(2 << 20);
    let cases = [
        (
            "unvalidated entry: protection-key bits",
            t.l1 + 8,
            t.data | vm::P | (1 << 59),
        ),
        (
            "mapping of the shadow pool",
            t.l1 + 16,
            pool | vm::P | vm::RW,
        ),
        (
            "non-leaf entry to a table of the wrong level",
            t.l2 + 8,
            t.l2 | vm::P | vm::RW,
        ),
    ];
    let mut bad = 0;
    for (what, pa, val) in cases {
        if !refused(m, send, what, pa, val) {
            bad += 1;
        }
    }
    if !through_writable_mapping(m, send, t) {
        bad += 1;
    }
    if !dirty_survives_the_unhook(m, send, t) {
        bad += 1;
    }
    bad
}
