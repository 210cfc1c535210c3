//! Test and debugging helpers: translation through the shadow, shadow leaf slots, and the
//! invariant checker the property test runs after every op. Not part of the VMM API.

use vm_memory::GuestMemory;

use crate::engine::ShadowMmu;
use crate::layout::FrameClass;
use crate::mem::table;
use crate::pool::Owner;
use crate::pte::{self, Kind, AD, ADDR, RW};
use crate::rules;

/// A shadow leaf found by [`ShadowMmu::debug_translate`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowLeaf {
    /// Guest-physical address of the shadow leaf slot (inside the pool).
    pub slot_gpa: u64,
    /// Its value.
    pub value: u64,
    /// AND of RW over the walk (non-leaf entries included).
    pub writable: bool,
    /// AND of US over the walk.
    pub user: bool,
}

impl ShadowMmu {
    /// Walks `va` through `vcpu`'s shadow like the CPU would (reading pool memory).
    #[doc(hidden)]
    pub fn debug_translate<M: GuestMemory>(
        &self,
        mem: &M,
        vcpu: usize,
        va: u64,
    ) -> Option<ShadowLeaf> {
        let root = self.loaded_root(vcpu)?.shadow_root;
        let mut t = root >> 12;
        let (mut w, mut u) = (true, true);
        for level in (1..=4u8).rev() {
            let idx = ((va >> (12 + 9 * (u32::from(level) - 1))) & 511) as usize;
            self.pool.index_of(t << 12)?;
            let e = table(mem, t).ok()?.get(idx);
            if !pte::present(e) {
                return None;
            }
            w &= e & RW != 0;
            u &= e & pte::US != 0;
            if level == 1 {
                return Some(ShadowLeaf {
                    slot_gpa: (t << 12) + 8 * idx as u64,
                    value: e,
                    writable: w,
                    user: u,
                });
            }
            t = pte::pfn_of(e);
        }
        None
    }

    /// Guest-physical addresses of every present shadow leaf slot in the pool.
    #[doc(hidden)]
    pub fn debug_shadow_leaf_slots<M: GuestMemory>(&self, mem: &M) -> Vec<u64> {
        let mut out = Vec::new();
        for (idx, m) in self.pool.used_frames() {
            if m.owner.level() != 1 {
                continue;
            }
            if let Ok(st) = table(mem, self.pool.pfn(idx)) {
                for i in 0..512 {
                    if pte::present(st.get(i)) {
                        out.push((self.pool.pfn(idx) << 12) + 8 * i as u64);
                    }
                }
            }
        }
        out
    }

    /// Checks every structural invariant; `Err` describes the first violation.
    #[doc(hidden)]
    pub fn check_invariants<M: GuestMemory>(&self, mem: &M) -> Result<(), String> {
        let err = |s: String| Err(s);
        // Reference counts equal the validated entries pointing at each table.
        let mut refs: std::collections::HashMap<u64, usize> = Default::default();
        for (pfn, info) in self.frames.iter() {
            let g = table(mem, pfn)
                .map_err(|r| r.name().to_string())?
                .snapshot();
            for (i, &e) in g.iter().enumerate() {
                let kind = self
                    .check_entry(info.level, pfn, e)
                    .map_err(|r| format!("typed {pfn:#x}[{i}] = {e:#x} breaks {}", r.name()))?;
                if let Kind::Table { pfn: c } = kind {
                    if self.frames.level(c) != Some(info.level - 1) {
                        return err(format!("{pfn:#x}[{i}] references untyped/wrong {c:#x}"));
                    }
                    *refs.entry(c).or_default() += 1;
                }
            }
            if let Some(s) = info.shadow {
                match self.pool.meta(s) {
                    Some(m)
                        if m.owner
                            == Owner::Table {
                                pfn,
                                level: info.level,
                            } => {}
                    m => return err(format!("shadow of {pfn:#x} has owner {m:?}")),
                }
            }
        }
        for (pfn, info) in self.frames.iter() {
            let n = refs.get(&pfn).copied().unwrap_or(0);
            if n != info.parents.len() {
                return err(format!(
                    "{pfn:#x}: {n} refs, {} back-references",
                    info.parents.len()
                ));
            }
            if n == 0 && !info.pinned {
                return err(format!("{pfn:#x} typed without pin or reference"));
            }
        }
        // Every shadow entry matches its guest entry.
        for (idx, m) in self.pool.used_frames() {
            let st = table(mem, self.pool.pfn(idx)).map_err(|r| r.name().to_string())?;
            let (gpfn, level, split) = match m.owner {
                Owner::Table { pfn, level } => (pfn, level, None),
                Owner::Split { l2, idx } => (l2, 1, Some(usize::from(idx))),
            };
            if split.is_none() && self.frames.info(gpfn).and_then(|i| i.shadow) != Some(idx) {
                return err(format!("orphan shadow {idx} of {gpfn:#x}"));
            }
            let gt = table(mem, gpfn).map_err(|r| r.name().to_string())?;
            for i in 0..512 {
                let s = st.get(i);
                let slot = idx * 512 + i as u32;
                let g = match split {
                    Some(j) => {
                        let e = gt.get(j);
                        if !pte::is_2m_leaf(2, e) || !pte::present(e) {
                            return err(format!("split {idx} for non-2M {gpfn:#x}[{j}]"));
                        }
                        pte::split_leaf(e, i as u64)
                    }
                    None => gt.get(i),
                };
                let kind = if split.is_some() {
                    Kind::Leaf4k {
                        pfn: pte::pfn_of(g),
                    }
                } else {
                    self.check_entry(level, gpfn, g)
                        .map_err(|r| r.name().to_string())?
                };
                let here = || format!("shadow {idx} ({m:?}) [{i}] s={s:#x} g={g:#x}");
                match kind {
                    Kind::NotPresent => {
                        if s != 0 {
                            return err(format!(
                                "{}: present shadow for absent guest entry",
                                here()
                            ));
                        }
                    }
                    Kind::Leaf4k { pfn } => {
                        if self.layout.classify(pfn) != FrameClass::Ram {
                            return err(format!("{}: leaf maps non-RAM", here()));
                        }
                        let typed = self.frames.level(pfn).is_some();
                        if s & RW != 0 && typed {
                            return err(format!("{}: writable leaf maps a page table", here()));
                        }
                        let mask = pte::SHADOW_LEAF_KEEP & !RW;
                        if (s & mask) != (g & mask) || (s & RW != 0) != (g & RW != 0 && !typed) {
                            return err(format!("{}: leaf mismatch", here()));
                        }
                        if self.pool.rmap_linked(slot) != (g & RW != 0) {
                            return err(format!("{}: reverse map mismatch", here()));
                        }
                        if s & !(pte::SHADOW_LEAF_KEEP | AD) != 0 {
                            return err(format!("{}: stray bits", here()));
                        }
                    }
                    Kind::Leaf2m { .. } => {
                        let child = self.pool.index_of(s & ADDR).and_then(|c| self.pool.meta(c));
                        let want = Owner::Split {
                            l2: gpfn,
                            idx: i as u16,
                        };
                        if !pte::present(s) || child.map(|c| c.owner) != Some(want) {
                            return err(format!("{}: 2M leaf without its split", here()));
                        }
                    }
                    Kind::Table { pfn } => {
                        let cs = self.frames.info(pfn).and_then(|f| f.shadow);
                        let want = cs.map(|c| self.pool.pfn(c) << 12);
                        if !pte::present(s) || Some(s & ADDR) != want {
                            return err(format!(
                                "{}: non-leaf does not point at child shadow {cs:?}",
                                here()
                            ));
                        }
                        let keep = pte::SHADOW_NONLEAF_KEEP;
                        if s & keep != g & keep {
                            return err(format!("{}: non-leaf flags mismatch", here()));
                        }
                    }
                }
            }
        }
        // Loaded roots are pinned L4s with shadows.
        for (v, r) in self.roots.iter().enumerate() {
            if let Some(r) = r {
                if rules::baseptr_allowed(
                    self.frames.level(*r),
                    self.frames.info(*r).is_some_and(|i| i.pinned),
                )
                .is_err()
                {
                    return err(format!("vcpu {v} root {r:#x} is not a pinned L4"));
                }
            }
        }
        Ok(())
    }
}
