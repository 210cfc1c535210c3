//! The guest-physical layout: usable RAM, reserved ranges and the VMM's shadow pool.

use std::ops::Range;

use crate::pte::MAXPHYADDR;

/// The guest-physical layout the engine enforces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Usable RAM (e820 type 1), page-aligned, non-empty, non-overlapping.
    pub ram: Vec<Range<u64>>,
    /// Ranges inside the guest-physical space that must never be mapped (they win over
    /// `ram` where they overlap).
    pub reserved: Vec<Range<u64>>,
    /// Guest-physical base of the shadow pool (page-aligned, outside RAM).
    pub pool_base: u64,
    /// Number of 4 KiB frames in the pool.
    pub pool_frames: u64,
}

/// Why a [`Layout`] was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShadowError {
    /// A range is empty, not page-aligned or ends above the physical-address limit.
    #[error("bad range {0:#x}..{1:#x}: empty, unaligned or above MAXPHYADDR")]
    BadRange(u64, u64),
    /// Two RAM ranges overlap.
    #[error("RAM ranges overlap at {0:#x}")]
    RamOverlap(u64),
    /// The pool overlaps RAM.
    #[error("the shadow pool overlaps RAM")]
    PoolOverlapsRam,
    /// The pool is empty, unaligned, too big or above the physical-address limit.
    #[error("bad shadow pool: base {0:#x}, {1} frames")]
    BadPool(u64, u64),
    /// No RAM at all, or RAM too large for the dense frame tables.
    #[error("RAM must be non-empty and end below 1 TiB")]
    BadRam,
    /// Zero vCPUs.
    #[error("at least one vCPU is required")]
    NoVcpu,
}

/// What a guest frame is, for the validation rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameClass {
    /// Usable RAM the guest owns.
    Ram,
    /// A frame of the shadow pool.
    Pool,
    /// A reserved range.
    Reserved,
    /// Neither RAM nor pool nor reserved (a hole, MMIO, or past the end).
    Outside,
}

/// Largest RAM end accepted (dense per-frame tables are sized by it).
pub const MAX_RAM_END: u64 = 1 << 40;

fn range_ok(r: &Range<u64>) -> bool {
    r.start < r.end && r.start & 0xfff == 0 && r.end & 0xfff == 0 && r.end <= 1 << MAXPHYADDR
}

impl Layout {
    /// Checks the layout and returns it sorted.
    pub(crate) fn validated(mut self) -> Result<Layout, ShadowError> {
        for r in self.ram.iter().chain(self.reserved.iter()) {
            if !range_ok(r) {
                return Err(ShadowError::BadRange(r.start, r.end));
            }
        }
        self.ram.sort_by_key(|r| r.start);
        for w in self.ram.windows(2) {
            if w[0].end > w[1].start {
                return Err(ShadowError::RamOverlap(w[1].start));
            }
        }
        let end = self.ram.last().map(|r| r.end).ok_or(ShadowError::BadRam)?;
        if end > MAX_RAM_END {
            return Err(ShadowError::BadRam);
        }
        let pool_ok = self.pool_frames > 0
            && self.pool_frames < (1 << 22)
            && self.pool_base & 0xfff == 0
            && self
                .pool_base
                .checked_add(self.pool_frames * 4096)
                .is_some_and(|e| e <= 1 << MAXPHYADDR);
        if !pool_ok {
            return Err(ShadowError::BadPool(self.pool_base, self.pool_frames));
        }
        let pool = self.pool_range();
        if self
            .ram
            .iter()
            .any(|r| r.start < pool.end && pool.start < r.end)
        {
            return Err(ShadowError::PoolOverlapsRam);
        }
        Ok(self)
    }

    /// The pool as a guest-physical range.
    pub fn pool_range(&self) -> Range<u64> {
        self.pool_base..self.pool_base + self.pool_frames * 4096
    }

    /// One past the last RAM frame number.
    pub fn ram_end_pfn(&self) -> u64 {
        self.ram.last().map_or(0, |r| r.end >> 12)
    }

    /// Classifies the guest-physical range `start..start+len` (len > 0): `Ram` only if all
    /// of it is inside one RAM range and touches neither the pool nor a reserved range.
    pub fn classify_range(&self, start: u64, len: u64) -> FrameClass {
        let Some(end) = start.checked_add(len) else {
            return FrameClass::Outside;
        };
        let pool = self.pool_range();
        if start < pool.end && pool.start < end {
            return FrameClass::Pool;
        }
        if self.reserved.iter().any(|r| start < r.end && r.start < end) {
            return FrameClass::Reserved;
        }
        if self.ram.iter().any(|r| r.start <= start && end <= r.end) {
            FrameClass::Ram
        } else {
            FrameClass::Outside
        }
    }

    /// Classifies frame number `pfn`.
    pub fn classify(&self, pfn: u64) -> FrameClass {
        match pfn.checked_mul(4096) {
            Some(a) => self.classify_range(a, 4096),
            None => FrameClass::Outside,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lay() -> Layout {
        Layout {
            ram: vec![0x10_0000..0x80_0000, 0..0x9_f000],
            reserved: vec![0xf_0000..0x10_0000, 0x20_0000..0x20_1000],
            pool_base: 0x100_0000,
            pool_frames: 16,
        }
    }

    #[test]
    fn classify_frames() {
        let l = lay().validated().unwrap();
        assert_eq!(l.classify(0), FrameClass::Ram);
        assert_eq!(l.classify(0x9f), FrameClass::Outside);
        assert_eq!(l.classify(0xf0), FrameClass::Reserved);
        assert_eq!(l.classify(0x200), FrameClass::Reserved);
        assert_eq!(l.classify(0x1000), FrameClass::Pool);
        assert_eq!(l.classify(0x7ff), FrameClass::Ram);
        assert_eq!(l.classify(0x800), FrameClass::Outside);
        assert_eq!(l.classify(u64::MAX), FrameClass::Outside);
        assert_eq!(l.classify_range(0x9_e000, 0x2000), FrameClass::Outside);
    }

    #[test]
    fn bad_layouts() {
        let mut l = lay();
        l.ram.push(0x7f_0000..0x90_0000);
        assert_eq!(l.validated(), Err(ShadowError::RamOverlap(0x7f_0000)));
        let mut l = lay();
        l.pool_base = 0x7f_0000;
        assert_eq!(l.validated(), Err(ShadowError::PoolOverlapsRam));
        let mut l = lay();
        l.pool_frames = 0;
        assert!(matches!(l.validated(), Err(ShadowError::BadPool(..))));
        let mut l = lay();
        l.ram[0] = 0x10_0001..0x80_0000;
        assert!(matches!(l.validated(), Err(ShadowError::BadRange(..))));
        let l = Layout {
            ram: vec![],
            ..lay()
        };
        assert_eq!(l.validated(), Err(ShadowError::BadRam));
    }
}
