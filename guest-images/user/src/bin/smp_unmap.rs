//! smp_unmap: a thread on another CPU keeps a page's translation hot; this CPU unmaps it;
//! once `munmap` returns, the other CPU's next user-mode access must fault (a shootdown
//! reached it: IPIs natively, the VMM's remote flush in PV).
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
        fill(x, 4, r);
        HOT.start(r, x + 4096, false);
        ensure!(munmap(x, 4 * 4096) == 4, "munmap");
        Ok(HOT.changed(r) != smp::FAULTED)
    });
    let stale = match stale {
        Ok(s) => s,
        Err(e) => return e,
    };
    diag!(
        "smp_unmap: {} rounds on {} CPUs, {} stale reads after munmap, {} flush IPIs",
        ROUNDS,
        smp::ncpus(),
        stale,
        stat(st::FLUSH_IPIS)
    );
    check!(stale == 0, "{} reads through an unmapped page", stale);
    0
}
