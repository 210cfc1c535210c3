//! flush_avoid: pages mapped but never touched by the user and then unmapped need no TLB
//! flush; the kernel sends none (PV: coherence is the VMM's job; native: A clear).
#![no_std]
#![no_main]
use utest::*;

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(a: Args) -> i32 {
    let n = a.pages.max(1);
    let len = n * 4096;
    let fl0 = stat(st::FLUSHES);
    let x = mmap(len, RW, MAP_POPULATE);
    check!(munmap(x, len) == n, "munmap");
    let fl1 = stat(st::FLUSHES);
    diag!(
        "{} untouched pages mapped+unmapped: {} guest TLB flushes",
        n,
        fl1 - fl0
    );
    check!(fl1 == fl0, "{} flushes for never-touched pages", fl1 - fl0);
    if a.mode != 0 {
        // PV: the VMM's flush counters for this run must show only avoided flushes (the
        // end-to-end test compares them with a run without selftests).
        return 0;
    }
    // Native, for contrast: touched pages need INVLPG.
    let x = mmap(len, RW, MAP_POPULATE);
    fill(x, n, 1);
    check!(munmap(x, len) == n, "munmap");
    let fl2 = stat(st::FLUSHES);
    diag!(
        "{} touched pages mapped+unmapped: {} guest TLB flushes (native INVLPG)",
        n,
        fl2 - fl1
    );
    0
}
