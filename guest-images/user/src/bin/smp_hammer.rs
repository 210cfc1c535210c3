//! smp_hammer: threads on every CPU hammer mmap/munmap/mprotect and demand faults, on
//! private ranges and on their slices of a shared range, while the others do the same to
//! the same address space; every page is verified by its pattern (a checksum).
#![no_std]
#![no_main]
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use utest::smp;
use utest::*;

const ITER: u64 = 6;
const SLICE: u64 = 8;
static SHARED: AtomicU64 = AtomicU64::new(0);

fn tag(t: u64, k: u64) -> u64 {
    (t << 32) | (k << 8) | 0x5a
}

fn hammer(t: u64) -> i32 {
    let s = SHARED.load(SeqCst) + t * SLICE * 4096;
    for k in 0..ITER {
        let p = mmap(SLICE * 4096, RW, if k % 2 == 0 { MAP_POPULATE } else { 0 });
        fill(p, SLICE, tag(t, k));
        if mprotect(p, SLICE * 4096, PROT_R) != 0 || verify(p, SLICE, tag(t, k)).is_some() {
            return 1;
        }
        if mprotect(p, SLICE * 4096, RW) != 0 {
            return 2;
        }
        fill(p, SLICE, !tag(t, k));
        if verify(p, SLICE, !tag(t, k)).is_some() {
            return 3;
        }
        if munmap(p, SLICE * 4096) != SLICE {
            return 4;
        }
        fill(s, SLICE, tag(t, k));
        if verify(s, SLICE, tag(t, k)).is_some() {
            return 5;
        }
    }
    0
}

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(_a: Args) -> i32 {
    let n = smp::ncpus();
    let threads = n.max(2);
    let shared = mmap(threads * SLICE * 4096, RW, 0);
    SHARED.store(shared, SeqCst);
    let mut ts = [const { None }; 64];
    for (k, t) in ts.iter_mut().enumerate().take(threads as usize) {
        *t = Some(smp::spawn(hammer, k as u64, k as u64));
    }
    let mut bad = 0;
    for (k, t) in ts.iter_mut().enumerate().take(threads as usize) {
        let r = t.take().map(|t| t.join()).unwrap_or(-1);
        if r != 0 {
            diag!("thread {} failed at step {}", k, r);
            bad += 1;
        }
    }
    for k in 0..threads {
        if verify(shared + k * SLICE * 4096, SLICE, tag(k, ITER - 1)).is_some() {
            diag!("slice {} lost its last pattern", k);
            bad += 1;
        }
    }
    diag!(
        "smp_hammer: {} threads on {} CPUs, {} iterations each: {} failures",
        threads,
        n,
        ITER,
        bad
    );
    check!(bad == 0, "{} failures", bad);
    check!(
        munmap(shared, threads * SLICE * 4096) == threads * SLICE,
        "munmap shared"
    );
    0
}
