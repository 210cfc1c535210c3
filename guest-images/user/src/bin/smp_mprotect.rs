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
    let stale = smp::probe_rounds(ROUNDS, |r| {
        let x = mmap(4 * 4096, RW, MAP_POPULATE);
        HOT.start(r, x + 2 * 4096, true);
        ensure!(mprotect(x, 4 * 4096, PROT_R) == 0, "mprotect RO");
        let before = rd(x + 2 * 4096);
        let stale = HOT.changed(r) != smp::FAULTED;
        ensure!(rd(x + 2 * 4096) == before, "a read-only page changed");
        ensure!(mprotect(x, 4 * 4096, RW) == 0, "mprotect RW");
        ensure!(munmap(x, 4 * 4096) == 4, "munmap");
        Ok(stale)
    });
    let stale = match stale {
        Ok(s) => s,
        Err(e) => return e,
    };
    diag!(
        "smp_mprotect: {} rounds on {} CPUs, {} writes through a read-only page",
        ROUNDS,
        smp::ncpus(),
        stale
    );
    check!(stale == 0, "{} writes through a read-only page", stale);
    0
}
