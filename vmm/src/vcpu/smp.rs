//! The vCPU's side of SMP TLB coherence: applying deliveries other vCPUs' batches left for
//! it, delivering its own batch's remote flushes and root switches before the hypercall
//! returns, and the host resync with the world stopped (docs/pv-abi.md §6.4).
//!
//! Order after a batch that needs a host resync: post the remote flushes and root switches,
//! stop the world (every other vCPU parked outside `KVM_RUN`; each applies its delivery on
//! its own thread on the way to parking, so one kick serves both), wait for the
//! acknowledgements, re-register the pool memslot under the engine lock, and
//! only then mark the freed pool frames clean; release the world; apply the caller's own
//! CR3 load. Without a resync (the probe found VMM writes visible to a running guest), the
//! deliveries are kicks and the frames become clean once they are acknowledged.

use super::effects;
use super::{Vcpu, VcpuEnd};
use crate::hcall::Effects;
use crate::rendezvous::{Apply, Delivered};
use crate::stats::VcpuStats;
use crate::vm_ops::VmOps;
use kvm_ioctls::VcpuFd;
use std::time::Instant;

/// Applies the deliveries other vCPUs' batches left for `index` (a flush, a root switch):
/// the engine hands it over before the acknowledgement, the `KVM_SET_SREGS` that carries it
/// out follows right after, before this vCPU enters `KVM_RUN` again (nothing runs guest code
/// on it in between, so no translation it holds can be used), off the issuer's wait.
struct Applier<'a> {
    fd: &'a VcpuFd,
    vm: &'a dyn VmOps,
    index: usize,
    stats: &'a mut VcpuStats,
    err: &'a mut Option<String>,
    taken: Option<Effects>,
    /// A root switch (`NEW_BASEPTR`'s or `DETACH`'s CR3) was loaded by [`Apply::finish`].
    switched_root: bool,
}

impl<'a> Applier<'a> {
    /// An applier for vCPU `index` that has taken nothing yet.
    fn new(
        fd: &'a VcpuFd,
        vm: &'a dyn VmOps,
        index: usize,
        stats: &'a mut VcpuStats,
        err: &'a mut Option<String>,
    ) -> Applier<'a> {
        Applier {
            fd,
            vm,
            index,
            stats,
            err,
            taken: None,
            switched_root: false,
        }
    }
}

impl Apply for Applier<'_> {
    fn take(&mut self) {
        let fx = self.vm.take_delivery(self.index);
        self.stats.smp.deliveries_applied += 1;
        // Two takes before one finish cannot happen (finish follows each acknowledgement);
        // merge anyway rather than lose one.
        self.taken = Some(match self.taken.take() {
            Some(old) => Effects {
                flush: old.flush || fx.flush,
                new_cr3: fx.new_cr3.or(old.new_cr3),
                ..Effects::default()
            },
            None => fx,
        });
    }

    fn finish(&mut self) {
        let Some(fx) = self.taken.take() else { return };
        self.switched_root |= fx.new_cr3.is_some();
        if let Err(e) = effects::apply(self.fd, &fx, false, self.stats) {
            self.err.get_or_insert(e.to_string());
        }
    }
}

/// Records what a delivery cost the issuer.
fn record_delivery(stats: &mut VcpuStats, d: &Delivered, wait_ns: u64) {
    stats.smp.remote_sent += u64::from(d.sent);
    stats.smp.kicks += u64::from(d.kicks);
    for &ns in &d.kick_rtt_ns {
        stats.smp.kick_rtt.record(ns);
    }
    for p in &d.kick_phases {
        stats.smp.kick_exit.record(p.exit_ns);
        stats.smp.kick_apply.record(p.apply_ns);
        stats.smp.kick_wake.record(p.wake_ns);
    }
    if d.sent > 0 {
        stats.effect("remote_delivery_wait", wait_ns);
    }
}

impl Vcpu {
    /// Outside `KVM_RUN` before entering: applies a pending delivery and parks for another
    /// vCPU's world stop.
    pub(super) fn service(&mut self) {
        let t = Instant::now();
        let index = self.index;
        let mut apply = Applier::new(
            &self.fd,
            &*self.vm,
            index,
            &mut self.stats,
            &mut self.delivery_error,
        );
        self.sync.service(index, &mut apply);
        self.stats.vmm_ns += t.elapsed().as_nanos() as u64;
    }

    /// Carries out a hypercall's effects: remote deliveries and the host resync (if any),
    /// then the caller's own CR3 load or flush. `Some` ends the loop.
    pub(super) fn apply_hypercall(&mut self, mut fx: Effects) -> Option<VcpuEnd> {
        let mut covered = false;
        if fx.kernel_flushed > 0 {
            let smp = &mut self.stats.smp;
            smp.remote_requested += u64::from(fx.kernel_flushed);
            smp.kernel_flushes += u64::from(fx.kernel_flushed);
            smp.kernel_zaps += 1;
            self.stats.effect("remote_kernel_flush", fx.kernel_flush_ns);
        }
        if fx.violation.is_none() && fx.exit.is_none() && (fx.host_resync || !fx.remote.is_empty())
        {
            let done = self.coherence(&fx);
            covered = done.covered;
            fx.new_cr3 = own_root(fx.new_cr3, done.switched_root);
            if let Some(e) = self.delivery_error.take() {
                return Some(VcpuEnd::VmmFailure(e));
            }
        }
        effects::apply(&self.fd, &fx, covered, &mut self.stats)
            .unwrap_or_else(|e| Some(VcpuEnd::VmmFailure(e.to_string())))
    }

    /// Delivers `fx.remote` and performs `fx.host_resync`.
    fn coherence(&mut self, fx: &Effects) -> Coherence {
        let index = self.index;
        self.stats.smp.remote_requested += u64::from(fx.remote.len());
        self.stats.smp.remote_avoided += u64::from(fx.remote_avoided);
        let stop = self.stop.clone();
        let sync = self.sync.clone();
        let pool = self.pool_slot.clone().filter(|_| self.pool_resync);
        let (vm, stats) = (&*self.vm, &mut self.stats);
        let mut applied = VcpuStats::default();
        let mut apply = Applier::new(&self.fd, vm, index, &mut applied, &mut self.delivery_error);
        let resync_needed = fx.host_resync && pool.is_some();
        let t = Instant::now();
        let (delivered, resync) = if resync_needed {
            let mut resync_ns = 0;
            let mut ran = false;
            let mut chunks = 0;
            // Posted before the stop and not kicked: the stop kicks every vCPU inside
            // KVM_RUN, and each applies its request on its way to parking.
            let posted = sync.post(index, fx.remote, false);
            let (r, cost) = sync.stop_world(index, &stop, &mut apply, |apply| {
                let t = Instant::now();
                let d = sync.wait_acks(index, posted, &stop, apply);
                let wait = t.elapsed().as_nanos() as u64;
                let covered = vm.host_resync(&mut |stale| {
                    let t = Instant::now();
                    ran = true;
                    let clean = pool.as_ref().and_then(|p| {
                        p.resync(stale)
                            .map_err(|e| log::error!("host resync: {e}"))
                            .ok()
                    });
                    resync_ns = t.elapsed().as_nanos() as u64;
                    chunks = clean.as_ref().map_or(0, Vec::len);
                    clean
                });
                (d, wait, covered)
            });
            stats.smp.world_stops += 1;
            stats.smp.world_stop_kicks += u64::from(cost.kicks);
            stats.smp.world_stop.record(cost.park_ns + cost.work_ns);
            stats.effect("world_stop_park", cost.park_ns);
            if ran {
                stats.effect("host_resync", resync_ns);
                stats.smp.resync_chunks += chunks as u64;
            } else {
                stats.smp.resyncs_merged += 1;
            }
            match r {
                Some((d, wait, covered)) => ((d, wait), covered),
                None => ((Delivered::default(), 0), false),
            }
        } else {
            let d = sync.deliver(index, fx.remote, &stop, &mut apply);
            let wait = t.elapsed().as_nanos() as u64;
            if fx.host_resync {
                // Nothing to re-register here: the freed frames are clean once every vCPU
                // that could hold them has acknowledged (each finishes its flush before it
                // runs guest code again).
                vm.host_resync(&mut |stale| Some(stale.to_vec()));
            }
            ((d, wait), false)
        };
        let switched_root = apply.switched_root;
        drop(apply);
        stats.merge(&applied);
        record_delivery(stats, &delivered.0, delivered.1);
        Coherence {
            covered: resync,
            switched_root,
        }
    }
}

/// What [`Vcpu::coherence`] did besides delivering.
struct Coherence {
    /// A host resync after the batch dropped every translation (the caller's flush is done).
    covered: bool,
    /// While it waited, the caller applied a root switch another vCPU's later batch left
    /// for it (a `DETACH` of the root its own batch loaded).
    switched_root: bool,
}

/// The CR3 the caller loads after its deliveries: its batch's own root, unless a root
/// switch taken while it waited superseded it. The engine took the batch's root at the end
/// of the batch, so a switch found in the caller's mailbox afterwards is the newer one;
/// loading the batch's root after it would run on a root the engine may have freed.
fn own_root(batch_root: Option<u64>, switched_meanwhile: bool) -> Option<u64> {
    batch_root.filter(|_| !switched_meanwhile)
}

#[cfg(test)]
mod tests {
    use super::own_root;

    #[test]
    fn a_root_switch_taken_while_waiting_supersedes_the_batch_root() {
        assert_eq!(own_root(Some(0x5000), false), Some(0x5000));
        assert_eq!(own_root(Some(0x5000), true), None);
        assert_eq!(own_root(None, true), None);
        assert_eq!(own_root(None, false), None);
    }
}
