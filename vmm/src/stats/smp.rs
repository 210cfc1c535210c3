//! Per-vCPU SMP TLB statistics: remote flushes this vCPU's batches asked for, how they were
//! delivered (kicks and their round trips), and the world stops of host resyncs.

use super::Latency;

/// What one vCPU's batches cost other vCPUs, and the world stops it led.
#[derive(Clone, Debug, Default)]
pub struct SmpStats {
    /// Other vCPUs its batches needed a delivery on (flush or root switch), summed over
    /// batches.
    pub remote_requested: u64,
    /// Requests posted to a live vCPU (the rest had ended).
    pub remote_sent: u64,
    /// Other vCPUs a flush-needing batch did not have to interrupt (they held no
    /// translation through the change).
    pub remote_avoided: u64,
    /// Other vCPUs flushed in the host kernel (a zap of stale pool frames) instead of
    /// being sent a delivery.
    pub kernel_flushes: u64,
    /// Zaps made for them (one per batch that needed any).
    pub kernel_zaps: u64,
    /// Kick signals sent to deliver (targets inside `KVM_RUN`; re-kicks included).
    pub kicks: u64,
    /// Kick round trips: from the first kick of a target to its acknowledgement, ns.
    pub kick_rtt: Latency,
    /// Their first part: the kick to the target leaving `KVM_RUN` (signal, `EINTR` exit,
    /// any wait for a CPU), ns.
    pub kick_exit: Latency,
    /// The target's work: leaving `KVM_RUN` to acknowledging (its flush ioctls), ns.
    pub kick_apply: Latency,
    /// The issuer's wake-up: the acknowledgement to the issuer seeing it, ns.
    pub kick_wake: Latency,
    /// Deliveries this vCPU applied for other vCPUs' batches.
    pub deliveries_applied: u64,
    /// World stops this vCPU led for a host resync.
    pub world_stops: u64,
    /// Kicks sent to park running vCPUs for those stops.
    pub world_stop_kicks: u64,
    /// Duration of each world stop (parking, deliveries, the resync), ns.
    pub world_stop: Latency,
    /// Host resyncs skipped because one that started later covered the batch.
    pub resyncs_merged: u64,
    /// Pool chunks (memslots) those resyncs re-registered.
    pub resync_chunks: u64,
}

impl SmpStats {
    /// Adds `o` into `self`.
    pub fn merge(&mut self, o: &SmpStats) {
        self.remote_requested += o.remote_requested;
        self.remote_sent += o.remote_sent;
        self.remote_avoided += o.remote_avoided;
        self.kernel_flushes += o.kernel_flushes;
        self.kernel_zaps += o.kernel_zaps;
        self.kicks += o.kicks;
        self.kick_rtt.merge(&o.kick_rtt);
        self.kick_exit.merge(&o.kick_exit);
        self.kick_apply.merge(&o.kick_apply);
        self.kick_wake.merge(&o.kick_wake);
        self.deliveries_applied += o.deliveries_applied;
        self.world_stops += o.world_stops;
        self.world_stop_kicks += o.world_stop_kicks;
        self.world_stop.merge(&o.world_stop);
        self.resyncs_merged += o.resyncs_merged;
        self.resync_chunks += o.resync_chunks;
    }

    /// What happened after `e` (a snapshot of the same vCPU).
    pub fn since(&self, e: &SmpStats) -> SmpStats {
        SmpStats {
            remote_requested: self.remote_requested.saturating_sub(e.remote_requested),
            remote_sent: self.remote_sent.saturating_sub(e.remote_sent),
            remote_avoided: self.remote_avoided.saturating_sub(e.remote_avoided),
            kernel_flushes: self.kernel_flushes.saturating_sub(e.kernel_flushes),
            kernel_zaps: self.kernel_zaps.saturating_sub(e.kernel_zaps),
            kicks: self.kicks.saturating_sub(e.kicks),
            kick_rtt: self.kick_rtt.since(&e.kick_rtt),
            kick_exit: self.kick_exit.since(&e.kick_exit),
            kick_apply: self.kick_apply.since(&e.kick_apply),
            kick_wake: self.kick_wake.since(&e.kick_wake),
            deliveries_applied: self.deliveries_applied.saturating_sub(e.deliveries_applied),
            world_stops: self.world_stops.saturating_sub(e.world_stops),
            world_stop_kicks: self.world_stop_kicks.saturating_sub(e.world_stop_kicks),
            world_stop: self.world_stop.since(&e.world_stop),
            resyncs_merged: self.resyncs_merged.saturating_sub(e.resyncs_merged),
            resync_chunks: self.resync_chunks.saturating_sub(e.resync_chunks),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_and_since() {
        let mut a = SmpStats {
            remote_requested: 3,
            kicks: 2,
            ..SmpStats::default()
        };
        a.kick_rtt.record(10_000);
        let first = a.clone();
        a.kicks += 1;
        a.kick_rtt.record(20_000);
        a.world_stops = 1;
        let d = a.since(&first);
        assert_eq!((d.kicks, d.remote_requested, d.world_stops), (1, 0, 1));
        assert_eq!((d.kick_rtt.count(), d.kick_rtt.total()), (1, 20_000));
        let mut m = SmpStats::default();
        m.merge(&a);
        m.merge(&first);
        assert_eq!((m.kicks, m.kick_rtt.count()), (5, 3));
    }
}
