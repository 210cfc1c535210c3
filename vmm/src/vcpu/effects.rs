//! Applying a hypercall's effects on a vCPU (the caller, or a target of a remote delivery):
//! the guest's exit and a CR3 load or flush through `KVM_SET_SREGS`. The CR3 decision itself
//! is a pure function ([`next_cr3`]). Host resyncs and remote deliveries are `vcpu::smp`'s.

use super::end::VcpuEnd;
use crate::hcall::Effects;
use crate::memory::MemoryError;
use crate::stats::VcpuStats;
use kvm_ioctls::VcpuFd;
use std::time::Instant;

/// CR3 bit toggled to force KVM to drop cached translations (PWT; harmless for RAM).
pub const CR3_FLUSH_TOGGLE: u64 = 1 << 3;

/// Applying effects failed.
#[derive(Debug, thiserror::Error)]
pub enum EffectError {
    /// A register ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Its error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Re-registering the pool memslot failed.
    #[error(transparent)]
    Resync(#[from] MemoryError),
}

/// The CR3 to load after a batch, given the current CR3, the requested root and whether a
/// flush is still needed (not already done by a resync); `None` leaves CR3 alone.
pub fn next_cr3(current: u64, new_root: Option<u64>, flush: bool) -> Option<u64> {
    match new_root {
        // Loading a different root flushes by itself; reloading the same root with a flush
        // pending must still change CR3 for KVM to drop cached translations.
        Some(cr3) if !(flush && current & !CR3_FLUSH_TOGGLE == cr3) => Some(cr3),
        Some(_) => Some(current ^ CR3_FLUSH_TOGGLE),
        None if flush => Some(current ^ CR3_FLUSH_TOGGLE),
        None => None,
    }
}

/// Applies `fx` on `fd`; returns the end reason when the guest asked to exit. `covered`: a
/// host resync after the batch already dropped every translation (the flush is done).
///
/// A flush is one `KVM_SET_SREGS` with a changed CR3: KVM then resets the vCPU's MMU
/// context and flushes the guest's TLB as a whole (`KVM_REQ_TLB_FLUSH_GUEST`, the
/// equivalent of a CR4.PGE toggle, global translations included), so no CR4 toggle (a
/// second ioctl) is needed.
pub fn apply(
    fd: &VcpuFd,
    fx: &Effects,
    covered: bool,
    stats: &mut VcpuStats,
) -> Result<Option<VcpuEnd>, EffectError> {
    if let Some(v) = &fx.violation {
        return Ok(Some(VcpuEnd::ShadowInvariant(v.clone())));
    }
    if let Some(code) = fx.exit {
        return Ok(Some(VcpuEnd::GuestExit(code)));
    }
    let flush = fx.flush && !covered;
    if fx.new_cr3.is_none() && !flush {
        return Ok(None);
    }
    let t = Instant::now();
    let kvm = |what| move |source| EffectError::Kvm { what, source };
    let mut s = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    if let Some(cr3) = next_cr3(s.cr3, fx.new_cr3, flush) {
        s.cr3 = cr3;
        fd.set_sregs(&s).map_err(kvm("KVM_SET_SREGS"))?;
    }
    let name = if fx.new_cr3.is_some() {
        "cr3_load"
    } else {
        "tlb_flush_cr3"
    };
    stats.effect(name, t.elapsed().as_nanos() as u64);
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cr3_loads_and_toggles() {
        let t = CR3_FLUSH_TOGGLE;
        assert_eq!(next_cr3(0x1000, None, false), None);
        assert_eq!(next_cr3(0x1000, None, true), Some(0x1000 | t));
        assert_eq!(next_cr3(0x1000 | t, None, true), Some(0x1000));
        assert_eq!(next_cr3(0x1000, Some(0x2000), false), Some(0x2000));
        assert_eq!(next_cr3(0x1000, Some(0x2000), true), Some(0x2000));
        // Same root with a flush pending: the toggle, or KVM keeps its translations.
        assert_eq!(next_cr3(0x2000, Some(0x2000), true), Some(0x2000 | t));
        assert_eq!(next_cr3(0x2000 | t, Some(0x2000), true), Some(0x2000));
        assert_eq!(next_cr3(0x2000, Some(0x2000), false), Some(0x2000));
    }
}
