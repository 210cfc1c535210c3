//! Console on COM1 (the VMM's UART is always ready, so no LSR polling) and reset.

use core::arch::asm;

const COM1: u16 = 0x3f8;

/// Writes bytes to COM1.
pub struct Console;

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                outb(COM1, b'\r');
            }
            outb(COM1, b);
        }
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

/// `out dx, al`.
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// Pulses the i8042 reset line; the VMM ends the VM.
pub fn reset() -> ! {
    outb(0x64, 0xfe);
    loop {
        // SAFETY: halting with interrupts off parks the CPU.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) };
    }
}
