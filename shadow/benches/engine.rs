//! Criterion benches of the hot paths: a 512-entry PT_UPDATE batch, pinning a full L1, and
#![allow(clippy::single_range_in_vec_init)]
//! SYNC_AD over 512 leaves.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hypercall::MmuOp;
use shadow::pte::{P, RW, US};
use shadow::{Layout, ShadowMmu};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const POOL: u64 = 0x1000_0000;
const L4: u64 = 0x10_000;
const L3: u64 = 0x11_000;
const L2: u64 = 0x12_000;
const L1: u64 = 0x13_000;
const SPARE_L1: u64 = 0x20_000;
const T: u64 = P | RW | US;

fn setup() -> (GuestMemoryMmap, ShadowMmu) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x400_0000),
        (GuestAddress(POOL), 256 * 4096),
    ])
    .unwrap();
    let layout = Layout {
        ram: vec![0..0x400_0000],
        reserved: vec![],
        pool_base: POOL,
        pool_frames: 256,
    };
    let mut mmu = ShadowMmu::new(layout, 1).unwrap();
    let w = |gpa: u64, v: u64| mem.write_obj(v, GuestAddress(gpa)).unwrap();
    w(L4, L3 | T);
    w(L3, L2 | T);
    w(L2, L1 | T);
    for i in 0..512u64 {
        w(L1 + 8 * i, ((0x100 + i) << 12) | T);
        w(SPARE_L1 + 8 * i, ((0x400 + i) << 12) | T);
    }
    mmu.apply(
        &mem,
        0,
        &MmuOp::Pin {
            level: 4,
            frame: L4,
        },
    )
    .unwrap();
    mmu.apply(&mem, 0, &MmuOp::NewBaseptr { frame: L4 })
        .unwrap();
    mmu.end_batch(0);
    (mem, mmu)
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("shadow");
    g.throughput(Throughput::Elements(512));

    let (mem, mut mmu) = setup();
    let mut flip = 0u64;
    g.bench_function("pt_update_batch_512", |b| {
        b.iter(|| {
            flip ^= 1;
            for i in 0..512u64 {
                let val = ((0x100 + i + flip * 0x200) << 12) | T;
                let op = MmuOp::PtUpdate {
                    ptr: L1 + 8 * i,
                    val,
                    preserve_ad: false,
                };
                mmu.apply(&mem, 0, &op).unwrap();
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
                mmu.apply(
                    &mem,
                    0,
                    &MmuOp::Pin {
                        level: 1,
                        frame: SPARE_L1,
                    },
                )
                .unwrap();
                t += s.elapsed();
                mmu.apply(
                    &mem,
                    0,
                    &MmuOp::Unpin {
                        frame: SPARE_L1,
                        detach: false,
                    },
                )
                .unwrap();
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

criterion_group!(shadow_benches, benches);
criterion_main!(shadow_benches);
