//! smp_dirty: a thread on another CPU writes continuously (a new write generation into
//! each page of a set) while this CPU harvests the dirty bits with clear: every page whose
//! content changed between two harvests must show D (no lost dirty bit: a harvest's clear
//! must reach the writer's TLB), and pages never written must never show D.
#![no_std]
#![no_main]
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use utest::smp;
use utest::*;

const PAGES: u64 = 64;
const ROUNDS: u64 = 24;
static BASE: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicU64 = AtomicU64::new(0);
static PASSES: AtomicU64 = AtomicU64::new(0);

/// Pages the writer writes (the others must stay clean).
fn written(i: u64) -> bool {
    !i.is_multiple_of(3)
}

fn writer(_: u64) -> i32 {
    let x = BASE.load(SeqCst);
    let n = smp::ncpus();
    let mut g = 0;
    while STOP.load(SeqCst) == 0 {
        g += 1;
        for i in (0..PAGES).filter(|&i| written(i)) {
            wr(x + i * 4096 + 8, g);
        }
        PASSES.fetch_add(1, SeqCst);
        smp::relax(n);
    }
    0
}

fn gens(x: u64, out: &mut [u64; PAGES as usize]) {
    for (i, g) in out.iter_mut().enumerate() {
        *g = rd(x + i as u64 * 4096 + 8);
    }
}

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(_a: Args) -> i32 {
    let x = mmap(PAGES * 4096, RW, MAP_POPULATE);
    BASE.store(x, SeqCst);
    let mut bm = [0u64; 1];
    ad(x, PAGES, &mut bm, AD_D | AD_CLEAR);
    let t = smp::spawn(writer, 0, 1);
    smp::wait_until(|| PASSES.load(SeqCst) > 0);
    let (mut after, mut before) = ([0u64; PAGES as usize], [0u64; PAGES as usize]);
    ad(x, PAGES, &mut bm, AD_D | AD_CLEAR);
    gens(x, &mut after);
    let (mut lost, mut invented, mut changed) = (0, 0, 0);
    for _ in 0..ROUNDS {
        let p0 = PASSES.load(SeqCst);
        smp::wait_until(|| PASSES.load(SeqCst) > p0);
        gens(x, &mut before);
        ad(x, PAGES, &mut bm, AD_D | AD_CLEAR);
        for i in 0..PAGES {
            let d = bit(&bm, i);
            if before[i as usize] != after[i as usize] {
                changed += 1;
                if !d {
                    lost += 1;
                }
            }
            if !written(i) && d {
                invented += 1;
            }
        }
        gens(x, &mut after);
    }
    STOP.store(1, SeqCst);
    check!(t.join() == 0, "writer");
    diag!(
        "smp_dirty: {} harvests of {} pages on {} CPUs: {} page changes between harvests, {} lost dirty bits, {} invented",
        ROUNDS,
        PAGES,
        smp::ncpus(),
        changed,
        lost,
        invented
    );
    check!(changed > 0, "the writer never raced a harvest");
    check!(lost == 0, "{} dirty bits lost", lost);
    check!(invented == 0, "{} dirty bits invented", invented);
    check!(munmap(x, PAGES * 4096) == PAGES, "munmap");
    0
}
