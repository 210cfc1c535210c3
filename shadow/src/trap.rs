//! Trapped page-table writes (`emulate` and `wrpt` write modes): the guest stores to its
//! typed tables with plain writes; the VMM maps every writable shadow leaf of a typed frame
//! at the frame's **alias** (a read-only view of guest RAM at `alias_base + gpa`, where a
//! store exits to the VMM with its address and data) and hands each trapped store to
//! [`ShadowMmu::trapped_write`], which validates it exactly like a `PT_UPDATE` (same rules,
//! same counters) or, in `wrpt`, unhooks a written L1 (see `wrpt`).

use hypercall::{HcError, MmuOp};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::engine::ShadowMmu;
use crate::layout::FrameClass;
use crate::mem::{table, Mem};
use crate::pte::{self, A, ADDR, D, MAXPHYADDR, RW};
use crate::rules::Rule;
pub use crate::trap_state::{TrapCounters, TrapDebug, WriteMode, DEFAULT_MAX_UNHOOKED};

/// What one trapped store did (for the VMM's statistics and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrapResult {
    /// Validated and applied (every entry it touched).
    Emulated,
    /// Refused with this error (dropped; the entry keeps its old value).
    Refused(HcError),
    /// Written as is: the frame was no page table, or an unhooked L1.
    Passthrough,
    /// The store unhooked its L1 (and was written).
    Unhooked,
}

impl ShadowMmu {
    /// Selects how the guest updates its page tables; `alias_base` is where the VMM maps
    /// the read-only alias of RAM (`alias_base + gpa` for every RAM `gpa`). Only while no
    /// frame is typed (`EBUSY` otherwise); the alias must lie above RAM and the pool and
    /// below 2^MAXPHYADDR (`EINVAL`).
    pub fn set_write_mode(&mut self, mode: WriteMode, alias_base: u64) -> Result<(), HcError> {
        if mode == self.trap.mode {
            return Ok(());
        }
        if self.frames.iter().next().is_some() {
            return Err(HcError::Ebusy);
        }
        let above = self
            .layout
            .pool_range()
            .end
            .max(self.layout.ram_end_pfn() << 12);
        let fits = alias_base
            .checked_add(self.layout.ram_end_pfn() << 12)
            .is_some_and(|end| end <= 1 << MAXPHYADDR);
        if mode != WriteMode::Hypercall
            && (alias_base < above || !alias_base.is_multiple_of(4096) || !fits)
        {
            return Err(HcError::Einval);
        }
        self.trap.mode = mode;
        self.trap.alias_base = if mode == WriteMode::Hypercall {
            0
        } else {
            alias_base
        };
        if self.trap.max_unhooked == 0 {
            self.trap.max_unhooked = DEFAULT_MAX_UNHOOKED;
        }
        Ok(())
    }

    /// The write mode in force.
    pub fn write_mode(&self) -> WriteMode {
        self.trap.mode
    }

    /// Sets the bound on unhooked L1s (at least 1).
    pub fn set_max_unhooked(&mut self, n: usize) {
        self.trap.max_unhooked = n.max(1);
    }

    /// Test-only switches (see [`TrapDebug`]).
    pub fn set_trap_debug(&mut self, d: TrapDebug) {
        self.trap.debug = d;
    }

    /// The trap counters.
    pub fn trap_counters(&self) -> &TrapCounters {
        &self.trap.counters
    }

    /// Whether stores are trapped (emulate or wrpt).
    #[inline]
    pub(crate) fn traps(&self) -> bool {
        self.trap.mode != WriteMode::Hypercall
    }

    /// The alias frame number of RAM frame `pfn`.
    #[inline]
    pub(crate) fn alias_pfn(&self, pfn: u64) -> u64 {
        (self.trap.alias_base >> 12) + pfn
    }

    /// The RAM frame an alias frame number stands for, if `apfn` is in the alias.
    pub(crate) fn unalias_pfn(&self, apfn: u64) -> Option<u64> {
        if !self.traps() {
            return None;
        }
        let ram = apfn.checked_sub(self.trap.alias_base >> 12)?;
        (ram < self.layout.ram_end_pfn()).then_some(ram)
    }

    /// The protected form of shadow leaf `s` (4 KiB form, guest rights) whose target is a
    /// page table: read-only in hypercall mode; writable at the alias with trapped stores;
    /// unchanged when the target is an unhooked L1.
    #[inline]
    pub(crate) fn protect_leaf(&self, s: u64) -> u64 {
        let pfn = pte::pfn_of(s);
        if !self.traps() {
            return s & !RW;
        }
        if self.is_unhooked(pfn) || s & RW == 0 {
            return s;
        }
        (s & !ADDR) | (self.alias_pfn(pfn) << 12)
    }

    /// The unprotected form of shadow leaf `s` mapping `pfn` (its target lost its type or
    /// was unhooked): RW as given by `rw`, at the frame itself.
    pub(crate) fn unprotect_leaf(s: u64, pfn: u64, rw: bool) -> u64 {
        let s = (s & !ADDR) | (pfn << 12);
        if rw {
            s | RW
        } else {
            s
        }
    }

    /// One store the guest made through the alias: `gpa` is the RAM address it was aimed
    /// at (alias address minus the alias base), `data` its 1..=8 bytes. Each 8-byte entry
    /// it touches is handled on its own; the caller ends the "batch" with
    /// [`ShadowMmu::end_batch`] to get the flush it needs.
    pub fn trapped_write<M: GuestMemory>(
        &mut self,
        mem: &M,
        vcpu: usize,
        gpa: u64,
        data: &[u8],
    ) -> TrapResult {
        let mem = &Mem::new(mem);
        self.trap.counters.trapped_writes += 1;
        if data.is_empty() || data.len() > 8 || gpa.checked_add(data.len() as u64).is_none() {
            self.trap.counters.refused_writes += 1;
            return TrapResult::Refused(HcError::Einval);
        }
        let first = gpa & !7;
        let split = ((gpa & 7) as usize + data.len()).min(8) - (gpa & 7) as usize;
        let (lo, hi) = data.split_at(split);
        let r = self.trapped_entry(mem, vcpu, gpa, lo);
        if hi.is_empty() {
            return r;
        }
        match self.trapped_entry(mem, vcpu, first + 8, hi) {
            TrapResult::Emulated | TrapResult::Passthrough => r,
            other => other,
        }
    }

    /// A store of `bytes` at `gpa` that stays inside one 8-byte entry.
    fn trapped_entry<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        vcpu: usize,
        gpa: u64,
        bytes: &[u8],
    ) -> TrapResult {
        let pfn = gpa >> 12;
        let level = self.frames.level(pfn);
        let r = match level {
            Some(1) if self.is_unhooked(pfn) => self.store_plain(mem, gpa, bytes),
            Some(1) if self.trap.mode == WriteMode::Wrpt => {
                self.unhook(mem, pfn);
                match self.store_plain(mem, gpa, bytes) {
                    TrapResult::Passthrough => TrapResult::Unhooked,
                    other => other,
                }
            }
            Some(level) => self.emulate(mem, vcpu, gpa, bytes, level),
            None => self.store_plain(mem, gpa, bytes),
        };
        if !matches!(r, TrapResult::Refused(_)) {
            self.mark_written(mem, pfn);
        }
        r
    }

    /// Validates and applies a store into a typed (hooked) table like a `PT_UPDATE`.
    fn emulate<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        vcpu: usize,
        gpa: u64,
        bytes: &[u8],
        level: u8,
    ) -> TrapResult {
        let ptr = gpa & !7;
        let Ok(t) = table(mem, ptr >> 12) else {
            self.trap.counters.refused_writes += 1;
            return TrapResult::Refused(Rule::Unbacked.error());
        };
        let i = ((ptr & 0xfff) >> 3) as usize;
        let old = t.get(i);
        let val = merge(old, (gpa & 7) as usize, bytes);
        if self.trap.mode == WriteMode::Wrpt && level == 2 {
            // An unhooked L1 is re-validated before an entry that links or unlinks it.
            for e in [old, val] {
                if let Some(c) = self.unhooked_child(e) {
                    self.rehook(mem, vcpu, c);
                }
            }
        }
        if self.trap.debug.no_validate {
            t.set(i, val);
            self.trap.counters.emulated_writes += 1;
            return TrapResult::Emulated;
        }
        let op = MmuOp::PtUpdate {
            ptr,
            val,
            preserve_ad: false,
        };
        match self.apply_in(mem, vcpu, &op) {
            Ok(()) => {
                self.trap.counters.emulated_writes += 1;
                TrapResult::Emulated
            }
            Err(e) => {
                self.trap.counters.refused_writes += 1;
                TrapResult::Refused(e)
            }
        }
    }

    /// Writes a store into a frame that is no (hooked) page table; only usable RAM.
    fn store_plain<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        gpa: u64,
        bytes: &[u8],
    ) -> TrapResult {
        let ram = self.layout.classify_range(gpa, bytes.len() as u64) == FrameClass::Ram;
        if ram && mem.guest().write_slice(bytes, GuestAddress(gpa)).is_ok() {
            self.trap.counters.passthrough_writes += 1;
            return TrapResult::Passthrough;
        }
        self.trap.counters.refused_writes += 1;
        TrapResult::Refused(HcError::Efault)
    }

    /// A store reached frame `pfn` through one of its writable mappings; the exit does not
    /// say which, so every writable shadow leaf of the frame records A and D (no dirty bit
    /// is lost; one may be reported for a sibling mapping that was not used).
    fn mark_written<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, pfn: u64) {
        let mut cur = self.pool.rmap_first(pfn);
        while let Some(slot) = cur {
            cur = self.pool.rmap_next(slot);
            if let Ok(st) = table(mem, self.pool.pfn(slot / 512)) {
                if pte::present(st.get(slot as usize % 512)) {
                    st.set_bits(slot as usize % 512, A | D);
                }
            }
        }
    }
}

/// `old` with `bytes` stored at byte offset `off` (little-endian), the rest kept.
pub fn merge(old: u64, off: usize, bytes: &[u8]) -> u64 {
    let mut b = old.to_le_bytes();
    for (k, v) in bytes.iter().enumerate() {
        if let Some(slot) = b.get_mut(off + k) {
            *slot = *v;
        }
    }
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::merge;

    #[test]
    fn merging_partial_stores() {
        let old = 0x1122_3344_5566_7788;
        assert_eq!(
            merge(old, 0, &0xdead_beef_u32.to_le_bytes()),
            0x1122_3344_dead_beef
        );
        assert_eq!(merge(old, 4, &[0xaa, 0xbb]), 0x1122_bbaa_5566_7788);
        assert_eq!(merge(old, 0, &u64::MAX.to_le_bytes()), u64::MAX);
        assert_eq!(
            merge(old, 7, &[1, 2, 3]),
            0x0122_3344_5566_7788,
            "clipped at the entry"
        );
    }
}
