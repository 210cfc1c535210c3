//! Physical memory: the direct map, the frame allocator (bump over e820 usable ranges plus
//! a stack of freed frames) and per-frame map counts.
//!
//! Locks: [`FRAMES`] guards the allocator, the double-free bitmap and the map counts; it is
//! the innermost lock (taken inside the process table and the MMU state, never around them).

use crate::arch::KERNEL_VMA;
use crate::bootinfo::BootInfo;
use crate::sync::SpinLock;
use core::sync::atomic::{AtomicU64, Ordering};

/// Base of the direct map of RAM (L4 slot 273).
pub const DMAP: u64 = 0xffff_8880_0000_0000;
/// Frames the allocator manages at most (1 GiB of RAM).
pub const MAX_FRAMES: usize = 1 << 18;

/// Where physical memory is reached: the kernel window (boot tables) until the kernel's
/// own tables are loaded, then the direct map. Written once, by [`use_dmap`].
static PHYS_BASE: AtomicU64 = AtomicU64::new(KERNEL_VMA);

/// End of RAM (highest usable address), set by [`init`].
static RAM_END: AtomicU64 = AtomicU64::new(0);

/// Switches physical accesses to the direct map.
pub fn use_dmap() {
    PHYS_BASE.store(DMAP, Ordering::Relaxed);
}

/// End of RAM (highest usable address).
pub fn ram_end() -> u64 {
    RAM_END.load(Ordering::Relaxed)
}

/// Virtual address of physical `pa` in the direct map.
#[inline(always)]
pub fn va(pa: u64) -> u64 {
    PHYS_BASE.load(Ordering::Relaxed) + pa
}

/// Reads the u64 at physical `pa`.
#[inline(always)]
pub fn rd(pa: u64) -> u64 {
    // SAFETY: the direct map covers all RAM; callers pass RAM addresses.
    unsafe { core::ptr::read_volatile(va(pa) as *const u64) }
}

/// Writes the u64 at physical `pa` (only for frames that are not typed page tables in PV).
#[inline(always)]
pub fn wr(pa: u64, v: u64) {
    // SAFETY: as rd.
    unsafe { core::ptr::write_volatile(va(pa) as *mut u64, v) }
}

/// Atomically ANDs `mask` into the u64 at physical `pa` (a native PTE that CPUs may be
/// setting A/D in); returns the old value.
pub fn fetch_and(pa: u64, mask: u64) -> u64 {
    // SAFETY: as rd; the word is 8-byte aligned (a PTE), so it may be viewed as an atomic.
    let a = unsafe { &*(va(pa) as *const core::sync::atomic::AtomicU64) };
    a.fetch_and(mask, Ordering::AcqRel)
}

/// Atomically replaces the u64 at physical `pa` by `v` with the A/D bits (`ad`) the word
/// has at that moment: a native PTE update that loses no A/D bit a CPU sets meanwhile.
/// Returns the value replaced.
pub fn store_keep(pa: u64, v: u64, ad: u64) -> u64 {
    // SAFETY: as fetch_and.
    let a = unsafe { &*(va(pa) as *const core::sync::atomic::AtomicU64) };
    let mut cur = a.load(Ordering::Acquire);
    while let Err(c) =
        a.compare_exchange_weak(cur, v | (cur & ad), Ordering::AcqRel, Ordering::Acquire)
    {
        cur = c;
    }
    cur
}

struct Range {
    next: u64,
    end: u64,
}

/// The allocator's state (behind [`FRAMES`]).
struct Frames {
    ranges: [Range; 8],
    nranges: usize,
    free: [u32; MAX_FRAMES],
    nfree: usize,
    bump_left: u64,
    /// One bit per frame: set while the frame is on the free stack (double-free check).
    freebits: [u64; MAX_FRAMES / 64],
    /// Map counts (number of leaf PTEs referencing a frame).
    refs: [u16; MAX_FRAMES],
}

/// The frame allocator, its double-free bitmap and the map counts.
static FRAMES: SpinLock<Frames> = SpinLock::new(Frames {
    ranges: [const { Range { next: 0, end: 0 } }; 8],
    nranges: 0,
    free: [0; MAX_FRAMES],
    nfree: 0,
    bump_left: 0,
    freebits: [0; MAX_FRAMES / 64],
    refs: [0; MAX_FRAMES],
});

/// Sets up the allocator over e820 usable RAM above `lowest` (phys).
pub fn init(info: &BootInfo, lowest: u64) {
    let mut al = FRAMES.lock();
    for e in info.e820() {
        if e.kind != 1 {
            continue;
        }
        let end = e.addr + e.size;
        RAM_END.fetch_max(end, Ordering::Relaxed);
        let s = e.addr.max(lowest).next_multiple_of(4096);
        let end = (end & !0xfff).min((MAX_FRAMES as u64) << 12);
        if s >= end || al.nranges == al.ranges.len() {
            continue;
        }
        let k = al.nranges;
        al.ranges[k] = Range { next: s, end };
        al.nranges += 1;
        al.bump_left += (end - s) >> 12;
    }
}

/// Allocates a frame (contents undefined). Panics when out of memory.
pub fn alloc() -> u64 {
    let mut guard = FRAMES.lock();
    let al = &mut *guard;
    if al.nfree > 0 {
        al.nfree -= 1;
        let pfn = al.free[al.nfree] as usize;
        al.freebits[pfn / 64] &= !(1 << (pfn % 64));
        return (pfn as u64) << 12;
    }
    for r in al.ranges[..al.nranges].iter_mut() {
        if r.next < r.end {
            let f = r.next;
            r.next += 4096;
            al.bump_left -= 1;
            return f;
        }
    }
    drop(guard);
    panic!("out of memory");
}

/// Returns a frame to the allocator.
pub fn free(pa: u64) {
    free_locked(&mut FRAMES.lock(), pa);
}

fn free_locked(al: &mut Frames, pa: u64) {
    let pfn = (pa >> 12) as usize;
    assert!(
        al.freebits[pfn / 64] & (1 << (pfn % 64)) == 0,
        "double free of frame {pa:#x}"
    );
    al.freebits[pfn / 64] |= 1 << (pfn % 64);
    al.free[al.nfree] = pfn as u32;
    al.nfree += 1;
}

/// Free frames.
pub fn free_count() -> u64 {
    let al = FRAMES.lock();
    al.bump_left + al.nfree as u64
}

/// Adds a mapping reference to a frame.
pub fn get(pa: u64) {
    FRAMES.lock().refs[(pa >> 12) as usize] += 1;
}

/// Map count of a frame.
pub fn refs(pa: u64) -> u16 {
    FRAMES.lock().refs[(pa >> 12) as usize]
}

/// Drops a mapping reference; frees the frame at zero.
pub fn put(pa: u64) {
    let mut al = FRAMES.lock();
    let r = &mut al.refs[(pa >> 12) as usize];
    if *r <= 1 {
        *r = 0;
        free_locked(&mut al, pa);
    } else {
        *r -= 1;
    }
}
