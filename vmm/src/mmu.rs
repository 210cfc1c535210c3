//! Connects the shadow page-table engine to the MMU_BATCH hypercall (ENOSYS until wired).

use crate::guest_ram::GuestRam;
use crate::hcall::ops::OpHandler;
use crate::layout::Layout;

/// Builds the MMU_BATCH handler for a VM (none yet: MMU_BATCH answers ENOSYS).
pub fn factory(_ram: &GuestRam, _layout: &Layout, _vcpus: usize) -> Option<Box<dyn OpHandler>> {
    None
}
