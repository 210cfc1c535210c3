//! Criterion benches of the hot paths: a 512-entry PT_UPDATE batch (through
//! `ShadowMmu::batch`, and entry by entry through `ShadowMmu::apply`; and with A/D set in
//! every shadow leaf, as zap or mprotect of used pages), pinning a full L1, and SYNC_AD
//! over 512 leaves; and two models of the in-VM condition, where the guest runs on
//! the same core between hypercalls and the engine's data is cold:
//! * `pt_update_spread_512`: each 512-entry batch spreads over 512 of 2048 L1s (one entry
//!   per L1, 1M entries cycled through, as demand-fault populate spreads over fresh L1s);
//!   the engine's data for an entry has left the caches when it comes round again;
//! * `cold/*`: a 32 MiB buffer is written between batches (caches and TLB evicted), then a
//!   512-entry batch or a 1-entry batch (populate: one update per fault) is timed.
#![allow(clippy::single_range_in_vec_init)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hypercall::MmuOp;
use shadow::pte::{AD, P, RW, US};
use shadow::{Layout, ShadowMmu};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const POOL: u64 = 0x1000_0000;
const POOL_FRAMES: u64 = 4096;
const RAM: u64 = 0x800_0000;
const L4: u64 = 0x10_000;
const L3: u64 = 0x11_000;
const L2: u64 = 0x12_000;
const L1: u64 = 0x13_000;
const SPARE_L1: u64 = 0x20_000;
const T: u64 = P | RW | US;
/// The spread model: `SPREAD_L1S` L1s at `SPREAD_BASE` under 4 L2s at `SPREAD_L2`.
const SPREAD_L1S: u64 = 2048;
const SPREAD_BASE: u64 = 0x100_0000;
const SPREAD_L2: u64 = 0x30_000;
/// Target frames of the spread model's leaves: `0x2000..0x2000 + SPREAD_TARGETS`.
const SPREAD_TARGETS: u64 = 0x4000;

fn memory() -> (GuestMemoryMmap, ShadowMmu) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), RAM as usize),
        (GuestAddress(POOL), (POOL_FRAMES * 4096) as usize),
    ])
    .unwrap();
    let layout = Layout {
        ram: vec![0..RAM],
        reserved: vec![],
        pool_base: POOL,
        pool_frames: POOL_FRAMES,
    };
    (mem, ShadowMmu::new(layout, 1).unwrap())
}

fn w(mem: &GuestMemoryMmap, gpa: u64, v: u64) {
    mem.write_obj(v, GuestAddress(gpa)).unwrap();
}

fn load(mem: &GuestMemoryMmap, mmu: &mut ShadowMmu) {
    let pin = MmuOp::Pin {
        level: 4,
        frame: L4,
    };
    mmu.apply(mem, 0, &pin).unwrap();
    mmu.apply(mem, 0, &MmuOp::NewBaseptr { frame: L4 }).unwrap();
    mmu.end_batch(0);
}

/// One L1 (VA 0..2 MiB) of 512 leaves, loaded; a spare unlinked L1.
fn setup() -> (GuestMemoryMmap, ShadowMmu) {
    let (mem, mut mmu) = memory();
    w(&mem, L4, L3 | T);
    w(&mem, L3, L2 | T);
    w(&mem, L2, L1 | T);
    for i in 0..512u64 {
        w(&mem, L1 + 8 * i, ((0x100 + i) << 12) | T);
        w(&mem, SPARE_L1 + 8 * i, ((0x400 + i) << 12) | T);
    }
    load(&mem, &mut mmu);
    (mem, mmu)
}

/// `SPREAD_L1S` empty L1s (4 GiB of VA), loaded.
fn setup_spread() -> (GuestMemoryMmap, ShadowMmu) {
    let (mem, mut mmu) = memory();
    w(&mem, L4, L3 | T);
    for j in 0..SPREAD_L1S / 512 {
        w(&mem, L3 + 8 * j, (SPREAD_L2 + (j << 12)) | T);
    }
    for k in 0..SPREAD_L1S {
        w(&mem, SPREAD_L2 + 8 * k, (SPREAD_BASE + (k << 12)) | T);
    }
    load(&mem, &mut mmu);
    (mem, mmu)
}

/// The `n`-th update of the spread model: entry `n / SPREAD_L1S % 512` of L1
/// `n % SPREAD_L1S`; mapped on even passes over the 1M entries, unmapped on odd ones.
fn spread_op(n: u64) -> MmuOp {
    let l1 = n % SPREAD_L1S;
    let idx = (n / SPREAD_L1S) % 512;
    let mapped = (n / (SPREAD_L1S * 512)).is_multiple_of(2);
    // Scattered targets (a multiplicative hash of the entry).
    let target = 0x2000 + (n.wrapping_mul(0x9e37_79b9) >> 7) % SPREAD_TARGETS;
    MmuOp::PtUpdate {
        ptr: SPREAD_BASE + (l1 << 12) + 8 * idx,
        val: if mapped { (target << 12) | T } else { 0 },
        preserve_ad: false,
    }
}

/// Update `i` of the hot batch: remaps leaf `i` of the L1 to another frame.
fn hot_op(i: u64, flip: u64) -> MmuOp {
    MmuOp::PtUpdate {
        ptr: L1 + 8 * i,
        val: ((0x100 + i + flip * 0x200) << 12) | T,
        preserve_ad: false,
    }
}

/// The hot batch through [`ShadowMmu::batch`] (as the VMM applies a batch).
fn batch_512(mem: &GuestMemoryMmap, mmu: &mut ShadowMmu, flip: u64) {
    let mut b = mmu.batch(mem);
    for i in 0..512u64 {
        b.apply(0, &hot_op(i, flip)).unwrap();
    }
    black_box(mmu.end_batch(0));
}

/// Sets A and D in the 512 shadow leaves of the hot L1, as the CPU does on use.
fn mark_used(mem: &GuestMemoryMmap, mmu: &ShadowMmu) {
    for i in 0..512u64 {
        if let Some(l) = mmu.debug_translate(mem, 0, i << 12) {
            w(mem, l.slot_gpa, l.value | AD);
        }
    }
}

/// Writes one byte per cache line of a 32 MiB buffer (caches and TLB evicted).
fn evict(buf: &mut [u8], round: u8) {
    for b in buf.iter_mut().step_by(64) {
        *b = b.wrapping_add(round);
    }
    black_box(&buf);
}

fn hot_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("shadow");
    g.throughput(Throughput::Elements(512));

    let (mem, mut mmu) = setup();
    let mut flip = 0u64;
    g.bench_function("pt_update_batch_512", |b| {
        b.iter(|| {
            flip ^= 1;
            batch_512(&mem, &mut mmu, flip)
        })
    });

    let (mem, mut mmu) = setup();
    let mut flip = 0u64;
    g.bench_function("pt_update_batch_512_apply", |b| {
        b.iter(|| {
            flip ^= 1;
            for i in 0..512u64 {
                mmu.apply(&mem, 0, &hot_op(i, flip)).unwrap();
            }
            mmu.end_batch(0)
        })
    });

    // Zap/mprotect of used pages: the CPU set A and D in every shadow leaf (the update
    // harvests them into the guest entry and needs a flush).
    let (mem, mut mmu) = setup();
    let mut flip = 0u64;
    g.bench_function("pt_update_used_512", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                flip ^= 1;
                mark_used(&mem, &mmu);
                let s = Instant::now();
                batch_512(&mem, &mut mmu, flip);
                t += s.elapsed();
            }
            t
        })
    });

    let (mem, mut mmu) = setup_spread();
    let mut n = 0u64;
    g.bench_function("pt_update_spread_512", |b| {
        b.iter(|| {
            let mut batch = mmu.batch(&mem);
            for _ in 0..512 {
                batch.apply(0, &spread_op(n)).unwrap();
                n += 1;
            }
            mmu.end_batch(0)
        })
    });

    let (mem, mut mmu) = setup();
    g.bench_function("pin_l1_512_present", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let s = Instant::now();
                let pin = MmuOp::Pin {
                    level: 1,
                    frame: SPARE_L1,
                };
                mmu.apply(&mem, 0, &pin).unwrap();
                t += s.elapsed();
                let unpin = MmuOp::Unpin {
                    frame: SPARE_L1,
                    detach: false,
                };
                mmu.apply(&mem, 0, &unpin).unwrap();
                mmu.end_batch(0);
            }
            t
        })
    });

    let (mem, mut mmu) = setup();
    g.bench_function("sync_ad_512_leaves", |b| {
        b.iter(|| {
            let op = MmuOp::SyncAd {
                va: 0,
                pages: 512,
                clear_a: false,
                clear_d: true,
            };
            mmu.apply(&mem, 0, &op).unwrap();
            mmu.end_batch(0)
        })
    });
    g.finish();
}

/// The evicted-cache models. Each timed batch costs a 32 MiB eviction (untimed), so the
/// group sets its own short warm-up and measurement times and 10 samples (the command-line
/// times do not apply to it).
fn cold_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("cold");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(5))
        .measurement_time(Duration::from_millis(50));
    let mut buf = vec![0u8; 32 << 20];

    g.throughput(Throughput::Elements(512));
    let (mem, mut mmu) = setup();
    let mut flip = 0u64;
    g.bench_function("pt_update_batch_512", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                flip ^= 1;
                evict(&mut buf, flip as u8);
                let s = Instant::now();
                batch_512(&mem, &mut mmu, flip);
                t += s.elapsed();
            }
            t
        })
    });

    g.throughput(Throughput::Elements(1));
    let (mem, mut mmu) = setup_spread();
    let mut n = 0u64;
    g.bench_function("pt_update_1_spread", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                evict(&mut buf, n as u8);
                let s = Instant::now();
                mmu.apply(&mem, 0, &spread_op(n)).unwrap();
                black_box(mmu.end_batch(0));
                t += s.elapsed();
                n += 1;
            }
            t
        })
    });
    g.finish();
}

criterion_group!(shadow_benches, hot_benches, cold_benches);
criterion_main!(shadow_benches);
