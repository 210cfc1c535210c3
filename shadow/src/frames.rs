//! Frame types: which guest RAM frames are page tables, at which level, pinned or not, and
//! which validated entries reference them (back-references, for relocation).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;

use crate::layout::Layout;

/// A tiny multiplicative hasher for frame numbers (keys are trusted-size integers).
#[derive(Default, Clone, Copy)]
pub(crate) struct FrameHasher(u64);

impl Hasher for FrameHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

/// A `HashMap` keyed by frame numbers.
pub(crate) type FrameMap<V> = HashMap<u64, V, BuildHasherDefault<FrameHasher>>;

/// Bookkeeping of one typed frame (its level and shadow are in the dense word).
#[derive(Clone, Debug, Default)]
pub(crate) struct FrameInfo {
    /// 1..=4.
    pub level: u8,
    /// Pinned by the guest.
    pub pinned: bool,
    /// Guest-physical addresses of the validated entries referencing this table; the
    /// reference count is its length.
    pub parents: Vec<u64>,
}

/// Dense word bits: the level (0 = untyped).
const LEVEL: u32 = 0x7;
/// Dense word bit: the frame is not usable RAM (hole, reserved, pool).
const NOT_RAM: u32 = 0x8;
/// Dense word: shadow pool index + 1 from this bit up (0 = no shadow); pool indices are
/// below 2^22 (`Layout::validated`), so they fit.
const SHADOW_SHIFT: u32 = 8;

/// The type of every RAM frame. One dense 32-bit word per frame below the end of RAM holds
/// what the update path reads (level, whether it is usable RAM, the shadow's pool index),
/// so checking a target frame or opening a table's shadow costs one load; details of typed
/// frames (pin, back-references) are in a map.
pub(crate) struct Frames {
    words: Vec<u32>,
    info: FrameMap<FrameInfo>,
    /// Bumped by every change of a type or a back-reference (see [`Frames::generation`]).
    generation: u64,
}

impl Frames {
    /// Frames `0..layout.ram_end_pfn()` of a validated layout. Only frames that are not
    /// usable RAM are written here (the zeroed vector stays untouched, so unwritten pages
    /// of it cost no memory).
    pub fn new(layout: &Layout) -> Frames {
        let end = layout.ram_end_pfn();
        let mut words = vec![0u32; end as usize];
        let mut mark = |r: Range<u64>| {
            let (a, b) = ((r.start >> 12).min(end), r.end.div_ceil(4096).min(end));
            if let Some(w) = words.get_mut(a as usize..b as usize) {
                w.fill(NOT_RAM);
            }
        };
        let mut at = 0;
        for r in &layout.ram {
            mark(at..r.start.max(at));
            at = at.max(r.end);
        }
        layout.reserved.iter().cloned().for_each(&mut mark);
        mark(layout.pool_range());
        Frames {
            words,
            info: FrameMap::default(),
            generation: 0,
        }
    }

    #[inline]
    fn word(&self, pfn: u64) -> u32 {
        usize::try_from(pfn)
            .ok()
            .and_then(|i| self.words.get(i))
            .copied()
            .unwrap_or(NOT_RAM)
    }

    #[inline]
    fn word_mut(&mut self, pfn: u64) -> Option<&mut u32> {
        usize::try_from(pfn)
            .ok()
            .and_then(|i| self.words.get_mut(i))
    }

    /// The type of `pfn`, if typed.
    #[inline]
    pub fn level(&self, pfn: u64) -> Option<u8> {
        match (self.word(pfn) & LEVEL) as u8 {
            0 => None,
            l => Some(l),
        }
    }

    /// Whether `pfn` is usable RAM: exactly `layout.classify(pfn) == FrameClass::Ram`.
    #[inline]
    pub fn is_ram(&self, pfn: u64) -> bool {
        self.word(pfn) & NOT_RAM == 0
    }

    /// Whether `pfn` is usable RAM and untyped (so it has no shadow either), in one load.
    #[inline]
    pub fn is_untyped_ram(&self, pfn: u64) -> bool {
        self.word(pfn) & (LEVEL | NOT_RAM) == 0
    }

    /// The type of `pfn` (if typed) and the pool index of its shadow (if built), in one load.
    #[inline]
    pub fn table(&self, pfn: u64) -> Option<(u8, Option<u32>)> {
        let w = self.word(pfn);
        let level = (w & LEVEL) as u8;
        (level != 0).then(|| (level, (w >> SHADOW_SHIFT).checked_sub(1)))
    }

    /// The pool index of the shadow of `pfn`, if typed and built.
    #[inline]
    pub fn shadow(&self, pfn: u64) -> Option<u32> {
        self.table(pfn).and_then(|(_, s)| s)
    }

    /// Records the shadow of typed frame `pfn` (`None`: dropped). Untyped frames have none.
    pub fn set_shadow(&mut self, pfn: u64, shadow: Option<u32>) {
        if let Some(w) = self.word_mut(pfn).filter(|w| **w & LEVEL != 0) {
            let s = shadow.map_or(0, |s| (s + 1) << SHADOW_SHIFT);
            *w = (*w & ((1 << SHADOW_SHIFT) - 1)) | s;
        }
    }

    /// Takes the shadow of `pfn` (it has none afterwards).
    pub fn take_shadow(&mut self, pfn: u64) -> Option<u32> {
        let s = self.shadow(pfn);
        self.set_shadow(pfn, None);
        s
    }

    /// Details of a typed frame.
    #[inline]
    pub fn info(&self, pfn: u64) -> Option<&FrameInfo> {
        self.info.get(&pfn)
    }

    /// Changes whenever a frame gains or loses a type or a back-reference (and at every
    /// mutable access to details): what is derived from the reference graph (flush targets)
    /// stays valid while it is unchanged.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Mutable details of a typed frame.
    pub fn info_mut(&mut self, pfn: u64) -> Option<&mut FrameInfo> {
        self.generation += 1;
        self.info.get_mut(&pfn)
    }

    /// Gives `pfn` (a RAM frame) the type `level` (1..=4), without a shadow. Returns false
    /// if `pfn` is out of range.
    pub fn set_type(&mut self, pfn: u64, info: FrameInfo) -> bool {
        self.generation += 1;
        match self.word_mut(pfn) {
            Some(w) => {
                *w = (*w & NOT_RAM) | (u32::from(info.level) & LEVEL);
                self.info.insert(pfn, info);
                true
            }
            None => false,
        }
    }

    /// Removes the type (and the shadow record) of `pfn`, returning its details.
    pub fn clear_type(&mut self, pfn: u64) -> Option<FrameInfo> {
        self.generation += 1;
        if let Some(w) = self.word_mut(pfn) {
            *w &= NOT_RAM;
        }
        self.info.remove(&pfn)
    }

    /// Every typed frame.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &FrameInfo)> {
        self.info.iter().map(|(k, v)| (*k, v))
    }

    /// Adds a back-reference to `pfn`.
    pub fn add_parent(&mut self, pfn: u64, entry: u64) {
        self.generation += 1;
        if let Some(i) = self.info.get_mut(&pfn) {
            i.parents.push(entry);
        }
    }

    /// Removes one back-reference; returns true if the frame is now unpinned and
    /// unreferenced (it must lose its type).
    pub fn remove_parent(&mut self, pfn: u64, entry: u64) -> bool {
        self.generation += 1;
        match self.info.get_mut(&pfn) {
            Some(i) => {
                if let Some(pos) = i.parents.iter().rposition(|&p| p == entry) {
                    i.parents.swap_remove(pos);
                }
                i.parents.is_empty() && !i.pinned
            }
            None => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn typing_and_refs() {
        let layout = Layout {
            ram: vec![0..0x10_000],
            reserved: vec![],
            pool_base: 0x100_000,
            pool_frames: 4,
        };
        let mut f = Frames::new(&layout.validated().unwrap());
        assert_eq!(f.level(3), None);
        assert!(f.set_type(
            3,
            FrameInfo {
                level: 2,
                ..Default::default()
            }
        ));
        assert!(!f.set_type(
            99,
            FrameInfo {
                level: 2,
                ..Default::default()
            }
        ));
        assert_eq!(f.level(3), Some(2));
        assert_eq!(f.table(3), Some((2, None)));
        f.set_shadow(3, Some(7));
        assert_eq!(f.table(3), Some((2, Some(7))));
        f.set_shadow(4, Some(1));
        assert_eq!(f.shadow(4), None, "untyped frames have no shadow");
        assert_eq!(f.take_shadow(3), Some(7));
        assert_eq!(f.shadow(3), None);
        f.set_shadow(3, Some((1 << 22) - 1));
        assert_eq!(f.table(3), Some((2, Some((1 << 22) - 1))));
        f.add_parent(3, 0x1008);
        f.add_parent(3, 0x2008);
        assert!(!f.remove_parent(3, 0x1008));
        assert!(f.remove_parent(3, 0x2008));
        assert!(f.clear_type(3).is_some());
        assert_eq!(f.level(3), None);
        assert_eq!(f.table(3), None);
        assert_eq!(f.level(u64::MAX), None);
    }

    #[test]
    fn dense_ram_bit_is_the_layout_classification() {
        use crate::layout::FrameClass;
        let layout = Layout {
            ram: vec![0x10_0000..0x80_0000, 0..0x9_f000, 0x90_0000..0xa0_0000],
            reserved: vec![
                0xf_0000..0x10_0000,
                0x20_0000..0x20_3000,
                0x9f_f000..0xb0_0000,
            ],
            pool_base: 0x80_0000,
            pool_frames: 16,
        }
        .validated()
        .unwrap();
        let f = Frames::new(&layout);
        for pfn in (0..0xc00).chain([u64::MAX, u64::MAX >> 12]) {
            assert_eq!(
                f.is_ram(pfn),
                layout.classify(pfn) == FrameClass::Ram,
                "frame {pfn:#x}"
            );
        }
    }
}
