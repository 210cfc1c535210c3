//! ad_dirty: clear dirty bits, write a random subset, query: exactly that subset; writes
//! between query and clear are neither lost nor invented.
#![no_std]
#![no_main]
use utest::*;

fn write_set(x: u64, n: u64, s: &[u64], v: u64) {
    for i in 0..n {
        if bit(s, i) {
            wr(x + i * 4096 + 16, v);
        }
    }
}

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(a: Args) -> i32 {
    let n = a.pages.clamp(1, MAXP as u64);
    let x = mmap(n * 4096, RW, MAP_POPULATE);
    fill(x, n, 0x8888);
    let mut rng = Rng(a.seed.wrapping_mul(3) | 1);
    let mut s1 = [0u64; MAXW];
    let mut s2 = [0u64; MAXW];
    let mut got = [0u64; MAXW];
    ad(x, n, &mut got, AD_D | AD_CLEAR);
    check!(ad(x, n, &mut got, AD_D) == 0, "dirty right after clearing");
    for round in 0..5u64 {
        subset(&mut rng, n, 4, &mut s1);
        write_set(x, n, &s1, round);
        let (h0, t0) = (stat(st::HYPERCALLS), rdtsc());
        let c = ad(x, n, &mut got, AD_D | AD_CLEAR);
        let (h1, t1) = (stat(st::HYPERCALLS), rdtsc());
        if let Some(i) = first_diff(&s1, &got, n) {
            check!(
                false,
                "round {} query+clear: page {} dirty={} expected {}",
                round,
                i,
                bit(&got, i),
                bit(&s1, i)
            );
        }
        check!(c == popcount(&s1), "count");
        if round == 0 {
            diag!(
                "dirty query+clear of {} pages ({} dirty): {} MMU hypercalls, {} cycles",
                n,
                c,
                h1 - h0,
                t1 - t0
            );
        }
        // Write, query without clearing, write more, then query+clear: the union.
        subset(&mut rng, n, 5, &mut s2);
        write_set(x, n, &s2, round + 100);
        ad(x, n, &mut got, AD_D);
        if let Some(i) = first_diff(&s2, &got, n) {
            check!(
                false,
                "round {} query: page {} dirty={} expected {}",
                round,
                i,
                bit(&got, i),
                bit(&s2, i)
            );
        }
        subset(&mut rng, n, 5, &mut s1);
        write_set(x, n, &s1, round + 200);
        for k in 0..s1.len() {
            s1[k] |= s2[k];
        }
        ad(x, n, &mut got, AD_D | AD_CLEAR);
        if let Some(i) = first_diff(&s1, &got, n) {
            check!(
                false,
                "round {} union: page {} dirty={} expected {}",
                round,
                i,
                bit(&got, i),
                bit(&s1, i)
            );
        }
        check!(
            ad(x, n, &mut got, AD_D) == 0,
            "round {}: dirty bits invented after clear",
            round
        );
    }
    check!(munmap(x, n * 4096) == n, "munmap");
    0
}
