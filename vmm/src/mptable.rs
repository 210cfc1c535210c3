//! The Intel MultiProcessor table (MP spec 1.4) a Linux guest without firmware reads to find
//! its CPUs, the I/O APIC and how interrupts are wired: one processor entry per vCPU, an ISA
//! bus, KVM's in-kernel I/O APIC with ISA IRQs 0–15 on pins 0–15 (KVM's default routing),
//! and LINT0 as ExtINT and LINT1 as NMI on every local APIC.
//!
//! The floating pointer sits at [`crate::layout::MPTABLE_FLOATING`] (inside the last KiB
//! below 640 KiB, where Linux scans for it) and the configuration table at
//! [`crate::layout::MPTABLE_CONFIG`], both in the reserved legacy hole.

use crate::layout;

/// Local APIC base address.
pub const LAPIC_BASE: u32 = 0xfee0_0000;
/// I/O APIC base address.
pub const IOAPIC_BASE: u32 = 0xfec0_0000;
/// Local APIC version reported (an integrated APIC, as KVM's).
const LAPIC_VERSION: u8 = 0x14;
/// I/O APIC version reported (KVM's: 24 pins).
const IOAPIC_VERSION: u8 = 0x11;
/// MP spec revision 1.4.
const SPEC_REV: u8 = 4;
/// ISA IRQs described (the I/O APIC has 24 pins; only ISA sources exist).
const ISA_IRQS: u8 = 16;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// Interrupt types of I/O and local interrupt entries.
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// CPU signature: family 6, model 0, stepping 0 (informational only).
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX bits reported: FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Size of the floating pointer structure.
pub const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

/// Length of the configuration table for `vcpus` processors.
pub fn config_len(vcpus: u8) -> usize {
    HEADER_LEN
        + PROCESSOR_LEN * usize::from(vcpus)
        + SMALL_ENTRY_LEN * (2 + usize::from(ISA_IRQS) + 2)
}

/// The I/O APIC's id: the first id after the vCPUs' local APIC ids.
pub fn ioapic_id(vcpus: u8) -> u8 {
    vcpus
}

/// Makes the bytes of `b` sum to zero (mod 256) by setting `b[at]`.
fn set_checksum(b: &mut [u8], at: usize) {
    if let Some(slot) = b.get_mut(at) {
        *slot = 0;
    }
    let sum = b.iter().fold(0u8, |s, &x| s.wrapping_add(x));
    if let Some(slot) = b.get_mut(at) {
        *slot = 0u8.wrapping_sub(sum);
    }
}

/// The 16-byte floating pointer structure pointing at a configuration table at `config`.
pub fn floating_pointer(config: u32) -> [u8; FLOATING_LEN] {
    let mut f = [0u8; FLOATING_LEN];
    f[0..4].copy_from_slice(b"_MP_");
    f[4..8].copy_from_slice(&config.to_le_bytes());
    f[8] = 1; // length in 16-byte units
    f[9] = SPEC_REV;
    // f[11] = 0: a configuration table is present; f[12] bit 7 = 0: virtual wire mode.
    set_checksum(&mut f, 10);
    f
}

fn processor(id: u8) -> [u8; PROCESSOR_LEN] {
    let mut e = [0u8; PROCESSOR_LEN];
    e[0] = ENTRY_PROCESSOR;
    e[1] = id;
    e[2] = LAPIC_VERSION;
    e[3] = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
    e[4..8].copy_from_slice(&CPU_SIGNATURE.to_le_bytes());
    e[8..12].copy_from_slice(&CPU_FEATURES.to_le_bytes());
    e
}

/// An I/O (type 3) or local (type 4) interrupt entry with "conforms to bus" flags.
fn interrupt(kind: u8, int_type: u8, src_irq: u8, dst_id: u8, dst_pin: u8) -> [u8; 8] {
    [kind, int_type, 0, 0, 0, src_irq, dst_id, dst_pin]
}

/// The configuration table ("PCMP" header and entries) for `vcpus` processors.
pub fn config_table(vcpus: u8) -> Vec<u8> {
    let ioapic = ioapic_id(vcpus);
    let mut entries: Vec<u8> = Vec::with_capacity(config_len(vcpus));
    for id in 0..vcpus {
        entries.extend_from_slice(&processor(id));
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    let mut io = [ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1, 0, 0, 0, 0];
    io[4..8].copy_from_slice(&IOAPIC_BASE.to_le_bytes());
    entries.extend_from_slice(&io);
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&interrupt(
            ENTRY_IO_INTERRUPT,
            INT_VECTORED,
            irq,
            ioapic,
            irq,
        ));
    }
    // Every local APIC (id 0xff): LINT0 from the 8259 as ExtINT, LINT1 as NMI.
    entries.extend_from_slice(&interrupt(ENTRY_LOCAL_INTERRUPT, INT_EXTINT, 0, 0xff, 0));
    entries.extend_from_slice(&interrupt(ENTRY_LOCAL_INTERRUPT, INT_NMI, 0, 0xff, 1));
    let count = u16::from(vcpus) + 2 + u16::from(ISA_IRQS) + 2;

    let mut t = vec![0u8; HEADER_LEN];
    t[0..4].copy_from_slice(b"PCMP");
    let len = (HEADER_LEN + entries.len()) as u16;
    t[4..6].copy_from_slice(&len.to_le_bytes());
    t[6] = SPEC_REV;
    t[8..16].copy_from_slice(b"PVMM    ");
    t[16..28].copy_from_slice(b"PVMM-VM     ");
    t[34..36].copy_from_slice(&count.to_le_bytes());
    t[36..40].copy_from_slice(&LAPIC_BASE.to_le_bytes());
    t.extend_from_slice(&entries);
    set_checksum(&mut t, 7);
    t
}

/// Writes the floating pointer and the configuration table for `vcpus` processors.
pub fn write<M: vm_memory::Bytes<vm_memory::GuestAddress>>(mem: &M, vcpus: u8) -> Result<(), M::E> {
    let config = config_table(vcpus);
    mem.write_slice(&config, vm_memory::GuestAddress(layout::MPTABLE_CONFIG))?;
    mem.write_slice(
        &floating_pointer(layout::MPTABLE_CONFIG as u32),
        vm_memory::GuestAddress(layout::MPTABLE_FLOATING),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, &x| s.wrapping_add(x))
    }

    /// The entries of a configuration table as (type, bytes).
    fn entries(t: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = HEADER_LEN;
        while at < t.len() {
            let len = if t[at] == ENTRY_PROCESSOR {
                PROCESSOR_LEN
            } else {
                SMALL_ENTRY_LEN
            };
            out.push((t[at], t[at..at + len].to_vec()));
            at += len;
        }
        out
    }

    #[test]
    fn floating_pointer_is_valid() {
        let f = floating_pointer(0x9f000);
        assert_eq!(&f[0..4], b"_MP_");
        assert_eq!(u32::from_le_bytes(f[4..8].try_into().unwrap()), 0x9f000);
        assert_eq!(f[8], 1);
        assert_eq!(f[9], 4);
        assert_eq!(sum(&f), 0, "checksum");
    }

    #[test]
    fn config_table_describes_cpus_ioapic_and_lints() {
        for vcpus in [1u8, 2, 64] {
            let t = config_table(vcpus);
            assert_eq!(&t[0..4], b"PCMP");
            assert_eq!(sum(&t), 0, "checksum with {vcpus} vCPUs");
            assert_eq!(usize::from(u16::from_le_bytes([t[4], t[5]])), t.len());
            assert_eq!(t.len(), config_len(vcpus));
            assert_eq!(
                u32::from_le_bytes(t[36..40].try_into().unwrap()),
                LAPIC_BASE
            );
            let e = entries(&t);
            assert_eq!(usize::from(u16::from_le_bytes([t[34], t[35]])), e.len());
            let cpus: Vec<_> = e.iter().filter(|(k, _)| *k == ENTRY_PROCESSOR).collect();
            assert_eq!(cpus.len(), usize::from(vcpus));
            for (i, (_, c)) in cpus.iter().enumerate() {
                assert_eq!(c[1], i as u8, "APIC ids in order");
                assert_eq!(c[3] & CPU_ENABLED, CPU_ENABLED);
                assert_eq!(c[3] & CPU_BOOTSTRAP != 0, i == 0, "only vCPU 0 is the BSP");
            }
            let io: Vec<_> = e.iter().filter(|(k, _)| *k == ENTRY_IOAPIC).collect();
            assert_eq!(io.len(), 1);
            assert_eq!(io[0].1[1], ioapic_id(vcpus));
            assert!(
                io[0].1[1] >= vcpus,
                "I/O APIC id clashes with a local APIC id"
            );
            assert_eq!(
                u32::from_le_bytes(io[0].1[4..8].try_into().unwrap()),
                IOAPIC_BASE
            );
            let irqs: Vec<_> = e.iter().filter(|(k, _)| *k == ENTRY_IO_INTERRUPT).collect();
            assert_eq!(irqs.len(), 16);
            for (i, (_, x)) in irqs.iter().enumerate() {
                // ISA IRQ i -> pin i of our I/O APIC, as KVM's default GSI routing does.
                assert_eq!(
                    (x[1], x[5], x[6], x[7]),
                    (INT_VECTORED, i as u8, io[0].1[1], i as u8)
                );
            }
            let lints: Vec<_> = e
                .iter()
                .filter(|(k, _)| *k == ENTRY_LOCAL_INTERRUPT)
                .map(|(_, x)| (x[1], x[6], x[7]))
                .collect();
            assert_eq!(lints, vec![(INT_EXTINT, 0xff, 0), (INT_NMI, 0xff, 1)]);
        }
    }

    #[test]
    fn fits_below_the_floating_pointer_and_lands_in_memory() {
        assert!(layout::MPTABLE_CONFIG + config_len(64) as u64 <= layout::MPTABLE_FLOATING);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&mem, 2).unwrap();
        let mut f = [0u8; FLOATING_LEN];
        mem.read_slice(&mut f, GuestAddress(layout::MPTABLE_FLOATING))
            .unwrap();
        assert_eq!(f, floating_pointer(layout::MPTABLE_CONFIG as u32));
        let mut t = vec![0u8; config_len(2)];
        mem.read_slice(&mut t, GuestAddress(layout::MPTABLE_CONFIG))
            .unwrap();
        assert_eq!(t, config_table(2));
    }
}
