//! Guest memory and its KVM memslots: allocation from the layout, registration, and the
//! shadow pool's slot, which can be re-registered to make KVM forget pool translations.

use crate::error::SetupError;
use crate::layout::Layout;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::sync::Arc;
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// A memslot operation failed while the VM was running.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("{what} the shadow-pool memslot: {source}")]
    Slot {
        /// "deleting" or "re-adding".
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Allocates guest RAM (every region of `layout`) followed by the shadow pool.
pub fn allocate(layout: &Layout) -> Result<GuestMemoryMmap, SetupError> {
    let mut ranges: Vec<(GuestAddress, usize)> = layout
        .ram_regions
        .iter()
        .map(|&(s, l)| (GuestAddress(s), l as usize))
        .collect();
    ranges.push((GuestAddress(layout.pool_base), layout.pool_size as usize));
    GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|e| SetupError::other("allocating guest memory", e))
}

/// The part of the shadow pool backed with host pages before the guest starts.
pub const POOL_PREFAULT_MAX: u64 = 64 << 20;

/// Backs the start of the shadow pool (the engine hands out its frames from the bottom up),
/// up to [`POOL_PREFAULT_MAX`], with host pages now, so that MMU batches do not pay a host
/// page fault for the first write into each pool frame. Best effort: `MADV_POPULATE_WRITE`
/// (Linux 5.14), else nothing (the pages then fault in on first use, as before).
pub fn prefault_pool(mem: &GuestMemoryMmap, layout: &Layout) {
    let len = layout.pool_size.min(POOL_PREFAULT_MAX) as usize;
    let Some(host) = mem.get_host_address(GuestAddress(layout.pool_base)).ok() else {
        return;
    };
    // SAFETY: `host .. host + len` lies inside the pool's anonymous mapping (the pool is one
    // region of `len` or more bytes at `pool_base`), which `mem` owns; populating pages does
    // not change their contents (fresh anonymous pages are zero either way).
    let r = unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) };
    if r != 0 {
        log::debug!(
            "shadow pool not prefaulted: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Registers every region of `mem` as a memslot; returns the last one (the shadow pool).
pub fn register(vm: &Arc<VmFd>, mem: &GuestMemoryMmap) -> Result<Option<PoolSlot>, SetupError> {
    let mut last = None;
    let phys = mem
        .physical_memory()
        .ok_or_else(|| SetupError::other("guest memory", "no physical memory"))?;
    for (slot, r) in phys.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the mapping belongs to `mem`, which lives as long as the VM.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| SetupError::kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        last = Some(region);
    }
    Ok(last.map(|region| PoolSlot {
        vm: vm.clone(),
        region,
    }))
}

/// The shadow pool's memslot. Re-registering it makes KVM drop every translation it cached
/// from pool page tables: on hosts that shadow guest page tables in software, writes the VMM
/// makes to the pool from userspace are otherwise invisible to KVM.
pub struct PoolSlot {
    vm: Arc<VmFd>,
    region: kvm_userspace_memory_region,
}

impl PoolSlot {
    /// Deletes and re-adds the pool memslot.
    pub fn resync(&self) -> Result<(), MemoryError> {
        let gone = kvm_userspace_memory_region {
            memory_size: 0,
            ..self.region
        };
        // SAFETY: same slot and backing as registered at setup; the mapping outlives the VM.
        unsafe { self.vm.set_user_memory_region(gone) }.map_err(|source| MemoryError::Slot {
            what: "deleting",
            source,
        })?;
        // SAFETY: as above.
        unsafe { self.vm.set_user_memory_region(self.region) }.map_err(|source| MemoryError::Slot {
            what: "re-adding",
            source,
        })
    }
}
