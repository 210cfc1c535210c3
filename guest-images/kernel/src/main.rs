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
    bench(&mut con);
    gdt_setup();
    bench(&mut con);
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

static mut BUF: [u64; 512*8] = [0; 512*8];
fn rdtsc() -> u64 { unsafe { core::arch::x86_64::_rdtsc() } }
#[inline(never)]
fn bench(con: &mut serial::Console) {
    unsafe {
        let p = core::ptr::addr_of_mut!(BUF) as *mut u64;
        let t0 = rdtsc();
        core::arch::asm!("rep stosq", inout("rdi") p => _, inout("rcx") 512u64 => _, in("rax") 0u64);
        let t1 = rdtsc();
        for i in 0..512 { core::ptr::write_volatile(p.add(512+i), 0); }
        let t2 = rdtsc();
        core::arch::asm!("rep movsq", inout("rdi") p.add(1024) => _, inout("rsi") p => _, inout("rcx") 512u64 => _);
        let t3 = rdtsc();
        core::arch::asm!("rep stosb", inout("rdi") p.add(2048) => _, inout("rcx") 4096u64 => _, in("al") 0u8);
        let t4 = rdtsc();
        let mut x = 0u64; for i in 0..1000u64 { x = x.wrapping_add(core::ptr::read_volatile(&i)); }
        let t5 = rdtsc();
        let _ = writeln!(con, "stosq {} loop {} movsq {} stosb {} 1000iter {} {}", t1-t0, t2-t1, t3-t2, t4-t3, t5-t4, x);
        let c = core::arch::x86_64::__cpuid(0x15); let d = core::arch::x86_64::__cpuid(0x16);
        let _ = writeln!(con, "cpuid15 {:x} {:x} {:x} 16 {:x}", c.eax, c.ebx, c.ecx, d.eax);
    }
}

#[repr(C, align(16))]
struct Gdt([u64; 8]);
static mut GDT: Gdt = Gdt([0, 0x00af9a000000ffff, 0x00cf92000000ffff, 0x00cff2000000ffff, 0x00affa000000ffff, 0, 0, 0]);
#[repr(C, align(16))]
struct Tss([u8; 104]);
static mut TSS: Tss = Tss([0; 104]);
fn gdt_setup() {
    unsafe {
        let tss = core::ptr::addr_of!(TSS) as u64;
        let lim = 103u64;
        let lo = lim | ((tss & 0xffffff) << 16) | (0x89u64 << 40) | (((tss >> 24) & 0xff) << 56);
        let hi = tss >> 32;
        GDT.0[5] = lo; GDT.0[6] = hi;
        #[repr(C, packed)] struct D { l: u16, b: u64 }
        let d = D { l: 63, b: core::ptr::addr_of!(GDT) as u64 };
        core::arch::asm!(
            "lgdt [{d}]",
            "push 0x08", "lea {t}, [rip + 2f]", "push {t}", "retfq", "2:",
            "mov ax, 0x10", "mov ds, ax", "mov es, ax", "mov ss, ax", "xor eax, eax", "mov fs, ax", "mov gs, ax",
            "mov ax, 0x28", "ltr ax", "xor eax,eax", "lldt ax",
            d = in(reg) &d, t = out(reg) _, out("rax") _);
    }
}
