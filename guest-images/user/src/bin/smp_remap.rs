//! smp_remap: a thread on another CPU keeps reading a page; this CPU unmaps it and maps a
//! new frame with new content at the same address; the other CPU must read the new content.
#![no_std]
#![no_main]
use utest::smp::{self, HOT};
use utest::*;

const ROUNDS: u64 = 8;

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(_a: Args) -> i32 {
    let stale = smp::probe_rounds(ROUNDS, |r| {
        let x = mmap(4096, RW, MAP_POPULATE);
        wr(x, 0x01d0_0000 + r);
        HOT.start(r, x, false);
        ensure!(munmap(x, 4096) == 1, "munmap");
        // The freed frame goes to a filler mapping, so the new one is a different frame.
        let filler = mmap(4096, RW, MAP_POPULATE);
        ensure!(
            mmap_at(x, 4096, RW, MAP_POPULATE) == x,
            "mmap at the same address"
        );
        wr(x, 0x0e30_0000 + r);
        HOT.expect(0x0e30_0000 + r);
        let seen = HOT.changed(r);
        let stale = seen != 0x0e30_0000 + r;
        if stale {
            diag!("round {}: the other CPU read {:#x}", r, seen);
        }
        ensure!(munmap(x, 4096) == 1, "munmap");
        ensure!(munmap(filler, 4096) == 1, "munmap filler");
        Ok(stale)
    });
    let stale = match stale {
        Ok(s) => s,
        Err(e) => return e,
    };
    diag!(
        "smp_remap: {} rounds on {} CPUs, {} stale reads of the old frame",
        ROUNDS,
        smp::ncpus(),
        stale
    );
    check!(stale == 0, "{} stale reads", stale);
    0
}
