//! The kernel flush's dirty-log trigger (docs/pv-abi.md §6.5): makes KVM flush every vCPU's
//! TLB with two ioctls, changing no mapping.
//!
//! When `KVM_GET_DIRTY_LOG` finds a dirty page in a slot that logs them, KVM write-protects
//! what it mapped of it and then flushes every vCPU, whether or not anything was mapped (a
//! request each vCPU services before it enters the guest again, with an IPI to those in
//! guest mode that the kernel waits for). A one-page memslot of its own, which the guest is
//! never told about, is dirtied by KVM itself: the calling vCPU's `MSR_KVM_WALL_CLOCK_NEW`
//! is set to the page, and KVM writes the wall clock there at once, logging the write. The
//! fetch that follows finds the page dirty and flushes; the fetched bitmap says so, and a
//! clean one is an error (the caller then kicks).
//!
//! Only for hosts that need no pool resync (nested paging), like the zap it stands in for:
//! there a vCPU's translations live in its TLB and paging-structure caches, which the flush
//! drops. It costs no host page-table change, no host TLB shootdown and no refault of the
//! pool frames, which the protection-key zap ([`crate::pool_zap::PkeyZap`]) pays each time.

use crate::hcall::PoolZap;
use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, OnceLock};
use vm_memory::MmapRegion;

/// KVM's wall-clock MSR (`MSR_KVM_WALL_CLOCK_NEW`): a write makes KVM store the wall clock
/// at the guest-physical address written, at once.
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;

/// Bytes of the trigger's page.
const PAGE: usize = 4096;

/// The dirty-log trigger of one VM: its page and memslot, and each vCPU's fd.
pub struct DirtyLogFlush {
    vm: Arc<VmFd>,
    slot: u32,
    /// The page's host mapping, held only so that it lives as long as the memslot's use
    /// (vm-memory unmaps it on drop).
    _page: MmapRegion,
    /// `MSR_KVM_WALL_CLOCK_NEW` set to the page, built once: every flush sends it.
    msrs: Msrs,
    /// A duplicate of each vCPU's fd, set once the vCPUs exist: the MSR write goes to the
    /// calling vCPU, which is then out of `KVM_RUN` on its own thread.
    vcpus: OnceLock<Vec<OwnedFd>>,
}

impl DirtyLogFlush {
    /// Maps a page and registers it as memslot `slot` at `gpa`, logging dirty pages.
    pub fn new(vm: Arc<VmFd>, slot: u32, gpa: u64) -> io::Result<DirtyLogFlush> {
        let page = MmapRegion::new(PAGE).map_err(io::Error::other)?;
        let entry = kvm_msr_entry {
            index: MSR_KVM_WALL_CLOCK_NEW,
            data: gpa,
            ..Default::default()
        };
        let msrs = Msrs::from_entries(&[entry]).map_err(|e| io::Error::other(format!("{e:?}")))?;
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: PAGE as u64,
            userspace_addr: page.as_ptr() as u64,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
        };
        let flush = DirtyLogFlush {
            vm,
            slot,
            _page: page,
            msrs,
            vcpus: OnceLock::new(),
        };
        // SAFETY: the page stays mapped as long as this object, which owns the memslot's
        // lifetime in the VM: the slot is the VM's until the VM fd closes, and the object
        // lives in the MMU handler, dropped only after every vCPU thread ended.
        unsafe { flush.vm.set_user_memory_region(region) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        Ok(flush)
    }

    /// Keeps a duplicate of each vCPU's fd (index order). Once; later calls are refused.
    pub fn attach(&self, vcpus: &[&VcpuFd]) -> io::Result<()> {
        let fds = vcpus
            .iter()
            .map(|v| {
                // SAFETY: the vCPU's fd is open for the duration of this borrow; the clone
                // is a new fd of the same file, owned by this object.
                unsafe { BorrowedFd::borrow_raw(v.as_raw_fd()) }.try_clone_to_owned()
            })
            .collect::<io::Result<Vec<OwnedFd>>>()?;
        self.vcpus
            .set(fds)
            .map_err(|_| io::Error::other("dirty-log flush attached twice"))
    }

    /// Flushes every vCPU's TLB (before any runs guest code again). `vcpu` must be the
    /// calling thread's vCPU, out of `KVM_RUN`.
    pub fn flush(&self, vcpu: usize) -> io::Result<()> {
        let fd = self
            .vcpus
            .get()
            .and_then(|v| v.get(vcpu))
            .ok_or_else(|| io::Error::other("dirty-log flush: no such vCPU fd"))?;
        self.dirty_page(fd)?;
        let log = self
            .vm
            .get_dirty_log(self.slot, PAGE)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        if log.first().is_some_and(|w| w & 1 == 1) {
            Ok(())
        } else {
            Err(io::Error::other(
                "dirty-log flush: KVM's wall-clock write left the page clean",
            ))
        }
    }

    /// Makes KVM write the wall clock into the page through vCPU `fd`.
    fn dirty_page(&self, fd: &OwnedFd) -> io::Result<()> {
        // SAFETY: KVM_SET_MSRS reads a `kvm_msrs` header and its one entry, which
        // `self.msrs` holds for the duration of the call; `fd` is an open vCPU fd.
        let n = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(
                &fd.as_raw_fd(),
                crate::seccomp::ioctls::KVM_SET_MSRS(),
                self.msrs.as_fam_struct_ref(),
            )
        };
        match n {
            1 => Ok(()),
            n if n < 0 => Err(io::Error::last_os_error()),
            _ => Err(io::Error::other("KVM refused MSR_KVM_WALL_CLOCK_NEW")),
        }
    }
}

impl PoolZap for Arc<DirtyLogFlush> {
    fn zap(&self, vcpu: usize, _frames: &[u32]) -> io::Result<()> {
        self.flush(vcpu)
    }

    fn name(&self) -> &'static str {
        "dirty_log"
    }
}

/// Whether the dirty-log flush works on this host: in a throwaway VM, a vCPU's wall-clock
/// write must leave the trigger's page dirty in the log that `flush` reads.
pub fn probe(kvm: &Kvm) -> io::Result<()> {
    let err = |e: kvm_ioctls::Error| io::Error::from_raw_os_error(e.errno());
    let vm = Arc::new(kvm.create_vm().map_err(err)?);
    let vcpu = vm.create_vcpu(0).map_err(err)?;
    let flush = DirtyLogFlush::new(vm, 0, 1 << 30)?;
    flush.attach(&[&vcpu])?;
    flush.flush(0)?;
    // A second flush must find the page dirty again (the first fetch cleaned it).
    flush.flush(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_logs_its_wall_clock_write_and_the_fetch_cleans_it() {
        let kvm = match Kvm::new() {
            Ok(k) => k,
            Err(e) if std::env::var("REQUIRE_KVM").as_deref() != Ok("1") => {
                eprintln!("skipped: no /dev/kvm ({e})");
                return;
            }
            Err(e) => panic!("REQUIRE_KVM=1 but /dev/kvm: {e}"),
        };
        probe(&kvm).expect("the dirty-log flush works on this KVM");
        // A flush for a vCPU it was not given is refused, not guessed.
        let vm = Arc::new(kvm.create_vm().unwrap());
        let vcpu = vm.create_vcpu(0).unwrap();
        let flush = DirtyLogFlush::new(vm, 0, 1 << 30).unwrap();
        assert!(flush.flush(0).is_err(), "not attached yet");
        flush.attach(&[&vcpu]).unwrap();
        assert!(flush.attach(&[&vcpu]).is_err(), "attached once");
        assert!(flush.flush(1).is_err(), "no vCPU 1");
        flush.flush(0).unwrap();
        assert_eq!(
            flush.vm.get_dirty_log(0, PAGE).unwrap()[0],
            0,
            "the flush's fetch cleaned it"
        );
    }
}
