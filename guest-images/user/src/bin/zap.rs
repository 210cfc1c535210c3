//! zap: full and partial munmap; access after unmap kills a child with SIGSEGV; frames freed.
#![no_std]
#![no_main]
use utest::*;

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(a: Args) -> i32 {
    let n = a.pages.max(4);
    let len = n * 4096;
    // Full unmap.
    let x = mmap(len, RW, MAP_POPULATE);
    fill(x, n, 0x1111);
    let free1 = stat(st::FREE);
    let (h0, p0) = (stat(st::HYPERCALLS), stat(st::PTE_UPDATES));
    let t0 = rdtsc();
    let z = munmap(x, len);
    let t1 = rdtsc();
    let (h1, p1) = (stat(st::HYPERCALLS), stat(st::PTE_UPDATES));
    let free2 = stat(st::FREE);
    check!(z == n, "munmap dropped {} PTEs, expected {}", z, n);
    check!(
        free2 - free1 == n,
        "freed {} frames, expected {}",
        free2 - free1,
        n
    );
    diag!(
        "full zap of {} pages: {} PTE updates, {} MMU hypercalls, {} cycles",
        n,
        p1 - p0,
        h1 - h0,
        t1 - t0
    );
    let s = in_child(|| {
        let _ = rd(x + 4096);
        1
    });
    check!(
        segv(s),
        "child reading unmapped memory: status {:#x}, expected SIGSEGV",
        s
    );
    // Partial unmap of the middle half.
    let y = mmap(len, RW, MAP_POPULATE);
    fill(y, n, 0x2222);
    let q = n / 4;
    let free1 = stat(st::FREE);
    let z = munmap(y + q * 4096, (n - 2 * q) * 4096);
    let free2 = stat(st::FREE);
    check!(z == n - 2 * q, "partial munmap dropped {} PTEs", z);
    check!(
        free2 - free1 == n - 2 * q,
        "partial munmap freed {} frames",
        free2 - free1
    );
    for i in (0..q).chain(n - q..n) {
        check!(
            rd(y + i * 4096) == 0x2222 ^ i,
            "page {} outside the hole lost data",
            i
        );
    }
    let s = in_child(|| {
        wr(y + (n / 2) * 4096, 1);
        1
    });
    check!(segv(s), "child writing into the hole: status {:#x}", s);
    let s = in_child(|| if rd(y) == 0x2222 { 0 } else { 1 });
    check!(
        exited(s) == Some(0),
        "child reading outside the hole: status {:#x}",
        s
    );
    check!(munmap(y, q * 4096) == q, "unmap head");
    check!(munmap(y + (n - q) * 4096, q * 4096) == q, "unmap tail");
    0
}
