//! The read-only alias of guest RAM: every RAM region is registered a second time, at
//! `base + gpa`, as a `KVM_MEM_READONLY` memslot over the same host memory. Shadow leaves
//! that map a page table writable point there: reads run at full speed, stores exit as
//! `KVM_EXIT_MMIO` with their address and data ([`Alias::decode`]).

use crate::error::SetupError;
use crate::layout::Layout;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Alignment of the alias base.
pub const ALIAS_ALIGN: u64 = 1 << 30;

/// Where the alias lives: `base + gpa` for every `gpa` in `0..len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alias {
    /// Guest-physical base (above RAM and the shadow pool, 1 GiB aligned).
    pub base: u64,
    /// Bytes covered (the top of RAM).
    pub len: u64,
}

/// One trapped store, decoded: the RAM address it was aimed at and its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrappedStore<'a> {
    /// RAM guest-physical address (alias address minus the base).
    pub gpa: u64,
    /// The 1..=8 stored bytes.
    pub data: &'a [u8],
}

impl Alias {
    /// The alias for `layout`: the first 1 GiB boundary above RAM and the pool.
    pub fn for_layout(layout: &Layout) -> Alias {
        let ram_top = layout
            .ram_regions
            .iter()
            .map(|&(s, l)| s + l)
            .max()
            .unwrap_or(0);
        let top = ram_top.max(layout.pool_base + layout.pool_size);
        Alias {
            base: top.div_ceil(ALIAS_ALIGN) * ALIAS_ALIGN,
            len: ram_top,
        }
    }

    /// Decodes an MMIO write exit at `addr`: `Some` if it is a store through the alias
    /// (1..=8 bytes, inside it), `None` for any other MMIO (the device bus gets it).
    pub fn decode<'a>(&self, addr: u64, data: &'a [u8]) -> Option<TrappedStore<'a>> {
        let gpa = addr.checked_sub(self.base)?;
        let end = gpa.checked_add(data.len() as u64)?;
        if data.is_empty() || data.len() > 8 || end > self.len {
            return None;
        }
        Some(TrappedStore { gpa, data })
    }

    /// Registers the alias of every RAM region of `mem` below `len` (the pool is not
    /// aliased) as read-only memslots numbered from `first_slot`.
    pub fn register(
        &self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        first_slot: u32,
    ) -> Result<(), SetupError> {
        let phys = mem
            .physical_memory()
            .ok_or_else(|| SetupError::other("guest memory", "no physical memory"))?;
        let ram = phys.iter().filter(|r| r.start_addr().0 < self.len);
        for (slot, r) in (first_slot..).zip(ram) {
            let region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: self.base + r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                flags: KVM_MEM_READONLY,
            };
            // SAFETY: the mapping belongs to `mem`, which lives as long as the VM; KVM
            // only reads through a read-only slot.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|e| SetupError::kvm("KVM_SET_USER_MEMORY_REGION (read-only alias)", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alias_lies_above_ram_and_pool() {
        let l = Layout::new(256 << 20, 32 << 20).unwrap();
        let a = Alias::for_layout(&l);
        assert_eq!(
            a,
            Alias {
                base: 1 << 30,
                len: 256 << 20
            }
        );
        let l = Layout::new(5 << 30, 64 << 20).unwrap();
        let a = Alias::for_layout(&l);
        assert!(a.base >= l.pool_base + l.pool_size && a.base.is_multiple_of(ALIAS_ALIGN));
        assert_eq!(a.len, (6 << 30), "RAM continues above the 4 GiB boundary");
    }

    #[test]
    fn only_stores_through_the_alias_decode() {
        let a = Alias {
            base: 1 << 30,
            len: 16 << 20,
        };
        let d = 7u64.to_le_bytes();
        assert_eq!(
            a.decode((1 << 30) + 0x2008, &d),
            Some(TrappedStore {
                gpa: 0x2008,
                data: &d
            })
        );
        assert_eq!(a.decode(0x2008, &d), None, "below the alias: a device");
        assert_eq!(
            a.decode((1 << 30) + (16 << 20) - 4, &d),
            None,
            "past RAM's end"
        );
        assert_eq!(a.decode((1 << 30) + 8, &[]), None);
        assert_eq!(a.decode((1 << 30) + 8, &[0; 9]), None);
        assert_eq!(a.decode(u64::MAX - 2, &d), None);
    }
}
