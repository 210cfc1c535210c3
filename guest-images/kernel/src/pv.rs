//! The guest side of the PV ABI: discovery, the VERSION handshake, and hypercalls through a
//! page-aligned per-CPU request block.

use hypercall::guest::{discover, Hypercall};
use hypercall::{op, RequestHeader, ABI_MAJOR};

#[repr(C, align(4096))]
struct ReqPage(RequestHeader);

static mut REQ: ReqPage = ReqPage(RequestHeader::new(0, [0; 4]));

/// A negotiated PV interface.
pub struct Pv {
    hc: Hypercall,
    version: u32,
    features: u32,
}

fn req_ptr() -> *mut RequestHeader {
    // SAFETY: single CPU, interrupts off: no concurrent use of the request block.
    unsafe { core::ptr::addr_of_mut!(REQ.0) }
}

fn gpa_of<T>(p: *const T) -> u64 {
    p as u64 - crate::KERNEL_VMA
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

    /// Issues `op` with `args`; returns (status, value).
    pub fn call(&mut self, op: u32, args: [u64; 4]) -> (i64, u64) {
        let r = req_ptr();
        // SAFETY: the block is ours and identity-offset mapped at KERNEL_VMA.
        unsafe {
            r.write_volatile(RequestHeader::new(op, args));
            let s = self.hc.call(r, gpa_of(r));
            (s, core::ptr::addr_of!((*r).value).read_volatile())
        }
    }

    /// MMU_BATCH of `count` entries at guest-physical `gpa`: (status, done, fail_index).
    pub fn mmu_batch(&mut self, gpa: u64, count: u64) -> (i64, u32, u32) {
        let (s, _) = self.call(op::MMU_BATCH, [gpa, count, 0, 0]);
        let r = req_ptr();
        // SAFETY: our request block.
        unsafe {
            (
                s,
                core::ptr::addr_of!((*r).done).read_volatile(),
                core::ptr::addr_of!((*r).fail_index).read_volatile(),
            )
        }
    }

    /// Ends the VM with `code`.
    pub fn exit_ref(&mut self, code: u8) {
        self.call(op::EXIT, [u64::from(code), 0, 0, 0]);
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
