//! The VMM's cost of MMU_BATCHes by their number of PTE updates: a batch has a fixed cost
//! (the exit's handling, cold caches after the guest ran) and a cost per update; sorting
//! batches by size shows both, where one average over a run mixes them.

use serde::Serialize;

/// The size classes, by PT_UPDATEs in the batch: their smallest member each.
pub const CLASS_FLOORS: [u64; 5] = [0, 1, 2, 16, 256];

/// One size class's sums.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassSums {
    /// Batches.
    pub batches: u64,
    /// PT_UPDATEs they applied.
    pub pt_updates: u64,
    /// Their MMU_BATCH time without the phases no update is charged with
    /// ([`crate::hcall::contract::NON_UPDATE_PHASES`]), ns.
    pub update_ns: u64,
}

/// MMU_BATCH cost by size class (index i holds the batches of `CLASS_FLOORS[i]` up to the
/// next floor, exclusive).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchSizes {
    /// The sums per class, in [`CLASS_FLOORS`] order.
    pub classes: [ClassSums; 5],
}

impl BatchSizes {
    /// Records a batch of `pt_updates` PT_UPDATEs whose update cost was `ns`.
    pub fn record(&mut self, pt_updates: u64, ns: u64) {
        let i = CLASS_FLOORS
            .iter()
            .rposition(|&f| pt_updates >= f)
            .unwrap_or(0);
        if let Some(c) = self.classes.get_mut(i) {
            c.batches += 1;
            c.pt_updates += pt_updates;
            c.update_ns += ns;
        }
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &BatchSizes) {
        for (c, o) in self.classes.iter_mut().zip(&other.classes) {
            c.batches += o.batches;
            c.pt_updates += o.pt_updates;
            c.update_ns += o.update_ns;
        }
    }

    /// What was recorded after `earlier` (a snapshot of the same counters).
    pub fn since(&self, earlier: &BatchSizes) -> BatchSizes {
        let mut d = self.clone();
        for (c, e) in d.classes.iter_mut().zip(&earlier.classes) {
            c.batches = c.batches.saturating_sub(e.batches);
            c.pt_updates = c.pt_updates.saturating_sub(e.pt_updates);
            c.update_ns = c.update_ns.saturating_sub(e.update_ns);
        }
        d
    }

    /// The serialised rows: the classes that saw a batch.
    pub fn rows(&self) -> Vec<BatchSizeRow> {
        let ends = CLASS_FLOORS.iter().skip(1).map(|&f| Some(f - 1));
        CLASS_FLOORS
            .iter()
            .zip(ends.chain(std::iter::once(None)))
            .zip(&self.classes)
            .filter(|(_, c)| c.batches > 0)
            .map(|((&min, max), c)| BatchSizeRow {
                min_updates: min,
                max_updates: max,
                batches: c.batches,
                pt_updates: c.pt_updates,
                update_ns: c.update_ns,
            })
            .collect()
    }
}

/// One size class, as serialised (docs/stats-json.md, `mmu_batch_sizes`).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BatchSizeRow {
    /// Fewest PT_UPDATEs of a batch in the class.
    pub min_updates: u64,
    /// Most PT_UPDATEs of a batch in the class (`null`: no bound).
    pub max_updates: Option<u64>,
    /// Batches.
    pub batches: u64,
    /// PT_UPDATEs they applied.
    pub pt_updates: u64,
    /// Their MMU_BATCH time without the phases no update is charged with, ns.
    pub update_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_fall_into_their_size_class() {
        let mut s = BatchSizes::default();
        for (n, ns) in [
            (0, 5),
            (1, 10),
            (2, 20),
            (15, 30),
            (16, 40),
            (255, 50),
            (256, 60),
        ] {
            s.record(n, ns);
        }
        s.record(4096, 70);
        let rows = s.rows();
        let got: Vec<(u64, Option<u64>, u64, u64, u64)> = rows
            .iter()
            .map(|r| {
                (
                    r.min_updates,
                    r.max_updates,
                    r.batches,
                    r.pt_updates,
                    r.update_ns,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, Some(0), 1, 0, 5),
                (1, Some(1), 1, 1, 10),
                (2, Some(15), 2, 17, 50),
                (16, Some(255), 2, 271, 90),
                (256, None, 2, 4352, 130),
            ]
        );
    }

    #[test]
    fn merge_adds_and_since_subtracts() {
        let mut a = BatchSizes::default();
        a.record(1, 10);
        let mut b = BatchSizes::default();
        b.record(1, 5);
        b.record(300, 900);
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!(m.classes[1].batches, 2);
        assert_eq!(m.classes[1].update_ns, 15);
        assert_eq!(m.classes[4].pt_updates, 300);
        let d = m.since(&a);
        assert_eq!(d, b);
        assert!(d.rows().iter().all(|r| r.batches > 0));
        assert_eq!(BatchSizes::default().rows(), vec![]);
    }
}
