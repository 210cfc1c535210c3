//! The bundled pvmm guest kernel: boots on the VMM's 64-bit entry, prints a banner with
//! its command line and e820 map, discovers the PV ABI and exits with a status.
#![no_std]
#![no_main]

mod bootinfo;
mod pv;
mod serial;

use core::fmt::Write;

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

extern "C" fn kmain(zero_page: u64) -> ! {
    let mut con = serial::Console;
    let info = bootinfo::BootInfo::read(zero_page + KERNEL_VMA);
    let _ = writeln!(con, "pvmm-guest {}: booted", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(con, "cmdline: {}", info.cmdline);
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
    let status = match pv::Pv::discover() {
        Some(p) => {
            let _ = writeln!(
                con,
                "pv: transport {}, abi {:#x}, features {:#x}",
                p.transport_name(),
                p.version(),
                p.features()
            );
            let code = info.arg_u64("exit").unwrap_or(0) as u8;
            p.exit(code)
        }
        None => {
            let _ = writeln!(con, "pv: no pvmm signature, running natively");
            0
        }
    };
    let _ = writeln!(con, "exiting via i8042 reset (status {status})");
    serial::reset()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let _ = writeln!(serial::Console, "PANIC: {info}");
    pv::Pv::discover().map(|p| p.exit(255));
    serial::reset()
}
