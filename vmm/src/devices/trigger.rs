//! `vm_superio::Trigger` implementations: an irqfd-backed interrupt line and a flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// Raises a guest interrupt by writing to an eventfd registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl vm_superio::Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Sets a shared flag: the VM's reset line, raised by the i8042 and read by the vCPU loop.
#[derive(Clone, Default)]
pub struct FlagTrigger(pub Arc<AtomicBool>);

impl FlagTrigger {
    /// True once after the line was raised (clears it).
    pub fn take(&self) -> bool {
        self.0.load(Ordering::Relaxed) && self.0.swap(false, Ordering::SeqCst)
    }
}

impl vm_superio::Trigger for FlagTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}
