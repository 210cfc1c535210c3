//! Leaf zaps: the cheap host resync of a changed leaf.
//!
//! A hypervisor that shadows the pool in software (KVM without nested paging) caches a
//! translation made from a shadow leaf as a mapping of that leaf's target frame, and it
//! drops every mapping of a frame when the host changes the frame's own mapping (KVM's
//! MMU notifier). So where the VMM can make that happen (see the VMM's `ram_zap`), a
//! leaf whose cached translation must go does not make its pool chunk stale: its old
//! target frame is listed instead, and the VMM zaps the listed frames before the batch
//! returns. A non-leaf entry, a frame outside RAM and a reused pool frame still make the
//! chunk stale (the hypervisor keeps what it derived from a table until that is resynced).

use crate::layout::FrameClass;
use crate::pte::{self};
use crate::vcpuset::VcpuSet;

/// The frames a batch's changed leaves targeted, for the VMM to zap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeafZapList {
    /// RAM frame numbers, ascending, each once.
    pub frames: Vec<u64>,
    /// The pool frames that held those leaves: made stale instead if the zap fails.
    pub pool_frames: Vec<u32>,
}

impl LeafZapList {
    /// Whether nothing is to be zapped.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// The engine's leaf-zap state.
#[derive(Debug, Default)]
pub(crate) struct LeafZaps {
    /// Leaves are zapped rather than resynced (`ShadowMmu::enable_leaf_zap`).
    pub(crate) enabled: bool,
    /// The list being gathered by the current batch (frames unsorted).
    list: LeafZapList,
}

impl LeafZaps {
    /// Lists RAM frame `pfn`, the old target of a leaf held by pool frame `sidx`.
    #[inline]
    pub(crate) fn push(&mut self, sidx: u32, pfn: u64) {
        self.list.frames.push(pfn);
        self.list.pool_frames.push(sidx);
    }

    /// Takes the gathered list, frames sorted and deduplicated.
    pub(crate) fn take(&mut self) -> LeafZapList {
        let mut l = std::mem::take(&mut self.list);
        l.frames.sort_unstable();
        l.frames.dedup();
        l.pool_frames.sort_unstable();
        l.pool_frames.dedup();
        l
    }
}

impl crate::ShadowMmu {
    /// Zap the old target frames of changed leaves instead of resyncing their pool
    /// chunks ([`ShadowMmu::take_leaf_zaps`]); for a host that shadows the pool in
    /// software and drops a frame's translations when the VMM changes its host mapping.
    ///
    /// [`ShadowMmu::take_leaf_zaps`]: crate::ShadowMmu::take_leaf_zaps
    pub fn enable_leaf_zap(&mut self) {
        self.leaf_zaps.enabled = true;
    }

    /// Whether leaves are zapped rather than resynced.
    pub fn leaf_zap_enabled(&self) -> bool {
        self.leaf_zaps.enabled
    }

    /// The frames the VMM must zap before the batch returns (empty unless
    /// [`ShadowMmu::enable_leaf_zap`]): the host must drop every translation it made to
    /// them. Call it at the end of every batch.
    ///
    /// [`ShadowMmu::enable_leaf_zap`]: crate::ShadowMmu::enable_leaf_zap
    pub fn take_leaf_zaps(&mut self) -> LeafZapList {
        self.leaf_zaps.take()
    }

    /// The zap of `list` failed: its leaves' pool frames become stale (a resync then), and
    /// no pending flush counts as done by a zap.
    pub fn leaf_zaps_failed(&mut self, list: &LeafZapList) {
        for &s in &list.pool_frames {
            self.mark_stale(s);
        }
        self.pending.uncover_all();
    }

    /// The vCPUs of `remote` whose pending flush the batch's leaf zap performed: every
    /// reason merged into it is a leaf whose old target was listed for a zap (the host
    /// then drops every translation to that frame and flushes every vCPU that could hold
    /// one), and no root switch waits for it (that needs its own thread). Call it after
    /// the zap of [`ShadowMmu::take_leaf_zaps`] succeeded, under the same lock.
    ///
    /// [`ShadowMmu::take_leaf_zaps`]: crate::ShadowMmu::take_leaf_zaps
    pub fn leaf_zap_flushable(&self, remote: VcpuSet) -> VcpuSet {
        if !self.leaf_zaps.enabled {
            return VcpuSet::EMPTY;
        }
        self.zap_flushable(remote, |p, v| !p.unzapped(v))
    }

    /// The pending flushes of `flushed` (from [`ShadowMmu::leaf_zap_flushable`]) were
    /// performed by the zap.
    ///
    /// [`ShadowMmu::leaf_zap_flushable`]: crate::ShadowMmu::leaf_zap_flushable
    pub fn leaf_zap_flushed(&mut self, flushed: VcpuSet) {
        for v in flushed.iter() {
            self.take_flush_by_zap(v);
        }
    }

    /// The host may hold a translation made from shadow leaf `old`, held by pool frame
    /// `sidx`: list its target frame for a zap, or (a non-RAM target, or no leaf zaps)
    /// make the frame's chunk stale.
    /// Returns whether it was listed.
    #[inline]
    pub(crate) fn host_forget_leaf(&mut self, sidx: u32, old: u64) -> bool {
        if self.leaf_zaps.enabled {
            let to = pte::pfn_of(old);
            let ram = self.unalias_pfn(to).unwrap_or(to);
            if self.layout.classify(ram) == FrameClass::Ram {
                self.leaf_zaps.push(sidx, ram);
                return true;
            }
        }
        self.mark_stale(sidx);
        false
    }
}
