//! smp_flush_avoid: threads keep the address space loaded on every CPU while this CPU maps
//! and unmaps pages nobody ever touches: no flush anywhere (natively no IPI; PV: the VMM's
//! remote-flush counters, which the end-to-end test compares across `pages=` values).
#![no_std]
#![no_main]
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use utest::smp;
use utest::*;

static STOP: AtomicU64 = AtomicU64::new(0);
static RUNNING: AtomicU64 = AtomicU64::new(0);

fn spinner(_: u64) -> i32 {
    let n = smp::ncpus();
    RUNNING.fetch_add(1, SeqCst);
    while STOP.load(SeqCst) == 0 {
        smp::relax(n);
        core::hint::spin_loop();
    }
    0
}

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(a: Args) -> i32 {
    let n = smp::ncpus();
    let helpers = (n - 1).max(1);
    let mut ts = [const { None }; 64];
    for (k, t) in ts.iter_mut().enumerate().take(helpers as usize) {
        *t = Some(smp::spawn(spinner, 0, k as u64 + 1));
    }
    smp::wait_until(|| RUNNING.load(SeqCst) == helpers);
    let pages = a.pages.max(1);
    let (f0, s0, h0) = (
        stat(st::FLUSH_IPIS),
        stat(st::SHOOTDOWNS),
        stat(st::HYPERCALLS),
    );
    for _ in 0..4 {
        let x = mmap(pages * 4096, RW, MAP_POPULATE);
        check!(munmap(x, pages * 4096) == pages, "munmap");
    }
    let (f1, s1, h1) = (
        stat(st::FLUSH_IPIS),
        stat(st::SHOOTDOWNS),
        stat(st::HYPERCALLS),
    );
    STOP.store(1, SeqCst);
    for t in ts.iter_mut().take(helpers as usize) {
        check!(t.take().map(|t| t.join()) == Some(0), "spinner");
    }
    diag!(
        "smp_flush_avoid: 4 x {} untouched pages mapped+unmapped with the space live on {} CPUs: {} flush IPIs, {} shootdowns, {} MMU hypercalls",
        pages,
        n,
        f1 - f0,
        s1 - s0,
        h1 - h0
    );
    check!(f1 == f0 && s1 == s0, "flushes for never-touched pages");
    0
}
