//! Bounds-checked access to one 4 KiB table in guest memory (guest tables and shadow
//! tables alike). The slice is obtained once per table; entry indices are masked to 0..512,
//! so no guest value can address host memory outside the table.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::{BitmapSlice, BS};
use vm_memory::{GuestAddress, GuestMemory, Permissions, VolatileSlice};

use crate::rules::Rule;

/// One table of 512 entries.
pub(crate) struct Table<'a, B: BitmapSlice> {
    // Held for its lifetime: `base` points into it.
    _slice: VolatileSlice<'a, B>,
    base: *const AtomicU64,
}

/// Opens the table at frame number `pfn`; `Rule::Unbacked` if the memory object does not
/// back the whole frame with one 8-byte aligned slice.
pub(crate) fn table<M: GuestMemory>(mem: &M, pfn: u64) -> Result<Table<'_, BS<'_, M::Bitmap>>, Rule> {
    let gpa = pfn.checked_mul(4096).ok_or(Rule::Unbacked)?;
    let mut it = mem
        .get_slices(GuestAddress(gpa), 4096, Permissions::ReadWrite)
        .map_err(|_| Rule::Unbacked)?;
    let slice = it.next().ok_or(Rule::Unbacked)?.map_err(|_| Rule::Unbacked)?;
    let base = slice.ptr_guard_mut().as_ptr() as *const AtomicU64;
    if slice.len() != 4096 || !base.is_aligned() {
        return Err(Rule::Unbacked);
    }
    Ok(Table { _slice: slice, base })
}

impl<B: BitmapSlice> Table<'_, B> {
    fn at(&self, i: usize) -> &AtomicU64 {
        // SAFETY: `base` is the 8-byte aligned start of a 4096-byte guest-memory slice that
        // stays mapped while `_slice` (borrowing the memory object) lives; `i & 511` keeps the
        // access inside it. Guest memory is shared with the guest, so only atomic accesses
        // are made through it.
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
