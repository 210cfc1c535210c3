//! The kselftest-style runner: TAP 13 on COM1, one ring-3 program per test (hostile runs
//! in the kernel), per-test diagnostics from the guest-side MMU counters.

use crate::arch;
use crate::hostile;
use crate::mem;
use crate::mmu::{self, Counters, Mode};
use crate::sched;
use crate::serial::Console;
use crate::tlb;
use core::fmt::Write;

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
        name: "fault_around",
        elf: prog!("fault_around"),
        pv_only: false,
    },
    Test {
        name: "smp_unmap",
        elf: prog!("smp_unmap"),
        pv_only: false,
    },
    Test {
        name: "smp_mprotect",
        elf: prog!("smp_mprotect"),
        pv_only: false,
    },
    Test {
        name: "smp_remap",
        elf: prog!("smp_remap"),
        pv_only: false,
    },
    Test {
        name: "smp_dirty",
        elf: prog!("smp_dirty"),
        pv_only: false,
    },
    Test {
        name: "smp_exit_mmap",
        elf: prog!("smp_exit_mmap"),
        pv_only: false,
    },
    Test {
        name: "smp_flush_avoid",
        elf: prog!("smp_flush_avoid"),
        pv_only: false,
    },
    Test {
        name: "smp_fork_cow",
        elf: prog!("smp_fork_cow"),
        pv_only: false,
    },
    Test {
        name: "smp_hammer",
        elf: prog!("smp_hammer"),
        pv_only: false,
    },
    Test {
        name: "hostile",
        elf: &[],
        pv_only: true,
    },
];

/// The selftest names, in run order (`selftest=` takes a comma-separated list of them).
pub fn names() -> impl Iterator<Item = &'static str> {
    TESTS.iter().map(|t| t.name)
}

/// A selection of tests: bit `i` selects the `i`-th of [`names`].
pub type Selection = u32;

const _: () = assert!(TESTS.len() <= Selection::BITS as usize);

fn selected(sel: Selection, i: usize) -> bool {
    sel & (1 << i) != 0
}

/// Runs a user program to completion; returns its wait status (None: could not start).
fn run_prog(elf: &[u8], pages: u64, seed: u64) -> Option<u64> {
    let mode = mmu::this_cpu().mode as u64;
    let slot = sched::spawn(elf, [pages, seed, mode])?;
    sched::run(slot);
    sched::runner_status()
}

/// The kernel's SMP counters around a test: (flush IPIs, wake-up IPIs).
fn ipis() -> (u64, u64) {
    use core::sync::atomic::Ordering::Relaxed;
    (
        tlb::STATS.flush_ipis.load(Relaxed),
        tlb::STATS.wake_ipis.load(Relaxed),
    )
}

fn diag_counters(name: &str, a: &Counters, b: &Counters, cycles: u64, ipi: (u64, u64)) {
    let hc = b.hypercalls - a.hypercalls;
    let en = b.entries - a.entries;
    let _ = writeln!(
        Console,
        "# {name}: pte_updates={} mmu_hypercalls={} entries={} entries_per_hypercall={}.{:02} tlb_flushes={} zero_cpu={} zero_vmm={} copy_cpu={} copy_vmm={} faults={} fault_mapped={} switches={} spurious={} pt_ptes={} pt_pages={} cycles={} flush_ipis={} wake_ipis={}",
        b.pte_updates - a.pte_updates,
        hc,
        en,
        en.checked_div(hc).unwrap_or(0),
        (en * 100).checked_div(hc).unwrap_or(0) % 100,
        b.flushes - a.flushes,
        b.zero_cpu - a.zero_cpu,
        b.zero_vmm - a.zero_vmm,
        b.copy_cpu - a.copy_cpu,
        b.copy_vmm - a.copy_vmm,
        b.faults - a.faults,
        b.fault_mapped - a.fault_mapped,
        b.switches - a.switches,
        b.spurious - a.spurious,
        b.pt_ptes - a.pt_ptes,
        b.pt_pages - a.pt_pages,
        cycles,
        ipi.0,
        ipi.1
    );
}

/// Exit code of a program that cannot test its mechanism here (reported as TAP SKIP; the
/// programs' `utest::EXIT_SKIP`, which no failed check returns).
const EXIT_SKIP: u64 = 254;
/// The reason of such a SKIP.
const SKIPPED: &str = "the mechanism is not available here (see the diagnostics)";

/// One test: its result (counters and leak check around it).
fn run_one(t: &Test, pages: u64, seed: u64) -> Result<(), &'static str> {
    let free0 = mem::free_count();
    let c0 = mmu::this_cpu().c;
    let i0 = ipis();
    let t0 = arch::rdtsc();
    let result: Result<(), &'static str> = if t.name == "hostile" {
        hostile(pages, seed)
    } else {
        match run_prog(t.elf, pages, seed) {
            None => Err("could not start the program"),
            Some(0) => Ok(()),
            Some(s) if s == EXIT_SKIP << 8 => Err(SKIPPED),
            Some(s) if s & 0x7f != 0 => Err("killed by a signal"),
            Some(_) => Err("exited non-zero"),
        }
    };
    let t1 = arch::rdtsc();
    let c1 = mmu::this_cpu().c;
    let i1 = ipis();
    diag_counters(t.name, &c0, &c1, t1 - t0, (i1.0 - i0.0, i1.1 - i0.1));
    let free1 = mem::free_count();
    if result.is_ok() && free1 != free0 {
        let _ = writeln!(
            Console,
            "# {}: free frames {} before, {} after",
            t.name, free0, free1
        );
        return Err("frames leaked");
    }
    result
}

/// Runs the selected tests; returns the number of failures.
pub fn run(sel: Selection, pages: u64, seed: u64) -> u32 {
    let n = (0..TESTS.len()).filter(|&i| selected(sel, i)).count();
    let _ = writeln!(Console, "TAP version 13\n1..{n}");
    let mut failures = 0;
    let mode = mmu::this_cpu().mode;
    let chosen = TESTS.iter().enumerate().filter(|&(i, _)| selected(sel, i));
    for (k, (_, t)) in (1..).zip(chosen) {
        if t.pv_only && mode == Mode::Native {
            let _ = writeln!(
                Console,
                "ok {k} {} # SKIP needs a PV MMU mode (mmu=pv or mmu=pv-lazy)",
                t.name
            );
            continue;
        }
        match run_one(t, pages, seed) {
            Ok(()) => {
                let _ = writeln!(Console, "ok {k} {}", t.name);
            }
            Err(SKIPPED) => {
                let _ = writeln!(Console, "ok {k} {} # SKIP {SKIPPED}", t.name);
            }
            Err(why) => {
                failures += 1;
                let st = sched::runner_status();
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

/// The hostile test: the attacks, then a normal workload that must still pass.
fn hostile(pages: u64, seed: u64) -> Result<(), &'static str> {
    let bad = hostile::attacks(&mut mmu::this_cpu())?;
    let workload_ok = run_prog(TESTS[0].elf, pages.min(64), seed) == Some(0);
    if !workload_ok {
        let _ = writeln!(
            Console,
            "# hostile: the populate workload failed afterwards"
        );
    }
    match (bad, workload_ok) {
        (0, true) => Ok(()),
        (0, false) => Err("every refusal matched, but the populate workload failed afterwards"),
        _ => Err("refusals did not match the documented errors"),
    }
}
