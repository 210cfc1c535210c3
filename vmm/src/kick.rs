//! Interrupting a vCPU thread blocked in `KVM_RUN` with a real-time signal.
//!
//! The handler sets `immediate_exit` in the `kvm_run` area of the thread it lands on (each
//! vCPU thread arms it with [`arm`]), so a kick that arrives just before the thread enters
//! `KVM_RUN` makes that `KVM_RUN` return `EINTR` at once instead of being lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: `arm` stored a pointer into this thread's mapped `kvm_run`, which stays
        // mapped until the thread disarms it; a byte store is async-signal-safe.
        unsafe { p.write_volatile(1) };
    }
}

/// Installs the handler (idempotent); without it the signal would kill the process.
pub fn install() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), on_kick)
}

/// Makes kicks of the calling thread set `*immediate_exit` (null disarms). The pointer must
/// stay valid until the thread disarms it.
pub fn arm(immediate_exit: *mut u8) {
    IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
}

/// Sends the kick signal to `thread` (harmless if it already finished).
pub fn kick<T>(thread: &JoinHandle<T>) {
    if !thread.is_finished() {
        let _ = thread.kill(kick_signal());
    }
}

/// Kicks vCPU threads by index: each thread registers itself ([`ThreadKicker::register`])
/// before its first `KVM_RUN`; a vCPU not registered yet (or gone) is not signalled.
#[derive(Clone, Default)]
pub struct ThreadKicker {
    threads: Arc<Vec<AtomicU64>>,
}

impl ThreadKicker {
    /// A kicker for `vcpus` threads.
    pub fn new(vcpus: usize) -> ThreadKicker {
        ThreadKicker {
            threads: Arc::new((0..vcpus).map(|_| AtomicU64::new(0)).collect()),
        }
    }

    /// The calling thread is vCPU `v` (`on` false: it is ending, unregister it).
    pub fn register(&self, v: usize, on: bool) {
        let me = if on {
            // SAFETY: pthread_self has no preconditions.
            unsafe { libc::pthread_self() }
        } else {
            0
        };
        if let Some(t) = self.threads.get(v) {
            t.store(me, Ordering::Release);
        }
    }
}

impl crate::rendezvous::Kicker for ThreadKicker {
    fn kick(&self, v: usize) {
        let t = self.threads.get(v).map_or(0, |t| t.load(Ordering::Acquire));
        if t != 0 {
            // SAFETY: `t` is a live vCPU thread (it unregisters before it exits); the signal
            // has a handler.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }
}
