//! Lazy accessed/dirty propagation: `SYNC_AD` and `QUERY_AD` walk a VA range of the calling
//! vCPU's loaded address space and combine guest and shadow A/D bits.
//!
//! A 2 MiB guest leaf has one A/D pair: the OR over its 512 split shadow leaves. Touching
//! any page of it in a range processes the whole 2 MiB leaf once (clearing clears all 512).

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::engine::{ShadowMmu, R};
use crate::flush::FlushReason;
use crate::mem::{table, Mem, Table};
use crate::pte::{self, A, AD, ADDR, D, G};
use crate::rules::{self, Rule};

/// One guest leaf found in a range.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LeafAt {
    /// Guest table frame and index of the leaf entry.
    pub table: u64,
    /// Entry index.
    pub idx: usize,
    /// Pool index of the shadow L1 holding the shadow leaf (or the split), if any.
    pub shadow: Option<u32>,
    /// 2 MiB leaf.
    pub large: bool,
    /// First page of the range it covers (relative to the range start) and page count.
    pub first: u64,
    /// Pages of the range it covers.
    pub count: u64,
}

impl ShadowMmu {
    /// Every present guest leaf covering `va .. va + pages * 4096` in the address space
    /// rooted at guest L4 `root`.
    pub(crate) fn leaves_in<M: GuestMemory>(
        &self,
        mem: &Mem<'_, M>,
        root: u64,
        va: u64,
        pages: u64,
    ) -> Vec<LeafAt> {
        let mut out = Vec::new();
        let mut p = 0u64;
        while p < pages {
            let v = va.wrapping_add(p << 12);
            let skip = |shift: u32| {
                ((1u64 << (shift - 12)) - ((v >> 12) & ((1u64 << (shift - 12)) - 1))).max(1)
            };
            let idx = |shift: u32| ((v >> shift) & 511) as usize;
            let Ok(l4) = table(mem, root) else { break };
            let Some(l3) = self.table_child(4, l4.get(idx(39))) else {
                p += skip(39);
                continue;
            };
            let Ok(l3t) = table(mem, l3) else { break };
            let Some(l2) = self.table_child(3, l3t.get(idx(30))) else {
                p += skip(30);
                continue;
            };
            let Ok(l2t) = table(mem, l2) else { break };
            let e2 = l2t.get(idx(21));
            let n2 = skip(21).min(pages - p);
            if pte::present(e2) && pte::is_2m_leaf(2, e2) {
                let shadow = self
                    .frames
                    .shadow(l2)
                    .and_then(|s| table(mem, self.pool.pfn(s)).ok())
                    .map(|st| st.get(idx(21)))
                    .filter(|&s| pte::present(s))
                    .and_then(|s| self.pool.index_of(s & ADDR));
                out.push(LeafAt {
                    table: l2,
                    idx: idx(21),
                    shadow,
                    large: true,
                    first: p,
                    count: n2,
                });
                p += n2;
                continue;
            }
            let Some(l1) = self.table_child(2, e2) else {
                p += n2;
                continue;
            };
            let shadow = self.frames.shadow(l1);
            let Ok(l1t) = table(mem, l1) else { break };
            for k in 0..n2 {
                let i = idx(12) + k as usize;
                if pte::present(l1t.get(i)) {
                    out.push(LeafAt {
                        table: l1,
                        idx: i,
                        shadow,
                        large: false,
                        first: p + k,
                        count: 1,
                    });
                }
            }
            p += n2;
        }
        out
    }

    /// The guest table and shadow table of leaf `l`, reusing the previous leaf's when equal.
    #[allow(clippy::type_complexity)]
    fn open_leaf_tables<'m, 'c, M: GuestMemory>(
        &self,
        mem: &Mem<'m, M>,
        l: &LeafAt,
        gt: &'c mut Option<(u64, Table<'m>)>,
        st: &'c mut Option<(u32, Table<'m>)>,
    ) -> R<(&'c Table<'m>, Option<&'c Table<'m>>)> {
        if gt.as_ref().map(|c| c.0) != Some(l.table) {
            *gt = Some((l.table, table(mem, l.table)?));
        }
        match l.shadow {
            Some(s) if st.as_ref().map(|c| c.0) != Some(s) => {
                *st = Some((s, table(mem, self.pool.pfn(s))?));
            }
            _ => {}
        }
        let g = &gt.as_ref().ok_or(Rule::Unbacked)?.1;
        let s = match l.shadow {
            Some(_) => st.as_ref().map(|c| &c.1),
            None => None,
        };
        Ok((g, s))
    }

    fn root_of(&self, vcpu: usize) -> R<u64> {
        self.roots.get(vcpu).copied().flatten().ok_or(Rule::NoRoot)
    }

    /// The shadow A/D of a leaf whose shadow table is `st`, test-and-clearing `clear`.
    fn shadow_ad(st: Option<&Table<'_>>, l: &LeafAt, clear: u64) -> u64 {
        let Some(st) = st else {
            return 0;
        };
        let slots = if l.large { 0..512 } else { l.idx..l.idx + 1 };
        let mut ad = 0;
        for j in slots {
            let s = if clear != 0 {
                st.clear_bits(j, clear)
            } else {
                st.get(j)
            };
            if pte::present(s) {
                ad |= s & AD;
            }
        }
        ad
    }

    /// `SYNC_AD`: OR shadow A/D into the guest leaves of the range; with `clear_a`/`clear_d`,
    /// test-and-clear those bits in shadow and guest (a flush is needed for every bit that was
    /// set in a shadow: the TLB may hold it).
    pub(crate) fn sync_ad<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        vcpu: usize,
        va: u64,
        pages: u64,
        clear_a: bool,
        clear_d: bool,
    ) -> R<()> {
        let root = self.root_of(vcpu)?;
        let clear = if clear_a { A } else { 0 } | if clear_d { D } else { 0 };
        let (mut gt, mut st) = (None, None);
        for l in self.leaves_in(mem, root, va, pages) {
            let (gt, st) = self.open_leaf_tables(mem, &l, &mut gt, &mut st)?;
            let s = Self::shadow_ad(st, &l, clear);
            // The 4 KiB shadow leaf itself (its target), for a zap of what the host cached.
            let leaf = st.filter(|_| !l.large).map(|t| t.get(l.idx));
            let g = gt.get(l.idx);
            self.harvest(g, s, |_| 0);
            let new = (g | s) & !clear;
            if new != g {
                gt.set(l.idx, new);
            }
            if s & clear != 0 {
                let zapped = match (l.shadow, leaf) {
                    (Some(sidx), Some(e)) => self.host_forget_leaf(sidx, e),
                    (Some(sidx), None) => {
                        self.mark_stale(sidx);
                        false
                    }
                    _ => false,
                };
                self.pending.covering = zapped;
                self.need_flush(l.table, g & G != 0, FlushReason::AdCleared);
                self.pending.covering = false;
            }
        }
        Ok(())
    }

    /// `QUERY_AD`: write the accessed bitmap then the dirty bitmap of the range at
    /// `bitmap_gpa`; guest PTEs are not changed.
    pub(crate) fn query_ad<M: GuestMemory>(
        &mut self,
        mem: &Mem<'_, M>,
        vcpu: usize,
        va: u64,
        pages: u64,
        gpa: u64,
    ) -> R<()> {
        let root = self.root_of(vcpu)?;
        let len = hypercall::ad_bitmap_bytes(pages);
        rules::bitmap_in_ram(&self.layout, gpa, 2 * len)?;
        let typed = (gpa >> 12..=(gpa + 2 * len - 1) >> 12).any(|f| self.frames.level(f).is_some());
        rules::bitmap_not_in_table(typed)?;
        let mut bits = vec![0u8; 2 * len as usize];
        let (mut gt, mut st) = (None, None);
        for l in self.leaves_in(mem, root, va, pages) {
            let (gt, st) = self.open_leaf_tables(mem, &l, &mut gt, &mut st)?;
            let ad = (gt.get(l.idx) & AD) | Self::shadow_ad(st, &l, 0);
            for p in l.first..l.first + l.count {
                let (byte, bit) = ((p / 8) as usize, 1u8 << (p % 8));
                if ad & A != 0 {
                    if let Some(b) = bits.get_mut(byte) {
                        *b |= bit;
                    }
                }
                if ad & D != 0 {
                    if let Some(b) = bits.get_mut(len as usize + byte) {
                        *b |= bit;
                    }
                }
            }
        }
        mem.guest()
            .write_slice(&bits, GuestAddress(gpa))
            .map_err(|_| Rule::Unbacked)
    }
}
