//! Ending a VM from outside: SIGINT, SIGTERM and SIGHUP (and the console's escape sequence)
//! record a request that the supervisor acts on, so the VM stops cleanly, the report is
//! printed and the terminal is restored. The handler only stores the signal number.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use vmm_sys_util::signal::register_signal_handler;

/// The signals that end the VM cleanly.
pub const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The first stop request (a signal number), 0 while none.
static REQUESTED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signo: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only an atomic store: async-signal-safe. The first request wins.
    let _ = REQUESTED.compare_exchange(0, signo, Ordering::SeqCst, Ordering::SeqCst);
}

/// Installs the handlers (idempotent).
pub fn install() -> Result<(), vmm_sys_util::errno::Error> {
    for s in STOP_SIGNALS {
        register_signal_handler(s, on_signal)?;
    }
    Ok(())
}

/// The request came from the console escape, not a real signal.
static FROM_CONSOLE: AtomicBool = AtomicBool::new(false);

/// Asks the supervisor to end the VM as if SIGINT had arrived (the console escape).
pub fn request_from_console() {
    if REQUESTED
        .compare_exchange(0, libc::SIGINT, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
    {
        FROM_CONSOLE.store(true, Ordering::SeqCst);
    }
}

/// What ended the VM, for the one-line message.
pub fn describe(signo: i32) -> String {
    if FROM_CONSOLE.load(Ordering::SeqCst) {
        "ended from the console (Ctrl-a x)".into()
    } else {
        format!("ended by {}", name(signo))
    }
}

/// The pending stop request, if any.
pub fn pending() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The signal's conventional name.
pub fn name(signo: i32) -> &'static str {
    match signo {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(name(libc::SIGINT), "SIGINT");
        assert_eq!(name(libc::SIGHUP), "SIGHUP");
        assert_eq!(name(libc::SIGTERM), "SIGTERM");
    }
}
