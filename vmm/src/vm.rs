//! Builds a VM from the run arguments, runs its vCPUs and produces the exit statistics.

use crate::cli::{HypercallMode, RunArgs, SerialMode};
use crate::devices::i8042::{I8042CmdPort, I8042, I8042_CMD, I8042_DATA};
use crate::devices::post::{PostCode, POST_PORT};
use crate::devices::serial::{SerialDevice, SerialOut, COM1, COM1_IRQ};
use crate::devices::trigger::IrqTrigger;
use crate::devices::Bus;
use crate::error::{exit_code, SetupError};
use crate::guest_ram::GuestRam;
use crate::hcall::doorbell::{Doorbell, DOORBELL_LEN};
use crate::hcall::ops::OpHandler;
use crate::hcall::{probe, Dispatcher};
use crate::layout::Layout;
use crate::stats::interval::IntervalWriter;
use crate::stats::kvm_stats::KvmStats;
use crate::stats::report::{self, Report, VmInfo};
use crate::stats::VcpuStats;
use crate::vcpu::{Vcpu, VcpuEnd, VcpuResult};
use crate::{boot, console, cpu, kick};
use hypercall::{CpuidLeaves, Transport, DOORBELL_PORT};
use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, KVM_CAP_EXIT_HYPERCALL,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

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

/// Chooses the hypercall transport; returns it, how it was chosen, and the probe time.
pub fn choose_transport(kvm: &Kvm, mode: HypercallMode) -> (Transport, &'static str, u64) {
    match mode {
        HypercallMode::Pio => (Transport::Pio, "forced", 0),
        HypercallMode::Vmcall => (Transport::Vmcall, "forced", 0),
        HypercallMode::Auto => match probe::probe(kvm) {
            Ok(r) => {
                let t = if r.vmcall_exits {
                    Transport::Vmcall
                } else {
                    Transport::Pio
                };
                log::info!(
                    "hypercall probe: vmcall {} ({:?}); using {}",
                    if r.vmcall_exits {
                        "exits"
                    } else {
                        "does not exit"
                    },
                    r.elapsed,
                    t.name()
                );
                (t, "auto", r.elapsed.as_nanos() as u64)
            }
            Err(e) => {
                log::warn!("hypercall probe failed ({e}); using pio");
                (Transport::Pio, "auto", 0)
            }
        },
    }
}

/// The shadow pool's memslot. Re-registering it makes KVM drop every translation it cached
/// from pool page tables: on hosts that shadow guest page tables in software, writes the VMM
/// makes to the pool from userspace are otherwise invisible to KVM.
pub struct PoolSlot {
    vm: Arc<VmFd>,
    region: kvm_userspace_memory_region,
}

impl PoolSlot {
    /// Deletes and re-adds the pool memslot.
    pub fn resync(&self) -> Result<(), String> {
        let gone = kvm_userspace_memory_region {
            memory_size: 0,
            ..self.region
        };
        // SAFETY: same slot and backing as registered at setup; the mapping outlives the VM.
        unsafe { self.vm.set_user_memory_region(gone) }
            .map_err(|e| format!("deleting pool memslot: {e}"))?;
        // SAFETY: as above.
        unsafe { self.vm.set_user_memory_region(self.region) }
            .map_err(|e| format!("re-adding pool memslot: {e}"))
    }
}

/// Registers every region; returns the last one (the shadow pool).
fn register_memory(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
) -> Result<Option<kvm_userspace_memory_region>, SetupError> {
    let mut last = None;
    let phys = mem
        .physical_memory()
        .ok_or_else(|| SetupError::kvm("guest memory", "no physical memory"))?;
    for (slot, r) in phys.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the mapping belongs to `mem`, which lives as long as the VM.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| SetupError::kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        last = Some(region);
    }
    Ok(last)
}

fn serial_out(mode: &SerialMode) -> Result<SerialOut, SetupError> {
    Ok(match mode {
        SerialMode::Stdio => SerialOut::Stdout(std::io::stdout()),
        SerialMode::None => SerialOut::Sink,
        SerialMode::File(p) => SerialOut::File(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| SetupError::OutputFile {
                    path: p.clone(),
                    source,
                })?,
        ),
    })
}

/// Opens `/dev/kvm`, or the device named by `PVMM_KVM_DEVICE` (used by tests to simulate a
/// missing device).
pub fn open_kvm() -> Result<Kvm, SetupError> {
    let path = std::env::var("PVMM_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into());
    let c = std::ffi::CString::new(path.clone()).map_err(|_| {
        SetupError::NoKvm(
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
            path.clone(),
        )
    })?;
    Kvm::new_with_path(c.as_c_str())
        .map_err(|e| SetupError::NoKvm(std::io::Error::from_raw_os_error(e.errno()), path))
}

/// Creates, boots and runs a VM until it ends.
pub fn run(args: &RunArgs, mmu: &MmuFactory) -> Result<RunOutcome, SetupError> {
    run_with_devices(args, mmu, Vec::new())
}

/// Extra port devices (base, length, device), e.g. a benchmark's phase marker.
pub type ExtraDevices = Vec<(u64, u64, crate::devices::bus::SharedDevice)>;

/// As [`run`], with extra port devices on the bus.
pub fn run_with_devices(
    args: &RunArgs,
    mmu: &MmuFactory,
    extra: ExtraDevices,
) -> Result<RunOutcome, SetupError> {
    let started = Instant::now();
    kick::install().map_err(SetupError::Kvm)?;
    let kvm = open_kvm()?;
    let layout = Layout::new(args.mem, args.shadow_pool)?;
    // Fail fast on unreadable files before doing anything expensive.
    std::fs::File::open(&args.kernel).map_err(|source| SetupError::KernelFile {
        path: args.kernel.clone(),
        source,
    })?;
    let out = serial_out(&args.serial)?;
    let (transport, choice, probe_ns) = choose_transport(&kvm, args.hypercall);

    let mut ranges: Vec<(GuestAddress, usize)> = layout
        .ram_regions
        .iter()
        .map(|&(s, l)| (GuestAddress(s), l as usize))
        .collect();
    ranges.push((GuestAddress(layout.pool_base), layout.pool_size as usize));
    let mem = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|e| SetupError::kvm("allocating guest memory", e))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| SetupError::kvm("KVM_CREATE_VM", e))?;
    let vm = Arc::new(vm);
    let pool_region = register_memory(&vm, &mem)?;
    let pool_slot = pool_region.map(|region| {
        Arc::new(PoolSlot {
            vm: vm.clone(),
            region,
        })
    });
    vm.set_tss_address(0xfffb_d000)
        .map_err(|e| SetupError::kvm("KVM_SET_TSS_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| SetupError::kvm("KVM_CREATE_IRQCHIP", e))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(|e| SetupError::kvm("KVM_CREATE_PIT2", e))?;
    if transport == Transport::Vmcall {
        let cap = kvm_enable_cap {
            cap: KVM_CAP_EXIT_HYPERCALL,
            args: [1 << hypercall::VMCALL_NR, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(|e| SetupError::kvm("enabling KVM_CAP_EXIT_HYPERCALL", e))?;
    }

    let loaded = boot::load(
        &mem,
        &layout,
        &args.kernel,
        args.initrd.as_deref(),
        &args.cmdline,
    )?;
    cpu::write_boot_tables(&mem)?;
    log::info!(
        "loaded {:?} kernel, entry {:#x}, end {:#x}",
        loaded.format,
        loaded.entry,
        loaded.end
    );

    // Devices.
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| SetupError::kvm("eventfd", e))?;
    vm.register_irqfd(&irq, COM1_IRQ)
        .map_err(|e| SetupError::kvm("KVM_IRQFD", e))?;
    let serial = Arc::new(Mutex::new(SerialDevice {
        uart: vm_superio::Serial::new(IrqTrigger(irq), out),
        write_failed: false,
    }));
    let i8042 = Arc::new(Mutex::new(I8042::new()));
    let ram = GuestRam::new(mem.clone(), layout.usable().collect());
    let vcpus = usize::from(args.vcpus);
    let dispatcher = Arc::new(Dispatcher::new(
        ram.clone(),
        vcpus,
        mmu(&ram, &layout, vcpus),
    ));
    let mut pio = Bus::new();
    let ins = |e: crate::devices::bus::BusError| SetupError::kvm("device bus", e);
    pio.insert(COM1, 8, serial.clone()).map_err(ins)?;
    pio.insert(I8042_DATA, 1, i8042.clone()).map_err(ins)?;
    pio.insert(I8042_CMD, 1, Arc::new(Mutex::new(I8042CmdPort(i8042))))
        .map_err(ins)?;
    pio.insert(POST_PORT, 1, Arc::new(Mutex::new(PostCode::default())))
        .map_err(ins)?;
    pio.insert(
        u64::from(DOORBELL_PORT),
        DOORBELL_LEN,
        Arc::new(Mutex::new(Doorbell::new(dispatcher.last_status()))),
    )
    .map_err(ins)?;
    for (base, len, dev) in extra {
        pio.insert(base, len, dev).map_err(ins)?;
    }
    let pio = Arc::new(pio);
    let mmio = Arc::new(Bus::new());

    // vCPUs.
    let leaves = CpuidLeaves::new(dispatcher.features(), transport, DOORBELL_PORT);
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| SetupError::kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (snap_tx, snap_rx) = mpsc::channel::<(usize, VcpuStats)>();
    let snap_epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut built = Vec::with_capacity(vcpus);
    for i in 0..vcpus {
        let fd = vm
            .create_vcpu(i as u64)
            .map_err(|e| SetupError::kvm("KVM_CREATE_VCPU", e))?;
        fd.set_cpuid2(&cpu::cpuid_for(&supported, i as u8, &leaves)?)
            .map_err(|e| SetupError::kvm("KVM_SET_CPUID2", e))?;
        cpu::setup_msrs(&fd)?;
        if i == 0 {
            cpu::setup_long_mode(&fd, loaded.entry)?;
        }
        let kvm_stats = KvmStats::open(&fd)
            .map_err(|e| log::info!("no KVM stats: {e}"))
            .ok();
        let mut stats = VcpuStats::default();
        if let Some(k) = &kvm_stats {
            if let Ok(v) = k.read() {
                stats.kvm_start = v.into_iter().map(|(n, _, x)| (n, x)).collect();
            }
        }
        built.push(Vcpu {
            index: i,
            fd,
            pio: pio.clone(),
            mmio: mmio.clone(),
            hcalls: dispatcher.clone(),
            pool_slot: pool_slot.clone(),
            stop: stop.clone(),
            stats,
            kvm_stats,
            dump_regs: args.verbose > 0,
            snapshots: args
                .stats_interval
                .map(|_| (snap_epoch.clone(), snap_tx.clone())),
            seen_epoch: 0,
        });
    }

    // Stdin reaches the guest only when it is a terminal (in raw mode) or a FIFO.
    let interactive = args.serial == SerialMode::Stdio && console::stdin_is_interactive();
    let raw = interactive.then(RawModeGuard::enter).flatten();
    let stdin_thread = interactive
        .then(|| console::spawn_stdin(serial.clone(), stop.clone()).ok())
        .flatten();

    let (tx, rx) = mpsc::channel::<(usize, VcpuResult)>();
    let mut interval_out = match args.stats_interval {
        None => None,
        Some(_) => Some(IntervalWriter::new(interval_sink(args)?)),
    };
    let mut threads = Vec::new();
    for v in built {
        let tx = tx.clone();
        let idx = v.index;
        let t = std::thread::Builder::new()
            .name(format!("pvmm-vcpu{idx}"))
            .spawn(move || {
                let r = v.run();
                let _ = tx.send((idx, r));
            })
            .map_err(|e| SetupError::kvm("spawning vCPU thread", e))?;
        threads.push(t);
    }
    drop(tx);

    let deadline = args
        .timeout
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let interval = args.stats_interval.map(Duration::from_secs_f64);
    let mut next_tick = interval.map(|i| Instant::now() + i);
    let mut last_snap: Vec<VcpuStats> = vec![VcpuStats::default(); vcpus];
    let mut results: Vec<Option<VcpuResult>> = (0..vcpus).map(|_| None).collect();
    let mut first_end: Option<VcpuEnd> = None;
    let mut timed_out = false;
    let mut received = 0;
    while received < vcpus {
        let ending = first_end.is_some() || timed_out;
        let wake = if ending {
            Some(Instant::now() + Duration::from_millis(10))
        } else {
            [deadline, next_tick].into_iter().flatten().min()
        };
        let msg = match wake {
            Some(w) => match rx.recv_timeout(w.saturating_duration_since(Instant::now())) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            },
            None => match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => break,
            },
        };
        let now = Instant::now();
        if msg.is_none() && !ending {
            if deadline.is_some_and(|d| now >= d) {
                timed_out = true;
            } else if let (Some(t), Some(i), Some(w)) = (next_tick, interval, interval_out.as_mut())
            {
                if now >= t {
                    // Ask every running vCPU for a snapshot, kick them out of KVM_RUN, collect.
                    snap_epoch.fetch_add(1, Ordering::AcqRel);
                    for t in &threads {
                        kick::kick(t);
                    }
                    for _ in received..vcpus {
                        match snap_rx.recv_timeout(Duration::from_millis(200)) {
                            Ok((idx, s)) => {
                                if let Some(slot) = last_snap.get_mut(idx) {
                                    *slot = s;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = w.write(
                        started.elapsed().as_nanos() as u64,
                        &last_snap,
                        dispatcher.mmu_report(),
                    ) {
                        log::warn!("writing interval statistics: {e}");
                    }
                    next_tick = Some(t + i);
                }
            }
        }
        if let Some((i, r)) = msg {
            if first_end.is_none() && r.end != VcpuEnd::Stopped && !timed_out {
                first_end = Some(r.end.clone());
            }
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(r);
            }
            received += 1;
        }
        if first_end.is_some() || timed_out {
            stop.store(true, Ordering::Release);
            for t in &threads {
                kick::kick(t);
            }
        }
    }
    stop.store(true, Ordering::Release);
    for t in threads {
        let _ = t.join();
    }
    if let Some(t) = stdin_thread {
        let _ = t.join();
    }
    drop(raw);

    let (code, reason, message) = match (&first_end, timed_out) {
        (_, true) => (
            exit_code::TIMEOUT,
            "timeout",
            Some(format!(
                "guest did not finish within --timeout {}s",
                args.timeout.unwrap_or(0.0)
            )),
        ),
        (Some(e), false) => describe(e),
        (None, false) => (
            exit_code::VMM_FAILURE,
            "vmm-failure",
            Some("all vCPU threads ended without a result".into()),
        ),
    };
    let mut regs = Vec::new();
    let mut per_vcpu = Vec::new();
    for r in results.into_iter().flatten() {
        if let Some(d) = r.regs {
            regs.push(d);
        }
        per_vcpu.push(r.stats);
    }
    let info = VmInfo {
        end_reason: reason.into(),
        exit_code: code,
        wall_ns: started.elapsed().as_nanos() as u64,
        vcpus,
        mem_bytes: args.mem,
        hypercall_transport: transport.name().into(),
        transport_choice: choice.into(),
        transport_probe_ns: probe_ns,
    };
    let mmu_json = dispatcher.mmu_report();
    Ok(RunOutcome {
        exit_code: code,
        message,
        regs,
        report: report::build(info, &per_vcpu, mmu_json),
    })
}

use console::RawModeGuard;

/// Where interval lines go: the stats file (created anew) or stderr.
fn interval_sink(args: &RunArgs) -> Result<Box<dyn std::io::Write + Send>, SetupError> {
    Ok(match &args.stats_file {
        Some(p) => Box::new(
            std::fs::File::create(p).map_err(|source| SetupError::OutputFile {
                path: p.clone(),
                source,
            })?,
        ),
        None => Box::new(std::io::stderr()),
    })
}

/// Maps how the first vCPU ended to (exit code, reason name, one-line message).
pub fn describe(e: &VcpuEnd) -> (i32, &'static str, Option<String>) {
    match e {
        VcpuEnd::GuestExit(c) => (i32::from(*c), "guest-exit", None),
        VcpuEnd::Reset => (0, "reset", None),
        VcpuEnd::TripleFault => (
            exit_code::TRIPLE_FAULT,
            "triple-fault",
            Some("guest triple-faulted (KVM_EXIT_SHUTDOWN)".into()),
        ),
        VcpuEnd::FailEntry(r) => (
            exit_code::FAIL_ENTRY,
            "fail-entry",
            Some(format!(
                "KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, reason {r:#x})"
            )),
        ),
        VcpuEnd::InternalError(s) => (
            exit_code::INTERNAL_ERROR,
            "internal-error",
            Some(format!(
                "KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {s})"
            )),
        ),
        VcpuEnd::Unhandled(n) => (
            exit_code::UNHANDLED_EXIT,
            "unhandled-exit",
            Some(format!("unhandled vCPU exit: {n}")),
        ),
        VcpuEnd::Stopped => (exit_code::VMM_FAILURE, "stopped", Some("VM stopped".into())),
        VcpuEnd::VmmFailure(m) => (exit_code::VMM_FAILURE, "vmm-failure", Some(m.clone())),
    }
}
