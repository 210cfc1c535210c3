//! Processes: ELF loading, a round-robin scheduler (switching at syscalls), fork/wait/exit,
//! the syscall table and exception handling.

use crate::arch::{self, TrapFrame};
use crate::mem;
use crate::mmu::mmu;
use crate::serial;
use crate::vm::{self, Space, PROT_R, PROT_W};
use core::fmt::Write;

pub const NPROC: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum State {
    Free,
    Run,
    Wait,
    Zombie,
}

pub struct Proc {
    pub state: State,
    pub pid: u64,
    pub ppid: u64,
    pub frame: TrapFrame,
    pub space: Space,
    /// Linux-style wait status.
    pub status: u64,
    pub faults: u64,
}

const EMPTY: Proc = Proc {
    state: State::Free,
    pid: 0,
    ppid: 0,
    frame: TrapFrame {
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
    },
    space: Space::empty(),
    status: 0,
    faults: 0,
};

static mut PROCS: [Proc; NPROC] = [EMPTY; NPROC];
static mut CUR: usize = 0;
static mut NEXT_PID: u64 = 1;
/// Exit status of the last process started by the runner.
pub static mut RUNNER_STATUS: Option<u64> = None;
/// Teardown cost of the last exit: (MMU hypercalls, leaf PTEs).
pub static mut LAST_TEARDOWN: (u64, u64) = (0, 0);

/// Set to recover from a kernel-mode page fault (probe); the handler jumps to it.
pub static mut PROBE_RECOVER: u64 = 0;
pub static mut PROBE_FAULTED: bool = false;

fn procs() -> &'static mut [Proc; NPROC] {
    // SAFETY: single CPU, interrupts off.
    unsafe { &mut *core::ptr::addr_of_mut!(PROCS) }
}

fn cur() -> usize {
    // SAFETY: single CPU.
    unsafe { CUR }
}

pub const SIGSEGV: u64 = 11;
pub const SIGILL: u64 = 4;
pub const SIGFPE: u64 = 8;

/// Creates a process from an ELF image; returns its slot.
pub fn spawn(elf: &[u8], args: [u64; 3]) -> Option<usize> {
    let slot = procs().iter().position(|p| p.state == State::Free)?;
    let p = &mut procs()[slot];
    p.space.create();
    if !load_elf(&mut p.space, elf) {
        return None;
    }
    p.space.add_vma(
        vm::STACK_TOP - vm::STACK_SIZE,
        vm::STACK_TOP,
        PROT_R | PROT_W,
    );
    // SAFETY: single CPU.
    let pid = unsafe {
        let v = NEXT_PID;
        NEXT_PID += 1;
        v
    };
    p.pid = pid;
    p.ppid = 0;
    p.faults = 0;
    p.status = 0;
    p.frame = TrapFrame {
        rip: rd_u64(elf, 0x18),
        cs: arch::UCODE,
        ss: arch::UDATA,
        rflags: 0x2,
        rsp: vm::STACK_TOP - 64,
        rdi: args[0],
        rsi: args[1],
        rdx: args[2],
        ..TrapFrame::default()
    };
    p.state = State::Run;
    Some(slot)
}

fn rd_u64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn rd_u32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}

fn load_elf(s: &mut Space, elf: &[u8]) -> bool {
    if elf.len() < 64 || &elf[0..4] != b"\x7fELF" {
        return false;
    }
    let phoff = rd_u64(elf, 0x20) as usize;
    let phentsize = u16::from_le_bytes([elf[0x36], elf[0x37]]) as usize;
    let phnum = u16::from_le_bytes([elf[0x38], elf[0x39]]) as usize;
    let m = mmu();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if rd_u32(elf, ph) != 1 {
            continue;
        }
        let flags = rd_u32(elf, ph + 4);
        let off = rd_u64(elf, ph + 8);
        let vaddr = rd_u64(elf, ph + 16);
        let filesz = rd_u64(elf, ph + 32);
        let memsz = rd_u64(elf, ph + 40);
        let start = vaddr & !0xfff;
        let end = (vaddr + memsz).next_multiple_of(4096);
        let prot = PROT_R | if flags & 2 != 0 { PROT_W } else { 0 };
        s.add_vma(start, end, prot);
        let mut va = start;
        while va < end {
            let ptr = s.pte_ptr(va, true).unwrap();
            let e = mem::rd(ptr);
            let frame = if e & vm::P != 0 {
                e & vm::ADDR
            } else {
                s.map_zero(ptr, prot, true)
            };
            // File bytes overlapping this page.
            let lo = va.max(vaddr);
            let hi = (va + 4096).min(vaddr + filesz);
            if lo < hi {
                let src = &elf[(off + (lo - vaddr)) as usize..(off + (hi - vaddr)) as usize];
                // SAFETY: frame is ours; direct map.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        src.as_ptr(),
                        mem::va(frame + (lo - va)) as *mut u8,
                        src.len(),
                    )
                };
            }
            va += 4096;
        }
    }
    m.flush();
    true
}

/// Resumes the current process.
pub fn return_to_user() -> ! {
    let p = &mut procs()[cur()];
    let m = mmu();
    m.switch(p.space.l4);
    m.flush();
    arch::set_frame(&mut p.frame);
    if p.frame.vector == 0x80 {
        arch::resume_sysret(&p.frame)
    }
    arch::resume(&p.frame)
}

/// Picks the next runnable process (round robin after the current one) and runs it;
/// back to the runner when none is left.
pub fn schedule() -> ! {
    let c = cur();
    for k in 1..=NPROC {
        let i = (c + k) % NPROC;
        if procs()[i].state == State::Run {
            // SAFETY: single CPU.
            unsafe { CUR = i };
            return_to_user();
        }
    }
    // SAFETY: boot constant.
    mmu().switch(unsafe { vm::KERNEL_L4 });
    arch::back_to_runner()
}

/// Runs `slot` and everything it spawns until nothing is runnable.
pub fn run(slot: usize) {
    // SAFETY: single CPU.
    unsafe {
        CUR = slot;
        RUNNER_STATUS = None;
    }
    arch::run_from_runner(return_to_user as *const () as u64);
}

fn exit_current(status: u64) -> ! {
    let i = cur();
    let ps = procs();
    let cost = ps[i].space.teardown();
    // SAFETY: single CPU.
    unsafe { LAST_TEARDOWN = cost };
    let pid = ps[i].pid;
    let ppid = ps[i].ppid;
    ps[i].status = status;
    ps[i].state = State::Zombie;
    // Orphans: reap zombies, others are re-parented to the runner.
    for q in ps.iter_mut() {
        if q.state != State::Free && q.ppid == pid {
            q.ppid = 0;
            if q.state == State::Zombie {
                q.state = State::Free;
            }
        }
    }
    if ppid == 0 {
        // SAFETY: single CPU.
        unsafe { RUNNER_STATUS = Some(status) };
        ps[i].state = State::Free;
    } else if let Some(par) = ps
        .iter_mut()
        .find(|q| q.pid == ppid && q.state == State::Wait)
    {
        par.frame.rax = (status << 32) | pid;
        par.state = State::Run;
        ps[i].state = State::Free;
    }
    schedule()
}

fn do_wait() -> u64 {
    let c = cur();
    let ps = procs();
    let me = ps[c].pid;
    if let Some(z) = ps
        .iter_mut()
        .find(|q| q.ppid == me && q.state == State::Zombie)
    {
        z.state = State::Free;
        return (z.status << 32) | z.pid;
    }
    if ps.iter().any(|q| q.ppid == me && q.state != State::Free) {
        ps[c].state = State::Wait;
        schedule();
    }
    (-10i64) as u64
}

fn do_fork() -> u64 {
    let c = cur();
    let ps = procs();
    let Some(slot) = ps.iter().position(|p| p.state == State::Free) else {
        return (-11i64) as u64;
    };
    // SAFETY: c != slot; disjoint elements.
    let (parent, child) = unsafe {
        let base = ps.as_mut_ptr();
        (&mut *base.add(c), &mut *base.add(slot))
    };
    child.space.create();
    parent.space.fork_into(&mut child.space);
    // SAFETY: single CPU.
    let pid = unsafe {
        let v = NEXT_PID;
        NEXT_PID += 1;
        v
    };
    child.pid = pid;
    child.ppid = parent.pid;
    child.frame = parent.frame;
    child.frame.rax = 0;
    child.faults = 0;
    child.status = 0;
    child.state = State::Run;
    pid
}

const EINVAL: u64 = -22i64 as u64;
const EFAULT: u64 = -14i64 as u64;
const ENOMEM: u64 = -12i64 as u64;

fn pages_ok(addr: u64, len: u64) -> bool {
    addr % 4096 == 0 && len > 0 && len % 4096 == 0 && addr < 0x8000_0000_0000 && len < (1 << 40)
}

/// Syscall numbers.
pub mod nr {
    pub const EXIT: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const GETPID: u64 = 2;
    pub const MMAP: u64 = 3;
    pub const MUNMAP: u64 = 4;
    pub const MPROTECT: u64 = 5;
    pub const MREMAP: u64 = 6;
    pub const FORK: u64 = 7;
    pub const WAIT: u64 = 8;
    pub const YIELD: u64 = 9;
    pub const AD: u64 = 10;
    pub const RELOCATE: u64 = 11;
    pub const STAT: u64 = 12;
}

/// The syscall instruction of this platform: `ud2` followed by the 4-byte tag "PVSC"
/// (`syscall` does not switch CS here and `int n` is refused; exceptions are delivered
/// correctly). The kernel resumes after the tag.
const SYSCALL_LEN: u64 = 6;

fn is_syscall(rip: u64) -> bool {
    let sp = &mut procs()[cur()].space;
    if rip & 0xfff > 4096 - SYSCALL_LEN {
        return false;
    }
    let Some(pa) = vm::user_pa(sp, rip, false) else {
        return false;
    };
    // SAFETY: a mapped user frame, through the direct map; unaligned reads.
    unsafe {
        let p = mem::va(pa) as *const u8;
        core::ptr::read_unaligned(p as *const u16) == 0x0b0f
            && core::ptr::read_unaligned(p.add(2) as *const [u8; 4]) == *b"PVSC"
    }
}

/// Entered from the syscall stub with the current process's frame filled in.
pub extern "C" fn syscall_trap(f: *mut TrapFrame) -> ! {
    // SAFETY: the stub passes the current process's frame.
    let f = unsafe { &mut *f };
    let c = cur();
    let sp = &mut procs()[c].space;
    let (a0, a1, a2, a3) = (f.rdi, f.rsi, f.rdx, f.r10);
    let r = match f.rax {
        nr::EXIT => exit_current((a0 & 0xff) << 8),
        nr::WRITE => {
            let mut buf = [0u8; 256];
            let n = (a1 as usize).min(buf.len());
            let mut ok = true;
            for (k, b) in buf[..n].iter_mut().enumerate() {
                match vm::user_pa(sp, a0 + k as u64, false) {
                    // SAFETY: a mapped user frame through the direct map.
                    Some(pa) => *b = unsafe { *(mem::va(pa) as *const u8) },
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                serial::write_bytes(&buf[..n]);
                n as u64
            } else {
                EFAULT
            }
        }
        nr::GETPID => procs()[c].pid,
        nr::MMAP => {
            let (len, prot, flags) = (a0, a1 as u8, a2);
            if !pages_ok(0, len) || prot & !(PROT_R | PROT_W) != 0 {
                EINVAL
            } else {
                let va = sp.alloc_va(len);
                if !sp.add_vma(va, va + len, prot) {
                    ENOMEM
                } else {
                    if flags & 1 != 0 {
                        sp.populate(va, va + len, prot, flags & 4 != 0);
                    }
                    va
                }
            }
        }
        nr::MUNMAP => {
            if !pages_ok(a0, a1) {
                EINVAL
            } else {
                sp.remove_vma(a0, a0 + a1);
                sp.zap(a0, a0 + a1)
            }
        }
        nr::MPROTECT => {
            if !pages_ok(a0, a1) || !sp.covered(a0, a0 + a1) {
                EINVAL
            } else {
                sp.protect_vma(a0, a0 + a1, a2 as u8);
                sp.protect(a0, a0 + a1, a2 as u8);
                0
            }
        }
        nr::MREMAP => {
            let (old, olen, nlen) = (a0, a1, a2);
            if !pages_ok(old, olen) || !pages_ok(0, nlen) || !sp.covered(old, old + olen) {
                EINVAL
            } else {
                let prot = sp.vmas[sp.find(old).unwrap()].prot;
                let new = sp.alloc_va(nlen);
                let keep = olen.min(nlen);
                sp.move_ptes(old, new, keep);
                if olen > keep {
                    sp.zap(old + keep, old + olen);
                }
                sp.remove_vma(old, old + olen);
                sp.add_vma(new, new + nlen, prot);
                new
            }
        }
        nr::FORK => do_fork(),
        nr::WAIT => do_wait(),
        nr::YIELD => {
            f.rax = 0;
            schedule()
        }
        nr::AD => {
            let (va, pages, buf, flags) = (a0, a1, a2, a3);
            if !pages_ok(va, pages * 4096) || pages > vm::AD_MAX_PAGES {
                EINVAL
            } else {
                static mut BM: [u64; (vm::AD_MAX_PAGES / 64) as usize] =
                    [0; (vm::AD_MAX_PAGES / 64) as usize];
                // SAFETY: single CPU.
                let bm = unsafe { &mut *core::ptr::addr_of_mut!(BM) };
                let words = pages.div_ceil(64) as usize;
                let bit = if flags & 1 != 0 { vm::A } else { vm::D };
                let n = sp.ad_query(va, pages, bit, flags & 4 != 0, &mut bm[..words]);
                // SAFETY: reinterpreting u64 words as bytes.
                let bytes =
                    unsafe { core::slice::from_raw_parts(bm.as_ptr() as *const u8, words * 8) };
                if buf != 0 && !vm::copy_to_user(sp, buf, bytes) {
                    EFAULT
                } else {
                    n
                }
            }
        }
        nr::RELOCATE => sp.relocate(a0),
        nr::STAT => stat(a0),
        _ => -38i64 as u64,
    };
    f.rax = r;
    return_to_user()
}

fn stat(what: u64) -> u64 {
    let m = mmu();
    match what {
        0 => mem::free_count(),
        1 => procs()[cur()].faults,
        2 => m.c.hypercalls,
        3 => m.c.pte_updates,
        4 => m.c.flushes,
        5 => m.mode as u64,
        // SAFETY: single CPU.
        6 => unsafe { LAST_TEARDOWN.0 },
        7 => unsafe { LAST_TEARDOWN.1 },
        8 => m.c.entries,
        9 => m.c.zero_vmm,
        10 => m.c.zero_cpu,
        11 => arch::rdtsc(),
        _ => 0,
    }
}

/// Entered from the exception stubs (on IST1).
pub extern "C" fn exception_trap(f: *mut TrapFrame) -> ! {
    // SAFETY: the stub passes the frame it built.
    let f = unsafe { &mut *f };
    if f.cs & 3 == 3 {
        let c = cur();
        procs()[c].frame = *f;
        if f.vector == 6 && is_syscall(f.rip) {
            let pf = &mut procs()[c].frame;
            pf.rip += SYSCALL_LEN;
            syscall_trap(pf);
        }
        if f.vector == 14 {
            let addr = arch::read_cr2();
            procs()[c].faults += 1;
            if crate::mmu::DEBUG_FAULTS.load(core::sync::atomic::Ordering::Relaxed) {
                let sp = &mut procs()[c].space;
                let pte = sp.pte_ptr(addr, false).map(mem::rd).unwrap_or(0);
                let _ = writeln!(
                    serial::Console,
                    "# debug: fault {:#x} err {:#x} rip {:#x} rsp {:#x} pte {:#x}",
                    addr,
                    f.err,
                    f.rip,
                    f.rsp,
                    pte
                );
            }
            if procs()[c].space.fault(addr, f.err & 2 != 0) {
                return_to_user();
            }

            let _ = writeln!(
                serial::Console,
                "# pid {} killed: page fault at {:#x} (err {:#x}) rip {:#x}",
                procs()[c].pid,
                addr,
                f.err,
                f.rip
            );
            exit_current(SIGSEGV);
        }
        let sig = match f.vector {
            0 => SIGFPE,
            6 => SIGILL,
            _ => SIGSEGV,
        };
        let _ = writeln!(
            serial::Console,
            "# pid {} killed: exception {} at {:#x}",
            procs()[c].pid,
            f.vector,
            f.rip
        );
        exit_current(sig);
    }
    // SAFETY: single CPU.
    unsafe {
        if f.vector == 14 && PROBE_RECOVER != 0 {
            f.rip = PROBE_RECOVER;
            PROBE_RECOVER = 0;
            PROBE_FAULTED = true;
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
