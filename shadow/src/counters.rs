//! Statistics: plain counters the VMM converts for its own reporting.

use crate::flush::{AvoidReason, FlushReason};
use crate::rules::Rule;

/// MMU op kinds, for per-kind counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// `PT_UPDATE` (either variant).
    PtUpdate,
    /// `PIN_L*`.
    Pin,
    /// `UNPIN`.
    Unpin,
    /// `NEW_BASEPTR`.
    NewBaseptr,
    /// `INVLPG`.
    Invlpg,
    /// `FLUSH_TLB`.
    FlushTlb,
    /// `SYNC_AD`.
    SyncAd,
    /// `QUERY_AD`.
    QueryAd,
    /// `RELOCATE_TABLE`.
    RelocateTable,
    /// `ZERO_FRAME`.
    ZeroFrame,
    /// `SET_KERNEL_ROOT`.
    SetKernelRoot,
    /// `COPY_FRAME`.
    CopyFrame,
}

impl OpKind {
    /// Every kind, in counter order.
    pub const ALL: [OpKind; 12] = [
        OpKind::PtUpdate,
        OpKind::Pin,
        OpKind::Unpin,
        OpKind::NewBaseptr,
        OpKind::Invlpg,
        OpKind::FlushTlb,
        OpKind::SyncAd,
        OpKind::QueryAd,
        OpKind::RelocateTable,
        OpKind::ZeroFrame,
        OpKind::SetKernelRoot,
        OpKind::CopyFrame,
    ];

    /// The kind of a decoded op.
    pub fn of(op: &hypercall::MmuOp) -> OpKind {
        use hypercall::MmuOp as O;
        match op {
            O::PtUpdate { .. } => OpKind::PtUpdate,
            O::Pin { .. } => OpKind::Pin,
            O::Unpin { .. } => OpKind::Unpin,
            O::NewBaseptr { .. } => OpKind::NewBaseptr,
            O::Invlpg { .. } => OpKind::Invlpg,
            O::FlushTlb { .. } => OpKind::FlushTlb,
            O::SyncAd { .. } => OpKind::SyncAd,
            O::QueryAd { .. } => OpKind::QueryAd,
            O::RelocateTable { .. } => OpKind::RelocateTable,
            O::ZeroFrame { .. } => OpKind::ZeroFrame,
            O::SetKernelRoot { .. } => OpKind::SetKernelRoot,
            O::CopyFrame { .. } => OpKind::CopyFrame,
        }
    }

    /// Position of this kind in [`OpKind::ALL`] (the enum lists them in that order).
    #[inline(always)]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Name for statistics (the ABI's entry kind name).
    pub const fn name(self) -> &'static str {
        match self {
            OpKind::PtUpdate => "PT_UPDATE",
            OpKind::Pin => "PIN",
            OpKind::Unpin => "UNPIN",
            OpKind::NewBaseptr => "NEW_BASEPTR",
            OpKind::Invlpg => "INVLPG",
            OpKind::FlushTlb => "FLUSH_TLB",
            OpKind::SyncAd => "SYNC_AD",
            OpKind::QueryAd => "QUERY_AD",
            OpKind::RelocateTable => "RELOCATE_TABLE",
            OpKind::ZeroFrame => "ZERO_FRAME",
            OpKind::SetKernelRoot => "SET_KERNEL_ROOT",
            OpKind::CopyFrame => "COPY_FRAME",
        }
    }
}

/// Everything the engine counts. Arrays are indexed by the position of the key in its
/// `ALL` list (`Rule::ALL`, `FlushReason::ALL`, ...); use the accessor methods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Successful `PT_UPDATE`s.
    pub updates: u64,
    /// Successful pins.
    pub pins: u64,
    /// Successful unpins.
    pub unpins: u64,
    /// Successful relocations.
    pub relocations: u64,
    /// Frames zeroed by `ZERO_FRAME`.
    pub zeroed_frames: u64,
    /// Frames copied by `COPY_FRAME`.
    pub copied_frames: u64,
    /// Ops applied, successful or not, by [`OpKind`].
    pub ops: [u64; 12],
    /// Refusals by [`Rule`].
    pub rejects: Vec<u64>,
    /// Shadows of guest tables currently live (one per shadowed typed table; the split
    /// tables of 2 MiB leaves are not counted here, see `split_tables_live`).
    pub shadow_tables_live: u64,
    /// Most shadows of guest tables ever live at once (splits excluded).
    pub shadow_tables_high_water: u64,
    /// Split shadow L1s (one per shadowed 2 MiB guest leaf) currently live.
    pub split_tables_live: u64,
    /// Pool frames in use: `shadow_tables_live + split_tables_live`.
    pub pool_frames_used: u64,
    /// Most pool frames ever in use at once.
    pub pool_frames_high_water: u64,
    /// Pool frames in total.
    pub pool_frames_total: u64,
    /// Flushes handed to the VMM by [`FlushReason`], counted per vCPU when taken
    /// (`end_batch` / `take_flush`): at most one per vCPU between two takes.
    pub flushes: Vec<u64>,
    /// Changes that needed no flush of their own, by [`AvoidReason`] (one count per change,
    /// not per vCPU).
    pub flushes_avoided: Vec<u64>,
    /// `SYNC_AD` ops completed.
    pub ad_syncs: u64,
    /// A bits moved from shadows into guest PTEs that the written guest PTE would not
    /// otherwise have had (`SYNC_AD`, `PT_UPDATE` harvests that end up in the written value,
    /// harvests when shadows are dropped or reclaimed, `RELOCATE_TABLE` copies). Bits a
    /// plain `PT_UPDATE` discards are not counted.
    pub a_bits_propagated: u64,
    /// D bits moved from shadows into guest PTEs, with the same meaning as
    /// `a_bits_propagated`.
    pub d_bits_propagated: u64,
    /// `QUERY_AD` ops completed.
    pub queries: u64,
    /// Pool reclaim passes.
    pub reclaims: u64,
    /// Shadow tables dropped by reclaim.
    pub reclaimed_tables: u64,
    /// Successful `SET_KERNEL_ROOT`s.
    pub kernel_roots_set: u64,
    /// Successful `UNPIN`s with `DETACH` (one per torn-down address space).
    pub detach_unpins: u64,
    /// vCPUs a `DETACH` switched from the dying root to their kernel root.
    pub detached_vcpus: u64,
    /// Of `detached_vcpus`, those whose switch was left lazy (no delivery before the
    /// hypercall returned; `lazy_switch`).
    pub detached_lazily: u64,
    /// Lazy switches a later change made eager (delivered at the end of that batch).
    pub lazy_switches_forced: u64,
}

impl Counters {
    pub(crate) fn new(pool_total: u64) -> Counters {
        Counters {
            rejects: vec![0; Rule::COUNT],
            flushes: vec![0; FlushReason::COUNT],
            flushes_avoided: vec![0; AvoidReason::COUNT],
            pool_frames_total: pool_total,
            ..Default::default()
        }
    }

    /// Refusals counted for `rule`.
    pub fn rejected(&self, rule: Rule) -> u64 {
        let i = Rule::ALL
            .iter()
            .position(|r| *r == rule)
            .unwrap_or(usize::MAX);
        self.rejects.get(i).copied().unwrap_or(0)
    }

    /// Flushes counted for `reason`.
    pub fn flushed(&self, reason: FlushReason) -> u64 {
        let i = FlushReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(usize::MAX);
        self.flushes.get(i).copied().unwrap_or(0)
    }

    /// Avoided flushes counted for `reason`.
    pub fn avoided(&self, reason: AvoidReason) -> u64 {
        let i = AvoidReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(usize::MAX);
        self.flushes_avoided.get(i).copied().unwrap_or(0)
    }

    /// Ops counted for `kind`.
    pub fn op_count(&self, kind: OpKind) -> u64 {
        self.ops.get(kind.index()).copied().unwrap_or(0)
    }

    /// Counts one applied op of `kind`.
    #[inline(always)]
    pub(crate) fn count_op(&mut self, kind: OpKind) {
        if let Some(c) = self.ops.get_mut(kind.index()) {
            *c += 1;
        }
    }

    pub(crate) fn bump<T: PartialEq + Copy>(v: &mut [u64], all: &[T], key: T) {
        if let Some(c) = all
            .iter()
            .position(|k| *k == key)
            .and_then(|i| v.get_mut(i))
        {
            *c += 1;
        }
    }
}
