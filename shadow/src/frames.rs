//! Frame types: which guest RAM frames are page tables, at which level, pinned or not, and
//! which validated entries reference them (back-references, for relocation).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

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

/// Bookkeeping of one typed frame.
#[derive(Clone, Debug, Default)]
pub(crate) struct FrameInfo {
    /// 1..=4.
    pub level: u8,
    /// Pinned by the guest.
    pub pinned: bool,
    /// Guest-physical addresses of the validated entries referencing this table; the
    /// reference count is its length.
    pub parents: Vec<u64>,
    /// Pool index of this table's shadow, if built.
    pub shadow: Option<u32>,
}

/// The type of every RAM frame: a dense level byte (0 = untyped) for the hot checks, and
/// details for typed frames.
pub(crate) struct Frames {
    level: Vec<u8>,
    info: FrameMap<FrameInfo>,
}

impl Frames {
    /// Frames `0..end_pfn`.
    pub fn new(end_pfn: u64) -> Frames {
        Frames {
            level: vec![0; end_pfn as usize],
            info: FrameMap::default(),
        }
    }

    /// The type of `pfn`, if typed.
    pub fn level(&self, pfn: u64) -> Option<u8> {
        match usize::try_from(pfn).ok().and_then(|i| self.level.get(i)) {
            Some(&l) if l != 0 => Some(l),
            _ => None,
        }
    }

    /// Details of a typed frame.
    pub fn info(&self, pfn: u64) -> Option<&FrameInfo> {
        self.info.get(&pfn)
    }

    /// Mutable details of a typed frame.
    pub fn info_mut(&mut self, pfn: u64) -> Option<&mut FrameInfo> {
        self.info.get_mut(&pfn)
    }

    /// Gives `pfn` (a RAM frame) the type `level`. Returns false if `pfn` is out of range.
    pub fn set_type(&mut self, pfn: u64, info: FrameInfo) -> bool {
        match usize::try_from(pfn)
            .ok()
            .and_then(|i| self.level.get_mut(i))
        {
            Some(l) => {
                *l = info.level;
                self.info.insert(pfn, info);
                true
            }
            None => false,
        }
    }

    /// Removes the type of `pfn`, returning its details.
    pub fn clear_type(&mut self, pfn: u64) -> Option<FrameInfo> {
        if let Some(l) = usize::try_from(pfn)
            .ok()
            .and_then(|i| self.level.get_mut(i))
        {
            *l = 0;
        }
        self.info.remove(&pfn)
    }

    /// Every typed frame.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &FrameInfo)> {
        self.info.iter().map(|(k, v)| (*k, v))
    }

    /// Adds a back-reference to `pfn`.
    pub fn add_parent(&mut self, pfn: u64, entry: u64) {
        if let Some(i) = self.info.get_mut(&pfn) {
            i.parents.push(entry);
        }
    }

    /// Removes one back-reference; returns true if the frame is now unpinned and
    /// unreferenced (it must lose its type).
    pub fn remove_parent(&mut self, pfn: u64, entry: u64) -> bool {
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
mod tests {
    use super::*;

    #[test]
    fn typing_and_refs() {
        let mut f = Frames::new(16);
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
        f.add_parent(3, 0x1008);
        f.add_parent(3, 0x2008);
        assert!(!f.remove_parent(3, 0x1008));
        assert!(f.remove_parent(3, 0x2008));
        assert!(f.clear_type(3).is_some());
        assert_eq!(f.level(3), None);
        assert_eq!(f.level(u64::MAX), None);
    }
}
