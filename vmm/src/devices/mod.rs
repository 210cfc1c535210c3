//! Emulated devices and the range bus that routes port I/O and MMIO exits to them.

pub mod bus;
pub mod i8042;
pub mod post;
pub mod serial;
pub mod trigger;

pub use bus::{Bus, BusDevice};
