//! Bounds-checked access to one 4 KiB table in guest memory (guest tables and shadow
//! tables alike). The slice is obtained once per table; entry indices are masked to 0..512,
//! so no guest value can address host memory outside the table.
//!
//! The engine reaches guest memory through [`Mem`], which remembers the host mapping of the
//! regions it has resolved: a batch applied through one `Mem` (`ShadowMmu::batch`) looks
//! each region up in the memory object once, not twice per entry.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion};

use crate::rules::Rule;

/// One table of 512 entries.
pub(crate) struct Table<'a> {
    base: *const AtomicU64,
    _mem: PhantomData<&'a ()>,
}

/// A host mapping of guest memory: guest-physical `start..` is host `base..`, and a whole
/// frame fits from every `gpa` in `start..=last` (a whole region, or one frame). The empty
/// record has `start > last`.
#[derive(Clone, Copy)]
struct Region {
    start: u64,
    last: u64,
    base: *const u8,
}

impl Region {
    const EMPTY: Region = Region {
        start: u64::MAX,
        last: 0,
        base: std::ptr::null(),
    };

    #[inline]
    fn holds(&self, gpa: u64) -> bool {
        self.start <= gpa && gpa <= self.last
    }
}

/// Regions remembered by a [`Mem`] (a VM has RAM below and above the PCI hole, and the pool).
const REGIONS: usize = 4;

/// A guest memory object (physical memory, see [`table`]) and, if it remembers, the host
/// mappings of the regions resolved through it so far. They stay valid while the object is
/// borrowed (`'m`).
pub(crate) struct Mem<'m, M> {
    mem: &'m M,
    /// Whether resolved regions are remembered (a batch); otherwise each table is looked up
    /// on its own (one op: remembering would cost more than it saves).
    remember: bool,
    regions: [Cell<Region>; REGIONS],
    /// Where the next resolved region is recorded (round robin).
    next: Cell<usize>,
}

impl<'m, M: GuestMemory> Mem<'m, M> {
    /// `mem` for one op: every table is looked up in the memory object.
    pub fn new(mem: &'m M) -> Mem<'m, M> {
        Mem {
            mem,
            remember: false,
            regions: [const { Cell::new(Region::EMPTY) }; REGIONS],
            next: Cell::new(0),
        }
    }

    /// `mem` for a batch: each region is looked up once, then remembered.
    pub fn remembering(mem: &'m M) -> Mem<'m, M> {
        Mem {
            remember: true,
            ..Mem::new(mem)
        }
    }

    /// The memory object itself.
    pub fn guest(&self) -> &'m M {
        self.mem
    }

    /// The host address of the frame at `gpa`, the whole frame inside one host range: from
    /// a remembered region, or what [`Self::resolve`] finds; without remembering, from
    /// [`Self::frame`]. Returned as one pointer (in a register, not a record on the stack).
    #[inline(always)]
    fn frame_ptr(&self, gpa: u64) -> Option<*const u8> {
        let r = if self.remember {
            match self.regions.iter().map(Cell::get).find(|r| r.holds(gpa)) {
                Some(r) => r,
                None => self.resolve(gpa)?,
            }
        } else {
            self.frame(gpa)?
        };
        // `r.start <= gpa <= r.last`: the frame is inside the range.
        Some(r.base.wrapping_add((gpa - r.start) as usize))
    }

    /// The host mapping of the frame at `gpa` alone, from the memory object.
    #[inline(never)]
    fn frame(&self, gpa: u64) -> Option<Region> {
        let pm = self.mem.physical_memory()?;
        let (region, off) = pm.to_region_addr(GuestAddress(gpa))?;
        if off.raw_value().checked_add(4096)? > region.len() {
            return None;
        }
        let base = region.get_host_address(off).ok()?;
        Some(Region {
            start: gpa,
            last: gpa,
            base,
        })
    }

    /// The memory object's region holding `gpa`, remembered if the whole frame is inside
    /// it. Out of line: a batch needs it once per region.
    #[cold]
    #[inline(never)]
    fn resolve(&self, gpa: u64) -> Option<Region> {
        let pm = self.mem.physical_memory()?;
        let (region, _) = pm.to_region_addr(GuestAddress(gpa))?;
        // The whole region as one slice: one host range of `len` bytes.
        let slice = region.as_volatile_slice().ok()?;
        let start = region.start_addr().raw_value();
        let r = Region {
            start,
            last: start.checked_add(slice.len() as u64)?.checked_sub(4096)?,
            base: slice.ptr_guard().as_ptr(),
        };
        if !r.holds(gpa) {
            return None;
        }
        let n = self.next.get();
        if let Some(c) = self.regions.get(n) {
            c.set(r);
        }
        self.next.set((n + 1) % REGIONS);
        Some(r)
    }
}

/// Opens the table at frame number `pfn`. The memory object must be physical memory
/// (`GuestMemory::physical_memory()`, true of every `GuestMemoryBackend` such as
/// `GuestMemoryMmap`) backing the whole frame in one region; `Rule::Unbacked` otherwise.
#[inline(always)]
pub(crate) fn table<'m, M: GuestMemory>(mem: &Mem<'m, M>, pfn: u64) -> Result<Table<'m>, Rule> {
    let gpa = pfn.checked_mul(4096).ok_or(Rule::Unbacked)?;
    let base = mem.frame_ptr(gpa).ok_or(Rule::Unbacked)? as *const AtomicU64;
    if !base.is_aligned() {
        return Err(Rule::Unbacked);
    }
    Ok(Table {
        base,
        _mem: PhantomData,
    })
}

impl Table<'_> {
    #[inline]
    fn at(&self, i: usize) -> &AtomicU64 {
        // SAFETY: `base` is the 8-byte aligned host address of a 4096-byte range inside one
        // region of the memory object (the frame's host address, or an offset inside the
        // region's whole volatile slice, see `Mem::resolve`), which stays mapped while the
        // object is borrowed (`'a`); `i & 511` keeps the access inside the range. Guest
        // memory is shared with the guest and the CPU, so only atomic accesses are made
        // through it.
        unsafe { &*self.base.add(i & 511) }
    }

    /// Entry `i`.
    #[inline]
    pub fn get(&self, i: usize) -> u64 {
        self.at(i).load(Ordering::Acquire)
    }

    /// Stores entry `i`.
    #[inline]
    pub fn set(&self, i: usize, v: u64) {
        self.at(i).store(v, Ordering::Release)
    }

    /// Atomically replaces entry `i`, returning the old value (with any A/D the CPU set).
    #[inline]
    pub fn swap(&self, i: usize, v: u64) -> u64 {
        self.at(i).swap(v, Ordering::AcqRel)
    }

    /// Replaces entry `i`, returning the old value: a locked exchange where another vCPU's
    /// walk may set A/D in it meanwhile (`shared`), else a plain load and store (no CPU
    /// walks the pool while the only vCPU is in the VMM).
    #[inline(always)]
    pub fn replace(&self, i: usize, v: u64, shared: bool) -> u64 {
        if shared {
            return self.swap(i, v);
        }
        let was = self.get(i);
        self.set(i, v);
        was
    }

    /// Atomically clears `bits` in entry `i`, returning the old value.
    #[inline]
    pub fn clear_bits(&self, i: usize, bits: u64) -> u64 {
        self.at(i).fetch_and(!bits, Ordering::AcqRel)
    }

    /// Atomically sets `bits` in entry `i`, returning the old value.
    #[inline]
    pub fn set_bits(&self, i: usize, bits: u64) -> u64 {
        self.at(i).fetch_or(bits, Ordering::AcqRel)
    }

    /// All 512 entries.
    pub fn snapshot(&self) -> [u64; 512] {
        let mut out = [0u64; 512];
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.get(i);
        }
        out
    }

    /// Copies every entry of `src` into this table (word by word: both frames are shared
    /// with the guest).
    pub fn copy_from(&self, src: &Table<'_>) {
        for i in 0..512 {
            self.at(i)
                .store(src.at(i).load(Ordering::Relaxed), Ordering::Relaxed);
        }
        // What was copied is seen before anything stored after it.
        std::sync::atomic::fence(Ordering::Release);
    }

    /// Zeroes the table.
    pub fn zero(&self) {
        for i in 0..512 {
            self.at(i).store(0, Ordering::Relaxed);
        }
        // What was zeroed is seen before anything stored after it.
        std::sync::atomic::fence(Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn remembered_regions_open_exactly_what_the_memory_object_backs() {
        // Five regions (more than are remembered), one ending mid-frame.
        let ranges: Vec<(GuestAddress, usize)> = (0..5u64)
            .map(|k| {
                (
                    GuestAddress(k * 0x10_0000),
                    0x4000 + 0x800 * (k == 2) as usize,
                )
            })
            .collect();
        let gm = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        for (k, (a, _)) in ranges.iter().enumerate() {
            gm.write_obj(0x1234_5000 + k as u64, a.unchecked_add(0x3ff8))
                .unwrap();
        }
        let (single, batch) = (Mem::new(&gm), Mem::remembering(&gm));
        for mem in [&single, &batch, &batch, &batch] {
            for (k, (a, len)) in ranges.iter().enumerate() {
                let pfn = a.raw_value() >> 12;
                let last = table(mem, pfn + 3).unwrap();
                assert_eq!(last.get(511), 0x1234_5000 + k as u64);
                last.set(0, 7);
                assert_eq!(gm.read_obj::<u64>(a.unchecked_add(0x3000)).unwrap(), 7);
                let partial = *len > 0x4000;
                assert!(
                    table(mem, pfn + 4).is_err(),
                    "region {k}, partial {partial}"
                );
            }
        }
        for mem in [&single, &batch] {
            assert!(table(mem, 0x80).is_err(), "between regions");
            assert!(table(mem, u64::MAX).is_err());
            assert!(table(mem, u64::MAX >> 12).is_err());
        }
    }
}
