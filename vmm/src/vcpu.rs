//! One vCPU thread: the `KVM_RUN` loop, a single `match` on the exit reason that dispatches
//! to the buses and the hypercall dispatcher, and per-exit statistics.

use crate::devices::{Bus, BusAction};
use crate::hcall::{Dispatcher, Effects, Outcome};
use crate::stats::kvm_stats::KvmStats;
use crate::stats::{Dir, VcpuStats};
use hypercall::HcError;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// CR3 bit toggled to force KVM to drop cached translations (PWT; harmless for RAM).
pub const CR3_FLUSH_TOGGLE: u64 = 1 << 3;

/// Periodic snapshots: the requested epoch and the channel to the main thread.
pub type SnapshotLink = (
    Arc<std::sync::atomic::AtomicU64>,
    std::sync::mpsc::Sender<(usize, VcpuStats)>,
);

/// Why a vCPU stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest called EXIT with this status.
    GuestExit(u8),
    /// The guest reset or powered off through the i8042 or a system event.
    Reset,
    /// Triple fault.
    TripleFault,
    /// KVM_EXIT_FAIL_ENTRY with the hardware reason.
    FailEntry(u64),
    /// KVM_EXIT_INTERNAL_ERROR with its suberror.
    InternalError(u32),
    /// An exit the VMM does not handle.
    Unhandled(&'static str),
    /// Another vCPU (or the timeout) ended the VM.
    Stopped,
    /// A KVM ioctl failed.
    VmmFailure(String),
}

/// Everything a vCPU thread owns.
pub struct Vcpu {
    /// Index (APIC id).
    pub index: usize,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Hypercall dispatcher.
    pub hcalls: Arc<Dispatcher>,
    /// The shadow pool's memslot, re-registered when KVM must forget pool translations.
    pub pool_slot: Option<Arc<crate::vm::PoolSlot>>,
    /// Set when the VM must end.
    pub stop: Arc<AtomicBool>,
    /// Statistics collected by this thread.
    pub stats: VcpuStats,
    /// KVM's in-kernel counters for this vCPU.
    pub kvm_stats: Option<KvmStats>,
    /// Dump registers when the loop ends even on success.
    pub dump_regs: bool,
    /// Periodic snapshots: (requested epoch, channel to the main thread).
    pub snapshots: Option<SnapshotLink>,
    /// Last snapshot epoch answered.
    pub seen_epoch: u64,
}

/// What the loop returns.
pub struct VcpuResult {
    /// Why it stopped.
    pub end: VcpuEnd,
    /// Its statistics.
    pub stats: VcpuStats,
    /// Register dump (on error or when asked).
    pub regs: Option<String>,
}

/// Name of every exit reason kvm-ioctls can return.
pub fn exit_name(e: &VcpuExit<'_>) -> &'static str {
    match e {
        VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => "io",
        VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => "mmio",
        VcpuExit::Unknown => "unknown",
        VcpuExit::Exception => "exception",
        VcpuExit::Hypercall(_) => "hypercall",
        VcpuExit::Debug(_) => "debug",
        VcpuExit::Hlt => "hlt",
        VcpuExit::IrqWindowOpen => "irq_window_open",
        VcpuExit::Shutdown => "shutdown",
        VcpuExit::FailEntry(..) => "fail_entry",
        VcpuExit::Intr => "intr",
        VcpuExit::SetTpr => "set_tpr",
        VcpuExit::TprAccess => "tpr_access",
        VcpuExit::S390Sieic => "s390_sieic",
        VcpuExit::S390Reset => "s390_reset",
        VcpuExit::Dcr => "dcr",
        VcpuExit::Nmi => "nmi",
        VcpuExit::InternalError => "internal_error",
        VcpuExit::Osi => "osi",
        VcpuExit::PaprHcall => "papr_hcall",
        VcpuExit::S390Ucontrol => "s390_ucontrol",
        VcpuExit::Watchdog => "watchdog",
        VcpuExit::S390Tsch => "s390_tsch",
        VcpuExit::Epr => "epr",
        VcpuExit::SystemEvent(..) => "system_event",
        VcpuExit::S390Stsi => "s390_stsi",
        VcpuExit::IoapicEoi(_) => "ioapic_eoi",
        VcpuExit::Hyperv => "hyperv",
        VcpuExit::X86Rdmsr(_) => "x86_rdmsr",
        VcpuExit::X86Wrmsr(_) => "x86_wrmsr",
        VcpuExit::MemoryFault { .. } => "memory_fault",
        VcpuExit::Unsupported(_) => "unsupported",
    }
}

/// Handles one hypercall (either transport) and records it in `stats`.
fn hypercall(hcalls: &Dispatcher, stats: &mut VcpuStats, vcpu: usize, gpa: u64) -> Outcome {
    let t = Instant::now();
    let o = hcalls.handle(vcpu, gpa);
    let err =
        (o.status < 0).then(|| HcError::from_status(o.status).map_or("unknown", |e| e.name()));
    stats.hypercall(o.op, t.elapsed().as_nanos() as u64, err, o.entries);
    o
}

/// Per-exit decision taken inside the borrow of the exit, applied after it.
enum Next {
    Continue,
    End(VcpuEnd),
    Apply(Effects),
}

impl Vcpu {
    fn action(&mut self, a: BusAction) -> Next {
        match a {
            BusAction::None => Next::Continue,
            BusAction::Reset => Next::End(VcpuEnd::Reset),
            BusAction::Hypercall(gpa) => {
                Next::Apply(hypercall(&self.hcalls, &mut self.stats, self.index, gpa).effects)
            }
        }
    }

    fn apply(&mut self, fx: Effects) -> Result<Option<VcpuEnd>, String> {
        if let Some(code) = fx.exit {
            return Ok(Some(VcpuEnd::GuestExit(code)));
        }
        let mut flushed = false;
        if fx.host_resync {
            if let Some(p) = &self.pool_slot {
                let t = Instant::now();
                p.resync()?;
                self.stats
                    .effect("host_resync", t.elapsed().as_nanos() as u64);
                // KVM dropped every translation through the pool: that is a TLB flush.
                flushed = true;
            }
        }
        let toggle = fx.flush && !flushed;
        if fx.new_cr3.is_some() || toggle {
            let t = Instant::now();
            let mut s = self
                .fd
                .get_sregs()
                .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
            match fx.new_cr3 {
                // Loading a different root flushes by itself; reloading the same root with a
                // flush pending must still change CR3 for KVM to drop cached translations.
                Some(cr3) if !(toggle && s.cr3 & !CR3_FLUSH_TOGGLE == cr3) => s.cr3 = cr3,
                _ => s.cr3 ^= CR3_FLUSH_TOGGLE,
            }
            self.fd
                .set_sregs(&s)
                .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
            let name = if fx.new_cr3.is_some() {
                "cr3_load"
            } else {
                "tlb_flush_cr3"
            };
            self.stats.effect(name, t.elapsed().as_nanos() as u64);
        }
        Ok(None)
    }

    /// Runs until the guest exits, fails, or the VM is stopped.
    pub fn run(mut self) -> VcpuResult {
        let end = self.run_loop();
        if let Some(k) = &self.kvm_stats {
            if let Ok(v) = k.read() {
                self.stats.kvm_end = v.into_iter().map(|(n, _, x)| (n, x)).collect();
            }
        }
        let failed = !matches!(
            end,
            VcpuEnd::GuestExit(_) | VcpuEnd::Reset | VcpuEnd::Stopped
        );
        let regs = (failed || self.dump_regs).then(|| self.dump());
        VcpuResult {
            end,
            stats: self.stats,
            regs,
        }
    }

    fn run_loop(&mut self) -> VcpuEnd {
        loop {
            if self.stop.load(Ordering::Acquire) {
                return VcpuEnd::Stopped;
            }
            self.answer_snapshot();
            let t0 = Instant::now();
            let res = self.fd.run();
            let t1 = Instant::now();
            self.stats.kvm_run_ns += (t1 - t0).as_nanos() as u64;
            let (name, next) = match res {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    ("signal", Next::Continue)
                }
                Err(e) => return VcpuEnd::VmmFailure(format!("KVM_RUN: {e}")),
                Ok(exit) => {
                    let name = exit_name(&exit);
                    let next = match exit {
                        VcpuExit::IoOut(port, data) => {
                            let (a, dev) = self.pio.write(self.index, u64::from(port), data);
                            self.stats
                                .pio(port, Dir::Out, dev, t1.elapsed().as_nanos() as u64);
                            self.action(a)
                        }
                        VcpuExit::IoIn(port, data) => {
                            let dev = self.pio.read(self.index, u64::from(port), data);
                            self.stats
                                .pio(port, Dir::In, dev, t1.elapsed().as_nanos() as u64);
                            Next::Continue
                        }
                        VcpuExit::MmioRead(addr, data) => {
                            let dev = self.mmio.read(self.index, addr, data);
                            self.stats
                                .mmio(dev, Dir::In, t1.elapsed().as_nanos() as u64);
                            Next::Continue
                        }
                        VcpuExit::MmioWrite(addr, data) => {
                            let (a, dev) = self.mmio.write(self.index, addr, data);
                            self.stats
                                .mmio(dev, Dir::Out, t1.elapsed().as_nanos() as u64);
                            self.action(a)
                        }
                        VcpuExit::Hypercall(h) => {
                            if h.nr != hypercall::VMCALL_NR {
                                *h.ret = HcError::Enosys.status() as u64;
                                Next::Continue
                            } else if h.args[1] != 1 || h.args[2] != 0 {
                                // rcx must be 1 and rdx 0 (docs/pv-abi.md).
                                *h.ret = HcError::Einval.status() as u64;
                                Next::Continue
                            } else {
                                let o =
                                    hypercall(&self.hcalls, &mut self.stats, self.index, h.args[0]);
                                *h.ret = o.status as u64;
                                Next::Apply(o.effects)
                            }
                        }
                        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Next::Continue,
                        VcpuExit::Shutdown => Next::End(VcpuEnd::TripleFault),
                        VcpuExit::FailEntry(reason, _) => Next::End(VcpuEnd::FailEntry(reason)),
                        VcpuExit::InternalError => Next::End(VcpuEnd::InternalError(0)),
                        VcpuExit::SystemEvent(kind, _) => match kind {
                            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN
                            | kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::End(VcpuEnd::Reset),
                            _ => Next::End(VcpuEnd::Unhandled("system_event")),
                        },
                        other => Next::End(VcpuEnd::Unhandled(exit_name(&other))),
                    };
                    (name, next)
                }
            };
            let end = match next {
                Next::Continue => None,
                Next::End(e) => Some(e),
                Next::Apply(fx) => match self.apply(fx) {
                    Ok(e) => e,
                    Err(msg) => Some(VcpuEnd::VmmFailure(msg)),
                },
            };
            let handled = t1.elapsed().as_nanos() as u64;
            self.stats.vmm_ns += handled;
            self.stats.exit(name, handled);
            if let Some(mut e) = end {
                if e == VcpuEnd::InternalError(0) {
                    // SAFETY: reading the union member for KVM_EXIT_INTERNAL_ERROR.
                    e = VcpuEnd::InternalError(unsafe {
                        self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror
                    });
                }
                return e;
            }
        }
    }

    fn answer_snapshot(&mut self) {
        let Some((epoch, tx)) = &self.snapshots else {
            return;
        };
        let e = epoch.load(Ordering::Acquire);
        if e == self.seen_epoch {
            return;
        }
        self.seen_epoch = e;
        let mut s = self.stats.clone();
        if let Some(Ok(v)) = self.kvm_stats.as_ref().map(|k| k.read()) {
            s.kvm_end = v.into_iter().map(|(n, _, x)| (n, x)).collect();
        }
        let _ = tx.send((self.index, s));
    }

    /// One-line-per-group register dump.
    pub fn dump(&self) -> String {
        let mut s = format!("vCPU {} registers:\n", self.index);
        if let Ok(r) = self.fd.get_regs() {
            s += &format!(
                "  rip={:#018x} rsp={:#018x} rflags={:#x}\n  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}\n  r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}\n",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
            );
        }
        if let Ok(sr) = self.fd.get_sregs() {
            s += &format!(
                "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}(dpl {}) ss={:#x}\n",
                sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer, sr.cs.selector, sr.cs.dpl, sr.ss.selector
            );
        }
        s
    }
}
