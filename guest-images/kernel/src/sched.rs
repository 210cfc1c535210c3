//! Processes and the scheduler: the process table, spawn, a round-robin scheduler that
//! switches at syscalls, fork, wait and exit, and the runner that starts a program and
//! gets control back when nothing is runnable.
//!
//! Locks: [`PROCS`] guards the process table (every process's state, frame and address
//! space), the pid counter and the runner's results. Lock order: `PROCS`, then this CPU's
//! MMU state (`mmu::this_cpu`), then the frame allocator (inside `mem`). No guard is held
//! across a jump to user mode or to the runner: those paths drop them first.
//!
//! Per-CPU state: [`CURRENT`], the slot the CPU runs. A running process's trap frame is
//! written without the lock by its own CPU's entry stubs (the CPU is its only user).

use crate::arch::{self, TrapFrame, MAX_CPUS};
use crate::elf;
use crate::mmu::{self, Mmu};
use crate::sync::{PerCpu, SpinGuard, SpinLock};
use crate::vm::{self, Space, PROT_R, PROT_W};
use core::sync::atomic::{AtomicUsize, Ordering};

/// Process slots.
pub const NPROC: usize = 8;

/// A slot's state.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Unused.
    Free,
    /// Runnable.
    Run,
    /// Blocked in `wait`.
    Wait,
    /// Exited, not yet reaped by its parent.
    Zombie,
}

/// One process.
pub struct Proc {
    /// Slot state.
    pub state: State,
    /// Process id.
    pub pid: u64,
    /// Parent's pid (0: the runner).
    pub ppid: u64,
    /// Saved user context.
    pub frame: TrapFrame,
    /// Address space.
    pub space: Space,
    /// Linux-style wait status.
    pub status: u64,
    /// Page faults taken.
    pub faults: u64,
}

const EMPTY: Proc = Proc {
    state: State::Free,
    pid: 0,
    ppid: 0,
    frame: TrapFrame::ZERO,
    space: Space::empty(),
    status: 0,
    faults: 0,
};

/// The process table and what the runner learns from it.
pub struct ProcTable {
    /// The slots.
    pub procs: [Proc; NPROC],
    next_pid: u64,
    /// Exit status of the last process started by the runner.
    pub runner_status: Option<u64>,
    /// Teardown cost of the last exit: (MMU hypercalls, leaf PTEs).
    pub last_teardown: (u64, u64),
}

impl ProcTable {
    fn new_pid(&mut self) -> u64 {
        let v = self.next_pid;
        self.next_pid += 1;
        v
    }
}

/// The process table.
pub static PROCS: SpinLock<ProcTable> = SpinLock::new(ProcTable {
    procs: [EMPTY; NPROC],
    next_pid: 1,
    runner_status: None,
    last_teardown: (0, 0),
});

/// The slot each CPU runs.
static CURRENT: PerCpu<AtomicUsize> = PerCpu::new([const { AtomicUsize::new(0) }; MAX_CPUS]);

/// Wait status of a process killed by SIGSEGV.
pub const SIGSEGV: u64 = 11;
/// Wait status of a process killed by SIGILL.
pub const SIGILL: u64 = 4;
/// Wait status of a process killed by SIGFPE.
pub const SIGFPE: u64 = 8;

/// The slot this CPU runs.
pub fn current() -> usize {
    CURRENT.this().load(Ordering::Relaxed)
}

/// Exit status of the last process started by the runner.
pub fn runner_status() -> Option<u64> {
    PROCS.lock().runner_status
}

/// Creates a process from an ELF image with `args` in rdi, rsi, rdx; returns its slot.
pub fn spawn(elf: &[u8], args: [u64; 3]) -> Option<usize> {
    let mut t = PROCS.lock();
    let mut m = mmu::this_cpu();
    let slot = t.procs.iter().position(|p| p.state == State::Free)?;
    let p = &mut t.procs[slot];
    p.space.create(&mut m);
    let entry = elf::load(&mut p.space, &mut m, elf)?;
    let pid = t.new_pid();
    let p = &mut t.procs[slot];
    p.space.add_vma(
        vm::STACK_TOP - vm::STACK_SIZE,
        vm::STACK_TOP,
        PROT_R | PROT_W,
    );
    p.pid = pid;
    p.ppid = 0;
    p.faults = 0;
    p.status = 0;
    p.frame = TrapFrame {
        rip: entry,
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

/// Resumes the current process.
pub fn return_to_user() -> ! {
    let (frame, sysret) = {
        let mut t = PROCS.lock();
        let mut m = mmu::this_cpu();
        let p = &mut t.procs[current()];
        m.switch(p.space.l4);
        m.flush();
        let frame: *const TrapFrame = &p.frame;
        arch::set_user_entry(frame as u64 + core::mem::size_of::<TrapFrame>() as u64);
        (frame, p.frame.vector == 0x80)
    };
    // The frame stays valid: the slot runs on this CPU and nothing else touches it.
    if sysret {
        arch::resume_sysret(frame)
    }
    arch::resume(frame)
}

/// Picks the next runnable process (round robin after the current one) and runs it;
/// back to the runner when none is left.
pub fn schedule() -> ! {
    let next = {
        let t = PROCS.lock();
        let c = current();
        (1..=NPROC)
            .map(|k| (c + k) % NPROC)
            .find(|&i| t.procs[i].state == State::Run)
    };
    if let Some(i) = next {
        CURRENT.this().store(i, Ordering::Relaxed);
        return_to_user();
    }
    mmu::this_cpu().switch(vm::kernel_l4());
    arch::back_to_runner()
}

/// Runs `slot` and everything it spawns until nothing is runnable.
pub fn run(slot: usize) {
    CURRENT.this().store(slot, Ordering::Relaxed);
    PROCS.lock().runner_status = None;
    arch::run_from_runner(return_to_user as *const () as u64);
}

/// Ends the current process with wait status `status`, then schedules.
pub fn exit_current(status: u64) -> ! {
    {
        let mut t = PROCS.lock();
        let mut m = mmu::this_cpu();
        exit_locked(&mut t, &mut m, current(), status);
    }
    schedule()
}

fn exit_locked(t: &mut SpinGuard<'_, ProcTable>, m: &mut Mmu, i: usize, status: u64) {
    t.last_teardown = t.procs[i].space.teardown(m);
    let ps = &mut t.procs;
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
        ps[i].state = State::Free;
        t.runner_status = Some(status);
    } else if let Some(par) = ps
        .iter_mut()
        .find(|q| q.pid == ppid && q.state == State::Wait)
    {
        par.frame.rax = (status << 32) | pid;
        par.state = State::Run;
        ps[i].state = State::Free;
    }
}

/// What `wait` does next.
pub enum Wait {
    /// A zombie child was reaped: the syscall returns this value.
    Reaped(u64),
    /// Children are alive: the caller blocks (its parent's exit sets rax).
    Block,
    /// No children.
    NoChild,
}

/// `wait` for the process in slot `c`.
pub fn wait(t: &mut ProcTable, c: usize) -> Wait {
    let me = t.procs[c].pid;
    if let Some(z) = t
        .procs
        .iter_mut()
        .find(|q| q.ppid == me && q.state == State::Zombie)
    {
        z.state = State::Free;
        return Wait::Reaped((z.status << 32) | z.pid);
    }
    if t.procs
        .iter()
        .any(|q| q.ppid == me && q.state != State::Free)
    {
        t.procs[c].state = State::Wait;
        return Wait::Block;
    }
    Wait::NoChild
}

/// `fork` of the process in slot `c`: the child's pid, or None when no slot is free.
pub fn fork(t: &mut ProcTable, m: &mut Mmu, c: usize) -> Option<u64> {
    let slot = t.procs.iter().position(|p| p.state == State::Free)?;
    let pid = t.new_pid();
    let (parent, child) = if c < slot {
        let (a, b) = t.procs.split_at_mut(slot);
        (&mut a[c], &mut b[0])
    } else {
        let (a, b) = t.procs.split_at_mut(c);
        (&mut b[0], &mut a[slot])
    };
    // One lazy section: the child's pin, its tables and the copied PTEs go as one batch.
    m.enter_lazy();
    child.space.create(m);
    parent.space.fork_into(m, &mut child.space);
    m.leave_lazy();
    child.pid = pid;
    child.ppid = parent.pid;
    child.frame = parent.frame;
    child.frame.rax = 0;
    child.faults = 0;
    child.status = 0;
    child.state = State::Run;
    Some(pid)
}
