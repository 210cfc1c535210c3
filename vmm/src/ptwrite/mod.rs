//! Trapping the guest's stores to its page tables (`mmu=emulate` and `mmu=wrpt`, see
//! docs/pv-abi.md §11): a read-only memslot alias of guest RAM ([`alias`]), the start-up
//! probe that the trap works on this host ([`probe`]), and the KVM-free decoding of one
//! trapped store ([`decode`]).

pub mod alias;
pub mod probe;

pub use alias::{Alias, TrappedStore};

use crate::error::SetupError;
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestMemoryMmap;

/// Whether to offer the trap modes (`--pt-trap`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PtTrapMode {
    /// Probe the mechanism at start-up and offer the modes where it works.
    #[default]
    Auto,
    /// Never offer them (feature `PT_TRAP` clear).
    Off,
}

/// Sets up the trap for a VM: probes it (unless `mode` is off) and registers the read-only
/// alias of RAM after the VM's other memslots. `Ok(None)` when the modes are not offered;
/// the reason is logged.
pub fn setup(
    kvm: &Kvm,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    layout: &crate::layout::Layout,
    mode: PtTrapMode,
    first_slot: u32,
) -> Result<Option<Alias>, SetupError> {
    if mode == PtTrapMode::Off {
        return Ok(None);
    }
    if let Err(e) = probe::probe(kvm) {
        log::warn!("page-table write trap unavailable, mmu=emulate and mmu=wrpt refused: {e}");
        return Ok(None);
    }
    let alias = Alias::for_layout(layout);
    alias.register(vm, mem, first_slot)?;
    log::debug!("page-table write trap: alias at {:#x}", alias.base);
    Ok(Some(alias))
}

#[cfg(test)]
mod tests;
