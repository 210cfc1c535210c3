//! The syscall table: numbers, the dispatcher and one function per call. Entered from the
//! trap stubs (`traps`) with the caller's registers saved in its trap frame.
//!
//! Every call runs under the process-table lock and this CPU's MMU borrow; calls that
//! block, yield or exit return a [`Next`] and the dispatcher leaves after dropping both.
//! A thread's memory calls work on its process's space (`ProcTable::space_of`).

use crate::arch::{self, cpu_id, TrapFrame, MAX_CPUS};
use crate::mem;
use crate::mmu::{self, Mmu};
use crate::sched::{self, ProcTable, Wait};
use crate::serial;
use crate::sync::CpuLocal;
use crate::tlb;
use crate::vm::{self, Space, PROT_R, PROT_W};

/// Syscall numbers (the user side mirrors them in `utest::nr`).
#[allow(missing_docs)] // the names are the calls
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
    pub const THREAD: u64 = 13;
    pub const JOIN: u64 = 14;
    pub const PIN: u64 = 15;
    pub const CPU: u64 = 16;
    pub const CATCH: u64 = 17;
}

/// The syscall instruction of this platform: `ud2` followed by the 4-byte tag "PVSC"
/// (`syscall` does not switch CS here and `int n` is refused; exceptions are delivered
/// correctly). The kernel resumes after the tag.
pub const SYSCALL_LEN: u64 = 6;

const EINVAL: u64 = -22i64 as u64;
const EFAULT: u64 = -14i64 as u64;
const ENOMEM: u64 = -12i64 as u64;
const EAGAIN: u64 = -11i64 as u64;
const ECHILD: u64 = -10i64 as u64;
const ENOSYS: u64 = -38i64 as u64;
const ESRCH: u64 = -3i64 as u64;

/// What happens after a call.
enum Next {
    /// Return to the caller (rax is set in its frame).
    Return,
    /// The caller exits with this wait status.
    Exit(u64),
    /// The caller yielded or blocked: run someone.
    Schedule,
}

/// This CPU's A/D query bitmap (one bit per page, copied out to the user).
static AD_BM: CpuLocal<[u64; (vm::AD_MAX_PAGES / 64) as usize]> =
    CpuLocal::new([[0; (vm::AD_MAX_PAGES / 64) as usize]; MAX_CPUS]);

fn pages_ok(addr: u64, len: u64) -> bool {
    addr.is_multiple_of(4096)
        && len > 0
        && len.is_multiple_of(4096)
        && addr < 0x8000_0000_0000
        && len < (1 << 40)
}

/// True if `rip` of the current process is at a syscall instruction (`ud2` + tag).
pub fn is_syscall(s: &mut Space, m: &mut Mmu, rip: u64) -> bool {
    if rip & 0xfff > 4096 - SYSCALL_LEN {
        return false;
    }
    let Some(pa) = vm::user_pa(s, m, rip, false) else {
        return false;
    };
    // SAFETY: a mapped user frame, through the direct map; the 6 bytes stay in its page.
    unsafe {
        let p = mem::va(pa) as *const u8;
        core::ptr::read_unaligned(p as *const u16) == 0x0b0f
            && core::ptr::read_unaligned(p.add(2) as *const [u8; 4]) == *b"PVSC"
    }
}

/// Entered from the syscall stubs with the current process's frame filled in.
pub extern "C" fn syscall_trap(_frame: *mut TrapFrame) -> ! {
    dispatch()
}

/// Runs the call in the current process's frame and continues accordingly.
pub fn dispatch() -> ! {
    let next = {
        let mut t = sched::PROCS.lock();
        let mut m = mmu::this_cpu();
        call(&mut t, &mut m, sched::current())
    };
    match next {
        Next::Return => sched::return_to_user(),
        Next::Exit(status) => sched::exit_current(status),
        Next::Schedule => sched::schedule(),
    }
}

fn call(t: &mut ProcTable, m: &mut Mmu, c: usize) -> Next {
    let f = t.procs[c].frame;
    let (a0, a1, a2, a3) = (f.rdi, f.rsi, f.rdx, f.r10);
    if let Some(n) = task_call(t, c, f.rax, [a0, a1, a2, a3]) {
        return n;
    }
    let sp = t.space_of(c);
    let r = match f.rax {
        nr::EXIT => return Next::Exit((a0 & 0xff) << 8),
        nr::WRITE => write(sp, m, a0, a1),
        nr::GETPID => t.procs[c].pid,
        nr::MMAP => mmap(sp, m, a0, a1, a2, a3),
        nr::MUNMAP => munmap(sp, m, a0, a1),
        nr::MPROTECT => mprotect(sp, m, a0, a1, a2),
        nr::MREMAP => mremap(sp, m, a0, a1, a2),
        nr::FORK => sched::fork(t, m, c).unwrap_or(EAGAIN),
        nr::AD => ad(sp, m, a0, a1, a2, a3),
        nr::RELOCATE => sp.relocate(m, a0),
        nr::STAT => stat(t, m, c, a0),
        _ => ENOSYS,
    };
    t.procs[c].frame.rax = r;
    Next::Return
}

/// The task calls (scheduling, threads, process lifetime); None for the others.
fn task_call(t: &mut ProcTable, c: usize, nr: u64, a: [u64; 4]) -> Option<Next> {
    let blocked = |w: Wait, t: &mut ProcTable, none: u64| match w {
        Wait::Reaped(v) => {
            t.procs[c].frame.rax = v;
            Next::Return
        }
        Wait::Block => Next::Schedule,
        Wait::NoChild => {
            t.procs[c].frame.rax = none;
            Next::Return
        }
    };
    Some(match nr {
        nr::WAIT => {
            let w = sched::wait(t, c);
            blocked(w, t, ECHILD)
        }
        nr::JOIN => {
            let w = sched::join(t, c, a[0]);
            blocked(w, t, ESRCH)
        }
        nr::YIELD => {
            t.procs[c].frame.rax = 0;
            sched::requeue(t, c);
            Next::Schedule
        }
        nr::PIN => {
            if a[0] >= tlb::online() as u64 {
                t.procs[c].frame.rax = EINVAL;
                return Some(Next::Return);
            }
            t.procs[c].frame.rax = 0;
            sched::pin(t, c, a[0] as usize);
            Next::Schedule
        }
        nr::THREAD => {
            let r = if a[3] >= tlb::online() as u64 || !user_addr(a[0]) || !user_addr(a[1]) {
                EINVAL
            } else {
                sched::thread_create(t, c, a[0], a[1], a[2], a[3] as usize).unwrap_or(EAGAIN)
            };
            t.procs[c].frame.rax = r;
            Next::Return
        }
        nr::CPU => {
            t.procs[c].frame.rax = cpu_id() as u64;
            Next::Return
        }
        nr::CATCH => {
            let r = if a[0] == 0 || user_addr(a[0]) {
                let mm = t.procs[c].mm;
                t.procs[mm].catch = a[0];
                0
            } else {
                EINVAL
            };
            t.procs[c].frame.rax = r;
            Next::Return
        }
        _ => return None,
    })
}

fn user_addr(a: u64) -> bool {
    a < 0x8000_0000_0000
}

fn write(sp: &mut Space, m: &mut Mmu, va: u64, len: u64) -> u64 {
    let mut buf = [0u8; 256];
    let n = (len as usize).min(buf.len());
    for (k, b) in buf[..n].iter_mut().enumerate() {
        match vm::user_pa(sp, m, va + k as u64, false) {
            // SAFETY: a mapped user frame through the direct map.
            Some(pa) => *b = unsafe { *(mem::va(pa) as *const u8) },
            None => return EFAULT,
        }
    }
    serial::write_bytes(&buf[..n]);
    n as u64
}

/// `mmap(len, prot, flags, addr)`: flags 1 populate, 4 zero with the CPU, 8 fixed (at
/// `addr`, which must be free).
fn mmap(sp: &mut Space, m: &mut Mmu, len: u64, prot: u64, flags: u64, addr: u64) -> u64 {
    let prot = prot as u8;
    if !pages_ok(0, len) || prot & !(PROT_R | PROT_W) != 0 || flags & !0xd != 0 {
        return EINVAL;
    }
    let va = if flags & 8 != 0 {
        if !pages_ok(addr, len)
            || addr < vm::MMAP_BASE
            || (addr..addr + len)
                .step_by(4096)
                .any(|a| sp.find(a).is_some())
        {
            return EINVAL;
        }
        addr
    } else {
        sp.alloc_va(len)
    };
    if !sp.add_vma(va, va + len, prot) {
        return ENOMEM;
    }
    if flags & 1 != 0 {
        sp.populate(m, va, va + len, prot, flags & 4 != 0);
    }
    va
}

fn munmap(sp: &mut Space, m: &mut Mmu, va: u64, len: u64) -> u64 {
    if !pages_ok(va, len) {
        return EINVAL;
    }
    sp.remove_vma(va, va + len);
    sp.zap(m, va, va + len)
}

fn mprotect(sp: &mut Space, m: &mut Mmu, va: u64, len: u64, prot: u64) -> u64 {
    if !pages_ok(va, len) || !sp.covered(va, va + len) {
        return EINVAL;
    }
    sp.protect_vma(va, va + len, prot as u8);
    sp.protect(m, va, va + len, prot as u8);
    0
}

fn mremap(sp: &mut Space, m: &mut Mmu, old: u64, olen: u64, nlen: u64) -> u64 {
    if !pages_ok(old, olen) || !pages_ok(0, nlen) || !sp.covered(old, old + olen) {
        return EINVAL;
    }
    let Some(i) = sp.find(old) else {
        return EINVAL;
    };
    let prot = sp.vmas[i].prot;
    let new = sp.alloc_va(nlen);
    let keep = olen.min(nlen);
    sp.move_ptes(m, old, new, keep);
    if olen > keep {
        sp.zap(m, old + keep, old + olen);
    }
    sp.remove_vma(old, old + olen);
    sp.add_vma(new, new + nlen, prot);
    new
}

fn ad(sp: &mut Space, m: &mut Mmu, va: u64, pages: u64, buf: u64, flags: u64) -> u64 {
    if !pages_ok(va, pages.saturating_mul(4096)) || pages > vm::AD_MAX_PAGES {
        return EINVAL;
    }
    let mut bm = AD_BM.borrow_mut();
    let words = pages.div_ceil(64) as usize;
    let bit = if flags & 1 != 0 { vm::A } else { vm::D };
    let n = sp.ad_query(m, va, pages, bit, flags & 4 != 0, &mut bm[..words]);
    // SAFETY: the first `words` u64s of the bitmap viewed as bytes (little-endian, the
    // user's layout); u8 has no alignment or validity requirements.
    let bytes = unsafe { core::slice::from_raw_parts(bm.as_ptr() as *const u8, words * 8) };
    if buf != 0 && !vm::copy_to_user(sp, m, buf, bytes) {
        EFAULT
    } else {
        n
    }
}

fn stat(t: &ProcTable, m: &Mmu, c: usize, what: u64) -> u64 {
    use core::sync::atomic::Ordering::Relaxed;
    match what {
        0 => mem::free_count(),
        1 => t.procs[c].faults,
        2 => m.c.hypercalls,
        3 => m.c.pte_updates,
        4 => m.c.flushes,
        5 => m.mode as u64,
        6 => t.last_teardown.0,
        7 => t.last_teardown.1,
        8 => m.c.entries,
        9 => m.c.zero_vmm,
        10 => m.c.zero_cpu,
        11 => arch::rdtsc(),
        12 => u64::from(m.zero_vmm && m.is_pv()),
        13 => m.fault_around,
        14 => m.c.fault_mapped,
        15 => tlb::online() as u64,
        16 => tlb::STATS.flush_ipis.load(Relaxed),
        17 => tlb::STATS.wake_ipis.load(Relaxed),
        18 => tlb::STATS.shootdowns.load(Relaxed),
        19 => tlb::STATS.lazy_detached.load(Relaxed),
        20 => t.last_teardown.2,
        21 => u64::from(m.smp_tlb),
        22 => u64::from(m.lazy_tlb()),
        23 => tlb::STATS.served.load(Relaxed),
        _ => 0,
    }
}
