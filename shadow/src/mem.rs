//! Bounds-checked access to one 4 KiB table in guest memory (guest tables and shadow
//! tables alike). The slice is obtained once per table; entry indices are masked to 0..512,
//! so no guest value can address host memory outside the table.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::{BitmapSlice, BS};
use vm_memory::{GuestAddress, GuestMemory, Permissions, VolatileMemory, VolatileSlice};

use crate::rules::Rule;

/// One table of 512 entries.
pub(crate) struct Table<'a, B: BitmapSlice> {
    slice: VolatileSlice<'a, B>,
}

/// Opens the table at frame number `pfn`; `Rule::Unbacked` if the memory object does not
/// back the whole frame with one slice.
pub(crate) fn table<M: GuestMemory>(
    mem: &M,
    pfn: u64,
) -> Result<Table<'_, BS<'_, M::Bitmap>>, Rule> {
    let gpa = pfn.checked_mul(4096).ok_or(Rule::Unbacked)?;
    let mut it = mem
        .get_slices(GuestAddress(gpa), 4096, Permissions::ReadWrite)
        .map_err(|_| Rule::Unbacked)?;
    let slice = it
        .next()
        .ok_or(Rule::Unbacked)?
        .map_err(|_| Rule::Unbacked)?;
    if slice.len() != 4096 {
        return Err(Rule::Unbacked);
    }
    Ok(Table { slice })
}

impl<B: BitmapSlice> Table<'_, B> {
    fn at(&self, i: usize) -> Option<&AtomicU64> {
        self.slice.get_atomic_ref::<AtomicU64>((i & 511) * 8).ok()
    }

    /// Entry `i`.
    pub fn get(&self, i: usize) -> u64 {
        self.at(i).map_or(0, |a| a.load(Ordering::Acquire))
    }

    /// Stores entry `i`.
    pub fn set(&self, i: usize, v: u64) {
        if let Some(a) = self.at(i) {
            a.store(v, Ordering::Release)
        }
    }

    /// Atomically replaces entry `i`, returning the old value (with any A/D the CPU set).
    pub fn swap(&self, i: usize, v: u64) -> u64 {
        self.at(i).map_or(0, |a| a.swap(v, Ordering::AcqRel))
    }

    /// Atomically clears `bits` in entry `i`, returning the old value.
    pub fn clear_bits(&self, i: usize, bits: u64) -> u64 {
        self.at(i)
            .map_or(0, |a| a.fetch_and(!bits, Ordering::AcqRel))
    }

    /// Atomically sets `bits` in entry `i`, returning the old value.
    pub fn set_bits(&self, i: usize, bits: u64) -> u64 {
        self.at(i).map_or(0, |a| a.fetch_or(bits, Ordering::AcqRel))
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
