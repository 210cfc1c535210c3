//! The i8042 keyboard controller at 0x60/0x64 (vm-superio): its reset line ends the VM.

use super::bus::BusDevice;
use super::trigger::FlagTrigger;
use vm_superio::I8042Device;

/// Data port; the command port is at +4 (registered as a second range).
pub const I8042_DATA: u64 = 0x60;
/// Command/status port.
pub const I8042_CMD: u64 = 0x64;

/// The controller as a bus device; registered for both ports with offsets 0 and 4.
pub struct I8042 {
    dev: I8042Device<FlagTrigger>,
}

impl I8042 {
    /// A controller whose CPU-reset command raises `reset` (the VM's reset line).
    pub fn new(reset: FlagTrigger) -> I8042 {
        I8042 {
            dev: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn name(&self) -> &'static str {
        "i8042"
    }
    fn read(&mut self, _vcpu: usize, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.dev.read(offset as u8);
        }
    }
    fn write(&mut self, _vcpu: usize, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            let _ = self.dev.write(offset as u8, b);
        }
    }
}

/// Routes the command port to offset 4 of the shared device.
pub struct I8042CmdPort(pub std::sync::Arc<std::sync::Mutex<I8042>>);

impl BusDevice for I8042CmdPort {
    fn name(&self) -> &'static str {
        "i8042"
    }
    fn read(&mut self, vcpu: usize, _offset: u64, data: &mut [u8]) {
        if let Ok(mut d) = self.0.lock() {
            d.read(vcpu, 4, data)
        }
    }
    fn write(&mut self, vcpu: usize, _offset: u64, data: &[u8]) {
        if let Ok(mut d) = self.0.lock() {
            d.write(vcpu, 4, data)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_vm() {
        let line = FlagTrigger::default();
        let mut k = I8042::new(line.clone());
        k.write(0, 4, &[0x20]);
        assert!(!line.take());
        k.write(0, 4, &[0xfe]);
        assert!(line.take(), "CPU reset raises the line");
        assert!(!line.take(), "taken once");
    }
}
