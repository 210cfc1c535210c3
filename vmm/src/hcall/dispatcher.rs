//! Copies a request out of guest memory once, validates it, routes it by op to its handler,
//! and writes the response back.

use super::contract::{CallCtx, Effects, OpHandler, Outcome, ResyncFn};
use super::ops;
use crate::guest_ram::GuestRam;
use hypercall::{
    decode_request, op, HcError, Request, Response, REQUEST_ALIGN, REQUEST_IN_LEN, RESPONSE_OFFSET,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Routes requests to op handlers. Shared by all vCPU threads.
pub struct Dispatcher {
    ram: GuestRam,
    handlers: BTreeMap<u32, Box<dyn OpHandler>>,
    negotiated: AtomicBool,
    last_status: Arc<Vec<AtomicI64>>,
}

impl Dispatcher {
    /// A dispatcher with the standard ops; `mmu` handles MMU_BATCH (ENOSYS when absent).
    pub fn new(ram: GuestRam, vcpus: usize, mmu: Option<Box<dyn OpHandler>>) -> Dispatcher {
        let mut handlers: BTreeMap<u32, Box<dyn OpHandler>> = BTreeMap::new();
        handlers.insert(
            op::VERSION,
            Box::new(ops::Version {
                features: mmu.as_ref().map_or(0, |m| m.features()),
            }),
        );
        handlers.insert(op::EXIT, Box::new(ops::Exit));
        handlers.insert(op::NULL, Box::new(ops::Null));
        if let Some(m) = mmu {
            handlers.insert(op::MMU_BATCH, m);
        }
        Dispatcher {
            ram,
            handlers,
            negotiated: AtomicBool::new(false),
            last_status: Arc::new((0..vcpus).map(|_| AtomicI64::new(0)).collect()),
        }
    }

    /// Feature bits advertised in CPUID and by VERSION.
    pub fn features(&self) -> u32 {
        self.handlers
            .get(&op::MMU_BATCH)
            .map_or(0, |h| h.features())
    }

    /// The MMU handler's counters, for the statistics report.
    pub fn mmu_report(&self) -> Option<serde_json::Value> {
        self.handlers.get(&op::MMU_BATCH).and_then(|h| h.report())
    }

    /// A store that exited as an MMIO write at `addr`: the MMU handler's effects if it was a
    /// trapped page-table store (through the RAM alias), `None` for any other MMIO.
    pub fn pt_write(&self, vcpu: usize, addr: u64, data: &[u8]) -> Option<Effects> {
        self.handlers
            .get(&op::MMU_BATCH)
            .and_then(|h| h.trapped_write(&self.ram, vcpu, addr, data))
    }

    /// The per-vCPU "last status" registers read through the doorbell's status port.
    pub fn last_status(&self) -> Arc<Vec<AtomicI64>> {
        self.last_status.clone()
    }

    /// Handles the request block at guest-physical `gpa` for `vcpu`.
    pub fn handle(&self, vcpu: usize, gpa: u64) -> Outcome {
        let mut ctx = CallCtx {
            vcpu,
            ram: &self.ram,
            effects: Effects::default(),
            entries: None,
            phases: None,
            lap: Instant::now(),
        };
        let mut request_ns = 0;
        let (name, resp, writable) = match self.read_request(gpa) {
            Err(e) => ("invalid", Response::err(e), false),
            Ok(bytes) => match decode_request(&bytes) {
                // docs/pv-abi.md 3.1: decoding first, then the handshake gate.
                Err(e) => (op_name(&bytes), Response::err(e), true),
                Ok(req) => {
                    let op = op_of(&req);
                    let gated = !self.negotiated.load(Ordering::Relaxed)
                        && op != op::VERSION
                        && op != op::EXIT;
                    let resp = if gated {
                        Response::err(HcError::Eproto)
                    } else {
                        if op == op::MMU_BATCH {
                            request_ns = ctx.lap_ns();
                        }
                        self.dispatch(&mut ctx, &req)
                    };
                    (op::name(op), resp, true)
                }
            },
        };
        if writable {
            if let Err(e) = self.write_response(gpa + RESPONSE_OFFSET as u64, &resp.to_bytes()) {
                // The block is left untouched; the status register (pio) or rax (vmcall)
                // still carries the call's status.
                log::debug!("hypercall response at {gpa:#x} not written: {}", e.name());
            }
            if ctx.phases.is_some() {
                let response = ctx.lap_ns();
                if let Some(p) = ctx.phases.as_mut() {
                    p.request = request_ns;
                    p.response = response;
                }
            }
        }
        if let Some(s) = self.last_status.get(vcpu) {
            s.store(resp.status, Ordering::Relaxed);
        }
        Outcome {
            op: name,
            status: resp.status,
            entries: ctx.entries,
            effects: ctx.effects,
            phases: ctx.phases,
        }
    }

    /// What `vcpu` must apply because of another vCPU's MMU batch (see
    /// [`OpHandler::take_delivery`]).
    pub fn take_delivery(&self, vcpu: usize) -> Effects {
        self.handlers
            .get(&op::MMU_BATCH)
            .map_or_else(Effects::default, |h| h.take_delivery(vcpu))
    }

    /// The MMU handler's host resync (see [`OpHandler::host_resync`]).
    pub fn host_resync(&self, resync: &mut ResyncFn<'_>) -> bool {
        self.handlers
            .get(&op::MMU_BATCH)
            .is_some_and(|h| h.host_resync(resync))
    }

    /// Writes a response through the MMU handler's guard when there is one (it refuses a
    /// frame that became a page table, under the engine lock), else directly.
    fn write_response(&self, gpa: u64, bytes: &[u8]) -> Result<(), HcError> {
        match self.handlers.get(&op::MMU_BATCH) {
            Some(h) => h.write_guarded(&self.ram, gpa, bytes),
            None => self.ram.write(gpa, bytes),
        }
    }

    fn read_request(&self, gpa: u64) -> Result<[u8; REQUEST_IN_LEN], HcError> {
        if !gpa.is_multiple_of(REQUEST_ALIGN) {
            return Err(HcError::Einval);
        }
        let mut b = [0u8; REQUEST_IN_LEN];
        // The whole block (including the response) must be RAM, and not a page table the
        // VMM validates: the response write must never bypass the shadow engine.
        self.ram.check(gpa, hypercall::REQUEST_LEN as u64)?;
        if self.handlers.values().any(|h| h.owns_frame(gpa)) {
            return Err(HcError::Eperm);
        }
        self.ram.read(gpa, &mut b)?;
        Ok(b)
    }

    fn dispatch(&self, ctx: &mut CallCtx<'_>, req: &Request) -> Response {
        let op = op_of(req);
        // The page-table write ops belong to the MMU handler.
        let key = match op {
            op::PT_WRITES | op::PT_FAULT => op::MMU_BATCH,
            o => o,
        };
        let Some(h) = self.handlers.get(&key) else {
            return Response::err(HcError::Enosys);
        };
        let r = h.handle(ctx, req);
        if op == op::VERSION && r.status == 0 {
            self.negotiated.store(true, Ordering::Relaxed);
        }
        r
    }
}

fn op_of(r: &Request) -> u32 {
    match r {
        Request::Version { .. } => op::VERSION,
        Request::Exit { .. } => op::EXIT,
        Request::Null => op::NULL,
        Request::MmuBatch { .. } => op::MMU_BATCH,
        Request::PtWrites { .. } => op::PT_WRITES,
        Request::PtFault { .. } => op::PT_FAULT,
    }
}

fn op_name(bytes: &[u8]) -> &'static str {
    let n = bytes
        .get(0..4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]));
    match op::name(n) {
        "unknown" => "unknown",
        s => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypercall::RequestHeader;

    fn setup() -> (Dispatcher, GuestRam) {
        let ram = GuestRam::for_test(1 << 20);
        (Dispatcher::new(ram.clone(), 1, None), ram)
    }

    fn call(d: &Dispatcher, ram: &GuestRam, gpa: u64, op: u32, args: [u64; 4]) -> (Outcome, i64) {
        ram.write(gpa, &RequestHeader::new(op, args).to_bytes())
            .unwrap();
        let o = d.handle(0, gpa);
        let mut s = [0u8; 8];
        ram.read(gpa + RESPONSE_OFFSET as u64, &mut s).unwrap();
        (o, i64::from_le_bytes(s))
    }

    #[test]
    fn handshake_gates_other_ops() {
        let (d, ram) = setup();
        let (o, s) = call(&d, &ram, 0x1000, op::NULL, [0; 4]);
        assert_eq!(
            (o.status, s),
            (HcError::Eproto.status(), HcError::Eproto.status())
        );
        let (_, s) = call(&d, &ram, 0x1000, op::VERSION, [2, 0, 0, 0]);
        assert_eq!(s, HcError::Eproto.status(), "wrong major");
        let (o, s) = call(&d, &ram, 0x1000, op::VERSION, [1, 0, 0, 0]);
        assert_eq!((o.status, s, o.op), (0, 0, "VERSION"));
        let mut v = [0u8; 8];
        ram.read(0x1000 + 48, &mut v).unwrap();
        assert_eq!(
            u64::from_le_bytes(v) & 0xffff_ffff,
            u64::from(hypercall::ABI_VERSION)
        );
        let (_, s) = call(&d, &ram, 0x1000, op::NULL, [0; 4]);
        assert_eq!(s, 0);
    }

    #[test]
    fn bad_requests_get_documented_errors() {
        let (d, ram) = setup();
        call(&d, &ram, 0x1000, op::VERSION, [1, 0, 0, 0]);
        assert_eq!(
            call(&d, &ram, 0x1000, 77, [0; 4]).1,
            HcError::Enosys.status()
        );
        assert_eq!(
            call(&d, &ram, 0x1000, op::MMU_BATCH, [0x2000, 1, 0, 0]).1,
            HcError::Enosys.status(),
            "no MMU yet"
        );
        assert_eq!(
            call(&d, &ram, 0x1000, op::MMU_BATCH, [0x2000, 0, 0, 0]).1,
            HcError::Einval.status()
        );
        assert_eq!(
            call(&d, &ram, 0x1000, op::MMU_BATCH, [0x2000, 5000, 0, 0]).1,
            HcError::E2big.status()
        );
        assert_eq!(
            call(&d, &ram, 0x1000, op::NULL, [0, 0, 0, 9]).1,
            HcError::Einval.status()
        );
        // Misaligned and out-of-RAM requests cannot be answered in memory: status register.
        assert_eq!(d.handle(0, 0x1008).status, HcError::Einval.status());
        assert_eq!(
            d.last_status()[0].load(Ordering::Relaxed),
            HcError::Einval.status()
        );
        assert_eq!(d.handle(0, 1 << 20).status, HcError::Efault.status());
        assert_eq!(d.handle(0, (1 << 20) - 32).status, HcError::Einval.status());
        assert_eq!(
            d.handle(0, (1 << 20) - 64).status,
            HcError::Enosys.status(),
            "zeroed block: op 0"
        );
        assert_eq!(d.handle(0, u64::MAX - 63).status, HcError::Efault.status());
    }

    /// docs/pv-abi.md 3.1: the block checks (1-3), then decoding (4), then the handshake
    /// gate (5), then the handler (6-7); one case per step, before any VERSION.
    #[test]
    fn dispatch_follows_the_documented_order() {
        let (d, ram) = setup();
        assert_eq!(d.handle(0, 0x1008).status, HcError::Einval.status(), "1");
        assert_eq!(d.handle(0, 1 << 20).status, HcError::Efault.status(), "2");
        assert_eq!(
            call(&d, &ram, 0x1000, 77, [0; 4]).1,
            HcError::Enosys.status(),
            "4: unknown op, even before VERSION"
        );
        assert_eq!(
            call(&d, &ram, 0x1000, op::MMU_BATCH, [0x2000, 0, 0, 0]).1,
            HcError::Einval.status(),
            "4: bad arguments, even before VERSION"
        );
        assert_eq!(
            call(&d, &ram, 0x1000, op::NULL, [0; 4]).1,
            HcError::Eproto.status(),
            "5: a valid op before VERSION"
        );
        call(&d, &ram, 0x1000, op::VERSION, [1, 0, 0, 0]);
        assert_eq!(
            call(&d, &ram, 0x1000, op::MMU_BATCH, [0x2000, 1, 0, 0]).1,
            HcError::Enosys.status(),
            "6: no MMU handler"
        );
        assert_eq!(call(&d, &ram, 0x1000, op::NULL, [0; 4]).1, 0, "7");
    }

    #[test]
    fn exit_requests_shutdown() {
        let (d, ram) = setup();
        let (o, s) = call(&d, &ram, 0x1000, op::EXIT, [7, 0, 0, 0]);
        assert_eq!((s, o.effects.exit), (0, Some(7)));
    }
}
