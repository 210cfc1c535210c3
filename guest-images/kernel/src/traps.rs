//! Traps: the IDT, the entry stubs (syscall, `int 0x80`, the 32 exceptions), the syscall
//! MSRs, and what an exception does: a syscall instruction goes to `syscall`, a user page
//! fault to the process's address space, other user exceptions kill the process, a kernel
//! page fault inside [`probe_write`] resumes after the probe, anything else panics.
//!
//! Shared state: [`IDT`], written once at boot, then read-only. Per-CPU state:
//! [`PROBE_RECOVER`], where a probing kernel store resumes if it faults.

use crate::apic;
use crate::arch::{self, TrapFrame, KCODE, MAX_CPUS};
use crate::mem;
use crate::mmu::{self, DEBUG_FAULTS};
use crate::sched::{self, SIGFPE, SIGILL, SIGSEGV};
use crate::serial::Console;
use crate::sync::PerCpu;
use crate::syscall::{self, SYSCALL_LEN};
use crate::tlb;
use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[repr(C, align(16))]
struct Idt(UnsafeCell<[[u64; 2]; 256]>);

// SAFETY: written only by `init` on the boot CPU before it is loaded and before any other
// CPU runs; read-only (by the CPUs) afterwards.
unsafe impl Sync for Idt {}

/// The interrupt descriptor table, shared by every CPU.
static IDT: Idt = Idt(UnsafeCell::new([[0; 2]; 256]));

/// Where a faulting [`probe_write`] resumes (0: no probe in progress), per CPU.
static PROBE_RECOVER: PerCpu<AtomicU64> = PerCpu::new([const { AtomicU64::new(0) }; MAX_CPUS]);
/// Set by the page-fault handler when it resumed a probe.
static PROBE_FAULTED: PerCpu<AtomicBool> =
    PerCpu::new([const { AtomicBool::new(false) }; MAX_CPUS]);

extern "C" {
    fn syscall_entry();
    fn int80_entry();
    fn irq_entry();
    fn spurious_entry();
    static exc_table: [u64; 32];
}

fn gate(h: u64, ist: u64, kind: u64) -> [u64; 2] {
    [
        (h & 0xffff) | (KCODE << 16) | (ist << 32) | (kind << 40) | (((h >> 16) & 0xffff) << 48),
        h >> 32,
    ]
}

/// Fills and loads the IDT and sets the syscall MSRs (boot CPU, before any trap).
pub fn init() {
    let idt = IDT.0.get();
    // SAFETY: boot, before the IDT is loaded (see Idt); exc_table is the stubs' table.
    unsafe {
        for (v, &h) in exc_table.iter().enumerate() {
            let ist = if v == 8 { 2 } else { 1 };
            (*idt)[v] = gate(h, ist, 0x8e);
        }
        // int 0x80: the syscall gate (DPL 3, no IST: the CPU pushes straight into the
        // current process's trap frame through TSS.RSP0).
        (*idt)[0x80] = gate(int80_entry as *const () as u64, 0, 0xee);
        // IPIs (TLB mailbox, wake-up) and the spurious vector: IST3, so an interrupt taken
        // in the kernel's idle `hlt` never lands on the interrupted stack.
        (*idt)[usize::from(tlb::IPI_VECTOR)] = gate(irq_entry as *const () as u64, 3, 0x8e);
        (*idt)[usize::from(apic::SPURIOUS_VECTOR)] =
            gate(spurious_entry as *const () as u64, 3, 0x8e);
    }
    load();
}

/// Loads the IDT and the syscall MSRs on this CPU (every CPU; `init` fills the IDT once).
pub fn load() {
    let idt = IDT.0.get();
    arch::load_idt(idt as u64, 256);
    // STAR: kernel CS 0x08 (SS 0x10); sysret base 0x10 (SS 0x1b, CS 0x23).
    arch::wrmsr(0xc000_0081, (0x10u64 << 48) | (KCODE << 32));
    arch::wrmsr(0xc000_0082, syscall_entry as *const () as u64);
    // SFMASK: IF, TF, DF, AC.
    arch::wrmsr(0xc000_0084, 0x4_0700);
    let efer = arch::rdmsr(0xc000_0080);
    arch::wrmsr(0xc000_0080, efer | 1);
}

/// An interrupt (vector [`tlb::IPI_VECTOR`]), from user mode or from the idle `hlt`: serve
/// this CPU's TLB mailbox, acknowledge; the stub resumes the interrupted context. A wake-up
/// needs nothing more (the idle loop looks at its run queue after the `hlt`).
extern "C" fn irq_trap(_f: *mut TrapFrame) {
    tlb::poll();
    apic::eoi();
}

/// Writes through `va` at CPL0 and reports whether it faulted.
pub fn probe_write(va: u64) -> bool {
    PROBE_FAULTED.this().store(false, Ordering::Relaxed);
    let slot: *const AtomicU64 = PROBE_RECOVER.this();
    // SAFETY: the page-fault handler resumes at the label when the store faults (it reads
    // this CPU's PROBE_RECOVER, an AtomicU64 with u64's layout); the slot is cleared after.
    unsafe {
        core::arch::asm!(
            "lea {t}, [rip + 2f]",
            "mov [{slot}], {t}",
            "mov qword ptr [{va}], 0",
            "2:",
            "mov qword ptr [{slot}], 0",
            t = out(reg) _,
            va = in(reg) va,
            slot = in(reg) slot,
        );
    }
    PROBE_FAULTED.this().load(Ordering::Relaxed)
}

/// Entered from the exception stubs (on IST1) with the frame they built.
extern "C" fn exception_trap(f: *mut TrapFrame) -> ! {
    // SAFETY: the stub passes the frame it built on this CPU's exception stack.
    let f = unsafe { &mut *f };
    if f.cs & 3 == 3 {
        user_exception(f);
    }
    if f.vector == 14 {
        let rec = PROBE_RECOVER.this().swap(0, Ordering::Relaxed);
        if rec != 0 {
            f.rip = rec;
            PROBE_FAULTED.this().store(true, Ordering::Relaxed);
            arch::resume(f);
        }
    }
    panic!(
        "kernel exception {} err {:#x} at rip {:#x} cr2 {:#x} rsp {:#x}",
        f.vector,
        f.err,
        f.rip,
        arch::read_cr2(),
        f.rsp
    );
}

/// An exception from ring 3: a syscall, a page fault, or a fatal signal.
fn user_exception(f: &TrapFrame) -> ! {
    let (pid, syscall) = {
        let mut t = sched::PROCS.lock();
        let mut m = mmu::this_cpu();
        let c = sched::current();
        t.procs[c].frame = *f;
        let sc = f.vector == 6 && syscall::is_syscall(t.space_of(c), &mut m, f.rip);
        let p = &mut t.procs[c];
        if sc {
            p.frame.rip += SYSCALL_LEN;
        }
        (p.pid, sc)
    };
    if syscall {
        syscall::dispatch();
    }
    if f.vector == 14 {
        user_page_fault(f, pid);
    }
    let sig = match f.vector {
        0 => SIGFPE,
        6 => SIGILL,
        _ => SIGSEGV,
    };
    let _ = writeln!(
        Console,
        "# pid {pid} killed: exception {} at {:#x}",
        f.vector, f.rip
    );
    sched::exit_current(sig)
}

fn user_page_fault(f: &TrapFrame, pid: u64) -> ! {
    let addr = arch::read_cr2();
    let ok = {
        let mut t = sched::PROCS.lock();
        let mut m = mmu::this_cpu();
        let c = sched::current();
        t.procs[c].faults += 1;
        let sp = t.space_of(c);
        if DEBUG_FAULTS.load(Ordering::Relaxed) {
            let pte = sp.pte_ptr(&mut m, addr, false).map(mem::rd).unwrap_or(0);
            let _ = writeln!(
                Console,
                "# debug: fault {:#x} err {:#x} rip {:#x} rsp {:#x} pte {:#x} cpu {}",
                addr,
                f.err,
                f.rip,
                f.rsp,
                pte,
                arch::cpu_id()
            );
        }
        let ok = sp.fault(&mut m, addr, f.err & 2 != 0);
        // The `catch` syscall: the task observes the fault instead of dying (rax = 1 at
        // its resume address).
        let mm = t.procs[c].mm;
        let catch = t.procs[mm].catch;
        if !ok && catch != 0 {
            t.procs[c].frame.rip = catch;
            t.procs[c].frame.rax = 1;
        }
        ok || catch != 0
    };
    if ok {
        sched::return_to_user();
    }
    let _ = writeln!(
        Console,
        "# pid {pid} killed: page fault at {addr:#x} (err {:#x}) rip {:#x}",
        f.err, f.rip
    );
    sched::exit_current(SIGSEGV)
}

global_asm!(
    ".section .text",
    ".global syscall_entry",
    "syscall_entry:",
    "    mov gs:[{scratch}], rsp",
    "    mov rsp, gs:[{frame_top}]",
    "    push 0x1b",
    "    push qword ptr gs:[{scratch}]",
    "    push r11",
    "    push 0x23",
    "    push rcx",
    "    push 0",
    "    push 0x80",
    "    push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
    "    push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
    "    mov rdi, rsp",
    "    mov rsp, gs:[{kstack}]",
    "    call {sys}",
    "    ud2",
    ".global int80_entry",
    "int80_entry:",
    "    push 0",
    "    push 0x80",
    "    push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
    "    push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
    "    mov rdi, rsp",
    "    mov rsp, gs:[{kstack}]",
    "    call {sys}",
    "    ud2",
    ".global irq_entry",
    "irq_entry:",
    "    push 0",
    "    push 0xf0",
    "    push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
    "    push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
    "    mov rdi, rsp",
    "    call {irq}",
    "    pop r15", "pop r14", "pop r13", "pop r12", "pop r11", "pop r10", "pop r9", "pop r8",
    "    pop rbp", "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rbx", "pop rax",
    "    add rsp, 16",
    "    iretq",
    ".global spurious_entry",
    "spurious_entry:",
    "    iretq",
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
    sys = sym syscall::syscall_trap,
    exc = sym exception_trap,
    irq = sym irq_trap,
    scratch = const arch::GS_SCRATCH,
    frame_top = const arch::GS_FRAME_TOP,
    kstack = const arch::GS_KSTACK,
);
