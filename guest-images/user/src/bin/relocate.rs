//! relocate: move the page tables of a live process while its pages are dirty; data,
//! translations and the dirty set are intact afterwards.
#![no_std]
#![no_main]
use utest::*;

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(a: Args) -> i32 {
    let n = a.pages.clamp(1, MAXP as u64);
    let x = mmap(n * 4096, RW, MAP_POPULATE);
    fill(x, n, 0x9999);
    let mut rng = Rng(a.seed.wrapping_mul(7) | 1);
    let mut want = [0u64; MAXW];
    let mut got = [0u64; MAXW];
    for round in 0..3u64 {
        ad(x, n, &mut got, AD_D | AD_CLEAR);
        subset(&mut rng, n, 3, &mut want);
        for i in 0..n {
            if bit(&want, i) {
                wr(x + i * 4096 + 24, round);
            }
        }
        let free0 = stat(st::FREE);
        let (h0, t0) = (stat(st::HYPERCALLS), rdtsc());
        let moved = relocate(x);
        let (h1, t1) = (stat(st::HYPERCALLS), rdtsc());
        check!(moved == 3, "relocated {} tables, expected 3", moved);
        check!(stat(st::FREE) == free0, "relocation leaked frames");
        if round == 0 {
            diag!(
                "relocated L1/L2/L3: {} MMU hypercalls, {} cycles",
                h1 - h0,
                t1 - t0
            );
        }
        let f0 = stat(st::FAULTS);
        check!(
            verify(x, n, 0x9999).is_none(),
            "round {}: data lost after relocation",
            round
        );
        check!(
            stat(st::FAULTS) == f0,
            "round {}: translations lost (faults)",
            round
        );
        ad(x, n, &mut got, AD_D | AD_CLEAR);
        if let Some(i) = first_diff(&want, &got, n) {
            check!(
                false,
                "round {}: page {} dirty={} expected {}",
                round,
                i,
                bit(&got, i),
                bit(&want, i)
            );
        }
    }
    fill(x, n, 0x1234);
    check!(verify(x, n, 0x1234).is_none(), "writes after relocation");
    check!(munmap(x, n * 4096) == n, "munmap");
    0
}
