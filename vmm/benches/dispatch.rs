//! Criterion benches of a whole MMU_BATCH hypercall as the VMM handles it after an exit,
//! without KVM: the dispatcher's request checks, the copy of the entry array, the engine
//! lock and apply, the end of the batch and the guarded response (`Dispatcher::handle`),
//! for a batch of 1 PT_UPDATE (the fault path: one update per fault) and of 512.
//!
//! `dispatch/*` runs them back to back (caches warm). `dispatch_cold/*` first writes a
//! 32 MiB buffer (untimed), as a guest that runs between two hypercalls on the same core
//! leaves the VMM's code and data evicted: the difference between the two is the part of
//! the in-VM MMU_BATCH time (`mmu_batch_phases`, `mmu_batch_sizes` in the stats) that is
//! cache refills, not work. A 1-update batch is then almost all fixed cost.
// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hypercall::{op, MmuEntry, RequestHeader};
use vmm::guest_ram::GuestRam;
use vmm::hcall::{mmu_batch, Dispatcher};
use vmm::layout::Layout;
use vmm::memory;

/// The request block and the entry array, in guest RAM.
const REQ: u64 = 0x1000;
const ENTRIES: u64 = 0x2000;
/// A pinned L4 → L3 → L2 → L1 chain (frames at 2 MiB are zero at start) and the first of
/// the data frames its L1 maps.
const L1: u64 = 0x20_0000;
const L2: u64 = 0x20_1000;
const L3: u64 = 0x20_2000;
const L4: u64 = 0x20_3000;
const DATA: u64 = 0x40_0000;
/// Present, writable, user.
const PRW: u64 = 7;

/// A dispatcher with the MMU handler over 64 MiB of RAM, VERSION negotiated, the chain
/// pinned and loaded.
fn setup() -> (Dispatcher, GuestRam) {
    let layout = Layout::new(64 << 20, 4 << 20).expect("layout");
    let mem = memory::allocate(&layout).expect("guest memory");
    let ram = GuestRam::new(mem, layout.usable().collect());
    let d = Dispatcher::new(ram.clone(), 1, mmu_batch::factory(&ram, &layout, 1));
    let version = RequestHeader::new(op::VERSION, [1, 0, 0, 0]);
    ram.write(REQ, &version.to_bytes()).expect("request");
    assert_eq!(d.handle(0, REQ).status, 0);
    let chain = [
        MmuEntry::pin(1, L1),
        MmuEntry::pin(2, L2),
        MmuEntry::pt_update(L2, L1 | PRW),
        MmuEntry::pin(3, L3),
        MmuEntry::pt_update(L3, L2 | PRW),
        MmuEntry::pin(4, L4),
        MmuEntry::pt_update(L4, L3 | PRW),
        MmuEntry::new_baseptr(L4),
    ];
    write_entries(&ram, &chain);
    assert_eq!(send(&d, &ram, chain.len()), 0);
    (d, ram)
}

/// Writes `entries` as the guest would, before its hypercall.
fn write_entries(ram: &GuestRam, entries: &[MmuEntry]) {
    for (i, e) in entries.iter().enumerate() {
        ram.write(ENTRIES + 32 * i as u64, &e.to_bytes())
            .expect("entry");
    }
}

/// The hypercall itself: the request block for `count` entries, then the dispatcher.
fn send(d: &Dispatcher, ram: &GuestRam, count: usize) -> i64 {
    let header = RequestHeader::new(op::MMU_BATCH, [ENTRIES, count as u64, 0, 0]);
    ram.write(REQ, &header.to_bytes()).expect("request");
    d.handle(0, REQ).status
}

/// `n` leaf updates of the chain's L1, entries 0.., mapping data frames shifted by `flip`
/// (every round changes every entry).
fn leaves(n: u64, flip: u64) -> Vec<MmuEntry> {
    (0..n)
        .map(|i| MmuEntry::pt_update(L1 + 8 * i, (DATA + ((i + flip) << 12)) | PRW))
        .collect()
}

/// Writes one byte per cache line of `buf` (caches and TLB evicted).
fn evict(buf: &mut [u8], round: u8) {
    for b in buf.iter_mut().step_by(64) {
        *b = b.wrapping_add(round);
    }
    black_box(&buf);
}

/// Times `rounds` batches of `n` updates; `evict` runs before each, untimed.
fn timed(
    (d, ram): &(Dispatcher, GuestRam),
    n: u64,
    rounds: u64,
    flip: &mut u64,
    mut before: impl FnMut(u8),
) -> Duration {
    let mut t = Duration::ZERO;
    for _ in 0..rounds {
        *flip ^= 1;
        write_entries(ram, &leaves(n, *flip));
        before(*flip as u8);
        let s = Instant::now();
        let status = send(d, ram, n as usize);
        t += s.elapsed();
        assert_eq!(status, 0);
    }
    t
}

fn warm_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("dispatch");
    let vm = setup();
    let mut flip = 0;
    for n in [1u64, 512] {
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("mmu_batch_{n}"), |b| {
            b.iter_custom(|iters| timed(&vm, n, iters, &mut flip, |_| {}))
        });
    }
    g.finish();
}

/// The evicted-cache model. Each timed batch costs a 32 MiB eviction (untimed), so the
/// group sets its own short times and 10 samples (the command-line times do not apply).
fn cold_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("dispatch_cold");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(5))
        .measurement_time(Duration::from_millis(300));
    let mut buf = vec![0u8; 32 << 20];
    let vm = setup();
    let mut flip = 0;
    for n in [1u64, 512] {
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("mmu_batch_{n}"), |b| {
            b.iter_custom(|iters| timed(&vm, n, iters, &mut flip, |r| evict(&mut buf, r)))
        });
    }
    g.finish();
}

criterion_group!(dispatch_benches, warm_benches, cold_benches);
criterion_main!(dispatch_benches);
