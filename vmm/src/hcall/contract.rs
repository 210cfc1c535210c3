//! The contracts between the dispatcher, its op handlers and the vCPU loop: what a handler
//! is given ([`CallCtx`]), what it must implement ([`OpHandler`]), and what a call leaves for
//! the vCPU to do ([`Effects`], [`Outcome`]). Implementations live in the sibling modules.

use crate::guest_ram::GuestRam;
use hypercall::{HcError, Request, Response};
use std::time::Instant;

/// A host resync: given the stale pool chunks, makes the host forget what it cached from
/// them and returns the chunks now clean (`None`: it failed).
pub type ResyncFn<'a> = dyn FnMut(&[u32]) -> Option<Vec<u32>> + 'a;

/// What the vCPU loop must do after a hypercall, besides resuming the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// End the VM with this status.
    pub exit: Option<u8>,
    /// Point the vCPU's CR3 at this shadow root.
    pub new_cr3: Option<u64>,
    /// Flush the vCPU's TLB.
    pub flush: bool,
    /// Make KVM drop what it cached from the shadow pool (re-register its memslot, with
    /// every other vCPU parked outside `KVM_RUN`).
    pub host_resync: bool,
    /// Other vCPUs that must take and apply their delivery (a flush, a root switch) before
    /// the call returns ([`OpHandler::take_delivery`]).
    pub remote: shadow::VcpuSet,
    /// Other vCPUs a flush-needing change of the batch did not have to interrupt.
    pub remote_avoided: u32,
    /// Other vCPUs the batch flushed in the host kernel (a zap of the stale pool frames,
    /// before the batch ended; they are not in `remote`).
    pub kernel_flushed: u32,
    /// Time that zap took, ns.
    pub kernel_flush_ns: u64,
    /// `--check-shadow` found this engine invariant violated: end the VM.
    pub violation: Option<String>,
}

/// Where one MMU_BATCH's VMM time went, in ns: the phases in the order they run. Their sum
/// is the call's handling time less the few clock reads between them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmuPhases {
    /// Dispatcher: block checks, the copy of the request and its decoding.
    pub request: u64,
    /// Copying the entry array out of guest memory.
    pub copy_in: u64,
    /// Taking the engine lock, decoding and applying the entries except ZERO_FRAME,
    /// COPY_FRAME and the table and A/D operations.
    pub apply: u64,
    /// ZERO_FRAME entries (zeroing the frames).
    pub zero_frame: u64,
    /// COPY_FRAME entries (copying the frames).
    pub copy_frame: u64,
    /// PIN, UNPIN, NEW_BASEPTR, SET_KERNEL_ROOT and RELOCATE_TABLE entries: operations on a
    /// whole table or tree (validation, teardown, a root's shadow), no PTE update's cost.
    pub table_ops: u64,
    /// SYNC_AD and QUERY_AD entries (walks over a range of guest PTEs).
    pub ad_ops: u64,
    /// End of batch: the engine's flush decision, the host-resync decision, and the
    /// `--check-shadow` checker when enabled.
    pub end_batch: u64,
    /// The leaf zap: making the host forget the old targets of changed leaves (a host
    /// resync's stand-in, docs/pv-abi.md §6.6).
    pub host_zap: u64,
    /// Dispatcher: the guarded response write.
    pub response: u64,
    /// Not a phase: the PT_UPDATE entries the batch applied.
    pub pt_updates: u64,
}

/// The MMU_BATCH phases that are no PTE update's cost: frames zeroed or copied, whole-table
/// and A/D operations, and the leaf zap (a host resync's stand-in). The VMM cost per PTE
/// update is the MMU_BATCH time without them, divided by the PT_UPDATEs applied.
pub const NON_UPDATE_PHASES: [&str; 5] = [
    "zero_frame",
    "copy_frame",
    "table_ops",
    "ad_ops",
    "host_zap",
];

impl MmuPhases {
    /// The batch's time without the [`NON_UPDATE_PHASES`], ns: what its PTE updates cost
    /// (the phases summed directly: this runs on every batch; a test holds it to the list).
    pub fn update_ns(&self) -> u64 {
        self.request + self.copy_in + self.apply + self.end_batch + self.response
    }

    /// Each phase with its statistics name, in order.
    pub fn named(&self) -> [(&'static str, u64); 10] {
        [
            ("request", self.request),
            ("copy_in", self.copy_in),
            ("apply", self.apply),
            ("zero_frame", self.zero_frame),
            ("copy_frame", self.copy_frame),
            ("table_ops", self.table_ops),
            ("ad_ops", self.ad_ops),
            ("end_batch", self.end_batch),
            ("host_zap", self.host_zap),
            ("response", self.response),
        ]
    }
}

/// The result of one hypercall, for the statistics and the vCPU loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Op name (or "invalid" when the request could not be read/decoded).
    pub op: &'static str,
    /// Status returned to the guest.
    pub status: i64,
    /// MMU entries in the call (MMU_BATCH).
    pub entries: Option<u64>,
    /// Side effects to apply.
    pub effects: Effects,
    /// Per-phase timing (MMU_BATCH).
    pub phases: Option<MmuPhases>,
}

/// Per-call context handed to op handlers.
pub struct CallCtx<'a> {
    /// Calling vCPU index.
    pub vcpu: usize,
    /// Guest RAM accessor.
    pub ram: &'a GuestRam,
    /// Side effects the handler requests.
    pub effects: Effects,
    /// Entries processed (MMU_BATCH).
    pub entries: Option<u64>,
    /// Per-phase timing the MMU handler records (the dispatcher adds its own phases).
    pub phases: Option<MmuPhases>,
    /// The end of the last timed phase (see [`CallCtx::lap_ns`]).
    pub lap: Instant,
}

impl CallCtx<'_> {
    /// Nanoseconds since the end of the previous phase, which ends now: one clock read per
    /// phase, each phase starting where the previous one stopped.
    pub fn lap_ns(&mut self) -> u64 {
        let now = Instant::now();
        let ns = now.saturating_duration_since(self.lap).as_nanos() as u64;
        self.lap = now;
        ns
    }
}

/// A handler for one op.
pub trait OpHandler: Send + Sync {
    /// Feature bits this handler contributes to discovery.
    fn features(&self) -> u32 {
        0
    }
    /// True if the frame holding `gpa` belongs to this handler (a typed page table): the
    /// dispatcher then refuses to write a response there.
    fn owns_frame(&self, _gpa: u64) -> bool {
        false
    }
    /// Counters this handler exposes in the statistics report.
    fn report(&self) -> Option<serde_json::Value> {
        None
    }
    /// Handles a decoded request of this handler's op.
    fn handle(&self, ctx: &mut CallCtx<'_>, req: &Request) -> Response;
    /// Writes `bytes` at `gpa` (a hypercall response) on behalf of the dispatcher. The
    /// handler that owns page-table frames refuses (EPERM) a write into one, checking the
    /// frame's type under the same lock as the write, so no call can type the frame in
    /// between.
    fn write_guarded(&self, ram: &GuestRam, gpa: u64, bytes: &[u8]) -> Result<(), HcError> {
        ram.write(gpa, bytes)
    }
    /// Offers the page-table write modes through `alias` (the MMU handler; before the
    /// dispatcher reads the feature bits).
    fn enable_pt_trap(&mut self, _alias: crate::ptwrite::Alias) {}
    /// A store that exited as an MMIO write at `addr`: `Some(effects)` if it went through
    /// this handler's RAM alias (a trapped page-table store, handled), else `None`.
    fn trapped_write(
        &self,
        _ram: &GuestRam,
        _vcpu: usize,
        _addr: u64,
        _data: &[u8],
    ) -> Option<Effects> {
        None
    }
    /// What `vcpu` must apply before it runs guest code again because of another vCPU's
    /// call (its flush, a root switch): only `flush` and `new_cr3` are set.
    fn take_delivery(&self, _vcpu: usize) -> Effects {
        Effects::default()
    }
    /// Runs `resync` (the host resync, with every other vCPU parked) under this handler's
    /// lock on the pool chunks still stale (not at all if none is: a later resync covered
    /// them); `resync` returns the chunks it made clean (`None`: it failed), whose frames
    /// then count as clean. Returns whether every chunk was resynced (every translation
    /// the host cached from the pool dropped, the caller's own flush included).
    fn host_resync(&self, _resync: &mut ResyncFn<'_>) -> bool {
        false
    }
    /// Splits the shadow pool into host-resync chunks of `frames` frames (one memslot
    /// each).
    fn set_resync_granule(&mut self, _frames: u32) {}
    /// Delivers remote flushes through `zap` where it can (the MMU handler; before the
    /// first call, on a host that needs no pool resync): see docs/pv-abi.md §6.5.
    fn enable_kernel_flush(&mut self, _zap: Box<dyn PoolZap>) {}
    /// Makes the host forget changed leaves through `zap` instead of a pool resync (the
    /// MMU handler; before the first call, on a host that needs the resync and whose
    /// probe found leaf zaps work): see docs/pv-abi.md §6.6.
    fn enable_leaf_zap(&mut self, _zap: Box<dyn RamZap>) {}
}

/// Makes the host kernel forget its mappings of guest RAM frames, which makes KVM drop
/// every translation it made to them (the leaf zap).
pub trait RamZap: Send + Sync {
    /// Zaps the host's mappings of RAM frames `frames` (frame numbers, ascending); returns
    /// the system calls it made.
    fn zap(&self, frames: &[u64]) -> std::io::Result<u32>;
}

/// Makes KVM flush every vCPU's TLB before any of them runs guest code again, through the
/// host kernel (the kernel flush, docs/pv-abi.md §6.5): by zapping the host's mappings of
/// the changed pool frames, or by a dirty-log fetch that flushes whatever it finds.
pub trait PoolZap: Send + Sync {
    /// Flushes for calling vCPU `vcpu` (out of `KVM_RUN` on its own thread); `frames` are
    /// the changed pool frames (pool frame indices, ascending), which a zap unmaps.
    fn zap(&self, vcpu: usize, frames: &[u32]) -> std::io::Result<()>;
    /// The trigger's name in the statistics (`vm.pool_resync.kernel_flush`).
    fn name(&self) -> &'static str;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_update_cost_is_every_phase_but_the_non_update_ones() {
        let p = MmuPhases {
            request: 1,
            copy_in: 2,
            apply: 4,
            zero_frame: 8,
            copy_frame: 16,
            table_ops: 32,
            ad_ops: 64,
            end_batch: 128,
            host_zap: 256,
            response: 512,
            pt_updates: 1024,
        };
        let named = p.named();
        let update: u64 = named
            .iter()
            .filter(|(n, _)| !NON_UPDATE_PHASES.contains(n))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(p.update_ns(), update);
        let all: u64 = named.iter().map(|(_, v)| v).sum();
        assert_eq!(all, 1023, "every phase named once, the count not a phase");
        assert!(NON_UPDATE_PHASES
            .iter()
            .all(|n| named.iter().any(|(m, _)| m == n)));
    }
}
