//! The `pio` transport: a 32-bit write to the doorbell port (the request GPA) rings it; 4 ports
//! up, a read-only per-vCPU status register holds the last call's status. Ringing is decoded
//! by [`ring`] before the device bus is consulted; the status register is a bus device.

use crate::devices::BusDevice;
use hypercall::STATUS_PORT_OFFSET;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Device name of the doorbell in the statistics.
pub const DOORBELL_NAME: &str = "pvmm-doorbell";

/// Ports covered by the doorbell device.
pub const DOORBELL_LEN: u64 = 8;

/// The request GPA when a port write at `offset` from the doorbell rings it: only a 32-bit
/// write to the doorbell itself does.
pub fn ring(offset: u64, data: &[u8]) -> Option<u64> {
    match (offset, data) {
        (0, &[a, b, c, d]) => Some(u64::from(u32::from_le_bytes([a, b, c, d]))),
        _ => None,
    }
}

/// The doorbell's status register (and the inert doorbell port itself) as a bus device.
pub struct Doorbell {
    last_status: Arc<Vec<AtomicI64>>,
}

impl Doorbell {
    /// A doorbell reporting statuses from the dispatcher's registers.
    pub fn new(last_status: Arc<Vec<AtomicI64>>) -> Doorbell {
        Doorbell { last_status }
    }
}

impl BusDevice for Doorbell {
    fn name(&self) -> &'static str {
        DOORBELL_NAME
    }
    fn read(&mut self, vcpu: usize, offset: u64, data: &mut [u8]) {
        let v = if offset == u64::from(STATUS_PORT_OFFSET) {
            self.last_status
                .get(vcpu)
                .map_or(0, |s| s.load(Ordering::Relaxed)) as i32 as u32
        } else {
            u32::MAX
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.to_le_bytes().get(i).copied().unwrap_or(0xff);
        }
    }
    fn write(&mut self, _vcpu: usize, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_only_on_32bit_writes_and_reports_status() {
        assert_eq!(ring(0, &[0x40, 0x10, 0, 0]), Some(0x1040));
        assert_eq!(ring(0, &[1]), None);
        assert_eq!(ring(4, &[1, 2, 3, 4]), None);
        let st = Arc::new(vec![AtomicI64::new(-22)]);
        let mut d = Doorbell::new(st);
        let mut b = [0u8; 4];
        d.read(0, 4, &mut b);
        assert_eq!(i32::from_le_bytes(b), -22);
        d.read(5, 4, &mut b);
        assert_eq!(i32::from_le_bytes(b), 0);
    }
}
