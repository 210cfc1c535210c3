//! Exit dispatch as a free function: one `match` on the `VcpuExit` that routes port I/O and
//! MMIO to the VM's buses, both hypercall transports to the dispatcher, and the rest to an
//! end reason. It touches no KVM file descriptor, so every arm is unit-tested with made-up
//! exits.

use super::end::VcpuEnd;
use crate::hcall::doorbell::{self, DOORBELL_NAME};
use crate::hcall::{vmcall, Effects, Outcome};
use crate::stats::{Dir, VcpuStats};
use crate::vm_ops::VmOps;
use hypercall::{HcError, DOORBELL_PORT};
use kvm_ioctls::VcpuExit;
use std::time::Instant;

/// Device name of trapped page-table stores in the statistics.
pub const PT_TRAP_NAME: &str = "pt-trap";

/// What the vCPU loop does after an exit has been handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Resume the guest.
    Continue,
    /// Stop this vCPU.
    End(VcpuEnd),
    /// Apply a hypercall's effects (CR3 load, flush, resync, exit), then resume.
    Apply(Effects),
    /// `KVM_EXIT_INTERNAL_ERROR`: the loop reads the suberror from `kvm_run` and stops.
    InternalError,
}

/// Handles one exit of vCPU `vcpu`; `since` is when `KVM_RUN` returned (for per-device
/// timing). Returns the exit's reason name and what to do next.
pub fn handle_exit(
    exit: VcpuExit<'_>,
    vm: &dyn VmOps,
    vcpu: usize,
    stats: &mut VcpuStats,
    since: Instant,
) -> (&'static str, Next) {
    let name = exit_name(&exit);
    log::trace!("vCPU {vcpu}: {name} exit");
    let next = match exit {
        VcpuExit::IoOut(port, data) => port_write(vm, vcpu, stats, since, port, data),
        VcpuExit::IoIn(port, data) => {
            let dev = vm.pio_read(vcpu, port, data);
            stats.pio(port, Dir::In, dev, elapsed(since));
            Next::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            let dev = vm.mmio_read(vcpu, addr, data);
            stats.mmio(dev, Dir::In, elapsed(since));
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if let Some(fx) = vm.pt_write(vcpu, addr, data) {
                stats.mmio(PT_TRAP_NAME, Dir::Out, elapsed(since));
                return (name, Next::Apply(fx));
            }
            let dev = vm.mmio_write(vcpu, addr, data);
            stats.mmio(dev, Dir::Out, elapsed(since));
            reset_or_continue(vm)
        }
        VcpuExit::Hypercall(h) => match vmcall::decode(h.nr, &h.args) {
            Err(e) => {
                *h.ret = e.status() as u64;
                Next::Continue
            }
            Ok(gpa) => {
                let o = hypercall(vm, stats, vcpu, gpa);
                *h.ret = o.status as u64;
                Next::Apply(o.effects)
            }
        },
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Next::Continue,
        VcpuExit::Shutdown => Next::End(VcpuEnd::TripleFault),
        VcpuExit::FailEntry(reason, _) => Next::End(VcpuEnd::FailEntry(reason)),
        VcpuExit::InternalError => Next::InternalError,
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                Next::End(VcpuEnd::Reset)
            }
            _ => Next::End(VcpuEnd::Unhandled("system_event")),
        },
        other => Next::End(VcpuEnd::Unhandled(exit_name(&other))),
    };
    (name, next)
}

/// A port write: the doorbell rings a hypercall, anything else goes to the port bus.
fn port_write(
    vm: &dyn VmOps,
    vcpu: usize,
    stats: &mut VcpuStats,
    since: Instant,
    port: u16,
    data: &[u8],
) -> Next {
    let ring = port
        .checked_sub(DOORBELL_PORT)
        .and_then(|off| doorbell::ring(u64::from(off), data));
    if let Some(gpa) = ring {
        let o = hypercall(vm, stats, vcpu, gpa);
        stats.pio(port, Dir::Out, DOORBELL_NAME, elapsed(since));
        return Next::Apply(o.effects);
    }
    let dev = vm.pio_write(vcpu, port, data);
    stats.pio(port, Dir::Out, dev, elapsed(since));
    reset_or_continue(vm)
}

fn reset_or_continue(vm: &dyn VmOps) -> Next {
    if vm.take_reset() {
        Next::End(VcpuEnd::Reset)
    } else {
        Next::Continue
    }
}

/// Handles one hypercall (either transport) and records it in `stats`.
fn hypercall(vm: &dyn VmOps, stats: &mut VcpuStats, vcpu: usize, gpa: u64) -> Outcome {
    let t = Instant::now();
    let o = vm.hypercall(vcpu, gpa);
    let err =
        (o.status < 0).then(|| HcError::from_status(o.status).map_or("unknown", |e| e.name()));
    stats.hypercall(o.op, elapsed(t), err, o.entries);
    if let Some(p) = &o.phases {
        stats.mmu_phases(&p.named());
        stats.mmu_batch_size(p.pt_updates, p.update_ns());
    }
    log::debug!(
        "vCPU {vcpu}: {} at {gpa:#x}: status {} ({} entries) {:?}",
        o.op,
        o.status,
        o.entries.unwrap_or(0),
        o.effects
    );
    o
}

fn elapsed(since: Instant) -> u64 {
    since.elapsed().as_nanos() as u64
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::HypercallExit;
    use std::sync::Mutex;

    /// Records every call; answers hypercalls with a fixed outcome.
    #[derive(Default)]
    struct FakeVm {
        calls: Mutex<Vec<String>>,
        reset: std::sync::atomic::AtomicBool,
    }

    impl FakeVm {
        fn log(&self, s: String) {
            self.calls.lock().unwrap().push(s);
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl VmOps for FakeVm {
        fn pio_read(&self, _: usize, port: u16, data: &mut [u8]) -> &'static str {
            data.fill(0xab);
            self.log(format!("pio_read {port:#x}"));
            "fake"
        }
        fn pio_write(&self, _: usize, port: u16, data: &[u8]) -> &'static str {
            self.log(format!("pio_write {port:#x} {data:?}"));
            "fake"
        }
        fn mmio_read(&self, _: usize, addr: u64, data: &mut [u8]) -> &'static str {
            data.fill(0xcd);
            self.log(format!("mmio_read {addr:#x}"));
            "fake-mmio"
        }
        fn mmio_write(&self, _: usize, addr: u64, _: &[u8]) -> &'static str {
            self.log(format!("mmio_write {addr:#x}"));
            "fake-mmio"
        }
        fn hypercall(&self, vcpu: usize, gpa: u64) -> Outcome {
            self.log(format!("hypercall {vcpu} {gpa:#x}"));
            Outcome {
                op: "NULL",
                status: HcError::Eperm.status(),
                entries: None,
                phases: None,
                effects: Effects {
                    flush: true,
                    ..Effects::default()
                },
            }
        }
        fn take_reset(&self) -> bool {
            self.reset.swap(false, std::sync::atomic::Ordering::SeqCst)
        }
        fn pt_write(&self, _: usize, addr: u64, data: &[u8]) -> Option<Effects> {
            // Stores at 1 TiB and above stand for the RAM alias here.
            (addr >= 1 << 40).then(|| {
                self.log(format!("pt_write {addr:#x} {data:?}"));
                Effects {
                    flush: true,
                    ..Effects::default()
                }
            })
        }
    }

    #[test]
    fn trapped_page_table_stores_go_to_the_mmu_not_the_bus() {
        let vm = FakeVm::default();
        let (name, next, stats) = run(&vm, VcpuExit::MmioWrite((1 << 40) + 0x2008, &[7; 8]));
        assert_eq!((name, next), ("mmio", flush()));
        assert_eq!(
            vm.calls(),
            vec![format!(
                "pt_write {:#x} {:?}",
                (1u64 << 40) + 0x2008,
                [7u8; 8]
            )]
        );
        assert!(
            stats.mmio.contains_key(&(PT_TRAP_NAME, Dir::Out)),
            "{:?}",
            stats.mmio.keys()
        );
        // Any other MMIO write still reaches the device bus.
        let (_, next, _) = run(&vm, VcpuExit::MmioWrite(0xfee0_0000, &[1]));
        assert_eq!(next, Next::Continue);
        assert_eq!(
            vm.calls().last().map(String::as_str),
            Some("mmio_write 0xfee00000")
        );
    }

    fn run(vm: &FakeVm, exit: VcpuExit<'_>) -> (&'static str, Next, VcpuStats) {
        let mut stats = VcpuStats::default();
        let (name, next) = handle_exit(exit, vm, 1, &mut stats, Instant::now());
        (name, next, stats)
    }

    fn flush() -> Next {
        Next::Apply(Effects {
            flush: true,
            ..Effects::default()
        })
    }

    #[test]
    fn port_io_goes_to_the_bus_and_the_doorbell_rings_a_hypercall() {
        let vm = FakeVm::default();
        let (name, next, stats) = run(&vm, VcpuExit::IoOut(0x3f8, b"x"));
        assert_eq!((name, next), ("io", Next::Continue));
        assert_eq!(stats.pio[&(0x3f8, Dir::Out)].0, "fake");
        let mut buf = [0u8; 2];
        let (_, next, stats) = run(&vm, VcpuExit::IoIn(0x60, &mut buf));
        assert_eq!((next, buf), (Next::Continue, [0xab, 0xab]));
        assert_eq!(stats.pio[&(0x60, Dir::In)].0, "fake");
        let (_, next, stats) = run(&vm, VcpuExit::IoOut(DOORBELL_PORT, &[0, 0x10, 0, 0]));
        assert_eq!(next, flush());
        assert_eq!(stats.pio[&(DOORBELL_PORT, Dir::Out)].0, DOORBELL_NAME);
        assert_eq!(
            stats.hypercalls["NULL"].errors.get(HcError::Eperm.name()),
            Some(&1)
        );
        // A byte write to the doorbell, or a write to its status port, is plain port I/O.
        run(&vm, VcpuExit::IoOut(DOORBELL_PORT, &[1]));
        run(&vm, VcpuExit::IoOut(DOORBELL_PORT + 4, &[1, 2, 3, 4]));
        assert_eq!(
            vm.calls(),
            [
                "pio_write 0x3f8 [120]",
                "pio_read 0x60",
                "hypercall 1 0x1000",
                &format!("pio_write {DOORBELL_PORT:#x} [1]"),
                &format!("pio_write {:#x} [1, 2, 3, 4]", DOORBELL_PORT + 4),
            ]
        );
    }

    #[test]
    fn a_raised_reset_line_ends_the_vcpu_after_the_write() {
        let vm = FakeVm::default();
        vm.reset.store(true, std::sync::atomic::Ordering::SeqCst);
        let (_, next, _) = run(&vm, VcpuExit::IoOut(0x64, &[0xfe]));
        assert_eq!(next, Next::End(VcpuEnd::Reset));
        vm.reset.store(true, std::sync::atomic::Ordering::SeqCst);
        let (name, next, _) = run(&vm, VcpuExit::MmioWrite(0xd000_0000, &[1]));
        assert_eq!((name, next), ("mmio", Next::End(VcpuEnd::Reset)));
        let (_, next, _) = run(&vm, VcpuExit::MmioWrite(0xd000_0000, &[1]));
        assert_eq!(next, Next::Continue);
    }

    #[test]
    fn mmio_reads_reach_the_bus() {
        let vm = FakeVm::default();
        let mut buf = [0u8; 4];
        let (name, next, stats) = run(&vm, VcpuExit::MmioRead(0xfee0_0000, &mut buf));
        assert_eq!((name, next, buf), ("mmio", Next::Continue, [0xcd; 4]));
        assert!(stats.mmio.contains_key(&("fake-mmio", Dir::In)));
    }

    fn vmcall(vm: &FakeVm, nr: u64, args: [u64; 6]) -> (Next, i64) {
        let mut ret = 0u64;
        let exit = VcpuExit::Hypercall(HypercallExit {
            nr,
            args,
            ret: &mut ret,
            longmode: 1,
        });
        let (name, next, _) = run(vm, exit);
        assert_eq!(name, "hypercall");
        (next, ret as i64)
    }

    #[test]
    fn vmcall_is_decoded_and_answered_in_rax() {
        let vm = FakeVm::default();
        let nr = hypercall::VMCALL_NR;
        assert_eq!(
            vmcall(&vm, nr, [0x2000, 1, 0, 0, 0, 0]),
            (flush(), HcError::Eperm.status())
        );
        assert_eq!(
            vmcall(&vm, nr + 1, [0x2000, 1, 0, 0, 0, 0]),
            (Next::Continue, HcError::Enosys.status())
        );
        assert_eq!(
            vmcall(&vm, nr, [0x2000, 0, 0, 0, 0, 0]),
            (Next::Continue, HcError::Einval.status())
        );
        assert_eq!(
            vm.calls(),
            ["hypercall 1 0x2000"],
            "bad calls never dispatched"
        );
    }

    #[test]
    fn lifecycle_exits_end_or_continue() {
        let vm = FakeVm::default();
        assert_eq!(run(&vm, VcpuExit::Hlt).1, Next::Continue);
        assert_eq!(run(&vm, VcpuExit::Intr).1, Next::Continue);
        assert_eq!(run(&vm, VcpuExit::IrqWindowOpen).1, Next::Continue);
        assert_eq!(
            run(&vm, VcpuExit::Shutdown).1,
            Next::End(VcpuEnd::TripleFault)
        );
        assert_eq!(
            run(&vm, VcpuExit::FailEntry(0x21, 0)).1,
            Next::End(VcpuEnd::FailEntry(0x21))
        );
        assert_eq!(run(&vm, VcpuExit::InternalError).1, Next::InternalError);
        for kind in [
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN,
            kvm_bindings::KVM_SYSTEM_EVENT_RESET,
        ] {
            assert_eq!(
                run(&vm, VcpuExit::SystemEvent(kind, &[])).1,
                Next::End(VcpuEnd::Reset)
            );
        }
        assert_eq!(
            run(
                &vm,
                VcpuExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_CRASH, &[])
            )
            .1,
            Next::End(VcpuEnd::Unhandled("system_event"))
        );
        let (name, next, _) = run(&vm, VcpuExit::Debug(Default::default()));
        assert_eq!(
            (name, next),
            ("debug", Next::End(VcpuEnd::Unhandled("debug")))
        );
        assert!(vm.calls().is_empty());
    }
}
