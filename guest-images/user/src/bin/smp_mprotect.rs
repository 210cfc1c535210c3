//! smp_mprotect: a thread on another CPU keeps writing a page; this CPU makes it read-only;
//! once `mprotect` returns, the other CPU's next write must fault.
#![no_std]
#![no_main]
use utest::smp::{self, HOT};
use utest::*;

const ROUNDS: u64 = 8;

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(_a: Args) -> i32 {
    smp::catch_faults();
    let t = smp::spawn(smp::prober, ROUNDS, 1);
    let mut stale = 0;
    for r in 1..=ROUNDS {
        let x = mmap(4 * 4096, RW, MAP_POPULATE);
        HOT.start(r, x + 2 * 4096, true);
        check!(mprotect(x, 4 * 4096, PROT_R) == 0, "mprotect RO");
        let before = rd(x + 2 * 4096);
        if HOT.changed(r) != smp::FAULTED {
            stale += 1;
        }
        check!(rd(x + 2 * 4096) == before, "a read-only page changed");
        check!(mprotect(x, 4 * 4096, RW) == 0, "mprotect RW");
        check!(munmap(x, 4 * 4096) == 4, "munmap");
    }
    check!(t.join() == 0, "prober");
    diag!(
        "smp_mprotect: {} rounds on {} CPUs, {} writes through a read-only page",
        ROUNDS,
        smp::ncpus(),
        stale
    );
    check!(stale == 0, "{} writes through a read-only page", stale);
    0
}
