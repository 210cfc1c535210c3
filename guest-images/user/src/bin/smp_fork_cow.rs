//! smp_fork_cow: fork while a sibling thread on another CPU keeps writing: the child's
//! copy is frozen at the fork (no write of the sibling through a stale writable TLB entry
//! reaches it), and the sibling's later writes stay in the parent (copy-on-write).
#![no_std]
#![no_main]
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use utest::smp;
use utest::*;

const PAGES: u64 = 16;
static BASE: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicU64 = AtomicU64::new(0);
static GEN: AtomicU64 = AtomicU64::new(0);

fn writer(_: u64) -> i32 {
    let x = BASE.load(SeqCst);
    let n = smp::ncpus();
    let mut g = 0;
    while STOP.load(SeqCst) == 0 {
        g += 1;
        for i in 0..PAGES {
            wr(x + i * 4096, g);
        }
        GEN.store(g, SeqCst);
        smp::relax(n);
    }
    0
}

/// The child: its view of the pages must not change while the sibling (in the parent)
/// keeps writing.
fn child(x: u64) -> i32 {
    let mut first = [0u64; PAGES as usize];
    for (i, f) in first.iter_mut().enumerate() {
        *f = rd(x + i as u64 * 4096);
    }
    for k in 0..2000 {
        if k % 100 == 0 {
            yield_now();
        }
        for (i, f) in first.iter().enumerate() {
            if rd(x + i as u64 * 4096) != *f {
                diag!(
                    "child: page {} changed from {} to {}",
                    i,
                    f,
                    rd(x + i as u64 * 4096)
                );
                return 1;
            }
        }
    }
    0
}

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(_a: Args) -> i32 {
    let x = mmap(PAGES * 4096, RW, MAP_POPULATE);
    BASE.store(x, SeqCst);
    let t = smp::spawn(writer, 0, 1);
    smp::wait_until(|| GEN.load(SeqCst) > 2);
    let mut bad = 0;
    for _ in 0..4 {
        let status = in_child(|| child(x));
        if exited(status) != Some(0) {
            bad += 1;
        }
        let g = GEN.load(SeqCst);
        smp::wait_until(|| GEN.load(SeqCst) > g + 1);
    }
    STOP.store(1, SeqCst);
    check!(t.join() == 0, "writer");
    let g = GEN.load(SeqCst);
    check!(
        rd(x) == g,
        "the parent lost the sibling's writes: {} vs {}",
        rd(x),
        g
    );
    diag!(
        "smp_fork_cow: 4 forks on {} CPUs while a sibling wrote ({} generations): {} children saw a change",
        smp::ncpus(),
        g,
        bad
    );
    check!(bad == 0, "{} children saw the sibling's writes", bad);
    check!(munmap(x, PAGES * 4096) == PAGES, "munmap");
    0
}
