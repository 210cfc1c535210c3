//! Which kernel flush (docs/pv-abi.md §6.5) a VM gets: none (kicks), the dirty-log trigger
//! or the protection-key zap, from `--remote-flush`, `--kernel-flush-trigger` and the host.

use crate::cli::{KernelFlushTrigger, RemoteFlush};
use crate::dirty_flush::{self, DirtyLogFlush};
use crate::error::SetupError;
use crate::hcall::PoolZap;
use crate::layout::Layout;
use crate::ptwrite::alias::{Alias, ALIAS_ALIGN};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::sync::Arc;
use vm_memory::GuestMemoryMmap;

/// The kernel flush chosen for a VM.
pub struct KernelFlush {
    /// What the MMU handler calls.
    pub zap: Box<dyn PoolZap>,
    /// The dirty-log trigger, which needs the vCPU fds once they exist ([`attach`]).
    pub dirty_log: Option<Arc<DirtyLogFlush>>,
}

/// Hands the dirty-log trigger `flush` the vCPUs' fds (index order).
pub fn attach(flush: &DirtyLogFlush, vcpus: &[&VcpuFd]) -> Result<(), SetupError> {
    flush
        .attach(vcpus)
        .map_err(|e| SetupError::other("the dirty-log flush's vCPU fds", e))
}

/// The kernel flush for `mode` and `trigger`, or `None` for kicks. `kernel` needs a host
/// that needs no pool resync (`resync_needed` false: on a host that shadows the pool in
/// software, no flush makes KVM re-read the pool, only the resync does). Before any vCPU
/// thread exists (the pkey zap's access rights).
pub fn choose(
    mode: RemoteFlush,
    trigger: KernelFlushTrigger,
    resync_needed: bool,
    kvm: &Kvm,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    layout: &Layout,
) -> Result<Option<KernelFlush>, SetupError> {
    if mode == RemoteFlush::Kick || (mode == RemoteFlush::Auto && resync_needed) {
        return Ok(None);
    }
    if resync_needed {
        return Err(SetupError::other(
            "--remote-flush kernel",
            "this host needs the pool resync (it shadows the pool in software), \
             which a kernel flush does not replace",
        ));
    }
    if trigger != KernelFlushTrigger::Pkey {
        match dirty_log(kvm, vm, layout) {
            Ok(d) => {
                return Ok(Some(KernelFlush {
                    zap: Box::new(d.clone()),
                    dirty_log: Some(d),
                }))
            }
            Err(e) if trigger == KernelFlushTrigger::Auto => {
                log::info!("no dirty-log flush ({e}); trying protection keys");
            }
            Err(e) => return Err(SetupError::other("--kernel-flush-trigger dirty-log", e)),
        }
    }
    let pkey = crate::pool_zap::choose(mode, mem, layout)?;
    Ok(pkey.map(|z| KernelFlush {
        zap: Box::new(z),
        dirty_log: None,
    }))
}

/// The dirty-log trigger, where its probe passes: its page a 1 GiB step above the RAM
/// alias (so above RAM and the pool too), in the last memslot number.
fn dirty_log(kvm: &Kvm, vm: &Arc<VmFd>, layout: &Layout) -> std::io::Result<Arc<DirtyLogFlush>> {
    dirty_flush::probe(kvm)?;
    let alias = Alias::for_layout(layout);
    let gpa = (alias.base + alias.len).div_ceil(ALIAS_ALIGN) * ALIAS_ALIGN;
    let slot = u32::try_from(kvm.get_nr_memslots().saturating_sub(1)).unwrap_or(u32::MAX >> 16);
    Ok(Arc::new(DirtyLogFlush::new(vm.clone(), slot, gpa)?))
}
