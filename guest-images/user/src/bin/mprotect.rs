//! mprotect: RW -> RO -> RW; writes to RO kill a child; reads keep working; contents kept.
#![no_std]
#![no_main]
use utest::*;

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(a: Args) -> i32 {
    let n = a.pages.max(2);
    let len = n * 4096;
    let x = mmap(len, RW, MAP_POPULATE);
    fill(x, n, 0x3333);
    let (h0, p0) = (stat(st::HYPERCALLS), stat(st::PTE_UPDATES));
    check!(mprotect(x, len, PROT_R) == 0, "mprotect RO");
    let (h1, p1) = (stat(st::HYPERCALLS), stat(st::PTE_UPDATES));
    diag!(
        "mprotect RO of {} pages: {} PTE updates, {} MMU hypercalls",
        n,
        p1 - p0,
        h1 - h0
    );
    check!(
        verify(x, n, 0x3333).is_none(),
        "contents changed by mprotect RO"
    );
    let f0 = stat(st::FAULTS);
    check!(verify(x, n, 0x3333).is_none(), "reads of RO memory");
    check!(stat(st::FAULTS) == f0, "reads of RO memory faulted");
    let s = in_child(|| {
        wr(x + (n - 1) * 4096, 7);
        1
    });
    check!(
        segv(s),
        "child writing RO memory: status {:#x}, expected SIGSEGV",
        s
    );
    let s = in_child(|| if verify(x, n, 0x3333).is_none() { 0 } else { 1 });
    check!(
        exited(s) == Some(0),
        "child reading RO memory: status {:#x}",
        s
    );
    check!(mprotect(x, len, RW) == 0, "mprotect RW");
    check!(
        verify(x, n, 0x3333).is_none(),
        "contents changed by mprotect RW"
    );
    fill(x, n, 0x4444);
    check!(verify(x, n, 0x4444).is_none(), "writes after RW");
    // Split: only the upper half read-only.
    let h = n / 2;
    check!(
        mprotect(x + h * 4096, (n - h) * 4096, PROT_R) == 0,
        "mprotect upper half"
    );
    fill(x, h, 0x5555);
    let s = in_child(|| {
        wr(x + h * 4096, 7);
        1
    });
    check!(segv(s), "child writing RO upper half: status {:#x}", s);
    check!(verify(x, h, 0x5555).is_none(), "lower half");
    check!(munmap(x, len) == n, "munmap");
    0
}
