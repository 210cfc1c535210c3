//! Handlers of the non-MMU ops: VERSION, EXIT and NULL.

use super::contract::{CallCtx, OpHandler};
use hypercall::{HcError, Request, Response, ABI_MAJOR, ABI_VERSION};

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
