//! The straight-line `PT_UPDATE` of the common case: an entry of an L1 table that has a
//! shadow, where the old and the new guest entry are each not present or a 4 KiB leaf
//! (whitelisted bits), and the new leaf maps an untyped usable RAM frame. No frame gains or
//! loses a type and no shadow is built, so the effect is the general path's
//! (`ShadowMmu::pt_update`) for exactly these kinds, written out without the general
//! classification: one frame-word load for the table, one for the new target. Anything
//! else (including every refusal) is left to the general path, before any side effect.
//!
//! The old leaf's target is not looked up: the general path's effect for an old 4 KiB leaf
//! depends only on its frame number and the current shadow entry.

use vm_memory::GuestMemory;

use crate::counters::OpKind;
use crate::engine::ShadowMmu;
use crate::flush::{AvoidReason, FlushReason};
use crate::mem::{table, Mem};
use crate::pte::{self, AD, L1_ALLOWED, RW, SHADOW_LEAF_KEEP};

/// Whether `e` is not present or a present L1 entry passing the whitelist (which refuses
/// the address bits above MAXPHYADDR too).
#[inline(always)]
fn plain_l1(e: u64) -> bool {
    !pte::present(e) || e & !L1_ALLOWED == 0
}

impl ShadowMmu {
    /// The whole op `PT_UPDATE(ptr, val)` of `vcpu` if it is the fast case, counted as
    /// `apply` counts it; false, having changed nothing, otherwise (the caller then takes
    /// `apply`). The fast case allocates and frees no pool frame, so the pool counters
    /// `apply` refreshes after every op stay as they are.
    #[inline(always)]
    pub(crate) fn pt_update_fast_op<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        vcpu: usize,
        ptr: u64,
        val: u64,
        preserve_ad: bool,
    ) -> bool {
        if vcpu >= self.roots.len() {
            return false;
        }
        self.epoch += 1;
        if !self.pt_update_fast(mem, ptr, val, preserve_ad) {
            self.epoch -= 1;
            return false;
        }
        self.counters.count_op(OpKind::PtUpdate);
        self.counters.updates += 1;
        true
    }

    /// Applies `PT_UPDATE(ptr, val)` if it is the fast case (see the module); returns false,
    /// having changed nothing, otherwise.
    #[inline(always)]
    pub(crate) fn pt_update_fast<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        ptr: u64,
        val: u64,
        preserve_ad: bool,
    ) -> bool {
        if !self.fast_path {
            return false;
        }
        let tpfn = ptr >> 12;
        let i = ((ptr & 0xfff) >> 3) as usize;
        let Some((1, Some(sidx))) = self.frames.table(tpfn) else {
            return false;
        };
        let new_present = pte::present(val);
        let new_pfn = pte::pfn_of(val);
        if !plain_l1(val) || (new_present && !self.frames.is_untyped_ram(new_pfn)) {
            return false;
        }
        let Ok(gt) = table(mem, tpfn) else {
            return false;
        };
        let old = gt.get(i);
        if !plain_l1(old) {
            return false;
        }
        let old_present = pte::present(old);
        // Same entry modulo A/D: the shadow keeps what the CPU recorded.
        if old_present && new_present && (old ^ val) & !AD == 0 {
            gt.set(i, if preserve_ad { val | (old & AD) } else { val });
            self.fast_hits += 1;
            return true;
        }
        let Ok(st) = table(mem, self.pool.pfn(sidx)) else {
            return false;
        };
        self.pool.touch(sidx, self.epoch);
        let new_s = if new_present {
            val & SHADOW_LEAF_KEEP
        } else {
            0
        };
        let same_frame = old_present && new_present && pte::pfn_of(old) == new_pfn;
        let harvested =
            self.replace_l1_shadow((sidx, &st), tpfn, i, old_present, same_frame, new_s);
        let slot = sidx * 512 + i as u32;
        self.pool.rmap_remove(slot);
        if new_present && val & RW != 0 {
            self.pool.rmap_add(slot, new_pfn);
        }
        let (v, added) = pte::updated_guest_entry(val, old, preserve_ad, same_frame, harvested);
        self.count_propagated(added);
        gt.set(i, v);
        self.fast_hits += 1;
        true
    }

    /// Stores `new_s` in entry `i` of L1 shadow `st` (pool frame `sidx`, of guest table
    /// `tpfn`) in place of a 4 KiB leaf (`old_leaf`) or a not-present guest entry, with the
    /// general path's flush decision; returns the A/D harvested from the replaced entry.
    #[inline(always)]
    fn replace_l1_shadow(
        &mut self,
        (sidx, st): (u32, &crate::mem::Table<'_>),
        tpfn: u64,
        i: usize,
        old_leaf: bool,
        same_frame: bool,
        new_s: u64,
    ) -> u64 {
        if !old_leaf {
            let was = st.swap(i, new_s);
            if pte::present(was) {
                self.retire(sidx, tpfn, false, was, FlushReason::NonLeafChanged);
            }
            return 0;
        }
        let old_s = st.get(i);
        if pte::present(old_s) && pte::is_upgrade(old_s & !AD, new_s) {
            // Rights added on the same frame: keep the recorded A/D, no flush.
            let was = st.swap(i, new_s);
            st.set_bits(i, was & AD);
            self.avoid(AvoidReason::UpgradeOnly);
            return 0;
        }
        let was = st.replace(i, new_s, self.shared_walks);
        if pte::present(was) {
            let r = if same_frame {
                FlushReason::LeafDowngraded
            } else {
                FlushReason::LeafRemoved
            };
            self.retire(sidx, tpfn, true, was, r);
        }
        was & AD
    }
}
