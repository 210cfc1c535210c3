//! The local APIC in x2APIC mode (MSR access only, so no MMIO mapping is needed in any MMU
//! mode): enable, IPIs, INIT/SIPI, EOI. The VMM's in-kernel LAPIC implements it.
//!
//! No shared state: every register is the calling CPU's own.

use crate::arch::{self, rdmsr, wrmsr};

/// Vector of the spurious-interrupt register (its gate just returns).
pub const SPURIOUS_VECTOR: u8 = 0xff;

const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_EN: u64 = 1 << 11;
const APIC_BASE_EXTD: u64 = 1 << 10;
const MSR_ID: u32 = 0x802;
const MSR_EOI: u32 = 0x80b;
const MSR_SVR: u32 = 0x80f;
const MSR_ICR: u32 = 0x830;
const ICR_FIXED: u64 = 0;
const ICR_INIT: u64 = 0b101 << 8;
const ICR_STARTUP: u64 = 0b110 << 8;
const ICR_ASSERT: u64 = 1 << 14;

/// True if the CPU offers x2APIC (CPUID.1:ECX bit 21).
pub fn has_x2apic() -> bool {
    let r = core::arch::x86_64::__cpuid(1);
    r.ecx & (1 << 21) != 0
}

/// Switches this CPU's LAPIC to x2APIC mode and software-enables it. Also masks the
/// legacy PIC (boot CPU): its vectors would collide with exceptions, and nothing here uses
/// it.
pub fn init(boot_cpu: bool) {
    if boot_cpu {
        arch::outb(0x21, 0xff);
        arch::outb(0xa1, 0xff);
    }
    let base = rdmsr(MSR_APIC_BASE);
    wrmsr(MSR_APIC_BASE, base | APIC_BASE_EN);
    wrmsr(MSR_APIC_BASE, base | APIC_BASE_EN | APIC_BASE_EXTD);
    wrmsr(MSR_SVR, 0x100 | u64::from(SPURIOUS_VECTOR));
}

/// This CPU's APIC id.
pub fn id() -> u32 {
    rdmsr(MSR_ID) as u32
}

/// Acknowledges the interrupt being served.
pub fn eoi() {
    wrmsr(MSR_EOI, 0);
}

/// Sends a fixed interrupt with `vector` to the CPU with APIC id `dest`.
pub fn send_ipi(dest: u32, vector: u8) {
    wrmsr(
        MSR_ICR,
        (u64::from(dest) << 32) | ICR_FIXED | u64::from(vector),
    );
}

/// INIT, then two STARTUP IPIs with the page number `page` (the AP starts in real mode at
/// `page << 12`). The in-kernel LAPIC needs none of the historical delays, and a STARTUP
/// to a CPU that is already running is ignored.
pub fn start_ap(dest: u32, page: u8) {
    let d = u64::from(dest) << 32;
    wrmsr(MSR_ICR, d | ICR_INIT | ICR_ASSERT);
    for _ in 0..2 {
        wrmsr(MSR_ICR, d | ICR_STARTUP | ICR_ASSERT | u64::from(page));
    }
}
