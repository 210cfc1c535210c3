//! TLB coherence: why a flush is needed, why one was avoided, and the per-vCPU pending flag.
//!
//! Changes to shared shadows (leaf removal/downgrade, non-leaf change, A/D clearing,
//! reclaim, dropped shadows, type changes) mark the vCPUs that may cache translations
//! through the changed entry (`targets`: the root reaching it is loaded there, or held
//! there for global translations); reclaim marks every vCPU. Guest `INVLPG` / `FLUSH_TLB`
//! mark the vCPUs of their target. A vCPU collects at most one pending flush (the first
//! reason); a flush request that finds a flush already pending on every vCPU it targets is
//! counted as avoided `merged`, one that targets no vCPU as avoided `not_held`.

macro_rules! reasons {
    ($(#[$tm:meta])* $ty:ident { $($(#[$m:meta])* $v:ident = $name:literal,)* }) => {
        $(#[$tm])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $ty { $($(#[$m])* $v,)* }
        impl $ty {
            /// Every reason, in counter order.
            pub const ALL: &'static [$ty] = &[$($ty::$v,)*];
            /// Number of reasons.
            pub const COUNT: usize = $ty::ALL.len();
            /// Name for statistics.
            pub const fn name(self) -> &'static str { match self { $($ty::$v => $name,)* } }
            /// Position in [`Self::ALL`] (the enum lists the reasons in that order).
            #[inline(always)]
            pub const fn index(self) -> usize { self as usize }
        }
    };
}

reasons! {
    /// Why the VMM must flush the vCPU's TLB.
    FlushReason {
        /// A shadow leaf with A=1 was removed or remapped to another frame.
        LeafRemoved = "leaf_removed",
        /// A shadow leaf with A=1 lost rights (RW, US), gained NX or changed attributes.
        LeafDowngraded = "leaf_downgraded",
        /// A frame became a page table: a writable shadow leaf with A=1 was made read-only.
        TypeDowngrade = "type_downgrade",
        /// A frame lost its page-table type: a read-only-forced shadow leaf with A=1 got its
        /// RW back (avoids a spurious write fault the guest might not expect).
        RightsRestored = "rights_restored",
        /// A present non-leaf shadow entry with A=1 changed.
        NonLeafChanged = "non_leaf_changed",
        /// `SYNC_AD` cleared an A or D bit that was set in a shadow leaf.
        AdCleared = "ad_cleared",
        /// Pool reclaim dropped shadow entries the CPU had used.
        Reclaim = "reclaim",
        /// A guest table lost its type (`UNPIN`, teardown, last reference removed) and its
        /// shadow, which held entries the CPU had used (A=1), was dropped.
        ShadowDropped = "shadow_dropped",
        /// The guest asked: `INVLPG`.
        GuestInvlpg = "guest_invlpg",
        /// The guest asked: `FLUSH_TLB`.
        GuestFlushTlb = "guest_flush_tlb",
    }
}

impl FlushReason {
    /// Whether the flush stems from a pool entry the CPU used (A=1) that changed or was
    /// dropped, whose pool frame is then marked stale: zapping the host's mapping of the
    /// stale frames flushes every translation made through it (see
    /// [`crate::ShadowMmu::kernel_flushable`]). Only a guest's own `INVLPG` / `FLUSH_TLB`
    /// names no frame.
    pub const fn frame_derived(self) -> bool {
        !matches!(self, FlushReason::GuestInvlpg | FlushReason::GuestFlushTlb)
    }
}

reasons! {
    /// Why a change did not need a flush of its own.
    AvoidReason {
        /// The removed/downgraded shadow entry had A=0: the CPU never cached it.
        NeverAccessed = "never_accessed",
        /// The change only added rights on the same frame; the old shadow A/D were kept.
        UpgradeOnly = "upgrade_only",
        /// A flush was needed, but every vCPU it targets already had one pending.
        Merged = "merged",
        /// A used entry changed, but no vCPU holds a root that reaches its table any more
        /// (the vCPUs that did were flushed when they left it).
        NotHeld = "not_held",
    }
}

/// The pending flush of each vCPU.
#[derive(Clone, Debug)]
pub(crate) struct Pending {
    per_vcpu: Vec<Option<FlushReason>>,
    /// Some reason merged into the vCPU's pending flush names no pool frame
    /// ([`FlushReason::frame_derived`] is false).
    frameless: Vec<bool>,
    /// Some reason merged into the vCPU's pending flush is not covered by a leaf zap (see
    /// `covering`).
    unzapped: Vec<bool>,
    /// Set by the engine while it marks a flush whose reason is a leaf the host is about
    /// to forget by a zap of its old target (`leaf_zap`): that zap flushes the vCPUs too.
    pub covering: bool,
    /// Debug: every reason counts as naming a frame (see `set_debug_guest_flush_framed`).
    pub debug_all_framed: bool,
    /// Debug: every reason counts as covered by a leaf zap (`set_debug_zap_covers_all`).
    pub debug_all_covered: bool,
}

impl Pending {
    /// No flush pending on `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Pending {
        Pending {
            per_vcpu: vec![None; vcpus],
            frameless: vec![false; vcpus],
            unzapped: vec![false; vcpus],
            covering: false,
            debug_all_framed: false,
            debug_all_covered: false,
        }
    }

    /// Marks every vCPU of `set`; returns false if each of them already had one pending
    /// (merged).
    pub fn mark_set(&mut self, set: VcpuSet, r: FlushReason) -> bool {
        let mut fresh = false;
        let flags = self.frameless.iter_mut().zip(self.unzapped.iter_mut());
        let vcpus = self.per_vcpu.iter_mut().zip(flags);
        for (v, (p, (frameless, unzapped))) in vcpus.enumerate() {
            if !set.contains(v) {
                continue;
            }
            *frameless |= !r.frame_derived() && !self.debug_all_framed;
            *unzapped |= !self.covering && !self.debug_all_covered;
            if p.is_none() {
                *p = Some(r);
                fresh = true;
            }
        }
        fresh
    }

    /// Whether a reason merged into `vcpu`'s pending flush names no pool frame.
    pub fn frameless(&self, vcpu: usize) -> bool {
        self.frameless.get(vcpu).copied().unwrap_or(false)
    }

    /// Whether a reason merged into `vcpu`'s pending flush is not covered by a leaf zap.
    pub fn unzapped(&self, vcpu: usize) -> bool {
        self.unzapped.get(vcpu).copied().unwrap_or(true)
    }

    /// No pending flush is covered by a leaf zap any more (the zap failed).
    pub fn uncover_all(&mut self) {
        self.unzapped.iter_mut().for_each(|u| *u = true);
    }

    /// The pending flush of `vcpu`, left pending.
    pub fn peek(&self, vcpu: usize) -> Option<FlushReason> {
        self.per_vcpu.get(vcpu).copied().flatten()
    }

    /// Takes the pending flush of `vcpu`.
    pub fn take(&mut self, vcpu: usize) -> Option<FlushReason> {
        if let Some(f) = self.frameless.get_mut(vcpu) {
            *f = false;
        }
        if let Some(u) = self.unzapped.get_mut(vcpu) {
            *u = false;
        }
        self.per_vcpu.get_mut(vcpu).and_then(Option::take)
    }
}

use crate::vcpuset::VcpuSet;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_flush_merged_into_a_pending_one_makes_it_frameless() {
        let mut p = Pending::new(2);
        p.mark_set(VcpuSet::one(0), FlushReason::LeafRemoved);
        assert!(!p.frameless(0));
        p.mark_set(VcpuSet::first(2), FlushReason::GuestFlushTlb);
        assert!(p.frameless(0), "merged into vCPU 0's pending flush");
        assert!(p.frameless(1));
        assert_eq!(p.take(0), Some(FlushReason::LeafRemoved));
        assert!(!p.frameless(0), "taken with the flush");
        assert!(!p.frameless(7), "no such vCPU");
    }

    #[test]
    fn merged_only_when_every_target_was_pending() {
        let mut p = Pending::new(3);
        assert!(p.mark_set(VcpuSet::one(1), FlushReason::GuestInvlpg));
        assert!(
            !p.mark_set(VcpuSet::one(1), FlushReason::GuestFlushTlb),
            "caller already pending"
        );
        // vCPU 1 pending, 0 and 2 not: the request is not merged.
        let all = VcpuSet::first(3);
        assert!(!p.mark_set(VcpuSet::one(1), FlushReason::Reclaim), "merged");
        assert!(p.mark_set(all, FlushReason::AdCleared));
        assert!(
            !p.mark_set(all, FlushReason::Reclaim),
            "all pending: merged"
        );
        assert_eq!(p.peek(1), Some(FlushReason::GuestInvlpg));
        assert_eq!(p.take(0), Some(FlushReason::AdCleared));
        assert_eq!(p.take(0), None);
        assert_eq!(p.peek(0), None);
        assert!(
            p.mark_set(VcpuSet::one(0), FlushReason::Reclaim),
            "vCPU 0 was clear again"
        );
        assert!(
            !p.mark_set(VcpuSet::one(7), FlushReason::Reclaim),
            "no such vCPU"
        );
        assert_eq!(p.take(2), Some(FlushReason::AdCleared), "first reason kept");
    }
}
