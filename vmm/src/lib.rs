//! pvmm: a rust-vmm style virtual machine monitor for KVM with a shadow-paging paravirtual
//! MMU, batched MMU hypercalls, lazy A/D propagation and exit statistics.
//!
//! Module map: [`cli`] (flags) → [`vm`] (build, supervise, report) → [`vcpu`] (run loop,
//! exit dispatch, effects) → [`vm_ops`] (what a vCPU asks of its VM) → [`devices`] (range
//! bus, UART, i8042, POST) and [`hcall`] (PV ABI contracts, transports, dispatcher,
//! handlers) → [`stats`] (exit statistics and KVM counters). [`memory`] owns memslots.
//! ARCHITECTURE.md has the whole map and the path of one hypercall.

pub mod bench;
pub mod boot;
pub mod cli;
pub mod console;
pub mod cpu;
pub mod devices;
pub mod dirty_flush;
pub mod error;
pub mod guest_ram;
pub mod hcall;
pub mod kernel_check;
pub mod kick;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod pool_probe;
pub mod pool_zap;
pub mod privilege;
pub mod ptwrite;
pub mod ram_zap;
pub mod rendezvous;
pub mod seccomp;
pub mod signals;
pub mod stats;
pub mod vcpu;
pub mod vm;
pub mod vm_ops;
pub mod x86;
