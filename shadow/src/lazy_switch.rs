//! Lazy root switches of `UNPIN` with `DETACH` (docs/pv-abi.md, UNPIN): a vCPU that still
//! runs on the dying root is left on it past the hypercall instead of being interrupted for
//! its CR3 load, where that root, once freed, translates exactly as the vCPU's kernel root.
//!
//! A freed detached root keeps its kernel half (L4 entries 256..511) and its frame is held
//! from reuse while a root switch waits (`free_shadow_table`); its user half is cleared.
//! If at the `DETACH` its kernel half equals the kernel root's (the same shadow entries,
//! A/D aside), the remnant then maps nothing the kernel root does not: the vCPU only needs
//! the flush of what it cached through the user half (the `UNPIN`'s own, which a kernel
//! flush performs without a kick; none if no user entry was ever used), and its CR3 load
//! waits for its own next batch. That is the switch made lazy.
//!
//! It stays exact only while the two kernel halves stay equal. Every change that could
//! part them makes the switches eager again (`force`): the switch is then delivered before
//! the hypercall returns, like any other: an update of an L4 entry in the kernel half of
//! the vCPU's root, a `SET_KERNEL_ROOT`, and the drop of an L3 shadow a remnant links,
//! whose frame is also held from reuse until the switches are delivered. A bound on
//! the held frames makes a `DETACH` eager when too many wait, so a vCPU that never makes
//! another hypercall cannot make the pool leak.

use crate::engine::ShadowMmu;
use crate::mem::{table, Mem};
use crate::pte::{pfn_of, present, AD, KERNEL_HALF};
use vm_memory::GuestMemory;

/// Held pool frames above which a `DETACH` makes its switches eager (and every lazy one).
const HELD_MAX: usize = 64;

impl ShadowMmu {
    /// The shadow root (GPA) `vcpu` still runs on while its root switch is lazy: the freed
    /// root a `DETACH` left it on, which translates as its kernel root; `None` otherwise
    /// (its CR3 is then its loaded root's shadow, or a switch to it is being delivered).
    pub fn lazy_root(&self, vcpu: usize) -> Option<u64> {
        let r = (*self.lazy_remnant.get(vcpu)?)?;
        Some(self.pool.pfn(r) << 12)
    }

    /// Whether the `DETACH` target switching from shadow root `dying` to shadow root
    /// `kernel` may switch lazily: the kernel halves are equal and the bound allows it.
    pub(crate) fn lazy_switch_allowed<M: GuestMemory>(
        &self,
        mem: &Mem<'_, M>,
        dying: u32,
        kernel: u32,
    ) -> bool {
        if !self.lazy_detach || self.pool.held_count() >= HELD_MAX {
            return false;
        }
        let (Ok(d), Ok(k)) = (
            table(mem, self.pool.pfn(dying)),
            table(mem, self.pool.pfn(kernel)),
        ) else {
            return false;
        };
        (KERNEL_HALF..512).all(|i| (d.get(i) ^ k.get(i)) & !AD == 0)
    }

    /// A `DETACH` that switches vCPUs while [`HELD_MAX`] frames or more are held: the
    /// switches waiting lazily are delivered now, so their frames can be released.
    pub(crate) fn bound_held_frames(&mut self) {
        if self.pool.held_count() >= HELD_MAX {
            self.force_lazy_switches("too many pool frames held");
        }
    }

    /// Whether any vCPU's root switch is lazy.
    pub(crate) fn lazy_switches(&self) -> bool {
        self.lazy_remnant.iter().any(Option::is_some)
    }

    /// Whether `vcpu`'s pending root switch (if any) must be delivered before the
    /// hypercall returns: it is not lazy.
    pub(crate) fn eager_switch_pending(&self, vcpu: usize) -> bool {
        self.root_switch_pending(vcpu) && self.lazy_remnant.get(vcpu).is_some_and(Option::is_none)
    }

    /// A change that could part a remnant from its kernel root: every lazy switch becomes
    /// eager (delivered at the end of this batch).
    pub(crate) fn force_lazy_switches(&mut self, why: &str) {
        self.force_where(why, |_| true);
    }

    /// An entry of the kernel half of L4 `l4` changes: the lazy switches of the vCPUs
    /// whose root it is become eager (no other remnant mirrors it).
    pub(crate) fn force_lazy_switches_on(&mut self, l4: u64) {
        self.force_where("a kernel-half entry of its root changed", |r| r == Some(l4));
    }

    /// Makes the lazy switches of the vCPUs whose root `on` accepts eager (`why`, logged).
    fn force_where(&mut self, why: &str, on: impl Fn(Option<u64>) -> bool) {
        if self.debug_lazy_unforced || !self.lazy_switches() {
            return;
        }
        for (r, root) in self.lazy_remnant.iter_mut().zip(&self.roots) {
            if r.is_some() && on(*root) {
                *r = None;
                self.counters.lazy_switches_forced += 1;
                log::debug!("a lazy root switch made eager: {why}");
            }
        }
    }

    /// Whether a freed pool frame may be reused once the host dropped what it cached from
    /// it: not while a vCPU may still walk a freed root, one whose switch is eager (it runs
    /// on it until the delivery) or lazy with its flush still pending (its paging-structure
    /// caches may still point into the dropped user half).
    pub(crate) fn reuse_blocked(&self) -> bool {
        (0..self.roots.len()).any(|v| {
            self.eager_switch_pending(v)
                || (self.root_switch_pending(v) && self.pending.peek(v).is_some())
        })
    }

    /// Whether pool frame `sidx` is linked from the kernel half of a freed root some vCPU
    /// may still run on (see `detached_shadows`).
    pub(crate) fn in_remnant<M: GuestMemory>(&self, mem: &Mem<'_, M>, sidx: u32) -> bool {
        if !self.root_switch_outstanding() {
            return false;
        }
        let target = self.pool.pfn(sidx);
        self.detached_shadows.iter().any(|&d| {
            table(mem, self.pool.pfn(d)).is_ok_and(|t| {
                (KERNEL_HALF..512).any(|i| present(t.get(i)) && pfn_of(t.get(i)) == target)
            })
        })
    }

    /// The pool frames of the remnants vCPUs run on lazily and the shadow roots of their
    /// kernel roots (for the invariant checker).
    pub(crate) fn lazy_pairs(&self) -> Vec<(usize, u32, Option<u32>)> {
        self.lazy_remnant
            .iter()
            .enumerate()
            .filter_map(|(v, r)| {
                let k = self
                    .roots
                    .get(v)
                    .copied()
                    .flatten()
                    .and_then(|l4| self.frames.shadow(l4));
                r.map(|r| (v, r, k))
            })
            .collect()
    }
}
