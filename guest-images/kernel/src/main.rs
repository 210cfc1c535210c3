//! The bundled pvmm guest kernel: boots on the VMM's 64-bit entry, builds its own page
//! tables (native, or shadowed by the VMM in the PV modes), runs ring-3 selftest programs
//! and reports TAP on COM1, then exits through the EXIT hypercall with the failure count.
//!
//! Module map (an arrow is "uses"; there are no cycles):
//! - `arch`: CPU plumbing, the leaf: layout constants, per-CPU GDT/TSS/GS area, registers,
//!   context switch.
//! - `apic`: the x2APIC: IPIs, INIT/SIPI (-> arch).
//! - `tlb`: loaded roots per CPU, native shootdown mailboxes, wake-ups (-> apic, arch).
//! - `sync`: SpinLock, PerCpu, CpuLocal, Once (-> arch, tlb).
//! - `serial`, `bootinfo`: console, zero page (-> arch); `intrinsics`: memcpy & co.
//! - `mem`: direct map and frame allocator (-> arch, bootinfo, sync).
//! - `pv`: the PV ABI's guest side (-> arch, sync).
//! - `mmu`: native / pv / pv-lazy backends (-> arch, mem, pv, sync, tlb).
//! - `vm`: address spaces (-> arch, mem, mmu, sync).
//! - `elf`: program loading (-> mem, mmu, vm).
//! - `sched`: tasks (processes, threads), per-CPU run queues (-> arch, elf, mmu, sync, tlb,
//!   vm).
//! - `syscall`: the syscall table (-> arch, mem, mmu, sched, serial, sync, tlb, vm).
//! - `traps`: IDT, entry stubs, the IPI gate, exception dispatch (-> apic, arch, mem, mmu,
//!   sched, serial, sync, syscall, tlb).
//! - `hostile`: the hostile selftest (-> arch, mem, mmu, serial, sync, tlb, traps, vm).
//! - `selftest`: the TAP runner (-> arch, hostile, mem, mmu, sched, serial, tlb).
//! - `options`: the command-line table, parser and `help` (-> mmu, selftest).
//! - `smp`: the MP table, the AP trampoline and bring-up (-> apic, arch, mmu, pv, sched,
//!   tlb, traps, vm).
//! - this file: boot, the kernel address space, exit and panic.
#![no_std]
#![no_main]

mod apic;
mod arch;
mod bootinfo;
mod elf;
mod hostile;
mod hostile_stores;
mod intrinsics;
mod mem;
mod mmu;
mod options;
mod pv;
mod sched;
mod selftest;
mod serial;
mod smp;
mod sync;
mod syscall;
mod tlb;
mod traps;
mod vm;

use arch::KERNEL_VMA;
use core::cell::UnsafeCell;
use core::fmt::Write;
use mmu::Mode;
use options::{status, Opts};
use serial::Console;

core::arch::global_asm!(
    ".section .text.boot, \"ax\"",
    ".global _start",
    "_start:",
    "    lea rsp, [rip + {stack} + {size}]",
    "    mov rdi, rsi",
    "    call {main}",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    stack = sym BOOT_STACK,
    size = const STACK_SIZE,
    main = sym kmain,
);

const STACK_SIZE: usize = 64 * 1024;

/// The boot stack: the CPU's stack pointer runs on it; Rust never reads or writes it.
#[repr(align(16))]
struct Stack(#[allow(dead_code)] UnsafeCell<[u8; STACK_SIZE]>);

// SAFETY: only the boot CPU's stack pointer uses it (no Rust references exist).
unsafe impl Sync for Stack {}

static BOOT_STACK: Stack = Stack(UnsafeCell::new([0; STACK_SIZE]));

extern "C" {
    static __kernel_end: u8;
}

extern "C" fn kmain(zero_page: u64) -> ! {
    let t_boot = arch::rdtsc();
    arch::init_cpu(0);
    traps::init();
    let info = bootinfo::BootInfo::read(zero_page + KERNEL_VMA);
    banner(&info);
    let pv = pv::Pv::discover();
    // The command line is only mapped until the kernel switches tables: parse it now.
    let cmdline = match info.cmdline {
        Ok(c) => c,
        Err(e) => bail(pv, format_args!("{e}")),
    };
    if options::wants_help(cmdline) {
        let _ = options::print_help(&mut Console);
        finish(pv, status::PASS)
    }
    let opts = match options::parse(cmdline) {
        Ok(o) => o,
        Err(e) => bail(pv, format_args!("{e}")),
    };
    if !apic::has_x2apic() {
        bail(
            pv,
            format_args!("the CPU offers no x2APIC (needed for SMP bring-up)"),
        );
    }
    apic::init(true);
    // The MP table and the trampoline's page are only mapped until the switch too.
    let cpus = smp::find_cpus(apic::id());
    smp::install_trampoline();
    setup_mmu(&opts, pv);
    // Physical memory above the kernel image (and never the first 2 MiB: it is mapped
    // with 4 KiB pages, page tables must not live there).
    let kend = core::ptr::addr_of!(__kernel_end) as u64 - KERNEL_VMA;
    mem::init(&info, kend.max(2 << 20));
    build_kernel_space(&info);
    {
        // PV: the reserve of zeroed page-table frames, zeroed in one batch.
        let mut m = mmu::this_cpu();
        m.set_kernel_root(vm::kernel_l4());
        m.enter_lazy();
        m.refill_reserve();
        m.leave_lazy();
    }
    let online = smp::start_aps(&cpus);
    print_config(&opts, online, arch::rdtsc() - t_boot);
    let failures = selftest::run(opts.tests, opts.pages, opts.seed);
    let p = mmu::this_cpu().pv.take();
    let code = opts
        .exit
        .unwrap_or(failures.min(u32::from(status::MAX_FAILURES)) as u8);
    finish(p, code)
}

fn banner(info: &bootinfo::BootInfo) {
    let _ = writeln!(
        Console,
        "pvmm-guest {}: booted, cmdline: {}",
        env!("CARGO_PKG_VERSION"),
        info.cmdline.unwrap_or("")
    );
    let _ = writeln!(Console, "e820: {} entries", info.e820_count);
    for e in info.e820() {
        let _ = writeln!(
            Console,
            "  [{:#012x}-{:#012x}) {}",
            e.addr,
            e.addr + e.size,
            if e.kind == 1 { "usable" } else { "reserved" }
        );
    }
}

/// Refuses to run: a TAP `Bail out!` line, then the exit with [`status::BAD_CMDLINE`].
fn bail(pv: Option<pv::Pv>, why: core::fmt::Arguments<'_>) -> ! {
    let _ = writeln!(Console, "TAP version 13\nBail out! {why}");
    finish(pv, status::BAD_CMDLINE)
}

/// Configures this CPU's MMU backend from the options.
fn setup_mmu(opts: &Opts, pv: Option<pv::Pv>) {
    if let Some(p) = &pv {
        let _ = writeln!(
            Console,
            "# pv: transport {}, abi {:#x}, features {:#x}",
            p.transport_name(),
            p.version(),
            p.features()
        );
    }
    if opts.mode != Mode::Native {
        let ok = pv
            .as_ref()
            .is_some_and(|p| p.features() & hypercall::features::MMU_BATCH != 0);
        if !ok {
            let _ = writeln!(
                Console,
                "TAP version 13\nBail out! mmu={} needs MMU_BATCH, which this VMM does not offer",
                opts.mode.name()
            );
            finish(pv, status::NO_MMU_BATCH);
        }
    }
    mmu::SETTINGS.set(mmu::Settings {
        mode: opts.mode,
        batch: opts.lazy_batch,
        zero_vmm: opts.zero_vmm,
        copy_vmm: opts.copy_vmm,
        fault_around: opts.fault_around,
    });
    let pv = select_pt_writes(opts.mode, pv);
    let mut m = mmu::this_cpu();
    mmu::configure(&mut m, pv);
    if opts.drop_update {
        m.drop_after = 1 + opts.drop_at;
    }
    if opts.no_shootdown {
        tlb::NO_SHOOTDOWN.store(true, core::sync::atomic::Ordering::Relaxed);
    }
    if opts.debug_faults {
        mmu::DEBUG_FAULTS.store(true, core::sync::atomic::Ordering::Relaxed);
    }
}

/// emulate/wrpt: asks the VMM to trap page-table stores (PT_WRITES) before any table
/// exists; refuses to run with a clear reason where it cannot.
fn select_pt_writes(mode: Mode, mut pv: Option<pv::Pv>) -> Option<pv::Pv> {
    if !mode.plain_stores() {
        return pv;
    }
    let status = match pv.as_mut() {
        Some(p) if p.features() & hypercall::features::PT_TRAP != 0 => {
            p.call(hypercall::op::PT_WRITES, [mode.pt_writes(), 0, 0, 0])
                .0
        }
        _ => -38,
    };
    if status != 0 {
        let _ = writeln!(
            Console,
            "TAP version 13\nBail out! mmu={} needs the VMM to trap page-table stores (feature PT_TRAP), which it does not offer here (PT_WRITES status {status})",
            mode.name()
        );
        finish(pv, status::NO_MMU_BATCH);
    }
    pv
}

fn print_config(opts: &Opts, cpus: usize, boot_cycles: u64) {
    let by = |vmm: bool| {
        if vmm && opts.mode != Mode::Native {
            "vmm"
        } else {
            "cpu"
        }
    };
    let (zero, copy) = (by(opts.zero_vmm), by(opts.copy_vmm));
    let _ = writeln!(
        Console,
        "# mmu={} lazy_batch={} zero={zero} copy={copy} ram_end={:#x} free_frames={} boot_cycles={boot_cycles} fault_around={} cpus={cpus} lazy_tlb={}",
        opts.mode.name(),
        opts.lazy_batch,
        mem::ram_end(),
        mem::free_count(),
        opts.fault_around,
        u8::from(mmu::this_cpu().lazy_tlb()),
    );
    if opts.drop_update {
        let _ = writeln!(
            Console,
            "# break=drop_update: the pv-lazy backend will drop one queued PT_UPDATE"
        );
    }
}

/// Ends the VM with `code` (EXIT hypercall, else an i8042 reset).
fn finish(pv: Option<pv::Pv>, code: u8) -> ! {
    if let Some(p) = pv {
        p.exit(code);
    }
    let _ = writeln!(
        Console,
        "no PV interface: exiting via i8042 reset (status {code})"
    );
    serial::reset()
}

/// Builds the kernel's L4: the direct map of RAM (L4 slot 273) and the kernel window
/// (top 2 GiB) over RAM, both with plain writes into fresh frames; then loads it (native:
/// `mov cr3`; PV: PIN_L4 + NEW_BASEPTR).
fn build_kernel_space(info: &bootinfo::BootInfo) {
    let mut alloc_table = || {
        let f = mem::alloc();
        arch::zero_page(mem::va(f));
        f
    };
    let l4 = alloc_table();
    // Before the switch only the boot tables are live: physical memory is reached through
    // the kernel window (KERNEL_VMA + pa), which the boot tables map for the low 2 GiB.
    for e in info.e820() {
        if e.kind != 1 {
            continue;
        }
        let s = e.addr.max(2 << 20);
        let end = (e.addr + e.size).min((mem::MAX_FRAMES as u64) << 12);
        if s < end {
            vm::boot_map(l4, mem::DMAP, s, end, &mut alloc_table);
        }
        // The kernel window: the image (from 1 MiB) and RAM below 1 GiB.
        let ks = e.addr.max(1 << 20);
        let kend = (e.addr + e.size).min(1 << 30);
        if ks < kend {
            vm::boot_map(l4, KERNEL_VMA, ks, kend, &mut alloc_table);
        }
    }
    vm::set_kernel_half(l4);
    tlb::init_boot(l4);
    let mut m = mmu::this_cpu();
    if m.is_pv() {
        m.pin_l4(l4);
    }
    m.switch(l4);
    mem::use_dmap();
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let _ = writeln!(Console, "\nBail out! kernel panic: {info}");
    // The MMU state may be borrowed by the code that panicked: then discover afresh.
    let pv = mmu::try_this_cpu()
        .and_then(|mut m| m.pv.take())
        .or_else(pv::Pv::discover);
    finish(pv, status::PANIC)
}
