//! The contracts between the dispatcher, its op handlers and the vCPU loop: what a handler
//! is given ([`CallCtx`]), what it must implement ([`OpHandler`]), and what a call leaves for
//! the vCPU to do ([`Effects`], [`Outcome`]). Implementations live in the sibling modules.

use crate::guest_ram::GuestRam;
use hypercall::{HcError, Request, Response};

/// What the vCPU loop must do after a hypercall, besides resuming the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// End the VM with this status.
    pub exit: Option<u8>,
    /// Point the vCPU's CR3 at this shadow root.
    pub new_cr3: Option<u64>,
    /// Flush the vCPU's TLB.
    pub flush: bool,
    /// Make KVM drop what it cached from the shadow pool (re-register its memslot).
    pub host_resync: bool,
    /// `--check-shadow` found this engine invariant violated: end the VM.
    pub violation: Option<String>,
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
}
