//! fork_cow: parent and child see only their own writes; frames return to baseline.
#![no_std]
#![no_main]
use utest::*;

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(a: Args) -> i32 {
    let n = a.pages.max(1);
    let len = n * 4096;
    let x = mmap(len, RW, MAP_POPULATE);
    fill(x, n, 0xaaaa);
    let base = stat(st::FREE);
    let (h0, p0) = (stat(st::HYPERCALLS), stat(st::PTE_UPDATES));
    let t0 = rdtsc();
    let pid = fork();
    if pid == 0 {
        if verify(x, n, 0xaaaa).is_some() {
            exit(10);
        }
        fill(x, n, 0xcccc);
        yield_now();
        if verify(x, n, 0xcccc).is_some() {
            exit(11);
        }
        exit(0);
    }
    let t1 = rdtsc();
    let (h1, p1) = (stat(st::HYPERCALLS), stat(st::PTE_UPDATES));
    diag!(
        "fork of {} pages: {} PTE updates, {} MMU hypercalls, {} cycles",
        n,
        p1 - p0,
        h1 - h0,
        t1 - t0
    );
    yield_now();
    check!(
        verify(x, n, 0xaaaa).is_none(),
        "parent sees the child's writes"
    );
    fill(x, n, 0xbbbb);
    yield_now();
    check!(verify(x, n, 0xbbbb).is_none(), "parent lost its own writes");
    let (_, s) = wait();
    check!(exited(s) == Some(0), "child status {:#x}", s);
    check!(
        verify(x, n, 0xbbbb).is_none(),
        "parent data after child exit"
    );
    // Parent writes first this time.
    let pid = fork();
    if pid == 0 {
        yield_now();
        exit(if verify(x, n, 0xbbbb).is_none() {
            0
        } else {
            12
        });
    }
    fill(x, n, 0xdddd);
    let (_, s) = wait();
    check!(exited(s) == Some(0), "second child status {:#x}", s);
    check!(verify(x, n, 0xdddd).is_none(), "parent data");
    let now = stat(st::FREE);
    check!(
        now == base,
        "free frames {} after both exits, baseline {}",
        now,
        base
    );
    check!(munmap(x, len) == n, "munmap");
    0
}
