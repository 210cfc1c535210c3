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

/// Sets a shared flag (used for the i8042 reset line).
#[derive(Clone, Default)]
pub struct FlagTrigger(pub Arc<AtomicBool>);

impl vm_superio::Trigger for FlagTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}
