//! Handlers of the non-MMU ops: VERSION, EXIT and NULL.

use super::dispatcher::CallCtx;
use hypercall::{HcError, Request, Response, ABI_MAJOR, ABI_VERSION};

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
}

/// `VERSION`: the handshake.
pub struct Version {
    /// Feature bits reported.
    pub features: u32,
}

impl OpHandler for Version {
    fn handle(&self, _ctx: &mut CallCtx<'_>, req: &Request) -> Response {
        match req {
            Request::Version { major } if *major == ABI_MAJOR => {
                Response::ok(u64::from(ABI_VERSION) | (u64::from(self.features) << 32))
            }
            _ => Response::err(HcError::Eproto),
        }
    }
}

/// `EXIT`: clean guest shutdown with a status.
pub struct Exit;

impl OpHandler for Exit {
    fn handle(&self, ctx: &mut CallCtx<'_>, req: &Request) -> Response {
        match req {
            Request::Exit { code } => {
                ctx.effects.exit = Some(*code);
                Response::ok(0)
            }
            _ => Response::err(HcError::Einval),
        }
    }
}

/// `NULL`: nothing, for measuring the transport.
pub struct Null;

impl OpHandler for Null {
    fn handle(&self, _ctx: &mut CallCtx<'_>, _req: &Request) -> Response {
        Response::ok(0)
    }
}
