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

/// Most memslots the shadow pool is split into (each a unit of the host resync).
pub const POOL_CHUNKS_MAX: u64 = 64;

/// `KVM_CAP_DISABLE_QUIRKS2` (not in kvm-bindings' x86 constants).
const KVM_CAP_DISABLE_QUIRKS2: u32 = 213;
/// `KVM_X86_QUIRK_SLOT_ZAP_ALL`: deleting any memslot zaps every shadow page of the VM.
/// Disabled, KVM zaps only what the deleted slot backs (the shadow pages of page tables
/// in it, its leaf mappings), so re-registering one pool chunk costs one chunk.
const KVM_X86_QUIRK_SLOT_ZAP_ALL: u64 = 1 << 7;

/// Turns KVM's zap-everything-on-memslot-delete quirk off where it can be; false where
/// the quirk stays (a delete then zaps the whole VM's shadow pages, whatever the slot).
fn disable_slot_zap_all(vm: &VmFd) -> bool {
    let supported = vm.check_extension_raw(u64::from(KVM_CAP_DISABLE_QUIRKS2));
    if supported <= 0 || supported as u64 & KVM_X86_QUIRK_SLOT_ZAP_ALL == 0 {
        return false;
    }
    let cap = kvm_bindings::kvm_enable_cap {
        cap: KVM_CAP_DISABLE_QUIRKS2,
        args: [KVM_X86_QUIRK_SLOT_ZAP_ALL, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| log::debug!("KVM_X86_QUIRK_SLOT_ZAP_ALL stays: {e}"))
        .is_ok()
}

/// Pool frames per memslot chunk for a pool of `frames` frames: a power of two (the
/// engine's chunk of a frame is a shift), at most [`POOL_CHUNKS_MAX`] chunks where KVM can
/// delete one slot without zapping every other (`targeted`), else one chunk covering the
/// pool (re-registering any slot then costs the whole VM's shadow pages anyway).
pub fn pool_chunk_frames(frames: u64, targeted: bool) -> u64 {
    let per = if targeted {
        frames.div_ceil(POOL_CHUNKS_MAX)
    } else {
        frames
    };
    per.max(1).next_power_of_two()
}

/// Registers every RAM region of `mem` as a memslot and the shadow pool (its last region)
/// as chunks of memslots; returns the pool's slots and the first memslot number left free.
pub fn register(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
) -> Result<(Option<PoolSlot>, u32), SetupError> {
    let phys = mem
        .physical_memory()
        .ok_or_else(|| SetupError::other("guest memory", "no physical memory"))?;
    let regions: Vec<_> = phys.iter().collect();
    let Some((pool, ram)) = regions.split_last() else {
        return Ok((None, 0));
    };
    let mut slot = 0u32;
    for r in ram {
        add_slot(vm, slot, r.start_addr().0, r.len(), r.as_ptr() as u64)?;
        slot += 1;
    }
    let targeted = disable_slot_zap_all(vm);
    let chunk = pool_chunk_frames(pool.len() / 4096, targeted) * 4096;
    let mut chunks = Vec::new();
    let mut off = 0;
    while off < pool.len() {
        let len = chunk.min(pool.len() - off);
        let host = pool.as_ptr() as u64 + off;
        chunks.push(add_slot(vm, slot, pool.start_addr().0 + off, len, host)?);
        slot += 1;
        off += len;
    }
    log::debug!(
        "shadow pool: {} memslot(s) of {chunk:#x} bytes, resync {}",
        chunks.len(),
        if targeted {
            "per chunk"
        } else {
            "zaps every shadow page (KVM quirk)"
        }
    );
    let pool = PoolSlot {
        vm: vm.clone(),
        chunks,
        chunk_frames: (chunk / 4096) as u32,
        targeted,
    };
    Ok((Some(pool), slot))
}

/// Registers one memslot.
fn add_slot(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    len: u64,
    host: u64,
) -> Result<kvm_userspace_memory_region, SetupError> {
    let region = kvm_userspace_memory_region {
        slot,
        guest_phys_addr: gpa,
        memory_size: len,
        userspace_addr: host,
        flags: 0,
    };
    // SAFETY: the mapping belongs to guest memory, which lives as long as the VM.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| SetupError::kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    Ok(region)
}

/// The shadow pool's memslots (chunks). Re-registering one makes KVM drop every
/// translation it cached from the pool page tables in it: on hosts that shadow guest page
/// tables in software, writes the VMM makes to the pool from userspace are otherwise
/// invisible to KVM.
pub struct PoolSlot {
    vm: Arc<VmFd>,
    chunks: Vec<kvm_userspace_memory_region>,
    chunk_frames: u32,
    /// Deleting one chunk zaps only its own shadow pages (KVM's zap-all quirk is off).
    targeted: bool,
}

impl PoolSlot {
    /// Pool frames per chunk (the engine's resync granule).
    pub fn chunk_frames(&self) -> u32 {
        self.chunk_frames
    }

    /// Chunks in all.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Makes KVM forget what it cached from the pool frames of `stale` (chunk indices);
    /// returns the chunks now clean: `stale` itself, or every chunk where deleting any
    /// slot zaps the whole VM (then one re-registration does).
    pub fn resync(&self, stale: &[u32]) -> Result<Vec<u32>, MemoryError> {
        if !self.targeted {
            if let Some(first) = self.chunks.first() {
                self.reregister(first)?;
            }
            return Ok((0..self.chunks.len() as u32).collect());
        }
        for &c in stale {
            if let Some(r) = self.chunks.get(c as usize) {
                self.reregister(r)?;
            }
        }
        Ok(stale.to_vec())
    }

    /// Deletes and re-adds one chunk's memslot.
    fn reregister(&self, region: &kvm_userspace_memory_region) -> Result<(), MemoryError> {
        let gone = kvm_userspace_memory_region {
            memory_size: 0,
            ..*region
        };
        // SAFETY: same slot and backing as registered at setup; the mapping outlives the VM.
        unsafe { self.vm.set_user_memory_region(gone) }.map_err(|source| MemoryError::Slot {
            what: "deleting",
            source,
        })?;
        // SAFETY: as above.
        unsafe { self.vm.set_user_memory_region(*region) }.map_err(|source| MemoryError::Slot {
            what: "re-adding",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_chunks_are_at_most_the_maximum_and_cover_the_pool() {
        assert_eq!(pool_chunk_frames(8192, true), 128);
        assert_eq!(pool_chunk_frames(8192, false), 8192);
        assert_eq!(
            pool_chunk_frames(3000, false),
            4096,
            "one chunk, a power of two"
        );
        assert_eq!(pool_chunk_frames(100, true), 2);
        assert_eq!(pool_chunk_frames(1, true), 1);
        for frames in [1, 63, 64, 65, 8192, 1 << 24] {
            let c = pool_chunk_frames(frames, true);
            assert!(frames.div_ceil(c) <= POOL_CHUNKS_MAX, "{frames}");
            assert!(c.is_power_of_two(), "{frames}");
        }
    }
}
