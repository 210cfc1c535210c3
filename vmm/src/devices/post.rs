//! Port 0x80: POST codes are accepted, remembered and counted (by the exit statistics).

use super::bus::BusDevice;

/// The POST code port.
pub const POST_PORT: u64 = 0x80;

/// Remembers the last POST code written.
#[derive(Default)]
pub struct PostCode {
    /// Last value written, if any.
    pub last: Option<u8>,
}

impl BusDevice for PostCode {
    fn name(&self) -> &'static str {
        "post"
    }
    fn read(&mut self, _vcpu: usize, _offset: u64, data: &mut [u8]) {
        data.fill(self.last.unwrap_or(0));
    }
    fn write(&mut self, _vcpu: usize, _offset: u64, data: &[u8]) {
        self.last = data.first().copied();
    }
}
