//! x86-64 CPU plumbing, the leaf of the kernel (it uses no other kernel module): the layout
//! constants, segment selectors, each CPU's GDT, TSS and trap stacks, control registers and
//! MSRs, TLB and page helpers, the trap-frame layout and the context-switch primitives.
//!
//! Every exception is delivered on an IST stack (the interrupted kernel stack may have a
//! live red zone). Every return to ring 3 is an `iretq` or `sysretq` from a trap frame.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

/// Virtual address where physical 0 is mapped (the kernel's top-2-GiB window).
pub const KERNEL_VMA: u64 = 0xffff_ffff_8000_0000;

/// CPUs the kernel brings up at most (the VMM's `--vcpus` limit). Every per-CPU array is
/// sized by it.
pub const MAX_CPUS: usize = 64;

/// The calling CPU's index (< [`MAX_CPUS`]): word 0 of its GS-based [`CpuArea`]. User code
/// never changes GS (the kernel uses no `swapgs`), so it holds in every kernel context.
#[inline(always)]
pub fn cpu_id() -> usize {
    let v: u64;
    // SAFETY: GS points at this CPU's CpuArea from `init_cpu` on (the first thing each CPU
    // does); word 0 is its id.
    unsafe { asm!("mov {}, gs:[0]", out(reg) v, options(nostack, readonly, preserves_flags)) };
    v as usize
}

/// Kernel code selector.
pub const KCODE: u64 = 0x08;
/// Kernel data selector.
pub const KDATA: u64 = 0x10;
/// User data selector (RPL 3).
pub const UDATA: u64 = 0x18 | 3;
/// User code selector (RPL 3).
pub const UCODE: u64 = 0x20 | 3;
const TSS_SEL: u16 = 0x28;

/// Saved user (or interrupted kernel) state. Layout is shared with the asm stubs: general
/// registers in push order, then vector and error code, then the CPU's iretq frame.
#[repr(C)]
#[derive(Clone, Copy, Default)]
#[allow(missing_docs)] // the registers are their own documentation
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
    /// Exception vector (0x80 for a syscall).
    pub vector: u64,
    /// Error code (0 where the CPU pushes none).
    pub err: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl TrapFrame {
    /// All registers zero.
    pub const ZERO: TrapFrame = TrapFrame {
        r15: 0,
        r14: 0,
        r13: 0,
        r12: 0,
        r11: 0,
        r10: 0,
        r9: 0,
        r8: 0,
        rbp: 0,
        rdi: 0,
        rsi: 0,
        rdx: 0,
        rcx: 0,
        rbx: 0,
        rax: 0,
        vector: 0,
        err: 0,
        rip: 0,
        cs: 0,
        rflags: 0,
        rsp: 0,
        ss: 0,
    };
}

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

/// One CPU's descriptor tables.
#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 7],
    tss: Tss,
}

const STACK: usize = 32 * 1024;

const SMALL_STACK: usize = 16 * 1024;

/// One CPU's kernel stacks: syscalls and the runner's processes (an AP's boot stack too),
/// IST1 (every exception), IST2 (double fault), IST3 (interrupts: IPIs, spurious).
#[repr(C, align(16))]
struct Stacks {
    syscall: [u8; STACK],
    exc: [u8; STACK],
    df: [u8; SMALL_STACK],
    irq: [u8; SMALL_STACK],
}

/// Memory of one CPU that only that CPU touches: `init_cpu` fills the tables before the CPU
/// loads them; afterwards the CPU reads them and runs on the stacks; the only later Rust
/// write is the TSS's RSP0, again by its own CPU ([`set_user_entry`]).
struct CpuOwned<T>(UnsafeCell<T>);

// SAFETY: see CpuOwned: each element is used by one CPU only.
unsafe impl<T> Sync for CpuOwned<T> {}

const GDT: [u64; 7] = [
    0,
    0x00af_9a00_0000_ffff, // kernel code
    0x00cf_9200_0000_ffff, // kernel data
    0x00cf_f200_0000_ffff, // user data
    0x00af_fa00_0000_ffff, // user code
    0,                     // TSS (two slots), filled in by init_cpu
    0,
];

static TABLES: [CpuOwned<Tables>; MAX_CPUS] = [const {
    CpuOwned(UnsafeCell::new(Tables {
        gdt: GDT,
        tss: Tss {
            _r0: 0,
            rsp: [0; 3],
            _r1: 0,
            ist: [0; 7],
            _r2: 0,
            _r3: 0,
            iomap: 104,
        },
    }))
}; MAX_CPUS];

/// Kept apart from TABLES so that the stacks stay in .bss.
static STACKS: [CpuOwned<Stacks>; MAX_CPUS] = [const {
    CpuOwned(UnsafeCell::new(Stacks {
        syscall: [0; STACK],
        exc: [0; STACK],
        df: [0; SMALL_STACK],
        irq: [0; SMALL_STACK],
    }))
}; MAX_CPUS];

/// The words of one CPU that the entry stubs (`traps`) and the runner switch read through
/// GS (`gs:[offset]`); GS base points at the CPU's own area. Only that CPU reads or writes
/// it, so plain atomics suffice.
#[repr(C)]
pub struct CpuArea {
    /// gs:0: the CPU's index.
    id: AtomicU64,
    /// gs:8: top of the syscall stack (the kernel stack of syscalls and the runner).
    kstack_top: AtomicU64,
    /// gs:16: end of the current task's trap frame (the syscall stub pushes there).
    cur_frame_top: AtomicU64,
    /// gs:24: the user stack pointer while the syscall stub switches stacks.
    user_rsp_scratch: AtomicU64,
    /// gs:32: the runner's saved stack pointer (see [`run_from_runner`]).
    runner_rsp: AtomicU64,
    /// The frame [`resume`] returns to user mode from: a copy taken under the process-table
    /// lock, so that no other CPU's writes to the task's saved frame can race the return.
    frame: UnsafeCell<TrapFrame>,
}

/// Offset of `kstack_top` in [`CpuArea`] (for the entry stubs).
pub const GS_KSTACK: usize = 8;
/// Offset of `cur_frame_top`.
pub const GS_FRAME_TOP: usize = 16;
/// Offset of `user_rsp_scratch`.
pub const GS_SCRATCH: usize = 24;
/// Offset of `runner_rsp`.
pub const GS_RUNNER: usize = 32;

// SAFETY: each area is used by its own CPU only (the atomics by definition; `frame` is
// written and read by its CPU with interrupts off).
unsafe impl Sync for CpuArea {}

static AREAS: [CpuArea; MAX_CPUS] = [const {
    CpuArea {
        id: AtomicU64::new(0),
        kstack_top: AtomicU64::new(0),
        cur_frame_top: AtomicU64::new(0),
        user_rsp_scratch: AtomicU64::new(0),
        runner_rsp: AtomicU64::new(0),
        frame: UnsafeCell::new(TrapFrame::ZERO),
    }
}; MAX_CPUS];

/// Top of CPU `cpu`'s syscall stack (an AP starts on it).
pub fn kstack_top(cpu: usize) -> u64 {
    let s = STACKS[cpu].0.get();
    // SAFETY: only the address of the array is taken.
    unsafe { core::ptr::addr_of!((*s).syscall) as u64 + STACK as u64 }
}

/// Copies `f` into this CPU's resume frame and returns its address (for [`resume`]).
pub fn stage_frame(f: &TrapFrame) -> *const TrapFrame {
    let p = AREAS[cpu_id()].frame.get();
    // SAFETY: this CPU's own area, interrupts off: nothing else reaches it.
    unsafe { p.write(*f) };
    p
}

#[repr(C, packed)]
struct Dtr {
    limit: u16,
    base: u64,
}

/// Points GS at CPU `id`'s [`CpuArea`], then loads its GDT and TSS (with its trap stacks).
pub fn init_cpu(id: usize) {
    assert!(id < MAX_CPUS, "CPU index {id} out of range");
    AREAS[id].id.store(id as u64, Ordering::Relaxed);
    // The GS base is set at the end: the segment reloads below may clear it.
    let t = TABLES[id].0.get();
    let s = STACKS[id].0.get();
    // SAFETY: this CPU's own tables, not yet loaded: no one else reads them (CpuOwned).
    let g = unsafe {
        let tss = core::ptr::addr_of!((*t).tss) as u64;
        (*t).gdt[5] =
            103 | ((tss & 0xff_ffff) << 16) | (0x89u64 << 40) | (((tss >> 24) & 0xff) << 56);
        (*t).gdt[6] = tss >> 32;
        let top = |p: *const u8| p as u64 + STACK as u64;
        let small = |p: *const u8| p as u64 + SMALL_STACK as u64;
        let ks = top(core::ptr::addr_of!((*s).syscall).cast());
        AREAS[id].kstack_top.store(ks, Ordering::Relaxed);
        (*t).tss.rsp[0] = ks;
        (*t).tss.ist[0] = top(core::ptr::addr_of!((*s).exc).cast());
        (*t).tss.ist[1] = small(core::ptr::addr_of!((*s).df).cast());
        (*t).tss.ist[2] = small(core::ptr::addr_of!((*s).irq).cast());
        Dtr {
            limit: 7 * 8 - 1,
            base: core::ptr::addr_of!((*t).gdt) as u64,
        }
    };
    // SAFETY: a valid GDT with the flat kernel segments at the selectors in use and a TSS.
    unsafe {
        asm!(
            "lgdt [{g}]",
            "push {kcode}",
            "lea {t}, [rip + 2f]",
            "push {t}",
            "retfq",
            "2:",
            "mov ax, {kdata}",
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
            kcode = const KCODE,
            kdata = const KDATA,
            tss = const TSS_SEL,
            out("rax") _,
        );
    }
    wrmsr(MSR_GS_BASE, core::ptr::addr_of!(AREAS[id]) as u64);
}

const MSR_GS_BASE: u32 = 0xc000_0101;

/// Loads an IDT of `entries` 16-byte gates at `base`.
pub fn load_idt(base: u64, entries: usize) {
    let i = Dtr {
        limit: (entries * 16 - 1) as u16,
        base,
    };
    // SAFETY: the caller's table holds valid gates and lives for the kernel's lifetime.
    unsafe { asm!("lidt [{}]", in(reg) &i) };
}

/// Makes the trap frame ending at `frame_top` the one the next ring-3 entry fills: the
/// syscall stub pushes there and the CPU's RSP0 points there.
pub fn set_user_entry(frame_top: u64) {
    AREAS[cpu_id()]
        .cur_frame_top
        .store(frame_top, Ordering::Relaxed);
    let t = TABLES[cpu_id()].0.get();
    // SAFETY: this CPU's TSS (CpuOwned); the CPU reads RSP0 only on the next ring change.
    unsafe { core::ptr::addr_of_mut!((*t).tss.rsp[0]).write_unaligned(frame_top) };
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

/// `mov rax, cr3`.
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) };
    v
}

/// Waits for an interrupt with interrupts enabled for exactly the `hlt` (`sti` defers
/// them by one instruction), then disables them again. Every interrupt gate has its own
/// IST stack, so the interrupt never lands on the caller's stack (red zone).
pub fn wait_for_interrupt() {
    // SAFETY: see above; the handler returns here with iretq.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
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

/// `out dx, al`.
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// Parks the CPU for good (interrupts off).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: halting with interrupts off parks the CPU.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) };
    }
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

/// Saves the runner's callee-saved context and jumps to `entry` (which never returns) on
/// the syscall stack; returns when [`back_to_runner`] is called. The runner is the kernel's
/// own thread that starts processes and gets control back when none is runnable.
pub fn run_from_runner(entry: u64) {
    // SAFETY: saves callee-saved registers on the runner stack, restored by back_to_runner.
    unsafe {
        asm!(
            "push rbx", "push rbp", "push r12", "push r13", "push r14", "push r15",
            "lea rax, [rip + 2f]",
            "push rax",
            "mov gs:[{runner}], rsp",
            "mov rsp, gs:[{kstack}]",
            "jmp {f}",
            "2:",
            "pop r15", "pop r14", "pop r13", "pop r12", "pop rbp", "pop rbx",
            f = in(reg) entry,
            runner = const GS_RUNNER,
            kstack = const GS_KSTACK,
            out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
        )
    }
}

/// Returns control to the runner (never returns).
pub fn back_to_runner() -> ! {
    // SAFETY: this CPU's runner_rsp was saved by run_from_runner.
    unsafe { asm!("mov rsp, gs:[{runner}]", "ret", runner = const GS_RUNNER, options(noreturn)) }
}
