//! Trapping the guest's stores to its page tables (`mmu=emulate` and `mmu=wrpt`, see
//! docs/pv-abi.md §11): a read-only memslot alias of guest RAM ([`alias`]), the start-up
//! probe that the trap works on this host ([`probe`]), and the KVM-free decoding of one
//! trapped store ([`decode`]).

pub mod probe;
