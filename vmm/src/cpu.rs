//! vCPU initial state: CPUID (with the pvmm hypervisor leaves), MSRs, FPU, long-mode
//! segments, boot page tables and registers for a 64-bit kernel entry.

use crate::error::SetupError;
use crate::layout;
use crate::x86::{CR0_PG, CR4_PAE, CR4_PGE, EFER_LMA};
use hypercall::CpuidLeaves;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_SCE: u64 = 1;
const EFER_LME: u64 = 1 << 8;
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

/// Where KVM's own hypervisor leaves (signature, PV features such as kvm-clock) go: pvmm's
/// leaves take 0x4000_0000, and Linux finds KVM's by scanning in steps of 0x100.
pub const KVM_LEAVES_BASE: u32 = 0x4000_0100;

/// Builds the CPUID table for `vcpu`: KVM's supported leaves, APIC id, the hypervisor bit,
/// pvmm's hypervisor leaves at 0x4000_0000 and KVM's moved to [`KVM_LEAVES_BASE`] (so a
/// stock Linux still finds kvm-clock and takes the TSC frequency from it, without PIT
/// calibration).
pub fn cpuid_for(supported: &CpuId, vcpu: u8, pv: &CpuidLeaves) -> Result<CpuId, SetupError> {
    let mut entries: Vec<_> = supported
        .as_slice()
        .iter()
        .copied()
        .map(relocate_kvm_leaf)
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

/// Moves one of KVM's hypervisor leaves (0x4000_0000..0x4000_0100) up to
/// [`KVM_LEAVES_BASE`]; the signature leaf's EAX (highest leaf) moves with it.
fn relocate_kvm_leaf(mut e: kvm_bindings::kvm_cpuid_entry2) -> kvm_bindings::kvm_cpuid_entry2 {
    const RANGE: std::ops::Range<u32> = 0x4000_0000..0x4000_0100;
    if RANGE.contains(&e.function) {
        let shift = KVM_LEAVES_BASE - RANGE.start;
        if e.function == RANGE.start && RANGE.contains(&e.eax) {
            e.eax += shift;
        }
        e.function += shift;
    }
    e
}

/// Local APIC register offsets of LVT LINT0 and LINT1.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery modes (bits 8..=10).
const APIC_MODE_NMI: u32 = 0b100;
const APIC_MODE_EXTINT: u32 = 0b111;

/// Sets the delivery mode of the LVT register at `offset` in a `KVM_GET_LAPIC` page.
fn set_lvt_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let Some(r) = regs.get_mut(offset..offset + 4) else {
        return;
    };
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(r.iter()) {
        *d = *s as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (d, s) in r.iter_mut().zip(v.to_le_bytes()) {
        *d = s as std::os::raw::c_char;
    }
}

/// Wires the local APIC as firmware leaves it for a PC: LINT0 takes the 8259's interrupts
/// (ExtINT) and LINT1 is the NMI line. Needs the in-kernel irqchip.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), SetupError> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| SetupError::kvm("KVM_GET_LAPIC", e))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| SetupError::kvm("KVM_SET_LAPIC", e))
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn lint0_is_extint_and_lint1_is_nmi() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        // Masked, level-triggered LINT0 with mode fixed; a vector in LINT1.
        regs[APIC_LVT_LINT0 + 1] = 0x80u8 as std::os::raw::c_char; // bit 15 (level)
        regs[APIC_LVT_LINT0 + 2] = 0x01; // bit 16 (masked)
        regs[APIC_LVT_LINT1] = 0x20;
        set_lvt_mode(&mut regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut regs, APIC_LVT_LINT1, APIC_MODE_NMI);
        let word = |o: usize| u32::from_le_bytes([0, 1, 2, 3].map(|i| regs[o + i] as u8));
        assert_eq!(word(APIC_LVT_LINT0), 0x0001_8700, "ExtINT, other bits kept");
        assert_eq!(word(APIC_LVT_LINT1), 0x0000_0420, "NMI, vector kept");
        // An offset past the page is ignored, not a panic.
        set_lvt_mode(&mut regs, 1022, APIC_MODE_NMI);
    }

    #[test]
    fn kvm_leaves_move_above_pvmm_leaves() {
        let e = |function, eax| kvm_cpuid_entry2 {
            function,
            eax,
            ..Default::default()
        };
        let sig = relocate_kvm_leaf(e(0x4000_0000, 0x4000_0001));
        assert_eq!((sig.function, sig.eax), (0x4000_0100, 0x4000_0101));
        let feat = relocate_kvm_leaf(e(0x4000_0001, 0x1234));
        assert_eq!((feat.function, feat.eax), (0x4000_0101, 0x1234));
        let std = relocate_kvm_leaf(e(1, 7));
        assert_eq!((std.function, std.eax), (1, 7));
        let pv = CpuidLeaves::new(0, hypercall::Transport::Pio, 0x510);
        let supported = CpuId::from_entries(&[
            e(0, 0xd),
            e(1, 0),
            e(0x4000_0000, 0x4000_0001),
            e(0x4000_0001, 0x1234),
        ])
        .unwrap();
        let c = cpuid_for(&supported, 1, &pv).unwrap();
        let f: Vec<u32> = c.as_slice().iter().map(|e| e.function).collect();
        assert_eq!(
            f.iter().filter(|&&x| x == 0x4000_0000).count(),
            1,
            "only pvmm's signature at the base"
        );
        assert!(f.contains(&0x4000_0100) && f.contains(&0x4000_0101));
        let base = c
            .as_slice()
            .iter()
            .find(|e| e.function == 0x4000_0000)
            .unwrap();
        assert_eq!(
            [base.ebx, base.ecx, base.edx],
            [pv.signature[1], pv.signature[2], pv.signature[3]]
        );
    }
}
