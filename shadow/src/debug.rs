//! Test and debugging helpers: translation through the shadow and shadow leaf slots. Not
//! part of the VMM API (the invariant checker is, see `invariants`).

use vm_memory::GuestMemory;

use crate::engine::ShadowMmu;
use crate::mem::{table, Mem};
use crate::pte::{self, RW};

/// A shadow leaf found by [`ShadowMmu::debug_translate`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowLeaf {
    /// Guest-physical address of the shadow leaf slot (inside the pool).
    pub slot_gpa: u64,
    /// Its value.
    pub value: u64,
    /// AND of RW over the walk (non-leaf entries included).
    pub writable: bool,
    /// AND of US over the walk.
    pub user: bool,
}

impl ShadowMmu {
    /// Walks `va` through `vcpu`'s shadow like the CPU would (reading pool memory).
    #[doc(hidden)]
    pub fn debug_translate<M: GuestMemory>(
        &self,
        mem: &M,
        vcpu: usize,
        va: u64,
    ) -> Option<ShadowLeaf> {
        let mem = &Mem::new(mem);
        let root = self.loaded_root(vcpu)?.shadow_root;
        let mut t = root >> 12;
        let (mut w, mut u) = (true, true);
        for level in (1..=4u8).rev() {
            let idx = ((va >> (12 + 9 * (u32::from(level) - 1))) & 511) as usize;
            self.pool.index_of(t << 12)?;
            let e = table(mem, t).ok()?.get(idx);
            if !pte::present(e) {
                return None;
            }
            w &= e & RW != 0;
            u &= e & pte::US != 0;
            if level == 1 {
                return Some(ShadowLeaf {
                    slot_gpa: (t << 12) + 8 * idx as u64,
                    value: e,
                    writable: w,
                    user: u,
                });
            }
            t = pte::pfn_of(e);
        }
        None
    }

    /// Guest-physical addresses of every present shadow leaf slot in the pool.
    #[doc(hidden)]
    pub fn debug_shadow_leaf_slots<M: GuestMemory>(&self, mem: &M) -> Vec<u64> {
        let mem = &Mem::new(mem);
        let mut out = Vec::new();
        for (idx, m) in self.pool.used_frames() {
            if m.owner.level() != 1 {
                continue;
            }
            if let Ok(st) = table(mem, self.pool.pfn(idx)) {
                for i in 0..512 {
                    if pte::present(st.get(i)) {
                        out.push((self.pool.pfn(idx) << 12) + 8 * i as u64);
                    }
                }
            }
        }
        out
    }

    /// Turns the straight-line path of common L1 leaf updates on (the default) or off, so
    /// a differential test can run the general path alone against the same ops.
    #[doc(hidden)]
    pub fn set_fast_path(&mut self, on: bool) {
        self.fast_path = on;
    }

    /// How many `PT_UPDATE`s the straight-line path applied.
    #[doc(hidden)]
    pub fn debug_fast_path_hits(&self) -> u64 {
        self.fast_hits
    }

    /// Never marks a host-resync chunk stale: the resync's targeting switched off, for the
    /// model test that must catch it.
    #[doc(hidden)]
    pub fn set_debug_skip_resync_marks(&mut self, on: bool) {
        self.pool.skip_stale_marks = on;
    }

    /// A freed shadow the CPU used is not marked stale when it is freed (only when its
    /// frame is reused): the kernel flush's cover of dropped shadows switched off, for the
    /// model test that must catch it.
    #[doc(hidden)]
    pub fn set_debug_skip_drop_marks(&mut self, on: bool) {
        self.pool.stale_on_drop = !on;
    }

    /// A guest's own remote `INVLPG` / `FLUSH_TLB` counts as naming a pool frame: the
    /// kernel flush may then take it with a zap of unrelated frames. The frameless check
    /// switched off, for the model test that must catch it.
    #[doc(hidden)]
    pub fn set_debug_guest_flush_framed(&mut self, on: bool) {
        self.pending.debug_all_framed = on;
    }

    /// Every flush counts as covered by a leaf zap (the leaf zap's coverage check switched
    /// off, for the model test that expects the failure).
    #[doc(hidden)]
    pub fn set_debug_zap_covers_all(&mut self, on: bool) {
        self.pending.debug_all_covered = on;
    }

    /// A detached root's shadow is freed like any other, cleared and reusable, although a
    /// vCPU still runs on it until its root switch (the mechanism switched off, for the
    /// tests that must catch it).
    #[doc(hidden)]
    pub fn set_debug_clear_detached(&mut self, on: bool) {
        self.debug_clear_detached = on;
    }

    /// Test only: no change makes a lazy root switch eager (the mechanism that keeps the
    /// freed root a vCPU runs on equal to its kernel root switched off, for the tests that
    /// must catch it).
    #[doc(hidden)]
    pub fn set_debug_lazy_unforced(&mut self, on: bool) {
        self.debug_lazy_unforced = on;
    }

    /// Whether pool frame `idx` holds a shadow now (not free or freed).
    #[doc(hidden)]
    pub fn debug_pool_frame_used(&self, idx: u32) -> bool {
        self.pool.meta(idx).is_some()
    }
}
