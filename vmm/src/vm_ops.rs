//! What a vCPU may ask of its VM ([`VmOps`]), and the VM's implementation of it over the
//! port and MMIO buses, the hypercall dispatcher and the reset line ([`VmBuses`]). The vCPU
//! side depends only on the trait, so exit handling is tested without KVM and without a VM.

use crate::devices::trigger::FlagTrigger;
use crate::devices::Bus;
use crate::hcall::{Dispatcher, Effects, Outcome, ResyncFn};
use std::sync::Arc;
use vm_memory::GuestMemoryMmap;

/// Services a vCPU's exits need from the VM.
pub trait VmOps: Send + Sync {
    /// A guest port read; returns the device name for the statistics.
    fn pio_read(&self, vcpu: usize, port: u16, data: &mut [u8]) -> &'static str;
    /// A guest port write; returns the device name for the statistics.
    fn pio_write(&self, vcpu: usize, port: u16, data: &[u8]) -> &'static str;
    /// A guest MMIO read; returns the device name for the statistics.
    fn mmio_read(&self, vcpu: usize, addr: u64, data: &mut [u8]) -> &'static str;
    /// A guest MMIO write; returns the device name for the statistics.
    fn mmio_write(&self, vcpu: usize, addr: u64, data: &[u8]) -> &'static str;
    /// One hypercall whose request block is at `gpa` (either transport).
    fn hypercall(&self, vcpu: usize, gpa: u64) -> Outcome;
    /// True once after a device raised the VM's reset line.
    fn take_reset(&self) -> bool;
    /// An MMIO write that may be a trapped page-table store: its effects if it was one.
    fn pt_write(&self, _vcpu: usize, _addr: u64, _data: &[u8]) -> Option<Effects> {
        None
    }
    /// What `vcpu` must apply because of another vCPU's MMU batch (a flush, a root switch).
    fn take_delivery(&self, _vcpu: usize) -> Effects {
        Effects::default()
    }
    /// Runs the host `resync` on the stale pool chunks under the MMU engine's lock (see
    /// [`crate::hcall::OpHandler::host_resync`]); true if it covered every chunk.
    fn host_resync(&self, _resync: &mut ResyncFn<'_>) -> bool {
        false
    }
    /// Guest memory, for diagnostics (reading the code at RIP after an emulation failure).
    fn guest_memory(&self) -> Option<&GuestMemoryMmap> {
        None
    }
}

/// The VM's devices as the vCPUs see them.
pub struct VmBuses {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// Hypercall dispatcher.
    pub hcalls: Arc<Dispatcher>,
    /// The reset line (raised by the i8042).
    pub reset: FlagTrigger,
    /// Guest memory (diagnostics only).
    pub mem: GuestMemoryMmap,
}

impl VmOps for VmBuses {
    fn pio_read(&self, vcpu: usize, port: u16, data: &mut [u8]) -> &'static str {
        self.pio.read(vcpu, u64::from(port), data)
    }
    fn pio_write(&self, vcpu: usize, port: u16, data: &[u8]) -> &'static str {
        self.pio.write(vcpu, u64::from(port), data)
    }
    fn mmio_read(&self, vcpu: usize, addr: u64, data: &mut [u8]) -> &'static str {
        self.mmio.read(vcpu, addr, data)
    }
    fn mmio_write(&self, vcpu: usize, addr: u64, data: &[u8]) -> &'static str {
        self.mmio.write(vcpu, addr, data)
    }
    fn hypercall(&self, vcpu: usize, gpa: u64) -> Outcome {
        self.hcalls.handle(vcpu, gpa)
    }
    fn take_reset(&self) -> bool {
        self.reset.take()
    }
    fn pt_write(&self, vcpu: usize, addr: u64, data: &[u8]) -> Option<Effects> {
        self.hcalls.pt_write(vcpu, addr, data)
    }
    fn take_delivery(&self, vcpu: usize) -> Effects {
        self.hcalls.take_delivery(vcpu)
    }
    fn host_resync(&self, resync: &mut ResyncFn<'_>) -> bool {
        self.hcalls.host_resync(resync)
    }
    fn guest_memory(&self) -> Option<&GuestMemoryMmap> {
        Some(&self.mem)
    }
}
