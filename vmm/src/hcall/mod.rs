//! The VMM side of the PV ABI: transports (doorbell device, vmcall exit, auto probe) and a
//! dispatcher that routes each request to the handler registered for its op.

pub mod dispatcher;
pub mod doorbell;
pub mod ops;
pub mod probe;

pub use dispatcher::{Dispatcher, Effects, Outcome};
