//! Exit statistics: what every userspace exit was, what it cost, and KVM's own counters.
//!
//! Each vCPU thread owns a [`VcpuStats`] (no locks on the exit path); at the end they are
//! merged into a [`report`] and rendered as JSON or a [`table`].

pub mod batch_size;
pub mod interval;
pub mod kvm_stats;
pub mod latency;
pub mod report;
pub mod smp;
pub mod table;

pub use batch_size::BatchSizes;
pub use latency::Latency;
pub use smp::SmpStats;
use std::collections::BTreeMap;

/// Direction of a port I/O or MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dir {
    /// Guest read (`in`).
    In,
    /// Guest write (`out`).
    Out,
}

impl Dir {
    /// `"in"` or `"out"`.
    pub fn name(self) -> &'static str {
        match self {
            Dir::In => "in",
            Dir::Out => "out",
        }
    }
}

/// Statistics of one hypercall op.
#[derive(Clone, Debug, Default)]
pub struct OpStats {
    /// Handling time of each call.
    pub latency: Latency,
    /// Errors by name.
    pub errors: BTreeMap<&'static str, u64>,
    /// Entries per call (MMU_BATCH), as a histogram of counts.
    pub entries: Latency,
}

/// Counters one vCPU thread collects.
#[derive(Clone, Debug, Default)]
pub struct VcpuStats {
    /// Userspace exits by reason name, with VMM handling time.
    pub exits: BTreeMap<&'static str, Latency>,
    /// Port I/O by (port, direction), with the device name.
    pub pio: BTreeMap<(u16, Dir), (&'static str, Latency)>,
    /// MMIO by device name and direction.
    pub mmio: BTreeMap<(&'static str, Dir), Latency>,
    /// Hypercalls by op name.
    pub hypercalls: BTreeMap<&'static str, OpStats>,
    /// Work the VMM did on the vCPU after a hypercall (CR3 load, TLB flush, host resync).
    pub effects: BTreeMap<&'static str, Latency>,
    /// Where MMU_BATCH handling time went, by phase (`request`, `copy_in`, `apply`, ...,
    /// `response`): one sample per batch and phase.
    pub mmu_phases: BTreeMap<&'static str, Latency>,
    /// MMU_BATCH update cost by PT_UPDATEs per batch.
    pub mmu_batch_sizes: BatchSizes,
    /// Time spent inside `KVM_RUN` (guest + in-kernel exits), ns.
    pub kvm_run_ns: u64,
    /// Time spent in the VMM between `KVM_RUN`s, ns.
    pub vmm_ns: u64,
    /// KVM in-kernel counters at start (name → value).
    pub kvm_start: BTreeMap<String, u64>,
    /// KVM in-kernel counters at end.
    pub kvm_end: BTreeMap<String, u64>,
    /// Remote flush delivery and world stops ([`SmpStats`]).
    pub smp: SmpStats,
}

impl VcpuStats {
    /// Records one exit of `reason` handled in `ns`.
    pub fn exit(&mut self, reason: &'static str, ns: u64) {
        self.exits.entry(reason).or_default().record(ns);
    }

    /// Records a post-hypercall effect (`cr3_load`, `tlb_flush_cr3`, `host_resync`).
    pub fn effect(&mut self, name: &'static str, ns: u64) {
        self.effects.entry(name).or_default().record(ns);
    }

    /// Records a port access.
    pub fn pio(&mut self, port: u16, dir: Dir, device: &'static str, ns: u64) {
        self.pio
            .entry((port, dir))
            .or_insert_with(|| (device, Latency::default()))
            .1
            .record(ns);
    }

    /// Records an MMIO access.
    pub fn mmio(&mut self, device: &'static str, dir: Dir, ns: u64) {
        self.mmio.entry((device, dir)).or_default().record(ns);
    }

    /// Records a hypercall of `op` taking `ns`, with its error (if any) and MMU entry count.
    pub fn hypercall(
        &mut self,
        op: &'static str,
        ns: u64,
        error: Option<&'static str>,
        entries: Option<u64>,
    ) {
        let s = self.hypercalls.entry(op).or_default();
        s.latency.record(ns);
        if let Some(e) = error {
            *s.errors.entry(e).or_default() += 1;
        }
        if let Some(n) = entries {
            s.entries.record(n);
        }
    }

    /// Records the phases of one MMU_BATCH (name, ns).
    pub fn mmu_phases(&mut self, phases: &[(&'static str, u64)]) {
        for &(name, ns) in phases {
            self.mmu_phases.entry(name).or_default().record(ns);
        }
    }

    /// Records an MMU_BATCH of `pt_updates` PT_UPDATEs whose update cost (its time without
    /// the phases no update is charged with) was `ns`.
    pub fn mmu_batch_size(&mut self, pt_updates: u64, ns: u64) {
        self.mmu_batch_sizes.record(pt_updates, ns);
    }

    /// Total userspace exits.
    pub fn total_exits(&self) -> u64 {
        self.exits.values().map(|l| l.count()).sum()
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &VcpuStats) {
        for (k, v) in &other.exits {
            self.exits.entry(k).or_default().merge(v);
        }
        for (k, (dev, v)) in &other.pio {
            self.pio
                .entry(*k)
                .or_insert_with(|| (dev, Latency::default()))
                .1
                .merge(v);
        }
        for (k, v) in &other.mmio {
            self.mmio.entry(*k).or_default().merge(v);
        }
        for (k, v) in &other.effects {
            self.effects.entry(k).or_default().merge(v);
        }
        for (k, v) in &other.mmu_phases {
            self.mmu_phases.entry(k).or_default().merge(v);
        }
        self.mmu_batch_sizes.merge(&other.mmu_batch_sizes);
        for (k, v) in &other.hypercalls {
            let s = self.hypercalls.entry(k).or_default();
            s.latency.merge(&v.latency);
            s.entries.merge(&v.entries);
            for (e, n) in &v.errors {
                *s.errors.entry(e).or_default() += n;
            }
        }
        self.kvm_run_ns += other.kvm_run_ns;
        self.vmm_ns += other.vmm_ns;
        self.smp.merge(&other.smp);
        for (k, v) in &other.kvm_start {
            *self.kvm_start.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.kvm_end {
            *self.kvm_end.entry(k.clone()).or_default() += v;
        }
    }
}

impl VcpuStats {
    /// What happened after `earlier` (a snapshot of the same vCPU): every distribution and
    /// counter is the difference; KVM counters start where `earlier` ended.
    pub fn since(&self, earlier: &VcpuStats) -> VcpuStats {
        fn diff<K: Ord + Clone>(
            now: &BTreeMap<K, Latency>,
            then: &BTreeMap<K, Latency>,
        ) -> BTreeMap<K, Latency> {
            now.iter()
                .map(|(k, l)| {
                    (
                        k.clone(),
                        then.get(k).map_or_else(|| l.clone(), |p| l.since(p)),
                    )
                })
                .filter(|(_, l)| l.count() > 0)
                .collect()
        }
        let pio = self
            .pio
            .iter()
            .map(|(k, (dev, l))| {
                let d = earlier
                    .pio
                    .get(k)
                    .map_or_else(|| l.clone(), |(_, p)| l.since(p));
                (*k, (*dev, d))
            })
            .filter(|(_, (_, l))| l.count() > 0)
            .collect();
        let hypercalls = self
            .hypercalls
            .iter()
            .map(|(k, o)| (*k, o.since(earlier.hypercalls.get(k))))
            .filter(|(_, o)| o.latency.count() > 0)
            .collect();
        let kvm_start = self
            .kvm_end
            .keys()
            .map(|k| {
                let start = earlier.kvm_end.get(k).or(self.kvm_start.get(k));
                (k.clone(), start.copied().unwrap_or(0))
            })
            .collect();
        VcpuStats {
            exits: diff(&self.exits, &earlier.exits),
            pio,
            mmio: diff(&self.mmio, &earlier.mmio),
            hypercalls,
            effects: diff(&self.effects, &earlier.effects),
            mmu_phases: diff(&self.mmu_phases, &earlier.mmu_phases),
            mmu_batch_sizes: self.mmu_batch_sizes.since(&earlier.mmu_batch_sizes),
            kvm_run_ns: self.kvm_run_ns.saturating_sub(earlier.kvm_run_ns),
            vmm_ns: self.vmm_ns.saturating_sub(earlier.vmm_ns),
            kvm_start,
            kvm_end: self.kvm_end.clone(),
            smp: self.smp.since(&earlier.smp),
        }
    }
}

impl OpStats {
    /// What happened after `earlier` (a snapshot of the same op).
    pub fn since(&self, earlier: Option<&OpStats>) -> OpStats {
        let Some(p) = earlier else {
            return self.clone();
        };
        OpStats {
            latency: self.latency.since(&p.latency),
            errors: self
                .errors
                .iter()
                .map(|(k, n)| (*k, n.saturating_sub(p.errors.get(k).copied().unwrap_or(0))))
                .filter(|(_, n)| *n > 0)
                .collect(),
            entries: self.entries.since(&p.entries),
        }
    }
}

/// Merges per-vCPU statistics into one.
pub fn merge_all(per_vcpu: &[VcpuStats]) -> VcpuStats {
    let mut m = VcpuStats::default();
    for s in per_vcpu {
        m.merge(s);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregation_and_merge() {
        let mut a = VcpuStats::default();
        a.exit("io", 100);
        a.exit("io", 300);
        a.exit("hlt", 50);
        a.pio(0x3f8, Dir::Out, "serial", 100);
        a.pio(0x3f8, Dir::Out, "serial", 300);
        a.hypercall("NULL", 10, None, None);
        a.hypercall("MMU_BATCH", 10, Some("EINVAL"), Some(7));
        a.mmu_phases(&[("apply", 4), ("copy_in", 1)]);
        a.kvm_run_ns = 1000;
        a.kvm_start.insert("exits".into(), 5);
        a.kvm_end.insert("exits".into(), 9);
        let mut b = VcpuStats::default();
        b.exit("io", 200);
        b.pio(0x3f8, Dir::Out, "serial", 200);
        b.pio(0x80, Dir::Out, "post", 1);
        b.hypercall("MMU_BATCH", 30, Some("EINVAL"), Some(3));
        b.mmu_phases(&[("apply", 20), ("copy_in", 5)]);
        b.kvm_run_ns = 500;
        b.kvm_end.insert("exits".into(), 4);
        let m = merge_all(&[a, b]);
        assert_eq!(m.total_exits(), 4);
        let io = &m.exits["io"];
        assert_eq!(
            (io.count(), io.total(), io.min(), io.max()),
            (3, 600, 100, 300)
        );
        assert_eq!(io.mean(), 200);
        assert_eq!(m.pio[&(0x3f8, Dir::Out)].1.count(), 3);
        assert_eq!(m.pio[&(0x80, Dir::Out)].0, "post");
        assert_eq!(m.hypercalls["MMU_BATCH"].errors["EINVAL"], 2);
        assert_eq!(m.hypercalls["MMU_BATCH"].entries.total(), 10);
        assert_eq!(m.kvm_run_ns, 1500);
        let ap = &m.mmu_phases["apply"];
        assert_eq!((ap.count(), ap.total()), (2, 24));
        assert_eq!(m.mmu_phases["copy_in"].total(), 6);
        assert_eq!(m.kvm_end["exits"], 13);
    }

    #[test]
    fn since_is_the_difference_of_two_snapshots() {
        let mut s = VcpuStats::default();
        s.exit("io", 100);
        s.hypercall("MMU_BATCH", 10, Some("EINVAL"), Some(7));
        s.kvm_start.insert("exits".into(), 5);
        s.kvm_end.insert("exits".into(), 9);
        s.vmm_ns = 100;
        let first = s.clone();
        s.exit("io", 300);
        s.exit("hlt", 5);
        s.hypercall("MMU_BATCH", 30, None, Some(3));
        s.mmu_phases(&[("apply", 25)]);
        s.kvm_end.insert("exits".into(), 20);
        s.vmm_ns = 430;
        let d = s.since(&first);
        assert_eq!((d.exits["io"].count(), d.exits["io"].total()), (1, 300));
        assert_eq!(d.exits["io"].max(), 300);
        assert_eq!(d.exits["hlt"].count(), 1);
        let mb = &d.hypercalls["MMU_BATCH"];
        assert_eq!((mb.latency.count(), mb.entries.total()), (1, 3));
        assert!(mb.errors.is_empty(), "no new errors");
        assert_eq!((d.kvm_start["exits"], d.kvm_end["exits"]), (9, 20));
        assert_eq!(d.vmm_ns, 330);
        let ap = &d.mmu_phases["apply"];
        assert_eq!((ap.count(), ap.total()), (1, 25));
        let none = s.since(&s);
        assert_eq!(none.total_exits(), 0);
        assert!(none.hypercalls.is_empty());
    }
}
