//! The engine's invariant checker: everything the isolation promise rests on, re-derived
//! from guest memory, the frame records and the pool. Cheap enough to run after every
//! batch in a debug mode of the VMM (one pass over every typed table and every pool frame,
//! no allocation per entry).

use std::collections::HashMap;

use vm_memory::GuestMemory;

use crate::engine::ShadowMmu;
use crate::layout::FrameClass;
use crate::mem::{table, Mem, Table};
use crate::pool::{Meta, Owner};
use crate::pte::{self, Kind, A, AD, ADDR, RW};
use crate::rules::{self, Rule};

/// Which invariant an [`InvariantViolation`] breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InvariantKind {
    /// A typed guest table holds a present entry the rules refuse, or a non-leaf entry to
    /// a frame not typed one level down: a word that was never validated.
    UnvalidatedEntry,
    /// Back-references (reference counts) disagree with the validated entries, or a frame
    /// is typed without pin or reference.
    References,
    /// A shadow leaf is writable onto a page-table frame.
    WritableTable,
    /// A shadow leaf maps the shadow pool or anything else that is not guest RAM.
    MapsNonRam,
    /// A shadow entry is not the one derived from its validated guest entry (including a
    /// shadow non-leaf entry without a recorded back-reference).
    ShadowMismatch,
    /// Pool bookkeeping is inconsistent: owners, orphan shadows, the reverse map, counts.
    Pool,
    /// A vCPU's loaded root is not a pinned L4 with a shadow.
    Root,
    /// A vCPU whose root switch is lazy runs on a freed root that translates differently
    /// from its kernel root: a user entry left, or a kernel-half entry that differs.
    LazyRemnant,
    /// Memory the checker had to read is not backed by the memory object.
    Unbacked,
}

impl InvariantKind {
    /// Short name (for logs and exit messages).
    pub const fn name(self) -> &'static str {
        match self {
            InvariantKind::UnvalidatedEntry => "unvalidated_entry",
            InvariantKind::References => "references",
            InvariantKind::WritableTable => "writable_table",
            InvariantKind::MapsNonRam => "maps_non_ram",
            InvariantKind::ShadowMismatch => "shadow_mismatch",
            InvariantKind::Pool => "pool",
            InvariantKind::Root => "root",
            InvariantKind::LazyRemnant => "lazy_remnant",
            InvariantKind::Unbacked => "unbacked",
        }
    }
}

/// The first invariant violation [`ShadowMmu::check_invariants`] found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("shadow invariant `{}` violated: {detail}", kind.name())]
pub struct InvariantViolation {
    /// Which invariant.
    pub kind: InvariantKind,
    /// Where and how (frames, indices, entry values).
    pub detail: String,
}

impl From<InvariantViolation> for String {
    fn from(v: InvariantViolation) -> String {
        v.to_string()
    }
}

type Check = Result<(), InvariantViolation>;

fn fail(kind: InvariantKind, detail: String) -> Check {
    Err(InvariantViolation { kind, detail })
}

fn open<'m, M: GuestMemory>(mem: &Mem<'m, M>, pfn: u64) -> Result<Table<'m>, InvariantViolation> {
    table(mem, pfn).map_err(|r: Rule| InvariantViolation {
        kind: InvariantKind::Unbacked,
        detail: format!("frame {pfn:#x}: {}", r.name()),
    })
}

impl ShadowMmu {
    /// Checks every invariant the isolation promise rests on; `Err` describes the first
    /// violation. Covered:
    /// * every present entry of every typed table passes the rules, and non-leaf entries
    ///   reference tables typed exactly one level down ([`InvariantKind::UnvalidatedEntry`]);
    /// * each typed frame's back-references are exactly the entries referencing it, and it
    ///   has a pin or a reference ([`InvariantKind::References`]);
    /// * no shadow leaf is writable onto a typed frame ([`InvariantKind::WritableTable`]);
    /// * no shadow leaf maps the pool, a reserved range or non-RAM
    ///   ([`InvariantKind::MapsNonRam`]);
    /// * every shadow entry is derived from its validated guest entry: leaves carry the
    ///   guest rights (RW dropped onto tables) and A/D only, non-leaf entries point at the
    ///   child's shadow through a recorded back-reference, 2 MiB leaves at their split
    ///   ([`InvariantKind::ShadowMismatch`]);
    /// * pool owners, the reverse map and the pool counts agree ([`InvariantKind::Pool`]);
    /// * loaded roots are pinned L4s with shadows ([`InvariantKind::Root`]);
    /// * a vCPU whose root switch is lazy runs on a freed root with no user entry and the
    ///   kernel half of its kernel root's shadow ([`InvariantKind::LazyRemnant`]).
    ///
    /// `mem` must be the memory object given to [`ShadowMmu::apply`]. Call it under the same
    /// lock as the batches (between two batches); it reads, never writes.
    pub fn check_invariants<M: GuestMemory>(&self, mem: &M) -> Check {
        let mem = &Mem::new(mem);
        let refs = self.check_typed_tables(mem)?;
        self.check_references(&refs)?;
        let mut tables = 0;
        let mut used = 0;
        for (idx, m) in self.pool.used_frames() {
            used += 1;
            tables += u64::from(!m.owner.is_split());
            self.check_shadow(mem, idx, m)?;
        }
        if used != self.pool.used() || tables != self.pool.tables() {
            return fail(
                InvariantKind::Pool,
                format!(
                    "pool counts {}/{} shadows, {used}/{tables} found",
                    self.pool.used(),
                    self.pool.tables()
                ),
            );
        }
        self.check_roots()?;
        self.check_lazy_remnants(mem)
    }

    /// Each remnant a vCPU runs on lazily maps what its kernel root's shadow maps and no
    /// more: an empty user half, the same kernel half (A/D aside).
    fn check_lazy_remnants<M: GuestMemory>(&self, mem: &Mem<'_, M>) -> Check {
        for (v, remnant, kernel) in self.lazy_pairs() {
            let r = open(mem, self.pool.pfn(remnant))?;
            let Some(kernel) = kernel else {
                return fail(
                    InvariantKind::LazyRemnant,
                    format!("vcpu {v}: lazy on pool frame {remnant} without a shadowed root"),
                );
            };
            let k = open(mem, self.pool.pfn(kernel))?;
            let half = pte::KERNEL_HALF;
            let differs = (0..512).find(|&i| {
                let want = if i < half { 0 } else { k.get(i) & !AD };
                r.get(i) & !AD != want
            });
            if let Some(i) = differs {
                return fail(
                    InvariantKind::LazyRemnant,
                    format!(
                        "vcpu {v}: remnant pool frame {remnant} [{i}] = {:#x}, its kernel root's shadow {:#x}",
                        r.get(i),
                        k.get(i)
                    ),
                );
            }
        }
        Ok(())
    }

    /// Every present entry of every typed table is valid; returns, per referenced table,
    /// the entries referencing it.
    fn check_typed_tables<M: GuestMemory>(
        &self,
        mem: &Mem<'_, M>,
    ) -> Result<HashMap<u64, Vec<u64>>, InvariantViolation> {
        let mut refs: HashMap<u64, Vec<u64>> = HashMap::new();
        for (pfn, info) in self.frames.iter() {
            let g = self.validated_view(mem, pfn)?;
            for (i, &e) in g.iter().enumerate() {
                let kind =
                    self.check_entry(info.level, pfn, e)
                        .map_err(|r| InvariantViolation {
                            kind: InvariantKind::UnvalidatedEntry,
                            detail: format!(
                                "typed L{} {pfn:#x}[{i}] = {e:#x} breaks {}",
                                info.level,
                                r.name()
                            ),
                        })?;
                if let Kind::Table { pfn: c } = kind {
                    if self.frames.level(c) != Some(info.level - 1) {
                        return Err(InvariantViolation {
                            kind: InvariantKind::UnvalidatedEntry,
                            detail: format!(
                                "L{} {pfn:#x}[{i}] = {e:#x} references untyped/wrong {c:#x}",
                                info.level
                            ),
                        });
                    }
                    refs.entry(c).or_default().push((pfn << 12) + 8 * i as u64);
                }
            }
            if let Some(s) = self.frames.shadow(pfn) {
                let want = Owner::Table {
                    pfn,
                    level: info.level,
                };
                if self.pool.meta(s).map(|m| m.owner) != Some(want) {
                    return Err(InvariantViolation {
                        kind: InvariantKind::Pool,
                        detail: format!("shadow {s} of {pfn:#x} has owner {:?}", self.pool.meta(s)),
                    });
                }
            }
        }
        Ok(refs)
    }

    /// Back-references are exactly the referencing entries; typed frames are pinned or
    /// referenced.
    fn check_references(&self, refs: &HashMap<u64, Vec<u64>>) -> Check {
        for (pfn, info) in self.frames.iter() {
            let mut want = refs.get(&pfn).cloned().unwrap_or_default();
            let mut got = info.parents.clone();
            want.sort_unstable();
            got.sort_unstable();
            if want != got {
                return fail(
                    InvariantKind::References,
                    format!("{pfn:#x}: referenced by {want:x?}, back-references {got:x?}"),
                );
            }
            if want.is_empty() && !info.pinned {
                return fail(
                    InvariantKind::References,
                    format!("{pfn:#x} typed without pin or reference"),
                );
            }
        }
        Ok(())
    }

    /// Pool frame `idx` is a live shadow and each of its entries is derived from its guest
    /// entry.
    fn check_shadow<M: GuestMemory>(&self, mem: &Mem<'_, M>, idx: u32, m: Meta) -> Check {
        let st = open(mem, self.pool.pfn(idx))?;
        let (gpfn, level, split) = match m.owner {
            Owner::Table { pfn, level } => (pfn, level, None),
            Owner::Split { l2, idx: j } => (l2, 1, Some(usize::from(j))),
        };
        let gt = self.validated_view(mem, gpfn)?;
        match split {
            None if self.frames.shadow(gpfn) != Some(idx) => {
                return fail(
                    InvariantKind::Pool,
                    format!("orphan shadow {idx} of {gpfn:#x}"),
                );
            }
            Some(j) => self.check_split_parent(mem, idx, gpfn, j)?,
            None => {}
        }
        for i in 0..512 {
            let s = st.get(i);
            let (g, kind) = match split {
                Some(j) => {
                    let g = pte::split_leaf(gt[j & 511], i as u64);
                    (
                        g,
                        Kind::Leaf4k {
                            pfn: pte::pfn_of(g),
                        },
                    )
                }
                None => {
                    let g = gt[i];
                    (
                        g,
                        rules::entry_flags_allowed(level, g).unwrap_or(Kind::NotPresent),
                    )
                }
            };
            let here = || format!("shadow {idx} ({:?}) [{i}] s={s:#x} g={g:#x}", m.owner);
            match kind {
                Kind::NotPresent if s != 0 => {
                    return fail(
                        InvariantKind::ShadowMismatch,
                        format!("{}: present shadow for absent guest entry", here()),
                    );
                }
                Kind::NotPresent => {}
                Kind::Leaf4k { pfn } => self.check_leaf(idx * 512 + i as u32, pfn, s, g, &here)?,
                Kind::Leaf2m { .. } => {
                    let child = self.pool.index_of(s & ADDR).and_then(|c| self.pool.meta(c));
                    let want = Owner::Split {
                        l2: gpfn,
                        idx: i as u16,
                    };
                    if !pte::present(s) || child.map(|c| c.owner) != Some(want) {
                        return fail(
                            InvariantKind::ShadowMismatch,
                            format!("{}: 2M leaf without its split", here()),
                        );
                    }
                }
                Kind::Table { pfn } => self.check_non_leaf(gpfn, i, pfn, s, g, &here)?,
            }
        }
        Ok(())
    }

    /// A split's guest entry is a present 2 MiB leaf whose shadow L2 entry points at it.
    /// The entries of typed table `pfn` the engine has validated: its snapshot while it is
    /// an unhooked L1 (the guest may be writing it), else its content.
    fn validated_view<M: GuestMemory>(
        &self,
        mem: &Mem<'_, M>,
        pfn: u64,
    ) -> Result<[u64; 512], InvariantViolation> {
        match self.unhooked_snapshot(pfn) {
            Some(s) => Ok(*s),
            None => Ok(open(mem, pfn)?.snapshot()),
        }
    }

    fn check_split_parent<M: GuestMemory>(
        &self,
        mem: &Mem<'_, M>,
        idx: u32,
        l2: u64,
        j: usize,
    ) -> Check {
        let e = open(mem, l2)?.get(j);
        if !pte::is_2m_leaf(2, e) || !pte::present(e) || self.frames.level(l2) != Some(2) {
            return fail(
                InvariantKind::Pool,
                format!("split {idx} for non-2M {l2:#x}[{j}] = {e:#x}"),
            );
        }
        let parent = self.frames.shadow(l2);
        let linked = match parent {
            Some(p) => open(mem, self.pool.pfn(p))?.get(j) & ADDR == self.pool.pfn(idx) << 12,
            None => false,
        };
        if !linked {
            return fail(
                InvariantKind::Pool,
                format!("split {idx} of {l2:#x}[{j}] not linked from its L2 shadow"),
            );
        }
        Ok(())
    }

    /// A shadow leaf (slot `slot`) of guest leaf `g` mapping frame `pfn`. The security
    /// checks look at what the CPU uses: the shadow's own target frame.
    fn check_leaf(&self, slot: u32, pfn: u64, s: u64, g: u64, here: &dyn Fn() -> String) -> Check {
        if !pte::present(s) {
            return fail(
                InvariantKind::ShadowMismatch,
                format!("{}: present guest leaf not shadowed", here()),
            );
        }
        // With trapped stores a protected leaf maps the frame's alias (stores exit).
        let aliased = self.unalias_pfn(pte::pfn_of(s));
        let target = aliased.unwrap_or(pte::pfn_of(s));
        match self.layout.classify(target) {
            FrameClass::Ram => {}
            c => {
                return fail(
                    InvariantKind::MapsNonRam,
                    format!("{}: leaf maps {c:?}", here()),
                )
            }
        }
        let protected = self.frames.level(target).is_some() && !self.is_unhooked(target);
        if s & RW != 0 && protected && aliased.is_none() {
            return fail(
                InvariantKind::WritableTable,
                format!("{}: writable leaf maps a page table", here()),
            );
        }
        let protected = self.frames.level(pfn).is_some() && !self.is_unhooked(pfn);
        let want_alias = protected && self.traps() && g & RW != 0;
        let want_rw = g & RW != 0 && (!protected || self.traps());
        let mask = pte::SHADOW_LEAF_KEEP & !RW & !ADDR;
        if (s & mask) != (g & mask)
            || target != pfn
            || aliased.is_some() != want_alias
            || (s & RW != 0) != want_rw
        {
            return fail(
                InvariantKind::ShadowMismatch,
                format!("{}: leaf mismatch", here()),
            );
        }
        if s & !(pte::SHADOW_LEAF_KEEP | AD) != 0 {
            return fail(
                InvariantKind::ShadowMismatch,
                format!("{}: stray bits", here()),
            );
        }
        if self.pool.rmap_linked(slot) != (g & RW != 0) {
            return fail(
                InvariantKind::Pool,
                format!("{}: reverse map mismatch", here()),
            );
        }
        Ok(())
    }

    /// A shadow non-leaf entry for guest entry `g` (index `i` of `gpfn`) referencing table
    /// `child`: present only through a recorded back-reference, pointing at the child's
    /// shadow with the guest's flags.
    fn check_non_leaf(
        &self,
        gpfn: u64,
        i: usize,
        child: u64,
        s: u64,
        g: u64,
        here: &dyn Fn() -> String,
    ) -> Check {
        let info = self.frames.info(child);
        let backref = (gpfn << 12) + 8 * i as u64;
        if self.is_unhooked(child) {
            if pte::present(s) {
                return fail(
                    InvariantKind::WritableTable,
                    format!("{}: links an unhooked (guest-writable) L1", here()),
                );
            }
            return Ok(());
        }
        if !info.is_some_and(|c| c.parents.contains(&backref)) {
            if pte::present(s) {
                return fail(
                    InvariantKind::ShadowMismatch,
                    format!("{}: linked without a back-reference", here()),
                );
            }
            return Ok(());
        }
        let cs = info.and(self.frames.shadow(child));
        let want = cs.map(|c| self.pool.pfn(c) << 12);
        if !pte::present(s) || Some(s & ADDR) != want {
            return fail(
                InvariantKind::ShadowMismatch,
                format!("{}: does not point at child shadow {cs:?}", here()),
            );
        }
        let keep = pte::SHADOW_NONLEAF_KEEP;
        if s & keep != g & keep || s & !(keep | ADDR | A) != 0 {
            return fail(
                InvariantKind::ShadowMismatch,
                format!("{}: non-leaf flags mismatch", here()),
            );
        }
        Ok(())
    }

    /// Loaded roots are pinned L4s with a shadow.
    fn check_roots(&self) -> Check {
        for (v, r) in self.roots.iter().enumerate() {
            let Some(r) = *r else { continue };
            let info = self.frames.info(r);
            let ok = rules::baseptr_allowed(self.frames.level(r), info.is_some_and(|i| i.pinned))
                .is_ok();
            if !ok || self.frames.shadow(r).is_none() {
                return fail(
                    InvariantKind::Root,
                    format!("vcpu {v} root {r:#x} is not a pinned, shadowed L4"),
                );
            }
        }
        Ok(())
    }
}
