//! mremap: moves a populated range (PTEs move, no copy, no faults); old range faults.
#![no_std]
#![no_main]
use utest::*;

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(a: Args) -> i32 {
    let n = a.pages.max(2);
    let len = n * 4096;
    let x = mmap(len, RW, MAP_POPULATE);
    fill(x, n, 0x6666);
    let free0 = stat(st::FREE);
    let (h0, p0) = (stat(st::HYPERCALLS), stat(st::PTE_UPDATES));
    let y = mremap(x, len, len);
    let (h1, p1) = (stat(st::HYPERCALLS), stat(st::PTE_UPDATES));
    check!((y as i64) > 0 && y != x, "mremap returned {:#x}", y);
    diag!(
        "mremap of {} pages: {} PTE updates, {} MMU hypercalls",
        n,
        p1 - p0,
        h1 - h0
    );
    let f0 = stat(st::FAULTS);
    if let Some(i) = verify(y, n, 0x6666) {
        check!(false, "page {} lost its data in the move", i);
    }
    check!(stat(st::FAULTS) == f0, "moved pages faulted");
    let used = free0 - stat(st::FREE);
    check!(
        used <= 3,
        "mremap used {} frames: pages were copied, not moved (at most 3 new page tables expected)",
        used
    );
    let s = in_child(|| {
        let _ = rd(x);
        1
    });
    check!(segv(s), "child reading the old range: status {:#x}", s);
    // Grow: old part intact, new part demand-zero.
    let z = mremap(y, len, 2 * len);
    check!((z as i64) > 0, "grow");
    check!(verify(z, n, 0x6666).is_none(), "grown range lost data");
    check!(all_zero(z + len, n), "grown tail not zero");
    check!(munmap(z, 2 * len) == 2 * n, "munmap");
    0
}
