//! Unit tests of trapped page-table stores: `emulate` (validated like PT_UPDATE) and
//! `wrpt` (unhook, plain stores, one-pass re-validation, no lost dirty bit, LRU bound).

use hypercall::{HcError, MmuOp};

use crate::pte::*;
use crate::tests::{vm_with_pool, Vm, L1, L2, L4, POOL, T, VA1};
use crate::*;

/// The alias of RAM in these tests (above the 4 MiB of RAM and the pool).
const ALIAS: u64 = 0x200_0000;
/// A second L1, linked at L2[3].
const L1B: u64 = 0x14_000;
/// VA of L1B[0].
const VA1B: u64 = 0x60_0000;

/// The standard tree plus a self-map leaf L1[5] → L1 (RW) and a second L1 at L2[3], loaded
/// in `mode`.
fn vm_in(mode: WriteMode) -> Vm {
    let mut v = vm_with_pool(64);
    v.mmu.set_write_mode(mode, ALIAS).unwrap();
    v.build();
    v.w(L1 + 5 * 8, L1 | P | RW);
    v.w(L2 + 3 * 8, L1B | T);
    v.w(L1B, 0x11_0000 | P | RW | US);
    v.op(MmuOp::Pin {
        level: 4,
        frame: L4,
    })
    .unwrap();
    v.op(MmuOp::NewBaseptr { frame: L4 }).unwrap();
    v.mmu.end_batch(0);
    v.check();
    v
}

impl Vm {
    fn store(&mut self, gpa: u64, val: u64) -> TrapResult {
        let r = self
            .mmu
            .trapped_write(&self.mem, 0, gpa, &val.to_le_bytes());
        self.mmu.end_batch(0);
        r
    }
}

#[test]
fn the_write_mode_is_chosen_before_any_table_exists() {
    let mut v = vm_with_pool(64);
    assert_eq!(
        v.mmu.set_write_mode(WriteMode::Emulate, POOL),
        Err(HcError::Einval)
    );
    assert_eq!(
        v.mmu.set_write_mode(WriteMode::Emulate, ALIAS + 1),
        Err(HcError::Einval)
    );
    v.load();
    assert_eq!(
        v.mmu.set_write_mode(WriteMode::Emulate, ALIAS),
        Err(HcError::Ebusy)
    );
    assert_eq!(v.mmu.write_mode(), WriteMode::Hypercall);
}

#[test]
fn writable_mappings_of_tables_point_at_the_alias() {
    let v = vm_in(WriteMode::Emulate);
    let l = v.leaf(VA1 + 5 * 4096).unwrap();
    assert_eq!(l.value & ADDR, ALIAS + L1, "stores through it trap");
    assert!(l.writable, "the alias is read-only in KVM: RW stays");
    // In hypercall mode the same leaf is read-only at the frame itself.
    let h = vm_in(WriteMode::Hypercall);
    let l = h.leaf(VA1 + 5 * 4096).unwrap();
    assert_eq!(l.value & ADDR, L1);
    assert!(!l.writable);
}

#[test]
fn emulated_stores_follow_the_pt_update_rules() {
    let mut v = vm_in(WriteMode::Emulate);
    assert_eq!(
        v.store(L1 + 6 * 8, 0x10_6000 | P | RW | US),
        TrapResult::Emulated
    );
    assert_eq!(v.leaf(VA1 + 6 * 4096).unwrap().value & ADDR, 0x10_6000);
    // Hostile stores: a mapping of the pool, an unvalidated (reserved-bit) entry.
    let before = v.r(L1 + 7 * 8);
    assert_eq!(
        v.store(L1 + 7 * 8, POOL | P | RW),
        TrapResult::Refused(HcError::Eperm)
    );
    assert_eq!(
        v.store(L1 + 7 * 8, 0x10_7000 | P | (1 << 60)),
        TrapResult::Refused(HcError::Einval)
    );
    assert_eq!(v.r(L1 + 7 * 8), before, "a refused store is dropped");
    // A writable mapping of a page table is accepted, but protected in the shadow.
    assert_eq!(v.store(L1 + 7 * 8, L2 | P | RW | US), TrapResult::Emulated);
    assert_eq!(v.leaf(VA1 + 7 * 4096).unwrap().value & ADDR, ALIAS + L2);
    let c = v.mmu.trap_counters();
    assert_eq!(
        (c.trapped_writes, c.emulated_writes, c.refused_writes),
        (4, 2, 2)
    );
    assert_eq!(v.mmu.counters().rejects[Rule::LeafMapsPool as usize], 1);
    v.check();
}

#[test]
fn partial_and_straddling_stores_are_merged() {
    let mut v = vm_in(WriteMode::Emulate);
    let val = 0x10_6000 | P | RW | US;
    let r = v
        .mmu
        .trapped_write(&v.mem, 0, L1 + 6 * 8, &(val as u32).to_le_bytes());
    assert_eq!(r, TrapResult::Emulated);
    assert_eq!(v.r(L1 + 6 * 8), val);
    // 8 bytes across entries 6 and 7: the high half of 6 and the low half of 7.
    let r = v.mmu.trapped_write(&v.mem, 0, L1 + 6 * 8 + 4, &[0; 8]);
    assert_eq!(r, TrapResult::Emulated);
    assert_eq!(v.r(L1 + 6 * 8), val);
    v.mmu.end_batch(0);
    v.check();
    assert_eq!(
        v.mmu.trapped_write(&v.mem, 0, L1, &[0; 9]),
        TrapResult::Refused(HcError::Einval)
    );
}

#[test]
fn unvalidated_emulation_is_caught_by_the_checker() {
    let mut v = vm_in(WriteMode::Emulate);
    v.mmu.set_trap_debug(TrapDebug {
        no_validate: true,
        ..TrapDebug::default()
    });
    assert_eq!(v.store(L1 + 7 * 8, POOL | P | RW), TrapResult::Emulated);
    assert!(v.mmu.check_invariants(&v.mem).is_err());
}

#[test]
fn stores_to_untyped_frames_are_written_through() {
    let mut v = vm_in(WriteMode::Emulate);
    assert_eq!(v.store(0x30_0000, 42), TrapResult::Passthrough);
    assert_eq!(v.r(0x30_0000), 42);
    let pool_word = v.r(POOL);
    assert_eq!(
        v.store(POOL, 42),
        TrapResult::Refused(HcError::Efault),
        "never the pool"
    );
    assert_eq!(v.r(POOL), pool_word);
}

#[test]
fn wrpt_unhooks_then_revalidates_in_one_pass() {
    let mut v = vm_in(WriteMode::Wrpt);
    assert_eq!(
        v.store(L1 + 6 * 8, 0x10_6000 | P | RW | US),
        TrapResult::Unhooked
    );
    assert_eq!(v.mmu.unhooked_tables(), vec![L1]);
    assert!(v.leaf(VA1).is_none(), "the L1 is reachable by no shadow");
    assert!(v.leaf(VA1B).is_some(), "its sibling still is");
    v.check();
    // Plain stores, no exit: a valid leaf and two hostile ones.
    v.w(L1 + 8 * 8, 0x10_8000 | P | RW | US);
    v.w(L1 + 9 * 8, POOL | P | RW);
    v.w(L1 + 10 * 8, 0x10_a000 | P | (1 << 60));
    v.check();
    v.mmu.rehook_all(&v.mem, 0);
    v.mmu.end_batch(0);
    assert!(v.mmu.unhooked_tables().is_empty());
    assert_eq!(v.leaf(VA1 + 8 * 4096).unwrap().value & ADDR, 0x10_8000);
    assert_eq!(v.leaf(VA1 + 6 * 4096).unwrap().value & ADDR, 0x10_6000);
    assert_eq!(v.r(L1 + 9 * 8), 0, "refused: the snapshot value is back");
    assert_eq!(v.r(L1 + 10 * 8), 0);
    assert!(v.leaf(VA1 + 9 * 4096).is_none());
    assert_eq!(
        v.leaf(VA1 + 5 * 4096).unwrap().value & ADDR,
        ALIAS + L1,
        "hooked again"
    );
    let c = v.mmu.trap_counters();
    assert_eq!((c.unhooks, c.rehooks, c.revalidated_entries), (1, 1, 4));
    assert_eq!(c.refused_writes, 2);
    assert_eq!(c.revalidated_hist, [0, 0, 1, 0, 0]);
    v.check();
}

#[test]
fn wrpt_keeps_every_dirty_bit() {
    for no_harvest in [false, true] {
        let mut v = vm_in(WriteMode::Wrpt);
        v.mmu.set_trap_debug(TrapDebug {
            no_harvest,
            ..TrapDebug::default()
        });
        v.cpu_sets(VA1, A | D);
        v.store(L1 + 6 * 8, 0x10_6000 | P | RW | US);
        // The guest reads its (unhooked) entry before replacing it.
        let seen = v.r(L1);
        assert_eq!(seen & D != 0, !no_harvest, "no_harvest={no_harvest}");
    }
    // A bit the CPU sets after the unhook (a stale TLB on another vCPU) still arrives at
    // the re-hook while the entry maps the same frame.
    let mut v = vm_in(WriteMode::Wrpt);
    let slot = v.leaf(VA1 + 4096).unwrap().slot_gpa;
    v.store(L1 + 6 * 8, 0x10_6000 | P | RW | US);
    v.w(slot, v.r(slot) | A | D);
    let e = v.r(L1 + 8);
    v.w(L1 + 8, e & !RW);
    v.mmu.rehook_all(&v.mem, 0);
    assert_ne!(v.r(L1 + 8) & D, 0);
    v.check();
}

#[test]
fn an_unhooked_l1_left_linked_is_caught() {
    let mut v = vm_in(WriteMode::Wrpt);
    v.mmu.set_trap_debug(TrapDebug {
        keep_parents: true,
        ..TrapDebug::default()
    });
    v.store(L1 + 6 * 8, 0x10_6000 | P | RW | US);
    let e = v.mmu.check_invariants(&v.mem).unwrap_err();
    assert_eq!(e.kind, InvariantKind::WritableTable, "{e}");
}

#[test]
fn unvalidated_rehook_is_caught() {
    let mut v = vm_in(WriteMode::Wrpt);
    v.mmu.set_trap_debug(TrapDebug {
        no_validate: true,
        ..TrapDebug::default()
    });
    v.store(L1 + 6 * 8, 0x10_6000 | P | RW | US);
    v.w(L1 + 9 * 8, POOL | P | RW);
    v.mmu.rehook_all(&v.mem, 0);
    assert!(v.mmu.check_invariants(&v.mem).is_err());
}

#[test]
fn the_lru_bound_rehooks_the_oldest() {
    let mut v = vm_in(WriteMode::Wrpt);
    v.mmu.set_max_unhooked(1);
    v.store(L1 + 6 * 8, 0x10_6000 | P | RW | US);
    v.store(L1B + 8, 0x11_1000 | P | RW | US);
    assert_eq!(v.mmu.unhooked_tables(), vec![L1B]);
    assert_eq!(v.mmu.trap_counters().lru_evictions, 1);
    assert!(v.leaf(VA1 + 6 * 4096).is_some());
    v.check();
}

#[test]
fn l2_stores_rehook_the_l1_they_touch() {
    let mut v = vm_in(WriteMode::Wrpt);
    v.store(L1 + 6 * 8, 0x10_6000 | P | RW | US);
    v.w(L1 + 9 * 8, POOL | P | RW);
    // Unlinking the unhooked L1 (its last reference): re-validated first, then untyped.
    assert_eq!(v.store(L2 + 8, 0), TrapResult::Emulated);
    assert!(v.mmu.unhooked_tables().is_empty());
    assert_eq!(v.mmu.frame_type(L1), None);
    assert_eq!(
        v.r(L1 + 9 * 8),
        0,
        "the hostile entry was refused at the re-hook"
    );
    v.check();
    // Spurious faults re-hook too (and are counted).
    v.store(L1B + 8, 0x11_1000 | P | RW | US);
    v.mmu.spurious_fault(&v.mem, 0, VA1B);
    assert!(v.mmu.unhooked_tables().is_empty());
    assert_eq!(v.mmu.trap_counters().spurious_faults, 1);
    v.check();
}
