//! Bounds-checked access to one 4 KiB table in guest memory (guest tables and shadow
//! tables alike). The slice is obtained once per table; entry indices are masked to 0..512,
//! so no guest value can address host memory outside the table.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion};

use crate::rules::Rule;

/// One table of 512 entries.
pub(crate) struct Table<'a> {
    base: *const AtomicU64,
    _mem: PhantomData<&'a ()>,
}

/// Opens the table at frame number `pfn`. The memory object must be physical memory
/// (`GuestMemory::physical_memory()`, true of every `GuestMemoryBackend` such as
/// `GuestMemoryMmap`) backing the whole frame in one region; `Rule::Unbacked` otherwise.
pub(crate) fn table<M: GuestMemory>(mem: &M, pfn: u64) -> Result<Table<'_>, Rule> {
    let gpa = pfn.checked_mul(4096).ok_or(Rule::Unbacked)?;
    let pm = mem.physical_memory().ok_or(Rule::Unbacked)?;
    let (region, off) = pm.to_region_addr(GuestAddress(gpa)).ok_or(Rule::Unbacked)?;
    if off
        .raw_value()
        .checked_add(4096)
        .is_none_or(|end| end > region.len())
    {
        return Err(Rule::Unbacked);
    }
    let base = region.get_host_address(off).map_err(|_| Rule::Unbacked)? as *const AtomicU64;
    if !base.is_aligned() {
        return Err(Rule::Unbacked);
    }
    Ok(Table {
        base,
        _mem: PhantomData,
    })
}

impl Table<'_> {
    fn at(&self, i: usize) -> &AtomicU64 {
        // SAFETY: `base` is the 8-byte aligned host address of a 4096-byte range inside one
        // region of the memory object, which stays mapped while the object is borrowed
        // (`'a`); `i & 511` keeps the access inside the range. Guest memory is shared with
        // the guest and the CPU, so only atomic accesses are made through it.
        unsafe { &*self.base.add(i & 511) }
    }

    /// Entry `i`.
    pub fn get(&self, i: usize) -> u64 {
        self.at(i).load(Ordering::Acquire)
    }

    /// Stores entry `i`.
    pub fn set(&self, i: usize, v: u64) {
        self.at(i).store(v, Ordering::Release)
    }

    /// Atomically replaces entry `i`, returning the old value (with any A/D the CPU set).
    pub fn swap(&self, i: usize, v: u64) -> u64 {
        self.at(i).swap(v, Ordering::AcqRel)
    }

    /// Atomically clears `bits` in entry `i`, returning the old value.
    pub fn clear_bits(&self, i: usize, bits: u64) -> u64 {
        self.at(i).fetch_and(!bits, Ordering::AcqRel)
    }

    /// Atomically sets `bits` in entry `i`, returning the old value.
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

    /// Zeroes the table.
    pub fn zero(&self) {
        for i in 0..512 {
            self.set(i, 0);
        }
    }
}
