//! Physical memory: the direct map, the frame allocator (bump over e820 usable ranges plus
//! a stack of freed frames) and per-frame map counts.

use crate::bootinfo::BootInfo;

/// Base of the direct map of RAM (L4 slot 273).
pub const DMAP: u64 = 0xffff_8880_0000_0000;
/// Frames the allocator manages at most (1 GiB of RAM).
pub const MAX_FRAMES: usize = 1 << 18;

/// Where physical memory is reached: the kernel window (boot tables) until the kernel's
/// own tables are loaded, then the direct map.
static mut PHYS_BASE: u64 = crate::KERNEL_VMA;

/// Switches physical accesses to the direct map.
pub fn use_dmap() {
    // SAFETY: boot, single CPU.
    unsafe { PHYS_BASE = DMAP };
}

/// Virtual address of physical `pa` in the direct map.
#[inline(always)]
pub fn va(pa: u64) -> u64 {
    // SAFETY: a plain read of a boot-time constant.
    unsafe { PHYS_BASE + pa }
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

struct Range {
    next: u64,
    end: u64,
}

struct Alloc {
    ranges: [Range; 8],
    nranges: usize,
    free: [u32; MAX_FRAMES],
    nfree: usize,
    bump_left: u64,
    total: u64,
}

static mut A: Alloc = Alloc {
    ranges: [const { Range { next: 0, end: 0 } }; 8],
    nranges: 0,
    free: [0; MAX_FRAMES],
    nfree: 0,
    bump_left: 0,
    total: 0,
};
/// One bit per frame: set while the frame is on the free stack (double-free check).
static mut FREEBITS: [u64; MAX_FRAMES / 64] = [0; MAX_FRAMES / 64];

/// Map counts (number of leaf PTEs referencing a frame).
static mut REFS: [u16; MAX_FRAMES] = [0; MAX_FRAMES];

/// End of RAM (highest usable address).
pub static mut RAM_END: u64 = 0;

fn a() -> &'static mut Alloc {
    // SAFETY: single CPU, interrupts off: no concurrent access.
    unsafe { &mut *core::ptr::addr_of_mut!(A) }
}

/// Sets up the allocator over e820 usable RAM above `lowest` (phys).
pub fn init(info: &BootInfo, lowest: u64) {
    let al = a();
    for e in info.e820() {
        if e.kind != 1 {
            continue;
        }
        let end = e.addr + e.size;
        // SAFETY: boot, single CPU.
        unsafe {
            if end > RAM_END {
                RAM_END = end;
            }
        }
        let s = e.addr.max(lowest).next_multiple_of(4096);
        let end = (end & !0xfff).min((MAX_FRAMES as u64) << 12);
        if s >= end || al.nranges == al.ranges.len() {
            continue;
        }
        al.ranges[al.nranges] = Range { next: s, end };
        al.nranges += 1;
        al.bump_left += (end - s) >> 12;
    }
    al.total = al.bump_left;
}

/// Allocates a frame (contents undefined). Panics when out of memory.
pub fn alloc() -> u64 {
    let al = a();
    if al.nfree > 0 {
        al.nfree -= 1;
        let pfn = al.free[al.nfree] as usize;
        // SAFETY: single CPU.
        unsafe { FREEBITS[pfn / 64] &= !(1 << (pfn % 64)) };
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
    panic!("out of memory");
}

/// Returns a frame to the allocator.
pub fn free(pa: u64) {
    let al = a();
    let pfn = (pa >> 12) as usize;
    // SAFETY: single CPU.
    unsafe {
        assert!(
            FREEBITS[pfn / 64] & (1 << (pfn % 64)) == 0,
            "double free of frame {pa:#x}"
        );
        FREEBITS[pfn / 64] |= 1 << (pfn % 64);
    }
    al.free[al.nfree] = pfn as u32;
    al.nfree += 1;
}

/// Free frames.
pub fn free_count() -> u64 {
    let al = a();
    al.bump_left + al.nfree as u64
}

/// Total managed frames.
pub fn total() -> u64 {
    a().total
}

/// Adds a mapping reference to a frame.
pub fn get(pa: u64) {
    // SAFETY: single CPU.
    unsafe { REFS[(pa >> 12) as usize] += 1 };
}

/// Map count of a frame.
pub fn refs(pa: u64) -> u16 {
    // SAFETY: single CPU.
    unsafe { REFS[(pa >> 12) as usize] }
}

/// Drops a mapping reference; frees the frame at zero.
pub fn put(pa: u64) {
    // SAFETY: single CPU.
    unsafe {
        let r = &mut REFS[(pa >> 12) as usize];
        if *r <= 1 {
            *r = 0;
            free(pa);
        } else {
            *r -= 1;
        }
    }
}
