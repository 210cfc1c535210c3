//! The 16550A UART at 0x3f8 (vm-superio), and its output sinks.

use super::bus::BusDevice;
use super::trigger::IrqTrigger;
use crate::cli::SerialMode;
use crate::error::SetupError;
use std::io::Write;
use vm_superio::Serial;

/// Where serial output goes.
pub enum SerialOut {
    /// The VMM's stdout.
    Stdout(std::io::Stdout),
    /// A file.
    File(std::fs::File),
    /// Nowhere.
    Sink,
}

impl SerialOut {
    /// Opens the sink `--serial` names (a file is created or appended to).
    pub fn open(mode: &SerialMode) -> Result<SerialOut, SetupError> {
        Ok(match mode {
            SerialMode::Stdio => SerialOut::Stdout(std::io::stdout()),
            SerialMode::None => SerialOut::Sink,
            SerialMode::File(p) => SerialOut::File(crate::error::open_output(p)?),
        })
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            SerialOut::Stdout(s) => {
                let n = s.write(buf)?;
                s.flush()?;
                Ok(n)
            }
            SerialOut::File(f) => f.write(buf),
            SerialOut::Sink => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            SerialOut::Stdout(s) => s.flush(),
            SerialOut::File(f) => f.flush(),
            SerialOut::Sink => Ok(()),
        }
    }
}

/// COM1 base port.
pub const COM1: u64 = 0x3f8;
/// COM1 IRQ line.
pub const COM1_IRQ: u32 = 4;

/// The UART as a bus device.
pub struct SerialDevice {
    /// The vm-superio model.
    pub uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialOut>,
    /// An output error was already reported (report once, not per byte).
    pub write_failed: bool,
}

impl BusDevice for SerialDevice {
    fn name(&self) -> &'static str {
        "serial"
    }
    fn read(&mut self, _vcpu: usize, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }
    fn write(&mut self, _vcpu: usize, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, b) {
                if !self.write_failed {
                    log::warn!("serial output failed (further errors not shown): {e:?}");
                }
                self.write_failed = true;
            }
        }
    }
}
