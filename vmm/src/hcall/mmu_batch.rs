//! Connects the shadow page-table engine to the MMU_BATCH hypercall: copies the entry
//! array out of guest memory once, applies entries strictly in order, stops at the first
//! error, and turns the engine's batch outcome into CR3-load / flush effects.

use super::contract::{CallCtx, Effects, MmuPhases, OpHandler, PoolZap, RamZap, ResyncFn};
use crate::guest_ram::GuestRam;
use crate::layout::Layout;
use crate::ptwrite::Alias;
use hypercall::{batch_bytes, batch_entries, features, HcError, MmuOp, Request, Response};
use serde_json::{json, Map, Value};
use shadow::{AvoidReason, FlushReason, OpKind, Rule, ShadowMmu, TrapCounters, VcpuSet, WriteMode};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Debug and checking switches of the MMU handler (`pvmm run` flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmuOptions {
    /// Run the engine's invariant checker after every batch (`--check-shadow`).
    pub check_shadow: bool,
    /// Test-only: write hypercall responses without the page-table guard, re-opening the
    /// hole where a batch that types its own request block gets unvalidated words into a
    /// page table (`--debug-unguarded-response`; the e2e suite expects `--check-shadow` to
    /// catch it).
    pub unguarded_response: bool,
    /// Test-only switches of the page-table write trap (`--debug-pt-trap-*`).
    pub trap_debug: shadow::TrapDebug,
    /// Test-only: a batch's remote flushes are not delivered (no kick; the target takes
    /// them only with its own next batch), root switches still are
    /// (`--debug-drop-remote-flushes`; the SVM bed expects the SMP TLB selftests to fail).
    pub drop_remote_flushes: bool,
    /// Test-only: the kernel flush counts the targets as flushed without zapping the
    /// frames (`--debug-kernel-flush-no-zap`; the SVM bed expects the SMP TLB selftests
    /// to fail).
    pub kernel_flush_no_zap: bool,
    /// Test only: leaf zaps are taken from the engine but not made
    /// (`--debug-leaf-zap-skip`; the e2e suite expects the selftests to fail).
    pub leaf_zap_skip: bool,
}

/// The MMU_BATCH handler of one VM.
pub struct MmuBatch {
    engine: Mutex<ShadowMmu>,
    options: MmuOptions,
    /// The read-only RAM alias when the page-table write modes are offered.
    alias: Option<Alias>,
    /// Remote flushes go through the host kernel (docs/pv-abi.md §6.5).
    kernel_flush: Option<Box<dyn PoolZap>>,
    /// A zap failed once (e.g. the host's mapping limit): kicks from then on.
    kernel_flush_failed: AtomicBool,
    /// Changed leaves are zapped instead of resynced (docs/pv-abi.md §6.6).
    leaf_zap: Option<Box<dyn RamZap>>,
    /// What the leaf zaps did, for the report.
    leaf_zap_counts: LeafZapCounts,
}

/// The leaf zaps' counters (docs/stats-json.md, `mmu.leaf_zap`).
#[derive(Default)]
struct LeafZapCounts {
    /// Batches that zapped.
    zaps: AtomicU64,
    /// Frames zapped.
    frames: AtomicU64,
    /// `pkey_mprotect` calls made.
    calls: AtomicU64,
    /// Zaps that failed (their chunks were resynced instead).
    failed: AtomicU64,
}

/// The largest entry array a batch may have, bytes.
const MAX_BATCH_BYTES: usize = hypercall::MAX_BATCH_ENTRIES as usize * hypercall::ENTRY_LEN;

thread_local! {
    /// Per-vCPU-thread copy buffer for entry arrays (no allocation per call).
    static ENTRY_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Builds the MMU_BATCH handler for a VM; `None` (ENOSYS) if the layout is refused.
pub fn factory(ram: &GuestRam, layout: &Layout, vcpus: usize) -> Option<Box<dyn OpHandler>> {
    factory_with(ram, layout, vcpus, MmuOptions::default())
}

/// As [`factory`], with debug and checking switches.
pub fn factory_with(
    _ram: &GuestRam,
    layout: &Layout,
    vcpus: usize,
    options: MmuOptions,
) -> Option<Box<dyn OpHandler>> {
    let l = shadow::Layout {
        ram: layout.usable().collect(),
        reserved: layout.reserved().collect(),
        pool_base: layout.pool_base,
        pool_frames: layout.pool_size / 4096,
    };
    match ShadowMmu::new(l, vcpus) {
        Ok(engine) => Some(Box::new(MmuBatch {
            engine: Mutex::new(engine),
            options,
            alias: None,
            kernel_flush: None,
            kernel_flush_failed: AtomicBool::new(false),
            leaf_zap: None,
            leaf_zap_counts: LeafZapCounts::default(),
        })),
        Err(e) => {
            log::warn!("shadow MMU disabled: {e}");
            None
        }
    }
}

/// Applies `count` entries from `buf` in order; returns how many were done and the first
/// failure (its index and error). Time spent in ZERO_FRAME, COPY_FRAME, table and A/D
/// entries is added to their own phases (`zero_frame`, `copy_frame`, `table_ops`,
/// `ad_ops`); PT_UPDATE and the flushes are not timed one by one.
fn apply_entries(
    engine: &mut ShadowMmu,
    ctx: &CallCtx<'_>,
    buf: &[u8],
    count: u32,
    phases: &mut MmuPhases,
) -> (u32, Option<(u32, HcError)>) {
    let mem = ctx.ram.memory();
    let mut engine = engine.batch(mem);
    let mut done = 0u32;
    for (i, entry) in batch_entries(buf, count).enumerate() {
        let r = entry.and_then(|op| {
            let Some(phase) = own_phase(phases, &op) else {
                let update = u64::from(matches!(op, MmuOp::PtUpdate { .. }));
                engine.apply(ctx.vcpu, &op)?;
                phases.pt_updates += update;
                return Ok(());
            };
            let t = Instant::now();
            let r = engine.apply(ctx.vcpu, &op);
            *phase += elapsed_ns(t);
            r
        });
        if let Err(e) = r {
            return (done, Some((i as u32, e)));
        }
        done += 1;
    }
    (done, None)
}

/// The phase an entry's time goes to when it is timed on its own: frame copies and zeroing,
/// whole-table and A/D operations. None for PT_UPDATE and the flushes (part of `apply`).
fn own_phase<'a>(phases: &'a mut MmuPhases, op: &MmuOp) -> Option<&'a mut u64> {
    match op {
        MmuOp::ZeroFrame { .. } => Some(&mut phases.zero_frame),
        MmuOp::CopyFrame { .. } => Some(&mut phases.copy_frame),
        MmuOp::Pin { .. }
        | MmuOp::Unpin { .. }
        | MmuOp::NewBaseptr { .. }
        | MmuOp::SetKernelRoot { .. }
        | MmuOp::RelocateTable { .. } => Some(&mut phases.table_ops),
        MmuOp::SyncAd { .. } | MmuOp::QueryAd { .. } => Some(&mut phases.ad_ops),
        MmuOp::PtUpdate { .. } | MmuOp::Invlpg { .. } | MmuOp::FlushTlb { .. } => None,
    }
}

/// Nanoseconds since `t`.
fn elapsed_ns(t: Instant) -> u64 {
    t.elapsed().as_nanos() as u64
}

impl MmuBatch {
    fn run(&self, ctx: &mut CallCtx<'_>, entries_gpa: u64, count: u32) -> Response {
        let len = match batch_bytes(count) {
            Ok(l) => l,
            Err(e) => return Response::err(e),
        };
        ENTRY_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            // The first batch (the boot's) sizes the buffer for the largest batch at once:
            // no later batch pays for growing it (its page faults cost tens of µs here), and
            // there is no zeroing per call.
            if buf.len() < len {
                buf.resize(len.max(MAX_BATCH_BYTES), 0);
            }
            let Some(buf) = buf.get_mut(..len) else {
                return Response::err(HcError::Einval);
            };
            // One copy out of guest memory; entries are decoded from this copy only.
            if let Err(e) = ctx.ram.read(entries_gpa, buf) {
                return Response::err(e);
            }
            ctx.entries = Some(u64::from(count));
            let mut phases = MmuPhases {
                copy_in: ctx.lap_ns(),
                ..MmuPhases::default()
            };
            let Ok(mut engine) = self.engine.lock() else {
                return Response::err(HcError::Ebusy);
            };
            // wrpt: any MMU hypercall re-validates and re-hooks the unhooked L1s first.
            engine.rehook_all(ctx.ram.memory(), ctx.vcpu);
            let (done, failure) = apply_entries(&mut engine, ctx, buf, count, &mut phases);
            let timed = phases.zero_frame + phases.copy_frame + phases.table_ops + phases.ad_ops;
            phases.apply = ctx.lap_ns().saturating_sub(timed);
            phases.host_zap = self.finish_batch(&mut engine, ctx);
            phases.end_batch = ctx.lap_ns().saturating_sub(phases.host_zap);
            ctx.phases = Some(phases);
            let (status, fail_index) = failure.map_or((0, u32::MAX), |(i, e)| (e.status(), i));
            Response {
                status,
                value: u64::from(done),
                done,
                fail_index,
            }
        })
    }

    /// Turns the batch outcome into effects (CR3 load, flush, host resync) and, with
    /// `--check-shadow`, checks the engine's invariants. Returns the time the leaf zap took
    /// (the MMU_BATCH phase `host_zap`), ns.
    fn finish_batch(&self, engine: &mut ShadowMmu, ctx: &mut CallCtx<'_>) -> u64 {
        let out = engine.end_batch(ctx.vcpu);
        ctx.effects.new_cr3 = out.new_cr3;
        // A software-shadowing KVM caches translations from the pool's tables and cannot see
        // the VMM's writes to them: a changed entry it may have cached (one with A=1) or a
        // reused pool frame makes that frame's chunk stale, and KVM must drop what it
        // cached from the stale chunks (the vCPU loop re-registers their memslots with the
        // world stopped, or, where the probe found that unnecessary, only marks them clean
        // once every flush is delivered). A guest flush alone changes no pool entry and
        // needs none. Frames become clean in `host_resync`, after that.
        ctx.effects.host_resync = engine.host_resync_needed();
        ctx.effects.flush = out.flush.is_some();
        ctx.effects.remote = if self.options.drop_remote_flushes {
            // The debug switch: no delivery (no kick) for a remote flush; a root switch is
            // still delivered (a CR3 left on a freed shadow would only crash the guest).
            let keep = out.remote.iter().filter(|&w| engine.root_switch_pending(w));
            keep.fold(VcpuSet::EMPTY, |s, w| s | VcpuSet::one(w))
        } else {
            out.remote
        };
        ctx.effects.remote_avoided = out.remote_avoided;
        self.kernel_flush(engine, ctx, out.flush_frameless);
        let zap_ns = self.leaf_zap(engine, ctx);
        if self.options.check_shadow {
            if let Err(v) = engine.check_invariants(ctx.ram.memory()) {
                log::error!("shadow invariant violated: {v}");
                ctx.effects.violation = Some(v.to_string());
            }
        }
        zap_ns
    }
}

impl MmuBatch {
    /// Flushes the targets of `ctx.effects.remote` that a zap of the stale pool frames
    /// can flush, still under the engine lock of the batch that marked the frames (so no
    /// other batch can count the targets flushed before they are): the host then flushes
    /// every vCPU's TLB itself, with no exit to this process. What is left in `remote`
    /// (root switches, guest-requested flushes, or all of them if the zap fails) is
    /// delivered as before. The zap flushes the caller too (before its next entry): it
    /// stands in for the caller's own flush unless that one names no frame
    /// (`own_frameless`).
    fn kernel_flush(&self, engine: &mut ShadowMmu, ctx: &mut CallCtx<'_>, own_frameless: bool) {
        let Some(zap) = &self.kernel_flush else {
            return;
        };
        if self.kernel_flush_failed.load(Ordering::Relaxed) {
            return;
        }
        let flushed = engine.kernel_flushable(ctx.effects.remote);
        if flushed.is_empty() {
            return;
        }
        let frames = engine.stale_chunks();
        let t = Instant::now();
        if !self.options.kernel_flush_no_zap {
            if let Err(e) = zap.zap(ctx.vcpu, &frames) {
                log::warn!("kernel flush failed, kicking from now on: {e}");
                self.kernel_flush_failed.store(true, Ordering::Relaxed);
                return;
            }
            ctx.effects.flush &= own_frameless;
        }
        engine.kernel_flushed(flushed, &frames);
        ctx.effects.kernel_flush_ns = elapsed_ns(t);
        ctx.effects.kernel_flushed = flushed.len();
        ctx.effects.remote = VcpuSet(ctx.effects.remote.0 & !flushed.0);
        ctx.effects.host_resync = engine.host_resync_needed();
    }

    /// Zaps the old target frames of the batch's changed leaves (docs/pv-abi.md §6.6),
    /// still under the engine lock and before the batch returns: the host drops every
    /// translation to them, on every vCPU, so their pool chunks need no resync. If the zap
    /// fails, those chunks become stale and are resynced as before. Returns the time it
    /// took, ns (0 without a zap).
    fn leaf_zap(&self, engine: &mut ShadowMmu, ctx: &mut CallCtx<'_>) -> u64 {
        let list = engine.take_leaf_zaps();
        if list.is_empty() {
            return 0;
        }
        let t = Instant::now();
        let c = &self.leaf_zap_counts;
        let made = match (&self.leaf_zap, self.options.leaf_zap_skip) {
            (_, true) => Ok(0),
            (Some(zap), false) => zap.zap(&list.frames),
            (None, false) => Err(std::io::Error::other("no leaf zap")),
        };
        match made {
            Ok(calls) => {
                c.calls.fetch_add(u64::from(calls), Ordering::Relaxed);
            }
            Err(e) => {
                if c.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                    log::warn!("leaf zap failed, resyncing those chunks: {e}");
                }
                engine.leaf_zaps_failed(&list);
                ctx.effects.host_resync = engine.host_resync_needed();
                return elapsed_ns(t);
            }
        }
        c.zaps.fetch_add(1, Ordering::Relaxed);
        c.frames
            .fetch_add(list.frames.len() as u64, Ordering::Relaxed);
        let ns = elapsed_ns(t);
        // The zap flushed every vCPU that could hold a translation to those frames: remote
        // targets whose flush stems only from such leaves need no delivery.
        let flushed = engine.leaf_zap_flushable(ctx.effects.remote);
        if !flushed.is_empty() {
            engine.leaf_zap_flushed(flushed);
            ctx.effects.remote = VcpuSet(ctx.effects.remote.0 & !flushed.0);
            ctx.effects.kernel_flushed += flushed.len();
            ctx.effects.kernel_flush_ns += ns;
        }
        ns
    }

    /// `PT_WRITES(mode)`: ENOSYS without the trap, else the engine's answer.
    fn pt_writes(&self, mode: u64) -> Response {
        let Some(alias) = self.alias else {
            return Response::err(HcError::Enosys);
        };
        let mode = match mode {
            hypercall::pt_writes::EMULATE => WriteMode::Emulate,
            hypercall::pt_writes::WRPT => WriteMode::Wrpt,
            _ => WriteMode::Hypercall,
        };
        let Ok(mut engine) = self.engine.lock() else {
            return Response::err(HcError::Ebusy);
        };
        match engine.set_write_mode(mode, alias.base) {
            Ok(()) => Response::ok(0),
            Err(e) => Response::err(e),
        }
    }

    /// `PT_FAULT(va)`: a spurious fault; re-hooks every unhooked L1.
    fn pt_fault(&self, ctx: &mut CallCtx<'_>, va: u64) -> Response {
        if self.alias.is_none() {
            return Response::err(HcError::Enosys);
        }
        let Ok(mut engine) = self.engine.lock() else {
            return Response::err(HcError::Ebusy);
        };
        engine.spurious_fault(ctx.ram.memory(), ctx.vcpu, va);
        self.finish_batch(&mut engine, ctx);
        Response::ok(0)
    }
}

/// The trap counters for the report.
impl MmuBatch {
    /// The leaf zaps' counters (all 0 where leaf zaps are off).
    fn leaf_zap_report(&self) -> Value {
        let c = &self.leaf_zap_counts;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "enabled": self.leaf_zap.is_some(),
            "zaps": n(&c.zaps),
            "frames": n(&c.frames),
            "calls": n(&c.calls),
            "failed": n(&c.failed),
        })
    }
}

fn trap_report(e: &ShadowMmu) -> Value {
    let t = e.trap_counters();
    let hist: Map<String, Value> = TrapCounters::HIST_LABELS
        .iter()
        .zip(t.revalidated_hist)
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "mode": e.write_mode().name(),
        "trapped_writes": t.trapped_writes,
        "emulated_writes": t.emulated_writes,
        "refused_writes": t.refused_writes,
        "passthrough_writes": t.passthrough_writes,
        "unhooks": t.unhooks,
        "rehooks": t.rehooks,
        "revalidated_entries": t.revalidated_entries,
        "revalidated_max": t.revalidated_max,
        "revalidated_per_rehook": hist,
        "lru_evictions": t.lru_evictions,
        "spurious_faults": t.spurious_faults,
    })
}

fn op_kind_name(k: OpKind) -> &'static str {
    match k {
        OpKind::PtUpdate => "pt_update",
        OpKind::Pin => "pin",
        OpKind::Unpin => "unpin",
        OpKind::NewBaseptr => "new_baseptr",
        OpKind::Invlpg => "invlpg",
        OpKind::FlushTlb => "flush_tlb",
        OpKind::SyncAd => "sync_ad",
        OpKind::QueryAd => "query_ad",
        OpKind::RelocateTable => "relocate_table",
        OpKind::ZeroFrame => "zero_frame",
        OpKind::SetKernelRoot => "set_kernel_root",
        OpKind::CopyFrame => "copy_frame",
    }
}

fn named<T: Copy>(all: &[T], counts: &[u64], name: impl Fn(T) -> &'static str) -> Value {
    let mut m = Map::new();
    for (k, n) in all.iter().zip(counts) {
        if *n > 0 {
            m.insert(name(*k).to_string(), json!(n));
        }
    }
    Value::Object(m)
}

impl OpHandler for MmuBatch {
    fn features(&self) -> u32 {
        let trap = if self.alias.is_some() {
            features::PT_TRAP
        } else {
            0
        };
        features::MMU_BATCH
            | features::AD_SYNC
            | features::RELOCATE
            | features::ZERO_FRAMES
            | features::COPY_FRAMES
            | features::SMP_TLB
            | trap
    }

    fn take_delivery(&self, vcpu: usize) -> Effects {
        let Ok(mut e) = self.engine.lock() else {
            return Effects::default();
        };
        let d = e.take_delivery(vcpu);
        Effects {
            flush: d.flush.is_some() && !self.options.drop_remote_flushes,
            new_cr3: d.new_cr3,
            ..Effects::default()
        }
    }

    fn host_resync(&self, resync: &mut ResyncFn<'_>) -> bool {
        let Ok(mut e) = self.engine.lock() else {
            return false;
        };
        let stale = e.stale_chunks();
        if stale.is_empty() {
            // A resync after this batch ended covered its chunks.
            return false;
        }
        let Some(clean) = resync(&stale) else {
            return false;
        };
        // Not clean while a vCPU may still run on a freed root (see the engine).
        e.host_resynced_chunks(&clean) && clean.len() >= e.resync_chunk_count()
    }

    fn set_resync_granule(&mut self, frames: u32) {
        if let Ok(e) = self.engine.get_mut() {
            e.set_resync_granule(frames);
        }
    }

    fn enable_kernel_flush(&mut self, zap: Box<dyn PoolZap>) {
        if let Ok(e) = self.engine.get_mut() {
            e.enable_kernel_flush();
            self.kernel_flush = Some(zap);
        }
    }

    fn enable_leaf_zap(&mut self, zap: Box<dyn RamZap>) {
        if let Ok(e) = self.engine.get_mut() {
            e.enable_leaf_zap();
            self.leaf_zap = Some(zap);
        }
    }

    fn handle(&self, ctx: &mut CallCtx<'_>, req: &Request) -> Response {
        match *req {
            Request::MmuBatch { entries_gpa, count } => self.run(ctx, entries_gpa, count),
            Request::PtWrites { mode } => self.pt_writes(mode),
            Request::PtFault { va } => self.pt_fault(ctx, va),
            _ => Response::err(HcError::Einval),
        }
    }

    fn enable_pt_trap(&mut self, alias: Alias) {
        self.alias = Some(alias);
        if let Ok(mut e) = self.engine.lock() {
            e.set_trap_debug(self.options.trap_debug);
        }
    }

    fn trapped_write(
        &self,
        ram: &GuestRam,
        vcpu: usize,
        addr: u64,
        data: &[u8],
    ) -> Option<crate::hcall::Effects> {
        let store = self.alias?.decode(addr, data)?;
        let mut ctx = CallCtx {
            vcpu,
            ram,
            effects: crate::hcall::Effects::default(),
            entries: None,
            phases: None,
            lap: Instant::now(),
        };
        let Ok(mut engine) = self.engine.lock() else {
            // A poisoned engine: the store is dropped (the guest sees its old entry).
            return Some(ctx.effects);
        };
        let r = engine.trapped_write(ram.memory(), vcpu, store.gpa, store.data);
        log::trace!("vCPU {vcpu}: trapped store at {:#x}: {r:?}", store.gpa);
        self.finish_batch(&mut engine, &mut ctx);
        Some(ctx.effects)
    }

    fn write_guarded(&self, ram: &GuestRam, gpa: u64, bytes: &[u8]) -> Result<(), HcError> {
        if self.options.unguarded_response {
            return ram.write(gpa, bytes);
        }
        // Checked and written under the engine lock: no batch can type the frame between.
        let engine = self.engine.lock().map_err(|_| HcError::Ebusy)?;
        if engine.range_has_table(gpa, bytes.len() as u64) {
            return Err(HcError::Eperm);
        }
        ram.write(gpa, bytes)
    }

    fn owns_frame(&self, gpa: u64) -> bool {
        self.engine
            .lock()
            .map_or(true, |e| e.frame_type(gpa).is_some())
    }

    fn report(&self) -> Option<Value> {
        let e = self.engine.lock().ok()?;
        let c = e.counters();
        Some(json!({
            "pte_updates": c.updates,
            "pins": c.pins,
            "unpins": c.unpins,
            "relocations": c.relocations,
            "zeroed_frames": c.zeroed_frames,
            "copied_frames": c.copied_frames,
            "ops": named(&OpKind::ALL, &c.ops, op_kind_name),
            "rejects": named(Rule::ALL, &c.rejects, Rule::name),
            "shadow_tables_live": c.shadow_tables_live,
            "shadow_tables_high_water": c.shadow_tables_high_water,
            "split_tables_live": c.split_tables_live,
            "pool_frames_high_water": c.pool_frames_high_water,
            "pool_frames_used": c.pool_frames_used,
            "pool_frames_total": c.pool_frames_total,
            "flushes_performed": named(FlushReason::ALL, &c.flushes, FlushReason::name),
            "flushes_avoided": named(AvoidReason::ALL, &c.flushes_avoided, AvoidReason::name),
            "ad_syncs": c.ad_syncs,
            "a_bits_propagated": c.a_bits_propagated,
            "d_bits_propagated": c.d_bits_propagated,
            "ad_queries": c.queries,
            "kernel_roots_set": c.kernel_roots_set,
            "detach_unpins": c.detach_unpins,
            "detached_vcpus": c.detached_vcpus,
            "detached_lazily": c.detached_lazily,
            "lazy_switches_forced": c.lazy_switches_forced,
            "pool_reclaims": c.reclaims,
            "reclaimed_tables": c.reclaimed_tables,
            "pt_trap": trap_report(&e),
            "leaf_zap": self.leaf_zap_report(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hcall::Dispatcher;
    use hypercall::{op, MmuEntry, RequestHeader, RESPONSE_OFFSET};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const REQ: u64 = 0x1000;
    const ENTRIES: u64 = 0x2000;

    fn vm() -> (Dispatcher, GuestRam) {
        vm_with(MmuOptions::default())
    }

    fn vm_with(options: MmuOptions) -> (Dispatcher, GuestRam) {
        let layout = Layout::new(16 << 20, 1 << 20).unwrap();
        let mut r: Vec<(GuestAddress, usize)> = layout
            .ram_regions
            .iter()
            .map(|&(s, l)| (GuestAddress(s), l as usize))
            .collect();
        r.push((GuestAddress(layout.pool_base), layout.pool_size as usize));
        let mem = GuestMemoryMmap::from_ranges(&r).unwrap();
        let ram = GuestRam::new(mem, layout.usable().collect());
        let d = Dispatcher::new(ram.clone(), 1, factory_with(&ram, &layout, 1, options));
        ram.write(
            REQ,
            &RequestHeader::new(op::VERSION, [1, 0, 0, 0]).to_bytes(),
        )
        .unwrap();
        assert_eq!(d.handle(0, REQ).status, 0);
        (d, ram)
    }

    /// Writes `entries` and an MMU_BATCH request for them; the dispatcher's outcome.
    fn send(d: &Dispatcher, ram: &GuestRam, entries: &[MmuEntry]) -> crate::hcall::Outcome {
        for (i, e) in entries.iter().enumerate() {
            ram.write(ENTRIES + 32 * i as u64, &e.to_bytes()).unwrap();
        }
        let header = RequestHeader::new(op::MMU_BATCH, [ENTRIES, entries.len() as u64, 0, 0]);
        ram.write(REQ, &header.to_bytes()).unwrap();
        d.handle(0, REQ)
    }

    fn batch(
        d: &Dispatcher,
        ram: &GuestRam,
        entries: &[MmuEntry],
    ) -> (i64, u32, u32, crate::hcall::Effects) {
        let o = send(d, ram, entries);
        let mut r = [0u8; 24];
        ram.read(REQ + RESPONSE_OFFSET as u64, &mut r).unwrap();
        let status = i64::from_le_bytes(r[0..8].try_into().unwrap());
        assert_eq!(status, o.status);
        (
            status,
            u32::from_le_bytes(r[16..20].try_into().unwrap()),
            u32::from_le_bytes(r[20..24].try_into().unwrap()),
            o.effects,
        )
    }

    #[test]
    fn batch_runs_in_order_and_stops_at_first_error() {
        let (d, ram) = vm();
        assert_ne!(d.features() & features::MMU_BATCH, 0);
        // Frames at 1 MiB.. are zero: a valid L1, L2, L3, L4 chain can be pinned bottom-up.
        let (l1, l2, l3, l4, data) = (
            0x20_0000u64,
            0x20_1000u64,
            0x20_2000u64,
            0x20_3000u64,
            0x30_0000u64,
        );
        let (s, done, fail, _) = batch(
            &d,
            &ram,
            &[
                MmuEntry::pin(1, l1),
                MmuEntry::pin(2, l2),
                MmuEntry::pt_update(l2, l1 | 7),
                MmuEntry::pin(3, l3),
                MmuEntry::pt_update(l3, l2 | 7),
                MmuEntry::pin(4, l4),
                MmuEntry::pt_update(l4, l3 | 7),
                MmuEntry::pt_update(l1 + 8, data | 7),
                MmuEntry::pt_update(l1 + 16, (layout_pool()) | 7), // maps the pool: refused
                MmuEntry::pt_update(l1 + 24, data | 7),
            ],
        );
        assert_eq!((done, fail), (8, 8), "status {s}");
        assert_eq!(s, HcError::Eperm.status());
        let (s, done, _, fx) = batch(&d, &ram, &[MmuEntry::new_baseptr(l4)]);
        assert_eq!((s, done), (0, 1));
        assert!(fx.new_cr3.is_some_and(|c| c >= layout_pool()), "{fx:?}");
        // Entry array outside RAM: EFAULT; truncated by RAM's end: EFAULT.
        ram.write(
            REQ,
            &RequestHeader::new(op::MMU_BATCH, [16 << 20, 1, 0, 0]).to_bytes(),
        )
        .unwrap();
        assert_eq!(d.handle(0, REQ).status, HcError::Efault.status());
        ram.write(
            REQ,
            &RequestHeader::new(op::MMU_BATCH, [(16 << 20) - 32, 2, 0, 0]).to_bytes(),
        )
        .unwrap();
        assert_eq!(d.handle(0, REQ).status, HcError::Efault.status());
        // Unknown entry kind: ENOSYS at its index.
        let (s, done, fail, _) = batch(
            &d,
            &ram,
            &[
                MmuEntry::flush_tlb(),
                MmuEntry {
                    kind: 99,
                    ..Default::default()
                },
            ],
        );
        assert_eq!((s, done, fail), (HcError::Enosys.status(), 1, 1));
        let rep = d.mmu_report().unwrap();
        assert_eq!(rep["pins"], 4);
        assert!(
            rep["rejects"].as_object().unwrap().values().any(|v| v == 1),
            "{rep}"
        );
    }

    #[test]
    fn request_block_in_a_page_table_is_refused() {
        let (d, ram) = vm();
        let l1 = 0x20_0000u64;
        let (s, ..) = batch(&d, &ram, &[MmuEntry::pin(1, l1)]);
        assert_eq!(s, 0);
        // A block inside the pinned table: the response must not be written there.
        let o = d.handle(0, l1 + 64);
        assert_eq!(o.status, HcError::Eperm.status());
        let mut after = [0u8; 64];
        ram.read(l1 + 64, &mut after).unwrap();
        assert_eq!(after, [0u8; 64], "page table untouched");
        assert_eq!(
            d.last_status()[0].load(std::sync::atomic::Ordering::Relaxed),
            HcError::Eperm.status()
        );
    }

    /// A batch that pins its own request block's frame: the response must not land in the
    /// new page table (an unvalidated word in a typed table), and the engine's invariants
    /// must hold afterwards. With the guard switched off, `--check-shadow` catches it.
    fn pin_own_block(options: MmuOptions) -> (Option<String>, [u8; 24]) {
        let (d, ram) = vm_with(options);
        ram.write(ENTRIES, &MmuEntry::pin(1, REQ).to_bytes())
            .unwrap();
        ram.write(
            REQ,
            &RequestHeader::new(op::MMU_BATCH, [ENTRIES, 1, 0, 0]).to_bytes(),
        )
        .unwrap();
        // The block's response area starts zeroed, so the frame is a valid (empty) L1.
        ram.write(REQ + RESPONSE_OFFSET as u64, &[0u8; 24]).unwrap();
        let o = d.handle(0, REQ);
        assert_eq!(o.status, 0, "the pin itself is valid");
        assert_eq!(
            d.last_status()[0].load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        let mut resp = [0u8; 24];
        ram.read(REQ + RESPONSE_OFFSET as u64, &mut resp).unwrap();
        // A second batch, from a block elsewhere, runs the checker.
        let other = 0x4000;
        ram.write(ENTRIES, &MmuEntry::flush_tlb().to_bytes())
            .unwrap();
        ram.write(
            other,
            &RequestHeader::new(op::MMU_BATCH, [ENTRIES, 1, 0, 0]).to_bytes(),
        )
        .unwrap();
        (d.handle(0, other).effects.violation, resp)
    }

    #[test]
    fn a_batch_that_types_its_own_block_gets_no_response_written_there() {
        let check = MmuOptions {
            check_shadow: true,
            ..MmuOptions::default()
        };
        let (violation, resp) = pin_own_block(check);
        assert_eq!(resp, [0u8; 24], "page table untouched by the response");
        assert_eq!(violation, None);
        let (violation, resp) = pin_own_block(MmuOptions {
            unguarded_response: true,
            ..check
        });
        assert_ne!(
            resp, [0u8; 24],
            "without the guard the response lands in the table"
        );
        assert!(violation.is_some(), "and --check-shadow catches it");
    }

    /// Runs `entries` as one batch; the batch's phases.
    fn phases_of(d: &Dispatcher, ram: &GuestRam, entries: &[MmuEntry]) -> MmuPhases {
        send(d, ram, entries)
            .phases
            .expect("an MMU_BATCH has phases")
    }

    #[test]
    fn table_and_frame_ops_are_timed_apart_and_only_applied_updates_counted() {
        let (d, ram) = vm();
        let (l1, data) = (0x20_0000u64, 0x30_0000u64);
        let p = phases_of(
            &d,
            &ram,
            &[
                MmuEntry::pin(1, l1),
                MmuEntry::zero_frame(data),
                MmuEntry::pt_update(l1, data | 7),
                MmuEntry::flush_tlb(),
                MmuEntry::pt_update(l1 + 8, layout_pool() | 7), // refused: not counted
            ],
        );
        assert_eq!(p.pt_updates, 1);
        assert!(p.table_ops > 0 && p.zero_frame > 0, "{p:?}");
        assert_eq!((p.copy_frame, p.ad_ops, p.host_zap), (0, 0, 0), "{p:?}");
        let named = p.named();
        let sum = |keep: &dyn Fn(&str) -> bool| -> u64 {
            named.iter().filter(|(k, _)| keep(k)).map(|(_, v)| v).sum()
        };
        let non_update = |k: &str| crate::hcall::contract::NON_UPDATE_PHASES.contains(&k);
        assert_eq!(p.update_ns(), sum(&|k| !non_update(k)));
        assert!(sum(&non_update) >= p.table_ops + p.zero_frame);
        let p = phases_of(&d, &ram, &[MmuEntry::sync_ad(0x40_0000, 1, 0)]);
        assert!(p.ad_ops > 0 && p.table_ops == 0, "{p:?}");
        assert_eq!(p.pt_updates, 0);
    }

    fn layout_pool() -> u64 {
        Layout::new(16 << 20, 1 << 20).unwrap().pool_base
    }
}
