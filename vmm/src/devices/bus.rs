//! A range bus: a `BTreeMap` from the base of each registered range to its device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that owns one or more ranges on a bus.
pub trait BusDevice: Send {
    /// Short name used in statistics ("serial", "i8042", ...).
    fn name(&self) -> &'static str;
    /// Reads `data.len()` bytes at `offset` from the range base, on behalf of `vcpu`.
    fn read(&mut self, vcpu: usize, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from the range base, on behalf of `vcpu`.
    fn write(&mut self, vcpu: usize, offset: u64, data: &[u8]);
}

/// Device name reported for accesses no device claims.
pub const UNASSIGNED: &str = "unassigned";

/// A shared device handle.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Range {
    len: u64,
    dev: SharedDevice,
}

/// Errors from registering ranges.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps an existing one or is empty.
    #[error("bus range {base:#x}+{len:#x} overlaps another device or is empty")]
    Overlap {
        /// Base of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// Result of a lookup: the device, the offset inside its range and the range base.
pub struct Hit<'a> {
    /// The device.
    pub dev: &'a SharedDevice,
    /// Offset from the range base.
    pub offset: u64,
    /// Range base.
    pub base: u64,
}

/// Port or MMIO address space.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Registers `dev` for `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Overlap { base, len })?;
        if let Some((b, r)) = self.ranges.range(..end).next_back() {
            if b + r.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Range { len, dev });
        Ok(())
    }

    /// Reads from the device covering `addr` (all-ones when none); returns its name for the
    /// statistics. One lookup and one lock per access.
    pub fn read(&self, vcpu: usize, addr: u64, data: &mut [u8]) -> &'static str {
        match self.lookup(addr).map(|h| (h.offset, h.dev.lock())) {
            Some((offset, Ok(mut dev))) => {
                dev.read(vcpu, offset, data);
                dev.name()
            }
            _ => {
                data.fill(0xff);
                UNASSIGNED
            }
        }
    }

    /// Writes to the device covering `addr` (ignored when none); returns the device's name
    /// for the statistics. Devices report VM-level events (reset) through their own lines,
    /// not through the bus.
    pub fn write(&self, vcpu: usize, addr: u64, data: &[u8]) -> &'static str {
        match self.lookup(addr).map(|h| (h.offset, h.dev.lock())) {
            Some((offset, Ok(mut dev))) => {
                dev.write(vcpu, offset, data);
                dev.name()
            }
            _ => UNASSIGNED,
        }
    }

    /// Finds the device covering `addr`.
    pub fn lookup(&self, addr: u64) -> Option<Hit<'_>> {
        let (base, r) = self.ranges.range(..=addr).next_back()?;
        (addr - base < r.len).then_some(Hit {
            dev: &r.dev,
            offset: addr - base,
            base: *base,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dummy(&'static str);
    impl BusDevice for Dummy {
        fn name(&self) -> &'static str {
            self.0
        }
        fn read(&mut self, _: usize, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, _: usize, _: u64, _: &[u8]) {}
    }

    #[test]
    fn lookup_and_overlap() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Dummy("a"))))
            .unwrap();
        bus.insert(0x60, 1, Arc::new(Mutex::new(Dummy("b"))))
            .unwrap();
        assert_eq!(
            bus.insert(0x3fc, 8, Arc::new(Mutex::new(Dummy("c")))),
            Err(BusError::Overlap {
                base: 0x3fc,
                len: 8
            })
        );
        assert!(bus
            .insert(0x3f0, 9, Arc::new(Mutex::new(Dummy("c"))))
            .is_err());
        assert!(bus
            .insert(0x10, 0, Arc::new(Mutex::new(Dummy("c"))))
            .is_err());
        bus.insert(0x3f0, 8, Arc::new(Mutex::new(Dummy("c"))))
            .unwrap();
        let h = bus.lookup(0x3fd).unwrap();
        assert_eq!((h.base, h.offset), (0x3f8, 5));
        assert_eq!(h.dev.lock().unwrap().name(), "a");
        assert!(bus.lookup(0x400).is_none());
        assert!(bus.lookup(0x61).is_none());
        assert_eq!(bus.lookup(0x3f7).unwrap().dev.lock().unwrap().name(), "c");
        let mut b = [0u8; 2];
        assert_eq!(bus.read(0, 0x3fa, &mut b), "a");
        assert_eq!(b, [2, 2]);
        assert_eq!(bus.read(0, 0x500, &mut b), UNASSIGNED);
        assert_eq!(b, [0xff, 0xff]);
        assert_eq!(bus.write(0, 0x60, &[1]), "b");
        assert_eq!(bus.write(0, 0x500, &[1]), UNASSIGNED);
    }
}
