//! Shadow tables: building them from validated guest tables, dropping them (harvesting A/D
//! into the guest first), and reclaiming the pool.

use vm_memory::GuestMemory;

use crate::engine::{ShadowMmu, R};
use crate::flush::FlushReason;
use crate::mem::{table, Mem};
use crate::pool::Owner;
use crate::pte::{self, Kind, A, AD, ADDR, P, RW, US};
use crate::rules::{self, Rule};

use crate::pte::KERNEL_HALF;

impl ShadowMmu {
    /// A zeroed pool frame for `owner`; reclaims unreachable shadows if the pool is full.
    fn alloc_shadow<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, owner: Owner) -> R<u32> {
        let idx = match self.pool.alloc(owner, self.epoch) {
            Some(i) => i,
            None => {
                self.reclaim(mem);
                self.pool
                    .alloc(owner, self.epoch)
                    .ok_or(Rule::PoolExhausted)?
            }
        };
        match table(mem, self.pool.pfn(idx)) {
            Ok(t) => {
                t.zero();
                Ok(idx)
            }
            Err(e) => {
                self.pool.free(idx);
                Err(e)
            }
        }
    }

    /// The 4 KiB shadow leaf for guest leaf bits `g` (4 KiB form): guest rights with A=D=0,
    /// protected if the target is a page table (read-only, or at its alias when stores
    /// trap, unless it is an unhooked L1).
    #[inline]
    pub(crate) fn shadow_leaf(&self, g: u64) -> u64 {
        let s = g & pte::SHADOW_LEAF_KEEP;
        if self.frames.level(pte::pfn_of(g)).is_some() {
            self.protect_leaf(s)
        } else {
            s
        }
    }

    /// The shadow value for validated guest entry `g` (of kind `kind`) at index `i` of table
    /// `tpfn` at `level`. Builds a split L1 for a 2 MiB leaf and the child's shadow for a
    /// non-leaf entry. Does not write the slot nor link a 4 KiB leaf in the reverse map.
    pub(crate) fn make_shadow_entry<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        level: u8,
        tpfn: u64,
        i: usize,
        g: u64,
        kind: Kind,
    ) -> R<u64> {
        match kind {
            Kind::NotPresent => Ok(0),
            Kind::Leaf4k { .. } => Ok(self.shadow_leaf(g)),
            Kind::Leaf2m { pfn } => {
                let owner = Owner::Split {
                    l2: tpfn,
                    idx: i as u16,
                };
                let sidx = self.alloc_shadow(mem, owner)?;
                let st = table(mem, self.pool.pfn(sidx))?;
                for j in 0..pte::FRAMES_2M {
                    let leaf = pte::split_leaf(g, j);
                    st.set(j as usize, self.shadow_leaf(leaf));
                    if leaf & RW != 0 {
                        self.pool.rmap_add(sidx * 512 + j as u32, pfn + j);
                    }
                }
                Ok((self.pool.pfn(sidx) << 12) | P | RW | US)
            }
            Kind::Table { pfn } => {
                // Only a validated reference (one recorded as a back-reference of the child)
                // is linked: a word that reached a typed table without validation stays
                // not-present in the shadow, so it can never outlive the child's type.
                let entry = (tpfn << 12) + 8 * (i as u64 & 511);
                let linked = self
                    .frames
                    .info(pfn)
                    .is_some_and(|c| c.level + 1 == level && c.parents.contains(&entry))
                    && !self.is_unhooked(pfn);
                if !linked {
                    return Ok(0);
                }
                let c = self.ensure_shadow(mem, pfn)?;
                Ok((self.pool.pfn(c) << 12) | (g & pte::SHADOW_NONLEAF_KEEP))
            }
        }
    }

    /// The shadow of typed table `pfn`, built (with its whole subtree) if missing.
    pub(crate) fn ensure_shadow<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, pfn: u64) -> R<u32> {
        let (level, shadow) = self.frames.table(pfn).ok_or(Rule::PtrNotTable)?;
        if let Some(s) = shadow {
            self.pool.touch(s, self.epoch);
            return Ok(s);
        }
        let g = table(mem, pfn)?.snapshot();
        let sidx = self.alloc_shadow(mem, Owner::Table { pfn, level })?;
        self.frames.set_shadow(pfn, Some(sidx));
        let st = table(mem, self.pool.pfn(sidx))?;
        for (i, &e) in g.iter().enumerate() {
            // Re-checked: the shadow never holds anything the rules refuse.
            let kind = self.check_entry(level, pfn, e).unwrap_or(Kind::NotPresent);
            match self.make_shadow_entry(mem, level, pfn, i, e, kind) {
                Ok(s) => {
                    st.set(i, s);
                    if let (Kind::Leaf4k { pfn: t }, true) = (kind, e & RW != 0) {
                        self.pool.rmap_add(sidx * 512 + i as u32, t);
                    }
                }
                Err(rule) => {
                    self.drop_shadow(mem, pfn);
                    return Err(rule);
                }
            }
        }
        Ok(sidx)
    }

    /// Drops the shadow of table `pfn` (if any), harvesting leaf A/D into the guest.
    /// Returns whether a dropped entry (leaf or not) had been used by the CPU (A=1): the
    /// TLB may hold translations made through it, so the caller must request a flush.
    pub(crate) fn drop_shadow<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, pfn: u64) -> bool {
        let Some(sidx) = self.frames.take_shadow(pfn) else {
            return false;
        };
        self.free_shadow_table(mem, sidx)
    }

    /// OR of the A/D bits of the leaves of split table `split`.
    pub(crate) fn split_ad<M: GuestMemory>(&self, mem: &Mem<'_, M>, split: u32) -> u64 {
        table(mem, self.pool.pfn(split))
            .map_or(0, |st| (0..512).fold(0, |acc, j| acc | (st.get(j) & AD)))
    }

    /// Frees pool frame `sidx` (and the splits under a shadow L2): clears every entry
    /// (atomically, so A/D the CPU sets up to that instant are seen), unlinks its leaves
    /// from the reverse map and ORs leaf A/D into the guest entries they shadow. Returns
    /// whether any dropped entry, at any level, had A=1.
    pub(crate) fn free_shadow_table<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        sidx: u32,
    ) -> bool {
        let Some(meta) = self.pool.meta(sidx) else {
            return false;
        };
        // A freed root a vCPU still runs on may point at this L3 from its kernel half: the
        // frame is held from reuse, and the lazy switches become eager.
        let in_remnant =
            matches!(meta.owner, Owner::Table { level: 3, .. }) && self.in_remnant(mem, sidx);
        if in_remnant {
            self.force_lazy_switches("an L3 shadow its freed root links was dropped");
        }
        let used = match meta.owner {
            Owner::Table { pfn, level: 1 } => self.drop_l1_entries(mem, sidx, pfn),
            Owner::Split { l2, idx } => {
                let ad = self.clear_split(mem, sidx);
                if let Ok(gt) = table(mem, l2) {
                    let i = usize::from(idx);
                    self.harvest(gt.get(i), ad, |b| gt.set_bits(i, b));
                }
                ad & A != 0
            }
            Owner::Table { level, .. } => self.drop_upper_entries(mem, sidx, level),
        };
        if used && self.pool.stale_on_drop {
            self.mark_stale(sidx);
        }
        if self.still_run_on(sidx) || in_remnant {
            self.pool.free_held(sidx);
        } else {
            self.pool.free(sidx);
        }
        used
    }

    /// Frees split table `sidx` without touching the guest L2 entry; returns the OR of its
    /// leaves' A/D (the caller decides where they go).
    pub(crate) fn free_split<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, sidx: u32) -> u64 {
        let ad = self.clear_split(mem, sidx);
        self.pool.free(sidx);
        ad
    }

    /// Clears the leaves of split `sidx` (unlinking them from the reverse map); returns the
    /// OR of their A/D.
    fn clear_split<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, sidx: u32) -> u64 {
        let Ok(st) = table(mem, self.pool.pfn(sidx)) else {
            return 0;
        };
        let mut ad = 0;
        for i in 0..512 {
            ad |= st.swap(i, 0) & AD;
            self.pool.rmap_remove(sidx * 512 + i as u32);
        }
        ad
    }

    /// Clears the leaves of the shadow L1 `sidx` of guest table `pfn`, harvesting their
    /// A/D into the guest entries; returns whether one had A=1.
    fn drop_l1_entries<M: GuestMemory>(&mut self, mem: &Mem<'_, M>, sidx: u32, pfn: u64) -> bool {
        let Ok(st) = table(mem, self.pool.pfn(sidx)) else {
            return false;
        };
        let gt = table(mem, pfn).ok();
        let mut used = false;
        for i in 0..512 {
            let s = st.swap(i, 0);
            self.pool.rmap_remove(sidx * 512 + i as u32);
            if pte::present(s) {
                used |= s & A != 0;
                if let Some(gt) = &gt {
                    self.harvest(gt.get(i), s & AD, |b| gt.set_bits(i, b));
                }
            }
        }
        used
    }

    /// Clears the non-leaf entries of shadow `sidx` (level 2..4), freeing the splits
    /// under a shadow L2; returns whether an entry (or a split leaf) had A=1.
    fn drop_upper_entries<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        sidx: u32,
        level: u8,
    ) -> bool {
        let Ok(st) = table(mem, self.pool.pfn(sidx)) else {
            return false;
        };
        // A root a vCPU still runs on until its root switch keeps its kernel half (the
        // upper 256 entries, shared by every address space): that vCPU runs kernel code
        // until it switches, and its walks must still find it.
        let end = if level == 4 && self.still_run_on(sidx) {
            KERNEL_HALF
        } else {
            512
        };
        let mut used = false;
        for i in 0..end {
            let s = st.swap(i, 0);
            if !pte::present(s) {
                continue;
            }
            used |= s & A != 0;
            let split = self
                .pool
                .index_of(s & ADDR)
                .filter(|&c| level == 2 && self.pool.meta(c).is_some_and(|m| m.owner.is_split()));
            if let Some(c) = split {
                used |= self.free_shadow_table(mem, c);
            }
        }
        used
    }

    /// ORs shadow bits `bits` into present guest entry `g` (written by `set`), counting the
    /// newly set A and D bits.
    pub(crate) fn harvest(&mut self, g: u64, bits: u64, set: impl FnOnce(u64) -> u64) {
        if !pte::present(g) || bits & !g == 0 {
            return;
        }
        set(bits);
        self.count_propagated(bits & !g);
    }

    /// Pool exhaustion: drops every shadow not reachable from a loaded root or from a
    /// shadow the current op touched (harvesting A/D first).
    pub(crate) fn reclaim<M: GuestMemory>(&mut self, mem: &Mem<'_, M>) {
        self.counters.reclaims += 1;
        let mut keep = vec![false; self.pool.total() as usize];
        let mut stack: Vec<u32> = self
            .roots
            .iter()
            .flatten()
            .filter_map(|r| self.frames.shadow(*r))
            .collect();
        stack.extend(self.unhooked_shadows());
        stack.extend(
            self.pool
                .used_frames()
                .filter(|(_, m)| m.epoch == self.epoch)
                .map(|(i, _)| i),
        );
        while let Some(s) = stack.pop() {
            match keep.get_mut(s as usize) {
                Some(k) if !*k => *k = true,
                _ => continue,
            }
            let level = self.pool.meta(s).map_or(1, |m| m.owner.level());
            if level < 2 {
                continue;
            }
            if let Ok(st) = table(mem, self.pool.pfn(s)) {
                for i in 0..512 {
                    let e = st.get(i);
                    if let (true, Some(c)) = (pte::present(e), self.pool.index_of(e & ADDR)) {
                        stack.push(c);
                    }
                }
            }
        }
        let victims: Vec<u64> = self
            .pool
            .used_frames()
            .filter(|(i, _)| !keep.get(*i as usize).copied().unwrap_or(true))
            .filter_map(|(_, m)| match m.owner {
                Owner::Table { pfn, .. } => Some(pfn),
                Owner::Split { .. } => None,
            })
            .collect();
        let mut used = false;
        for pfn in victims {
            used |= self.drop_shadow(mem, pfn);
            self.counters.reclaimed_tables += 1;
        }
        if used {
            // Reclaimed shadows are unreachable from loaded roots but may be reachable from
            // held ones (global translations): every vCPU.
            self.need_flush_on(self.all_vcpus(), FlushReason::Reclaim);
        }
    }

    /// Whether the entry kind of guest entry `g` at `level` is a table reference to a frame
    /// typed exactly one level down (used by walkers).
    pub(crate) fn table_child(&self, level: u8, g: u64) -> Option<u64> {
        match rules::entry_flags_allowed(level, g) {
            Ok(Kind::Table { pfn }) if self.frames.level(pfn) == Some(level - 1) => Some(pfn),
            _ => None,
        }
    }
}
