//! populate: MAP_POPULATE maps every page up front (zeroed, no faults on touch), frees on
//! munmap; compares CPU zeroing with ZERO_FRAME (PV modes with zero=vmm); demand-zero
//! without populate.
#![no_std]
#![no_main]
use utest::*;

fn round(n: u64, flags: u64, what: &str) -> Result<u64, i32> {
    let len = n * 4096;
    let (h0, e0, p0) = (
        stat(st::HYPERCALLS),
        stat(st::ENTRIES),
        stat(st::PTE_UPDATES),
    );
    let t0 = rdtsc();
    let a = mmap(len, RW, MAP_POPULATE | flags);
    let t1 = rdtsc();
    let (h1, e1, p1) = (
        stat(st::HYPERCALLS),
        stat(st::ENTRIES),
        stat(st::PTE_UPDATES),
    );
    let free1 = stat(st::FREE);
    let f0 = stat(st::FAULTS);
    if a as i64 <= 0 {
        diag!("FAIL mmap returned {:#x}", a);
        return Err(1);
    }
    if !all_zero(a, n) {
        diag!("FAIL populated memory not zero");
        return Err(2);
    }
    fill(a, n, 0x5a5a_0000);
    if let Some(i) = verify(a, n, 0x5a5a_0000) {
        diag!("FAIL page {} lost its data", i);
        return Err(3);
    }
    let f1 = stat(st::FAULTS);
    if f1 != f0 {
        diag!("FAIL {} faults touching a populated range", f1 - f0);
        return Err(4);
    }
    let unmapped = munmap(a, len);
    let free2 = stat(st::FREE);
    if unmapped != n || free2 - free1 != n {
        diag!(
            "FAIL munmap dropped {} PTEs, freed {} frames, expected {}",
            unmapped,
            free2 - free1,
            n
        );
        return Err(5);
    }
    let c = t1 - t0;
    diag!(
        "{}: {} pages in {} cycles ({}/page), {} PTE updates, {} MMU hypercalls, {} entries",
        what,
        n,
        c,
        c / n,
        p1 - p0,
        h1 - h0,
        e1 - e0
    );
    Ok(c)
}

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(a: Args) -> i32 {
    let n = a.pages;
    let cpu = match round(n, MAP_ZERO_CPU, "populate zero=cpu") {
        Ok(c) => c,
        Err(e) => return e,
    };
    if a.mode != 0 && stat(st::ZERO_BY_VMM) == 0 {
        diag!("zero=cpu: the kernel zeroes every frame with the CPU (no ZERO_FRAME comparison)");
    } else if a.mode != 0 {
        let z0 = stat(st::ZERO_VMM);
        let vmm = match round(n, 0, "populate zero=vmm (ZERO_FRAME)") {
            Ok(c) => c,
            Err(e) => return e,
        };
        let z = stat(st::ZERO_VMM) - z0;
        check!(z >= n, "only {} ZERO_FRAME entries for {} pages", z, n);
        diag!(
            "zeroing winner: {} (cpu {} vs vmm {} cycles)",
            if vmm < cpu { "vmm ZERO_FRAME" } else { "cpu" },
            cpu,
            vmm
        );
    } else {
        diag!("native mode: zeroing is done by the CPU only");
    }
    // Demand-zero: no populate, every first touch faults exactly once.
    let len = n * 4096;
    let b = mmap(len, RW, 0);
    let f0 = stat(st::FAULTS);
    let t0 = rdtsc();
    for i in 0..n {
        check!(rd(b + i * 4096) == 0, "demand page {} not zero", i);
        wr(b + i * 4096, i);
    }
    let t1 = rdtsc();
    let f = stat(st::FAULTS) - f0;
    check!(f == n, "{} faults for {} demand-zero pages", f, n);
    diag!("demand-zero: {} faults, {} cycles/page", f, (t1 - t0) / n);
    check!(munmap(b, len) == n, "munmap count");
    0
}
