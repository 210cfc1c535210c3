//! Property test: random sequences of valid and hostile ops against a reference model of
#![allow(clippy::single_range_in_vec_init)]
//! what every VA translates to and which A/D bits the guest must see after a sync, with a
//! simulated CPU setting A/D bits in the shadow leaves.

use hypercall::{HcError, MmuOp};
use proptest::prelude::*;
use shadow::pte::{A, AD, ADDR, D, NX, P, PS, RW, US};
use shadow::{Layout, ShadowMmu};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const POOL: u64 = 0x100_0000;
const L4: u64 = 0x10_000;
const L3: u64 = 0x11_000;
const L2: u64 = 0x12_000;
/// Spare frames for L1 tables (two are in use at a time) and pins.
const SPARES: [u64; 6] = [0x13, 0x14, 0x15, 0x16, 0x17, 0x18];
const SLOTS: usize = 8;
const T: u64 = P | RW | US | A | D;

/// Leaf targets: data frames, table frames, and illegal ones.
const TARGETS: [u64; 10] = [
    0x100, 0x101, 0x102, 0x103, 0x13, 0x15, 0x10, 0x1000, 0x9f, 0x900,
];

#[derive(Clone, Debug)]
enum Op {
    SetLeaf {
        l1: usize,
        idx: usize,
        target: usize,
        flags: u64,
        preserve: bool,
    },
    Set2m {
        on: bool,
        rw: bool,
        preserve: bool,
    },
    Cpu {
        slot: usize,
        write: bool,
    },
    Sync {
        clear_a: bool,
        clear_d: bool,
    },
    PinSpare {
        i: usize,
    },
    UnpinSpare {
        i: usize,
    },
    Relocate {
        l1: usize,
        to: usize,
    },
    Hostile {
        ptr: u64,
        val: u64,
    },
    Query,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let flags = prop_oneof![
        4 => prop::sample::select(vec![P, P | RW, P | US, P | RW | US, P | NX, P | RW | NX, 0, P | RW | A | D]),
        1 => Just(P | (1 << 60)),
    ];
    prop_oneof![
        6 => (0..2usize, 0..SLOTS, 0..TARGETS.len(), flags, any::<bool>())
            .prop_map(|(l1, idx, target, flags, preserve)| Op::SetLeaf { l1, idx, target, flags, preserve }),
        1 => (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(on, rw, preserve)| Op::Set2m { on, rw, preserve }),
        6 => (0..(2 * SLOTS + 4), any::<bool>()).prop_map(|(slot, write)| Op::Cpu { slot, write }),
        2 => (any::<bool>(), any::<bool>()).prop_map(|(clear_a, clear_d)| Op::Sync { clear_a, clear_d }),
        1 => (0..SPARES.len()).prop_map(|i| Op::PinSpare { i }),
        1 => (0..SPARES.len()).prop_map(|i| Op::UnpinSpare { i }),
        1 => (0..2usize, 0..SPARES.len()).prop_map(|(l1, to)| Op::Relocate { l1, to }),
        1 => (prop::sample::select(vec![L4, L3, L2, 0x13_000, 0x14_000, POOL, 0x50_000]), 0..512u64, any::<u64>())
            .prop_map(|(f, i, val)| Op::Hostile { ptr: f + 8 * i, val }),
        1 => Just(Op::Query),
    ]
}

/// One guest leaf as the model sees it.
#[derive(Clone, Copy, Debug, Default)]
struct Leaf {
    /// Guest value without A/D.
    val: u64,
    /// A/D in the guest PTE.
    g: u64,
    /// A/D recorded by the CPU in the shadow and not yet handed back.
    sh: u64,
}

struct Model {
    l1: [u64; 2],
    leaves: [[Leaf; SLOTS]; 2],
    big: Leaf,
    pinned: Vec<u64>,
}

struct World {
    mem: GuestMemoryMmap,
    mmu: ShadowMmu,
    m: Model,
    ops: u64,
}

fn va_of(l1: usize, idx: usize) -> u64 {
    ((l1 as u64) << 21) + ((idx as u64) << 12)
}
const VA2M: u64 = 2 << 21;

impl World {
    fn new() -> World {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x80_0000),
            (GuestAddress(POOL), 64 * 4096),
        ])
        .unwrap();
        let layout = Layout {
            ram: vec![0..0x80_0000],
            reserved: vec![0x9_f000..0xa_0000],
            pool_base: POOL,
            pool_frames: 64,
        };
        let mut w = World {
            mem,
            mmu: ShadowMmu::new(layout, 1).unwrap(),
            m: Model {
                l1: [0x13, 0x14],
                leaves: Default::default(),
                big: Leaf::default(),
                pinned: vec![],
            },
            ops: 0,
        };
        w.wr(L4, L3 | T);
        w.wr(L3, L2 | T);
        w.wr(L2, 0x13_000 | T);
        w.wr(L2 + 8, 0x14_000 | T);
        w.apply(MmuOp::Pin {
            level: 4,
            frame: L4,
        })
        .unwrap();
        w.apply(MmuOp::NewBaseptr { frame: L4 }).unwrap();
        w
    }
    fn wr(&self, gpa: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(gpa)).unwrap()
    }
    fn rd(&self, gpa: u64) -> u64 {
        self.mem.read_obj(GuestAddress(gpa)).unwrap()
    }
    fn apply(&mut self, op: MmuOp) -> Result<(), HcError> {
        self.ops += 1;
        let r = self.mmu.apply(&self.mem, 0, &op);
        self.mmu.end_batch(0);
        r
    }
    fn typed(&self, pfn: u64) -> bool {
        self.mmu.frame_type(pfn << 12).is_some()
    }
    fn legal(pfn: u64) -> bool {
        (0x0..0x800).contains(&pfn) && pfn != 0x9f
    }

    /// Model effect of replacing leaf `old` by guest value `val` (A/D included in `val`).
    fn replace(
        old: Leaf,
        val: u64,
        preserve: bool,
        upgrade_ok: bool,
        typed_old: bool,
        typed_new: bool,
    ) -> Leaf {
        let nv = val & !AD;
        let same_all = old.val & P != 0 && nv & P != 0 && old.val == nv;
        if same_all {
            let g = (val & AD) | if preserve { old.g } else { 0 };
            return Leaf {
                val: nv,
                g,
                sh: old.sh,
            };
        }
        let same_frame = old.val & P != 0 && nv & P != 0 && old.val & ADDR == nv & ADDR;
        let eff = |v: u64, typed: bool| if typed { v & !RW } else { v };
        let (o, n) = (eff(old.val, typed_old), eff(nv, typed_new));
        let upgrade = upgrade_ok
            && same_frame
            && (o & !(RW | US | NX)) == (n & !(RW | US | NX))
            && (o & RW == 0 || n & RW != 0)
            && (o & US == 0 || n & US != 0)
            && (n & NX == 0 || o & NX != 0);
        if upgrade {
            let g = (val & AD) | if preserve { old.g } else { 0 };
            return Leaf {
                val: nv,
                g,
                sh: old.sh,
            };
        }
        let g = if preserve {
            (val & AD) | old.g | old.sh
        } else if same_frame {
            (val & AD) | old.sh
        } else {
            val & AD
        };
        Leaf { val: nv, g, sh: 0 }
    }

    fn step(&mut self, op: &Op) -> Result<(), String> {
        match *op {
            Op::SetLeaf {
                l1,
                idx,
                target,
                flags,
                preserve,
            } => {
                let pfn = TARGETS[target];
                let val = (pfn << 12) | flags;
                let ptr = (self.m.l1[l1] << 12) + 8 * idx as u64;
                let r = self.apply(MmuOp::PtUpdate {
                    ptr,
                    val,
                    preserve_ad: preserve,
                });
                let want = if flags & P == 0 {
                    Ok(())
                } else if flags & (1 << 60) != 0 {
                    Err(HcError::Einval)
                } else if !Self::legal(pfn) || pfn == 0x1000 {
                    Err(HcError::Eperm)
                } else {
                    Ok(())
                };
                if r != want {
                    return Err(format!("{op:?}: got {r:?}, want {want:?}"));
                }
                if r.is_ok() {
                    let old = self.m.leaves[l1][idx];
                    let to = |v: u64| self.typed(v >> 12 & 0xfff_ffff);
                    let nl =
                        Self::replace(old, val, preserve, true, to(old.val & ADDR), to(val & ADDR));
                    self.m.leaves[l1][idx] = nl;
                }
            }
            Op::Set2m { on, rw, preserve } => {
                let val = if on {
                    0x20_0000 | P | PS | if rw { RW } else { 0 }
                } else {
                    0
                };
                self.apply(MmuOp::PtUpdate {
                    ptr: L2 + 16,
                    val,
                    preserve_ad: preserve,
                })
                .map_err(|e| format!("{op:?}: {e}"))?;
                self.m.big = Self::replace(self.m.big, val, preserve, false, false, false);
            }
            Op::Cpu { slot, write } => {
                let va = if slot >= 2 * SLOTS {
                    VA2M + ((slot - 2 * SLOTS) as u64) * 0x3_1000
                } else {
                    va_of(slot / SLOTS, slot % SLOTS)
                };
                if let Some(l) = self.mmu.debug_translate(&self.mem, 0, va) {
                    let bits = A | if write && l.writable { D } else { 0 };
                    self.wr(l.slot_gpa, l.value | bits);
                    let leaf = if slot >= 2 * SLOTS {
                        &mut self.m.big
                    } else {
                        &mut self.m.leaves[slot / SLOTS][slot % SLOTS]
                    };
                    leaf.sh |= bits;
                }
            }
            Op::Sync { clear_a, clear_d } => {
                self.apply(MmuOp::SyncAd {
                    va: 0,
                    pages: 3 * 512,
                    clear_a,
                    clear_d,
                })
                .map_err(|e| format!("{op:?}: {e}"))?;
                let clear = if clear_a { A } else { 0 } | if clear_d { D } else { 0 };
                for l1 in 0..2 {
                    for idx in 0..SLOTS {
                        let got = self.rd((self.m.l1[l1] << 12) + 8 * idx as u64) & AD;
                        let leaf = &mut self.m.leaves[l1][idx];
                        if leaf.val & P != 0 {
                            leaf.g = (leaf.g | leaf.sh) & !clear;
                            leaf.sh &= !clear;
                            if got != leaf.g {
                                return Err(format!(
                                    "A/D of l1 {l1} [{idx}]: guest {got:#x}, model {:#x}",
                                    leaf.g
                                ));
                            }
                        }
                    }
                }
                let got = self.rd(L2 + 16) & AD;
                let big = &mut self.m.big;
                if big.val & P != 0 {
                    big.g = (big.g | big.sh) & !clear;
                    big.sh &= !clear;
                    if got != big.g {
                        return Err(format!(
                            "A/D of 2M leaf: guest {got:#x}, model {:#x}",
                            big.g
                        ));
                    }
                }
            }
            Op::PinSpare { i } => {
                let f = SPARES[i];
                if self.m.l1.contains(&f) || self.m.pinned.contains(&f) {
                    let r = self.apply(MmuOp::Pin {
                        level: 1,
                        frame: f << 12,
                    });
                    let want = if self.m.pinned.contains(&f) {
                        Err(HcError::Eexist)
                    } else {
                        Ok(())
                    };
                    if r != want {
                        return Err(format!("{op:?}: {r:?} want {want:?}"));
                    }
                    if r.is_ok() {
                        self.m.pinned.push(f);
                    }
                } else {
                    self.apply(MmuOp::ZeroFrame { frame: f << 12 })
                        .map_err(|e| format!("zero: {e}"))?;
                    self.apply(MmuOp::Pin {
                        level: 1,
                        frame: f << 12,
                    })
                    .map_err(|e| format!("{op:?}: {e}"))?;
                    self.m.pinned.push(f);
                }
            }
            Op::UnpinSpare { i } => {
                let f = SPARES[i];
                let r = self.apply(MmuOp::Unpin {
                    frame: f << 12,
                    detach: false,
                });
                let want = if !self.m.pinned.contains(&f) {
                    Err(HcError::Enoent)
                } else if self.m.l1.contains(&f) {
                    Err(HcError::Ebusy)
                } else {
                    Ok(())
                };
                if r != want {
                    return Err(format!("{op:?}: {r:?} want {want:?}"));
                }
                if r.is_ok() {
                    self.m.pinned.retain(|&p| p != f);
                }
            }
            Op::Relocate { l1, to } => {
                let (old, new) = (self.m.l1[l1], SPARES[to]);
                let want = if old == new {
                    Err(HcError::Einval)
                } else if self.typed(new) {
                    Err(HcError::Eexist)
                } else {
                    Ok(())
                };
                let r = self.apply(MmuOp::RelocateTable {
                    old: old << 12,
                    new: new << 12,
                });
                if old == new {
                    return Ok(());
                }
                if r != want {
                    return Err(format!("{op:?}: {r:?} want {want:?}"));
                }
                if r.is_ok() {
                    self.m.l1[l1] = new;
                    for leaf in self.m.leaves[l1].iter_mut() {
                        if leaf.val & P != 0 {
                            leaf.g |= leaf.sh;
                        }
                    }
                    if let Some(p) = self.m.pinned.iter_mut().find(|p| **p == old) {
                        *p = new;
                    }
                }
            }
            Op::Hostile { ptr, val } => {
                // Anything may be refused; nothing may break. Accepted writes into the
                // modelled slots desynchronise the model, so only unmodelled slots are used.
                let modelled =
                    [L4, L3, L2, self.m.l1[0] << 12, self.m.l1[1] << 12].contains(&(ptr & !0xfff));
                if !modelled {
                    let _ = self.apply(MmuOp::PtUpdate {
                        ptr,
                        val,
                        preserve_ad: false,
                    });
                } else {
                    let idx = (ptr & 0xfff) / 8;
                    let skip = (ptr & !0xfff == L2 && idx < 3)
                        || idx < SLOTS as u64
                        || ptr & !0xfff == L4
                        || ptr & !0xfff == L3;
                    if !skip {
                        let _ = self.apply(MmuOp::PtUpdate {
                            ptr,
                            val,
                            preserve_ad: false,
                        });
                    }
                }
            }
            Op::Query => {
                self.apply(MmuOp::QueryAd {
                    va: 0,
                    pages: 64,
                    bitmap_gpa: 0x60_000,
                })
                .map_err(|e| format!("{op:?}: {e}"))?;
                let a = self.rd(0x60_000);
                for l1 in 0..2 {
                    for idx in 0..SLOTS {
                        let leaf = self.m.leaves[l1][idx];
                        let bit = if l1 == 0 {
                            (a >> (va_of(l1, idx) >> 12)) & 1
                        } else {
                            0
                        };
                        if l1 == 0
                            && leaf.val & P != 0
                            && bit != u64::from((leaf.g | leaf.sh) & A != 0)
                        {
                            return Err(format!("query bit {idx}: {bit}, model {leaf:?}"));
                        }
                    }
                }
            }
        }
        self.check()
    }

    fn check(&self) -> Result<(), String> {
        self.mmu.check_invariants(&self.mem)?;
        for l1 in 0..2 {
            for idx in 0..SLOTS {
                let leaf = self.m.leaves[l1][idx];
                let got = self.mmu.debug_translate(&self.mem, 0, va_of(l1, idx));
                match (leaf.val & P != 0, got) {
                    (false, None) => {}
                    (true, Some(s)) => {
                        let pfn = (leaf.val & ADDR) >> 12;
                        let w = leaf.val & RW != 0 && !self.typed(pfn);
                        if s.value & ADDR != leaf.val & ADDR
                            || s.writable != w
                            || s.user != (leaf.val & US != 0)
                        {
                            return Err(format!(
                                "va {:#x}: shadow {s:?}, model {leaf:?}",
                                va_of(l1, idx)
                            ));
                        }
                        if Self::legal(pfn).then_some(()).is_none() {
                            return Err("shadow maps non-RAM".into());
                        }
                    }
                    (p, g) => {
                        return Err(format!(
                            "va {:#x}: model present {p}, shadow {g:?}",
                            va_of(l1, idx)
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}

fn run(ops: &[Op]) -> Result<u64, TestCaseError> {
    let mut w = World::new();
    for op in ops {
        w.step(op).map_err(TestCaseError::fail)?;
    }
    Ok(w.ops)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn model_matches(ops in prop::collection::vec(op_strategy(), 1..120)) {
        run(&ops)?;
    }
}

/// The long run: at least 1,000,000 ops (`cargo test -p shadow --release -- --ignored`).
#[test]
#[ignore]
fn model_matches_1m_ops() {
    use proptest::test_runner::{Config, TestRunner};
    let start = std::time::Instant::now();
    let total = std::cell::Cell::new(0u64);
    let mut runner = TestRunner::new(Config {
        cases: 3300,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&prop::collection::vec(op_strategy(), 400..500), |ops| {
            total.set(total.get() + run(&ops)?);
            Ok(())
        })
        .unwrap();
    let n = total.get();
    eprintln!("model: {n} engine ops in {:?}", start.elapsed());
    assert!(n >= 1_000_000, "only {n} ops");
}
