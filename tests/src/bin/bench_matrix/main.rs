//! `make bench`: runs the guest selftest workloads as benchmarks across MMU modes, lazy-batch
//! sizes and fault-around on/off, with the exit floor and the NULL-hypercall cost measured in
//! the same run, and writes `results.json`, `report.md` and SVG plots into `--out`.
//!
//! An "operation" is one page of a workload (`pages=N` pages per run). Everything the VMM
//! counts (exits, MMU_BATCH time and phases, shadow counters) subtracts a per-mode baseline
//! run with no selftest (boot + exit only); guest counters are per test already.
//!
//! The SMP rows (`smp`): the SMP workloads on 2 and 4 vCPUs, remote flushes and kicks per
//! operation, µs per operation.
//!
//! The SMP cost rows (`smp_cost`): remote-flush cost per target vCPU in exit floors of the
//! same run, on 1, 2 and 4 vCPUs, world-stop and (forced) kick delivery.
//!
//! Flags: `--pages=N` (256), `--repeat=N` (3), `--out=DIR` (`bench`), `--modes=five` (only
//! native, pv, pv-lazy/1024, emulate and wrpt), `--smp=off` (no SMP rows), `--smp=only`
//! (the SMP rows and cost rows only: no UP matrix, no plots).

mod plot;
mod report;
mod run;
mod smp;
mod smp_cost;
mod strategies;

use indicatif::{ProgressBar, ProgressStyle};
use run::{Mode, Sample, FA_DEFAULT};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// The workloads (selftests) measured.
pub const WORKLOADS: [&str; 6] = [
    "populate",
    "zap",
    "mprotect",
    "mremap",
    "fork_cow",
    "flush_avoid",
];

/// Median and spread of one metric over repetitions.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stat {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(f64::total_cmp);
    Stat {
        median: v.get(v.len() / 2).copied().unwrap_or(0.0),
        min: v.first().copied().unwrap_or(0.0),
        max: v.last().copied().unwrap_or(0.0),
    }
}

/// One operation's figures over the repetitions.
#[derive(Clone, Debug, Default, Serialize)]
pub struct OpPoint {
    /// PTE updates per MMU_BATCH exit (ZERO_FRAME not counted).
    pub updates_per_exit: Stat,
    /// Entries per MMU_BATCH exit, ZERO_FRAME included.
    pub entries_per_exit: Stat,
    /// PTE updates per page of the operation.
    pub updates_per_page: Stat,
    /// Page faults per page (the fault path).
    pub faults_per_page: Stat,
    /// PTE updates per fault (the fault path).
    pub updates_per_fault: Stat,
    /// MMU_BATCH exits per fault (the fault path).
    pub exits_per_fault: Stat,
}

/// One (workload, mode) cell.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// Workload.
    pub workload: String,
    /// Mode label.
    pub mode: String,
    /// `mmu=`.
    pub mmu: String,
    /// `fault_around=`.
    pub fault_around: u32,
    /// Pages per run.
    pub pages: u32,
    /// Userspace exits per page.
    pub exits_per_op: Stat,
    /// MMU hypercalls per page.
    pub mmu_hypercalls_per_op: Stat,
    /// PTE updates per MMU hypercall over the whole test.
    pub pte_updates_per_hypercall: Stat,
    /// Page faults per page.
    pub faults_per_op: Stat,
    /// Guest time per page, µs.
    pub guest_us_per_op: Stat,
    /// MMU_BATCH time without ZERO_FRAME per PT_UPDATE, ns (boot excluded).
    pub vmm_ns_per_pte_update: Stat,
    /// PT_UPDATEs the engine applied (boot excluded).
    pub vmm_pte_updates: Stat,
    /// MMU_BATCH time by phase, ns per run (boot excluded).
    pub phases_ns: BTreeMap<String, Stat>,
    /// Host resyncs per run.
    pub host_resyncs: Stat,
    /// Flushes performed per run.
    pub flushes_performed: Stat,
    /// Flushes avoided per run.
    pub flushes_avoided: Stat,
    /// Per-operation figures.
    pub ops: BTreeMap<String, OpPoint>,
    /// PTEs written per page-table page between two flushes (guest flush windows).
    pub ptes_per_pt_page: Stat,
    /// Trapped page-table stores per page (emulate, wrpt).
    pub trapped_per_op: Stat,
    /// Entries re-validated per re-hook (wrpt).
    pub revalidated_per_rehook: Stat,
    /// Spurious page faults per page (wrpt).
    pub spurious_per_op: Stat,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn op_point(ss: &[Sample], op: &str) -> Option<OpPoint> {
    let figs: Vec<&run::OpFig> = ss.iter().filter_map(|s| s.ops.get(op)).collect();
    if figs.is_empty() {
        return None;
    }
    let per = |f: &dyn Fn(&run::OpFig) -> f64| stat(figs.iter().map(|o| f(o)).collect());
    Some(OpPoint {
        updates_per_exit: per(&|o| ratio(o.updates, o.exits)),
        entries_per_exit: per(&|o| ratio(o.entries, o.exits)),
        updates_per_page: per(&|o| ratio(o.updates, o.pages)),
        faults_per_page: per(&|o| ratio(o.faults, o.pages)),
        updates_per_fault: per(&|o| ratio(o.updates, o.faults)),
        exits_per_fault: per(&|o| ratio(o.exits, o.faults)),
    })
}

fn point(w: &str, m: &Mode, pages: u32, hz: f64, ss: &[Sample]) -> Point {
    let per = |f: &dyn Fn(&Sample) -> f64| stat(ss.iter().map(f).collect());
    let n = f64::from(pages);
    let names: Vec<String> = ss.iter().flat_map(|s| s.phases.keys().cloned()).collect();
    let phases_ns = names
        .iter()
        .map(|k| (k.clone(), per(&|s| s.phases.get(k).copied().unwrap_or(0.0))))
        .collect();
    let ops = ss
        .iter()
        .flat_map(|s| s.ops.keys().cloned())
        .filter_map(|op| Some((op.clone(), op_point(ss, &op)?)))
        .collect();
    Point {
        workload: w.into(),
        mode: m.label(),
        mmu: m.mmu.into(),
        fault_around: m.fault_around,
        pages,
        exits_per_op: per(&|s| s.exits / n),
        mmu_hypercalls_per_op: per(&|s| s.mmu_hypercalls / n),
        pte_updates_per_hypercall: per(&|s| ratio(s.pte_updates, s.mmu_hypercalls)),
        faults_per_op: per(&|s| s.faults / n),
        guest_us_per_op: per(&|s| s.cycles / hz * 1e6 / n),
        vmm_ns_per_pte_update: per(&|s| {
            let zero = s.phases.get("zero_frame").copied().unwrap_or(0.0);
            ratio(s.vmm_mmu_ns - zero, s.vmm_pte_updates)
        }),
        vmm_pte_updates: per(&|s| s.vmm_pte_updates),
        phases_ns,
        host_resyncs: per(&|s| s.host_resyncs),
        flushes_performed: per(&|s| s.flushes_performed),
        flushes_avoided: per(&|s| s.flushes_avoided),
        ops,
        ptes_per_pt_page: per(&|s| ratio(s.trap.pt_ptes, s.trap.pt_pages)),
        trapped_per_op: per(&|s| s.trap.trapped / n),
        revalidated_per_rehook: per(&|s| ratio(s.trap.revalidated, s.trap.rehooks)),
        spurious_per_op: per(&|s| s.trap.spurious / n),
    }
}

fn tsc_hz() -> f64 {
    let t = Instant::now();
    // SAFETY: rdtsc has no side effects.
    let c0 = unsafe { std::arch::x86_64::_rdtsc() };
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    let c1 = unsafe { std::arch::x86_64::_rdtsc() };
    (c1 - c0) as f64 / t.elapsed().as_secs_f64()
}

fn exit_floor() -> Value {
    let out = Command::new(pvmm_e2e::pvmm_bin())
        .args([
            "bench-exits",
            "--iterations",
            "20000",
            "--repeat",
            "5",
            "--json",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

/// The modes: native, pv and pv-lazy/1024 with fault-around on (the default) and off; the
/// smaller lazy batches and the trap modes (emulate, wrpt) with it on. `--modes=five`: the
/// five strategies only (native, pv, pv-lazy/1024, emulate, wrpt).
fn modes() -> Vec<Mode> {
    let five = std::env::args().any(|a| a == "--modes=five");
    let m = |mmu, batch| Mode {
        mmu,
        batch,
        fault_around: FA_DEFAULT,
    };
    if five {
        return strategies::FIVE.iter().map(|&(mmu, b)| m(mmu, b)).collect();
    }
    let mut modes = Vec::new();
    for fa in [FA_DEFAULT, 0] {
        for (mmu, batch) in [("native", None), ("pv", None), ("pv-lazy", Some(1024))] {
            modes.push(Mode {
                mmu,
                batch,
                fault_around: fa,
            });
        }
    }
    for b in [16, 64, 256] {
        modes.push(m("pv-lazy", Some(b)));
    }
    modes.push(m("emulate", None));
    modes.push(m("wrpt", None));
    modes
}

/// Command-line settings.
struct Args {
    pages: u32,
    repeat: u32,
    out: std::path::PathBuf,
}

fn args() -> Args {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str, d: u32| {
        args.iter()
            .find_map(|a| a.strip_prefix(k).and_then(|v| v.parse().ok()))
            .unwrap_or(d)
    };
    Args {
        pages: get("--pages=", 256).max(1),
        repeat: get("--repeat=", 3).max(1),
        out: args
            .iter()
            .find_map(|a| a.strip_prefix("--out="))
            .unwrap_or("bench")
            .into(),
    }
}

/// Runs every (mode, workload) `a.repeat` times; returns the points and the errors.
fn measure(a: &Args, hz: f64, bar: &ProgressBar) -> (Vec<Point>, Vec<String>) {
    let mut points = Vec::new();
    let mut errors = Vec::new();
    for m in &modes() {
        bar.set_message(format!("{} baseline", m.label()));
        let mut bases = Vec::new();
        for _ in 0..a.repeat {
            match run::run_guest(&format!("console=ttyS0 selftest=none {}", m.cmdline())) {
                Ok((v, _)) => bases.push(v),
                Err(e) => errors.push(e),
            }
            bar.inc(1);
        }
        let Some(base) = bases.first().cloned() else {
            continue;
        };
        for w in WORKLOADS {
            bar.set_message(format!("{} {w}", m.label()));
            let mut ss = Vec::new();
            for _ in 0..a.repeat {
                let cmd = format!(
                    "console=ttyS0 selftest={w} pages={} {}",
                    a.pages,
                    m.cmdline()
                );
                match run::run_guest(&cmd).and_then(|(v, c)| run::sample(&v, &c, w, &base)) {
                    Ok(s) => ss.push(s),
                    Err(e) => errors.push(e),
                }
                bar.inc(1);
            }
            if !ss.is_empty() {
                points.push(point(w, m, a.pages, hz, &ss));
            }
        }
    }
    (points, errors)
}

/// The SMP rows and the cost rows; `--smp=off`: neither (the UP matrix only; the SMP rows
/// need every PV mode to run on 2 and 4 vCPUs).
fn measure_smp(
    repeat: u32,
    hz: f64,
    floor_ns: f64,
    tick: &dyn Fn(&str),
) -> (
    Vec<smp::SmpPoint>,
    Vec<smp_cost::CostPoint>,
    smp_cost::Load,
    Vec<String>,
) {
    if std::env::args().any(|x| x == "--smp=off") {
        return (Vec::new(), Vec::new(), Default::default(), Vec::new());
    }
    let (points, mut errors) = smp::measure(repeat, hz, tick);
    let (cost, load, e) = smp_cost::measure(repeat, floor_ns, tick);
    errors.extend(e);
    (points, cost, load, errors)
}

fn main() {
    let a = args();
    let hz = tsc_hz();
    let floor = exit_floor();
    let host = report::host_facts();
    let smp_only = std::env::args().any(|x| x == "--smp=only");
    let up_runs = (modes().len() * (WORKLOADS.len() + 1)) as u64 * u64::from(a.repeat);
    let total = if smp_only { 0 } else { up_runs } + smp::runs(a.repeat) + smp_cost::runs(a.repeat);
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} [{elapsed_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (points, mut errors) = if smp_only {
        (Vec::new(), Vec::new())
    } else {
        measure(&a, hz, &bar)
    };
    let tick = |m: &str| {
        bar.set_message(m.to_string());
        bar.inc(1);
    };
    let floor_ns = floor["floor_ns"].as_f64().unwrap_or(0.0);
    let (smp_points, cost, load, smp_errors) = measure_smp(a.repeat, hz, floor_ns, &tick);
    errors.extend(smp_errors);
    bar.finish_with_message("done");
    if let Err(e) = std::fs::create_dir_all(&a.out) {
        eprintln!("bench-matrix: cannot create {}: {e}", a.out.display());
        std::process::exit(1);
    }
    let results = serde_json::json!({"pages": a.pages, "repeat": a.repeat, "tsc_hz": hz,
        "host": host, "exit_floor": floor, "points": points, "smp": smp_points,
        "smp_cost": cost, "errors": errors});
    let mut md = report::report(&points, &floor, &host, a.pages, a.repeat);
    smp::section(&mut md, &smp_points, floor_ns);
    strategies::smp_note(&mut md, &smp_points);
    smp_cost::section(&mut md, &cost, &load, floor_ns);
    let json = serde_json::to_string_pretty(&results).unwrap_or_default();
    let mut failed = false;
    for (file, text) in [("results.json", json), ("report.md", md)] {
        if let Err(e) = std::fs::write(a.out.join(file), text) {
            eprintln!("bench-matrix: {file}: {e}");
            failed = true;
        }
    }
    for (metric, file, title) in [
        ("exits", "exits_per_op.svg", "exits per operation (page)"),
        ("us", "us_per_op.svg", "guest µs per operation (page)"),
    ] {
        if smp_only {
            break;
        }
        if let Err(e) = plot::plot(&points, metric, &a.out.join(file), title) {
            eprintln!("plot {file}: {e}");
            failed = true;
        }
    }
    println!(
        "wrote {}/results.json, report.md, exits_per_op.svg, us_per_op.svg ({} points, {} errors)",
        a.out.display(),
        points.len(),
        errors.len()
    );
    for e in errors.iter().take(5) {
        eprintln!("error: {}", e.lines().next().unwrap_or(""));
    }
    if failed || !errors.is_empty() || (points.is_empty() && !smp_only) {
        std::process::exit(1);
    }
}
