//! Does this host need the shadow-pool resync? A bounded start-up probe, cached per host.
//!
//! A throwaway VM reads one word through a page table that lives in its own memslot (like the
//! shadow pool), so KVM has derived a translation from it. The VMM then rewrites that table
//! entry from userspace to map another frame and flushes the way pvmm flushes without a
//! resync (a CR3 change through `KVM_SET_SREGS`), and the guest reads again. With
//! nested paging (EPT/NPT) the CPU walks the table itself and sees the new frame: no resync
//! is needed. A KVM that shadows guest page tables in software keeps its stale translation
//! (it never saw the write) and needs the memslot re-registered.
//!
//! There, a second probe asks whether a changed *leaf* can be forgotten more cheaply (the
//! leaf zap, docs/pv-abi.md §6.6): the VMM repoints a 4 KiB leaf and zaps the old target
//! frame's host mapping (`ram_zap`); if the guest then reads the new frame, KVM dropped its
//! translation to the old one, and changed leaves need no resync.

use crate::cli::{LeafZap, PoolResync};
use crate::cpu;
use crate::hcall::probe_cache;
use crate::hcall::RamZap;
use crate::ram_zap::PkeyRamZap;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// How the resync question was answered (for the report).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncChoice {
    /// Re-register the pool memslot when KVM must forget pool translations.
    pub needed: bool,
    /// "auto" (probed or cached) or "forced" (`--pool-resync always|never`).
    pub how: &'static str,
    /// The probe's time, ns (0 if forced or cached).
    pub probe_ns: u64,
    /// The verdict came from the per-host cache.
    pub cached: bool,
    /// How remote flushes are delivered: "kick" or "kernel" (`--remote-flush`, set when
    /// the VM is built).
    pub remote_flush: &'static str,
    /// What the kernel flush triggers KVM's flush with: "dirty_log" or "pkey" ("" for
    /// kicks; set when the VM is built).
    pub kernel_flush: &'static str,
    /// Changed leaves are zapped instead of resynced (`--leaf-zap`, set when the VM is
    /// built).
    pub leaf_zap: bool,
}

/// How long the probe may run before it counts as "resync needed" (it takes 1.5-7 ms on
/// the development machine, about 200 ms in the TCG-emulated SVM bed).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

const MEM: usize = 2 << 20;
const POOL: u64 = 0x40_0000;
const CODE: u64 = 0x1000;
const OLD: u64 = 0x5000;
const NEW: u64 = 0x6000;
/// The VA read through the pool tables: 512 GiB + OLD (sign-extended in the code).
const VA: u64 = (1 << 39) + OLD;
const ROOT: u64 = POOL;
const PDPT_A: u64 = POOL + 0x1000;
const PD_A: u64 = POOL + 0x2000;
const PDPT_B: u64 = POOL + 0x3000;
const PD_B: u64 = POOL + 0x4000;
const L1_B: u64 = POOL + 0x5000;
const PDPT_0: u64 = POOL + 0x6000;
const PD_0: u64 = POOL + 0x7000;
/// P | RW | US.
const URW: u64 = 7;
/// A 2 MiB leaf.
const PS: u64 = 0x80;
const PORT: u16 = 0x80;
/// The cached verdict's name (bump the version when the probe changes meaning).
const POOL_VERDICT: &str = "pool_resync_needed.v3";
/// The leaf-zap probe's cached verdict.
const LEAF_VERDICT: &str = "leaf_zap_works.v1";

/// What the probe changes between its two reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rewrite {
    /// A root entry, then a CR3 change: is the pool re-read without a resync?
    Table,
    /// A 4 KiB leaf, then a zap of its old target frame: is the translation dropped?
    LeafZap,
}

/// The verdict for `mode` on `kvm` (device node `device`, for the cache key).
pub fn choose(kvm: &Kvm, mode: PoolResync, device: &str) -> ResyncChoice {
    let forced = |needed| ResyncChoice {
        needed,
        how: "forced",
        probe_ns: 0,
        cached: false,
        remote_flush: "kick",
        kernel_flush: "",
        leaf_zap: false,
    };
    match mode {
        PoolResync::Always => return forced(true),
        PoolResync::Never => return forced(false),
        PoolResync::Auto => {}
    }
    let key = probe_cache::host_key(kvm.get_api_version(), device);
    if let Some(needed) = probe_cache::load_flag(&key, POOL_VERDICT) {
        return ResyncChoice {
            needed,
            how: "auto",
            probe_ns: 0,
            cached: true,
            remote_flush: "kick",
            kernel_flush: "",
            leaf_zap: false,
        };
    }
    let t = Instant::now();
    let needed = match probe(kvm) {
        Ok(visible) => !visible,
        Err(e) => {
            log::info!("pool resync probe failed ({e}); resyncing");
            true
        }
    };
    probe_cache::store_flag(&key, POOL_VERDICT, needed);
    ResyncChoice {
        needed,
        how: "auto",
        probe_ns: t.elapsed().as_nanos() as u64,
        cached: false,
        remote_flush: "kick",
        kernel_flush: "",
        leaf_zap: false,
    }
}

/// Whether changed leaves are zapped on this host (`mode`; only asked where the resync is
/// needed): the leaf-zap probe's verdict, cached per host.
pub fn leaf_zap_works(kvm: &Kvm, mode: LeafZap, device: &str) -> bool {
    if mode == LeafZap::Off {
        return false;
    }
    let key = probe_cache::host_key(kvm.get_api_version(), device);
    if let Some(works) = probe_cache::load_flag(&key, LEAF_VERDICT) {
        return works;
    }
    let works = match probe_kind(kvm, Rewrite::LeafZap) {
        Ok(seen) => seen,
        Err(e) => {
            log::info!("leaf zap probe failed ({e}); resyncing changed leaves");
            false
        }
    };
    probe_cache::store_flag(&key, LEAF_VERDICT, works);
    works
}

type BoxError = crate::error::BoxError;

fn region(
    slot: u32,
    gpa: u64,
    mem: &GuestMemoryMmap,
) -> Result<kvm_userspace_memory_region, BoxError> {
    let host = mem.get_host_address(GuestAddress(gpa))?;
    Ok(kvm_userspace_memory_region {
        slot,
        guest_phys_addr: gpa,
        memory_size: MEM as u64,
        userspace_addr: host as u64,
        flags: 0,
    })
}

/// Runs the probe VM: true if the rewritten pool entry was seen without re-registration.
pub fn probe(kvm: &Kvm) -> Result<bool, BoxError> {
    probe_kind(kvm, Rewrite::Table)
}

/// Runs the probe VM for `rewrite`: true if the guest read the new frame.
fn probe_kind(kvm: &Kvm, rewrite: Rewrite) -> Result<bool, BoxError> {
    let vm = kvm.create_vm()?;
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM), (GuestAddress(POOL), MEM)])?;
    for (slot, gpa) in [(0, 0), (1, POOL)] {
        let r = region(slot, gpa, &mem)?;
        // SAFETY: the region is backed by `mem`, which outlives the VM (dropped after it).
        unsafe { vm.set_user_memory_region(r) }?;
    }
    // The root itself lives in the pool memslot, as pvmm's shadow roots do: entry 0 maps
    // RAM's first 2 MiB (code), entry 1 (VA 512 GiB) -> PDPT_A -> PD_A, whose 2 MiB
    // leaf maps RAM from 0 (VA + OLD reads OLD). The VMM later repoints root entry 1 at
    // PDPT_B -> PD_B -> L1_B, whose entry for VA maps NEW. A software-shadowing KVM
    // write-protects the tables it shadows and never sees that userspace write.
    // Every entry is user-accessible: the probe reads from ring 3, where a software
    // hypervisor runs the guest natively on its own shadow of these tables (ring 0 code
    // may be emulated with fresh walks, which would see every write).
    let w = |gpa: u64, v: u64| mem.write_obj(v | URW, GuestAddress(gpa));
    w(ROOT, PDPT_0)?;
    w(PDPT_0, PD_0)?;
    w(PD_0, PS)?;
    // The leaf probe starts on the B tables (VA -> OLD through L1_B) and repoints the leaf.
    let (first_l3, first_leaf) = match rewrite {
        Rewrite::Table => (PDPT_A, NEW),
        Rewrite::LeafZap => (PDPT_B, OLD),
    };
    w(ROOT + 8, first_l3)?;
    w(PDPT_A, PD_A)?;
    w(PD_A, PS)?;
    w(PDPT_B, PD_B)?;
    w(PD_B, L1_B)?;
    w(L1_B + 8 * (OLD >> 12), first_leaf)?;
    mem.write_obj(0x1111_1111u32, GuestAddress(OLD))?;
    mem.write_obj(0x2222_2222u32, GuestAddress(NEW))?;
    // loop: mov rbx, VA; mov eax, [rbx]; out 0x80, eax; jmp loop
    let mut code = vec![0x48, 0xbb];
    code.extend_from_slice(&VA.to_le_bytes());
    code.extend_from_slice(&[0x8b, 0x03, 0xe7, PORT as u8, 0xeb, 0xf0]);
    mem.write_slice(&code, GuestAddress(CODE))?;
    let vcpu = vm.create_vcpu(0)?;
    cpu::setup_long_mode(&vcpu, CODE)?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cr3 = ROOT;
    for seg in [
        &mut sregs.cs,
        &mut sregs.ss,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        seg.dpl = 3;
        seg.selector |= 3;
    }
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    // IOPL 3: the ring-3 `out` reports the value.
    regs.rflags |= 3 << 12;
    vcpu.set_regs(&regs)?;
    // Before the thread: it inherits the key's rights.
    let zap = match rewrite {
        Rewrite::Table => None,
        Rewrite::LeafZap => Some(PkeyRamZap::new(&mem)?),
    };
    let (tx, rx) = mpsc::channel();
    let runner = std::thread::Builder::new()
        .name("pvmm-probe".into())
        .spawn(move || {
            let _ = tx.send(read_twice(vcpu, &mem, zap.as_ref()));
        })?;
    let r = rx.recv_timeout(PROBE_TIMEOUT);
    if r.is_err() {
        // The thread is stuck in KVM_RUN: kick it until it leaves (it then reports).
        while !runner.is_finished() {
            crate::kick::kick(&runner);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = runner.join();
    drop(vm);
    match r {
        Ok(Ok((0x1111_1111, v))) => Ok(v == 0x2222_2222),
        Ok(Ok((first, _))) => Err(format!("first read {first:#x}").into()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("timed out".into()),
    }
}

/// The word read before and after rewriting the pool entry (and flushing without a
/// resync); with `zap`, the leaf is rewritten and its old target zapped.
fn read_twice(
    mut vcpu: VcpuFd,
    mem: &GuestMemoryMmap,
    zap: Option<&PkeyRamZap>,
) -> Result<(u32, u32), BoxError> {
    let first = read_once(&mut vcpu)?;
    match zap {
        None => mem.write_obj(PDPT_B | URW, GuestAddress(ROOT + 8))?,
        Some(z) => {
            mem.write_obj(NEW | URW, GuestAddress(L1_B + 8 * (OLD >> 12)))?;
            z.zap(&[OLD >> 12])?;
        }
    }
    // The flush the VMM uses where no resync happens (vcpu::effects): a CR3 change.
    let mut s = vcpu.get_sregs()?;
    s.cr3 ^= crate::vcpu::CR3_FLUSH_TOGGLE;
    vcpu.set_sregs(&s)?;
    Ok((first, read_once(&mut vcpu)?))
}

fn read_once(vcpu: &mut VcpuFd) -> Result<u32, BoxError> {
    match vcpu.run()? {
        VcpuExit::IoOut(PORT, d) if d.len() == 4 => {
            Ok(u32::from_le_bytes([d[0], d[1], d[2], d[3]]))
        }
        other => Err(format!("unexpected exit {other:?}").into()),
    }
}
