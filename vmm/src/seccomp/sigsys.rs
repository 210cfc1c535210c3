//! What happens when a filtered thread makes a syscall outside its list: the filters return
//! `SECCOMP_RET_TRAP`, so the kernel skips the syscall and sends `SIGSYS` to that thread, and
//! this handler records it. With `kill` it prints one line, restores the terminal and ends
//! the process with [`exit_code::SECCOMP`]; with `log` it reports the first one,
//! makes the syscall fail with `EPERM` and lets the thread go on. The handler only does
//! async-signal-safe work: atomics, a stack buffer, `write(2)`, `tcsetattr`, `_exit`.
//!
//! One refusal is silent: glibc's `free` may open `/proc/sys/vm/overcommit_memory` (once per
//! process, when it first shrinks a thread arena). That `openat` fails with `EACCES`, which
//! glibc handles; it is not a violation.

use super::names;
use super::SeccompMode;
use crate::error::exit_code;
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;

/// No violation recorded yet.
const NONE: i64 = -1;
static MODE: AtomicU8 = AtomicU8::new(0);
static FIRST_NR: AtomicI64 = AtomicI64::new(NONE);
static FIRST_THREAD: AtomicU32 = AtomicU32::new(0);
static COUNT: AtomicU64 = AtomicU64::new(0);
static TERMINAL: OnceLock<libc::termios> = OnceLock::new();
const OVERCOMMIT: &[u8] = b"/proc/sys/vm/overcommit_memory\0";

thread_local! {
    /// This thread's label for reports: `kind << 16 | index`.
    static LABEL: Cell<u32> = const { Cell::new(0) };
}

/// The first syscall a filter refused, and how many it refused in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Syscall number.
    pub nr: i64,
    /// The thread that made it (its label, e.g. `vcpu0`).
    pub thread: ThreadLabel,
    /// Refused syscalls in all (log mode keeps counting).
    pub count: u64,
}

/// A thread's kind and index, as stored for the handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadLabel(u32);

impl ThreadLabel {
    /// The label of thread `index` of `kind`.
    pub fn new(kind: super::ThreadKind, index: usize) -> ThreadLabel {
        ThreadLabel((kind as u32) << 16 | (index as u32 & 0xffff))
    }
}

impl std::fmt::Display for ThreadLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 >> 16 {
            0 => write!(f, "vcpu{}", self.0 & 0xffff),
            1 => f.write_str("supervisor"),
            _ => f.write_str("stdin"),
        }
    }
}

/// Marks the calling thread for reports (called when its filter goes on).
pub fn set_label(label: ThreadLabel) {
    LABEL.with(|l| l.set(label.0));
}

/// The refused syscalls so far, if any.
pub fn violation() -> Option<Violation> {
    let nr = FIRST_NR.load(Ordering::Acquire);
    (nr != NONE).then(|| Violation {
        nr,
        thread: ThreadLabel(FIRST_THREAD.load(Ordering::Acquire)),
        count: COUNT.load(Ordering::Acquire),
    })
}

/// The one-line report of a violation (`ended`: the VM is being killed).
pub fn describe(v: &Violation, ended: bool, out: &mut impl std::fmt::Write) -> std::fmt::Result {
    write!(out, "pvmm: seccomp: thread {} made syscall ", v.thread)?;
    match names::name(v.nr) {
        Some(n) => write!(out, "{n} ({})", v.nr)?,
        None => write!(out, "#{}", v.nr)?,
    }
    if ended {
        write!(
            out,
            " outside its allow-list; VM killed (--seccomp kill, exit code {})",
            exit_code::SECCOMP
        )
    } else {
        write!(
            out,
            " outside its allow-list; refused with EPERM, run continues (--seccomp log)"
        )
    }
}

/// Installs the `SIGSYS` handler for `mode` (process-wide, before any filter goes on) and
/// remembers the terminal settings so a kill can restore them.
pub fn install(mode: SeccompMode) -> Result<(), std::io::Error> {
    MODE.store(mode as u8, Ordering::Release);
    let mut t = std::mem::MaybeUninit::<libc::termios>::zeroed();
    // SAFETY: isatty/tcgetattr on our own stdin with a valid out pointer.
    if unsafe { libc::isatty(0) == 1 && libc::tcgetattr(0, t.as_mut_ptr()) == 0 } {
        // SAFETY: tcgetattr succeeded, so it initialised `t`.
        let _ = TERMINAL.set(unsafe { t.assume_init() });
    }
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// `siginfo_t` as the kernel fills it for `SIGSYS` (x86_64): the trapped syscall at 24.
#[repr(C)]
#[allow(dead_code)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut c_void,
    syscall: i32,
    arch: u32,
}

/// A fixed buffer `fmt::Write` can fill without allocating.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len().saturating_sub(self.len + 1);
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

fn report(v: &Violation, ended: bool) {
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    let _ = describe(v, ended, &mut line);
    line.buf[line.len] = b'\n';
    // SAFETY: writing our own initialised buffer to stderr.
    unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len + 1) };
}

/// True if the trapped call is glibc's overcommit probe (`openat` of that one path).
///
/// # Safety
/// `uc` must be the handler's ucontext.
unsafe fn is_overcommit_probe(nr: i64, uc: *const libc::ucontext_t) -> bool {
    if nr != libc::SYS_openat {
        return false;
    }
    // SAFETY: per the contract; rsi holds openat's path pointer, which the trapped code
    // passed to the kernel and which points to a NUL-terminated string or faults either way.
    let path = unsafe { (*uc).uc_mcontext.gregs[libc::REG_RSI as usize] } as *const u8;
    if path.is_null() {
        return false;
    }
    // SAFETY: compared byte by byte, stopping at the first difference (so at the NUL).
    OVERCOMMIT
        .iter()
        .enumerate()
        .all(|(i, &b)| unsafe { *path.add(i) } == b)
}

/// Sets the trapped syscall's return value to `-errno`.
///
/// # Safety
/// `uc` must be the handler's ucontext.
unsafe fn fail_with(uc: *mut libc::ucontext_t, errno: i32) {
    // SAFETY: per the contract; the kernel restores rax from here on sigreturn.
    unsafe { (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(errno) };
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: the kernel passes a SIGSYS siginfo (SA_SIGINFO) whose layout is SigsysInfo.
    let nr = i64::from(unsafe { (*info.cast::<SigsysInfo>()).syscall });
    // SAFETY: `uc` is this handler's ucontext.
    if unsafe { is_overcommit_probe(nr, uc) } {
        // SAFETY: as above.
        unsafe { fail_with(uc, libc::EACCES) };
        return;
    }
    let label = LABEL.with(Cell::get);
    let first = FIRST_NR
        .compare_exchange(NONE, nr, Ordering::AcqRel, Ordering::Acquire)
        .is_ok();
    if first {
        FIRST_THREAD.store(label, Ordering::Release);
    }
    let count = COUNT.fetch_add(1, Ordering::AcqRel) + 1;
    let v = Violation {
        nr,
        thread: ThreadLabel(label),
        count,
    };
    if MODE.load(Ordering::Acquire) == SeccompMode::Log as u8 {
        if first {
            report(&v, false);
        }
        // SAFETY: as above.
        unsafe { fail_with(uc, libc::EPERM) };
        return;
    }
    report(&v, true);
    if let Some(t) = TERMINAL.get() {
        // SAFETY: restoring the settings stdin had at start-up.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
    }
    // SAFETY: ends the process at once; nothing else is safe from here.
    unsafe { libc::_exit(exit_code::SECCOMP) };
}

/// The test-only trigger (`--debug-seccomp-violation`): a syscall no allow-list has
/// (`socket(AF_INET, SOCK_STREAM)`); a socket it did create is closed again.
pub fn provoke_violation() -> i32 {
    // SAFETY: plain socket creation; the fd, if any, is ours and closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd >= 0 {
        // SAFETY: closing the fd we just created.
        unsafe { libc::close(fd) };
    }
    fd
}
