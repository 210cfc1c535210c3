//! The kselftest-style runner: TAP 13 on COM1, one ring-3 program per test (hostile runs
//! in the kernel), per-test diagnostics from the guest-side MMU counters.

use crate::arch;
use crate::mem;
use crate::mmu::{mmu, Counters, Mode};
use crate::proc;
use crate::serial::Console;
use crate::vm;
use core::fmt::Write;
use hypercall::{op, HcError, MmuEntry};

macro_rules! prog {
    ($n:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/user/", $n))
    };
}

struct Test {
    name: &'static str,
    elf: &'static [u8],
    pv_only: bool,
}

const TESTS: &[Test] = &[
    Test {
        name: "populate",
        elf: prog!("populate"),
        pv_only: false,
    },
    Test {
        name: "zap",
        elf: prog!("zap"),
        pv_only: false,
    },
    Test {
        name: "mprotect",
        elf: prog!("mprotect"),
        pv_only: false,
    },
    Test {
        name: "mremap",
        elf: prog!("mremap"),
        pv_only: false,
    },
    Test {
        name: "fork_cow",
        elf: prog!("fork_cow"),
        pv_only: false,
    },
    Test {
        name: "exit_teardown",
        elf: prog!("exit_teardown"),
        pv_only: false,
    },
    Test {
        name: "ad_young",
        elf: prog!("ad_young"),
        pv_only: false,
    },
    Test {
        name: "ad_dirty",
        elf: prog!("ad_dirty"),
        pv_only: false,
    },
    Test {
        name: "relocate",
        elf: prog!("relocate"),
        pv_only: false,
    },
    Test {
        name: "flush_avoid",
        elf: prog!("flush_avoid"),
        pv_only: false,
    },
    Test {
        name: "hostile",
        elf: &[],
        pv_only: true,
    },
];

fn selected(list: &str, name: &str) -> bool {
    list == "all" || list.split(',').any(|t| t == name)
}

/// Runs a user program to completion; returns its wait status (None: could not start).
fn run_prog(elf: &[u8], pages: u64, seed: u64) -> Option<u64> {
    let slot = proc::spawn(elf, [pages, seed, mmu().mode as u64])?;
    proc::run(slot);
    // SAFETY: single CPU.
    unsafe { proc::RUNNER_STATUS }
}

fn diag_counters(name: &str, a: &Counters, b: &Counters, cycles: u64) {
    let hc = b.hypercalls - a.hypercalls;
    let en = b.entries - a.entries;
    let _ = writeln!(
        Console,
        "# {name}: pte_updates={} mmu_hypercalls={} entries={} entries_per_hypercall={}.{:02} tlb_flushes={} zero_cpu={} zero_vmm={} faults={} switches={} cycles={}",
        b.pte_updates - a.pte_updates,
        hc,
        en,
        if hc > 0 { en / hc } else { 0 },
        if hc > 0 { (en * 100 / hc) % 100 } else { 0 },
        b.flushes - a.flushes,
        b.zero_cpu - a.zero_cpu,
        b.zero_vmm - a.zero_vmm,
        b.faults - a.faults,
        b.switches - a.switches,
        cycles
    );
}

/// Runs the selected tests; returns the number of failures.
pub fn run(list: &str, pages: u64, seed: u64) -> u32 {
    let n = TESTS.iter().filter(|t| selected(list, t.name)).count();
    let _ = writeln!(Console, "TAP version 13\n1..{n}");
    let mut failures = 0;
    let mut k = 0;
    for t in TESTS.iter().filter(|t| selected(list, t.name)) {
        k += 1;
        let m = mmu();
        if t.pv_only && m.mode == Mode::Native {
            let _ = writeln!(
                Console,
                "ok {k} {} # SKIP needs a PV MMU mode (mmu=pv or mmu=pv-lazy)",
                t.name
            );
            continue;
        }
        let free0 = mem::free_count();
        let c0 = m.c;
        let t0 = arch::rdtsc();
        let result: Result<(), &'static str> = if t.name == "hostile" {
            hostile(pages, seed)
        } else {
            match run_prog(t.elf, pages, seed) {
                None => Err("could not start the program"),
                Some(0) => Ok(()),
                Some(s) if s & 0x7f != 0 => Err("killed by a signal"),
                Some(_) => Err("exited non-zero"),
            }
        };
        let t1 = arch::rdtsc();
        let c1 = mmu().c;
        diag_counters(t.name, &c0, &c1, t1 - t0);
        let free1 = mem::free_count();
        let result = if result.is_ok() && free1 != free0 {
            let _ = writeln!(
                Console,
                "# {}: free frames {} before, {} after",
                t.name, free0, free1
            );
            Err("frames leaked")
        } else {
            result
        };
        match result {
            Ok(()) => {
                let _ = writeln!(Console, "ok {k} {}", t.name);
            }
            Err(why) => {
                failures += 1;
                // SAFETY: single CPU.
                let st = unsafe { proc::RUNNER_STATUS };
                let _ = writeln!(
                    Console,
                    "not ok {k} {} # {why} (status {:#x})",
                    t.name,
                    st.unwrap_or(0)
                );
            }
        }
    }
    let _ = writeln!(Console, "# {} failed of {n}", failures);
    failures
}

// ----- hostile: every refusal the shadow engine documents, from the kernel -----

#[repr(C, align(4096))]
struct Scratch([MmuEntry; 1025]);
static mut SCRATCH: Scratch = Scratch(
    [MmuEntry {
        kind: 0,
        flags: 0,
        reserved: 0,
        a0: 0,
        a1: 0,
        a2: 0,
    }; 1025],
);

fn scratch_gpa() -> u64 {
    // SAFETY: address of a static.
    (unsafe { core::ptr::addr_of!(SCRATCH) }) as u64 - crate::KERNEL_VMA
}

/// Sends `entries` as one batch; returns its status.
fn send(entries: &[MmuEntry]) -> i64 {
    // SAFETY: single CPU; the scratch batch is ours.
    unsafe {
        for (i, e) in entries.iter().enumerate() {
            SCRATCH.0[i] = *e;
        }
    }
    mmu().batch_raw(scratch_gpa(), entries.len() as u64).0
}

/// Prints one hostile-test line; true if `got` is the documented error `want`.
fn report(what: &str, got: i64, want: i64) -> bool {
    let mark = if got == want { "ok" } else { "MISMATCH" };
    let _ = writeln!(
        Console,
        "# hostile: {what}: {} (expected {}) {mark}",
        ename(got),
        ename(want)
    );
    got == want
}

fn ename(s: i64) -> &'static str {
    if s == 0 {
        "OK"
    } else {
        HcError::from_status(s).map_or("?", |e| e.name())
    }
}

/// Writes through `va` at CPL0 and reports whether it faulted.
fn probe_write(va: u64) -> bool {
    // SAFETY: the page-fault handler resumes at the label when the store faults.
    unsafe {
        proc::PROBE_FAULTED = false;
        core::arch::asm!(
            "lea {t}, [rip + 2f]",
            "mov [rip + {rec}], {t}",
            "mov qword ptr [{va}], 0",
            "2:",
            "mov qword ptr [rip + {rec}], 0",
            t = out(reg) _,
            va = in(reg) va,
            rec = sym proc::PROBE_RECOVER,
        );
        proc::PROBE_FAULTED
    }
}

fn hostile(pages: u64, seed: u64) -> Result<(), &'static str> {
    let m = mmu();
    m.flush();
    // SAFETY: boot constants.
    let (kl4, ram_end) = unsafe { (vm::KERNEL_L4, mem::RAM_END) };
    let pool = ram_end.next_multiple_of(2 << 20);
    // A scratch user-half chain under the kernel's L4 slot 1: L3 -> L2 -> L1.
    let mut t = [0u64; 3];
    for f in t.iter_mut() {
        *f = mem::alloc();
        arch::zero_page(mem::va(*f));
    }
    let (l3, l2, l1) = (t[0], t[1], t[2]);
    let ok = send(&[
        MmuEntry::pt_update(kl4 + 8, l3 | vm::P | vm::RW),
        MmuEntry::pt_update(l3, l2 | vm::P | vm::RW),
        MmuEntry::pt_update(l2, l1 | vm::P | vm::RW),
    ]);
    if ok != 0 {
        let _ = writeln!(
            Console,
            "# hostile: building the scratch tables failed: {}",
            ename(ok)
        );
        return Err("setup");
    }
    let data = mem::alloc();
    let e = HcError::Eperm.status();
    let inval = HcError::Einval.status();
    let cases: [(&str, MmuEntry, i64); 14] = [
        (
            "map the shadow pool",
            MmuEntry::pt_update(l1, pool | vm::P),
            e,
        ),
        (
            "map outside RAM (MMIO hole)",
            MmuEntry::pt_update(l1, 0xfee0_0000 | vm::P),
            e,
        ),
        (
            "map past the end of RAM",
            MmuEntry::pt_update(l1, (1 << 40) | vm::P),
            e,
        ),
        (
            "map a reserved range",
            MmuEntry::pt_update(l1, 0x9f000 | vm::P),
            e,
        ),
        (
            "wrong-level entry (L2 -> L3 table)",
            MmuEntry::pt_update(l2 + 8, l3 | vm::P | vm::RW),
            inval,
        ),
        (
            "recursive entry (L4 -> itself)",
            MmuEntry::pt_update(kl4 + 16, kl4 | vm::P | vm::RW),
            inval,
        ),
        (
            "misaligned PTE pointer",
            MmuEntry::pt_update(l1 + 4, data | vm::P),
            inval,
        ),
        (
            "PT_UPDATE outside a page table",
            MmuEntry::pt_update(data, 0),
            inval,
        ),
        (
            "reserved flag bits (protection key)",
            MmuEntry::pt_update(l1, data | vm::P | (1 << 59)),
            inval,
        ),
        (
            "1 GiB leaf",
            MmuEntry::pt_update(l3 + 8, (1 << 30) | vm::P | vm::PS),
            inval,
        ),
        (
            "unpin the loaded root",
            MmuEntry::unpin(kl4),
            HcError::Ebusy.status(),
        ),
        (
            "NEW_BASEPTR of an unpinned frame",
            MmuEntry::new_baseptr(data),
            HcError::Enoent.status(),
        ),
        (
            "ZERO_FRAME of a typed page table",
            MmuEntry::zero_frame(l1),
            HcError::Ebusy.status(),
        ),
        (
            "unknown entry kind",
            MmuEntry {
                kind: 99,
                flags: 0,
                reserved: 0,
                a0: 0,
                a1: 0,
                a2: 0,
            },
            HcError::Enosys.status(),
        ),
    ];
    let mut bad = 0;
    for (what, entry, want) in cases {
        let got = send(&[entry]);
        if !report(what, got, want) {
            bad += 1;
        }
    }
    // A page-table frame mapped writable by a 4 KiB leaf: the engine may accept it but the
    // shadow must be read-only: a store through it faults.
    let va = 0x80_0000_0000u64; // L4 slot 1, L3 0, L2 0, L1 0
    let s = send(&[MmuEntry::pt_update(l1, l2 | vm::P | vm::RW)]);
    let faulted = if s == 0 { probe_write(va) } else { true };
    let _ = writeln!(
        Console,
        "# hostile: page table mapped writable: {}, store through it {} {}",
        ename(s),
        if s == 0 {
            if faulted {
                "faulted"
            } else {
                "SUCCEEDED"
            }
        } else {
            "not attempted"
        },
        if faulted { "ok" } else { "MISMATCH" }
    );
    if !faulted {
        bad += 1;
    }
    // Batch-level refusals.
    let big = mmu().batch_raw(scratch_gpa(), 1025).0;
    let trunc = mmu().batch_raw(ram_end - 32, 2).0;
    let (unk, _) = mmu().pv.as_mut().unwrap().call(99, [0; 4]);
    for (what, got, want) in [
        ("oversized batch (1025)", big, HcError::E2big.status()),
        (
            "truncated batch (runs past RAM)",
            trunc,
            HcError::Efault.status(),
        ),
        ("unknown op", unk, HcError::Enosys.status()),
    ] {
        if !report(what, got, want) {
            bad += 1;
        }
    }
    // Tear the scratch chain down (unlinking untypes it) and free it.
    let s = send(&[MmuEntry::pt_update(l1, 0), MmuEntry::pt_update(kl4 + 8, 0)]);
    if s != 0 {
        let _ = writeln!(Console, "# hostile: cleanup failed: {}", ename(s));
        bad += 1;
    }
    for f in [l3, l2, l1, data] {
        mem::free(f);
    }
    let _ = op::NULL;
    // A normal workload still passes.
    match run_prog(TESTS[0].elf, pages.min(64), seed) {
        Some(0) => {}
        _ => {
            let _ = writeln!(
                Console,
                "# hostile: the populate workload failed afterwards"
            );
            bad += 1;
        }
    }
    if bad == 0 {
        Ok(())
    } else {
        let _ = writeln!(Console, "# hostile: {bad} mismatches");
        Err("refusals did not match the documented errors")
    }
}
