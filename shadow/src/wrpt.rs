//! Writable page tables (`wrpt` write mode): the first trapped store to a hooked L1
//! **unhooks** it — its shadow A/D bits are harvested into the guest entries, every parent
//! shadow entry that links it is dropped (flush of every vCPU if one was used), its writable
//! mappings get RW at the frame itself, and a snapshot of its entries is kept. The guest
//! then writes it with plain stores, no exit. **Re-hooking** (at any MMU hypercall, a
//! reported spurious fault, a trapped store to an L2 entry that links or unlinks it, or
//! when the bound on unhooked L1s evicts it) makes it read-only again (alias), diffs it
//! against the snapshot and validates every changed entry like a `PT_UPDATE` in one pass
//! (a refused entry gets its snapshot value back), then relinks the parents.

use vm_memory::GuestMemory;

use crate::engine::ShadowMmu;
use crate::flush::FlushReason;
use crate::mem::{table, Mem};
use crate::pte::{self, Kind, AD};
use crate::rules;
use crate::trap_state::Unhooked;
use hypercall::MmuOp;

impl ShadowMmu {
    /// Whether L1 `pfn` is unhooked.
    pub(crate) fn is_unhooked(&self, pfn: u64) -> bool {
        self.trap.unhooked.iter().any(|u| u.pfn == pfn)
    }

    /// The entries the engine has validated for `pfn`: its snapshot while unhooked.
    pub(crate) fn unhooked_snapshot(&self, pfn: u64) -> Option<&[u64; 512]> {
        self.trap
            .unhooked
            .iter()
            .find(|u| u.pfn == pfn)
            .map(|u| &*u.snapshot)
    }

    /// The unhooked L1 that L2 entry `e` references, if any.
    pub(crate) fn unhooked_child(&self, e: u64) -> Option<u64> {
        match rules::entry_flags_allowed(2, e) {
            Ok(Kind::Table { pfn }) if self.is_unhooked(pfn) => Some(pfn),
            _ => None,
        }
    }

    /// The frames of every unhooked L1 (least recently unhooked first).
    pub fn unhooked_tables(&self) -> Vec<u64> {
        self.trap.unhooked.iter().map(|u| u.pfn << 12).collect()
    }

    /// Unhooks L1 `pfn` (see the module documentation); re-hooks the least recently
    /// unhooked one first if the bound is reached.
    pub(crate) fn unhook<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, pfn: u64) {
        while self.trap.unhooked.len() >= self.trap.max_unhooked.max(1) {
            let lru = self.trap.unhooked.first().map(|u| u.pfn);
            match lru {
                Some(old) => {
                    self.trap.counters.lru_evictions += 1;
                    self.rehook(mem, 0, old);
                }
                None => break,
            }
        }
        let Ok(gt) = table(mem, pfn) else {
            return;
        };
        let info = self.frames.info(pfn);
        let parents = info.map(|i| i.parents.clone()).unwrap_or_default();
        let shadow = self.frames.shadow(pfn);
        if !self.trap.debug.keep_parents {
            for p in parents {
                self.set_parent_shadow(mem, p, None);
            }
        }
        // The CPU can set no more A/D in this shadow once the flush is done; what it set
        // so far goes into the guest entries, where the guest now reads them.
        if let (Some(s), false) = (shadow, self.trap.debug.no_harvest) {
            if let Ok(st) = table(mem, self.pool.pfn(s)) {
                for i in 0..512 {
                    let sv = st.get(i);
                    if pte::present(sv) {
                        self.harvest(gt.get(i), sv & AD, |b| gt.set_bits(i, b));
                    }
                }
            }
        }
        self.trap.unhooked.push(Unhooked {
            pfn,
            snapshot: Box::new(gt.snapshot()),
        });
        // Now unhooked: its writable mappings point at the frame itself again.
        self.restore_writers(mem, pfn);
        self.trap.counters.unhooks += 1;
    }

    /// Re-hooks every unhooked L1 (any MMU hypercall, a spurious fault).
    pub fn rehook_all<M: GuestMemory>(&mut self, mem: &M, vcpu: usize) {
        self.rehook_all_in(&Mem::new(mem), vcpu);
    }

    /// [`Self::rehook_all`] through `mem`.
    fn rehook_all_in<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, vcpu: usize) {
        while let Some(pfn) = self.trap.unhooked.first().map(|u| u.pfn) {
            self.rehook(mem, vcpu, pfn);
        }
    }

    /// The guest reported a page fault at `va` that its own tables allow (a spurious
    /// fault, e.g. through an unhooked L1): re-hooks every unhooked L1.
    pub fn spurious_fault<M: GuestMemory>(&mut self, mem: &M, vcpu: usize, _va: u64) {
        self.trap.counters.spurious_faults += 1;
        self.rehook_all(mem, vcpu);
    }

    /// Re-hooks L1 `pfn`: read-only again, changed entries validated in one pass, parents
    /// relinked.
    pub(crate) fn rehook<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, vcpu: usize, pfn: u64) {
        let Some(pos) = self.trap.unhooked.iter().position(|u| u.pfn == pfn) else {
            return;
        };
        let u = self.trap.unhooked.remove(pos);
        // Stores trap again before the entries are read: what is validated is what stays.
        self.downgrade_writers(mem, pfn);
        let Ok(gt) = table(mem, pfn) else {
            return;
        };
        let now = gt.snapshot();
        let mut n = 0u64;
        for (i, (&was, &cur)) in u.snapshot.iter().zip(now.iter()).enumerate() {
            if was == cur {
                continue;
            }
            n += 1;
            if self.trap.debug.no_validate {
                continue;
            }
            // The engine's state (references, shadow) is the snapshot's: apply the change
            // as the PT_UPDATE it is.
            gt.set(i, was);
            let op = MmuOp::PtUpdate {
                ptr: (pfn << 12) + 8 * i as u64,
                val: cur,
                preserve_ad: false,
            };
            if self.apply_in(mem, vcpu, &op).is_err() {
                self.trap.counters.refused_writes += 1;
            }
        }
        self.trap.counters.record_rehook(n);
        let parents = self
            .frames
            .info(pfn)
            .map(|i| i.parents.clone())
            .unwrap_or_default();
        for p in parents {
            self.set_parent_shadow(mem, p, Some(pfn));
        }
    }

    /// Sets the shadow of the L2 entry at guest-physical `backref`: dropped (`None`, with a
    /// flush if the CPU used it) or relinked to the shadow of `child`.
    fn set_parent_shadow<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        backref: u64,
        child: Option<u64>,
    ) {
        let (l2, j) = (backref >> 12, ((backref & 0xfff) >> 3) as usize);
        let Some(s) = self.frames.shadow(l2) else {
            return;
        };
        let Ok(st) = table(mem, self.pool.pfn(s)) else {
            return;
        };
        match child {
            None => {
                let was = st.swap(j, 0);
                if pte::present(was) {
                    self.retire(s, l2, false, was, FlushReason::NonLeafChanged);
                }
            }
            Some(_) => {
                let Ok(g) = table(mem, l2).map(|t| t.get(j)) else {
                    return;
                };
                let kind = self.check_entry(2, l2, g).unwrap_or(Kind::NotPresent);
                if let Ok(v) = self.make_shadow_entry(mem, 2, l2, j, g, kind) {
                    st.set(j, v);
                }
            }
        }
    }

    /// A table losing its type is no longer unhooked.
    pub(crate) fn forget_unhooked(&mut self, pfn: u64) {
        self.trap.unhooked.retain(|u| u.pfn != pfn);
    }

    /// Pool indices of the shadows of unhooked L1s (kept by reclaim: they are reachable
    /// again at the re-hook).
    pub(crate) fn unhooked_shadows(&self) -> Vec<u32> {
        self.trap
            .unhooked
            .iter()
            .filter_map(|u| self.frames.shadow(u.pfn))
            .collect()
    }
}
