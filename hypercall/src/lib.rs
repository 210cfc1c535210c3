//! The pvmm paravirtual ABI, shared by the VMM and the guest.
//!
//! Everything here is `no_std`, heap-free and little-endian. The full specification is
//! `docs/pv-abi.md`; this crate is its executable form:
//!
//! * [`discovery`]: the CPUID leaves a guest reads to find the ABI;
//! * [`abi`]: op numbers, the request block, MMU batch entries and their byte layouts;
//! * [`error`]: the negative errno-style codes every op answers with;
//! * [`decode`]: turns untrusted guest bytes into typed requests, never panicking;
//! * `guest` (feature `guest`): issuing hypercalls and building batches from a guest.
#![no_std]
#![deny(missing_docs)]

pub mod abi;
pub mod decode;
pub mod discovery;
pub mod error;
#[cfg(feature = "guest")]
pub mod guest;

pub use abi::*;
pub use decode::*;
pub use discovery::*;
pub use error::HcError;
