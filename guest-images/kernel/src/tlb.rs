//! Cross-CPU TLB state: which root each CPU has loaded (lazy TLB: an idle CPU keeps its
//! last user root), the per-CPU flush mailbox of native mode's shootdowns, the CPU-index to
//! APIC-id map, wake-up IPIs, and the SMP counters.
//!
//! Native shootdown protocol: the initiator (holding the process-table lock, so at most
//! one shootdown runs at a time) posts a request in each target's mailbox, sends it an IPI
//! and waits for the acknowledgement while serving its own mailbox. A target takes the IPI
//! in user mode or in its idle `hlt`; a target in the kernel with interrupts off serves the
//! mailbox in every spin loop (`SpinLock::lock`, the idle loop, a shootdown's wait), so no
//! shootdown waits on a CPU that waits for it. PV modes never post: the VMM delivers the
//! flushes its shadow changes need before the hypercall returns.
//!
//! Shared state (all atomics): [`LOADED`] — written by its own CPU while it holds the
//! process-table lock, or by a CPU that holds that lock and has just detached the root
//! (a dying root replaced by the kernel root); the mailboxes — `REQ`/`DROP` written by the
//! initiator, `DONE` by the target; `APIC_IDS`/`ONLINE` — written at bring-up.

use crate::apic;
use crate::arch::{self, cpu_id, MAX_CPUS};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// The vector of every IPI this kernel sends (mailbox and wake-up).
pub const IPI_VECTOR: u8 = 0xf0;

/// The root (guest-physical L4) each CPU has loaded.
static LOADED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Mailbox: requests posted (a sequence number), requests served, a root to drop.
static REQ: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static DONE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static DROP: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// APIC id of each CPU index.
static APIC_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// CPUs online (indices `0..ONLINE`).
static ONLINE: AtomicUsize = AtomicUsize::new(1);
/// The kernel-only root (a dropped root is replaced by it).
static KERNEL_L4: AtomicU64 = AtomicU64::new(0);

/// SMP counters since boot (all CPUs).
pub struct Stats {
    /// Shootdown IPIs sent (native mode).
    pub flush_ipis: AtomicU64,
    /// Wake-up IPIs sent.
    pub wake_ipis: AtomicU64,
    /// Shootdowns that had at least one remote target.
    pub shootdowns: AtomicU64,
    /// Remote CPUs that still had a dying root loaded (lazily) at its teardown.
    pub lazy_detached: AtomicU64,
    /// Mailbox requests served.
    pub served: AtomicU64,
}

/// The SMP counters.
pub static STATS: Stats = Stats {
    flush_ipis: AtomicU64::new(0),
    wake_ipis: AtomicU64::new(0),
    shootdowns: AtomicU64::new(0),
    lazy_detached: AtomicU64::new(0),
    served: AtomicU64::new(0),
};

/// Records the boot CPU's APIC id and the kernel root.
pub fn init_boot(kernel_l4: u64) {
    APIC_IDS[0].store(apic::id(), Ordering::Relaxed);
    KERNEL_L4.store(kernel_l4, Ordering::Relaxed);
}

/// Records that CPU `cpu` (APIC id `apic_id`) is about to start.
pub fn set_apic_id(cpu: usize, apic_id: u32) {
    APIC_IDS[cpu].store(apic_id, Ordering::Relaxed);
}

/// Marks CPUs `0..n` online.
pub fn set_online(n: usize) {
    ONLINE.store(n, Ordering::Release);
}

/// CPUs online.
pub fn online() -> usize {
    ONLINE.load(Ordering::Acquire)
}

/// The root CPU `cpu` has loaded.
pub fn loaded(cpu: usize) -> u64 {
    LOADED[cpu].load(Ordering::Acquire)
}

/// Records this CPU's loaded root.
pub fn set_loaded(l4: u64) {
    LOADED[cpu_id()].store(l4, Ordering::Release);
}

/// After `dead` was detached everywhere (PV `UNPIN` with DETACH): every CPU that had it
/// loaded now runs on the kernel root. Returns how many other CPUs had it. The caller holds
/// the process-table lock.
pub fn detached(dead: u64) -> u64 {
    let k = KERNEL_L4.load(Ordering::Relaxed);
    let mut n = 0;
    for (c, l) in LOADED.iter().enumerate().take(online()) {
        if l.compare_exchange(dead, k, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
            && c != cpu_id()
        {
            n += 1;
        }
    }
    STATS.lazy_detached.fetch_add(n, Ordering::Relaxed);
    n
}

/// Other CPUs that have `l4` loaded (a bit per CPU index).
pub fn others_with(l4: u64) -> u64 {
    let me = cpu_id();
    (0..online())
        .filter(|&c| c != me && loaded(c) == l4)
        .fold(0, |m, c| m | 1 << c)
}

/// Serves this CPU's mailbox: a full (non-global) flush, or a switch to the kernel root
/// if the dying root posted is loaded here. Cheap when empty; called in every spin loop.
pub fn poll() {
    let me = cpu_id();
    let req = REQ[me].load(Ordering::Acquire);
    if req == DONE[me].load(Ordering::Relaxed) {
        return;
    }
    let dead = DROP[me].swap(0, Ordering::AcqRel);
    if dead != 0 && loaded(me) == dead {
        let k = KERNEL_L4.load(Ordering::Relaxed);
        arch::write_cr3(k);
        LOADED[me].store(k, Ordering::Release);
    } else {
        arch::write_cr3(arch::read_cr3());
    }
    STATS.served.fetch_add(1, Ordering::Relaxed);
    DONE[me].store(req, Ordering::Release);
}

/// `break=no_shootdown`: flush shootdowns are skipped (root drops still happen).
pub static NO_SHOOTDOWN: AtomicBool = AtomicBool::new(false);

/// Native shootdown: every other CPU that has `l4` loaded flushes its TLB (with `drop`:
/// switches to the kernel root instead) before this returns. The caller holds the
/// process-table lock. Returns the number of CPUs interrupted.
pub fn shootdown(l4: u64, drop: bool) -> u64 {
    let targets = others_with(l4);
    if targets == 0 || (!drop && NO_SHOOTDOWN.load(Ordering::Relaxed)) {
        return 0;
    }
    let mut seq = [0u64; MAX_CPUS];
    let mut n = 0;
    for c in (0..online()).filter(|&c| targets & (1 << c) != 0) {
        if drop {
            DROP[c].store(l4, Ordering::Release);
        }
        seq[c] = REQ[c].fetch_add(1, Ordering::AcqRel) + 1;
        apic::send_ipi(APIC_IDS[c].load(Ordering::Relaxed), IPI_VECTOR);
        n += 1;
    }
    for c in (0..online()).filter(|&c| targets & (1 << c) != 0) {
        while DONE[c].load(Ordering::Acquire) < seq[c] {
            poll();
            core::hint::spin_loop();
        }
    }
    STATS.flush_ipis.fetch_add(n, Ordering::Relaxed);
    STATS.shootdowns.fetch_add(1, Ordering::Relaxed);
    if drop {
        STATS.lazy_detached.fetch_add(n, Ordering::Relaxed);
    }
    n
}

/// Wakes CPU `cpu` from its idle `hlt` (nothing if it is this CPU or not online).
pub fn wake(cpu: usize) {
    if cpu == cpu_id() || cpu >= online() {
        return;
    }
    STATS.wake_ipis.fetch_add(1, Ordering::Relaxed);
    apic::send_ipi(APIC_IDS[cpu].load(Ordering::Relaxed), IPI_VECTOR);
}
