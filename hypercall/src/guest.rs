//! Guest side of the ABI: discovery through CPUID and issuing hypercalls.
//!
//! The caller owns one 64-byte-aligned (page-aligned for `vmcall`) [`RequestHeader`] per
//! vCPU and tells the transport its guest-physical address.

use crate::abi::{RequestHeader, STATUS_PENDING};
use crate::discovery::{
    CpuidLeaves, Discovery, Transport, CPUID_LEAF_FEATURES, CPUID_LEAF_SIGNATURE,
    STATUS_PORT_OFFSET, VMCALL_NR,
};
use core::arch::asm;
use core::arch::x86_64::__cpuid;

/// Reads the hypervisor leaves; `None` when no pvmm signature is present (run natively).
pub fn discover() -> Option<Discovery> {
    let (s, f) = (__cpuid(CPUID_LEAF_SIGNATURE), __cpuid(CPUID_LEAF_FEATURES));
    CpuidLeaves::parse([s.eax, s.ebx, s.ecx, s.edx], [f.eax, f.ebx, f.ecx, f.edx])
}

/// True on AMD CPUs, which use `vmmcall` instead of `vmcall`.
fn is_amd() -> bool {
    let l = __cpuid(0);
    l.ebx == u32::from_le_bytes(*b"Auth")
}

/// A negotiated transport, ready to issue hypercalls.
#[derive(Clone, Copy, Debug)]
pub struct Hypercall {
    transport: Transport,
    port: u16,
    amd: bool,
}

impl Hypercall {
    /// Builds the caller for what discovery reported.
    pub fn new(d: &Discovery) -> Hypercall {
        Hypercall {
            transport: d.transport,
            port: d.port,
            amd: is_amd(),
        }
    }

    /// The transport in use.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Issues the request in `req`, whose guest-physical address is `req_gpa`, and returns
    /// its status (0 or a negative [`crate::HcError`] code).
    ///
    /// # Safety
    /// `req` must point to a valid request block at guest-physical `req_gpa`, 64-byte
    /// aligned (page aligned for `vmcall`), below 4 GiB for `pio`.
    pub unsafe fn call(&self, req: *mut RequestHeader, req_gpa: u64) -> i64 {
        let status = core::ptr::addr_of_mut!((*req).status);
        status.write_volatile(STATUS_PENDING);
        match self.transport {
            Transport::Pio => {
                asm!("out dx, eax", in("dx") self.port, in("eax") req_gpa as u32,
                     options(nostack, preserves_flags));
                let s = status.read_volatile();
                if s != STATUS_PENDING {
                    return s;
                }
                // The VMM could not write the block: ask the status register.
                let v: u32;
                asm!("in eax, dx", in("dx") self.port + STATUS_PORT_OFFSET, out("eax") v,
                     options(nostack, preserves_flags));
                v as i32 as i64
            }
            Transport::Vmcall => {
                let ret: u64;
                if self.amd {
                    asm!("push rbx", "mov rbx, {gpa}", "vmmcall", "pop rbx", gpa = in(reg) req_gpa,
                         inout("rax") VMCALL_NR => ret, in("rcx") 1u64, in("rdx") 0u64);
                } else {
                    asm!("push rbx", "mov rbx, {gpa}", "vmcall", "pop rbx", gpa = in(reg) req_gpa,
                         inout("rax") VMCALL_NR => ret, in("rcx") 1u64, in("rdx") 0u64);
                }
                let s = status.read_volatile();
                if s != STATUS_PENDING {
                    s
                } else {
                    ret as i64
                }
            }
            Transport::None => crate::HcError::Enosys.status(),
        }
    }
}
