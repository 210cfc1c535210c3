//! Console on COM1 (the VMM's UART is always ready, so no LSR polling) and reset.

use crate::arch::{halt_forever, outb};

const COM1: u16 = 0x3f8;

/// Writes to COM1 (LF becomes CR LF).
pub struct Console;

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Writes raw bytes (user `write`).
pub fn write_bytes(b: &[u8]) {
    for &c in b {
        if c == b'\n' {
            outb(COM1, b'\r');
        }
        outb(COM1, c);
    }
}

/// Pulses the i8042 reset line; the VMM ends the VM.
pub fn reset() -> ! {
    outb(0x64, 0xfe);
    halt_forever()
}
