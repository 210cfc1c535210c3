//! Bounds-checked access to guest RAM for guest-fed paths (hypercalls): only usable e820
//! RAM is reachable; anything else is `EFAULT`.

use hypercall::HcError;
use std::ops::Range;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory plus the ranges a guest request may point into.
#[derive(Clone)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    usable: Vec<Range<u64>>,
}

impl GuestRam {
    /// Wraps `mem`; only `usable` ranges are accessible through this type.
    pub fn new(mem: GuestMemoryMmap, usable: Vec<Range<u64>>) -> GuestRam {
        GuestRam { mem, usable }
    }

    /// The underlying memory (for the shadow engine, which does its own checks).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// `Ok` if `[gpa, gpa + len)` lies inside one usable RAM range.
    pub fn check(&self, gpa: u64, len: u64) -> Result<(), HcError> {
        let end = gpa.checked_add(len).ok_or(HcError::Efault)?;
        if self.usable.iter().any(|r| r.start <= gpa && end <= r.end) {
            Ok(())
        } else {
            Err(HcError::Efault)
        }
    }

    /// Copies guest bytes out (once).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), HcError> {
        self.check(gpa, buf.len() as u64)?;
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| HcError::Efault)
    }

    /// Writes bytes into guest RAM.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), HcError> {
        self.check(gpa, buf.len() as u64)?;
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| HcError::Efault)
    }

    /// A RAM of `size` bytes at 0, all usable (unit tests).
    #[cfg(test)]
    pub fn for_test(size: u64) -> GuestRam {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        GuestRam::new(mem, std::iter::once(0..size).collect())
    }
}
