//! The bundled pvmm guest kernel: boots on the VMM's 64-bit entry, builds its own page
//! tables (native, or shadowed by the VMM in the PV modes), runs ring-3 selftest programs
//! and reports TAP on COM1, then exits through the EXIT hypercall with the failure count.
#![no_std]
#![no_main]

mod arch;
mod bootinfo;
mod mem;
mod mmu;
mod proc;
mod pv;
mod selftest;
mod serial;
mod vm;

use core::fmt::Write;
use mmu::{mmu, Mode};

/// Virtual address where physical 0 is mapped (the kernel's top-2-GiB window).
pub const KERNEL_VMA: u64 = 0xffff_ffff_8000_0000;

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
#[repr(align(16))]
struct Stack(#[allow(dead_code)] [u8; STACK_SIZE]);
static mut BOOT_STACK: Stack = Stack([0; STACK_SIZE]);

extern "C" {
    static __kernel_end: u8;
}

/// Command-line options.
pub struct Opts {
    pub mode: Mode,
    pub pages: u64,
    pub seed: u64,
    pub tests: [u8; 256],
    pub tests_len: usize,
}

static mut CMDLINE: [u8; 1024] = [0; 1024];
static mut CMDLINE_LEN: usize = 0;

fn cmdline() -> &'static str {
    // SAFETY: written once at boot.
    unsafe { core::str::from_utf8(&CMDLINE[..CMDLINE_LEN]).unwrap_or("") }
}

fn arg(key: &str) -> Option<&'static str> {
    cmdline()
        .split(' ')
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn arg_u64(key: &str) -> Option<u64> {
    arg(key).and_then(|v| v.parse().ok())
}

extern "C" fn kmain(zero_page: u64) -> ! {
    let t_boot = arch::rdtsc();
    let mut con = serial::Console;
    arch::init();
    let info = bootinfo::BootInfo::read(zero_page + KERNEL_VMA);
    // SAFETY: boot, single CPU.
    unsafe {
        let n = info.cmdline.len().min(1024);
        CMDLINE[..n].copy_from_slice(&info.cmdline.as_bytes()[..n]);
        CMDLINE_LEN = n;
    }
    let _ = writeln!(
        con,
        "pvmm-guest {}: booted, cmdline: {}",
        env!("CARGO_PKG_VERSION"),
        cmdline()
    );
    let _ = writeln!(con, "e820: {} entries", info.e820_count);
    for e in info.e820() {
        let _ = writeln!(
            con,
            "  [{:#012x}-{:#012x}) {}",
            e.addr,
            e.addr + e.size,
            if e.kind == 1 { "usable" } else { "reserved" }
        );
    }
    let mode = match arg("mmu") {
        Some("pv") => Mode::Pv,
        Some("pv-lazy") => Mode::PvLazy,
        _ => Mode::Native,
    };
    let pv = pv::Pv::discover();
    let m = mmu();
    m.mode = mode;
    m.batch = arg_u64("lazy_batch")
        .unwrap_or(1024)
        .clamp(1, mmu::QMAX as u64) as usize;
    m.zero_vmm = arg("zero") != Some("cpu");
    if let Some(p) = &pv {
        let _ = writeln!(
            con,
            "# pv: transport {}, abi {:#x}, features {:#x}",
            p.transport_name(),
            p.version(),
            p.features()
        );
    }
    if mode != Mode::Native {
        let ok = pv
            .as_ref()
            .is_some_and(|p| p.features() & hypercall::features::MMU_BATCH != 0);
        if !ok {
            let _ = writeln!(con, "TAP version 13\n1..0\nBail out! mmu={} needs MMU_BATCH, which this VMM does not offer", mode.name());
            finish(pv, 1);
        }
    }
    m.pv = pv;
    if arg("debug_faults").is_some() {
        mmu::DEBUG_FAULTS.store(true, core::sync::atomic::Ordering::Relaxed);
    }

    // Physical memory above the kernel image (and never the first 2 MiB: it is mapped
    // with 4 KiB pages, page tables must not live there).
    // SAFETY: linker symbol.
    let kend = unsafe { core::ptr::addr_of!(__kernel_end) } as u64 - KERNEL_VMA;
    mem::init(&info, kend.max(2 << 20));
    build_kernel_space(&info);
    let t_ready = arch::rdtsc();
    let _ = writeln!(
        con,
        "# mmu={} lazy_batch={} zero={} ram_end={:#x} free_frames={} boot_cycles={}",
        mode.name(),
        m.batch,
        if m.zero_vmm && mode != Mode::Native {
            "vmm"
        } else {
            "cpu"
        },
        // SAFETY: set at boot.
        unsafe { mem::RAM_END },
        mem::free_count(),
        t_ready - t_boot
    );
    if arg("break") == Some("drop_update") {
        m.drop_after = 1 + arg_u64("drop_at").unwrap_or(3);
        let _ = writeln!(
            con,
            "# break=drop_update: the pv-lazy backend will drop one queued PT_UPDATE"
        );
    }
    let opts_tests = arg("selftest").unwrap_or("all");
    let failures = selftest::run(
        opts_tests,
        arg_u64("pages").unwrap_or(256).max(1),
        arg_u64("seed").unwrap_or(0x1234_5678),
    );
    let p = mmu().pv.take();
    // `exit=N` overrides the status (used to test that the VMM passes it through).
    let status = arg_u64("exit").map_or(failures.min(255) as u8, |c| c.min(255) as u8);
    finish(p, status)
}

fn finish(pv: Option<pv::Pv>, code: u8) -> ! {
    if let Some(p) = pv {
        p.exit(code);
    }
    let _ = writeln!(
        serial::Console,
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
    // SAFETY: boot, single CPU; the new tables map everything the kernel uses.
    unsafe {
        vm::KERNEL_L4 = l4;
        vm::NKHALF = 0;
        for i in 256..512 {
            let v = mem::rd(l4 + 8 * i as u64);
            if v != 0 {
                vm::KHALF[vm::NKHALF] = (i, v);
                vm::NKHALF += 1;
            }
        }
    }
    let m = mmu();
    if m.is_pv() {
        m.pin_l4(l4);
    }
    m.cur_l4 = 0;
    m.switch(l4);
    mem::use_dmap();
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let _ = writeln!(serial::Console, "\nBail out! kernel panic: {info}");
    // SAFETY: single CPU; the panic path owns the MMU state now.
    let pv = unsafe { (*core::ptr::addr_of_mut!(mmu::MMU)).pv.take() }.or_else(pv::Pv::discover);
    finish(pv, 255)
}

// The compiler's memory intrinsics (no libc here).
#[no_mangle]
unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    core::arch::asm!("rep movsq", "mov rcx, {r}", "rep movsb", r = in(reg) n & 7,
        inout("rdi") d => _, inout("rsi") s => _, inout("rcx") n / 8 => _, options(nostack));
    d
}
#[no_mangle]
unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) <= (s as usize) || (d as usize) >= (s as usize) + n {
        memcpy(d, s, n)
    } else {
        core::arch::asm!("std", "rep movsb", "cld", inout("rdi") d.add(n - 1) => _,
            inout("rsi") s.add(n - 1) => _, inout("rcx") n => _, options(nostack));
        d
    }
}
#[no_mangle]
unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    core::arch::asm!("rep stosb", inout("rdi") d => _, inout("rcx") n => _, in("al") c as u8,
        options(nostack));
    d
}
#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = (
            core::ptr::read_volatile(a.add(i)),
            core::ptr::read_volatile(b.add(i)),
        );
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}
#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}
