//! Bringing up the other CPUs: the MP table's processor list, the real-mode trampoline,
//! INIT/SIPI, and each AP's path into the scheduler.
//!
//! An AP starts in real mode at [`TRAMPOLINE`] (a page the VMM leaves free below 1 MiB),
//! loads the trampoline's own GDT, the VMM's boot page tables (identity + kernel window,
//! still intact: the kernel never allocates below 2 MiB) and enters long mode, then jumps
//! to `ap_entry` in the kernel window on the stack the boot CPU chose for it. There it
//! sets up its GDT/TSS/GS, IDT, x2APIC and MMU state, loads the kernel root (native
//! `mov cr3`, PV `NEW_BASEPTR`), reports in and enters its scheduler loop.
//!
//! Shared state: [`AP_ID`] and [`AP_STACK`], the handoff to the AP being started (written
//! by the boot CPU, which starts one AP at a time and waits for [`AP_UP`]).

use crate::apic;
use crate::arch::{self, KERNEL_VMA, MAX_CPUS};
use crate::mmu;
use crate::pv::Pv;
use crate::sched;
use crate::tlb;
use crate::traps;
use crate::vm;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Physical page of the AP trampoline (its SIPI vector is `TRAMPOLINE >> 12`).
pub const TRAMPOLINE: u64 = 0x8000;
/// The VMM's boot page tables (identity map of 4 GiB and the kernel window).
const BOOT_PML4: u64 = 0x9000;

/// The CPU index the AP being started takes.
static AP_ID: AtomicUsize = AtomicUsize::new(0);
/// The AP's initial stack pointer (read by `ap_entry`).
static AP_STACK: AtomicU64 = AtomicU64::new(0);
/// The index of the last AP that came up.
static AP_UP: AtomicUsize = AtomicUsize::new(0);

/// The processors of the MP table: APIC ids of the enabled ones, the boot CPU first.
pub struct Cpus {
    /// APIC ids (entry 0: the boot CPU).
    pub ids: [u32; MAX_CPUS],
    /// How many.
    pub n: usize,
}

fn rd8(pa: u64) -> u8 {
    // SAFETY: low memory, mapped by the boot tables through the kernel window (the caller
    // runs before the kernel switches tables).
    unsafe { core::ptr::read_volatile((KERNEL_VMA + pa) as *const u8) }
}

fn rd16(pa: u64) -> u16 {
    u16::from(rd8(pa)) | u16::from(rd8(pa + 1)) << 8
}

fn rd32(pa: u64) -> u32 {
    u32::from(rd16(pa)) | u32::from(rd16(pa + 2)) << 16
}

/// The MP floating pointer ("_MP_" on a 16-byte boundary) in the last KiB of base memory
/// or the BIOS area.
fn floating_pointer() -> Option<u64> {
    [(0x9fc00u64, 0xa0000u64), (0xf0000, 0x10_0000)]
        .into_iter()
        .flat_map(|(s, e)| (s..e).step_by(16))
        .find(|&a| rd32(a) == u32::from_le_bytes(*b"_MP_"))
}

/// Reads the MP table (before the kernel switches tables). Without one: the boot CPU only.
pub fn find_cpus(boot_apic: u32) -> Cpus {
    let mut c = Cpus {
        ids: [0; MAX_CPUS],
        n: 1,
    };
    c.ids[0] = boot_apic;
    let Some(fp) = floating_pointer() else {
        return c;
    };
    let cfg = u64::from(rd32(fp + 4));
    if cfg == 0 || cfg >= 0x10_0000 || rd32(cfg) != u32::from_le_bytes(*b"PCMP") {
        return c;
    }
    let count = rd16(cfg + 0x22);
    let mut at = cfg + 0x2c;
    for _ in 0..count {
        let kind = rd8(at);
        if kind == 0 {
            let (id, flags) = (u32::from(rd8(at + 1)), rd8(at + 3));
            if flags & 1 != 0 && id != boot_apic && c.n < MAX_CPUS {
                c.ids[c.n] = id;
                c.n += 1;
            }
            at += 20;
        } else {
            at += 8;
        }
    }
    c
}

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

/// Copies the trampoline to [`TRAMPOLINE`] (before the kernel switches tables: low memory
/// is reached through the boot tables' kernel window).
pub fn install_trampoline() {
    let s = core::ptr::addr_of!(ap_tramp_start);
    let len = core::ptr::addr_of!(ap_tramp_end) as usize - s as usize;
    assert!(len <= 4096, "AP trampoline larger than a page");
    // SAFETY: the trampoline's bytes (a section of the kernel image) into a free low page
    // that nothing else uses.
    unsafe { core::ptr::copy_nonoverlapping(s, (KERNEL_VMA + TRAMPOLINE) as *mut u8, len) };
}

/// Starts every AP of `cpus`, one at a time; returns the number of CPUs online.
pub fn start_aps(cpus: &Cpus) -> usize {
    let mut up = 1;
    for (i, &id) in cpus.ids.iter().enumerate().take(cpus.n).skip(1) {
        tlb::set_apic_id(i, id);
        AP_ID.store(i, Ordering::Relaxed);
        AP_STACK.store(arch::kstack_top(i), Ordering::Release);
        apic::start_ap(id, (TRAMPOLINE >> 12) as u8);
        // The AP's way in runs emulated at CPL0 (and does hypercalls in PV modes): allow
        // it plenty of time (TSC ticks) before giving up on it.
        let t0 = arch::rdtsc();
        while AP_UP.load(Ordering::Acquire) != i {
            core::hint::spin_loop();
            if arch::rdtsc() - t0 > 200_000_000_000 {
                panic!("CPU {i} (APIC id {id}) did not come up");
            }
        }
        up += 1;
        tlb::set_online(up);
    }
    up
}

extern "C" fn ap_main() -> ! {
    let id = AP_ID.load(Ordering::Relaxed);
    arch::init_cpu(id);
    traps::load();
    apic::init(false);
    let pv = if mmu::SETTINGS.get().mode == mmu::Mode::Native {
        None
    } else {
        Pv::discover()
    };
    {
        let mut m = mmu::this_cpu();
        mmu::configure(&mut m, pv);
        m.switch(vm::kernel_l4());
        m.set_kernel_root(vm::kernel_l4());
        m.enter_lazy();
        m.refill_reserve();
        m.leave_lazy();
    }
    AP_UP.store(id, Ordering::Release);
    sched::ap_loop()
}

core::arch::global_asm!(
    ".section .rodata.trampoline, \"a\"",
    ".code16",
    ".global ap_tramp_start",
    "ap_tramp_start:",
    "    cli",
    "    cld",
    "    mov %cs, %ax",
    "    mov %ax, %ds",
    "    lgdtl (tr_gdtr - ap_tramp_start)",
    "    mov %cr4, %eax",
    "    or $0xa0, %eax",
    "    mov %eax, %cr4",
    "    mov ${pml4}, %eax",
    "    mov %eax, %cr3",
    "    mov $0xc0000080, %ecx",
    "    rdmsr",
    "    or $0x901, %eax",
    "    wrmsr",
    "    mov $0x80010033, %eax",
    "    mov %eax, %cr0",
    "    ljmpl $0x08, ${base} + (tr_long - ap_tramp_start)",
    ".code64",
    "tr_long:",
    "    mov $0x10, %ax",
    "    mov %ax, %ds",
    "    mov %ax, %es",
    "    mov %ax, %ss",
    "    mov %ax, %fs",
    "    mov %ax, %gs",
    "    mov ${base} + (tr_entry - ap_tramp_start), %eax",
    "    mov (%rax), %rax",
    "    jmp *%rax",
    ".balign 8",
    "tr_gdt:",
    "    .quad 0",
    "    .quad 0x00af9a000000ffff",
    "    .quad 0x00cf92000000ffff",
    "tr_gdtr:",
    "    .word 23",
    "    .long {base} + (tr_gdt - ap_tramp_start)",
    ".balign 8",
    "tr_entry:",
    "    .quad ap_entry",
    ".global ap_tramp_end",
    "ap_tramp_end:",
    ".section .text",
    ".global ap_entry",
    "ap_entry:",
    "    mov {stack}(%rip), %rsp",
    "    call {main}",
    "    ud2",
    base = const TRAMPOLINE,
    pml4 = const BOOT_PML4,
    stack = sym AP_STACK,
    main = sym ap_main,
    options(att_syntax)
);
