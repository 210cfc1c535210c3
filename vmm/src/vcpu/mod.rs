//! One vCPU thread: the `KVM_RUN` loop around [`exit::handle_exit`] (exit dispatch, a free
//! function tested without KVM), [`effects::apply`] (CR3 loads, flushes, host resync), the
//! stop flag, periodic statistics snapshots and the final register dump.

pub mod diagnose;
pub mod effects;
pub mod end;
pub mod exit;
mod smp;

pub use effects::CR3_FLUSH_TOGGLE;
pub use end::VcpuEnd;

use crate::kick::{self, ThreadKicker};
use crate::memory::PoolSlot;
use crate::rendezvous::Rendezvous;
use crate::seccomp::{self, Filters, ThreadKind};
use crate::stats::kvm_stats::KvmStats;
use crate::stats::VcpuStats;
use crate::vm_ops::VmOps;
use exit::Next;
use kvm_ioctls::VcpuFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

/// Periodic snapshots: the requested epoch and the channel to the supervisor.
pub type SnapshotLink = (Arc<AtomicU64>, Sender<(usize, VcpuStats)>);

/// Everything a vCPU thread owns.
pub struct Vcpu {
    /// Index (APIC id).
    pub index: usize,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// The VM's services (buses, hypercalls, reset line).
    pub vm: Arc<dyn VmOps>,
    /// The shadow pool's memslot, re-registered when KVM must forget pool translations.
    pub pool_slot: Option<Arc<PoolSlot>>,
    /// Set when the VM must end.
    pub stop: Arc<AtomicBool>,
    /// Statistics collected by this thread.
    pub stats: VcpuStats,
    /// KVM's in-kernel counters for this vCPU.
    pub kvm_stats: Option<KvmStats>,
    /// Dump registers when the loop ends even on success.
    pub dump_regs: bool,
    /// Periodic snapshots: (requested epoch, channel to the supervisor).
    pub snapshots: Option<SnapshotLink>,
    /// Last snapshot epoch answered.
    pub seen_epoch: u64,
    /// The seccomp filters; the thread installs the vCPU one before its first `KVM_RUN`.
    pub filters: Arc<Filters>,
    /// Test only: make a syscall outside the allow-list at the first exit.
    pub provoke_violation: bool,
    /// The VM's vCPU rendezvous (remote flush delivery, world stops).
    pub sync: Arc<Rendezvous>,
    /// How other vCPUs kick this thread (it registers itself).
    pub kicker: ThreadKicker,
    /// This host needs the pool memslot re-registered to see VMM writes into shadows.
    pub pool_resync: bool,
    /// A delivery for another vCPU's batch failed to apply: the loop ends with it.
    pub delivery_error: Option<String>,
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

impl Vcpu {
    /// Runs until the guest exits, fails, or the VM is stopped.
    pub fn run(mut self) -> VcpuResult {
        if let Err(e) = self.filters.install(ThreadKind::Vcpu, self.index) {
            return VcpuResult {
                end: VcpuEnd::VmmFailure(e.to_string()),
                stats: self.stats,
                regs: None,
            };
        }
        self.kicker.register(self.index, true);
        let immediate_exit = &mut self.fd.get_kvm_run().immediate_exit as *mut u8;
        kick::arm(immediate_exit);
        let end = self.run_loop();
        // Nobody waits for this vCPU any more, and no kick may land on a dead mapping.
        self.sync.ended(self.index);
        self.kicker.register(self.index, false);
        kick::arm(std::ptr::null_mut());
        if let Some(v) = self.read_kvm_stats() {
            self.stats.kvm_end = v;
        }
        let regs = (end.is_failure() || self.dump_regs).then(|| self.dump());
        VcpuResult {
            end,
            stats: self.stats,
            regs,
        }
    }

    fn run_loop(&mut self) -> VcpuEnd {
        loop {
            // A kick that landed since the last KVM_RUN must not cut the next one short:
            // whatever it was for (stop, snapshot, delivery, world stop) is checked below.
            self.fd.set_kvm_immediate_exit(0);
            if self.stop.load(Ordering::Acquire) {
                return VcpuEnd::Stopped;
            }
            self.answer_snapshot();
            if !self.sync.enter(self.index) {
                self.service();
                if let Some(e) = self.delivery_error.take() {
                    return VcpuEnd::VmmFailure(e);
                }
                continue;
            }
            let t0 = Instant::now();
            let res = self.fd.run();
            let t1 = Instant::now();
            self.sync.left(self.index);
            self.stats.kvm_run_ns += (t1 - t0).as_nanos() as u64;
            let (name, next) = match res {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    ("signal", Next::Continue)
                }
                Err(e) => return VcpuEnd::VmmFailure(format!("KVM_RUN: {e}")),
                Ok(exit) => exit::handle_exit(exit, &*self.vm, self.index, &mut self.stats, t1),
            };
            if std::mem::take(&mut self.provoke_violation) {
                seccomp::sigsys::provoke_violation();
            }
            let end = self.finish(next);
            let handled = t1.elapsed().as_nanos() as u64;
            self.stats.vmm_ns += handled;
            self.stats.exit(name, handled);
            if let Some(e) = end {
                return e;
            }
        }
    }

    /// Carries out what the exit handler decided; `Some` ends the loop.
    fn finish(&mut self, next: Next) -> Option<VcpuEnd> {
        match next {
            Next::Continue => None,
            Next::End(e) => Some(e),
            Next::Apply(fx) => self.apply_hypercall(fx),
            // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the valid
            // member of the exit union.
            Next::InternalError => Some(VcpuEnd::InternalError(
                unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror },
                self.code_at_rip(),
            )),
        }
    }

    /// The instruction at RIP, read through the guest's page tables, as a one-line
    /// diagnosis (`None` if the registers cannot be read).
    fn code_at_rip(&self) -> Option<String> {
        let regs = self.fd.get_regs().ok()?;
        let sregs = self.fd.get_sregs().ok()?;
        let mem = self.vm.guest_memory()?;
        let paging = diagnose::Paging {
            cr0: sregs.cr0,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
        };
        let linear = sregs.cs.base.wrapping_add(regs.rip);
        let (code, short) = diagnose::read_code(mem, &paging, linear);
        Some(diagnose::describe(regs.rip, &code, short, sregs.cs.l == 1))
    }

    fn read_kvm_stats(&self) -> Option<std::collections::BTreeMap<String, u64>> {
        let v = self.kvm_stats.as_ref()?.read().ok()?;
        Some(v.into_iter().map(|(n, _, x)| (n, x)).collect())
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
        let tx = tx.clone();
        let mut s = self.stats.clone();
        if let Some(v) = self.read_kvm_stats() {
            s.kvm_end = v;
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
