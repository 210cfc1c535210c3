//! [`Batch`]: the entries of one `MMU_BATCH` applied against one memory object, so the host
//! mapping of each guest memory region is looked up once per batch instead of twice per
//! entry.

use hypercall::{HcError, MmuOp};
use vm_memory::GuestMemory;

use crate::engine::ShadowMmu;
use crate::mem::Mem;

/// A batch in progress ([`ShadowMmu::batch`]): applies entries exactly like
/// [`ShadowMmu::apply`], remembering the host mappings of the regions it resolved while
/// the memory object is borrowed. End the batch with [`ShadowMmu::end_batch`] once this
/// is dropped.
pub struct Batch<'e, 'm, M> {
    mmu: &'e mut ShadowMmu,
    mem: Mem<'m, M>,
}

impl ShadowMmu {
    /// Starts applying the entries of a batch against `mem` (see [`Batch`]).
    pub fn batch<'e, 'm, M: GuestMemory>(&'e mut self, mem: &'m M) -> Batch<'e, 'm, M> {
        Batch {
            mmu: self,
            mem: Mem::remembering(mem),
        }
    }
}

impl<M: GuestMemory> Batch<'_, '_, M> {
    /// Applies one decoded entry for `vcpu`: [`ShadowMmu::apply`].
    #[inline]
    pub fn apply(&mut self, vcpu: usize, op: &MmuOp) -> Result<(), HcError> {
        if let MmuOp::PtUpdate {
            ptr,
            val,
            preserve_ad,
        } = *op
        {
            if self
                .mmu
                .pt_update_fast_op(&self.mem, vcpu, ptr, val, preserve_ad)
            {
                return Ok(());
            }
        }
        self.mmu.apply_in(&self.mem, vcpu, op)
    }

    /// The engine (e.g. for its counters) while the batch is in progress.
    pub fn engine(&self) -> &ShadowMmu {
        self.mmu
    }
}
