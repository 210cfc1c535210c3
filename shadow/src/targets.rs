//! Flush targets: which vCPUs may hold a translation through a changed shadow entry.
//!
//! Per vCPU the engine keeps the loaded root and the roots the vCPU may still hold
//! translations for since its last full flush (`held`, the loaded one included). A CR3 load
//! drops a vCPU's non-global translations only, so a root that was loaded earlier (lazy TLB:
//! Linux keeps the old mm loaded while it runs kernel threads; a `NEW_BASEPTR` away from it)
//! can still be the source of *global* translations until that vCPU's next full flush.
//!
//! A change to an entry of guest table `T` targets vCPU `n` when a root that reaches `T`
//! (walking the validated back-references up to the L4s) is loaded on `n`, or is held on `n`
//! and the changed entry may have produced a global translation (a G leaf, or any non-leaf
//! entry, whose subtree may hold G leaves). Everything else is left alone: its TLB cannot
//! hold a translation made through `T`.

use crate::engine::ShadowMmu;

/// A set of vCPUs: bit `n` is vCPU `n` (the engine supports at most [`VcpuSet::MAX`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VcpuSet(pub u64);

impl VcpuSet {
    /// The most vCPUs a set (and so an engine) can name.
    pub const MAX: usize = 64;
    /// No vCPU.
    pub const EMPTY: VcpuSet = VcpuSet(0);

    /// The set holding only `v` (empty if `v` is out of range).
    pub fn one(v: usize) -> VcpuSet {
        VcpuSet(1u64.checked_shl(v as u32).unwrap_or(0))
    }

    /// The vCPUs `0..n`.
    pub fn first(n: usize) -> VcpuSet {
        if n >= Self::MAX {
            VcpuSet(u64::MAX)
        } else {
            VcpuSet((1u64 << n) - 1)
        }
    }

    /// Whether `v` is in the set.
    pub fn contains(self, v: usize) -> bool {
        !(self & VcpuSet::one(v)).is_empty()
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Number of vCPUs in the set.
    pub fn len(self) -> u32 {
        self.0.count_ones()
    }

    /// The set without `v`.
    pub fn without(self, v: usize) -> VcpuSet {
        VcpuSet(self.0 & !VcpuSet::one(v).0)
    }

    /// The members, in index order.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..Self::MAX).filter(move |&v| self.contains(v))
    }
}

impl core::ops::BitOr for VcpuSet {
    type Output = VcpuSet;
    fn bitor(self, o: VcpuSet) -> VcpuSet {
        VcpuSet(self.0 | o.0)
    }
}

impl core::ops::BitOrAssign for VcpuSet {
    fn bitor_assign(&mut self, o: VcpuSet) {
        self.0 |= o.0;
    }
}

impl core::ops::BitAnd for VcpuSet {
    type Output = VcpuSet;
    fn bitand(self, o: VcpuSet) -> VcpuSet {
        VcpuSet(self.0 & o.0)
    }
}

impl ShadowMmu {
    /// Every L4 frame from which guest table `pfn` is reachable through validated
    /// references (`pfn` itself if it is an L4).
    pub(crate) fn roots_reaching(&self, pfn: u64) -> Vec<u64> {
        let mut seen = vec![pfn];
        let mut stack = vec![pfn];
        let mut roots = Vec::new();
        while let Some(t) = stack.pop() {
            let Some(info) = self.frames.info(t) else {
                continue;
            };
            if info.level == 4 {
                roots.push(t);
                continue;
            }
            for p in &info.parents {
                let parent = p >> 12;
                if !seen.contains(&parent) {
                    seen.push(parent);
                    stack.push(parent);
                }
            }
        }
        roots
    }

    /// The vCPUs that may hold a translation made through an entry of guest table `pfn`;
    /// `global`: the entry may have produced a global translation (see the module doc).
    pub(crate) fn targets_of_table(&self, pfn: u64, global: bool) -> VcpuSet {
        let roots = self.roots_reaching(pfn);
        let mut set = VcpuSet::EMPTY;
        for (v, loaded) in self.roots.iter().enumerate() {
            let here = loaded.is_some_and(|r| roots.contains(&r))
                || (global
                    && self
                        .held
                        .get(v)
                        .is_some_and(|h| h.iter().any(|r| roots.contains(r))));
            if here {
                set |= VcpuSet::one(v);
            }
        }
        set
    }

    /// The vCPUs whose TLB may hold translations through the root loaded on `vcpu`: it is
    /// loaded there or held since their last full flush (`flush_target::ROOT`).
    pub(crate) fn vcpus_holding_root_of(&self, vcpu: usize) -> VcpuSet {
        let Some(root) = self.roots.get(vcpu).copied().flatten() else {
            return VcpuSet::one(vcpu);
        };
        let mut set = VcpuSet::one(vcpu);
        for (v, h) in self.held.iter().enumerate() {
            if self.roots.get(v) == Some(&Some(root)) || h.contains(&root) {
                set |= VcpuSet::one(v);
            }
        }
        set
    }

    /// Every vCPU of the engine.
    pub(crate) fn all_vcpus(&self) -> VcpuSet {
        VcpuSet::first(self.roots.len())
    }

    /// `vcpu` loaded `root` (`NEW_BASEPTR`, a `DETACH` switch): it joins the held roots.
    pub(crate) fn hold(&mut self, vcpu: usize, root: u64) {
        if let Some(h) = self.held.get_mut(vcpu) {
            if !h.contains(&root) {
                h.push(root);
            }
        }
    }

    /// `vcpu` performed a full flush: it holds translations of its loaded root only.
    pub(crate) fn flushed_fully(&mut self, vcpu: usize) {
        let loaded = self.roots.get(vcpu).copied().flatten();
        if let Some(h) = self.held.get_mut(vcpu) {
            h.clear();
            h.extend(loaded);
        }
    }

    /// L4 `pfn` lost its type without a flush: no vCPU holds translations through it.
    pub(crate) fn forget_root(&mut self, pfn: u64) {
        for (v, h) in self.held.iter_mut().enumerate() {
            if self.roots.get(v) != Some(&Some(pfn)) {
                h.retain(|&r| r != pfn);
            }
        }
    }

    /// The roots `vcpu` may hold translations for (the loaded one included), for tests and
    /// statistics.
    pub fn held_roots(&self, vcpu: usize) -> &[u64] {
        self.held.get(vcpu).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets() {
        let s = VcpuSet::one(0) | VcpuSet::one(3);
        assert!(s.contains(3) && !s.contains(1) && !s.contains(64));
        assert_eq!(s.len(), 2);
        assert_eq!(s.without(3), VcpuSet::one(0));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 3]);
        assert_eq!(VcpuSet::one(64), VcpuSet::EMPTY);
        assert_eq!(VcpuSet::first(2), VcpuSet(3));
        assert_eq!(VcpuSet::first(64), VcpuSet(u64::MAX));
        assert!(VcpuSet::EMPTY.is_empty());
    }
}
