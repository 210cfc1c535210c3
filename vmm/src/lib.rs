//! pvmm: a rust-vmm style virtual machine monitor for KVM with a shadow-paging paravirtual
//! MMU, batched MMU hypercalls, lazy A/D propagation and exit statistics.
//!
//! Module map: [`cli`] (flags) → [`vm`] (assembly) → [`vcpu`] (run loop) → [`devices`]
//! (range bus, UART, i8042, POST) and [`hcall`] (PV ABI transports and dispatcher) →
//! [`stats`] (exit statistics and KVM counters).
#![deny(missing_docs)]

pub mod bench;
pub mod boot;
pub mod cli;
pub mod console;
pub mod cpu;
pub mod devices;
pub mod error;
pub mod guest_ram;
pub mod hcall;
pub mod kick;
pub mod layout;
pub mod mmu;
pub mod stats;
pub mod vcpu;
pub mod vm;
