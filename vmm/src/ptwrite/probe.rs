//! The start-up probe of the page-table write trap: a throwaway VM with one RAM slot and a
//! read-only (`KVM_MEM_READONLY`) alias of it runs three instructions at CPL0 in long mode:
//! a read through the alias (must not exit and must see RAM), a store through the alias
//! (must exit as `KVM_EXIT_MMIO` with the store's address and data, RAM unchanged), `hlt`.

use crate::{cpu, kick};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, Kvm, VcpuExit};
use std::sync::mpsc;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

const PROBE_MEM: usize = 2 << 20;
const CODE: u64 = 0x1000;
const DATA: u64 = 0x3000;
/// Where the probe's alias lives (inside the boot tables' identity map).
const ALIAS: u64 = 0x4000_0000;
const MAGIC: u64 = 0x5a5a_1234_8765_a5a5;
/// How long the probe waits for each exit.
const STEP_TIMEOUT: Duration = Duration::from_millis(500);

/// Why the trap does not work here (the mode is refused with this reason).
#[derive(Debug, thiserror::Error)]
pub enum TrapProbeError {
    /// KVM does not report `KVM_CAP_READONLY_MEM`.
    #[error("KVM does not report KVM_CAP_READONLY_MEM")]
    NoCapability,
    /// Setting up the probe VM failed.
    #[error("page-table write probe: {what}: {source}")]
    Setup {
        /// The step.
        what: &'static str,
        /// Its error.
        #[source]
        source: crate::error::BoxError,
    },
    /// The probe ran but the trap did not behave as required.
    #[error("a store to a read-only memslot {0}")]
    Behaviour(String),
}

fn setup<E: Into<crate::error::BoxError>>(what: &'static str) -> impl FnOnce(E) -> TrapProbeError {
    move |e| TrapProbeError::Setup {
        what,
        source: e.into(),
    }
}

/// What the probe vCPU saw: its first exit (address and data of an MMIO write, or a name).
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    MmioWrite(u64, Vec<u8>),
    Other(String),
}

/// The code: `mov rax, [ALIAS+DATA]; mov [ALIAS+DATA+8], rax; hlt`.
fn probe_code() -> Vec<u8> {
    let mut c = vec![0x48, 0x8b, 0x04, 0x25];
    c.extend_from_slice(&((ALIAS + DATA) as u32).to_le_bytes());
    c.extend_from_slice(&[0x48, 0x89, 0x04, 0x25]);
    c.extend_from_slice(&((ALIAS + DATA + 8) as u32).to_le_bytes());
    c.push(0xf4);
    c
}

/// Checks what the probe saw against what the trap must do.
fn judge(seen: &Seen, ram_after: u64) -> Result<(), TrapProbeError> {
    match seen {
        Seen::MmioWrite(addr, data) if *addr == ALIAS + DATA + 8 => {
            if data.as_slice() != MAGIC.to_le_bytes() {
                return Err(TrapProbeError::Behaviour(format!(
                    "exited with data {data:02x?}, not what the read through the alias returned"
                )));
            }
            if ram_after != 0 {
                return Err(TrapProbeError::Behaviour("reached RAM".into()));
            }
            Ok(())
        }
        Seen::MmioWrite(addr, _) => Err(TrapProbeError::Behaviour(format!(
            "exited as an MMIO write at {addr:#x}, not at {:#x}",
            ALIAS + DATA + 8
        ))),
        Seen::Other(s) => Err(TrapProbeError::Behaviour(format!(
            "did not exit as an MMIO write (first exit: {s})"
        ))),
    }
}

/// Runs the probe: `Ok` if stores to a read-only alias exit to userspace with their
/// address and data while reads through it see RAM without exiting.
pub fn probe(kvm: &Kvm) -> Result<(), TrapProbeError> {
    if !kvm.check_extension(Cap::ReadonlyMem) {
        return Err(TrapProbeError::NoCapability);
    }
    kick::install().map_err(setup("installing the kick signal"))?;
    let vm = kvm.create_vm().map_err(setup("probe VM"))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), PROBE_MEM)])
        .map_err(setup("probe memory"))?;
    let host = mem
        .physical_memory()
        .and_then(|p| p.iter().next())
        .map(|r| r.as_ptr() as u64)
        .ok_or_else(|| setup("probe memory")("no region"))?;
    for (slot, gpa, flags) in [(0, 0, 0), (1, ALIAS, KVM_MEM_READONLY)] {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: PROBE_MEM as u64,
            userspace_addr: host,
            flags,
        };
        // SAFETY: both slots are backed by `mem`, which outlives the VM (dropped after it).
        unsafe { vm.set_user_memory_region(region) }.map_err(setup("probe memslot"))?;
    }
    cpu::write_boot_tables(&mem).map_err(setup("probe boot tables"))?;
    mem.write_slice(&probe_code(), GuestAddress(CODE))
        .map_err(setup("probe code"))?;
    mem.write_obj(MAGIC, GuestAddress(DATA))
        .map_err(setup("probe data"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(setup("probe vCPU"))?;
    cpu::setup_long_mode(&vcpu, CODE).map_err(setup("probe registers"))?;
    let (tx, rx) = mpsc::channel();
    let runner = std::thread::Builder::new()
        .name("pvmm-probe".into())
        .spawn(move || {
            let seen = match vcpu.run() {
                Ok(VcpuExit::MmioWrite(a, d)) => Seen::MmioWrite(a, d.to_vec()),
                Ok(e) => Seen::Other(crate::vcpu::exit::exit_name(&e).into()),
                Err(e) => Seen::Other(format!("KVM_RUN: {e}")),
            };
            let _ = tx.send(seen);
        })
        .map_err(setup("probe thread"))?;
    let seen = match rx.recv_timeout(STEP_TIMEOUT) {
        Ok(s) => s,
        Err(_) => loop {
            kick::kick(&runner);
            if let Ok(s) = rx.recv_timeout(Duration::from_millis(10)) {
                break s;
            }
        },
    };
    let _ = runner.join();
    let after: u64 = mem
        .read_obj(GuestAddress(DATA + 8))
        .map_err(setup("probe data"))?;
    drop(vm);
    judge(&seen, after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judging_follows_the_trap_contract() {
        let good = Seen::MmioWrite(ALIAS + DATA + 8, MAGIC.to_le_bytes().to_vec());
        assert!(judge(&good, 0).is_ok());
        assert!(judge(&good, MAGIC).is_err(), "the store reached RAM");
        let wrong_data = Seen::MmioWrite(ALIAS + DATA + 8, vec![0; 8]);
        assert!(judge(&wrong_data, 0).is_err(), "the read did not see RAM");
        assert!(judge(&Seen::MmioWrite(ALIAS + DATA, vec![0; 8]), 0).is_err());
        assert!(judge(&Seen::Other("hlt".into()), 0).is_err());
    }

    #[test]
    fn probe_on_this_host() {
        let Ok(kvm) = Kvm::new() else {
            assert!(
                std::env::var("REQUIRE_KVM").is_err(),
                "REQUIRE_KVM=1 but no /dev/kvm"
            );
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        // Either verdict is legitimate; it must come back (no hang) and say why.
        match probe(&kvm) {
            Ok(()) => eprintln!("page-table write trap: available"),
            Err(e) => eprintln!("page-table write trap: unavailable: {e}"),
        }
    }
}
