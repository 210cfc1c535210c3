//! The `auto` transport probe: runs a throwaway VM whose only instruction of interest is a
//! `vmcall` of `KVM_HC_MAP_GPA_RANGE`, and picks `vmcall` only if a real
//! `KVM_EXIT_HYPERCALL` reaches userspace within a bounded time.

use crate::{cpu, kick};
use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_EXIT_HYPERCALL};
use kvm_ioctls::{Kvm, VcpuExit};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

/// What the probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeResult {
    /// True if `vmcall` exits to userspace here.
    pub vmcall_exits: bool,
    /// How long the probe took.
    pub elapsed: Duration,
}

/// How long the probe waits for the vmcall exit.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

const PROBE_MEM: usize = 2 << 20;
const CODE: u64 = 0x1000;

/// The probe could not run (treated as "vmcall does not exit").
#[derive(Debug, thiserror::Error)]
#[error("transport probe: {what}: {source}")]
pub struct ProbeError {
    what: &'static str,
    #[source]
    source: crate::error::BoxError,
}

fn fail<E: Into<crate::error::BoxError>>(what: &'static str) -> impl FnOnce(E) -> ProbeError {
    move |e| ProbeError {
        what,
        source: e.into(),
    }
}

/// Runs the probe on `kvm`. Errors mean "could not probe" (treated as no vmcall).
pub fn probe(kvm: &Kvm) -> Result<ProbeResult, ProbeError> {
    let start = Instant::now();
    kick::install().map_err(fail("installing the kick signal"))?;
    let vm = kvm.create_vm().map_err(fail("probe VM"))?;
    let cap = kvm_enable_cap {
        cap: KVM_CAP_EXIT_HYPERCALL,
        args: [1 << hypercall::VMCALL_NR, 0, 0, 0],
        ..Default::default()
    };
    if vm.enable_cap(&cap).is_err() {
        return Ok(ProbeResult {
            vmcall_exits: false,
            elapsed: start.elapsed(),
        });
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), PROBE_MEM)])
        .map_err(fail("probe memory"))?;
    let host = mem
        .physical_memory()
        .and_then(|p| p.iter().next())
        .map(|r| r.as_ptr() as u64)
        .ok_or_else(|| fail("probe memory")("no region"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: PROBE_MEM as u64,
        userspace_addr: host,
        flags: 0,
    };
    // SAFETY: the region is backed by `mem`, which outlives the VM (dropped after it).
    unsafe { vm.set_user_memory_region(region) }.map_err(fail("probe memslot"))?;
    cpu::write_boot_tables(&mem).map_err(fail("probe boot tables"))?;
    let vmcall: [u8; 3] = if is_amd() {
        [0x0f, 0x01, 0xd9]
    } else {
        [0x0f, 0x01, 0xc1]
    };
    // mov eax,12; mov ebx,0x2000; mov ecx,1; xor edx,edx; vmcall; hlt
    let mut code = vec![
        0xb8, 12, 0, 0, 0, 0xbb, 0, 0x20, 0, 0, 0xb9, 1, 0, 0, 0, 0x31, 0xd2,
    ];
    code.extend_from_slice(&vmcall);
    code.push(0xf4);
    mem.write_slice(&code, GuestAddress(CODE))
        .map_err(fail("probe code"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(fail("probe vCPU"))?;
    cpu::setup_long_mode(&vcpu, CODE).map_err(fail("probe registers"))?;

    let (tx, rx) = mpsc::channel();
    let runner = std::thread::Builder::new()
        .name("pvmm-probe".into())
        .spawn(move || {
            let r = match vcpu.run() {
                Ok(VcpuExit::Hypercall(h)) => h.nr == hypercall::VMCALL_NR,
                _ => false,
            };
            let _ = tx.send(r);
            drop(vcpu);
        })
        .map_err(fail("probe thread"))?;
    let vmcall_exits = match rx.recv_timeout(PROBE_TIMEOUT) {
        Ok(r) => r,
        Err(_) => loop {
            kick::kick(&runner);
            if let Ok(r) = rx.recv_timeout(Duration::from_millis(10)) {
                break r;
            }
        },
    };
    let _ = runner.join();
    drop(vm);
    drop(mem);
    Ok(ProbeResult {
        vmcall_exits,
        elapsed: start.elapsed(),
    })
}

fn is_amd() -> bool {
    let l = std::arch::x86_64::__cpuid(0);
    l.ebx == u32::from_le_bytes(*b"Auth")
}
