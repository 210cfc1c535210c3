//! The pvmm shadow page-table engine.
//!
//! A paravirtual guest keeps its own x86-64 page tables and reports every change through
//! MMU batch entries ([`hypercall::MmuOp`]). The engine validates each change, keeps a
//! **shadow** copy of every page table in a pool of guest-physical frames the guest can
//! never map, and the CPU walks only shadows. Hardware A/D bits land in the shadows and are
//! handed back to guest PTEs lazily (`SYNC_AD`, `QUERY_AD`, and whenever a shadow leaf is
//! replaced or dropped). See `README.md` for the model and every documented choice.
//!
//! Modules, one job each:
//! * [`layout`] — RAM / reserved / pool ranges and frame classification;
//! * `mem`: bounds-checked 4 KiB tables in guest memory, region mappings remembered;
//! * [`pte`] — entry bits, the per-level flag whitelist, entry classification;
//! * [`rules`] — every validation rule as a named function with its error;
//! * `frames`: page-table types, pins, references and back-references (a dense word per
//!   frame for what the update path reads);
//! * `pool`: the shadow pool allocator and the reverse map of writable mappings;
//! * `engine`: the [`ShadowMmu`] and one method per op;
//! * `fast`: the straight-line `PT_UPDATE` of an L1 leaf (the common case);
//! * `batch`: [`Batch`], a batch's entries applied against one memory object;
//! * `shadow`: building, dropping and reclaiming shadow tables;
//! * `ad`: `SYNC_AD` / `QUERY_AD`;
//! * `leaf_zap`: the old targets of changed leaves, zapped instead of resynced;
//! * [`flush`] — flush reasons, avoided-flush reasons, per-vCPU pending flushes;
//! * [`trap`] — trapped page-table stores (`emulate`, `wrpt` write modes);
//! * `wrpt`: unhooking and re-hooking L1s (writable page tables);
//! * `targets`: which vCPUs a flush is for (loaded and held roots);
//! * [`vcpuset`] — [`VcpuSet`], a set of vCPUs;
//! * [`counters`] — statistics;
//! * [`invariants`] — the invariant checker ([`ShadowMmu::check_invariants`]);
//! * `debug`: test helpers (translation through the shadow).
#![deny(missing_docs)]

mod ad;
mod batch;
pub mod counters;
mod debug;
mod engine;
mod fast;
pub mod flush;
mod frames;
pub mod invariants;
pub mod layout;
mod lazy_switch;
mod leaf_zap;
mod mem;
mod pool;
pub mod pte;
pub mod rules;
mod shadow;
mod targets;
mod targets_memo;
pub mod trap;
mod trap_state;
pub mod vcpuset;
mod wrpt;

pub use batch::Batch;
pub use counters::{Counters, OpKind};
pub use engine::{BatchOutcome, LoadedRoot, ShadowMmu};
pub use flush::{AvoidReason, FlushReason};
pub use invariants::{InvariantKind, InvariantViolation};
pub use layout::{FrameClass, Layout, ShadowError};
pub use leaf_zap::LeafZapList;
pub use rules::Rule;
pub use trap::{TrapCounters, TrapDebug, TrapResult, WriteMode};
pub use vcpuset::VcpuSet;

#[cfg(test)]
mod detach_tests;
#[cfg(test)]
mod fast_tests;
#[cfg(test)]
mod integrity_tests;
#[cfg(test)]
mod kernel_flush_tests;
#[cfg(test)]
mod lazy_switch_tests;
#[cfg(test)]
mod leaf_zap_tests;
#[cfg(test)]
mod mutant_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod trap_tests;
