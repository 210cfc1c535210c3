//! Stdin → serial input through event-manager, and the terminal raw-mode guard.

use crate::devices::serial::SerialDevice;
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

/// Feeds stdin bytes into the UART's receive FIFO.
struct StdinInput {
    serial: Arc<Mutex<SerialDevice>>,
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
                if let Ok(mut s) = self.serial.lock() {
                    let _ = s.uart.enqueue_raw_bytes(&buf[..n]);
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&std::io::stdin(), EventSet::IN));
    }
}

/// Spawns the input thread; it runs until `stop` is set.
pub fn spawn_stdin(
    serial: Arc<Mutex<SerialDevice>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("pvmm-stdin".into())
        .spawn(move || {
            let Ok(mut em) = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            else {
                return;
            };
            em.add_subscriber(Arc::new(Mutex::new(StdinInput { serial })));
            while !stop.load(Ordering::Acquire) {
                if em.run_with_timeout(100).is_err() {
                    break;
                }
            }
        })
}
