//! ad_young: clear accessed bits, touch a random subset, query: exactly that subset.
#![no_std]
#![no_main]
use utest::*;

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(a: Args) -> i32 {
    let n = a.pages.clamp(1, MAXP as u64);
    let x = mmap(n * 4096, RW, MAP_POPULATE);
    fill(x, n, 0x7777);
    let mut rng = Rng(a.seed | 1);
    let mut want = [0u64; MAXW];
    let mut got = [0u64; MAXW];
    for round in 0..6 {
        ad(x, n, &mut got, AD_A | AD_CLEAR);
        let c = ad(x, n, &mut got, AD_A);
        check!(
            c == 0,
            "round {}: {} pages young right after clearing",
            round,
            c
        );
        subset(&mut rng, n, 3, &mut want);
        for i in 0..n {
            if bit(&want, i) {
                let _ = rd(x + i * 4096 + 8 * (round as u64));
            }
        }
        let (h0, t0) = (stat(st::HYPERCALLS), rdtsc());
        let c = ad(x, n, &mut got, AD_A);
        let (h1, t1) = (stat(st::HYPERCALLS), rdtsc());
        if let Some(i) = first_diff(&want, &got, n) {
            check!(
                false,
                "round {}: page {} young={} expected {}",
                round,
                i,
                bit(&got, i),
                bit(&want, i)
            );
        }
        check!(c == popcount(&want), "round {}: count {}", round, c);
        if round == 0 {
            diag!(
                "young query of {} pages ({} young): {} MMU hypercalls, {} cycles",
                n,
                c,
                h1 - h0,
                t1 - t0
            );
        }
    }
    check!(munmap(x, n * 4096) == n, "munmap");
    0
}
