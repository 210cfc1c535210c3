//! Interrupting a vCPU thread blocked in `KVM_RUN` with a real-time signal.

use std::thread::JoinHandle;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler (idempotent); without it the signal would kill the process.
pub fn install() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), noop)
}

/// Sends the kick signal to `thread` (harmless if it already finished).
pub fn kick<T>(thread: &JoinHandle<T>) {
    if !thread.is_finished() {
        let _ = thread.kill(kick_signal());
    }
}
