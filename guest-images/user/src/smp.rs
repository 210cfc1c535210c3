//! SMP helpers of the selftest programs: threads (create, join, pin), the current CPU, and
//! access probes that report a fault instead of dying (the kernel's `catch` syscall).

use crate::{exit, mmap, munmap, nr, st, stat, sys, yield_now, MAP_POPULATE, RW};
use core::arch::global_asm;

global_asm!(
    ".section .text",
    ".global utest_thread_entry",
    "utest_thread_entry:",
    "    and rsp, -16",
    "    call {main}",
    "    ud2",
    ".global utest_try_read",
    "utest_try_read:",
    "    xor eax, eax",
    "    mov rdx, [rdi]",
    "    mov [rsi], rdx",
    "    ret",
    ".global utest_try_write",
    "utest_try_write:",
    "    xor eax, eax",
    "    mov [rdi], rsi",
    "    ret",
    ".global utest_fault_resume",
    "utest_fault_resume:",
    "    ret",
    main = sym thread_main,
);

extern "C" {
    fn utest_thread_entry();
    fn utest_try_read(a: u64, out: *mut u64) -> u64;
    fn utest_try_write(a: u64, v: u64) -> u64;
    fn utest_fault_resume();
}

/// A thread's start: the function and its argument, at the top of its stack.
#[repr(C)]
struct Start {
    f: fn(u64) -> i32,
    arg: u64,
}

extern "C" fn thread_main(s: *const Start) -> ! {
    // SAFETY: `spawn` wrote the Start block at the top of this thread's stack.
    let s = unsafe { s.read() };
    exit((s.f)(s.arg))
}

const STACK: u64 = 64 * 1024;

/// A running thread.
pub struct Thread {
    tid: u64,
    stack: u64,
}

/// CPUs online.
pub fn ncpus() -> u64 {
    stat(st::NCPUS)
}

/// The CPU this code runs on.
pub fn cpu() -> u64 {
    sys(nr::CPU, 0, 0, 0, 0)
}

/// Moves the caller to CPU `c % ncpus()`; returns the CPU.
pub fn pin(c: u64) -> u64 {
    let c = c % ncpus();
    sys(nr::PIN, c, 0, 0, 0);
    c
}

/// Starts `f(arg)` as a thread of this process on CPU `c % ncpus()`.
pub fn spawn(f: fn(u64) -> i32, arg: u64, c: u64) -> Thread {
    let stack = mmap(STACK, RW, MAP_POPULATE);
    assert!(stack < 1 << 47, "no thread stack");
    let sp = stack + STACK - 64;
    // SAFETY: the top of the fresh stack mapping, 8-byte aligned.
    unsafe { (sp as *mut Start).write(Start { f, arg }) };
    let tid = sys(
        nr::THREAD,
        utest_thread_entry as *const () as u64,
        sp,
        sp,
        c % ncpus(),
    );
    assert!(tid < 1 << 32, "thread create failed: {tid:#x}");
    Thread { tid, stack }
}

impl Thread {
    /// Waits for the thread; its exit code.
    pub fn join(self) -> i32 {
        let s = sys(nr::JOIN, self.tid, 0, 0, 0);
        munmap(self.stack, STACK);
        ((s >> 8) & 0xff) as i32
    }
}

/// From now on, faults of [`try_read`] / [`try_write`] are reported, not fatal.
pub fn catch_faults() {
    sys(nr::CATCH, utest_fault_resume as *const () as u64, 0, 0, 0);
}

/// Reads the u64 at `a`; None if the access faulted ([`catch_faults`] first).
pub fn try_read(a: u64) -> Option<u64> {
    let mut v = 0;
    // SAFETY: the probe touches only `a` (a fault resumes at its `ret` with rax = 1) and
    // writes `v`.
    let faulted = unsafe { utest_try_read(a, &mut v) };
    (faulted == 0).then_some(v)
}

/// Writes the u64 at `a`; false if the access faulted.
pub fn try_write(a: u64, v: u64) -> bool {
    // SAFETY: as try_read.
    unsafe { utest_try_write(a, v) == 0 }
}

/// Spins until `done()`, yielding when threads share CPUs (one CPU: the other side runs
/// only when this one yields) and now and then otherwise.
pub fn wait_until(mut done: impl FnMut() -> bool) {
    let shared = ncpus() == 1;
    let mut k = 0u64;
    while !done() {
        k += 1;
        if shared || k.is_multiple_of(4096) {
            yield_now();
        }
        core::hint::spin_loop();
    }
}

/// Yields if this CPU is shared by the test's threads (one CPU online).
pub fn relax(ncpu: u64) {
    if ncpu == 1 {
        yield_now();
    }
}

use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

/// A hot-translation probe shared by the main thread and a prober thread on another CPU:
/// the prober keeps the translation of `addr` hot (reading, or writing with `write`), until
/// the main thread has changed the mapping; then one more access must see the change.
pub struct Hot {
    round: AtomicU64,
    addr: AtomicU64,
    write: AtomicU64,
    hot: AtomicU64,
    changed: AtomicU64,
    done: AtomicU64,
    seen: AtomicU64,
    expect: AtomicU64,
}

/// What the prober's access after the change gave.
pub const FAULTED: u64 = u64::MAX;

/// The probe of a test program.
pub static HOT: Hot = Hot {
    round: AtomicU64::new(0),
    addr: AtomicU64::new(0),
    write: AtomicU64::new(0),
    hot: AtomicU64::new(0),
    changed: AtomicU64::new(0),
    done: AtomicU64::new(0),
    seen: AtomicU64::new(0),
    expect: AtomicU64::new(FAULTED),
};

fn access(a: u64, write: bool, v: u64) -> u64 {
    if write {
        if try_write(a, v) {
            v
        } else {
            FAULTED
        }
    } else {
        try_read(a).unwrap_or(FAULTED)
    }
}

/// Runs `rounds` rounds of the [`HOT`] protocol against a [`prober`] thread on CPU 1:
/// `round(r)` makes round `r`'s change and returns whether the prober saw it stale. Returns
/// the number of stale rounds, or the failing line of a check (of a round or the join).
pub fn probe_rounds(
    rounds: u64,
    mut round: impl FnMut(u64) -> Result<bool, i32>,
) -> Result<u64, i32> {
    catch_faults();
    let t = spawn(prober, rounds, 1);
    let mut stale = 0;
    for r in 1..=rounds {
        if round(r)? {
            stale += 1;
        }
    }
    crate::ensure!(t.join() == 0, "prober");
    Ok(stale)
}

/// Accesses the prober makes after a change (besides the first).
const AFTER: u64 = 15;

/// The prober thread's body: `rounds` rounds of the [`HOT`] protocol.
pub fn prober(rounds: u64) -> i32 {
    let n = ncpus();
    for r in 1..=rounds {
        wait_until(|| HOT.round.load(SeqCst) >= r);
        let a = HOT.addr.load(SeqCst);
        let w = HOT.write.load(SeqCst) != 0;
        let mut k = 0u64;
        while HOT.changed.load(SeqCst) < r {
            access(a, w, r);
            k += 1;
            if k == 64 {
                HOT.hot.store(r, SeqCst);
            }
            if k >= 64 {
                relax(n);
            }
        }
        // The change is done: every later access must see it. Look repeatedly (a stale
        // translation lasts until this CPU's TLB drops it), keeping the first stale result.
        let mut seen = access(a, w, r);
        for _ in 0..AFTER {
            let v = access(a, w, r);
            if HOT.stale(v) && !HOT.stale(seen) {
                seen = v;
            }
        }
        HOT.seen.store(seen, SeqCst);
        HOT.done.store(r, SeqCst);
    }
    0
}

impl Hot {
    /// True if `v` (an access after the change) shows the old mapping: an access that did
    /// not fault, or a read that returned anything but the expected new value.
    fn stale(&self, v: u64) -> bool {
        match self.expect.load(SeqCst) {
            FAULTED => v != FAULTED,
            e => v != e,
        }
    }

    /// Main thread: what the prober's accesses after the next change must see: [`FAULTED`]
    /// (the default) or the new value.
    pub fn expect(&self, v: u64) {
        self.expect.store(v, SeqCst);
    }

    /// Main thread, round `r`: lets the prober access `addr` (writing if `write`) and
    /// waits until its translation is hot on its CPU.
    pub fn start(&self, r: u64, addr: u64, write: bool) {
        self.addr.store(addr, SeqCst);
        self.write.store(u64::from(write), SeqCst);
        self.round.store(r, SeqCst);
        wait_until(|| self.hot.load(SeqCst) >= r);
    }

    /// Main thread: the mapping changed (the syscall returned); what the prober's accesses
    /// after it saw: the first stale result if any (see [`Hot::expect`]), else the first.
    pub fn changed(&self, r: u64) -> u64 {
        self.changed.store(r, SeqCst);
        wait_until(|| self.done.load(SeqCst) >= r);
        self.seen.load(SeqCst)
    }
}
