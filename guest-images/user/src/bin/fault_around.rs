//! fault_around: demand faults map their fault-around window installed old (A=0); a
//! reclaim pass finds the prefaulted pages the program never touched from the accessed
//! bits (QUERY_AD in PV modes, the CPU's A bits natively), unmaps them, and needs no TLB
//! flush for them. Every count is checked exactly against the kernel's window rule.
#![no_std]
#![no_main]
use utest::*;

/// Touches (reads) the pages of `want` in order; returns the faults the kernel must take
/// and fills `mapped` with the windows those faults map.
fn expected(n: u64, fa: u64, want: &[u64], mapped: &mut [u64]) -> u64 {
    let mut faults = 0;
    for i in 0..n {
        if bit(want, i) && !bit(mapped, i) {
            faults += 1;
            let (lo, hi) = around_window(i, fa, n);
            set_range(mapped, lo, hi);
        }
    }
    faults
}

/// Unmaps every maximal run of pages mapped but not in `young`; returns (PTEs dropped,
/// munmap calls).
fn reclaim(x: u64, n: u64, mapped: &[u64], young: &[u64]) -> (u64, u64) {
    let (mut dropped, mut calls) = (0, 0);
    let mut i = 0;
    while i < n {
        if !bit(mapped, i) || bit(young, i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && bit(mapped, i) && !bit(young, i) {
            i += 1;
        }
        dropped += munmap(x + start * 4096, (i - start) * 4096);
        calls += 1;
    }
    (dropped, calls)
}

/// Reclaim: the accessed bits must say exactly which pages were touched; the prefaulted
/// rest is unmapped with no guest TLB flush. 0 on success, else the failing line.
fn reclaim_untouched(x: u64, n: u64, want: &[u64], mapped: &[u64], prefaulted: u64) -> i32 {
    let touched = popcount(want);
    let mut got = [0u64; MAXW];
    // Reclaim: the accessed bits say exactly which pages the program touched.
    let young = ad(x, n, &mut got, AD_A);
    if let Some(i) = first_diff(want, &got, n) {
        check!(
            false,
            "page {} young={} expected {}",
            i,
            bit(&got, i),
            bit(want, i)
        );
    }
    check!(
        young == touched,
        "{} young pages, expected {}",
        young,
        touched
    );
    let (fl0, h0) = (stat(st::FLUSHES), stat(st::HYPERCALLS));
    let (dropped, calls) = reclaim(x, n, mapped, &got);
    let (fl, h) = (stat(st::FLUSHES) - fl0, stat(st::HYPERCALLS) - h0);
    check!(
        dropped == prefaulted,
        "reclaim dropped {} PTEs, expected {}",
        dropped,
        prefaulted
    );
    check!(fl == 0, "{} guest TLB flushes for never-touched pages", fl);
    diag!(
        "reclaim: {} prefaulted never-touched pages unmapped ({} munmaps, {} MMU hypercalls), {} guest TLB flushes",
        dropped,
        calls,
        h,
        fl
    );
    0
}

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(a: Args) -> i32 {
    let n = a.pages.clamp(1, MAXP as u64);
    let fa = stat(st::FAULT_AROUND);
    let mut rng = Rng(a.seed.wrapping_mul(11) | 1);
    let mut want = [0u64; MAXW];
    let mut mapped = [0u64; MAXW];
    subset(&mut rng, n, 8, &mut want);
    set_range(&mut want, 0, 1);
    let touched = popcount(&want);
    let faults = expected(n, fa, &want, &mut mapped);
    let prefaulted = popcount(&mapped) - touched;
    let free0 = stat(st::FREE);
    let x = mmap(n * 4096, RW, 0);
    let (f0, m0, p0, h0) = (
        stat(st::FAULTS),
        stat(st::FAULT_MAPPED),
        stat(st::PTE_UPDATES),
        stat(st::HYPERCALLS),
    );
    for i in 0..n {
        if bit(&want, i) {
            check!(rd(x + i * 4096 + 8) == 0, "page {} not zero", i);
        }
    }
    let (f, mp) = (stat(st::FAULTS) - f0, stat(st::FAULT_MAPPED) - m0);
    let (p, h) = (stat(st::PTE_UPDATES) - p0, stat(st::HYPERCALLS) - h0);
    check!(
        f == faults,
        "{} faults, expected {} (fault_around={})",
        f,
        faults,
        fa
    );
    check!(mp == touched + prefaulted, "{} pages mapped by faults", mp);
    check!(
        free0 - stat(st::FREE) >= mp,
        "fewer frames used than pages mapped"
    );
    diag!(
        "fault-around={} sweep of {} pages: {} touched, {} faults, {} pages mapped, {} PTE updates, {} MMU hypercalls",
        fa,
        n,
        touched,
        f,
        mp,
        p,
        h
    );
    let r = reclaim_untouched(x, n, &want, &mapped, prefaulted);
    if r != 0 {
        return r;
    }
    // The touched pages are still mapped (no faults), the rest is gone.
    let f0 = stat(st::FAULTS);
    for i in 0..n {
        if bit(&want, i) {
            check!(rd(x + i * 4096 + 8) == 0, "page {} lost after reclaim", i);
        }
    }
    check!(
        stat(st::FAULTS) == f0,
        "touched pages faulted after reclaim"
    );
    let mut left = 0;
    for i in 0..n {
        if bit(&want, i) || !bit(&mapped, i) {
            left += munmap(x + i * 4096, 4096);
        }
    }
    check!(
        left == touched,
        "{} PTEs left after reclaim, expected {}",
        left,
        touched
    );
    // Only the page tables of the range stay allocated until exit (the runner checks that
    // every frame comes back then).
    check!(
        free0 - stat(st::FREE) <= 2,
        "{} frames still used",
        free0 - stat(st::FREE)
    );
    0
}
