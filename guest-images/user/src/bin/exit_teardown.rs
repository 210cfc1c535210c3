//! exit_teardown: a process with many mappings exits; every frame comes back; in PV modes
//! the teardown costs O(1) MMU hypercalls whatever the number of PTEs.
#![no_std]
#![no_main]
use utest::*;

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(a: Args) -> i32 {
    let n = a.pages.max(1);
    let mut hcs = [0u64; 2];
    for (k, regions) in [1u64, 4].into_iter().enumerate() {
        let free0 = stat(st::FREE);
        let pid = fork();
        if pid == 0 {
            for r in 0..regions {
                let x = mmap(n * 4096, RW, MAP_POPULATE);
                fill(x, n, r);
            }
            exit(0);
        }
        let (_, s) = wait();
        check!(exited(s) == Some(0), "child status {:#x}", s);
        let free1 = stat(st::FREE);
        check!(
            free1 == free0,
            "free frames {} after exit, expected {}",
            free1,
            free0
        );
        let (hc, ptes) = (stat(st::TEARDOWN_HC), stat(st::TEARDOWN_PTES));
        diag!("teardown of {} PTEs: {} MMU hypercalls", ptes, hc);
        check!(ptes >= regions * n, "only {} PTEs torn down", ptes);
        hcs[k] = hc;
    }
    if a.mode != 0 {
        check!(
            hcs[0] == hcs[1] && hcs[0] <= 2,
            "teardown hypercalls not O(1): {} vs {}",
            hcs[0],
            hcs[1]
        );
    } else {
        check!(
            hcs[0] == 0 && hcs[1] == 0,
            "native teardown made hypercalls"
        );
    }
    0
}
