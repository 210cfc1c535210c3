//! x86-64 plumbing: GDT/TSS/IDT, syscall MSRs, trap entry/exit stubs and small helpers.
//!
//! Every exception is delivered on an IST stack (the interrupted kernel stack may have a
//! live red zone). `syscall` saves the user registers straight into the current process's
//! trap frame; every return to ring 3 is an `iretq` from a trap frame.

use core::arch::{asm, global_asm};

/// Kernel code selector.
pub const KCODE: u64 = 0x08;
/// Kernel data selector.
pub const KDATA: u64 = 0x10;
/// User data selector (RPL 3).
pub const UDATA: u64 = 0x18 | 3;
/// User code selector (RPL 3).
pub const UCODE: u64 = 0x20 | 3;
const TSS_SEL: u16 = 0x28;

/// Saved user (or interrupted kernel) state. Layout is shared with the asm stubs.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub err: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[repr(C, align(16))]
struct Gdt([u64; 7]);
static mut GDT: Gdt = Gdt([
    0,
    0x00af_9a00_0000_ffff, // kernel code
    0x00cf_9200_0000_ffff, // kernel data
    0x00cf_f200_0000_ffff, // user data
    0x00af_fa00_0000_ffff, // user code
    0,
    0,
]);

#[repr(C, packed)]
struct Tss {
    _r0: u32,
    rsp: [u64; 3],
    _r1: u64,
    ist: [u64; 7],
    _r2: u64,
    _r3: u16,
    iomap: u16,
}
static mut TSS: Tss = Tss {
    _r0: 0,
    rsp: [0; 3],
    _r1: 0,
    ist: [0; 7],
    _r2: 0,
    _r3: 0,
    iomap: 104,
};

#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);
static mut IDT: Idt = Idt([[0; 2]; 256]);

const STACK: usize = 32 * 1024;
#[repr(C, align(16))]
struct Stack([u8; STACK]);
/// Stack for syscalls.
static mut SYSCALL_STACK: Stack = Stack([0; STACK]);
/// IST1: every exception.
static mut EXC_STACK: Stack = Stack([0; STACK]);
/// IST2: double fault.
static mut DF_STACK: Stack = Stack([0; STACK]);

/// Top of the syscall stack (read by the syscall stub).
#[no_mangle]
static mut KSTACK_TOP: u64 = 0;
/// End of the current process's trap frame (read by the syscall stub).
#[no_mangle]
static mut CUR_FRAME_TOP: u64 = 0;
#[no_mangle]
static mut USER_RSP_SCRATCH: u64 = 0;

#[repr(C, packed)]
struct Dtr {
    limit: u16,
    base: u64,
}

extern "C" {
    fn syscall_entry();
    fn int80_entry();
    static exc_table: [u64; 32];
}

/// Loads GDT, TSS, IDT and the syscall MSRs.
pub fn init() {
    // SAFETY: single CPU, run once at boot with interrupts off.
    unsafe {
        let tss = core::ptr::addr_of!(TSS) as u64;
        GDT.0[5] = 103 | ((tss & 0xff_ffff) << 16) | (0x89u64 << 40) | (((tss >> 24) & 0xff) << 56);
        GDT.0[6] = tss >> 32;
        let top = |s: *const Stack| s as u64 + STACK as u64;
        KSTACK_TOP = top(core::ptr::addr_of!(SYSCALL_STACK));
        TSS.rsp[0] = KSTACK_TOP;
        TSS.ist[0] = top(core::ptr::addr_of!(EXC_STACK));
        TSS.ist[1] = top(core::ptr::addr_of!(DF_STACK));
        let g = Dtr {
            limit: 7 * 8 - 1,
            base: core::ptr::addr_of!(GDT) as u64,
        };
        asm!(
            "lgdt [{g}]",
            "push 0x08",
            "lea {t}, [rip + 2f]",
            "push {t}",
            "retfq",
            "2:",
            "mov ax, 0x10",
            "mov ds, ax",
            "mov es, ax",
            "mov ss, ax",
            "xor eax, eax",
            "mov fs, ax",
            "mov gs, ax",
            "lldt ax",
            "mov ax, {tss}",
            "ltr ax",
            g = in(reg) &g,
            t = out(reg) _,
            tss = const TSS_SEL,
            out("rax") _,
        );
        for v in 0..32 {
            let h = exc_table[v];
            let ist = if v == 8 { 2 } else { 1 };
            IDT.0[v][0] = (h & 0xffff)
                | (KCODE << 16)
                | ((ist as u64) << 32)
                | (0x8eu64 << 40)
                | (((h >> 16) & 0xffff) << 48);
            IDT.0[v][1] = h >> 32;
        }
        // int 0x80: the syscall gate (DPL 3, no IST: the CPU pushes straight into the
        // current process's trap frame through TSS.RSP0).
        let h = int80_entry as *const () as u64;
        IDT.0[0x80][0] =
            (h & 0xffff) | (KCODE << 16) | (0xeeu64 << 40) | (((h >> 16) & 0xffff) << 48);
        IDT.0[0x80][1] = h >> 32;
        let i = Dtr {
            limit: 256 * 16 - 1,
            base: core::ptr::addr_of!(IDT) as u64,
        };
        asm!("lidt [{}]", in(reg) &i);
        // STAR: kernel CS 0x08 (SS 0x10); sysret base 0x10 (SS 0x1b, CS 0x23).
        wrmsr(0xc000_0081, (0x10u64 << 48) | (KCODE << 32));
        wrmsr(0xc000_0082, syscall_entry as *const () as u64);
        // SFMASK: IF, TF, DF, AC.
        wrmsr(0xc000_0084, 0x4_0700);
        let efer = rdmsr(0xc000_0080);
        wrmsr(0xc000_0080, efer | 1);
    }
}

/// Sets where the syscall stub saves user registers.
pub fn set_frame(frame: *mut TrapFrame) {
    // SAFETY: a plain store read by the stub.
    unsafe {
        CUR_FRAME_TOP = frame as u64 + core::mem::size_of::<TrapFrame>() as u64;
        TSS.rsp[0] = CUR_FRAME_TOP;
    }
}

/// `wrmsr`.
pub fn wrmsr(msr: u32, v: u64) {
    // SAFETY: kernel-only MSR writes at boot.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32) };
}

/// `rdmsr`.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading an architectural MSR.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// `mov cr3` (native mode only).
pub fn write_cr3(v: u64) {
    // SAFETY: the caller passes a valid L4 with the kernel half mapped.
    unsafe { asm!("mov cr3, {}", in(reg) v, options(nostack)) };
}

/// `mov rax, cr2`.
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack)) };
    v
}

/// `invlpg`.
pub fn invlpg(va: u64) {
    // SAFETY: a TLB invalidation.
    unsafe { asm!("invlpg [{}]", in(reg) va, options(nostack)) };
}

/// Zeroes one 4 KiB page at `va`.
pub fn zero_page(va: u64) {
    // SAFETY: the caller owns the page.
    unsafe {
        asm!("rep stosq", inout("rdi") va => _, inout("rcx") 512u64 => _, in("rax") 0u64,
             options(nostack))
    };
}

/// Copies one 4 KiB page.
pub fn copy_page(dst: u64, src: u64) {
    // SAFETY: the caller owns both pages.
    unsafe {
        asm!("rep movsq", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") 512u64 => _,
             options(nostack))
    };
}

/// Resumes the context in `frame` (never returns).
pub fn resume(frame: *const TrapFrame) -> ! {
    // SAFETY: the frame holds a complete context; the stack pointer moves onto it.
    unsafe {
        asm!(
            "mov rsp, {f}",
            "pop r15", "pop r14", "pop r13", "pop r12", "pop r11", "pop r10", "pop r9", "pop r8",
            "pop rbp", "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rbx", "pop rax",
            "add rsp, 16",
            "iretq",
            f = in(reg) frame,
            options(noreturn)
        )
    }
}

/// Resumes a ring-3 context with `sysretq` (clobbers the user's rcx and r11).
pub fn resume_sysret(frame: *const TrapFrame) -> ! {
    // SAFETY: as resume; the frame is a ring-3 context.
    unsafe {
        asm!(
            "mov rsp, {f}",
            "pop r15", "pop r14", "pop r13", "pop r12", "pop r11", "pop r10", "pop r9", "pop r8",
            "pop rbp", "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rbx", "pop rax",
            "mov rcx, [rsp + 16]",
            "mov r11, [rsp + 32]",
            "mov rsp, [rsp + 40]",
            "sysretq",
            f = in(reg) frame,
            options(noreturn)
        )
    }
}

// Runner context: the kernel's own thread that starts processes and gets control back
// when none is runnable.
#[no_mangle]
static mut RUNNER_RSP: u64 = 0;

/// Saves the runner's callee-saved context and jumps to `entry` (which never returns);
/// returns when [`back_to_runner`] is called.
pub fn run_from_runner(entry: u64) {
    // SAFETY: saves callee-saved registers on the runner stack, restored by back_to_runner.
    unsafe {
        asm!(
            "push rbx", "push rbp", "push r12", "push r13", "push r14", "push r15",
            "lea rax, [rip + 2f]",
            "push rax",
            "mov [rip + RUNNER_RSP], rsp",
            "mov rsp, [rip + KSTACK_TOP]",
            "jmp {f}",
            "2:",
            "pop r15", "pop r14", "pop r13", "pop r12", "pop rbp", "pop rbx",
            f = in(reg) entry,
            out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
        )
    }
}

/// Returns control to the runner (never returns).
pub fn back_to_runner() -> ! {
    // SAFETY: RUNNER_RSP was saved by run_from_runner.
    unsafe { asm!("mov rsp, [rip + RUNNER_RSP]", "ret", options(noreturn)) }
}

global_asm!(
    ".section .text",
    ".global syscall_entry",
    "syscall_entry:",
    "    mov [rip + USER_RSP_SCRATCH], rsp",
    "    mov rsp, [rip + CUR_FRAME_TOP]",
    "    push 0x1b",
    "    push qword ptr [rip + USER_RSP_SCRATCH]",
    "    push r11",
    "    push 0x23",
    "    push rcx",
    "    push 0",
    "    push 0x80",
    "    push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
    "    push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
    "    mov rdi, rsp",
    "    mov rsp, [rip + KSTACK_TOP]",
    "    call {sys}",
    "    ud2",
    ".global int80_entry",
    "int80_entry:",
    "    push 0",
    "    push 0x80",
    "    push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
    "    push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
    "    mov rdi, rsp",
    "    mov rsp, [rip + KSTACK_TOP]",
    "    call {sys}",
    "    ud2",
    "exc_common:",
    "    push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
    "    push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
    "    mov rdi, rsp",
    "    call {exc}",
    "    ud2",
    ".macro EXC_NOERR n",
    "exc_\\n:",
    "    push 0",
    "    push \\n",
    "    jmp exc_common",
    ".endm",
    ".macro EXC_ERR n",
    "exc_\\n:",
    "    push \\n",
    "    jmp exc_common",
    ".endm",
    "EXC_NOERR 0", "EXC_NOERR 1", "EXC_NOERR 2", "EXC_NOERR 3", "EXC_NOERR 4", "EXC_NOERR 5",
    "EXC_NOERR 6", "EXC_NOERR 7", "EXC_ERR 8", "EXC_NOERR 9", "EXC_ERR 10", "EXC_ERR 11",
    "EXC_ERR 12", "EXC_ERR 13", "EXC_ERR 14", "EXC_NOERR 15", "EXC_NOERR 16", "EXC_ERR 17",
    "EXC_NOERR 18", "EXC_NOERR 19", "EXC_NOERR 20", "EXC_ERR 21", "EXC_NOERR 22",
    "EXC_NOERR 23", "EXC_NOERR 24", "EXC_NOERR 25", "EXC_NOERR 26", "EXC_NOERR 27",
    "EXC_NOERR 28", "EXC_ERR 29", "EXC_ERR 30", "EXC_NOERR 31",
    ".section .rodata",
    ".balign 8",
    ".global exc_table",
    "exc_table:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .quad exc_\\n",
    ".endr",
    ".section .text",
    sys = sym crate::proc::syscall_trap,
    exc = sym crate::proc::exception_trap,
);
