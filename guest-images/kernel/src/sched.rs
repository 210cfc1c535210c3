//! Tasks and the scheduler: the task table (processes and the threads that share their
//! address space), spawn, per-CPU run queues with a cooperative round-robin scheduler that
//! switches at syscalls, cross-CPU wake-up, fork, wait, threads (create, join, pin) and
//! exit, and the runner that starts a program and gets control back when every task ended.
//!
//! Locks: [`PROCS`] guards the task table (every task's state, frame, CPU and address
//! space), the pid counter and the runner's results. Lock order: `PROCS`, then this CPU's
//! MMU state (`mmu::this_cpu`), then the frame allocator (inside `mem`). No guard is held
//! across a jump to user mode or to the runner: those paths drop them first.
//!
//! Run queues: a runnable task sits on exactly one CPU's queue: its `cpu` field names it,
//! and only that CPU picks it (round robin over its queue). A task made runnable for
//! another CPU (a new thread, a join or wait that completes, a pin) wakes that CPU with an
//! IPI (`tlb::wake`); an idle CPU waits in `hlt`.
//!
//! Per-CPU state: [`CURRENT`], the slot the CPU runs ([`NONE`] when idle), and `LAST`, where
//! its round robin continues. A running task's saved frame is written only by its own CPU.

use crate::arch::{self, cpu_id, TrapFrame, MAX_CPUS};
use crate::elf;
use crate::mmu::{self, Mmu};
use crate::sync::{PerCpu, SpinLock};
use crate::tlb;
use crate::vm::{self, Space, PROT_R, PROT_W};
use core::sync::atomic::{AtomicUsize, Ordering};

/// Task slots.
pub const NPROC: usize = 40;
/// No task (an idle CPU's CURRENT).
pub const NONE: usize = usize::MAX;

/// A slot's state.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Unused.
    Free,
    /// Runnable, on the run queue of its `cpu`.
    Run,
    /// Running on its `cpu`.
    Running,
    /// Blocked in `wait`.
    Wait,
    /// Blocked in `join` (of the thread `join`).
    Join,
    /// Exited, not yet reaped by its parent (process) or joiner (thread).
    Zombie,
    /// A process leader that exited while its threads run: its space lives until the last
    /// thread ends, then it becomes a zombie.
    Exiting,
}

/// One task.
pub struct Proc {
    /// Slot state.
    pub state: State,
    /// Process or thread id.
    pub pid: u64,
    /// Parent's pid (0: the runner); for a thread, its process's pid.
    pub ppid: u64,
    /// Saved user context.
    pub frame: TrapFrame,
    /// Address space (used only in a process leader's slot).
    pub space: Space,
    /// The slot whose `space` this task runs in (its own, for a process).
    pub mm: usize,
    /// Tasks running in this slot's space (a leader's slot: itself and its live threads).
    pub users: u32,
    /// A thread (joinable), not a process.
    pub thread: bool,
    /// The CPU whose run queue holds the task.
    pub cpu: usize,
    /// `Join` state: the thread id awaited.
    pub join: u64,
    /// Linux-style wait status.
    pub status: u64,
    /// Page faults taken.
    pub faults: u64,
    /// Where an access fault that would kill the task resumes instead (0: kill). Set by
    /// the `catch` syscall, in the process leader's slot.
    pub catch: u64,
}

const EMPTY: Proc = Proc {
    state: State::Free,
    pid: 0,
    ppid: 0,
    frame: TrapFrame::ZERO,
    space: Space::empty(),
    mm: 0,
    users: 0,
    thread: false,
    cpu: 0,
    join: 0,
    status: 0,
    faults: 0,
    catch: 0,
};

/// The task table and what the runner learns from it.
pub struct ProcTable {
    /// The slots.
    pub procs: [Proc; NPROC],
    next_pid: u64,
    /// Exit status of the last process started by the runner.
    pub runner_status: Option<u64>,
    /// Teardown cost of the last exit: (MMU hypercalls, leaf PTEs, other CPUs that still
    /// had the root loaded).
    pub last_teardown: (u64, u64, u64),
}

impl ProcTable {
    fn new_pid(&mut self) -> u64 {
        let v = self.next_pid;
        self.next_pid += 1;
        v
    }

    /// The address space of the task in slot `i`.
    pub fn space_of(&mut self, i: usize) -> &mut Space {
        let mm = self.procs[i].mm;
        &mut self.procs[mm].space
    }

    fn free_slot(&self) -> Option<usize> {
        self.procs.iter().position(|p| p.state == State::Free)
    }

    /// Makes slot `i` runnable on its CPU and wakes that CPU.
    fn make_runnable(&mut self, i: usize) {
        self.procs[i].state = State::Run;
        tlb::wake(self.procs[i].cpu);
    }
}

/// The task table.
pub static PROCS: SpinLock<ProcTable> = SpinLock::new(ProcTable {
    procs: [EMPTY; NPROC],
    next_pid: 1,
    runner_status: None,
    last_teardown: (0, 0, 0),
});

/// The slot each CPU runs.
static CURRENT: PerCpu<AtomicUsize> = PerCpu::new([const { AtomicUsize::new(NONE) }; MAX_CPUS]);
/// Where each CPU's round robin continues.
static LAST: PerCpu<AtomicUsize> = PerCpu::new([const { AtomicUsize::new(0) }; MAX_CPUS]);

/// Wait status of a process killed by SIGSEGV.
pub const SIGSEGV: u64 = 11;
/// Wait status of a process killed by SIGILL.
pub const SIGILL: u64 = 4;
/// Wait status of a process killed by SIGFPE.
pub const SIGFPE: u64 = 8;

/// User rflags: IF set (user mode takes IPIs), reserved bit 1.
const USER_RFLAGS: u64 = 0x202;

/// The slot this CPU runs.
pub fn current() -> usize {
    CURRENT.this().load(Ordering::Relaxed)
}

/// Exit status of the last process started by the runner.
pub fn runner_status() -> Option<u64> {
    PROCS.lock().runner_status
}

/// Creates a process from an ELF image with `args` in rdi, rsi, rdx on this CPU's run
/// queue; returns its slot.
pub fn spawn(elf: &[u8], args: [u64; 3]) -> Option<usize> {
    let mut t = PROCS.lock();
    let mut m = mmu::this_cpu();
    let slot = t.free_slot()?;
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
    *p = Proc {
        state: State::Run,
        pid,
        space: core::mem::replace(&mut p.space, Space::empty()),
        mm: slot,
        users: 1,
        cpu: cpu_id(),
        frame: TrapFrame {
            rip: entry,
            cs: arch::UCODE,
            ss: arch::UDATA,
            rflags: USER_RFLAGS,
            rsp: vm::STACK_TOP - 64,
            rdi: args[0],
            rsi: args[1],
            rdx: args[2],
            ..TrapFrame::default()
        },
        ..EMPTY
    };
    Some(slot)
}

/// Resumes the current task in user mode.
pub fn return_to_user() -> ! {
    let (frame, sysret) = {
        let mut t = PROCS.lock();
        let mut m = mmu::this_cpu();
        let i = current();
        let l4 = t.space_of(i).l4;
        m.switch(l4);
        m.flush();
        let p = &t.procs[i];
        let frame = arch::stage_frame(&p.frame);
        arch::set_user_entry(&p.frame as *const TrapFrame as u64 + size_of::<TrapFrame>() as u64);
        (frame, p.frame.vector == 0x80)
    };
    // The frame is this CPU's staged copy: no other CPU reaches it.
    if sysret {
        arch::resume_sysret(frame)
    }
    arch::resume(frame)
}

/// The next task of this CPU's run queue (round robin), marked running.
fn pick(t: &mut ProcTable) -> Option<usize> {
    let me = cpu_id();
    let last = LAST.this().load(Ordering::Relaxed);
    let i = (1..=NPROC)
        .map(|k| (last + k) % NPROC)
        .find(|&i| t.procs[i].state == State::Run && t.procs[i].cpu == me)?;
    t.procs[i].state = State::Running;
    LAST.this().store(i, Ordering::Relaxed);
    CURRENT.this().store(i, Ordering::Relaxed);
    Some(i)
}

/// True when the runner (boot CPU) may take control back: its program ended and no task
/// is left anywhere.
fn runner_done(t: &ProcTable) -> bool {
    t.runner_status.is_some() && t.procs.iter().all(|p| p.state == State::Free)
}

/// Runs the next task of this CPU's queue; idles (in `hlt`, woken by IPIs) while there is
/// none. The boot CPU goes back to the runner once every task has ended.
pub fn schedule() -> ! {
    CURRENT.this().store(NONE, Ordering::Relaxed);
    loop {
        let back = {
            let mut t = PROCS.lock();
            if pick(&mut t).is_some() {
                drop(t);
                return_to_user();
            }
            let mut m = mmu::this_cpu();
            if !m.lazy_tlb() {
                // No lazy TLB: an idle CPU holds no user root.
                m.switch(vm::kernel_l4());
            }
            cpu_id() == 0 && runner_done(&t)
        };
        if back {
            arch::back_to_runner();
        }
        tlb::poll();
        arch::wait_for_interrupt();
    }
}

/// An AP's life after bring-up: run whatever its queue gets.
pub fn ap_loop() -> ! {
    schedule()
}

/// Runs `slot` and everything it starts until every task has ended.
pub fn run(slot: usize) {
    {
        let mut t = PROCS.lock();
        t.runner_status = None;
        t.procs[slot].state = State::Running;
    }
    CURRENT.this().store(slot, Ordering::Relaxed);
    arch::run_from_runner(return_to_user as *const () as u64);
}

/// Ends the current task with wait status `status`, then schedules.
pub fn exit_current(status: u64) -> ! {
    {
        let mut t = PROCS.lock();
        let mut m = mmu::this_cpu();
        let i = current();
        if !m.lazy_tlb() {
            // The space may be torn down below (or by the last thread elsewhere): without
            // lazy TLB, no CPU may keep it loaded.
            m.switch(vm::kernel_l4());
        }
        if t.procs[i].thread {
            thread_exit(&mut t, &mut m, i, status);
        } else {
            proc_exit(&mut t, &mut m, i, status);
        }
    }
    schedule()
}

/// A thread ends: its joiner (if waiting) gets the status; the last task of a space whose
/// leader exited finishes the leader's exit.
fn thread_exit(t: &mut ProcTable, m: &mut Mmu, i: usize, status: u64) {
    let tid = t.procs[i].pid;
    let leader = t.procs[i].mm;
    t.procs[i].status = status;
    t.procs[i].state = State::Zombie;
    orphan(&mut t.procs, tid);
    if let Some(j) = (0..NPROC).find(|&j| t.procs[j].state == State::Join && t.procs[j].join == tid)
    {
        t.procs[j].frame.rax = status;
        t.make_runnable(j);
        t.procs[i].state = State::Free;
    }
    t.procs[leader].users -= 1;
    if t.procs[leader].state == State::Exiting && t.procs[leader].users == 0 {
        let s = t.procs[leader].status;
        finish_process(t, m, leader, s);
    }
}

/// The child processes of `pid` (a process or a thread that forked) lose their parent:
/// zombies are reaped, the others are re-parented to the runner.
fn orphan(ps: &mut [Proc; NPROC], pid: u64) {
    for q in ps.iter_mut() {
        if q.state != State::Free && !q.thread && q.ppid == pid {
            q.ppid = 0;
            if q.state == State::Zombie {
                q.state = State::Free;
            }
        }
    }
}

/// A process leader ends: at once if it has no live threads, else when the last one ends.
fn proc_exit(t: &mut ProcTable, m: &mut Mmu, i: usize, status: u64) {
    t.procs[i].users -= 1;
    if t.procs[i].users > 0 {
        t.procs[i].status = status;
        t.procs[i].state = State::Exiting;
        return;
    }
    finish_process(t, m, i, status);
}

/// Tears the process's space down and reports its status to the parent (or the runner).
fn finish_process(t: &mut ProcTable, m: &mut Mmu, i: usize, status: u64) {
    t.last_teardown = t.procs[i].space.teardown(m);
    let ps = &mut t.procs;
    let pid = ps[i].pid;
    let ppid = ps[i].ppid;
    // Its never-joined thread zombies go with it.
    for q in ps.iter_mut() {
        if q.thread && q.mm == i && q.state == State::Zombie {
            q.state = State::Free;
        }
    }
    ps[i].status = status;
    ps[i].state = State::Zombie;
    orphan(ps, pid);
    if ppid == 0 {
        ps[i].state = State::Free;
        t.runner_status = Some(status);
        tlb::wake(0);
    } else if let Some(par) = (0..NPROC).find(|&q| ps[q].pid == ppid && ps[q].state == State::Wait)
    {
        ps[par].frame.rax = (status << 32) | pid;
        ps[i].state = State::Free;
        t.make_runnable(par);
    }
    if runner_done(t) {
        tlb::wake(0);
    }
}

/// What `wait` / `join` do next.
pub enum Wait {
    /// A zombie child was reaped: the syscall returns this value.
    Reaped(u64),
    /// The caller blocks (the child's exit sets its rax).
    Block,
    /// No children (no such thread).
    NoChild,
}

/// `wait` for the task in slot `c`: reaps a child process.
pub fn wait(t: &mut ProcTable, c: usize) -> Wait {
    let me = t.procs[c].pid;
    let child = |q: &Proc| !q.thread && q.ppid == me;
    if let Some(z) = t
        .procs
        .iter_mut()
        .find(|q| child(q) && q.state == State::Zombie)
    {
        z.state = State::Free;
        return Wait::Reaped((z.status << 32) | z.pid);
    }
    if t.procs.iter().any(|q| child(q) && q.state != State::Free) {
        t.procs[c].state = State::Wait;
        return Wait::Block;
    }
    Wait::NoChild
}

/// `fork` of the task in slot `c` (the child copies its space and runs on its CPU): the
/// child's pid, or None when no slot is free.
pub fn fork(t: &mut ProcTable, m: &mut Mmu, c: usize) -> Option<u64> {
    let slot = t.free_slot()?;
    let pid = t.new_pid();
    let mm = t.procs[c].mm;
    let (parent, child) = if mm < slot {
        let (a, b) = t.procs.split_at_mut(slot);
        (&mut a[mm], &mut b[0])
    } else {
        let (a, b) = t.procs.split_at_mut(mm);
        (&mut b[0], &mut a[slot])
    };
    // One lazy section: the child's pin, its tables and the copied PTEs go as one batch.
    m.enter_lazy();
    child.space.create(m);
    parent.space.fork_into(m, &mut child.space);
    m.leave_lazy();
    let space = core::mem::replace(&mut child.space, Space::empty());
    let caller = &t.procs[c];
    let (frame, cpu, ppid) = (caller.frame, caller.cpu, caller.pid);
    t.procs[slot] = Proc {
        state: State::Run,
        pid,
        ppid,
        frame: TrapFrame { rax: 0, ..frame },
        space,
        mm: slot,
        users: 1,
        cpu,
        catch: t.procs[mm].catch,
        ..EMPTY
    };
    Some(pid)
}

/// A new thread in the space of slot `c`, starting at `entry` with stack `sp` and `arg` in
/// rdi, on the run queue of CPU `cpu`: its id, or None when no slot is free.
pub fn thread_create(
    t: &mut ProcTable,
    c: usize,
    entry: u64,
    sp: u64,
    arg: u64,
    cpu: usize,
) -> Option<u64> {
    let slot = t.free_slot()?;
    let tid = t.new_pid();
    let mm = t.procs[c].mm;
    t.procs[mm].users += 1;
    t.procs[slot] = Proc {
        state: State::Run,
        pid: tid,
        ppid: t.procs[mm].pid,
        frame: TrapFrame {
            rip: entry,
            cs: arch::UCODE,
            ss: arch::UDATA,
            rflags: USER_RFLAGS,
            rsp: sp,
            rdi: arg,
            ..TrapFrame::default()
        },
        mm,
        thread: true,
        cpu,
        ..EMPTY
    };
    tlb::wake(cpu);
    Some(tid)
}

/// `join` by slot `c` of thread `tid` of its own process.
pub fn join(t: &mut ProcTable, c: usize, tid: u64) -> Wait {
    let mm = t.procs[c].mm;
    let Some(j) = (0..NPROC).find(|&j| {
        t.procs[j].thread
            && t.procs[j].mm == mm
            && t.procs[j].pid == tid
            && t.procs[j].state != State::Free
    }) else {
        return Wait::NoChild;
    };
    if j == c || (0..NPROC).any(|k| t.procs[k].state == State::Join && t.procs[k].join == tid) {
        return Wait::NoChild;
    }
    if t.procs[j].state == State::Zombie {
        t.procs[j].state = State::Free;
        return Wait::Reaped(t.procs[j].status);
    }
    t.procs[c].state = State::Join;
    t.procs[c].join = tid;
    Wait::Block
}

/// Moves the task in slot `c` to CPU `cpu`'s run queue (it runs there from its next
/// schedule on).
pub fn pin(t: &mut ProcTable, c: usize, cpu: usize) {
    t.procs[c].cpu = cpu;
    t.procs[c].state = State::Run;
    tlb::wake(cpu);
}

/// Puts the current task back on its run queue (a yield).
pub fn requeue(t: &mut ProcTable, c: usize) {
    t.procs[c].state = State::Run;
}
