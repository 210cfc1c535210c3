//! Building a VM from the run arguments, one step per function: KVM, memory and memslots,
//! the in-kernel irqchip and PIT, the kernel, the devices and buses, and the vCPUs. Nothing
//! runs here; [`super::supervisor`] starts the threads.

use super::{ExtraDevices, MmuFactory};
use crate::cli::RunArgs;
use crate::devices::i8042::{I8042CmdPort, I8042, I8042_CMD, I8042_DATA};
use crate::devices::post::{PostCode, POST_PORT};
use crate::devices::serial::{SerialDevice, SerialOut, COM1, COM1_IRQ};
use crate::devices::trigger::{FlagTrigger, IrqTrigger};
use crate::devices::Bus;
use crate::error::SetupError;
use crate::guest_ram::GuestRam;
use crate::hcall::doorbell::{Doorbell, DOORBELL_LEN};
use crate::hcall::transport::{self, TransportChoice};
use crate::hcall::Dispatcher;
use crate::kick::{self, ThreadKicker};
use crate::layout::Layout;
use crate::memory::{self, PoolSlot};
use crate::rendezvous::Rendezvous;
use crate::seccomp::Filters;
use crate::stats::kvm_stats::KvmStats;
use crate::stats::VcpuStats;
use crate::vcpu::{SnapshotLink, Vcpu};
use crate::vm_ops::VmBuses;
use crate::{boot, cpu, mptable};
use hypercall::{CpuidLeaves, Transport, DOORBELL_PORT};
use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, KVM_CAP_EXIT_HYPERCALL, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{mpsc, Arc, Mutex};
use vm_memory::GuestMemoryMmap;

/// The supervisor's end of the snapshot link: the epoch it bumps and the replies.
pub type SnapshotReplies = (Arc<AtomicU64>, mpsc::Receiver<(usize, VcpuStats)>);

/// A VM ready to run: its vCPUs (not yet started) and what the supervisor and the report
/// need.
pub struct BuiltVm {
    /// The vCPUs, in index order.
    pub vcpus: Vec<Vcpu>,
    /// The UART (the stdin thread feeds it).
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The hypercall dispatcher (its MMU counters go into the report).
    pub dispatcher: Arc<Dispatcher>,
    /// Set to end every vCPU.
    pub stop: Arc<AtomicBool>,
    /// Snapshot requests and replies, when `--stats-interval` is set.
    pub snapshots: Option<SnapshotReplies>,
    /// The hypercall transport and how it was chosen.
    pub transport: TransportChoice,
    /// Whether this host needs the pool resync, and how that was decided.
    pub resync: crate::pool_probe::ResyncChoice,
    /// Kept alive for as long as the vCPUs run.
    pub vm: Arc<VmFd>,
    /// Guest memory, kept alive for as long as the vCPUs run.
    pub mem: GuestMemoryMmap,
    /// The compiled per-thread seccomp filters (each thread installs its own).
    pub filters: Arc<Filters>,
}

/// The KVM device node: `$PVMM_KVM_DEVICE`, else `/dev/kvm`.
pub fn kvm_device() -> String {
    std::env::var("PVMM_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into())
}

/// Opens `/dev/kvm`, or the device named by `PVMM_KVM_DEVICE` (used by tests to simulate a
/// missing device).
pub fn open_kvm() -> Result<Kvm, SetupError> {
    let path = kvm_device();
    let c = std::ffi::CString::new(path.clone()).map_err(|_| {
        SetupError::NoKvm(
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
            path.clone(),
        )
    })?;
    Kvm::new_with_path(c.as_c_str())
        .map_err(|e| SetupError::NoKvm(std::io::Error::from_raw_os_error(e.errno()), path))
}

/// Builds everything `args` describes; `mmu` makes the MMU_BATCH handler, `extra` adds
/// port devices.
pub fn build(args: &RunArgs, mmu: &MmuFactory, extra: ExtraDevices) -> Result<BuiltVm, SetupError> {
    kick::install().map_err(|e| SetupError::other("installing the vCPU kick signal", e))?;
    let filters = Filters::compile(args.seccomp).map_err(|e| SetupError::other("seccomp", e))?;
    let filters = Arc::new(filters);
    let kvm = open_kvm()?;
    let layout = Layout::new(args.mem, args.shadow_pool)?;
    // Fail fast on unreadable files before doing anything expensive.
    std::fs::File::open(&args.kernel).map_err(|source| SetupError::KernelFile {
        path: args.kernel.clone(),
        source,
    })?;
    let out = SerialOut::open(&args.serial)?;
    let transport = transport::choose(&kvm, args.hypercall, &kvm_device())?;
    let mut resync = crate::pool_probe::choose(&kvm, args.pool_resync, &kvm_device());
    let mem = memory::allocate(&layout)?;
    memory::prefault_pool(&mem, &layout);
    let vm = create_vm(&kvm, transport.transport)?;
    let (pool_slot, free_slot) = memory::register(&vm, &mem)?;
    let pool_slot = pool_slot.map(Arc::new);
    log::debug!(
        "memory: RAM {:?}, shadow pool {:#x}+{:#x}",
        layout.ram_regions,
        layout.pool_base,
        layout.pool_size
    );
    let entry = load_kernel(args, &mem, &layout)?;
    let ram = GuestRam::new(mem.clone(), layout.usable().collect());
    let vcpus = usize::from(args.vcpus);
    let mut handler = mmu(&ram, &layout, vcpus);
    if let (Some(h), Some(p)) = (handler.as_mut(), pool_slot.as_ref()) {
        h.set_resync_granule(p.chunk_frames());
    }
    // Before any vCPU thread exists: they inherit the zap's protection-key rights.
    let dirty_log = enable_kernel_flush(args, &mut resync, &kvm, &vm, &mem, &layout, &mut handler)?;
    if let Some(h) = handler.as_mut().filter(|_| resync.needed) {
        resync.leaf_zap = enable_leaf_zap(&kvm, args.leaf_zap, &mem, h.as_mut());
    }
    if let (Some(h), Some(alias)) = (
        handler.as_mut(),
        crate::ptwrite::setup(&kvm, &vm, &mem, &layout, args.pt_trap, free_slot)?,
    ) {
        h.enable_pt_trap(alias);
    }
    let dispatcher = Arc::new(Dispatcher::new(ram.clone(), vcpus, handler));
    let (buses, serial) = build_buses(&vm, &mem, out, dispatcher.clone(), extra)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (link, snapshots) = snapshot_channel(args);
    let kicker = ThreadKicker::new(vcpus);
    let pool_resync = resync.needed;
    let shared = VcpuShared {
        sync: Arc::new(Rendezvous::new(vcpus, Box::new(kicker.clone()))),
        kicker,
        pool_resync,
        vm: Arc::new(buses),
        pool_slot,
        stop: stop.clone(),
        snapshots: link,
        dump_regs: args.verbose > 0,
        filters: filters.clone(),
        provoke_violation: args.debug_seccomp_violation,
    };
    let leaves = CpuidLeaves::new(dispatcher.features(), transport.transport, DOORBELL_PORT);
    let vcpus = create_vcpus(&kvm, &vm, vcpus, entry, &leaves, &shared)?;
    if let Some(d) = &dirty_log {
        let fds: Vec<&kvm_ioctls::VcpuFd> = vcpus.iter().map(|v| &v.fd).collect();
        super::kernel_flush::attach(d, &fds)?;
    }
    Ok(BuiltVm {
        vcpus,
        serial,
        dispatcher,
        stop,
        snapshots,
        transport,
        resync,
        vm,
        mem,
        filters,
    })
}

/// Gives the MMU handler the kernel flush (docs/pv-abi.md §6.5) that `args` and the host
/// allow, noting it in `resync`; returns the dirty-log trigger, which needs the vCPU fds
/// once they exist.
fn enable_kernel_flush(
    args: &RunArgs,
    resync: &mut crate::pool_probe::ResyncChoice,
    kvm: &Kvm,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    layout: &Layout,
    handler: &mut Option<Box<dyn crate::hcall::OpHandler>>,
) -> Result<Option<Arc<crate::dirty_flush::DirtyLogFlush>>, SetupError> {
    let Some(h) = handler.as_mut() else {
        return Ok(None);
    };
    let chosen = super::kernel_flush::choose(
        args.remote_flush,
        args.kernel_flush_trigger,
        resync.needed,
        kvm,
        vm,
        mem,
        layout,
    )?;
    let Some(k) = chosen else {
        return Ok(None);
    };
    resync.remote_flush = "kernel";
    resync.kernel_flush = k.zap.name();
    h.enable_kernel_flush(k.zap);
    Ok(k.dirty_log)
}

/// Turns on leaf zaps (docs/pv-abi.md §6.6) where `mode` and the host's probe allow;
/// returns whether they are on. Before any vCPU thread exists (the key's rights).
fn enable_leaf_zap(
    kvm: &Kvm,
    mode: crate::cli::LeafZap,
    mem: &GuestMemoryMmap,
    handler: &mut dyn crate::hcall::OpHandler,
) -> bool {
    if !crate::pool_probe::leaf_zap_works(kvm, mode, &kvm_device()) {
        return false;
    }
    match crate::ram_zap::PkeyRamZap::new(mem) {
        Ok(z) => {
            handler.enable_leaf_zap(Box::new(z));
            true
        }
        Err(e) => {
            log::info!("no leaf zaps (protection keys: {e}); resyncing changed leaves");
            false
        }
    }
}

/// The VM with its irqchip, PIT and, for the vmcall transport, hypercall exits enabled.
fn create_vm(kvm: &Kvm, transport: Transport) -> Result<Arc<VmFd>, SetupError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| SetupError::kvm("KVM_CREATE_VM", e))?;
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
    Ok(Arc::new(vm))
}

/// Loads the kernel, initrd and command line, the boot page tables and the MP table;
/// returns the entry.
fn load_kernel(args: &RunArgs, mem: &GuestMemoryMmap, layout: &Layout) -> Result<u64, SetupError> {
    let loaded = boot::load(
        mem,
        layout,
        &args.kernel,
        args.initrd.as_deref(),
        &args.cmdline,
    )?;
    cpu::write_boot_tables(mem)?;
    mptable::write(mem, args.vcpus).map_err(|e| SetupError::other("writing the MP table", e))?;
    log::info!(
        "loaded {:?} kernel, entry {:#x}, end {:#x}",
        loaded.format,
        loaded.entry,
        loaded.end
    );
    Ok(loaded.entry)
}

/// The port and MMIO buses with every device on them.
fn build_buses(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    out: SerialOut,
    dispatcher: Arc<Dispatcher>,
    extra: ExtraDevices,
) -> Result<(VmBuses, Arc<Mutex<SerialDevice>>), SetupError> {
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| SetupError::other("eventfd", e))?;
    vm.register_irqfd(&irq, COM1_IRQ)
        .map_err(|e| SetupError::kvm("KVM_IRQFD", e))?;
    let serial = Arc::new(Mutex::new(SerialDevice {
        uart: vm_superio::Serial::new(IrqTrigger(irq), out),
        write_failed: false,
    }));
    let reset = FlagTrigger::default();
    let i8042 = Arc::new(Mutex::new(I8042::new(reset.clone())));
    let doorbell = Doorbell::new(dispatcher.last_status());
    let mut pio = Bus::new();
    let ins = |e| SetupError::other("device bus", e);
    pio.insert(COM1, 8, serial.clone()).map_err(ins)?;
    pio.insert(I8042_DATA, 1, i8042.clone()).map_err(ins)?;
    pio.insert(I8042_CMD, 1, Arc::new(Mutex::new(I8042CmdPort(i8042))))
        .map_err(ins)?;
    pio.insert(POST_PORT, 1, Arc::new(Mutex::new(PostCode::default())))
        .map_err(ins)?;
    pio.insert(
        u64::from(DOORBELL_PORT),
        DOORBELL_LEN,
        Arc::new(Mutex::new(doorbell)),
    )
    .map_err(ins)?;
    for (base, len, dev) in extra {
        pio.insert(base, len, dev).map_err(ins)?;
    }
    let buses = VmBuses {
        pio,
        mmio: Bus::new(),
        hcalls: dispatcher,
        reset,
        mem: mem.clone(),
    };
    Ok((buses, serial))
}

/// The snapshot link each vCPU gets and the supervisor's end of it (`--stats-interval`).
fn snapshot_channel(args: &RunArgs) -> (Option<SnapshotLink>, Option<SnapshotReplies>) {
    if args.stats_interval.is_none() {
        return (None, None);
    }
    let (tx, rx) = mpsc::channel();
    let epoch = Arc::new(AtomicU64::new(0));
    (Some((epoch.clone(), tx)), Some((epoch, rx)))
}

/// What every vCPU shares.
struct VcpuShared {
    vm: Arc<VmBuses>,
    pool_slot: Option<Arc<PoolSlot>>,
    stop: Arc<AtomicBool>,
    snapshots: Option<SnapshotLink>,
    dump_regs: bool,
    filters: Arc<Filters>,
    provoke_violation: bool,
    sync: Arc<Rendezvous>,
    kicker: ThreadKicker,
    pool_resync: bool,
}

/// Creates `count` vCPUs with CPUID, MSRs and (vCPU 0) long mode at `entry`.
fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    count: usize,
    entry: u64,
    leaves: &CpuidLeaves,
    shared: &VcpuShared,
) -> Result<Vec<Vcpu>, SetupError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| SetupError::kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    let mut built = Vec::with_capacity(count);
    for i in 0..count {
        let fd = vm
            .create_vcpu(i as u64)
            .map_err(|e| SetupError::kvm("KVM_CREATE_VCPU", e))?;
        fd.set_cpuid2(&cpu::cpuid_for(&supported, i as u8, leaves)?)
            .map_err(|e| SetupError::kvm("KVM_SET_CPUID2", e))?;
        cpu::setup_msrs(&fd)?;
        cpu::setup_lapic(&fd)?;
        if i == 0 {
            cpu::setup_long_mode(&fd, entry)?;
        }
        let kvm_stats = KvmStats::open(&fd)
            .map_err(|e| log::info!("no KVM stats: {e}"))
            .ok();
        let mut stats = VcpuStats::default();
        if let Some(Ok(v)) = kvm_stats.as_ref().map(KvmStats::read) {
            stats.kvm_start = v.into_iter().map(|(n, _, x)| (n, x)).collect();
        }
        built.push(Vcpu {
            index: i,
            fd,
            vm: shared.vm.clone(),
            pool_slot: shared.pool_slot.clone(),
            stop: shared.stop.clone(),
            stats,
            kvm_stats,
            dump_regs: shared.dump_regs,
            snapshots: shared.snapshots.clone(),
            seen_epoch: 0,
            filters: shared.filters.clone(),
            provoke_violation: shared.provoke_violation && i == 0,
            sync: shared.sync.clone(),
            kicker: shared.kicker.clone(),
            pool_resync: shared.pool_resync,
            delivery_error: None,
        });
    }
    Ok(built)
}
