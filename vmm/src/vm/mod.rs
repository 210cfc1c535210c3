//! A VM's life in three steps: [`build::build`] assembles it from the run arguments,
//! [`supervisor::supervise`] runs its vCPUs to the end, and [`report`] turns how it ended
//! into an exit code, a message and the statistics report.

pub mod build;
pub mod kernel_flush;
pub mod supervisor;

use crate::cli::RunArgs;
use crate::error::{exit_code, SetupError};
use crate::guest_ram::GuestRam;
use crate::hcall::transport::TransportChoice;
use crate::hcall::OpHandler;
use crate::layout::Layout;
use crate::pool_probe::ResyncChoice;
use crate::stats::report::{self, PoolResyncInfo, Report, VmInfo};
use crate::vcpu::VcpuEnd;
use std::time::Instant;
use supervisor::Ended;

/// How a run ended.
pub struct RunOutcome {
    /// Process exit code.
    pub exit_code: i32,
    /// One-line reason (empty for a clean guest exit).
    pub message: Option<String>,
    /// Register dumps collected.
    pub regs: Vec<String>,
    /// The statistics report.
    pub report: Report,
}

/// Builds the MMU_BATCH handler for a VM; `None` answers ENOSYS.
pub type MmuFactory = dyn Fn(&GuestRam, &Layout, usize) -> Option<Box<dyn OpHandler>>;

/// Extra port devices (base, length, device), e.g. a benchmark's phase marker.
pub type ExtraDevices = Vec<(u64, u64, crate::devices::bus::SharedDevice)>;

/// Creates, boots and runs a VM until it ends.
pub fn run(args: &RunArgs, mmu: &MmuFactory) -> Result<RunOutcome, SetupError> {
    run_with_devices(args, mmu, Vec::new())
}

/// As [`run`], with extra port devices on the bus.
pub fn run_with_devices(
    args: &RunArgs,
    mmu: &MmuFactory,
    extra: ExtraDevices,
) -> Result<RunOutcome, SetupError> {
    let started = Instant::now();
    let vm = build::build(args, mmu, extra)?;
    let transport = vm.transport;
    let dispatcher = vm.dispatcher.clone();
    let resync = vm.resync.clone();
    let running = vm_info(args, transport, &resync, "running", 0);
    let ended = supervisor::supervise(vm, args, started, running)?;
    Ok(finish(
        ended,
        args,
        started,
        (transport, &resync),
        dispatcher.mmu_report(),
    ))
}

/// Exit code, reason and message of a VM that ended this way.
fn end_of(ended: &Ended, args: &RunArgs) -> (i32, &'static str, Option<String>) {
    if let Some(sig) = ended.signal {
        return (
            exit_code::SIGNAL_BASE + sig,
            "signal",
            Some(crate::signals::describe(sig)),
        );
    }
    match (&ended.first_end, ended.timed_out) {
        (_, true) => (
            exit_code::TIMEOUT,
            "timeout",
            Some(format!(
                "guest did not finish within --timeout {}s",
                args.timeout.unwrap_or(0.0)
            )),
        ),
        (Some(e), false) => e.describe(),
        (None, false) => (
            exit_code::VMM_FAILURE,
            "vmm-failure",
            Some("all vCPU threads ended without a result".into()),
        ),
    }
}

/// The report's facts about the VM (wall time and guest status still to be filled in).
pub fn vm_info(
    args: &RunArgs,
    transport: TransportChoice,
    resync: &ResyncChoice,
    end_reason: &str,
    exit_code: i32,
) -> VmInfo {
    VmInfo {
        end_reason: end_reason.into(),
        exit_code,
        wall_ns: 0,
        vcpus: usize::from(args.vcpus),
        mem_bytes: args.mem,
        hypercall_transport: transport.transport.name().into(),
        transport_choice: transport.how.into(),
        transport_probe_ns: transport.probe_ns,
        transport_probe_cached: transport.cached,
        pool_resync: PoolResyncInfo {
            needed: resync.needed,
            choice: resync.how.into(),
            probe_ns: resync.probe_ns,
            probe_cached: resync.cached,
            remote_flush: resync.remote_flush.into(),
            kernel_flush: resync.kernel_flush.into(),
            leaf_zap: resync.leaf_zap,
        },
        guest_status: None,
    }
}

/// The run's outcome: exit code, message, register dumps and the statistics report.
fn finish(
    ended: Ended,
    args: &RunArgs,
    started: Instant,
    (transport, resync): (TransportChoice, &ResyncChoice),
    mmu: Option<serde_json::Value>,
) -> RunOutcome {
    let (code, reason, message) = end_of(&ended, args);
    let regs_and_stats = ended.results;
    let mut regs = Vec::new();
    let mut per_vcpu = Vec::new();
    for r in regs_and_stats.into_iter().flatten() {
        regs.extend(r.regs);
        per_vcpu.push(r.stats);
    }
    let mut info = vm_info(args, transport, resync, reason, code);
    info.wall_ns = started.elapsed().as_nanos() as u64;
    info.guest_status = match ended.first_end {
        Some(VcpuEnd::GuestExit(s)) if !ended.timed_out => Some(s),
        _ => None,
    };
    RunOutcome {
        exit_code: code,
        message,
        regs,
        report: report::build(info, &per_vcpu, mmu),
    }
}
