//! TLB coherence: why a flush is needed, why one was avoided, and the per-vCPU pending flag.
//!
//! Changes to shared shadows (leaf removal/downgrade, non-leaf change, A/D clearing,
//! reclaim, type changes) mark **every** vCPU, because all of them may cache translations
//! through the shared shadows. Guest `INVLPG` / `FLUSH_TLB` mark only the calling vCPU.
//! A vCPU collects at most one flush per batch (later reasons are counted as "merged").

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
        /// Pool reclaim dropped shadow leaves the CPU had used.
        Reclaim = "reclaim",
        /// The guest asked: `INVLPG`.
        GuestInvlpg = "guest_invlpg",
        /// The guest asked: `FLUSH_TLB`.
        GuestFlushTlb = "guest_flush_tlb",
    }
}

reasons! {
    /// Why a change did not need a flush of its own.
    AvoidReason {
        /// The removed/downgraded shadow entry had A=0: the CPU never cached it.
        NeverAccessed = "never_accessed",
        /// The change only added rights on the same frame; the old shadow A/D were kept.
        UpgradeOnly = "upgrade_only",
        /// A flush was already pending for this batch.
        Merged = "merged",
    }
}

/// The pending flush of each vCPU.
#[derive(Clone, Debug)]
pub(crate) struct Pending {
    per_vcpu: Vec<Option<FlushReason>>,
}

impl Pending {
    /// No flush pending on `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Pending {
        Pending {
            per_vcpu: vec![None; vcpus],
        }
    }

    /// Marks `vcpu`; returns false if a flush was already pending (merged).
    pub fn mark(&mut self, vcpu: usize, r: FlushReason) -> bool {
        match self.per_vcpu.get_mut(vcpu) {
            Some(p @ None) => {
                *p = Some(r);
                true
            }
            _ => false,
        }
    }

    /// Marks every vCPU; returns false if the caller `vcpu` already had one pending.
    pub fn mark_all(&mut self, vcpu: usize, r: FlushReason) -> bool {
        let fresh = self.per_vcpu.get(vcpu).is_some_and(|p| p.is_none());
        for p in self.per_vcpu.iter_mut() {
            p.get_or_insert(r);
        }
        fresh
    }

    /// Takes the pending flush of `vcpu`.
    pub fn take(&mut self, vcpu: usize) -> Option<FlushReason> {
        self.per_vcpu.get_mut(vcpu).and_then(Option::take)
    }
}
