//! Model-based property test with TLBs: several vCPUs run a simulated CPU over the shadows
//! the engine builds, while batches of valid and hostile MMU entries change the guest's
//! page tables.
//!
//! The simulated CPU has one TLB per vCPU. An access walks the shadow from the vCPU's CR3
//! like hardware: it sets A in every entry it uses (upper levels too) and D in the leaf on
//! a write, and caches the translation (rights ANDed over the walk, NX ORed, the leaf's G).
//! A write hitting a cached entry whose D was not yet set walks again to set D; a hit
//! with D set touches no memory, as on hardware. A CR3 load (`new_cr3`) drops the non-global
//! entries of that vCPU, a flush outcome (`end_batch` for the caller, `take_flush` for every
//! other vCPU) drops all of them.
//!
//! The guest side is read from guest memory itself, so hostile entries that the engine
//! accepts are followed exactly. The model tracks, for every leaf slot of every typed L1/L2
//! table, the A/D the CPU owes the guest (`must`: an access or write happened through a
//! translation made from that slot since the guest last cleared the bit) and the A/D the
//! guest may see (`may`: CPU accesses plus bits the guest wrote itself). This is the write
//! history: every write the CPU made is attributed to the frame it wrote and to the guest PTE
//! it went through, and it must show up as D in that PTE (after a sync, in a `QUERY_AD`
//! bitmap, in the value a `PT_UPDATE_PRESERVE_AD` or a same-frame update writes, and in the
//! PTE left behind when the table is unpinned, torn down, relocated or reclaimed), unless the
//! guest overwrote the PTE with a plain update (documented discard). Checks, after every
//! batch: no cached translation maps another frame than the guest's current tables, grants
//! RW/US the guest does not, lacks an NX the guest has, is writable onto a page table, or maps
//! the pool or non-RAM; the engine's types equal the closure of the guest's pins; and the
//! engine's own invariant checker passes. A dirty bit that is lost or invented fails at the
//! op that shows it.
//!
//! Model restriction (a bare-metal guest obligation, not an engine rule): global leaves only
//! live in the kernel half, which every address space shares, so a G translation that
//! survives a CR3 load is still the guest's translation in the new address space.
#![allow(clippy::single_range_in_vec_init)]

use std::collections::{BTreeMap, HashMap};

use hypercall::{FlushTarget, HcError, MmuOp};
use proptest::prelude::*;
use shadow::pte::{A, AD, ADDR, ADDR_2M, D, G, NX, P, PS, RW, US};
use shadow::{Layout, ShadowMmu, VcpuSet};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const RAM_END: u64 = 0x80_0000;
const POOL: u64 = 0x100_0000;
/// Pool frames per host-resync chunk (small, so resyncs are partial and mistargeting shows).
const RESYNC_GRANULE: u32 = 2;
const RESERVED: u64 = 0x9f;
/// Kernel half: L4 index 256, shared by every address space.
const KVA: u64 = 0xffff_8000_0000_0000;
/// Non-leaf entry flags.
const T: u64 = P | RW | US | A | D;
/// Initial frames: kernel L3, L2, L1.
const KERN: [u64; 3] = [0x20, 0x21, 0x22];
/// Address spaces: L4, L3 and L2 of root r are `0x30 + 4r ..`.
const ROOTS: usize = 3;
/// User L1 tables (linked, unlinked, pinned, relocated); [3] is shared by every root.
const L1S: [u64; 6] = [0x50, 0x51, 0x52, 0x53, 0x54, 0x55];
/// Relocation targets; two lie inside the user 2 MiB leaf (frames 0x200..0x400).
const SPARES: [u64; 5] = [0x3f0, 0x3f1, 0x60, 0x61, 0x62];
/// QUERY_AD bitmaps.
const BITMAP: u64 = 0x70_000;
/// Leaf targets: data, page tables, spares in the 2 MiB range, and illegal frames.
const TARGETS: [u64; 11] = [
    0x100, 0x101, 0x102, 0x103, 0x50, 0x53, 0x31, 0x22, 0x3f0, RESERVED, 0x1000,
];
const SLOTS: usize = 8;
/// 2 MiB leaf bases (user, kernel).
const BIG: [u64; 2] = [0x20_0000, 0x40_0000];
/// L2 entries of the modelled regions: user L1, L1, 2 MiB; kernel L1, 2 MiB.
const USER_L2: u64 = 3;
const KERN_L2: u64 = 2;

#[derive(Clone, Copy, Debug)]
enum Role {
    L4(usize),
    L3(usize),
    L2(usize),
    L1(usize),
    Kern(usize),
    Spare(usize),
    Frame(u64),
}

#[derive(Clone, Debug)]
enum Op {
    Leaf {
        kern: bool,
        root: usize,
        l2i: usize,
        idx: usize,
        target: usize,
        flags: u64,
        preserve: bool,
    },
    Big {
        kern: bool,
        root: usize,
        on: bool,
        rw: bool,
        preserve: bool,
    },
    Link {
        root: usize,
        l2i: usize,
        l1: Option<usize>,
        accessed: bool,
    },
    PinL1(usize),
    UnpinL1(usize),
    Zero(usize),
    Relocate(Role, usize),
    Baseptr(usize),
    /// `UNPIN` of a root; with `DETACH` (true) every vCPU that has it loaded moves to its
    /// kernel root.
    Teardown(usize, bool),
    /// `SET_KERNEL_ROOT` of a root (None: clear).
    KernelRoot(Option<usize>),
    Rebuild(usize),
    Sync {
        kern: bool,
        clear_a: bool,
        clear_d: bool,
    },
    Query(bool),
    /// A guest flush: full or one page, target (0..4: local, root, mask, all), mask.
    Flush(bool, u16, u64),
    Hostile {
        table: Role,
        idx: usize,
        val: u64,
        preserve: bool,
    },
    Raw {
        kind: u8,
        a: Role,
        b: Role,
        level: u8,
    },
}

#[derive(Clone, Debug)]
struct Access {
    vcpu: usize,
    va: usize,
    write: bool,
    user: bool,
}

#[derive(Clone, Debug)]
struct Step {
    vcpu: usize,
    ops: Vec<Op>,
    accesses: Vec<Access>,
}

/// The VAs the CPU touches: user L1 slots, user 2 MiB pages, kernel L1 slots, kernel 2 MiB.
fn va_of(sel: usize) -> u64 {
    const BIG_OFF: [u64; 4] = [0, 0x3_1000, 0x1f_0000, 0x1f_1000];
    match sel {
        0..16 => ((sel / SLOTS) as u64) << 21 | ((sel % SLOTS) as u64) << 12,
        16..20 => (2 << 21) + BIG_OFF[sel - 16],
        20..28 => KVA | ((sel - 20) as u64) << 12,
        _ => KVA + (1 << 21) + BIG_OFF[(sel - 28) % 4],
    }
}
const VAS: usize = 32;

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        (0..ROOTS).prop_map(Role::L4),
        (0..ROOTS).prop_map(Role::L3),
        (0..ROOTS).prop_map(Role::L2),
        (0..L1S.len()).prop_map(Role::L1),
        (0..3usize).prop_map(Role::Kern),
        (0..SPARES.len()).prop_map(Role::Spare),
        prop::sample::select(vec![0x100u64, 0x3f2, 0x9f, 0x1000, 0x900, 0x7ff])
            .prop_map(Role::Frame),
    ]
}

fn hostile_val() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (
            prop::sample::select(vec![
                0x100u64, 0x3f0, 0x50, 0x53, 0x31, 0x32, 0x22, 0x9f, 0x1000, 0x900, 0
            ]),
            any::<u16>()
        )
            .prop_map(|(f, fl)| (f << 12) | u64::from(fl & 0x1ff) | (u64::from(fl >> 15) << 63)),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let uflags = prop::sample::select(vec![
        P,
        P | RW,
        P | US,
        P | RW | US,
        P | NX,
        P | RW | US | NX,
        0,
        P | RW | US | A | D,
        P | RW | US | D,
        P | US | A,
    ]);
    let kflags = prop::sample::select(vec![
        P | RW | G,
        P | G,
        P | RW | G | NX,
        P | RW,
        P | RW | US | G,
        0,
        P | RW | G | A | D,
    ]);
    prop_oneof![
        8 => (0..ROOTS, 0..2usize, 0..SLOTS, 0..TARGETS.len(), uflags, any::<bool>())
            .prop_map(|(root, l2i, idx, target, flags, preserve)| Op::Leaf { kern: false, root, l2i, idx, target, flags, preserve }),
        3 => (0..SLOTS, 0..TARGETS.len(), kflags, any::<bool>())
            .prop_map(|(idx, target, flags, preserve)| Op::Leaf { kern: true, root: 0, l2i: 0, idx, target, flags, preserve }),
        2 => (any::<bool>(), 0..ROOTS, any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(kern, root, on, rw, preserve)| Op::Big { kern, root, on, rw, preserve }),
        2 => (0..ROOTS, 0..2usize, prop::option::of(0..L1S.len()), any::<bool>())
            .prop_map(|(root, l2i, l1, accessed)| Op::Link { root, l2i, l1, accessed }),
        1 => (0..L1S.len()).prop_map(Op::PinL1),
        1 => (0..L1S.len()).prop_map(Op::UnpinL1),
        1 => (0..L1S.len()).prop_map(Op::Zero),
        2 => (role(), 0..SPARES.len()).prop_map(|(r, to)| Op::Relocate(r, to)),
        3 => (0..ROOTS).prop_map(Op::Baseptr),
        2 => (0..ROOTS, any::<bool>()).prop_map(|(r, d)| Op::Teardown(r, d)),
        1 => prop::option::of(0..ROOTS).prop_map(Op::KernelRoot),
        1 => (0..ROOTS).prop_map(Op::Rebuild),
        3 => (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(kern, clear_a, clear_d)| Op::Sync { kern, clear_a, clear_d }),
        2 => any::<bool>().prop_map(Op::Query),
        2 => (any::<bool>(), 0..4u16, 0..32u64).prop_map(|(a, t, m)| Op::Flush(a, t, m)),
        2 => (role(), 0..512usize, hostile_val(), any::<bool>())
            .prop_map(|(table, idx, val, preserve)| Op::Hostile { table, idx, val, preserve }),
        1 => (0..6u8, role(), role(), 1..5u8).prop_map(|(kind, a, b, level)| Op::Raw { kind, a, b, level }),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let access =
        (0..4usize, 0..VAS, any::<bool>(), any::<bool>()).prop_map(|(vcpu, va, write, user)| {
            Access {
                vcpu,
                va,
                write,
                user,
            }
        });
    (
        0..4usize,
        prop::collection::vec(op_strategy(), 1..4),
        prop::collection::vec(access, 0..8),
    )
        .prop_map(|(vcpu, ops, accesses)| Step {
            vcpu,
            ops,
            accesses,
        })
}

/// One cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tlb {
    pfn: u64,
    rw: bool,
    us: bool,
    nx: bool,
    g: bool,
    dirty: bool,
    /// Guest PTE the translation was made from.
    slot: u64,
}

/// A/D obligations of one guest leaf slot.
#[derive(Clone, Copy, Debug, Default)]
struct Rec {
    /// Bits the CPU set through this slot since the guest last cleared them.
    must: u64,
    /// Bits the guest may see (CPU bits plus bits it wrote itself).
    may: u64,
    /// `must` bits a reclaim may have moved out of the shadow into the guest PTE (a plain
    /// update of the PTE may then overwrite them with the guest's consent).
    gone: u64,
}

/// A guest translation.
#[derive(Clone, Copy, Debug)]
struct GWalk {
    slot: u64,
    pfn: u64,
    rw: bool,
    us: bool,
    nx: bool,
    g: bool,
}

struct World {
    mem: GuestMemoryMmap,
    mmu: ShadowMmu,
    vcpus: usize,
    roots: [[u64; 3]; ROOTS],
    l1s: [u64; L1S.len()],
    kern: [u64; 3],
    spares: [u64; SPARES.len()],
    pinned: BTreeMap<u64, u8>,
    vroot: Vec<Option<u64>>,
    cr3: Vec<Option<u64>>,
    tlb: Vec<HashMap<u64, Tlb>>,
    recs: HashMap<u64, Box<[Rec; 512]>>,
    typed: HashMap<u64, u8>,
    reclaimed: u64,
    ops: u64,
    accesses: u64,
    writes: HashMap<u64, u64>,
    /// The last entries applied (for failure reports).
    history: Vec<String>,
    /// vCPUs a guest flush of the current batch named (bit n = vCPU n).
    flush_asked: u64,
    /// The mechanism switched off (tests that expect the model to catch it): remote
    /// deliveries are taken but not applied.
    drop_remote: bool,
    /// Differential runs: a second engine with the straight-line `PT_UPDATE` path off, on
    /// its own copy of memory, fed the same entries and the same CPU and guest stores.
    twin: Option<Box<Twin>>,
    /// The host's cache of the pool (a software-shadowing KVM): every shadow entry a walk
    /// used (address → value with A), until its chunk is resynced. It must never hold one
    /// the VMM has since reduced in a live shadow outside the stale chunks.
    host_seen: HashMap<u64, u64>,
    /// The kernel flush (a host with nested paging, `ShadowMmu::enable_kernel_flush`).
    kernel: Option<KernelHost>,
    /// Leaf zaps (a software-shadowing host that drops every translation to a frame the
    /// VMM zaps, `ShadowMmu::enable_leaf_zap`).
    leaf_zap: Option<LeafZapHost>,
}

/// The host of leaf zaps: zapping a RAM frame drops every cached pool leaf that maps it.
#[derive(Default)]
struct LeafZapHost {
    /// The mechanism switched off (the model must catch it): the list is taken, nothing
    /// is zapped.
    skip_zap: bool,
    /// Frames zapped.
    frames: u64,
    /// Cached leaves those zaps dropped.
    dropped: u64,
    /// Remote targets whose flush a zap performed (no delivery).
    flushed: u64,
}

/// What a kernel-flush run switches off (the model must catch each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelMutant {
    /// Nothing: the real mechanism.
    None,
    /// Targets counted flushed, nothing zapped.
    SkipZap,
    /// A guest's own remote flush counts as naming a frame.
    GuestFlushFramed,
}

/// The host of the kernel flush: which pool frames its nested page tables map (the walker
/// read through them since the last zap of each); zapping a mapped one flushes every
/// vCPU's TLB.
#[derive(Default)]
struct KernelHost {
    mapped: std::collections::HashSet<u32>,
    /// The mechanism switched off (the model must catch it): targets are counted flushed
    /// but nothing is zapped.
    skip_zap: bool,
    /// Zaps that hit a mapped frame (each flushed every vCPU).
    flushes: u64,
    /// Remote targets flushed this way.
    targets: u64,
}

/// The general-path engine of a differential run and its memory.
struct Twin {
    mem: GuestMemoryMmap,
    mmu: ShadowMmu,
    /// Buffers for comparing the memories after every batch.
    bufs: [Vec<u8>; 2],
}

type Res = Result<(), String>;

/// What the runs exercised, summed over every case (a cover item that never happened would
/// make its checks vacuous, so the default run asserts each one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cov {
    TlbFill,
    TlbHit,
    DirtyRewalk,
    CpuWrite,
    GlobalFill,
    GlobalKeptOverCr3Load,
    BigPageFill,
    NonLeafASet,
    RemoteFlush,
    Reclaim,
    Enomem,
    TeardownOwedD,
    PreserveOwedD,
    SyncOwedD,
    QueryOwedD,
    QueryOwedA,
    Relocated,
    HostileAccepted,
    SharedRoot,
    DistinctRoots,
    /// A `DETACH` moved another vCPU off the dying root.
    RemoteDetach,
    /// A batch that needed a flush left another vCPU alone (it held nothing through it).
    RemoteAvoided,
    /// A guest flush named another vCPU.
    GuestRemoteFlush,
    /// A host resync covered some chunks of the pool but not all.
    PartialResync,
    /// A target with a root switch waiting ran kernel code on its old root first.
    KernelBeforeSwitch,
    /// A vCPU stayed on a freed root past a batch: its `DETACH` switch was lazy.
    LazySwitch,
}

const COV_N: usize = Cov::LazySwitch as usize + 1;
static COV: [std::sync::atomic::AtomicU64; COV_N] =
    [const { std::sync::atomic::AtomicU64::new(0) }; COV_N];

fn cov(c: Cov) {
    COV[c as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

fn coverage() -> Vec<(Cov, u64)> {
    use Cov::*;
    [
        TlbFill,
        TlbHit,
        DirtyRewalk,
        CpuWrite,
        GlobalFill,
        GlobalKeptOverCr3Load,
        BigPageFill,
        NonLeafASet,
        RemoteFlush,
        Reclaim,
        Enomem,
        TeardownOwedD,
        PreserveOwedD,
        SyncOwedD,
        QueryOwedD,
        QueryOwedA,
        Relocated,
        HostileAccepted,
        SharedRoot,
        DistinctRoots,
    ]
    .into_iter()
    .map(|c| {
        (
            c,
            COV[c as usize].load(std::sync::atomic::Ordering::Relaxed),
        )
    })
    .collect()
}

fn leaf_at(level: u8, e: u64) -> bool {
    e & P != 0 && (level == 1 || (level == 2 && e & PS != 0))
}

fn leaf_frame(level: u8, e: u64) -> u64 {
    if level == 2 {
        (e & ADDR_2M) >> 12
    } else {
        (e & ADDR) >> 12
    }
}

fn ram(pfn: u64) -> bool {
    pfn < RAM_END >> 12 && pfn != RESERVED
}

impl World {
    fn new(vcpus: usize, pool: u64) -> World {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), RAM_END as usize),
            (GuestAddress(POOL), (pool * 4096) as usize),
        ])
        .unwrap();
        let layout = Layout {
            ram: vec![0..RAM_END],
            reserved: vec![RESERVED << 12..(RESERVED + 1) << 12],
            pool_base: POOL,
            pool_frames: pool,
        };
        let roots = std::array::from_fn(|r| {
            let b = 0x30 + 4 * r as u64;
            [b, b + 1, b + 2]
        });
        let mut mmu = ShadowMmu::new(layout, vcpus).unwrap();
        mmu.set_resync_granule(RESYNC_GRANULE);
        let w = World {
            mem,
            mmu,
            vcpus,
            roots,
            l1s: L1S,
            kern: KERN,
            spares: SPARES,
            pinned: BTreeMap::new(),
            vroot: vec![None; vcpus],
            cr3: vec![None; vcpus],
            tlb: vec![HashMap::new(); vcpus],
            recs: HashMap::new(),
            typed: HashMap::new(),
            reclaimed: 0,
            ops: 0,
            accesses: 0,
            writes: HashMap::new(),
            history: Vec::new(),
            flush_asked: 0,
            drop_remote: false,
            twin: None,
            host_seen: HashMap::new(),
            kernel: None,
            leaf_zap: None,
        };
        w.wr(KERN[0] << 12, (KERN[1] << 12) | T);
        w.wr(KERN[1] << 12, (KERN[2] << 12) | T);
        w.wr((KERN[1] << 12) + 8, BIG[1] | P | RW | PS | G);
        for i in 0..4 {
            w.wr((KERN[2] << 12) + 8 * i, ((0x104 + i) << 12) | P | RW | G);
            for l in &L1S[..4] {
                w.wr((l << 12) + 8 * i, ((0x100 + i) << 12) | P | RW | US);
            }
        }
        w
    }

    /// Switches the world to the kernel flush: every frame is its own chunk, and remote
    /// flushes the engine can leave to a zap are zapped.
    fn kernel_host(mut self, mutant: KernelMutant) -> World {
        self.mmu.enable_kernel_flush();
        self.mmu
            .set_debug_guest_flush_framed(mutant == KernelMutant::GuestFlushFramed);
        self.kernel = Some(KernelHost {
            skip_zap: mutant == KernelMutant::SkipZap,
            ..KernelHost::default()
        });
        self
    }

    /// The kernel flush at the end of a batch (like the VMM, before any delivery): the
    /// targets a zap of the stale frames can flush are flushed that way and leave `remote`.
    /// Returns the targets left and whether a zap was made.
    fn kernel_flush(&mut self, remote: VcpuSet) -> Result<(VcpuSet, bool), String> {
        let Some(k) = self.kernel.as_mut() else {
            return Ok((remote, false));
        };
        let flushed = self.mmu.kernel_flushable(remote);
        if flushed.is_empty() {
            return Ok((remote, false));
        }
        let frames = self.mmu.stale_chunks();
        let zapped = !k.skip_zap;
        k.targets += u64::from(flushed.len());
        if zapped {
            let hit = frames.iter().any(|f| k.mapped.contains(f));
            for f in &frames {
                k.mapped.remove(f);
            }
            if hit {
                k.flushes += 1;
                self.tlb.iter_mut().for_each(HashMap::clear);
            }
        }
        // The zap is this host's resync of those frames.
        self.check_host_cache(&frames)?;
        self.mmu.kernel_flushed(flushed, &frames);
        Ok((VcpuSet(remote.0 & !flushed.0), zapped))
    }

    /// Switches the world to leaf zaps: a changed leaf's old target is zapped instead of
    /// its pool chunk resynced.
    fn leaf_zap_host(mut self, skip_zap: bool) -> World {
        self.mmu.enable_leaf_zap();
        if let Some(t) = self.twin.as_deref_mut() {
            t.mmu.enable_leaf_zap();
        }
        self.leaf_zap = Some(LeafZapHost {
            skip_zap,
            ..LeafZapHost::default()
        });
        self
    }

    /// The leaf zaps at the end of a batch (like the VMM, before any delivery and the
    /// resync): the host forgets every cached pool entry that maps a zapped frame and drops
    /// every vCPU's translations to it (a weaker host than KVM, which then flushes whole
    /// TLBs); the remote targets whose flush the zap performed leave `remote`.
    fn leaf_zaps(&mut self, remote: VcpuSet) -> Result<VcpuSet, String> {
        let list = self.mmu.take_leaf_zaps();
        if let Some(t) = self.twin.as_deref_mut() {
            if t.mmu.take_leaf_zaps() != list {
                return Err("fast path: leaf zaps differ".into());
            }
        }
        let Some(h) = self.leaf_zap.as_mut() else {
            return if list.is_empty() {
                Ok(remote)
            } else {
                Err(format!("leaf zaps listed without the mode: {list:?}"))
            };
        };
        if list.is_empty() {
            return Ok(remote);
        }
        if !h.skip_zap {
            h.frames += list.frames.len() as u64;
            let zapped = |pfn: u64| list.frames.binary_search(&pfn).is_ok();
            let before = self.host_seen.len();
            self.host_seen.retain(|_, e| !zapped((*e & ADDR) >> 12));
            h.dropped += (before - self.host_seen.len()) as u64;
            for t in &mut self.tlb {
                t.retain(|_, e| !zapped(e.pfn));
            }
        }
        let flushed = self.mmu.leaf_zap_flushable(remote);
        self.mmu.leaf_zap_flushed(flushed);
        if let Some(t) = self.twin.as_deref_mut() {
            if t.mmu.leaf_zap_flushable(remote) != flushed {
                return Err("fast path: leaf-zap flushes differ".into());
            }
            t.mmu.leaf_zap_flushed(flushed);
        }
        if let Some(h) = self.leaf_zap.as_mut() {
            h.flushed += u64::from(flushed.len());
        }
        Ok(VcpuSet(remote.0 & !flushed.0))
    }

    /// Builds and pins the address spaces and loads one on each vCPU.
    fn boot(&mut self) -> Res {
        for r in 0..ROOTS {
            self.step(&Step {
                vcpu: r % self.vcpus,
                ops: vec![Op::Rebuild(r)],
                accesses: vec![],
            })?;
        }
        for v in 0..self.vcpus {
            self.batch(v, &[Op::Baseptr(v % ROOTS)])?;
        }
        Ok(())
    }

    fn wr(&self, gpa: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(gpa)).unwrap();
        if let Some(t) = &self.twin {
            t.mem.write_obj(v, GuestAddress(gpa)).unwrap();
        }
    }

    /// Makes this a differential run (before any entry is applied): a twin engine with the
    /// fast path off starts from a copy of the memory.
    fn add_twin(&mut self, vcpus: usize, pool: u64) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), RAM_END as usize),
            (GuestAddress(POOL), (pool * 4096) as usize),
        ])
        .unwrap();
        let mut buf = vec![0u8; RAM_END as usize];
        self.mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
        mem.write_slice(&buf, GuestAddress(0)).unwrap();
        let mut mmu = ShadowMmu::new(self.mmu.layout().clone(), vcpus).unwrap();
        mmu.set_fast_path(false);
        mmu.set_resync_granule(self.mmu.resync_granule());
        self.twin = Some(Box::new(Twin {
            mem,
            mmu,
            bufs: [Vec::new(), Vec::new()],
        }));
    }

    /// Differential runs: the two engines agree on guest memory, pool memory, counters,
    /// loaded roots and pending flushes.
    fn compare_twin(&mut self) -> Res {
        let Some(t) = self.twin.as_deref_mut() else {
            return Ok(());
        };
        if self.mmu.counters() != t.mmu.counters() {
            return Err(format!(
                "fast path: counters differ:\n{:?}\n{:?}",
                self.mmu.counters(),
                t.mmu.counters()
            ));
        }
        let pool = self.mmu.counters().pool_frames_total;
        for (base, len) in [(0, RAM_END), (POOL, pool * 4096)] {
            let [a, b] = &mut t.bufs;
            a.resize(len as usize, 0);
            b.resize(len as usize, 0);
            self.mem.read_slice(a, GuestAddress(base)).unwrap();
            t.mem.read_slice(b, GuestAddress(base)).unwrap();
            if a != b {
                let i = (0..a.len())
                    .step_by(8)
                    .find(|&i| a[i..i + 8] != b[i..i + 8]);
                let i = i.unwrap_or(0);
                let word = |x: &[u8]| u64::from_le_bytes(x[i..i + 8].try_into().unwrap());
                return Err(format!(
                    "fast path: memory differs at {:#x}: {:#x} (fast) vs {:#x} (general)",
                    base + i as u64,
                    word(a),
                    word(b)
                ));
            }
        }
        for v in 0..self.vcpus {
            if self.mmu.loaded_root(v) != t.mmu.loaded_root(v)
                || self.mmu.flush_pending(v) != t.mmu.flush_pending(v)
            {
                return Err(format!("fast path: vcpu {v} root or pending flush differs"));
            }
        }
        Ok(())
    }
    fn rd(&self, gpa: u64) -> u64 {
        self.mem.read_obj(GuestAddress(gpa)).unwrap()
    }
    fn table(&self, pfn: u64) -> [u64; 512] {
        let mut b = [0u8; 4096];
        self.mem
            .read_slice(&mut b, GuestAddress(pfn << 12))
            .unwrap();
        std::array::from_fn(|i| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap()))
    }

    fn frame(&self, r: Role) -> u64 {
        match r {
            Role::L4(i) => self.roots[i][0],
            Role::L3(i) => self.roots[i][1],
            Role::L2(i) => self.roots[i][2],
            Role::L1(i) => self.l1s[i],
            Role::Kern(i) => self.kern[i],
            Role::Spare(i) => self.spares[i],
            Role::Frame(f) => f,
        }
    }

    fn is_kern_frame(&self, pfn: u64) -> bool {
        self.kern.contains(&pfn)
    }

    /// The L2 of a modelled region, walking the guest tables of root `root`.
    fn region_l2(&self, root: u64, kern: bool) -> Option<u64> {
        let mut t = root;
        for idx in [if kern { 256 } else { 0 }, 0] {
            let e = self.rd((t << 12) + 8 * idx);
            if e & P == 0 || e & PS != 0 {
                return None;
            }
            t = (e & ADDR) >> 12;
        }
        Some(t)
    }

    /// The L1 behind entry `l2i` of a modelled region of address space `root`.
    fn region_l1(&self, kern: bool, root: usize, l2i: usize) -> Option<u64> {
        let l2 = self.region_l2(self.roots[root][0], kern)?;
        let e = self.rd((l2 << 12) + 8 * l2i as u64);
        (e & P != 0 && e & PS == 0).then_some((e & ADDR) >> 12)
    }

    /// Walks `va` through the guest tables of L4 `root`.
    fn guest_walk(&self, root: u64, va: u64) -> Option<GWalk> {
        let (mut t, mut rw, mut us, mut nx) = (root, true, true, false);
        for level in (1..=4u8).rev() {
            let idx = (va >> (12 + 9 * (u32::from(level) - 1))) & 511;
            let slot = (t << 12) + 8 * idx;
            let e = self.rd(slot);
            if e & P == 0 {
                return None;
            }
            rw &= e & RW != 0;
            us &= e & US != 0;
            nx |= e & NX != 0;
            if leaf_at(level, e) {
                let off = if level == 2 { (va >> 12) & 511 } else { 0 };
                let g = e & G != 0;
                let pfn = leaf_frame(level, e) + off;
                return Some(GWalk {
                    slot,
                    pfn,
                    rw,
                    us,
                    nx,
                    g,
                });
            }
            if level == 1 {
                return None;
            }
            t = (e & ADDR) >> 12;
        }
        None
    }

    fn rec(&mut self, slot: u64) -> Result<&mut Rec, String> {
        self.recs
            .get_mut(&(slot >> 12))
            .map(|t| &mut t[((slot & 0xfff) >> 3) as usize])
            .ok_or_else(|| format!("slot {slot:#x} is not in a typed L1/L2"))
    }

    // ----- the simulated CPU -----

    /// One access of `vcpu` to `va`; faults are silently dropped (the guest retries).
    fn access(&mut self, a: &Access) -> Res {
        let v = a.vcpu % self.vcpus;
        let va = va_of(a.va);
        let vpn = va >> 12;
        if self.cr3[v].is_none() {
            return Ok(());
        }
        self.accesses += 1;
        if let Some(t) = self.tlb[v].get(&vpn).copied() {
            let allowed = (!a.write || t.rw) && (!a.user || t.us);
            if allowed && (!a.write || t.dirty) {
                cov(Cov::TlbHit);
                return self.touch(t, a.write);
            }
            if allowed {
                cov(Cov::DirtyRewalk);
            }
            // A write without D walks again; a refused access drops the entry and walks.
            self.tlb[v].remove(&vpn);
        }
        let Some(t) = self.walk(v, va, a.write, a.user)? else {
            return Ok(());
        };
        self.tlb[v].insert(vpn, t);
        cov(Cov::TlbFill);
        if t.g {
            cov(Cov::GlobalFill);
        }
        if matches!(a.va, 16..20 | 28..) {
            cov(Cov::BigPageFill);
        }
        self.touch(t, a.write)
    }

    /// Records an access through translation `t`.
    fn touch(&mut self, t: Tlb, write: bool) -> Res {
        if write {
            if !ram(t.pfn) || self.typed.contains_key(&t.pfn) {
                return Err(format!(
                    "CPU wrote frame {:#x} (page table or not RAM) via {t:?}",
                    t.pfn
                ));
            }
            *self.writes.entry(t.pfn).or_default() += 1;
            cov(Cov::CpuWrite);
        }
        let bits = A | if write { D } else { 0 };
        let r = self.rec(t.slot)?;
        r.must |= bits;
        r.may |= bits;
        Ok(())
    }

    /// Until its root switch is delivered, a target runs kernel code on its old CR3, after
    /// the batch that switched it (a `DETACH` that freed that root, say) changed the pool:
    /// a kernel translation the guest has, in the root it moves to, must still be found
    /// through the old one.
    fn runs_kernel_before_switch(&mut self, w: usize) -> Res {
        // The op that switched it (a DETACH, the only remote root switch) already moved
        // the model's guest root; the CPU is still on the old CR3.
        let Some(root) = self.vroot[w] else {
            return Ok(());
        };
        if self.cr3[w].is_none() || self.guest_walk(root, KVA).is_none() {
            return Ok(());
        }
        match self.walk(w, KVA, false, false)? {
            Some(t) => {
                // A read, as by the CPU: the walk set A in the guest's leaf record too.
                let r = self.rec(t.slot)?;
                r.must |= A;
                r.may |= A;
                cov(Cov::KernelBeforeSwitch);
                Ok(())
            }
            None => Err(format!(
                "vcpu {w}: kernel VA {KVA:#x} unmapped on its old root before its root switch"
            )),
        }
    }

    /// A hardware page walk through the shadow of `vcpu`, setting A (and D) as it goes.
    fn walk(&mut self, v: usize, va: u64, write: bool, user: bool) -> Result<Option<Tlb>, String> {
        let mut t = self.cr3[v].unwrap_or(0) >> 12;
        let (mut rw, mut us, mut nx) = (true, true, false);
        for level in (1..=4u8).rev() {
            if !(POOL >> 12..(POOL >> 12) + self.mmu.counters().pool_frames_total).contains(&t) {
                return Err(format!(
                    "vcpu {v} va {va:#x}: shadow walk left the pool at L{level} ({t:#x})"
                ));
            }
            let slot = (t << 12) + 8 * ((va >> (12 + 9 * (u32::from(level) - 1))) & 511);
            if let Some(k) = self.kernel.as_mut() {
                k.mapped.insert((t - (POOL >> 12)) as u32);
            }
            let e = self.rd(slot);
            if e & P == 0 {
                return Ok(None);
            }
            if level > 1 && e & PS != 0 {
                return Err(format!("shadow L{level} entry {e:#x} has PS"));
            }
            rw &= e & RW != 0;
            us &= e & US != 0;
            nx |= e & NX != 0;
            if level > 1 {
                if e & A == 0 {
                    cov(Cov::NonLeafASet);
                }
                self.wr(slot, e | A);
                self.host_seen.insert(slot, e | A);
                t = (e & ADDR) >> 12;
                continue;
            }
            if (write && !rw) || (user && !us) {
                return Ok(None);
            }
            let e = e | A | if write { D } else { 0 };
            self.wr(slot, e);
            self.host_seen.insert(slot, e);
            let pfn = (e & ADDR) >> 12;
            let g = e & G != 0;
            let dirty = e & D != 0;
            let root = self.vroot[v].ok_or("a vCPU with CR3 but no root")?;
            let gw = self.guest_walk(root, va).ok_or_else(|| {
                format!("vcpu {v} va {va:#x}: shadow maps {pfn:#x}, guest nothing")
            })?;
            let t = Tlb {
                pfn,
                rw,
                us,
                nx,
                g,
                dirty,
                slot: gw.slot,
            };
            self.permitted(v, va, &t, &gw)?;
            return Ok(Some(t));
        }
        Ok(None)
    }

    /// The host's cache after a batch: an entry a walk used, in a live shadow frame outside
    /// the `stale` chunks (the ones about to be resynced), still grants at least as much
    /// on the same frame (A/D included: a cleared bit the host keeps is lost tracking).
    /// The resynced chunks' entries are then forgotten.
    fn check_host_cache(&mut self, stale: &[u32]) -> Res {
        let granule = u64::from(self.mmu.resync_granule());
        let chunk = |slot: u64| ((slot - POOL) >> 12) / granule;
        for (&slot, &was) in &self.host_seen {
            let idx = ((slot - POOL) >> 12) as u32;
            if stale.contains(&(chunk(slot) as u32)) || !self.mmu.debug_pool_frame_used(idx) {
                continue;
            }
            let now = self.rd(slot);
            let kept = |bit: u64| was & bit == 0 || now & bit != 0;
            let ok = now & P != 0
                && now & ADDR == was & ADDR
                && kept(RW)
                && kept(US)
                && kept(G)
                && kept(A)
                && kept(D)
                && (now & NX == 0 || was & NX != 0);
            if !ok {
                return Err(format!(
                    "host cache: pool entry {slot:#x} went {was:#x} -> {now:#x} outside the stale chunks {stale:?}"
                ));
            }
        }
        let chunks = self.mmu.counters().pool_frames_total.div_ceil(granule);
        if !stale.is_empty() && (stale.len() as u64) < chunks {
            cov(Cov::PartialResync);
        }
        self.host_seen
            .retain(|&slot, _| !stale.contains(&(chunk(slot) as u32)));
        Ok(())
    }

    /// Translation `t` is no more permissive than guest translation `g`.
    fn permitted(&self, v: usize, va: u64, t: &Tlb, g: &GWalk) -> Res {
        let bad = if !ram(t.pfn) {
            "maps the pool or non-RAM"
        } else if t.pfn != g.pfn {
            "maps another frame"
        } else if t.rw && (!g.rw || self.typed.contains_key(&t.pfn)) {
            "writable where the guest is read-only or onto a page table"
        } else if t.us && !g.us {
            "user where the guest is supervisor"
        } else if g.nx && !t.nx {
            "executable where the guest says NX"
        } else if t.g && !g.g {
            "global where the guest is not"
        } else if t.slot != g.slot {
            "made from another guest PTE"
        } else {
            return Ok(());
        };
        Err(format!(
            "vcpu {v} va {va:#x}: translation {t:?} {bad}; guest {g:?}"
        ))
    }

    /// A global translation that survived a CR3 load into an address space that maps its
    /// VA differently is still allowed by the guest PTE it was made from: that PTE is in a
    /// typed table and still grants at least as much, and it is not writable onto a page
    /// table, the pool or non-RAM.
    fn stale_global_allowed(&self, v: usize, va: u64, t: &Tlb) -> Res {
        let level = self.typed.get(&(t.slot >> 12)).copied();
        let e = self.rd(t.slot);
        let Some(level) = level.filter(|&l| leaf_at(l, e)) else {
            return Err(format!(
                "vcpu {v} va {va:#x}: stale global {t:?}, its PTE {e:#x} is gone"
            ));
        };
        let off = if level == 2 { (va >> 12) & 511 } else { 0 };
        let g = GWalk {
            slot: t.slot,
            pfn: leaf_frame(level, e) + off,
            rw: e & RW != 0,
            us: e & US != 0,
            nx: e & NX != 0,
            g: e & G != 0,
        };
        self.permitted(v, va, t, &g)
    }

    /// After a batch: every cached translation is still allowed by the guest's tables.
    fn check_tlbs(&self) -> Res {
        for v in 0..self.vcpus {
            let Some(root) = self.vroot[v] else {
                if !self.tlb[v].is_empty() {
                    return Err(format!("vcpu {v} caches translations without a root"));
                }
                continue;
            };
            for (&vpn, t) in &self.tlb[v] {
                let va = vpn << 12;
                let g = self.guest_walk(root, va);
                if t.g && va < KVA && g.is_none_or(|g| g.slot != t.slot) {
                    // A user-half global page the guest maps differently in this address
                    // space (only hostile cross-links make one): stale on bare metal too.
                    self.stale_global_allowed(v, va, t)?;
                    continue;
                }
                let g = g.ok_or_else(|| {
                    format!("vcpu {v} va {va:#x}: {t:?} cached, guest maps nothing")
                })?;
                self.permitted(v, va, t, &g)?;
            }
            // A lazy root switch leaves the vCPU on the freed root until its own next batch.
            let lazy = self.mmu.lazy_root(v);
            if lazy.is_some() {
                cov(Cov::LazySwitch);
            }
            let want = lazy.or_else(|| self.mmu.loaded_root(v).map(|r| r.shadow_root));
            if self.cr3[v] != want
                || self.mmu.loaded_root(v).map(|r| r.guest_l4 >> 12) != self.vroot[v]
            {
                return Err(format!(
                    "vcpu {v}: cr3 {:?} root {:?}, engine {:?}",
                    self.cr3[v],
                    self.vroot[v],
                    self.mmu.loaded_root(v)
                ));
            }
        }
        Ok(())
    }

    // ----- batches -----

    fn step(&mut self, s: &Step) -> Res {
        let r = self.batch(s.vcpu % self.vcpus, &s.ops);
        let r = r.and_then(|()| s.accesses.iter().try_for_each(|a| self.access(a)));
        r.map_err(|e| format!("{e}\nlast entries:\n{}", self.history.join("\n")))
    }

    /// Runs one batch like the VMM (stops at the first error), applies its flushes to every
    /// vCPU, and checks.
    fn batch(&mut self, v: usize, ops: &[Op]) -> Res {
        for op in ops {
            let Some(e) = self.entry(v, op) else { continue };
            let r = self.exec(v, &e)?;
            if r == Err(HcError::Enomem) {
                cov(Cov::Enomem);
            }
            if r.is_ok() && matches!(op, Op::Hostile { .. } | Op::Raw { .. }) {
                cov(Cov::HostileAccepted);
            }
            if r.is_err() {
                break;
            }
        }
        let out = self.mmu.end_batch(v);
        if let Some(t) = self.twin.as_deref_mut() {
            let o2 = t.mmu.end_batch(v);
            if out != o2 {
                return Err(format!("fast path: end_batch {out:?} vs {o2:?} (general)"));
            }
        }
        if out.remote_avoided > 0 {
            cov(Cov::RemoteAvoided);
        }
        if let Some(c) = out.new_cr3 {
            self.cr3[v] = Some(c);
            self.vroot[v] = self.mmu.loaded_root(v).map(|r| r.guest_l4 >> 12);
            self.tlb[v].retain(|_, t| t.g);
            if !self.tlb[v].is_empty() {
                cov(Cov::GlobalKeptOverCr3Load);
            }
        }
        // Like the VMM: only the vCPUs the batch names get a delivery (a root switch of
        // DETACH, a flush), each applied before the batch returns; with the kernel flush,
        // only those a zap did not flush, and the zap stands in for the caller's own
        // flush unless that one names no frame.
        let (remote, zapped) = self.kernel_flush(out.remote)?;
        let remote = self.leaf_zaps(remote)?;
        if out.flush.is_some() && (!zapped || out.flush_frameless) {
            self.tlb[v].clear();
        }
        for w in remote.iter() {
            let d = self.mmu.take_delivery(w);
            if let Some(t) = self.twin.as_deref_mut() {
                let d2 = t.mmu.take_delivery(w);
                if d != d2 {
                    return Err(format!("fast path: delivery {d:?} vs {d2:?} (general)"));
                }
            }
            if self.drop_remote {
                continue;
            }
            if let Some(c) = d.new_cr3 {
                self.runs_kernel_before_switch(w)?;
                self.cr3[w] = Some(c);
                self.vroot[w] = self.mmu.loaded_root(w).map(|r| r.guest_l4 >> 12);
                self.tlb[w].retain(|_, t| t.g);
            }
            if d.flush.is_some() {
                if !self.tlb[w].is_empty() {
                    cov(Cov::RemoteFlush);
                }
                self.tlb[w].clear();
            }
        }
        let asked = std::mem::take(&mut self.flush_asked);
        for w in 0..self.vcpus {
            if asked >> w & 1 != 0 && !self.tlb[w].is_empty() {
                return Err(format!("vcpu {w}: a guest flush for it left its TLB"));
            }
        }
        if asked & !(1 << v) != 0 {
            cov(Cov::GuestRemoteFlush);
        }
        if !self.mmu.vcpus_needing_flush().is_empty() {
            return Err(format!(
                "flushes left pending on {:?} after the batch's remote set {:?}",
                self.mmu.vcpus_needing_flush(),
                out.remote
            ));
        }
        let stale = self.mmu.stale_chunks();
        self.check_host_cache(&stale)?;
        self.mmu.host_resynced_chunks(&stale);
        if let Some(t) = self.twin.as_deref_mut() {
            if t.mmu.stale_chunks() != stale {
                return Err("fast path: host resync chunks differ".into());
            }
            t.mmu.host_resynced_chunks(&stale);
        }
        self.compare_twin()?;
        let loaded: Vec<u64> = self.vroot.iter().flatten().copied().collect();
        let mut distinct = loaded.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() >= 2 {
            cov(Cov::DistinctRoots);
        }
        if distinct.len() < loaded.len() {
            cov(Cov::SharedRoot);
        }
        self.check_tlbs()?;
        self.mmu.check_invariants(&self.mem).map_err(String::from)
    }

    /// The MMU entry for model op `op` (None: nothing to do).
    fn entry(&mut self, v: usize, op: &Op) -> Option<MmuOp> {
        let upd = |ptr, val, preserve_ad| MmuOp::PtUpdate {
            ptr,
            val,
            preserve_ad,
        };
        Some(match *op {
            Op::Leaf {
                kern,
                root,
                l2i,
                idx,
                target,
                flags,
                preserve,
            } => {
                let l1 = self.region_l1(kern, root, l2i)?;
                upd(
                    (l1 << 12) + 8 * idx as u64,
                    (TARGETS[target] << 12) | flags,
                    preserve,
                )
            }
            Op::Big {
                kern,
                root,
                on,
                rw,
                preserve,
            } => {
                let l2 = self.region_l2(self.roots[root][0], kern)?;
                let i = if kern { 1 } else { 2 };
                let val = if on {
                    BIG[usize::from(kern)]
                        | P
                        | PS
                        | if rw { RW } else { 0 }
                        | if kern { G } else { US }
                } else {
                    0
                };
                upd((l2 << 12) + 8 * i, val, preserve)
            }
            Op::Link {
                root,
                l2i,
                l1,
                accessed,
            } => {
                let l2 = self.region_l2(self.roots[root][0], false)?;
                let fl = if accessed { T } else { P | RW | US };
                upd(
                    (l2 << 12) + 8 * l2i as u64,
                    l1.map_or(0, |i| (self.l1s[i] << 12) | fl),
                    false,
                )
            }
            Op::PinL1(i) => MmuOp::Pin {
                level: 1,
                frame: self.l1s[i] << 12,
            },
            Op::UnpinL1(i) => MmuOp::Unpin {
                frame: self.l1s[i] << 12,
                detach: false,
            },
            Op::Zero(i) => MmuOp::ZeroFrame {
                frame: self.l1s[i] << 12,
            },
            Op::Relocate(r, to) => MmuOp::RelocateTable {
                old: self.frame(r) << 12,
                new: self.spares[to] << 12,
            },
            Op::Baseptr(r) => {
                // Every loaded address space shares the kernel half (the model's guest keeps
                // global pages consistent): a root a hostile pin typed with a stale kernel
                // half is not loaded.
                let k = self.rd((self.roots[r][0] << 12) + 8 * 256);
                if k & P == 0 || (k & ADDR) >> 12 != self.kern[0] {
                    return None;
                }
                MmuOp::NewBaseptr {
                    frame: self.roots[r][0] << 12,
                }
            }
            Op::Teardown(r, detach) => MmuOp::Unpin {
                frame: self.roots[r][0] << 12,
                detach,
            },
            Op::KernelRoot(r) => MmuOp::SetKernelRoot {
                frame: r.map(|r| self.roots[r][0] << 12),
            },
            Op::Rebuild(r) => return self.rebuild(r),
            Op::Sync {
                kern,
                clear_a,
                clear_d,
            } => {
                let (va, pages) = if kern {
                    (KVA, KERN_L2 * 512)
                } else {
                    (0, USER_L2 * 512)
                };
                MmuOp::SyncAd {
                    va,
                    pages,
                    clear_a,
                    clear_d,
                }
            }
            Op::Query(kern) => {
                let (va, pages) = if kern {
                    (KVA, KERN_L2 * 512)
                } else {
                    (0, USER_L2 * 512)
                };
                MmuOp::QueryAd {
                    va,
                    pages,
                    bitmap_gpa: BITMAP,
                }
            }
            Op::Flush(all, t, mask) => {
                let target = match t {
                    0 => FlushTarget::Local,
                    1 => FlushTarget::Root,
                    2 => FlushTarget::Mask(mask),
                    _ => FlushTarget::All,
                };
                if all {
                    MmuOp::FlushTlb {
                        target,
                        global: mask & 1 != 0,
                    }
                } else {
                    MmuOp::Invlpg {
                        va: va_of(v),
                        target,
                    }
                }
            }
            Op::Hostile {
                table,
                idx,
                val,
                preserve,
            } => return self.hostile(table, idx, val, preserve),
            Op::Raw { kind, a, b, level } => {
                let (fa, fb) = (self.frame(a) << 12, self.frame(b) << 12);
                match kind {
                    0 => MmuOp::Pin { level, frame: fa },
                    1 => MmuOp::Unpin {
                        frame: fa,
                        detach: false,
                    },
                    2 => MmuOp::RelocateTable { old: fa, new: fb },
                    3 => MmuOp::ZeroFrame { frame: fa },
                    4 => MmuOp::CopyFrame { dst: fa, src: fb },
                    _ => return self.hostile(a, usize::from(level), fb | T, false),
                }
            }
        })
    }

    /// A hostile `PT_UPDATE`, kept within the model's one restriction: no global leaf and
    /// no link to a kernel table outside the kernel half, and every L4 keeps its kernel half.
    /// The vCPUs a guest flush of vCPU `v` for `t` must reach (as a bit mask).
    fn targets(&self, v: usize, t: FlushTarget) -> u64 {
        match t {
            FlushTarget::Local => 1 << v,
            // At least every vCPU that has the same root loaded.
            FlushTarget::Root => (0..self.vcpus)
                .filter(|&w| w == v || (self.vroot[w].is_some() && self.vroot[w] == self.vroot[v]))
                .fold(0, |m, w| m | 1 << w),
            FlushTarget::Mask(m) => m,
            FlushTarget::All => (1 << self.vcpus) - 1,
        }
    }

    fn hostile(&self, table: Role, idx: usize, val: u64, preserve: bool) -> Option<MmuOp> {
        let f = self.frame(table);
        let kern_table = self.is_kern_frame(f);
        if !kern_table && self.is_kern_frame((val & ADDR) >> 12) {
            return None;
        }
        if self.roots.iter().any(|r| r[0] == f) && idx == 256 {
            return None;
        }
        let val = if kern_table { val } else { val & !G };
        Some(MmuOp::PtUpdate {
            ptr: (f << 12) + 8 * idx as u64,
            val,
            preserve_ad: preserve,
        })
    }

    /// Rewrites the (untyped) frames of address space `r` with plain stores and pins it.
    fn rebuild(&mut self, r: usize) -> Option<MmuOp> {
        let [l4, l3, l2] = self.roots[r];
        if [l4, l3, l2].iter().any(|f| self.typed.contains_key(f)) {
            return None;
        }
        for f in [l4, l3, l2] {
            self.mem
                .write_slice(&[0u8; 4096], GuestAddress(f << 12))
                .unwrap();
            if let Some(t) = &self.twin {
                t.mem
                    .write_slice(&[0u8; 4096], GuestAddress(f << 12))
                    .unwrap();
            }
        }
        self.wr(l4 << 12, (l3 << 12) | T);
        self.wr((l4 << 12) + 8 * 256, (self.kern[0] << 12) | T);
        self.wr(l3 << 12, (l2 << 12) | T);
        self.wr(l2 << 12, (self.l1s[r] << 12) | T);
        self.wr((l2 << 12) + 8, (self.l1s[3] << 12) | T);
        self.wr((l2 << 12) + 16, BIG[0] | P | RW | US | PS);
        Some(MmuOp::Pin {
            level: 4,
            frame: l4 << 12,
        })
    }
}

// ----- following the engine: one entry at a time -----

impl World {
    /// Applies `e` for vCPU `v` and checks everything it must have done.
    fn exec(&mut self, v: usize, e: &MmuOp) -> Result<Result<(), HcError>, String> {
        self.ops += 1;
        let pre = match *e {
            MmuOp::PtUpdate { ptr, .. } => self.mem.read_obj::<u64>(GuestAddress(ptr)).ok(),
            _ => None,
        };
        let r = match self.twin.as_deref_mut() {
            None => self.mmu.apply(&self.mem, v, e),
            Some(t) => {
                // The fast engine through a batch (the VMM's way), the general one entry by
                // entry: the results must agree.
                let r = self.mmu.batch(&self.mem).apply(v, e);
                let r2 = t.mmu.apply(&t.mem, v, e);
                if r != r2 || self.mmu.counters() != t.mmu.counters() {
                    return Err(format!(
                        "fast path: {e:x?} on vcpu {v}: {r:?} vs {r2:?} (general), counters \
                         {:?} vs {:?}",
                        self.mmu.counters(),
                        t.mmu.counters()
                    ));
                }
                r
            }
        };
        if self.history.len() == 24 {
            self.history.remove(0);
        }
        self.history.push(format!("vcpu {v}: {e:x?} -> {r:?}"));
        let here = |m: String| format!("{e:?} on vcpu {v} -> {r:?}: {m}");
        match (*e, r) {
            (
                MmuOp::PtUpdate {
                    ptr,
                    val,
                    preserve_ad,
                },
                Ok(()),
            ) => self
                .updated(ptr, pre.unwrap_or(0), val, preserve_ad)
                .map_err(here)?,
            (MmuOp::PtUpdate { ptr, .. }, Err(_))
                if pre.is_some() && self.mem.read_obj::<u64>(GuestAddress(ptr)).ok() != pre =>
            {
                return Err(here("refused update changed the PTE".into()));
            }
            (MmuOp::Pin { level, frame }, Ok(())) => {
                self.pinned.insert(frame >> 12, level);
            }
            (MmuOp::Unpin { frame, detach }, Ok(())) => {
                self.pinned.remove(&(frame >> 12));
                if detach {
                    for w in 0..self.vcpus {
                        if self.vroot[w] == Some(frame >> 12) {
                            if w != v {
                                cov(Cov::RemoteDetach);
                            }
                            self.vroot[w] = self.mmu.loaded_root(w).map(|r| r.guest_l4 >> 12);
                        }
                    }
                }
            }
            (MmuOp::FlushTlb { target, .. } | MmuOp::Invlpg { target, .. }, Ok(())) => {
                self.flush_asked |= self.targets(v, target);
            }
            (MmuOp::NewBaseptr { frame }, Ok(())) => self.vroot[v] = Some(frame >> 12),
            (MmuOp::RelocateTable { old, new }, Ok(())) => {
                self.rename(old >> 12, new >> 12);
                self.relocated(new >> 12).map_err(here)?
            }
            (
                MmuOp::SyncAd {
                    va,
                    pages,
                    clear_a,
                    clear_d,
                },
                Ok(()),
            ) => {
                let clear = if clear_a { A } else { 0 } | if clear_d { D } else { 0 };
                self.synced(v, va, pages, clear).map_err(here)?
            }
            (MmuOp::QueryAd { va, pages, .. }, Ok(())) => {
                self.queried(v, va, pages).map_err(here)?
            }
            (MmuOp::SyncAd { .. } | MmuOp::QueryAd { .. }, Err(er)) if self.vroot[v].is_some() => {
                return Err(here(format!("A/D op refused: {er}")));
            }
            (MmuOp::Invlpg { target, .. } | MmuOp::FlushTlb { target, .. }, Err(_)) if !matches!(target, FlushTarget::Mask(m) if m >> self.vcpus != 0) => {
                return Err(here("refused".into()))
            }
            _ => {}
        }
        let reclaimed = self.mmu.counters().reclaimed_tables;
        if reclaimed != self.reclaimed {
            self.reclaimed = reclaimed;
            cov(Cov::Reclaim);
            for t in self.recs.values_mut() {
                for r in t.iter_mut() {
                    r.gone |= r.must;
                }
            }
        }
        self.retype().map_err(here)?;
        Ok(r)
    }

    /// Checks the PTE a successful `PT_UPDATE` wrote and moves the slot's obligations.
    fn updated(&mut self, ptr: u64, o: u64, val: u64, p: bool) -> Res {
        let level = *self
            .typed
            .get(&(ptr >> 12))
            .ok_or("update of an untyped table accepted")?;
        let v = self.rd(ptr);
        let kept = if p { o & AD } else { 0 };
        let Ok(rec) = self.rec(ptr).copied() else {
            // L3/L4: the value as given (PRESERVE_AD: old A/D ORed in).
            return if v == val | kept {
                Ok(())
            } else {
                Err(format!("PTE {v:#x}, want {:#x}", val | kept))
            };
        };
        let same_mod_ad = o & P != 0 && val & P != 0 && (o ^ val) & !AD == 0;
        let same_frame = leaf_at(level, o)
            && leaf_at(level, val)
            && leaf_frame(level, o) == leaf_frame(level, val);
        let new = if same_mod_ad || same_frame {
            if v & !AD != val & !AD || v & (val | kept) & AD != (val | kept) & AD {
                return Err(format!("same-frame PTE {v:#x}, val {val:#x}, old {o:#x}"));
            }
            if v & AD & !(rec.may | val) != 0 {
                return Err(format!("invented A/D: PTE {v:#x}, {rec:?}"));
            }
            let must = if p {
                rec.must
            } else {
                (rec.must & !rec.gone) | (rec.must & val & AD)
            };
            if same_mod_ad && v != val | kept {
                return Err(format!(
                    "identical-mod-A/D PTE {v:#x}, want {:#x}",
                    val | kept
                ));
            }
            Rec {
                must,
                may: rec.may | (val & AD),
                // Same frame, not identical: the harvest moved the shadow's bits into the
                // written PTE (only a 4 KiB upgrade leaves them in the shadow).
                gone: if same_mod_ad { rec.gone & must } else { must },
            }
        } else {
            if !p && v != val {
                return Err(format!("plain replace wrote {v:#x}, not {val:#x}"));
            }
            if p && leaf_at(level, o) && rec.must & D != 0 {
                cov(Cov::PreserveOwedD);
            }
            let want = if p && leaf_at(level, o) {
                (o | rec.must) & AD
            } else {
                kept
            };
            if v & !AD != val & !AD || v & AD & (want | val) != (want | val) & AD {
                return Err(format!(
                    "lost A/D on replace: PTE {v:#x}, val {val:#x}, old {o:#x}, {rec:?}"
                ));
            }
            let allowed = val | if p { rec.may | o } else { 0 };
            if v & AD & !allowed != 0 {
                return Err(format!("invented A/D on replace: PTE {v:#x}, {rec:?}"));
            }
            Rec {
                must: 0,
                may: v & AD,
                gone: 0,
            }
        };
        *self.rec(ptr)? = new;
        Ok(())
    }

    /// The guest leaf slots covering `va .. va + pages` in `vcpu`'s address space, with the
    /// first page each covers and the number of pages.
    fn leaves(&self, v: usize, va: u64) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        let kern = va == KVA;
        let Some(l2) = self.vroot[v].and_then(|r| self.region_l2(r, kern)) else {
            return out;
        };
        for i in 0..if kern { KERN_L2 } else { USER_L2 } {
            let e = self.rd((l2 << 12) + 8 * i);
            if leaf_at(2, e) {
                out.push(((l2 << 12) + 8 * i, i * 512, 512));
            } else if e & P != 0 {
                let l1 = (e & ADDR) >> 12;
                for (j, x) in self.table(l1).iter().enumerate() {
                    if x & P != 0 {
                        out.push(((l1 << 12) + 8 * j as u64, i * 512 + j as u64, 1));
                    }
                }
            }
        }
        out
    }

    /// After `SYNC_AD`: every leaf of the range shows exactly what it owes (minus cleared).
    fn synced(&mut self, v: usize, va: u64, _pages: u64, clear: u64) -> Res {
        for (slot, _, _) in self.leaves(v, va) {
            let g = self.rd(slot) & AD;
            let r = *self.rec(slot)?;
            let keep = AD & !clear;
            if r.must & keep & D != 0 {
                cov(Cov::SyncOwedD);
            }
            if g & clear != 0 {
                return Err(format!("{slot:#x}: {g:#x} after clearing {clear:#x}"));
            }
            if r.must & keep & !g != 0 {
                return Err(format!("lost A/D at {slot:#x}: guest {g:#x}, {r:?}"));
            }
            if g & !r.may != 0 {
                return Err(format!("invented A/D at {slot:#x}: guest {g:#x}, {r:?}"));
            }
            let r = self.rec(slot)?;
            r.must &= !clear;
            r.may &= !clear;
            r.gone &= !clear;
        }
        Ok(())
    }

    /// After `QUERY_AD`: each page's accessed and dirty bits are what its leaf owes, at
    /// most what it may show, and 0 where nothing is mapped.
    fn queried(&mut self, v: usize, va: u64, pages: u64) -> Res {
        let b = hypercall::ad_bitmap_bytes(pages);
        let mut bits = vec![0u8; 2 * b as usize];
        self.mem
            .read_slice(&mut bits, GuestAddress(BITMAP))
            .unwrap();
        let bit = |base: usize, p: u64| bits[base + (p / 8) as usize] >> (p % 8) & 1 != 0;
        let mut mapped = vec![false; pages as usize];
        for (slot, first, n) in self.leaves(v, va) {
            let r = *self.rec(slot)?;
            for p in first..first + n {
                mapped[p as usize] = true;
                for (base, m) in [(0, A), (b as usize, D)] {
                    let got = bit(base, p);
                    if r.must & m != 0 {
                        cov(if m == D {
                            Cov::QueryOwedD
                        } else {
                            Cov::QueryOwedA
                        });
                    }
                    if (r.must & m != 0 && !got) || (got && r.may & m == 0) {
                        return Err(format!(
                            "page {p} bit {m:#x}: {got}, {r:?} (slot {slot:#x})"
                        ));
                    }
                }
            }
        }
        for p in 0..pages {
            if !mapped[p as usize] && (bit(0, p) || bit(b as usize, p)) {
                return Err(format!("unmapped page {p} reported"));
            }
        }
        Ok(())
    }

    /// A relocation moved table `old` to `new`.
    fn rename(&mut self, old: u64, new: u64) {
        cov(Cov::Relocated);
        let mv = |f: &mut u64| {
            if *f == old {
                *f = new;
            }
        };
        self.roots.iter_mut().flatten().for_each(mv);
        self.l1s.iter_mut().for_each(mv);
        self.kern.iter_mut().for_each(mv);
        self.vroot.iter_mut().flatten().for_each(mv);
        if let Some(s) = self.spares.iter_mut().find(|s| **s == new) {
            *s = old;
        }
        if let Some(l) = self.pinned.remove(&old) {
            self.pinned.insert(new, l);
        }
        if let Some(l) = self.typed.remove(&old) {
            self.typed.insert(new, l);
        }
        if let Some(r) = self.recs.remove(&old) {
            self.recs.insert(new, r);
        }
        for t in self.tlb.iter_mut().flat_map(|t| t.values_mut()) {
            if t.slot >> 12 == old {
                t.slot = (new << 12) | (t.slot & 0xfff);
            }
        }
    }

    /// The copy a relocation wrote holds every bit still owed from the shadow (the shadow
    /// stays; bits a reclaim moved to the old PTE came along in the copy) and nothing more.
    fn relocated(&mut self, new: u64) -> Res {
        let (Some(&level), Some(recs)) = (self.typed.get(&new), self.recs.get(&new)) else {
            return Ok(());
        };
        for (i, e) in self.table(new).into_iter().enumerate() {
            let r = recs[i];
            if leaf_at(level, e) && (r.must & !e & AD != 0 || e & AD & !r.may != 0) {
                return Err(format!("relocated copy [{i}] = {e:#x}, {r:?}"));
            }
        }
        Ok(())
    }

    /// The page-table types implied by the pins and the guest tables.
    fn closure(&self) -> Result<HashMap<u64, u8>, String> {
        let mut typed = HashMap::new();
        let mut stack: Vec<(u64, u8)> = self.pinned.iter().map(|(&f, &l)| (f, l)).collect();
        while let Some((f, l)) = stack.pop() {
            match typed.insert(f, l) {
                Some(x) if x != l => return Err(format!("frame {f:#x} typed L{x} and L{l}")),
                Some(_) => continue,
                None => {}
            }
            if l == 1 {
                continue;
            }
            for e in self.table(f) {
                if e & P != 0 && !leaf_at(l, e) {
                    stack.push(((e & ADDR) >> 12, l - 1));
                }
            }
        }
        Ok(typed)
    }

    /// Types follow pins and references, exactly as the engine has them; a table that lost
    /// its type holds every A/D the CPU owed it; a new one starts owing nothing.
    fn retype(&mut self) -> Res {
        let now = self.closure()?;
        for pfn in 0..RAM_END >> 12 {
            let e = self.mmu.frame_type(pfn << 12);
            if e != now.get(&pfn).copied() {
                return Err(format!(
                    "frame {pfn:#x}: engine type {e:?}, model {:?}",
                    now.get(&pfn)
                ));
            }
        }
        let gone: Vec<u64> = self
            .typed
            .keys()
            .filter(|f| !now.contains_key(f))
            .copied()
            .collect();
        for f in gone {
            if let Some(recs) = self.recs.remove(&f) {
                let g = self.table(f);
                for (i, r) in recs.iter().enumerate() {
                    let ad = g[i] & AD;
                    if r.must & D != 0 {
                        cov(Cov::TeardownOwedD);
                    }
                    if r.must & !ad != 0 || (g[i] & P != 0 && ad & !r.may != 0) {
                        return Err(format!("table {f:#x} untyped: [{i}] = {:#x}, {r:?}", g[i]));
                    }
                }
            }
        }
        for (&f, &l) in &now {
            if l <= 2 && !self.recs.contains_key(&f) {
                let g = self.table(f);
                let recs = std::array::from_fn(|i| Rec {
                    must: 0,
                    may: g[i] & AD,
                    gone: 0,
                });
                self.recs.insert(f, Box::new(recs));
            }
        }
        self.typed = now;
        Ok(())
    }
}

fn run(vcpus: usize, pool: u64, steps: &[Step]) -> Result<(u64, u64), TestCaseError> {
    run_world(World::new(vcpus, pool), vcpus, steps).map(|(o, a, _)| (o, a))
}

/// A differential run ([`World::add_twin`]): returns (ops, accesses, fast-path updates).
fn run_twin(vcpus: usize, pool: u64, steps: &[Step]) -> Result<(u64, u64, u64), TestCaseError> {
    let mut w = World::new(vcpus, pool);
    w.add_twin(vcpus, pool);
    run_world(w, vcpus, steps)
}

/// A run on the kernel flush's host: returns (zaps that flushed, targets flushed by zaps).
fn run_kernel(
    vcpus: usize,
    pool: u64,
    steps: &[Step],
    mutant: KernelMutant,
) -> Result<(u64, u64), TestCaseError> {
    let mut w = World::new(vcpus, pool).kernel_host(mutant);
    drive(&mut w, steps)?;
    let k = w.kernel.unwrap_or_default();
    Ok((k.flushes, k.targets))
}

/// Boots `w` and runs `steps` on it; the error names the step that failed.
fn drive(w: &mut World, steps: &[Step]) -> Result<(), TestCaseError> {
    w.boot()
        .map_err(|e| TestCaseError::fail(format!("boot: {e}")))?;
    for (i, s) in steps.iter().enumerate() {
        w.step(s)
            .map_err(|e| TestCaseError::fail(format!("step {i}: {e}")))?;
    }
    Ok(())
}

fn run_world(mut w: World, vcpus: usize, steps: &[Step]) -> Result<(u64, u64, u64), TestCaseError> {
    drive(&mut w, steps)?;
    // A final sweep: every vCPU syncs both regions of its address space.
    for v in 0..vcpus {
        for kern in [false, true] {
            let sync = Op::Sync {
                kern,
                clear_a: false,
                clear_d: false,
            };
            w.batch(v, &[sync])
                .map_err(|e| TestCaseError::fail(format!("final sync: {e}")))?;
        }
    }
    Ok((w.ops, w.accesses, w.mmu.debug_fast_path_hits()))
}

/// A proptest runner of `cases` cases, persisting no failures; without `shrink` a failure
/// reports its case (with the last entries applied) as found.
fn runner(cases: u32, shrink: bool) -> proptest::test_runner::TestRunner {
    use proptest::test_runner::{Config, TestRunner};
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: if shrink {
            Config::default().max_shrink_iters
        } else {
            0
        },
        ..Config::default()
    })
}

/// The long runs' cases: 2 or 4 vCPUs, small to medium pools, 250-300 steps.
fn long_case() -> impl Strategy<Value = (usize, u64, Vec<Step>)> {
    (
        prop::sample::select(vec![2usize, 4]),
        prop::sample::select(vec![11u64, 16, 64]),
        prop::collection::vec(step_strategy(), 250..300),
    )
}

fn case() -> impl Strategy<Value = (usize, u64, Vec<Step>)> {
    (
        prop::sample::select(vec![2usize, 4]),
        prop::sample::select(vec![11u64, 16, 64]),
        prop::collection::vec(step_strategy(), 1..120),
    )
}

/// The default run (a few seconds in release): 48 cases of up to 120 steps, then every
/// cover item must have happened at least once.
#[test]
fn tlb_model_matches() {
    let mut runner = runner(48, true);
    runner
        .run(&case(), |(vcpus, pool, steps)| {
            run(vcpus, pool, &steps).map(|_| ())
        })
        .unwrap();
    eprintln!("coverage: {:?}", coverage());
    for (c, n) in coverage() {
        assert!(n > 0, "never exercised: {c:?} ({:?})", coverage());
    }
}

/// Runs `cases` cases of `strategy` on the kernel flush's host; returns (zaps that
/// flushed, targets flushed by zaps), summed.
fn kernel_runs(cases: u32, strategy: impl Strategy<Value = (usize, u64, Vec<Step>)>) -> (u64, u64) {
    let (flushes, targets) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
    runner(cases, cases < 100)
        .run(&strategy, |(vcpus, pool, steps)| {
            let (f, t) = run_kernel(vcpus, pool, &steps, KernelMutant::None)?;
            flushes.set(flushes.get() + f);
            targets.set(targets.get() + t);
            Ok(())
        })
        .unwrap();
    (flushes.get(), targets.get())
}

/// The kernel flush: remote flushes the engine leaves to a zap of the stale pool frames
/// (on a host whose nested page tables map a frame once the walker read through it, and
/// which flushes every vCPU when it unmaps a mapped one) leave no vCPU a translation more
/// permissive than the guest's tables; and the zaps did flush.
#[test]
fn kernel_flush_keeps_every_tlb_coherent() {
    let (flushes, targets) = kernel_runs(48, case());
    eprintln!("kernel flush: {flushes} zaps flushed, {targets} targets");
    assert!(flushes > 0 && targets > 0, "no kernel flush ran");
}

/// With the kernel flush, `DETACH` targets whose freed root translates as their kernel
/// root stay on it past the batch (lazy switches): every check of the model holds while
/// they do, and such switches happen.
#[test]
fn lazy_detach_switches_keep_every_tlb_coherent() {
    let lazy = || COV[Cov::LazySwitch as usize].load(std::sync::atomic::Ordering::Relaxed);
    let before = lazy();
    kernel_runs(128, long_case());
    assert!(lazy() > before, "no DETACH switch was left lazy");
}

/// The long kernel-flush run: 250 cases of 250-300 steps on 2 and 4 vCPUs
/// (`cargo test -p shadow --release --test tlb_model -- --ignored --nocapture`).
#[test]
#[ignore]
fn kernel_flush_long() {
    let (flushes, targets) = kernel_runs(250, long_case());
    eprintln!("kernel flush, long: {flushes} zaps flushed, {targets} targets");
    assert!(flushes > 0, "no kernel flush ran");
}

/// Each part of the kernel flush switched off: the model must find a vCPU left with a
/// stale translation. (The mark of a dropped shadow at its free, the third part, is
/// covered by the parent entry's mark in every case these runs make; the engine's
/// `a_dropped_shadow_the_cpu_used_is_stale_at_once` checks it directly.)
#[test]
fn a_kernel_flush_missing_a_part_is_caught() {
    for mutant in [KernelMutant::SkipZap, KernelMutant::GuestFlushFramed] {
        let mut runner = runner(64, false);
        let r = runner.run(&long_case(), |(vcpus, pool, steps)| {
            run_kernel(vcpus, pool, &steps, mutant).map(|_| ())
        });
        let e = r.expect_err(&format!("the model missed {mutant:?}"));
        eprintln!(
            "{mutant:?} caught: {}",
            e.to_string().lines().next().unwrap_or("")
        );
    }
}

/// Differential run: the engine with its straight-line `PT_UPDATE` path and a twin with
/// only the general path, fed the same entries, CPU accesses and guest stores, agree on every
/// entry's result and the counters after each entry, and on guest memory, pool memory,
/// counters, batch outcomes, deliveries, roots and pending flushes after every batch.
#[test]
fn fast_path_matches_general_path() {
    let hits = std::cell::Cell::new(0u64);
    let mut runner = runner(48, true);
    runner
        .run(&case(), |(vcpus, pool, steps)| {
            let (_, _, h) = run_twin(vcpus, pool, &steps)?;
            hits.set(hits.get() + h);
            Ok(())
        })
        .unwrap();
    eprintln!("fast path updates: {}", hits.get());
    assert!(hits.get() > 0, "the fast path never ran");
}

/// The long differential run: at least 100,000 engine ops (memory is compared after
/// every batch, so it is slower per op than the model run)
/// (`cargo test -p shadow --release --test tlb_model -- --ignored --nocapture`).
#[test]
#[ignore]
fn fast_path_matches_general_path_long() {
    let (ops, hits) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
    let mut runner = runner(250, false);
    let long = long_case();
    runner
        .run(&long, |(vcpus, pool, steps)| {
            let (o, _, h) = run_twin(vcpus, pool, &steps)?;
            ops.set(ops.get() + o);
            hits.set(hits.get() + h);
            Ok(())
        })
        .unwrap();
    eprintln!(
        "differential: {} engine ops, {} fast-path updates",
        ops.get(),
        hits.get()
    );
    assert!(ops.get() >= 100_000, "only {} ops", ops.get());
    assert!(hits.get() > 0, "the fast path never ran");
}

/// The long run: at least 1,000,000 engine ops with TLBs on 2 and 4 vCPUs
/// (`cargo test -p shadow --release --test tlb_model -- --ignored --nocapture`).
#[test]
#[ignore]
fn tlb_model_1m_ops() {
    let start = std::time::Instant::now();
    let (ops, acc) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
    let mut runner = runner(2700, false);
    let long = long_case();
    runner
        .run(&long, |(vcpus, pool, steps)| {
            let (o, a) = run(vcpus, pool, &steps)?;
            ops.set(ops.get() + o);
            acc.set(acc.get() + a);
            Ok(())
        })
        .unwrap();
    let n = ops.get();
    eprintln!(
        "tlb model: {n} engine ops, {} CPU accesses in {:?}",
        acc.get(),
        start.elapsed()
    );
    eprintln!("coverage: {:?}", coverage());
    assert!(n >= 1_000_000, "only {n} ops");
}

#[test]
fn the_model_sees_writes_and_flushes() {
    // A fixed scenario: a write through vCPU 1, a clearing sync, another write: the second
    // write must re-walk (the clear flushed) and set D again.
    let mut w = World::new(2, 64);
    w.boot().unwrap();
    let write = |w: &mut World, vcpu| {
        w.access(&Access {
            vcpu,
            va: 1,
            write: true,
            user: true,
        })
        .unwrap()
    };
    write(&mut w, 1);
    assert_eq!(w.tlb[1].len(), 1);
    w.batch(
        1,
        &[Op::Sync {
            kern: false,
            clear_a: true,
            clear_d: true,
        }],
    )
    .unwrap();
    assert!(w.tlb[1].is_empty(), "the clear flushed");
    write(&mut w, 1);
    w.batch(
        1,
        &[Op::Sync {
            kern: false,
            clear_a: false,
            clear_d: false,
        }],
    )
    .unwrap();
    let slot = w.tlb[1].values().next().unwrap().slot;
    assert_eq!(w.rd(slot) & AD, AD);
    assert!(w.writes.values().sum::<u64>() >= 2);
}

/// Two vCPUs on one address space: vCPU 1 writes a page (its TLB caches D=1), vCPU 0
/// harvests with CLEAR_D. The batch names vCPU 1; once its flush is applied, vCPU 1's next
/// write walks again and sets D, so the second harvest sees it. With remote delivery
/// dropped, the write goes through the cached D=1 translation and the model reports the
/// lost dirty bit.
fn clear_d_while_another_vcpu_writes(drop_remote: bool) -> Res {
    let mut w = World::new(2, 64);
    w.boot()?;
    w.batch(1, &[Op::Baseptr(0)])?;
    let write = |w: &mut World| {
        w.access(&Access {
            vcpu: 1,
            va: 1,
            write: true,
            user: true,
        })
    };
    let harvest = Op::Sync {
        kern: false,
        clear_a: false,
        clear_d: true,
    };
    write(&mut w)?;
    w.drop_remote = drop_remote;
    w.batch(0, std::slice::from_ref(&harvest))?;
    if !drop_remote && !w.tlb[1].is_empty() {
        return Err("vCPU 1 kept its translation".into());
    }
    write(&mut w)?;
    w.batch(
        0,
        &[Op::Sync {
            kern: false,
            clear_a: false,
            clear_d: false,
        }],
    )
}

#[test]
fn a_clear_d_on_a_shared_root_reaches_the_vcpu_that_writes() {
    clear_d_while_another_vcpu_writes(false).unwrap();
    let e = clear_d_while_another_vcpu_writes(true).unwrap_err();
    assert!(e.contains("lost A/D"), "{e}");
}

/// Unmapping pages nobody touched names no vCPU (no kick), on 4 vCPUs sharing the root;
/// unmapping a page vCPU 2 used names vCPU 2 and every other vCPU with the root loaded.
#[test]
fn never_accessed_unmaps_name_no_vcpu() {
    let mut w = World::new(4, 64);
    w.boot().unwrap();
    for v in 1..4 {
        w.batch(v, &[Op::Baseptr(0)]).unwrap();
    }
    let unmap = |idx| Op::Leaf {
        kern: false,
        root: 0,
        l2i: 0,
        idx,
        target: 0,
        flags: 0,
        preserve: true,
    };
    for idx in 2..4 {
        w.batch(0, &[unmap(idx)]).unwrap();
    }
    assert_eq!(
        w.mmu.counters().flushed(shadow::FlushReason::LeafRemoved),
        0
    );
    w.access(&Access {
        vcpu: 2,
        va: 1,
        write: false,
        user: true,
    })
    .unwrap();
    let out = {
        let e = w.entry(0, &unmap(1)).unwrap();
        w.exec(0, &e).unwrap().unwrap();
        w.mmu.end_batch(0)
    };
    assert_eq!(
        out.remote,
        shadow::VcpuSet(0b1110),
        "every vCPU with the root"
    );
    for v in out.remote.iter() {
        w.mmu.take_delivery(v);
    }
}

/// Runs `cases` cases on a leaf-zap host (with the fast path's twin); returns (frames
/// zapped, cached leaves they dropped), summed.
fn leaf_zap_runs(
    cases: u32,
    strategy: impl Strategy<Value = (usize, u64, Vec<Step>)>,
) -> (u64, u64, u64) {
    let (frames, dropped) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
    let flushed = std::cell::Cell::new(0u64);
    runner(cases, cases < 100)
        .run(&strategy, |(vcpus, pool, steps)| {
            let mut w = World::new(vcpus, pool);
            w.add_twin(vcpus, pool);
            let mut w = w.leaf_zap_host(false);
            drive(&mut w, &steps)?;
            let h = w.leaf_zap.unwrap_or_default();
            frames.set(frames.get() + h.frames);
            dropped.set(dropped.get() + h.dropped);
            flushed.set(flushed.get() + h.flushed);
            Ok(())
        })
        .unwrap();
    (frames.get(), dropped.get(), flushed.get())
}

/// Leaf zaps: with the old targets of changed leaves zapped instead of their chunks
/// resynced, the host's cache never keeps a translation the engine reduced, and every
/// TLB stays coherent; the zaps did drop cached leaves.
#[test]
fn leaf_zaps_keep_the_host_cache_coherent() {
    let (frames, dropped, flushed) = leaf_zap_runs(48, case());
    eprintln!(
        "leaf zaps: {frames} frames zapped, {dropped} cached leaves dropped, {flushed} remote flushes done"
    );
    assert!(frames > 0 && dropped > 0, "no leaf zap ran");
    assert!(flushed > 0, "no remote flush was left to a leaf zap");
}

/// The long leaf-zap run (`cargo test -p shadow --release --test tlb_model -- --ignored`).
#[test]
#[ignore]
fn leaf_zap_long() {
    let (frames, dropped, flushed) = leaf_zap_runs(250, long_case());
    eprintln!(
        "leaf zaps, long: {frames} frames zapped, {dropped} cached leaves dropped, {flushed} remote flushes done"
    );
    assert!(dropped > 0, "no leaf zap ran");
}

/// Leaf zaps listed but not made: the host cache keeps a reduced leaf, and the model
/// says so.
#[test]
fn a_skipped_leaf_zap_is_caught() {
    let mut runner = runner(64, false);
    let r = runner.run(&long_case(), |(vcpus, pool, steps)| {
        let mut w = World::new(vcpus, pool).leaf_zap_host(true);
        drive(&mut w, &steps)
    });
    let e = r.expect_err("the model missed a skipped leaf zap");
    assert!(e.to_string().contains("host cache"), "{e}");
}

/// Leaf zaps that also take remote flushes no zap covered (a guest flush, a changed
/// non-leaf entry): some vCPU keeps a stale translation, and the model says so.
#[test]
fn a_leaf_zap_taking_an_uncovered_flush_is_caught() {
    let mut runner = runner(64, false);
    let r = runner.run(&long_case(), |(vcpus, pool, steps)| {
        let mut w = World::new(vcpus, pool).leaf_zap_host(false);
        w.mmu.set_debug_zap_covers_all(true);
        drive(&mut w, &steps)
    });
    let e = r.expect_err("the model missed remote flushes taken by a zap that covered none");
    eprintln!("caught: {}", e.to_string().lines().next().unwrap_or(""));
}

/// The host resync's targeting switched off (no chunk is ever marked stale): the model's
/// host cache keeps a translation the engine reduced, and the model says so.
#[test]
fn unmarked_resync_chunks_are_caught() {
    use proptest::test_runner::TestError;
    let mut runner = runner(64, true);
    let r = runner.run(&case(), |(vcpus, pool, steps)| {
        let mut w = World::new(vcpus, pool);
        w.mmu.set_debug_skip_resync_marks(true);
        run_world(w, vcpus, &steps).map(|_| ())
    });
    match r {
        Err(TestError::Fail(why, _)) => assert!(why.message().contains("host cache"), "{why}"),
        other => panic!("the model did not catch unmarked chunks: {other:?}"),
    }
}

/// Targets of a `DETACH` run kernel code on their old root until their switch arrives:
/// with the engine keeping a detached root's kernel half, every such walk finds it.
#[test]
fn detached_roots_keep_the_kernel_until_the_switch() {
    let before = COV[Cov::KernelBeforeSwitch as usize].load(std::sync::atomic::Ordering::Relaxed);
    let mut runner = runner(64, false);
    let r = runner.run(&long_case(), |(vcpus, pool, steps)| {
        let mut w = World::new(vcpus, pool);
        drive(&mut w, &steps)
    });
    r.expect("a target lost the kernel before its root switch");
    let after = COV[Cov::KernelBeforeSwitch as usize].load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        after > before,
        "no target ran on its old root before a switch"
    );
}

/// A detached root's shadow cleared and reusable while a vCPU still runs on it: that vCPU
/// loses the kernel before its root switch arrives, and the model says so.
#[test]
fn a_detached_root_cleared_under_a_running_vcpu_is_caught() {
    let mut runner = runner(64, false);
    let r = runner.run(&long_case(), |(vcpus, pool, steps)| {
        let mut w = World::new(vcpus, pool);
        w.mmu.set_debug_clear_detached(true);
        drive(&mut w, &steps)
    });
    let e = r.expect_err("the model missed a detached root cleared under its vCPU");
    assert!(e.to_string().contains("before its root switch"), "{e}");
}
