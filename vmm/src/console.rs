//! Stdin → serial input through event-manager, and the terminal raw-mode guard.

use crate::devices::serial::SerialDevice;
use crate::seccomp::{Filters, ThreadKind};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vmm_sys_util::terminal::Terminal;

/// True if stdin is a terminal or a FIFO (the only inputs wired to the guest).
pub fn stdin_is_interactive() -> bool {
    let fd = std::io::stdin().as_raw_fd();
    // SAFETY: `stat` is plain old data; all-zero bytes are a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on our own stdin fd with a valid, writable out pointer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    let fmt = st.st_mode & libc::S_IFMT;
    // SAFETY: isatty only inspects the descriptor.
    fmt == libc::S_IFIFO || (fmt == libc::S_IFCHR && unsafe { libc::isatty(fd) } == 1)
}

static RAW_ACTIVE: AtomicBool = AtomicBool::new(false);

/// Puts the terminal in raw mode; restores canonical mode on drop and on panic.
pub struct RawModeGuard;

impl RawModeGuard {
    /// Enters raw mode if stdin is a terminal.
    pub fn enter() -> Option<RawModeGuard> {
        // SAFETY: isatty on our stdin.
        if unsafe { libc::isatty(std::io::stdin().as_raw_fd()) } != 1 {
            return None;
        }
        std::io::stdin().lock().set_raw_mode().ok()?;
        RAW_ACTIVE.store(true, Ordering::SeqCst);
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            prev(info);
        }));
        Some(RawModeGuard)
    }
}

fn restore() {
    if RAW_ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// The console escape key (Ctrl-a), as in QEMU's `-nographic` console.
pub const ESCAPE: u8 = 0x01;

/// What one input byte means after escape processing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// Nothing to send yet (the escape key, waiting for the next byte).
    Pending,
    /// Send these bytes to the guest (one or two).
    Send([u8; 2], usize),
    /// End the VM (Ctrl-a x).
    Quit,
}

/// The escape-sequence state machine: Ctrl-a x quits, Ctrl-a Ctrl-a sends one Ctrl-a, and
/// Ctrl-a followed by anything else sends both bytes.
#[derive(Default)]
pub struct Escape {
    armed: bool,
}

impl Escape {
    /// Feeds one byte typed at the console.
    pub fn feed(&mut self, b: u8) -> Key {
        match (std::mem::take(&mut self.armed), b) {
            (false, ESCAPE) => {
                self.armed = true;
                Key::Pending
            }
            (false, b) => Key::Send([b, 0], 1),
            (true, b'x') | (true, b'X') => Key::Quit,
            (true, ESCAPE) => Key::Send([ESCAPE, 0], 1),
            (true, b) => Key::Send([ESCAPE, b], 2),
        }
    }
}

/// Feeds stdin bytes into the UART's receive FIFO, after escape processing.
struct StdinInput {
    serial: Arc<Mutex<SerialDevice>>,
    escape: Escape,
}

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.event_set().contains(EventSet::HANG_UP)
            || events.event_set().contains(EventSet::ERROR)
        {
            let _ = ops.remove(events);
            return;
        }
        let mut buf = [0u8; 64];
        match std::io::stdin().read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = ops.remove(events);
            }
            Ok(n) => {
                let mut out = Vec::with_capacity(n + 1);
                for &b in buf.get(..n).unwrap_or_default() {
                    match self.escape.feed(b) {
                        Key::Pending => {}
                        Key::Send(bytes, len) => {
                            out.extend_from_slice(bytes.get(..len).unwrap_or_default())
                        }
                        Key::Quit => crate::signals::request_from_console(),
                    }
                }
                if let Ok(mut s) = self.serial.lock() {
                    let _ = s.uart.enqueue_raw_bytes(&out);
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&std::io::stdin(), EventSet::IN));
    }
}

/// Spawns the input thread; it installs its seccomp filter once its epoll set is ready and
/// runs until `stop` is set.
pub fn spawn_stdin(
    serial: Arc<Mutex<SerialDevice>>,
    stop: Arc<AtomicBool>,
    filters: Arc<Filters>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("pvmm-stdin".into())
        .spawn(move || {
            let Ok(mut em) = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            else {
                return;
            };
            em.add_subscriber(Arc::new(Mutex::new(StdinInput {
                serial,
                escape: Escape::default(),
            })));
            // Before the first byte of input is handled.
            if let Err(e) = filters.install(ThreadKind::Stdin, 0) {
                log::error!("{e}; ending the VM");
                stop.store(true, Ordering::Release);
                return;
            }
            while !stop.load(Ordering::Acquire) {
                if em.run_with_timeout(100).is_err() {
                    break;
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequence() {
        let mut e = Escape::default();
        assert_eq!(e.feed(b'a'), Key::Send([b'a', 0], 1));
        assert_eq!(e.feed(ESCAPE), Key::Pending);
        assert_eq!(e.feed(b'x'), Key::Quit);
        assert_eq!(e.feed(b'x'), Key::Send([b'x', 0], 1), "disarmed after use");
        assert_eq!(e.feed(ESCAPE), Key::Pending);
        assert_eq!(e.feed(ESCAPE), Key::Send([ESCAPE, 0], 1));
        assert_eq!(e.feed(ESCAPE), Key::Pending);
        assert_eq!(e.feed(b'q'), Key::Send([ESCAPE, b'q'], 2));
        assert_eq!(
            e.feed(0x03),
            Key::Send([0x03, 0], 1),
            "Ctrl-C goes to the guest"
        );
    }
}
