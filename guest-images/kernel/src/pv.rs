//! The guest side of the PV ABI: discovery, the VERSION handshake, and hypercalls through a
//! page-aligned per-CPU request block.
//!
//! Per-CPU state: [`REQ`], each CPU's request block.

use crate::arch::{KERNEL_VMA, MAX_CPUS};
use crate::sync::PerCpu;
use core::cell::UnsafeCell;
use hypercall::guest::{discover, Hypercall};
use hypercall::{op, RequestHeader, ABI_MAJOR};

/// A request block: page-aligned (the vmcall transport needs it), written by its CPU and by
/// the VMM during that CPU's hypercall.
#[repr(C, align(4096))]
struct ReqPage(UnsafeCell<RequestHeader>);

// SAFETY: each CPU uses only its own block (PerCpu), for one synchronous hypercall at a
// time; hypercalls are not re-entered (the kernel runs with interrupts off). A block costs
// exactly one page, so it carries no borrow flag.
unsafe impl Sync for ReqPage {}

/// Each CPU's request block.
static REQ: PerCpu<ReqPage> =
    PerCpu::new([const { ReqPage(UnsafeCell::new(RequestHeader::new(0, [0; 4]))) }; MAX_CPUS]);

/// A negotiated PV interface.
pub struct Pv {
    hc: Hypercall,
    version: u32,
    features: u32,
}

/// What one hypercall returned: its status and the block's result fields.
struct Answer {
    status: i64,
    value: u64,
    done: u32,
    fail_index: u32,
}

impl Pv {
    /// Discovers the ABI through CPUID and performs the VERSION handshake.
    pub fn discover() -> Option<Pv> {
        let d = discover()?;
        let hc = Hypercall::new(&d);
        let mut pv = Pv {
            hc,
            version: d.version,
            features: d.features,
        };
        let (status, value) = pv.call(op::VERSION, [u64::from(ABI_MAJOR), 0, 0, 0]);
        if status != 0 {
            return None;
        }
        pv.version = value as u32;
        pv.features = (value >> 32) as u32;
        Some(pv)
    }

    fn raw(&mut self, op: u32, args: [u64; 4]) -> Answer {
        let r: *mut RequestHeader = REQ.this().0.get();
        // SAFETY: the block is this CPU's (ReqPage) and mapped at KERNEL_VMA + its gpa; the
        // VMM writes it during the call, hence the volatile accesses.
        unsafe {
            r.write_volatile(RequestHeader::new(op, args));
            let status = self.hc.call(r, r as u64 - KERNEL_VMA);
            Answer {
                status,
                value: core::ptr::addr_of!((*r).value).read_volatile(),
                done: core::ptr::addr_of!((*r).done).read_volatile(),
                fail_index: core::ptr::addr_of!((*r).fail_index).read_volatile(),
            }
        }
    }

    /// Issues `op` with `args`; returns (status, value).
    pub fn call(&mut self, op: u32, args: [u64; 4]) -> (i64, u64) {
        let a = self.raw(op, args);
        (a.status, a.value)
    }

    /// MMU_BATCH of `count` entries at guest-physical `gpa`: (status, done, fail_index).
    pub fn mmu_batch(&mut self, gpa: u64, count: u64) -> (i64, u32, u32) {
        let a = self.raw(op::MMU_BATCH, [gpa, count, 0, 0]);
        (a.status, a.done, a.fail_index)
    }

    /// Ends the VM with `code`.
    pub fn exit(mut self, code: u8) -> u8 {
        self.call(op::EXIT, [u64::from(code), 0, 0, 0]);
        code
    }

    /// ABI version reported by VERSION.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Feature bits reported by VERSION.
    pub fn features(&self) -> u32 {
        self.features
    }

    /// Transport name.
    pub fn transport_name(&self) -> &'static str {
        self.hc.transport().name()
    }
}
