//! The ioctl request numbers the filters allow. kvm-ioctls keeps its numbers private, so they
//! are derived here the same way (vmm-sys-util's `_IOC` macros over `kvm_bindings::KVMIO` and
//! the argument structs from kvm-bindings): only the command byte comes from `<linux/kvm.h>`.

#![allow(missing_docs)]

use kvm_bindings::{
    kvm_dirty_log, kvm_msrs, kvm_regs, kvm_sregs, kvm_userspace_memory_region, KVMIO,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_kernel_abi() {
        // The values <linux/kvm.h> expands to on x86_64 (direction, size, type, command).
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_SET_SREGS(), 0x4138_ae84);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(KVM_SET_MSRS(), 0x4008_ae89);
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
    }
}
