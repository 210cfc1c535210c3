//! The trapped-store path without KVM: the dispatcher's `PT_WRITES` / `PT_FAULT` and MMIO
//! writes through the RAM alias into the MMU handler, over plain memory.

use super::Alias;
use crate::guest_ram::GuestRam;
use crate::hcall::mmu_batch::{factory_with, MmuOptions};
use crate::hcall::Dispatcher;
use crate::layout::Layout;
use hypercall::{op, pt_writes, HcError, MmuEntry, RequestHeader};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const REQ: u64 = 0x1000;
const ENTRIES: u64 = 0x2000;
const L1: u64 = 0x20_0000;

fn vm(with_alias: bool, check: bool) -> (Dispatcher, GuestRam, Alias) {
    let layout = Layout::new(16 << 20, 1 << 20).unwrap();
    let mut r: Vec<(GuestAddress, usize)> = layout
        .ram_regions
        .iter()
        .map(|&(s, l)| (GuestAddress(s), l as usize))
        .collect();
    r.push((GuestAddress(layout.pool_base), layout.pool_size as usize));
    let ram = GuestRam::new(
        GuestMemoryMmap::from_ranges(&r).unwrap(),
        layout.usable().collect(),
    );
    let alias = Alias::for_layout(&layout);
    let options = MmuOptions {
        check_shadow: check,
        ..MmuOptions::default()
    };
    let mut h = factory_with(&ram, &layout, 1, options);
    if with_alias {
        h.as_mut().unwrap().enable_pt_trap(alias);
    }
    let d = Dispatcher::new(ram.clone(), 1, h);
    assert_eq!(call(&d, &ram, op::VERSION, [1, 0, 0, 0]), 0);
    (d, ram, alias)
}

fn call(d: &Dispatcher, ram: &GuestRam, o: u32, args: [u64; 4]) -> i64 {
    ram.write(REQ, &RequestHeader::new(o, args).to_bytes())
        .unwrap();
    d.handle(0, REQ).status
}

fn batch(d: &Dispatcher, ram: &GuestRam, e: MmuEntry) -> i64 {
    ram.write(ENTRIES, &e.to_bytes()).unwrap();
    call(d, ram, op::MMU_BATCH, [ENTRIES, 1, 0, 0])
}

fn word(ram: &GuestRam, gpa: u64) -> u64 {
    let mut b = [0u8; 8];
    ram.read(gpa, &mut b).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn the_modes_need_the_trap() {
    let (d, ram, _) = vm(false, false);
    assert_eq!(d.features() & hypercall::features::PT_TRAP, 0);
    let s = call(&d, &ram, op::PT_WRITES, [pt_writes::EMULATE, 0, 0, 0]);
    assert_eq!(s, HcError::Enosys.status());
    assert_eq!(
        call(&d, &ram, op::PT_FAULT, [0, 0, 0, 0]),
        HcError::Enosys.status()
    );
    assert!(
        d.pt_write(0, 1 << 30, &[0; 8]).is_none(),
        "no alias: a device's MMIO"
    );
}

#[test]
fn trapped_stores_are_validated_like_pt_update() {
    let (d, ram, alias) = vm(true, true);
    assert_ne!(d.features() & hypercall::features::PT_TRAP, 0);
    assert_eq!(
        call(&d, &ram, op::PT_WRITES, [pt_writes::EMULATE, 0, 0, 0]),
        0
    );
    assert_eq!(batch(&d, &ram, MmuEntry::pin(1, L1)), 0);
    // Too late to change the mode now.
    let s = call(&d, &ram, op::PT_WRITES, [pt_writes::WRPT, 0, 0, 0]);
    assert_eq!(s, HcError::Ebusy.status());
    let good = 0x30_0000u64 | 7;
    let fx = d.pt_write(0, alias.base + L1 + 8, &good.to_le_bytes());
    assert!(fx.as_ref().is_some_and(|f| f.violation.is_none()), "{fx:?}");
    assert_eq!(word(&ram, L1 + 8), good);
    // A mapping of the pool: refused, dropped.
    let pool = Layout::new(16 << 20, 1 << 20).unwrap().pool_base;
    let fx = d.pt_write(0, alias.base + L1 + 16, &(pool | 7).to_le_bytes());
    assert!(fx.is_some_and(|f| f.violation.is_none()));
    assert_eq!(word(&ram, L1 + 16), 0);
    // Outside the alias: not a page-table store.
    assert!(d.pt_write(0, alias.base + alias.len, &[0; 8]).is_none());
    let rep = d.mmu_report().unwrap();
    let t = &rep["pt_trap"];
    assert_eq!(
        (t["trapped_writes"].as_u64(), t["refused_writes"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(rep["rejects"]["leaf_maps_pool"], 1);
}

#[test]
fn wrpt_unhooks_and_any_mmu_hypercall_rehooks() {
    let (d, ram, alias) = vm(true, true);
    assert_eq!(call(&d, &ram, op::PT_WRITES, [pt_writes::WRPT, 0, 0, 0]), 0);
    assert_eq!(batch(&d, &ram, MmuEntry::pin(1, L1)), 0);
    d.pt_write(0, alias.base + L1 + 8, &(0x30_0000u64 | 7).to_le_bytes());
    // A plain store into the unhooked L1, then a hostile one.
    ram.write(L1 + 24, &(0x30_1000u64 | 7).to_le_bytes())
        .unwrap();
    ram.write(L1 + 32, &(1u64 << 59 | 0x30_2000 | 1).to_le_bytes())
        .unwrap();
    assert_eq!(batch(&d, &ram, MmuEntry::flush_tlb()), 0, "checker passed");
    assert_eq!(word(&ram, L1 + 24), 0x30_1000 | 7);
    assert_eq!(word(&ram, L1 + 32), 0, "refused at the re-hook");
    let rep = d.mmu_report().unwrap();
    let t = &rep["pt_trap"];
    assert_eq!(
        (t["unhooks"].as_u64(), t["rehooks"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(t["revalidated_entries"], 3);
    assert_eq!(call(&d, &ram, op::PT_FAULT, [0x40_0000, 0, 0, 0]), 0);
    assert_eq!(d.mmu_report().unwrap()["pt_trap"]["spurious_faults"], 1);
}
