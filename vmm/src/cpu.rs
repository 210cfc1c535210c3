//! vCPU initial state: CPUID (with the pvmm hypervisor leaves), MSRs, FPU, long-mode
//! segments, boot page tables and registers for a 64-bit kernel entry.

use crate::error::SetupError;
use crate::layout;
use hypercall::CpuidLeaves;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_PGE: u64 = 1 << 7;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_SCE: u64 = 1;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

const PTE_P: u64 = 1;
const PTE_RW: u64 = 2;
const PTE_PS: u64 = 1 << 7;

/// Boot GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0067,
];

/// Builds the CPUID table for `vcpu`: KVM's supported leaves, APIC id, the hypervisor bit,
/// and pvmm's hypervisor leaves in place of KVM's.
pub fn cpuid_for(supported: &CpuId, vcpu: u8, pv: &CpuidLeaves) -> Result<CpuId, SetupError> {
    let mut entries: Vec<_> = supported
        .as_slice()
        .iter()
        .filter(|e| !(0x4000_0000..0x4000_0100).contains(&e.function))
        .copied()
        .collect();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(vcpu) << 24);
                e.ecx |= 1 << 31; // hypervisor present
            }
            0xb | 0x1f => e.edx = u32::from(vcpu),
            _ => {}
        }
    }
    let leaf = |function: u32, r: [u32; 4]| kvm_bindings::kvm_cpuid_entry2 {
        function,
        eax: r[0],
        ebx: r[1],
        ecx: r[2],
        edx: r[3],
        ..Default::default()
    };
    entries.push(leaf(hypercall::CPUID_LEAF_SIGNATURE, pv.signature));
    entries.push(leaf(hypercall::CPUID_LEAF_FEATURES, pv.features));
    CpuId::from_entries(&entries).map_err(|e| SetupError::other("building CPUID", format!("{e:?}")))
}

/// Writes the boot GDT and identity page tables (first 4 GiB with 2 MiB pages, plus the
/// top 2 GiB of the address space mapped to physical 0 for higher-half kernels).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), SetupError> {
    let w = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| SetupError::other("writing boot tables", e))
    };
    for (i, d) in GDT.iter().enumerate() {
        w(layout::BOOT_GDT + 8 * i as u64, *d)?;
    }
    w(layout::BOOT_IDT, 0)?;
    let pml4 = layout::BOOT_PML4;
    let pdpt_low = pml4 + 0x1000;
    let pdpt_high = pml4 + 0x2000;
    let pd0 = pml4 + 0x3000;
    w(pml4, pdpt_low | PTE_P | PTE_RW)?;
    w(pml4 + 511 * 8, pdpt_high | PTE_P | PTE_RW)?;
    for i in 0..4u64 {
        w(pdpt_low + i * 8, (pd0 + i * 0x1000) | PTE_P | PTE_RW)?;
        for j in 0..512u64 {
            let phys = (i << 30) | (j << 21);
            w(pd0 + i * 0x1000 + j * 8, phys | PTE_P | PTE_RW | PTE_PS)?;
        }
    }
    // -2 GiB .. 0 maps physical 0 .. 2 GiB.
    w(pdpt_high + 510 * 8, pd0 | PTE_P | PTE_RW)?;
    w(pdpt_high + 511 * 8, (pd0 + 0x1000) | PTE_P | PTE_RW)?;
    Ok(())
}

fn seg(selector: u16, type_: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(type_ & 8 == 0),
        s,
        l: u8::from(type_ & 8 != 0),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts `vcpu` into 64-bit long mode at `entry` with RSI pointing at the zero page.
pub fn setup_long_mode(vcpu: &VcpuFd, entry: u64) -> Result<(), SetupError> {
    let e = |what: &'static str| move |err| SetupError::kvm(what, err);
    let mut sregs = vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    let code = seg(0x08, 0xb, 1);
    let data = seg(0x10, 0x3, 1);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = layout::BOOT_GDT;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = layout::BOOT_PML4;
    sregs.cr4 = CR4_PAE | CR4_PGE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
    vcpu.set_sregs(&sregs).map_err(e("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: entry,
        rsp: layout::BOOT_STACK,
        rbp: layout::BOOT_STACK,
        rsi: layout::ZERO_PAGE,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(e("KVM_SET_REGS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(e("KVM_SET_FPU"))?;
    Ok(())
}

/// The MSRs a 64-bit kernel expects at entry.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), SetupError> {
    const MSRS: [(u32, u64); 10] = [
        (0x174, 0),                     // SYSENTER_CS
        (0x175, 0),                     // SYSENTER_ESP
        (0x176, 0),                     // SYSENTER_EIP
        (0xc000_0081, 0),               // STAR
        (0xc000_0082, 0),               // LSTAR
        (0xc000_0083, 0),               // CSTAR
        (0xc000_0084, 0),               // SFMASK
        (0xc000_0102, 0),               // KERNEL_GS_BASE
        (0x1a0, 1),                     // MISC_ENABLE: fast strings
        (0x277, 0x0007_0406_0007_0406), // PAT
    ];
    let entries: Vec<kvm_msr_entry> = MSRS
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|err| SetupError::other("building MSRs", format!("{err:?}")))?;
    let n = vcpu
        .set_msrs(&msrs)
        .map_err(|err| SetupError::kvm("KVM_SET_MSRS", err))?;
    if n != entries.len() {
        log::warn!("KVM accepted {n} of {} boot MSRs", entries.len());
    }
    Ok(())
}
