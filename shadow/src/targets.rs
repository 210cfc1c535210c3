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
use crate::vcpuset::VcpuSet;

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
        let generation = self.targets_generation();
        if let Some(set) = self.targets_memo.get(pfn, global, generation) {
            #[cfg(test)]
            assert_eq!(
                set,
                self.compute_targets(pfn, global),
                "stale flush targets"
            );
            return set;
        }
        let set = self.compute_targets(pfn, global);
        self.targets_memo.put(pfn, global, generation, set);
        set
    }

    /// What the remembered flush targets depend on: changes whenever a type, a
    /// back-reference, a loaded root or a held root changes.
    fn targets_generation(&self) -> u64 {
        self.frames.generation().wrapping_add(self.roots_generation)
    }

    /// A loaded or held root changed (remembered flush targets are stale).
    pub(crate) fn roots_changed(&mut self) {
        self.roots_generation += 1;
    }

    /// [`Self::targets_of_table`], computed.
    fn compute_targets(&self, pfn: u64, global: bool) -> VcpuSet {
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
        self.roots_changed();
        if let Some(h) = self.held.get_mut(vcpu) {
            if !h.contains(&root) {
                h.push(root);
            }
        }
    }

    /// `vcpu` performed a full flush: it holds translations of its loaded root only.
    pub(crate) fn flushed_fully(&mut self, vcpu: usize) {
        self.roots_changed();
        let loaded = self.roots.get(vcpu).copied().flatten();
        if let Some(h) = self.held.get_mut(vcpu) {
            h.clear();
            h.extend(loaded);
        }
    }

    /// L4 `pfn` lost its type without a flush: no vCPU holds translations through it.
    pub(crate) fn forget_root(&mut self, pfn: u64) {
        self.roots_changed();
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
