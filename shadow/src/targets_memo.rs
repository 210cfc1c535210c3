//! Remembered flush-target answers (see `targets`): a small direct-mapped cache keyed by
//! table and the generation of everything an answer was derived from.

use std::cell::Cell;

use crate::vcpuset::VcpuSet;

/// One remembered answer.
#[derive(Clone, Copy, Debug, Default)]
struct Memo {
    /// Key: `pfn << 1 | global`, plus one (0 = empty).
    key: u64,
    /// The targets generation when it was computed.
    generation: u64,
    set: VcpuSet,
}

/// Recent flush-target answers, direct-mapped by table (a batch that changes many entries
/// of a few tables walks the back-references of each once). An answer is used only while
/// nothing it was derived from changed: back-references and types (the frames'
/// generation), loaded and held roots (the roots' generation).
#[derive(Default)]
pub(crate) struct TargetsMemo([Cell<Memo>; 8]);

impl TargetsMemo {
    fn key(pfn: u64, global: bool) -> u64 {
        ((pfn << 1) | u64::from(global)).wrapping_add(1)
    }

    /// The answer remembered for (`pfn`, `global`) at `generation`, if any.
    pub(crate) fn get(&self, pfn: u64, global: bool, generation: u64) -> Option<VcpuSet> {
        let m = self.0.get((pfn & 7) as usize)?.get();
        (m.key == Self::key(pfn, global) && m.generation == generation).then_some(m.set)
    }

    /// Remembers `set` for (`pfn`, `global`) at `generation`.
    pub(crate) fn put(&self, pfn: u64, global: bool, generation: u64, set: VcpuSet) {
        if let Some(c) = self.0.get((pfn & 7) as usize) {
            c.set(Memo {
                key: Self::key(pfn, global),
                generation,
                set,
            });
        }
    }
}
