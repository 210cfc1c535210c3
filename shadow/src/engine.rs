//! The engine: the [`ShadowMmu`] state and the op dispatcher; one method per op.

use hypercall::{FlushTarget, HcError, MmuOp};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::counters::{Counters, OpKind};
use crate::flush::{AvoidReason, FlushReason, Pending};
use crate::frames::{FrameInfo, Frames};
use crate::layout::{Layout, ShadowError};
use crate::leaf_zap::LeafZaps;
use crate::mem::{table, Mem};
use crate::pool::{Owner, Pool};
use crate::pte::{self, Kind, A, AD, ADDR, D, G, RW};
use crate::rules::{self, Rule};
use crate::targets_memo::TargetsMemo;
use crate::trap_state::TrapState;
use crate::vcpuset::VcpuSet;

/// Internal result: refusals carry their rule.
pub(crate) type R<T> = Result<T, Rule>;

/// The address space a vCPU has loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedRoot {
    /// Guest-physical address of the guest's L4 table.
    pub guest_l4: u64,
    /// Guest-physical address of its shadow (what CR3 must hold), inside the pool.
    pub shadow_root: u64,
}

/// What the VMM must do at the end of a batch (or, from [`ShadowMmu::take_delivery`], on
/// a remote vCPU before it runs guest code again).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Flush this vCPU's TLB (non-global and global) for this reason.
    pub flush: Option<FlushReason>,
    /// Load CR3 with this shadow root GPA (a `NEW_BASEPTR` happened in the batch, or a
    /// `DETACH` switched the vCPU to its kernel root).
    pub new_cr3: Option<u64>,
    /// `end_batch` only: the other vCPUs this batch needs a flush or a root switch on.
    /// Each must take its delivery ([`ShadowMmu::take_delivery`]) and apply it before the
    /// hypercall returns to the caller.
    pub remote: VcpuSet,
    /// `end_batch` only: other vCPUs a flush-needing change of this batch did *not* target
    /// (a "flush every vCPU" policy would have interrupted them).
    pub remote_avoided: u32,
    /// Some reason merged into `flush` names no pool frame ([`FlushReason::frame_derived`]):
    /// a kernel flush of the stale frames does not stand in for it.
    pub flush_frameless: bool,
}

/// The shadow page-table engine of one VM.
pub struct ShadowMmu {
    pub(crate) layout: Layout,
    pub(crate) frames: Frames,
    pub(crate) pool: Pool,
    /// Loaded guest L4 frame number per vCPU.
    pub(crate) roots: Vec<Option<u64>>,
    /// Per vCPU: the L4 frames it may hold translations for since its last full flush (the
    /// loaded one included); see `targets`.
    pub(crate) held: Vec<Vec<u64>>,
    /// Per vCPU: its registered kernel-only root (`SET_KERNEL_ROOT`).
    pub(crate) kernel_root: Vec<Option<u64>>,
    /// vCPUs a flush was requested for in the current batch (merged ones included).
    batch_targets: VcpuSet,
    /// Whether a change of the current batch needed a flush somewhere.
    batch_flushed: bool,
    pub(crate) pending: Pending,
    new_cr3: Vec<Option<u64>>,
    /// Sequence number of the op being applied (shadows touched by it are not reclaimed).
    pub(crate) epoch: u64,
    pub(crate) counters: Counters,
    /// Trapped page-table writes (`trap`, `wrpt`).
    pub(crate) trap: TrapState,
    /// Bumped whenever `roots` or `held` change (see `targets`).
    pub(crate) roots_generation: u64,
    /// Recent flush-target answers (see `targets`).
    pub(crate) targets_memo: TargetsMemo,
    /// Whether common L1 leaf updates take the straight-line path (`fast`); only the
    /// differential tests turn it off (`set_fast_path`).
    pub(crate) fast_path: bool,
    /// `PT_UPDATE`s the straight-line path applied (tests check it ran).
    pub(crate) fast_hits: u64,
    /// Old targets of changed leaves, zapped by the VMM instead of a resync (`leaf_zap`).
    pub(crate) leaf_zaps: LeafZaps,
    /// More than one vCPU: while a batch runs, another vCPU's walk may set A/D in a shadow
    /// entry, so entries are replaced with a locked exchange (`Table::replace`).
    pub(crate) shared_walks: bool,
    /// Shadow roots a `DETACH` moved vCPUs off while they still run on them, until their
    /// root switches are delivered: freed, such a root keeps its kernel half and its frame
    /// is held from reuse (`free_shadow_table`), so those vCPUs can run kernel code until
    /// they switch.
    pub(crate) detached_shadows: Vec<u32>,
    /// Test only: a detached root's shadow is freed like any other (cleared, reusable).
    pub(crate) debug_clear_detached: bool,
    /// Per vCPU: the pool frame of the freed root it still runs on while its root switch
    /// is lazy (`lazy_switch`), else `None`.
    pub(crate) lazy_remnant: Vec<Option<u32>>,
    /// Whether a `DETACH` may leave root switches lazy (turned on with the kernel flush;
    /// not `pool.stale_on_drop`, which a debug switch turns off on its own).
    pub(crate) lazy_detach: bool,
    /// Test only: no change makes a lazy switch eager (the mechanism that keeps a remnant
    /// equal to its kernel root switched off, for the tests that must catch it).
    pub(crate) debug_lazy_unforced: bool,
}

impl ShadowMmu {
    /// An engine for `layout` and `vcpus` vCPUs (indexed `0..vcpus`).
    pub fn new(layout: Layout, vcpus: usize) -> Result<ShadowMmu, ShadowError> {
        if vcpus == 0 || vcpus > VcpuSet::MAX {
            return Err(ShadowError::NoVcpu);
        }
        let layout = layout.validated()?;
        let end = layout.ram_end_pfn();
        let pool = Pool::new(layout.pool_base, layout.pool_frames, end);
        Ok(ShadowMmu {
            frames: Frames::new(&layout),
            counters: Counters::new(pool.total()),
            pool,
            layout,
            roots: vec![None; vcpus],
            held: vec![Vec::new(); vcpus],
            kernel_root: vec![None; vcpus],
            batch_targets: VcpuSet::EMPTY,
            batch_flushed: false,
            pending: Pending::new(vcpus),
            new_cr3: vec![None; vcpus],
            epoch: 0,
            trap: TrapState::default(),
            roots_generation: 0,
            targets_memo: TargetsMemo::default(),
            fast_path: true,
            fast_hits: 0,
            leaf_zaps: LeafZaps::default(),
            shared_walks: vcpus > 1,
            detached_shadows: Vec::new(),
            debug_clear_detached: false,
            lazy_remnant: vec![None; vcpus],
            lazy_detach: false,
            debug_lazy_unforced: false,
        })
    }

    /// Applies one decoded entry for `vcpu`. Never panics; every refusal is counted by rule.
    /// A batch of entries is cheaper through [`ShadowMmu::batch`] (same effect).
    pub fn apply<M: GuestMemory>(
        &mut self,
        mem: &M,
        vcpu: usize,
        op: &MmuOp,
    ) -> Result<(), HcError> {
        self.apply_in(&Mem::new(mem), vcpu, op)
    }

    /// [`Self::apply`] through `mem`.
    pub(crate) fn apply_in<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        vcpu: usize,
        op: &MmuOp,
    ) -> Result<(), HcError> {
        self.epoch += 1;
        self.counters.count_op(OpKind::of(op));
        let r =
            rules::vcpu_valid(vcpu, self.roots.len()).and_then(|()| self.dispatch(mem, vcpu, op));
        self.update_pool_counters();
        r.map_err(|rule| {
            Counters::bump(&mut self.counters.rejects, Rule::ALL, rule);
            log::debug!("shadow: {op:?} refused: {}", rule.name());
            rule.error()
        })
    }

    #[inline]
    fn update_pool_counters(&mut self) {
        let c = &mut self.counters;
        c.pool_frames_used = self.pool.used();
        c.pool_frames_high_water = self.pool.high_water();
        c.shadow_tables_live = self.pool.tables();
        c.shadow_tables_high_water = self.pool.tables_high_water();
        c.split_tables_live = self.pool.used() - self.pool.tables();
    }

    fn dispatch<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, vcpu: usize, op: &MmuOp) -> R<()> {
        match *op {
            MmuOp::PtUpdate {
                ptr,
                val,
                preserve_ad,
            } => {
                if !self.pt_update_fast(mem, ptr, val, preserve_ad) {
                    self.pt_update(mem, ptr, val, preserve_ad)?;
                }
                self.counters.updates += 1;
            }
            MmuOp::Pin { level, frame } => {
                self.pin(mem, level, frame >> 12)?;
                self.counters.pins += 1;
            }
            MmuOp::Unpin { frame, detach } => {
                if detach {
                    self.detach(mem, frame >> 12)?;
                }
                if let Err(e) = self.unpin(mem, frame >> 12) {
                    if detach {
                        // The root was not freed: no vCPU may stay on it past this batch.
                        self.force_lazy_switches("the UNPIN of its DETACH failed");
                    }
                    return Err(e);
                }
                self.counters.unpins += 1;
            }
            MmuOp::NewBaseptr { frame } => self.new_baseptr(mem, vcpu, frame >> 12)?,
            MmuOp::SetKernelRoot { frame } => {
                self.set_kernel_root(mem, vcpu, frame.map(|f| f >> 12))?;
            }
            MmuOp::Invlpg { target, .. } => {
                self.guest_flush(vcpu, target, FlushReason::GuestInvlpg)?;
            }
            MmuOp::FlushTlb { target, .. } => {
                self.guest_flush(vcpu, target, FlushReason::GuestFlushTlb)?;
            }
            MmuOp::SyncAd {
                va,
                pages,
                clear_a,
                clear_d,
            } => {
                self.sync_ad(mem, vcpu, va, pages, clear_a, clear_d)?;
                self.counters.ad_syncs += 1;
            }
            MmuOp::QueryAd {
                va,
                pages,
                bitmap_gpa,
            } => {
                self.query_ad(mem, vcpu, va, pages, bitmap_gpa)?;
                self.counters.queries += 1;
            }
            MmuOp::RelocateTable { old, new } => {
                self.relocate(mem, old >> 12, new >> 12)?;
                self.counters.relocations += 1;
            }
            MmuOp::ZeroFrame { frame } => {
                self.zero_frame(mem, frame >> 12)?;
                self.counters.zeroed_frames += 1;
            }
            MmuOp::CopyFrame { dst, src } => {
                self.copy_frame(mem, dst >> 12, src >> 12)?;
                self.counters.copied_frames += 1;
            }
        }
        Ok(())
    }

    /// Ends a batch of `vcpu`: the flush it must perform, the CR3 it must load, and the
    /// other vCPUs ([`BatchOutcome::remote`]) that must take and apply their delivery
    /// ([`ShadowMmu::take_delivery`]) before the hypercall returns.
    pub fn end_batch(&mut self, vcpu: usize) -> BatchOutcome {
        let switched = (0..self.roots.len())
            .filter(|&v| self.eager_switch_pending(v))
            .fold(VcpuSet::EMPTY, |s, v| s | VcpuSet::one(v));
        let remote = (self.batch_targets | switched).without(vcpu);
        let others = self.roots.len().saturating_sub(1) as u32;
        let remote_avoided = if self.batch_flushed {
            others.saturating_sub(self.batch_targets.without(vcpu).len())
        } else {
            0
        };
        self.batch_targets = VcpuSet::EMPTY;
        self.batch_flushed = false;
        BatchOutcome {
            remote,
            remote_avoided,
            ..self.take_delivery(vcpu)
        }
    }

    /// What `vcpu` must do before it runs guest code again: its pending flush (counted as
    /// performed) and the CR3 load a `NEW_BASEPTR` or a `DETACH` switch left for it. The
    /// VMM calls it for the caller at the end of a batch (through `end_batch`) and, on its
    /// own thread, for every vCPU a batch names in [`BatchOutcome::remote`].
    pub fn take_delivery(&mut self, vcpu: usize) -> BatchOutcome {
        let out = BatchOutcome {
            flush_frameless: self.pending.frameless(vcpu),
            flush: self.take_flush(vcpu),
            new_cr3: self.new_cr3.get_mut(vcpu).and_then(Option::take),
            ..BatchOutcome::default()
        };
        if out.new_cr3.is_some() {
            if let Some(r) = self.lazy_remnant.get_mut(vcpu) {
                *r = None;
            }
            self.release_detached();
        }
        out
    }

    /// Takes the flush pending for `vcpu` (counted as performed): the VMM must flush
    /// `vcpu`'s TLB (global translations included) before it runs guest code again. After
    /// a batch of vCPU `v`, [`BatchOutcome::remote`] names the other vCPUs that must.
    pub fn take_flush(&mut self, vcpu: usize) -> Option<FlushReason> {
        let f = self.pending.take(vcpu);
        if let Some(r) = f {
            Counters::bump(&mut self.counters.flushes, FlushReason::ALL, r);
            self.flushed_fully(vcpu);
        }
        f
    }

    /// Turns on what the kernel flush needs: every flush that names a pool frame leaves
    /// that frame stale (a dropped shadow the CPU used included), one frame per chunk.
    /// The VMM then flushes other vCPUs by having the host zap its own mappings of the
    /// stale frames (a zap makes KVM flush every vCPU's TLB, and a translation made
    /// through a stale frame needed the host to map it). Call it before the first batch,
    /// where the pool needs no host resync.
    pub fn enable_kernel_flush(&mut self) {
        self.pool.set_granule(1);
        self.pool.stale_on_drop = true;
        self.lazy_detach = true;
    }

    /// The vCPUs of `remote` whose pending flush a kernel flush of the stale frames
    /// performs: each has a flush pending whose every reason names a pool frame
    /// ([`FlushReason::frame_derived`]), and no root switch waiting (that needs its own
    /// thread). Empty when no frame is stale.
    pub fn kernel_flushable(&self, remote: VcpuSet) -> VcpuSet {
        if !self.pool.resync_needed() {
            return VcpuSet::EMPTY;
        }
        self.zap_flushable(remote, |p, v| !p.frameless(v))
    }

    /// The vCPUs of `remote` with a flush pending that `covered` accepts and no root switch
    /// waiting (that needs its own thread): what a host zap can flush for them.
    pub(crate) fn zap_flushable(
        &self,
        remote: VcpuSet,
        covered: impl Fn(&Pending, usize) -> bool,
    ) -> VcpuSet {
        remote
            .iter()
            .filter(|&v| {
                self.pending.peek(v).is_some()
                    && covered(&self.pending, v)
                    && !self.eager_switch_pending(v)
            })
            .fold(VcpuSet::EMPTY, |s, v| s | VcpuSet::one(v))
    }

    /// The host zapped its mappings of every stale frame (`stale_chunks`, one frame each
    /// after [`ShadowMmu::enable_kernel_flush`]), flushing every vCPU: the pending flushes
    /// of `flushed` (from [`ShadowMmu::kernel_flushable`]) are performed and the frames
    /// are clean as after a host resync ([`ShadowMmu::host_resynced_chunks`]).
    pub fn kernel_flushed(&mut self, flushed: VcpuSet, frames: &[u32]) {
        for v in flushed.iter() {
            self.take_flush_by_zap(v);
        }
        self.host_resynced_chunks(frames);
    }

    /// Takes the pending flush of `vcpu` as performed by a host zap. Unlike
    /// [`ShadowMmu::take_flush`] the roots `vcpu` holds lazily are kept: a zap flushes
    /// every TLB only if it unmapped something, so translations that did not go through
    /// the zapped frames may survive it.
    pub(crate) fn take_flush_by_zap(&mut self, vcpu: usize) {
        if let Some(r) = self.pending.take(vcpu) {
            Counters::bump(&mut self.counters.flushes, FlushReason::ALL, r);
        }
    }

    /// Whether any vCPU has a root switch waiting (it may run on a freed root until then).
    pub(crate) fn root_switch_outstanding(&self) -> bool {
        self.new_cr3.iter().any(Option::is_some)
    }

    /// Once no root switch waits, the detached roots' frames may be reused.
    fn release_detached(&mut self) {
        if !self.root_switch_outstanding() {
            self.detached_shadows.clear();
            self.pool.release_held();
        }
    }

    /// Whether shadow `sidx` is a root some vCPU may still run on (see
    /// `detached_shadows`).
    pub(crate) fn still_run_on(&self, sidx: u32) -> bool {
        !self.debug_clear_detached
            && self.detached_shadows.contains(&sidx)
            && self.root_switch_outstanding()
    }

    /// Whether a root switch (`DETACH`) waits for `vcpu` in [`ShadowMmu::take_delivery`].
    pub fn root_switch_pending(&self, vcpu: usize) -> bool {
        self.new_cr3.get(vcpu).is_some_and(Option::is_some)
    }

    /// The flush pending for `vcpu`, without taking it (not counted).
    pub fn flush_pending(&self, vcpu: usize) -> Option<FlushReason> {
        self.pending.peek(vcpu)
    }

    /// Every vCPU with a flush pending, in index order: the vCPUs the VMM must flush
    /// (with [`ShadowMmu::take_flush`]) and, if they are running, kick before the batch
    /// that marked them is complete.
    pub fn vcpus_needing_flush(&self) -> Vec<usize> {
        (0..self.roots.len())
            .filter(|&v| self.pending.peek(v).is_some())
            .collect()
    }

    /// Splits the pool into host-resync chunks of `frames` frames (the unit the VMM can
    /// make the hypervisor forget, e.g. one memslot each); by default one chunk. Call it
    /// before the first batch.
    pub fn set_resync_granule(&mut self, frames: u32) {
        self.pool.set_granule(frames);
    }

    /// Frames per host-resync chunk.
    pub fn resync_granule(&self) -> u32 {
        self.pool.granule()
    }

    /// Host-resync chunks in all.
    pub fn resync_chunk_count(&self) -> usize {
        self.pool.chunk_count()
    }

    /// Whether a chunk is stale: some hypervisors (software KVM) cache translations from
    /// the pool's tables and do not see the VMM's writes to them, and the VMM changed an
    /// entry such a translation may have been made from (one with A=1), or reused a freed
    /// frame. The VMM must make the hypervisor drop what it cached from
    /// [`ShadowMmu::stale_chunks`] (e.g. re-register their memslots) before resuming any
    /// vCPU, then call [`ShadowMmu::host_resynced_chunks`].
    pub fn host_resync_needed(&self) -> bool {
        self.pool.resync_needed()
    }

    /// The stale chunks (see [`ShadowMmu::host_resync_needed`]), in order.
    pub fn stale_chunks(&self) -> Vec<u32> {
        self.pool.stale_chunks()
    }

    /// The hypervisor dropped what it cached from the frames of `chunks`: they become
    /// clean (and their freed frames reusable), unless a vCPU has a root switch waiting: it
    /// may still run on a root some batch freed, whose frame must not be reused before it
    /// switched, so the chunks stay stale until a resync after that. Returns whether they
    /// became clean.
    pub fn host_resynced_chunks(&mut self, chunks: &[u32]) -> bool {
        if self.reuse_blocked() {
            return false;
        }
        self.pool.resynced_chunks(chunks);
        true
    }

    /// The VMM made the hypervisor drop every translation it cached from the pool.
    pub fn host_resynced(&mut self) {
        self.pool.resynced();
    }

    /// Pool frame `sidx` holds (or held) an entry the hypervisor may have cached.
    #[inline]
    pub(crate) fn mark_stale(&mut self, sidx: u32) {
        self.pool.mark_stale(sidx);
    }

    /// The address space `vcpu` has loaded.
    pub fn loaded_root(&self, vcpu: usize) -> Option<LoadedRoot> {
        let l4 = (*self.roots.get(vcpu)?)?;
        let s = self.frames.shadow(l4)?;
        Some(LoadedRoot {
            guest_l4: l4 << 12,
            shadow_root: self.pool.pfn(s) << 12,
        })
    }

    /// The statistics.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The layout in force.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The type (1..=4) of the frame at guest-physical `gpa`, if it is a page table.
    pub fn frame_type(&self, gpa: u64) -> Option<u8> {
        self.frames.level(gpa >> 12)
    }

    /// Whether the frame holding guest-physical `gpa` is a page table (typed L1..L4).
    /// Every VMM write into guest memory (the hypercall response, bitmaps) must be
    /// refused for such a frame, and checked while holding the same lock on the engine as
    /// the write itself: a batch may type the frame.
    pub fn is_typed_frame(&self, gpa: u64) -> bool {
        self.frames.level(gpa >> 12).is_some()
    }

    /// Whether any frame overlapping `gpa .. gpa + len` is a page table (`len` 0 touches
    /// nothing; a range wrapping the address space counts as touching one).
    pub fn range_has_table(&self, gpa: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let Some(last) = gpa.checked_add(len - 1) else {
            return true;
        };
        (gpa >> 12..=last >> 12).any(|f| self.frames.level(f).is_some())
    }

    // ----- flush bookkeeping -----

    /// A shared-shadow change that the CPU may have cached: the vCPUs of `set` must flush.
    pub(crate) fn need_flush_on(&mut self, set: VcpuSet, r: FlushReason) {
        self.batch_flushed = true;
        if set.is_empty() {
            self.avoid(AvoidReason::NotHeld);
            return;
        }
        self.batch_targets |= set;
        if !self.pending.mark_set(set, r) {
            self.avoid(AvoidReason::Merged);
        }
    }

    /// A used entry of guest table `table` changed (`global`: it may have produced a
    /// global translation): the vCPUs that may hold a translation through it must flush.
    pub(crate) fn need_flush(&mut self, table: u64, global: bool, r: FlushReason) {
        let set = self.targets_of_table(table, global);
        self.need_flush_on(set, r);
    }

    /// Counts A/D bits `newly` written from a shadow into a guest PTE.
    #[inline]
    pub(crate) fn count_propagated(&mut self, newly: u64) {
        self.counters.a_bits_propagated += u64::from(newly & A != 0);
        self.counters.d_bits_propagated += u64::from(newly & D != 0);
    }

    /// A change that needed no flush.
    #[inline]
    pub(crate) fn avoid(&mut self, r: AvoidReason) {
        if let Some(c) = self.counters.flushes_avoided.get_mut(r.index()) {
            *c += 1;
        }
    }

    /// A guest `INVLPG` / `FLUSH_TLB` for `target`.
    fn guest_flush(&mut self, vcpu: usize, target: FlushTarget, r: FlushReason) -> R<()> {
        let all = self.all_vcpus();
        let set = match target {
            FlushTarget::Local => VcpuSet::one(vcpu),
            FlushTarget::Root => self.vcpus_holding_root_of(vcpu),
            FlushTarget::Mask(m) => {
                rules::flush_mask_valid(m, all.0)?;
                VcpuSet(m)
            }
            FlushTarget::All => all,
        };
        if set.is_empty() {
            return Ok(());
        }
        self.batch_targets |= set;
        if !self.pending.mark_set(set, r) {
            self.avoid(AvoidReason::Merged);
        }
        Ok(())
    }

    /// A removed or changed shadow entry `old`, held by pool frame `sidx`, of guest table
    /// `table` (a leaf if `leaf`): flush the vCPUs that may hold it if the CPU used it, and
    /// have the host forget it (a hypervisor that caches translations from the pool may
    /// hold one made from `old`; it made none from an entry with A=0): a resync of that
    /// frame, or for a leaf a zap of its old target (`leaf_zap`).
    #[inline(always)]
    pub(crate) fn retire(&mut self, sidx: u32, table: u64, leaf: bool, old: u64, r: FlushReason) {
        if old & A != 0 {
            // A leaf whose old target is zapped: the zap flushes the vCPUs that may hold it.
            let zapped = leaf && self.host_forget_leaf(sidx, old);
            if !leaf {
                self.mark_stale(sidx);
            }
            self.pending.covering = zapped;
            self.need_flush(table, !leaf || old & G != 0, r);
            self.pending.covering = false;
        } else {
            self.avoid(AvoidReason::NeverAccessed);
        }
    }

    /// The guest table a shadow slot (pool index * 512 + entry) shadows: the owner table,
    /// or the L2 of a split.
    pub(crate) fn table_of_slot(&self, slot: u32) -> Option<u64> {
        self.pool.meta(slot / 512).map(|m| match m.owner {
            Owner::Table { pfn, .. } => pfn,
            Owner::Split { l2, .. } => l2,
        })
    }

    // ----- entry checks and frame typing -----

    /// Every rule a present entry at `level` of table `table_pfn` must pass before it is
    /// written (typing of a referenced untyped table is done by [`Self::get_type`]).
    #[inline(always)]
    pub(crate) fn check_entry(&self, level: u8, table_pfn: u64, e: u64) -> R<Kind> {
        let k = rules::entry_flags_allowed(level, e)?;
        match k {
            Kind::NotPresent => {}
            // The dense RAM bit is exactly `layout.classify(pfn) == Ram`: the rule itself
            // runs only where it refuses (and names why).
            Kind::Leaf4k { pfn } if self.frames.is_ram(pfn) => {}
            Kind::Leaf4k { pfn } => rules::leaf_maps_guest_ram(&self.layout, pfn, 1)?,
            Kind::Leaf2m { pfn } => rules::leaf_maps_guest_ram(&self.layout, pfn, pte::FRAMES_2M)?,
            Kind::Table { pfn } => {
                rules::not_self_map(table_pfn, pfn)?;
                if !self.frames.is_ram(pfn) {
                    rules::table_is_guest_ram(&self.layout, pfn)?;
                }
                rules::table_level_matches(level, self.frames.level(pfn))?;
            }
        }
        Ok(k)
    }

    /// Takes a reference from the entry at `backref` to table `pfn` of `level`, validating
    /// and typing it (recursively) if it is untyped.
    pub(crate) fn get_type<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        pfn: u64,
        level: u8,
        backref: u64,
    ) -> R<()> {
        match self.frames.level(pfn) {
            Some(l) => rules::table_level_matches(level + 1, Some(l))?,
            None => {
                rules::table_is_guest_ram(&self.layout, pfn)?;
                self.validate_and_type(mem, pfn, level)?;
            }
        }
        self.frames.add_parent(pfn, backref);
        Ok(())
    }

    /// Drops the reference of the entry at `backref`; the table loses its type when no pin
    /// and no reference remain.
    pub(crate) fn put_type<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, pfn: u64, backref: u64) {
        if self.frames.remove_parent(pfn, backref) {
            // The vCPUs that reached the table through that entry until now.
            let reached = self.targets_of_table(backref >> 12, true);
            self.untype_with(mem, pfn, reached);
        }
    }

    /// Gives untyped `pfn` the type `level` if all its entries pass the rules; rolls back
    /// every reference it took on failure.
    pub(crate) fn validate_and_type<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        pfn: u64,
        level: u8,
    ) -> R<()> {
        let t = table(mem, pfn)?;
        let info = FrameInfo {
            level,
            ..Default::default()
        };
        if !self.frames.set_type(pfn, info) {
            return Err(Rule::TableNotRam);
        }
        // Read-only first, then read: what is validated is what stays.
        self.downgrade_writers(mem, pfn);
        let g = t.snapshot();
        for (i, &e) in g.iter().enumerate() {
            let r = self.check_entry(level, pfn, e).and_then(|k| match k {
                Kind::Table { pfn: c } => {
                    self.get_type(mem, c, level - 1, (pfn << 12) + 8 * i as u64)
                }
                _ => Ok(()),
            });
            if let Err(rule) = r {
                for (j, &e) in g.iter().enumerate().take(i).rev() {
                    if let Ok(Kind::Table { pfn: c }) = rules::entry_flags_allowed(level, e) {
                        self.put_type(mem, c, (pfn << 12) + 8 * j as u64);
                    }
                }
                self.frames.clear_type(pfn);
                self.restore_writers(mem, pfn);
                return Err(rule);
            }
        }
        Ok(())
    }

    /// Removes the type of `pfn`: harvests and drops its shadow, releases its references
    /// to lower tables (recursively) and makes it writable again where the guest says RW.
    pub(crate) fn untype<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, pfn: u64) {
        self.untype_with(mem, pfn, VcpuSet::EMPTY);
    }

    /// [`Self::untype`], where the vCPUs of `reached` may have reached `pfn` through an
    /// entry that was just removed: a used shadow dropped here flushes them too.
    fn untype_with<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, pfn: u64, reached: VcpuSet) {
        let Some(level) = self.frames.level(pfn) else {
            return;
        };
        let reached = reached | self.targets_of_table(pfn, true);
        if self.drop_shadow(mem, pfn) {
            self.need_flush_on(reached, FlushReason::ShadowDropped);
        } else if level == 4 {
            self.forget_root(pfn);
        }
        let children = table(mem, pfn).map(|t| t.snapshot());
        self.forget_unhooked(pfn);
        self.frames.clear_type(pfn);
        if let (true, Ok(g)) = (level > 1, children) {
            for (i, &e) in g.iter().enumerate() {
                if let Ok(Kind::Table { pfn: c }) = rules::entry_flags_allowed(level, e) {
                    if self.frames.remove_parent(c, (pfn << 12) + 8 * i as u64) {
                        self.untype_with(mem, c, reached);
                    }
                }
            }
        }
        self.restore_writers(mem, pfn);
    }

    /// `pfn` became a page table: every shadow leaf whose guest entry maps it RW becomes
    /// read-only.
    pub(crate) fn downgrade_writers<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, pfn: u64) {
        let mut cur = self.pool.rmap_first(pfn);
        while let Some(slot) = cur {
            cur = self.pool.rmap_next(slot);
            if let Ok(st) = table(mem, self.pool.pfn(slot / 512)) {
                let i = slot as usize % 512;
                let old = if self.traps() {
                    // Trapped stores: the leaf moves to the frame's alias (stores exit).
                    let s = st.get(i);
                    let p = self.protect_leaf(s);
                    if p == s {
                        continue;
                    }
                    let was = st.swap(i, p);
                    st.set_bits(i, was & AD);
                    was
                } else {
                    st.clear_bits(i, RW)
                };
                if old & RW != 0 {
                    let t = self.table_of_slot(slot).unwrap_or(pfn);
                    self.retire(slot / 512, t, true, old, FlushReason::TypeDowngrade);
                }
            }
        }
    }

    /// `pfn` lost its page-table type: shadow leaves whose guest entry says RW get RW back.
    pub(crate) fn restore_writers<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, pfn: u64) {
        let mut cur = self.pool.rmap_first(pfn);
        while let Some(slot) = cur {
            cur = self.pool.rmap_next(slot);
            if let Ok(st) = table(mem, self.pool.pfn(slot / 512)) {
                let i = slot as usize % 512;
                let s = st.get(i);
                if let Some(ram) = self.unalias_pfn(pte::pfn_of(s)) {
                    // Back from the alias to the frame itself.
                    let was = st.swap(i, Self::unprotect_leaf(s, ram, true));
                    st.set_bits(i, was & AD);
                    if pte::present(was) {
                        let t = self.table_of_slot(slot).unwrap_or(pfn);
                        self.retire(slot / 512, t, true, was, FlushReason::RightsRestored);
                    }
                    continue;
                }
                let old = st.set_bits(i, RW);
                if old & RW == 0 && pte::present(old) {
                    let t = self.table_of_slot(slot).unwrap_or(pfn);
                    self.retire(slot / 512, t, true, old, FlushReason::RightsRestored);
                }
            }
        }
    }

    // ----- ops -----

    /// `PT_UPDATE(ptr, val)`: validate `val`, take its reference, update the shadow (if the
    /// table has one) harvesting the replaced shadow entry, write the guest PTE, release the
    /// old reference.
    #[inline(never)]
    fn pt_update<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        ptr: u64,
        val: u64,
        preserve_ad: bool,
    ) -> R<()> {
        let tpfn = ptr >> 12;
        let i = ((ptr & 0xfff) >> 3) as usize;
        let typed = self.frames.table(tpfn);
        let level = rules::ptr_in_table(typed.map(|(l, _)| l))?;
        if level == 4 && i >= pte::KERNEL_HALF {
            // A kernel-half entry of a lazy vCPU's root: its remnant would part from it.
            self.force_lazy_switches_on(tpfn);
        }
        let sidx = typed.and_then(|(_, s)| s);
        let gt = table(mem, tpfn)?;
        let old = gt.get(i);
        let new_kind = self.check_entry(level, tpfn, val)?;
        let old_kind = rules::entry_flags_allowed(level, old).unwrap_or(Kind::NotPresent);

        // Same entry modulo A/D: the shadow is unchanged and keeps what the CPU recorded.
        if pte::present(old) && pte::present(val) && (old ^ val) & !AD == 0 {
            gt.set(i, if preserve_ad { val | (old & AD) } else { val });
            return Ok(());
        }

        if let Kind::Table { pfn: c } = new_kind {
            self.get_type(mem, c, level - 1, ptr)?;
        }
        let mut harvested = 0;
        if let Some(sidx) = sidx {
            self.pool.touch(sidx, self.epoch);
            let st = table(mem, self.pool.pfn(sidx));
            let built = match (&st, new_kind) {
                (Err(r), _) => Err(*r),
                // The common case, without the call (what `make_shadow_entry` returns).
                (Ok(_), Kind::Leaf4k { .. }) => Ok(self.shadow_leaf(val)),
                (Ok(_), _) => self.make_shadow_entry(mem, level, tpfn, i, val, new_kind),
            };
            let new_s = match built {
                Ok(s) => s,
                Err(rule) => {
                    if let Kind::Table { pfn: c } = new_kind {
                        self.put_type(mem, c, ptr);
                    }
                    return Err(rule);
                }
            };
            let st = st?;
            let slot = sidx * 512 + i as u32;
            let old_s = st.get(i);
            match old_kind {
                Kind::Leaf4k { .. }
                    if pte::present(old_s) && pte::is_upgrade(old_s & !AD, new_s) =>
                {
                    // Rights added on the same frame: keep the recorded A/D (the TLB may
                    // hold them), no flush.
                    let was = st.swap(i, new_s);
                    st.set_bits(i, was & AD);
                    self.avoid(AvoidReason::UpgradeOnly);
                }
                Kind::Leaf4k { pfn } => {
                    let was = st.swap(i, new_s);
                    harvested = was & AD;
                    let frame_kept = matches!(new_kind, Kind::Leaf4k { pfn: p } if p == pfn);
                    let r = if frame_kept {
                        FlushReason::LeafDowngraded
                    } else {
                        FlushReason::LeafRemoved
                    };
                    if pte::present(was) {
                        self.retire(sidx, tpfn, true, was, r);
                    }
                }
                Kind::Leaf2m { .. } => {
                    let was = st.swap(i, new_s);
                    if pte::present(was) {
                        if let Some(split) = self.pool.index_of(was & ADDR) {
                            harvested = self.free_split(mem, split);
                        }
                        self.retire(sidx, tpfn, false, was, FlushReason::LeafRemoved);
                    }
                }
                Kind::Table { .. } | Kind::NotPresent => {
                    let was = st.swap(i, new_s);
                    if pte::present(was) {
                        self.retire(sidx, tpfn, false, was, FlushReason::NonLeafChanged);
                    }
                }
            }
            if level == 1 {
                self.pool.rmap_remove(slot);
                if let (Kind::Leaf4k { pfn }, true) = (new_kind, val & RW != 0) {
                    self.pool.rmap_add(slot, pfn);
                }
            }
        }
        let same_frame = matches!((old_kind, new_kind),
            (Kind::Leaf4k { pfn: a }, Kind::Leaf4k { pfn: b }) | (Kind::Leaf2m { pfn: a }, Kind::Leaf2m { pfn: b }) if a == b);
        let (v, added) = pte::updated_guest_entry(val, old, preserve_ad, same_frame, harvested);
        self.count_propagated(added);
        gt.set(i, v);
        if let Kind::Table { pfn: c } = old_kind {
            self.put_type(mem, c, ptr);
        }
        Ok(())
    }

    /// `PIN_L<level>(pfn)`: type (validating) and pin, then build its shadow.
    fn pin<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, level: u8, pfn: u64) -> R<()> {
        rules::table_is_guest_ram(&self.layout, pfn)?;
        let ty = self.frames.level(pfn);
        let pinned = self.frames.info(pfn).is_some_and(|i| i.pinned);
        rules::pin_allowed(level, ty, pinned)?;
        if ty.is_none() {
            self.validate_and_type(mem, pfn, level)?;
        }
        if let Some(i) = self.frames.info_mut(pfn) {
            i.pinned = true;
        }
        if let Err(rule) = self.ensure_shadow(mem, pfn) {
            if let Some(i) = self.frames.info_mut(pfn) {
                i.pinned = false;
            }
            if ty.is_none() {
                self.untype(mem, pfn);
            }
            return Err(rule);
        }
        Ok(())
    }

    /// `UNPIN(pfn)`: drop the pin; an unreferenced, unloaded table then loses its type,
    /// its shadows are harvested (A/D into the guest PTEs) and dropped, recursively.
    fn unpin<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, pfn: u64) -> R<()> {
        let (pinned, refs) = self
            .frames
            .info(pfn)
            .map_or((false, 0), |i| (i.pinned, i.parents.len()));
        let loaded = self.roots.contains(&Some(pfn));
        rules::unpin_allowed(pinned, loaded, refs)?;
        rules::not_a_kernel_root(self.kernel_root.contains(&Some(pfn)))?;
        if let Some(i) = self.frames.info_mut(pfn) {
            i.pinned = false;
        }
        self.untype(mem, pfn);
        Ok(())
    }

    /// `NEW_BASEPTR(pfn)`: load a pinned L4, (re)building its shadow if needed.
    fn new_baseptr<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, vcpu: usize, pfn: u64) -> R<()> {
        let pinned = self.frames.info(pfn).is_some_and(|i| i.pinned);
        rules::baseptr_allowed(self.frames.level(pfn), pinned)?;
        let s = self.ensure_shadow(mem, pfn)?;
        self.roots_changed();
        if let (Some(r), Some(c)) = (self.roots.get_mut(vcpu), self.new_cr3.get_mut(vcpu)) {
            *r = Some(pfn);
            *c = Some(self.pool.pfn(s) << 12);
        }
        self.hold(vcpu, pfn);
        Ok(())
    }

    /// `SET_KERNEL_ROOT(pfn)`: register a pinned L4 (with a shadow) as `vcpu`'s kernel root;
    /// `None` clears the registration.
    fn set_kernel_root<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        vcpu: usize,
        pfn: Option<u64>,
    ) -> R<()> {
        if let Some(pfn) = pfn {
            let pinned = self.frames.info(pfn).is_some_and(|i| i.pinned);
            rules::baseptr_allowed(self.frames.level(pfn), pinned)?;
            self.ensure_shadow(mem, pfn)?;
        }
        self.force_lazy_switches("SET_KERNEL_ROOT");
        if let Some(k) = self.kernel_root.get_mut(vcpu) {
            *k = pfn;
        }
        self.counters.kernel_roots_set += 1;
        Ok(())
    }

    /// `UNPIN` with `DETACH`, before the unpin itself: every vCPU that has `pfn` loaded is
    /// switched to its kernel root (all or none: each must have one, with a shadow).
    fn detach<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, pfn: u64) -> R<()> {
        let pinned = self.frames.info(pfn).is_some_and(|i| i.pinned);
        let refs = self.frames.info(pfn).map_or(0, |i| i.parents.len());
        rules::unpin_allowed(pinned, false, refs)?;
        rules::not_a_kernel_root(self.kernel_root.contains(&Some(pfn)))?;
        self.release_detached();
        let mut plan = Vec::new();
        for (v, r) in self.roots.iter().enumerate() {
            if *r == Some(pfn) {
                let k = self.kernel_root.get(v).copied().flatten();
                plan.push((v, rules::kernel_root_usable(k, pfn)?));
            }
        }
        let mut shadows = Vec::with_capacity(plan.len());
        for &(_, k) in &plan {
            shadows.push(self.ensure_shadow(mem, k)?);
        }
        let dying = self.frames.shadow(pfn);
        if let (false, Some(s)) = (plan.is_empty(), dying) {
            self.detached_shadows.push(s);
            self.bound_held_frames();
        }
        self.roots_changed();
        for (&(v, k), s) in plan.iter().zip(shadows) {
            let cr3 = self.pool.pfn(s) << 12;
            let lazy = dying.filter(|&d| self.lazy_switch_allowed(mem, d, s));
            if let (Some(r), Some(c), Some(l)) = (
                self.roots.get_mut(v),
                self.new_cr3.get_mut(v),
                self.lazy_remnant.get_mut(v),
            ) {
                *r = Some(k);
                *c = Some(cr3);
                *l = lazy;
            }
            self.hold(v, k);
            self.counters.detached_vcpus += 1;
            self.counters.detached_lazily += u64::from(lazy.is_some());
        }
        self.counters.detach_unpins += 1;
        Ok(())
    }

    /// `RELOCATE_TABLE(old, new)`: move content (with harvested A/D), type, pin, references,
    /// shadow and loaded roots from `old` to `new`; rewrite the guest parent entries. The
    /// shadow itself does not move, so no shadow parent entry changes and no flush is needed.
    fn relocate<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, old: u64, new: u64) -> R<()> {
        let level = rules::relocate_allowed(
            &self.layout,
            self.frames.level(old),
            new,
            self.frames.level(new),
        )?;
        let (ot, nt) = (table(mem, old)?, table(mem, new)?);
        let mut content = ot.snapshot();
        let sidx = self.frames.shadow(old);
        if let Some(sidx) = sidx {
            let st = table(mem, self.pool.pfn(sidx))?;
            for (i, e) in content.iter_mut().enumerate() {
                let s = st.get(i);
                if !pte::present(*e) || !pte::present(s) {
                    continue;
                }
                if level == 1 {
                    self.count_propagated(s & AD & !*e);
                    *e |= s & AD;
                } else if pte::is_2m_leaf(level, *e) {
                    if let Some(split) = self.pool.index_of(s & ADDR) {
                        let ad = self.split_ad(mem, split);
                        self.count_propagated(ad & !*e);
                        *e |= ad;
                        if let Some(m) = self.pool.meta_mut(split) {
                            m.owner = Owner::Split {
                                l2: new,
                                idx: i as u16,
                            };
                        }
                    }
                }
            }
            if let Some(m) = self.pool.meta_mut(sidx) {
                m.owner = Owner::Table { pfn: new, level };
            }
        }
        let Some(info) = self.frames.clear_type(old) else {
            return Err(Rule::RelocateUntyped);
        };
        let parents = info.parents.clone();
        self.frames.set_type(new, info);
        self.frames.set_shadow(new, sidx);
        for (i, &e) in content.iter().enumerate() {
            nt.set(i, e);
            if let (true, Ok(Kind::Table { pfn: c })) =
                (level > 1, rules::entry_flags_allowed(level, e))
            {
                self.frames.remove_parent(c, (old << 12) + 8 * i as u64);
                self.frames.add_parent(c, (new << 12) + 8 * i as u64);
            }
        }
        for p in parents {
            if let Ok(pt) = table(mem, p >> 12) {
                let idx = ((p & 0xfff) >> 3) as usize;
                let e = pt.get(idx);
                pt.set(idx, (e & !ADDR) | (new << 12));
            }
        }
        self.roots_changed();
        for r in self.roots.iter_mut().chain(self.kernel_root.iter_mut()) {
            if *r == Some(old) {
                *r = Some(new);
            }
        }
        for r in self.held.iter_mut().flatten() {
            if *r == old {
                *r = new;
            }
        }
        // Once the references point at `new`: the flush targets of the writers' tables are
        // found through them.
        self.downgrade_writers(mem, new);
        self.restore_writers(mem, old);
        Ok(())
    }

    /// `COPY_FRAME(dst, src)`: checked and copied under the engine lock (the caller's), so
    /// `dst` cannot become a page table in between.
    fn copy_frame<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, dst: u64, src: u64) -> R<()> {
        rules::copy_allowed(&self.layout, dst, src, self.frames.level(dst))?;
        let (d, s) = (table(mem, dst)?, table(mem, src)?);
        d.copy_from(&s);
        Ok(())
    }

    /// `ZERO_FRAME(pfn)`.
    fn zero_frame<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, pfn: u64) -> R<()> {
        rules::zero_allowed(&self.layout, pfn, self.frames.level(pfn))?;
        // Stored in place (no 4 KiB zero source read through the cache, which evicted the
        // engine's data between the entries of a populate batch); a frame that is not in
        // one region is written through the memory object.
        if let Ok(t) = table(mem, pfn) {
            t.zero();
            return Ok(());
        }
        mem.guest()
            .write_slice(&[0u8; 4096], GuestAddress(pfn << 12))
            .map_err(|_| Rule::Unbacked)
    }
}
