//! The allow-lists: per thread kind, every syscall a thread makes once its filter is on, each
//! with a one-line reason and, where they matter, conditions on its arguments. Found by
//! running the VMM under `strace -f` (selftests in every MMU mode, SMP, `--stats json`,
//! `--stats-interval`, `--serial file=`, `-vv`, an interactive terminal, `bench-exits`).
//! Everything else, `open`/`openat`, `execve`, `socket`, `ptrace`, `clone`, `fork` among
//! them, is refused.

use super::ioctls;
use super::ThreadKind;

/// A condition on one syscall argument (all of an entry's conditions must hold).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// Argument `index` (32-bit compare) equals the value.
    Is(u8, u64),
    /// Argument `index` (32-bit compare) has none of these bits set.
    Without(u8, u64),
}

/// One allowed syscall (or one allowed argument pattern of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// The syscall number (`libc::SYS_*`).
    pub nr: i64,
    /// Conditions on its arguments; empty: any arguments.
    pub args: Vec<Arg>,
    /// Why the thread needs it.
    pub why: &'static str,
}

/// What the rules need to know about the running process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    /// This process's id (`tgkill` may only signal our own threads).
    pub pid: u32,
    /// The vCPU kick signal (the only signal the supervisor may send).
    pub kick_signal: i32,
}

fn any(nr: i64, why: &'static str) -> Allowed {
    Allowed {
        nr,
        args: Vec::new(),
        why,
    }
}

fn when(nr: i64, args: &[Arg], why: &'static str) -> Allowed {
    Allowed {
        nr,
        args: args.to_vec(),
        why,
    }
}

/// `ioctl(any fd, request)`.
fn ioctl(request: u64, why: &'static str) -> Allowed {
    when(libc::SYS_ioctl, &[Arg::Is(1, request)], why)
}

/// Terminal ioctls on stdin only.
fn tty(request: u64, why: &'static str) -> Allowed {
    when(libc::SYS_ioctl, &[Arg::Is(0, 0), Arg::Is(1, request)], why)
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;

/// What every filtered thread needs: memory, locks, signals, ending.
fn common() -> Vec<Allowed> {
    vec![
        any(libc::SYS_futex, "mutexes, channels, thread joins"),
        any(libc::SYS_sched_yield, "std channels back off by yielding"),
        any(
            libc::SYS_write,
            "serial output, eventfd IRQs, logs and reports on stderr, stats lines",
        ),
        any(
            libc::SYS_close,
            "dropping fds (vCPU, stats, eventfd, epoll) at the end",
        ),
        when(
            libc::SYS_mmap,
            &[Arg::Without(2, PROT_EXEC)],
            "malloc; never executable memory",
        ),
        when(
            libc::SYS_mprotect,
            &[Arg::Without(2, PROT_EXEC)],
            "malloc arena growth; never executable",
        ),
        any(
            libc::SYS_munmap,
            "free, guest memory teardown, kvm_run unmapping",
        ),
        any(libc::SYS_mremap, "realloc of large buffers"),
        any(
            libc::SYS_madvise,
            "free returns pages (MADV_DONTNEED), thread stack release",
        ),
        any(libc::SYS_brk, "malloc's main arena"),
        any(
            libc::SYS_rt_sigreturn,
            "return from the kick and SIGSYS handlers",
        ),
        any(
            libc::SYS_restart_syscall,
            "the kernel resumes a timed wait (futex, nanosleep) a handled signal interrupted",
        ),
        any(
            libc::SYS_rt_sigprocmask,
            "glibc masks signals around pthread_kill and thread exit",
        ),
        any(
            libc::SYS_sigaltstack,
            "Rust removes a thread's alternate signal stack at its exit",
        ),
        any(
            libc::SYS_clock_gettime,
            "Instant::now where the vDSO falls back to the syscall",
        ),
        any(libc::SYS_exit, "thread exit"),
        when(
            libc::SYS_pkey_mprotect,
            &[Arg::Without(2, PROT_EXEC)],
            "the kernel flush's zap (vCPUs) and key 0 put back at the VM's end; never executable",
        ),
        any(
            libc::SYS_pkey_free,
            "the kernel flush's protection key, freed with the VM's last reference",
        ),
        any(
            libc::SYS_exit_group,
            "process exit, and the SIGSYS handler ending the VM",
        ),
        tty(
            libc::TCGETS,
            "terminal restore (raw-mode guard, panic hook, SIGSYS handler)",
        ),
        tty(
            libc::TCSETS,
            "terminal restore (raw-mode guard, panic hook, SIGSYS handler)",
        ),
    ]
}

/// A vCPU thread: `KVM_RUN`, the exit path's register and memslot ioctls, KVM stats.
fn vcpu(ctx: &Context) -> Vec<Allowed> {
    vec![
        any(libc::SYS_getpid, "pthread_kill asks for the process id"),
        when(
            libc::SYS_tgkill,
            &[
                Arg::Is(0, u64::from(ctx.pid)),
                Arg::Is(2, ctx.kick_signal as u64),
            ],
            "kick other vCPUs out of KVM_RUN to deliver remote TLB flushes and stop the \
             world: only our process, only the kick signal",
        ),
        ioctl(ioctls::KVM_RUN(), "enter the guest"),
        ioctl(
            ioctls::KVM_GET_SREGS(),
            "read CR3 before a CR3 load or flush; register dump",
        ),
        ioctl(
            ioctls::KVM_SET_SREGS(),
            "CR3 load or CR3-toggle flush after MMU batches",
        ),
        ioctl(
            ioctls::KVM_GET_REGS(),
            "register dump when the vCPU ends (failure or -v)",
        ),
        ioctl(
            ioctls::KVM_SET_USER_MEMORY_REGION(),
            "host resync: re-register the pool memslot",
        ),
        ioctl(
            ioctls::KVM_SET_MSRS(),
            "kernel flush (dirty-log trigger): the wall-clock MSR dirties the trigger page",
        ),
        ioctl(
            ioctls::KVM_GET_DIRTY_LOG(),
            "kernel flush (dirty-log trigger): fetching the trigger page's log flushes every vCPU",
        ),
        any(
            libc::SYS_pread64,
            "KVM binary stats fd at the end and for interval snapshots",
        ),
        any(
            libc::SYS_getrandom,
            "seeding std's HashMap keys (the --check-shadow invariant checker); no fd, no file",
        ),
    ]
}

/// The supervisor (main) thread: waits, kicks vCPUs, writes interval lines and the report.
fn supervisor(ctx: &Context) -> Vec<Allowed> {
    vec![
        any(libc::SYS_getpid, "pthread_kill asks for the process id"),
        when(
            libc::SYS_tgkill,
            &[
                Arg::Is(0, u64::from(ctx.pid)),
                Arg::Is(2, ctx.kick_signal as u64),
            ],
            "kick vCPU threads out of KVM_RUN: only our process, only the kick signal",
        ),
    ]
}

/// The stdin thread: event-manager's epoll loop feeding the UART.
fn stdin() -> Vec<Allowed> {
    vec![
        when(
            libc::SYS_read,
            &[Arg::Is(0, 0)],
            "terminal or FIFO input (stdin only)",
        ),
        any(libc::SYS_epoll_wait, "event-manager waits for input"),
        any(
            libc::SYS_epoll_pwait,
            "event-manager waits for input (libc variant)",
        ),
        any(
            libc::SYS_epoll_ctl,
            "event-manager drops stdin at end of input",
        ),
    ]
}

/// The full allow-list of a thread kind.
pub fn allowed(kind: ThreadKind, ctx: &Context) -> Vec<Allowed> {
    // Kind-specific entries first: among one syscall's rules the filter tries them in this
    // order, so `KVM_RUN`, the hot one, is the first `ioctl` request compared.
    let mut v = match kind {
        ThreadKind::Vcpu => vcpu(ctx),
        ThreadKind::Supervisor => supervisor(ctx),
        ThreadKind::Stdin => stdin(),
    };
    v.extend(common());
    v
}
