//! The shadow pool: VMM-owned guest-physical frames holding shadow tables, with an owner
//! record per frame and the reverse map from guest frames to the shadow leaf slots whose
//! guest entry maps them writable.

/// Who a shadow table shadows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Owner {
    /// The shadow of guest table `pfn` at `level`.
    Table {
        /// Guest table frame number.
        pfn: u64,
        /// 1..=4.
        level: u8,
    },
    /// The split shadow L1 of the 2 MiB leaf at entry `idx` of guest L2 table `l2`.
    Split {
        /// Guest L2 frame number.
        l2: u64,
        /// Entry index in the L2.
        idx: u16,
    },
}

impl Owner {
    /// Whether this is the split table of a 2 MiB leaf.
    pub fn is_split(self) -> bool {
        matches!(self, Owner::Split { .. })
    }

    /// Level of the shadow table itself (splits are L1s).
    pub fn level(self) -> u8 {
        match self {
            Owner::Table { level, .. } => level,
            Owner::Split { .. } => 1,
        }
    }
}

/// Bookkeeping of a used pool frame.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Meta {
    /// What it shadows.
    pub owner: Owner,
    /// Op sequence number of the last op that built or touched it (never reclaimed then).
    pub epoch: u64,
}

/// A shadow leaf slot: pool index * 512 + entry index.
pub(crate) type Slot = u32;

/// The pool allocator and reverse map.
pub(crate) struct Pool {
    /// Guest-physical base.
    pub base: u64,
    /// Frames no translation cache can hold (never used, or freed before the last resync).
    free: Vec<u32>,
    /// Frames freed since the last host resync of their chunk: a hypervisor that caches
    /// translations from pool tables may still hold them, so they are reused only when
    /// `free` runs dry, and their chunk then becomes stale.
    dirty: Vec<u32>,
    /// Freed frames no one may reuse yet: the shadow roots a vCPU still runs on until its
    /// root switch (`DETACH`) is delivered. They join `dirty` on `release_held`.
    held: Vec<u32>,
    /// log2 of the frames per resync chunk (the unit the host re-registers; by default the
    /// whole pool): a shift, as marking is on the update path.
    granule_shift: u32,
    /// Per chunk: the host may cache a translation from one of its frames that the VMM
    /// has since changed (or a frame was reused): resync before any vCPU runs again.
    stale: Vec<bool>,
    /// The stale chunks, unordered, each once (what `stale` marks): the checks at the end
    /// of every batch cost the stale chunks, not the pool's size.
    stale_list: Vec<u32>,
    /// Debug: no chunk is ever marked stale (the model test's switched-off mechanism).
    pub(crate) skip_stale_marks: bool,
    /// A freed frame that held an entry the CPU used is marked stale when it is freed, not
    /// only when it is reused (the kernel flush zaps the stale frames: a translation made
    /// through a dropped shadow is flushed with it).
    pub(crate) stale_on_drop: bool,
    meta: Vec<Option<Meta>>,
    used: u64,
    high_water: u64,
    /// Used frames holding the shadow of a guest table (not splits), and their peak.
    tables: u64,
    tables_high_water: u64,
    // Reverse map: a doubly linked list per guest frame of slots, stored as slot + 1 (0 = nil).
    heads: Vec<u32>,
    /// Per slot, its links (one record, so linking or unlinking a slot touches one line).
    links: Vec<Link>,
}

/// The reverse-map record of one slot.
#[derive(Clone, Copy, Debug, Default)]
struct Link {
    next: u32,
    prev: u32,
    /// Target frame + 1 while in the reverse map, 0 if not linked (frames are below 2^28:
    /// RAM ends below 1 TiB).
    target: u32,
}

impl Pool {
    /// A pool of `frames` frames at `base` and a reverse map over guest frames `0..end_pfn`.
    pub fn new(base: u64, frames: u64, end_pfn: u64) -> Pool {
        let slots = frames as usize * 512;
        Pool {
            base,
            free: (0..frames as u32).rev().collect(),
            dirty: Vec::new(),
            held: Vec::new(),
            granule_shift: (frames.max(1) as u32).next_power_of_two().trailing_zeros(),
            stale: vec![false],
            stale_list: Vec::new(),
            skip_stale_marks: false,
            stale_on_drop: false,
            meta: vec![None; frames as usize],
            used: 0,
            high_water: 0,
            tables: 0,
            tables_high_water: 0,
            heads: vec![0; end_pfn as usize],
            links: vec![Link::default(); slots],
        }
    }

    /// Total frames.
    pub fn total(&self) -> u64 {
        self.meta.len() as u64
    }

    /// Frames in use.
    #[inline]
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Most frames ever in use.
    #[inline]
    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    /// Frames in use holding the shadow of a guest table (split tables excluded).
    #[inline]
    pub fn tables(&self) -> u64 {
        self.tables
    }

    /// Most guest-table shadows ever in use at once.
    #[inline]
    pub fn tables_high_water(&self) -> u64 {
        self.tables_high_water
    }

    /// Frame number of pool frame `idx`.
    #[inline]
    pub fn pfn(&self, idx: u32) -> u64 {
        (self.base >> 12) + u64::from(idx)
    }

    /// Pool index of guest-physical address `gpa`, if inside the pool.
    #[inline]
    pub fn index_of(&self, gpa: u64) -> Option<u32> {
        let off = gpa.checked_sub(self.base)? >> 12;
        (off < self.total()).then_some(off as u32)
    }

    /// Takes a free frame (the caller zeroes it), or `None`.
    pub fn alloc(&mut self, owner: Owner, epoch: u64) -> Option<u32> {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = self.dirty.pop()?;
                self.mark_stale(i);
                i
            }
        };
        if let Some(m) = self.meta.get_mut(idx as usize) {
            *m = Some(Meta { owner, epoch });
        }
        self.used += 1;
        self.high_water = self.high_water.max(self.used);
        if matches!(owner, Owner::Table { .. }) {
            self.tables += 1;
            self.tables_high_water = self.tables_high_water.max(self.tables);
        }
        Some(idx)
    }

    /// Returns a frame (its slots must already be unlinked from the reverse map).
    pub fn free(&mut self, idx: u32) {
        if self.unaccount(idx) {
            self.dirty.push(idx);
        }
    }

    /// Returns a frame that must not be reused before [`Pool::release_held`] (a shadow
    /// root a vCPU still runs on).
    pub fn free_held(&mut self, idx: u32) {
        if self.unaccount(idx) {
            self.held.push(idx);
        }
    }

    /// How many frames are held from reuse.
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// The held frames may be reused (as dirty frames: a translation cache may hold them).
    pub fn release_held(&mut self) {
        self.dirty.append(&mut self.held);
    }

    /// Takes frame `idx` out of use; whether it was in use.
    fn unaccount(&mut self, idx: u32) -> bool {
        let Some(old) = self.meta.get_mut(idx as usize).and_then(Option::take) else {
            return false;
        };
        self.used -= 1;
        if matches!(old.owner, Owner::Table { .. }) {
            self.tables -= 1;
        }
        true
    }

    /// Splits the pool into resync chunks of `frames` frames rounded up to a power of two
    /// (at least 1; the last chunk may be shorter). Every chunk starts clean.
    pub fn set_granule(&mut self, frames: u32) {
        self.granule_shift = frames.max(1).next_power_of_two().trailing_zeros();
        let chunks = self.total().div_ceil(1 << self.granule_shift).max(1);
        self.stale = vec![false; chunks as usize];
        self.stale_list.clear();
    }

    /// Frames per resync chunk (a power of two).
    pub fn granule(&self) -> u32 {
        1 << self.granule_shift
    }

    /// The host may cache a translation from pool frame `idx` that no longer holds: its
    /// chunk must be resynced before any vCPU runs again.
    #[inline]
    pub fn mark_stale(&mut self, idx: u32) {
        if self.skip_stale_marks {
            return;
        }
        let c = idx >> self.granule_shift;
        if let Some(s) = self.stale.get_mut(c as usize) {
            if !*s {
                *s = true;
                self.stale_list.push(c);
            }
        }
    }

    /// Resync chunks in all.
    pub fn chunk_count(&self) -> usize {
        self.stale.len()
    }

    /// Whether any chunk is stale.
    pub fn resync_needed(&self) -> bool {
        !self.stale_list.is_empty()
    }

    /// The stale chunks, in order.
    pub fn stale_chunks(&self) -> Vec<u32> {
        let mut v = self.stale_list.clone();
        v.sort_unstable();
        v
    }

    /// The hypervisor dropped what it cached from the frames of `chunks`: they are clean,
    /// and so are the freed frames in them.
    pub fn resynced_chunks(&mut self, chunks: &[u32]) {
        let mut clean: Vec<u32> = chunks
            .iter()
            .copied()
            .filter(|&c| (c as usize) < self.stale.len())
            .collect();
        clean.sort_unstable();
        clean.dedup();
        for &c in &clean {
            if let Some(s) = self.stale.get_mut(c as usize) {
                *s = false;
            }
        }
        let stale = &self.stale;
        self.stale_list
            .retain(|&c| stale.get(c as usize).copied().unwrap_or(false));
        let g = self.granule_shift;
        let in_clean = |i: u32| clean.binary_search(&(i >> g)).is_ok();
        let (now_free, dirty): (Vec<u32>, Vec<u32>) =
            self.dirty.iter().partition(|&&i| in_clean(i));
        self.dirty = dirty;
        self.free.extend(now_free);
    }

    /// The hypervisor dropped every translation it cached from the pool.
    pub fn resynced(&mut self) {
        self.free.append(&mut self.dirty);
        for c in self.stale_list.drain(..) {
            if let Some(s) = self.stale.get_mut(c as usize) {
                *s = false;
            }
        }
    }

    /// Owner record of pool frame `idx`.
    #[inline]
    pub fn meta(&self, idx: u32) -> Option<Meta> {
        self.meta.get(idx as usize).copied().flatten()
    }

    /// Mutable owner record.
    #[inline]
    pub fn meta_mut(&mut self, idx: u32) -> Option<&mut Meta> {
        self.meta.get_mut(idx as usize).and_then(|m| m.as_mut())
    }

    /// Marks a shadow as used by the current op.
    #[inline]
    pub fn touch(&mut self, idx: u32, epoch: u64) {
        if let Some(m) = self.meta_mut(idx) {
            m.epoch = epoch;
        }
    }

    /// Every used pool index with its record.
    pub fn used_frames(&self) -> impl Iterator<Item = (u32, Meta)> + '_ {
        self.meta
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.map(|m| (i as u32, m)))
    }

    /// Links `slot` into the reverse map of guest frame `pfn`.
    #[inline(always)]
    pub fn rmap_add(&mut self, slot: Slot, pfn: u64) {
        let Some(head) = usize::try_from(pfn)
            .ok()
            .and_then(|p| self.heads.get_mut(p))
        else {
            return;
        };
        let Some(link) = self.links.get_mut(slot as usize).filter(|l| l.target == 0) else {
            return;
        };
        let old = *head;
        *head = slot + 1;
        // `pfn` indexes `heads` (below 2^28 frames): `pfn + 1` fits.
        *link = Link {
            next: old,
            prev: 0,
            target: pfn as u32 + 1,
        };
        if let Some(l) = old
            .checked_sub(1)
            .and_then(|o| self.links.get_mut(o as usize))
        {
            l.prev = slot + 1;
        }
    }

    /// Unlinks `slot` from the reverse map, if linked.
    #[inline(always)]
    pub fn rmap_remove(&mut self, slot: Slot) {
        let Some(link) = self.links.get_mut(slot as usize).filter(|l| l.target != 0) else {
            return;
        };
        let Link { next, prev, target } = std::mem::take(link);
        match prev.checked_sub(1) {
            Some(p) => {
                if let Some(l) = self.links.get_mut(p as usize) {
                    l.next = next;
                }
            }
            None => {
                if let Some(h) = self.heads.get_mut(target as usize - 1) {
                    *h = next;
                }
            }
        }
        if let Some(l) = next
            .checked_sub(1)
            .and_then(|n| self.links.get_mut(n as usize))
        {
            l.prev = prev;
        }
    }

    /// Whether `slot` is in the reverse map.
    #[inline]
    pub fn rmap_linked(&self, slot: Slot) -> bool {
        self.links.get(slot as usize).is_some_and(|l| l.target != 0)
    }

    /// The first slot of the reverse map of `pfn`.
    pub fn rmap_first(&self, pfn: u64) -> Option<Slot> {
        let h = *self.heads.get(usize::try_from(pfn).ok()?)?;
        h.checked_sub(1)
    }

    /// The slot after `slot` in its reverse-map list.
    pub fn rmap_next(&self, slot: Slot) -> Option<Slot> {
        self.links.get(slot as usize)?.next.checked_sub(1)
    }

    /// The slots whose guest entry maps `pfn` writable.
    #[cfg(test)]
    pub fn rmap_slots(&self, pfn: u64) -> Vec<Slot> {
        let mut out = Vec::new();
        let mut cur = self.heads.get(pfn as usize).copied().unwrap_or(0);
        while cur != 0 && out.len() <= self.links.len() {
            out.push(cur - 1);
            cur = self.links.get(cur as usize - 1).map_or(0, |l| l.next);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_frames_wait_for_a_resync() {
        let mut p = Pool::new(0x1000_0000, 2, 16);
        let a = p.alloc(Owner::Table { pfn: 1, level: 1 }, 0).unwrap();
        let b = p.alloc(Owner::Table { pfn: 1, level: 1 }, 0).unwrap();
        p.free(a);
        assert!(!p.resync_needed(), "freeing alone needs no resync");
        // Only dirty frames left: reusing one needs a resync.
        assert_eq!(p.alloc(Owner::Table { pfn: 1, level: 1 }, 0), Some(a));
        assert!(p.resync_needed());
        assert!(p.resync_needed(), "until resynced");
        p.free(a);
        p.free(b);
        p.resynced();
        assert!(p.alloc(Owner::Table { pfn: 1, level: 1 }, 0).is_some());
        assert!(!p.resync_needed(), "clean after a resync");
    }

    #[test]
    fn only_resynced_chunks_come_clean() {
        let t = Owner::Table { pfn: 1, level: 1 };
        let mut p = Pool::new(0x1000_0000, 4, 16);
        p.set_granule(2);
        let f: Vec<u32> = (0..4).map(|_| p.alloc(t, 0).unwrap()).collect();
        assert_eq!(f, [0, 1, 2, 3]);
        p.mark_stale(3);
        assert_eq!(p.stale_chunks(), [1]);
        p.free(0);
        p.free(2);
        p.resynced_chunks(&[1]);
        assert!(!p.resync_needed());
        // Frame 2 (chunk 1) is clean; frame 0 (chunk 0, never resynced) is still dirty.
        assert_eq!(p.alloc(t, 0), Some(2));
        assert!(!p.resync_needed());
        assert_eq!(p.alloc(t, 0), Some(0));
        assert_eq!(
            p.stale_chunks(),
            [0],
            "reusing a dirty frame makes its chunk stale"
        );
    }

    #[test]
    fn alloc_free_and_rmap() {
        let mut p = Pool::new(0x10_0000, 2, 64);
        let o = Owner::Table { pfn: 1, level: 1 };
        let a = p.alloc(o, 0).unwrap();
        let b = p.alloc(o, 0).unwrap();
        assert!(p.alloc(o, 0).is_none());
        assert_eq!(p.used(), 2);
        assert_eq!(p.pfn(a), 0x100);
        assert_eq!(p.index_of(0x10_1008), Some(1));
        assert_eq!(p.index_of(0x10_2000), None);
        p.rmap_add(a * 512 + 3, 7);
        p.rmap_add(b * 512 + 4, 7);
        p.rmap_add(b * 512 + 5, 7);
        assert_eq!(p.rmap_slots(7).len(), 3);
        p.rmap_remove(b * 512 + 4);
        p.rmap_remove(b * 512 + 4);
        let mut s = p.rmap_slots(7);
        s.sort();
        assert_eq!(s, vec![a * 512 + 3, b * 512 + 5]);
        p.rmap_remove(b * 512 + 5);
        p.rmap_remove(a * 512 + 3);
        assert!(p.rmap_slots(7).is_empty());
        assert_eq!(p.tables(), 2);
        p.free(a);
        p.free(a);
        assert_eq!(p.used(), 1);
        assert_eq!(p.tables(), 1);
        assert_eq!(p.high_water(), 2);
        assert_eq!(p.tables_high_water(), 2);
        p.free(b);
        let s = p.alloc(Owner::Split { l2: 1, idx: 0 }, 0).unwrap();
        assert_eq!(
            (p.used(), p.tables()),
            (1, 0),
            "splits are not table shadows"
        );
        p.free(s);
        assert_eq!((p.used(), p.tables()), (0, 0));
    }
}
