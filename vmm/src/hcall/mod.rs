//! The VMM side of the PV ABI: the handler contracts ([`contract`]), the transports
//! ([`doorbell`] for pio, [`vmcall`], and [`transport`], which picks one with the [`probe`]
//! and its per-host [`probe_cache`]), the [`dispatcher`]
//! that routes each request to the handler registered for its op, and the handlers
//! themselves ([`ops`] for VERSION/EXIT/NULL, [`mmu_batch`] for MMU_BATCH).

pub mod contract;
pub mod dispatcher;
pub mod doorbell;
pub mod mmu_batch;
pub mod ops;
pub mod probe;
pub mod probe_cache;
pub mod transport;
pub mod vmcall;

pub use contract::{CallCtx, Effects, MmuPhases, OpHandler, Outcome, PoolZap, RamZap, ResyncFn};
pub use dispatcher::Dispatcher;
