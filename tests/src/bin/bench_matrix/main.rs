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
//! Flags: `--pages=N` (256), `--repeat=N` (3), `--out=DIR` (`bench`), `--modes=five` (only
//! native, pv, pv-lazy/1024, emulate and wrpt), `--smp=off` (no SMP rows), `--smp=only`
//! (the SMP rows and cost rows only: no UP matrix, no plots), `--smp=cost` (the UP matrix
//! and the remote-flush cost rows, not the SMP rows: what the SVM bed runs in its time),
//! `--hypercall=pio|vmcall|auto` (pio; the UP runs), `--floor-iterations=N` (20000, of the
//! exit floor), `--host-note=TEXT` (said about the host in the report), `--bed=DIR` (render
//! the SVM bed's matrix, `DIR/results.json`, beside this host's; `bed`).

mod bed;
mod plot;
mod report;
mod run;
mod smp;
mod smp_cost;
mod strategies;

use indicatif::{ProgressBar, ProgressStyle};
use run::{Mode, Sample, FA_DEFAULT};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};
use vmm::hcall::contract::NON_UPDATE_PHASES;

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
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
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
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
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
#[derive(Clone, Debug, Serialize, Deserialize)]
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
    /// MMU_BATCH update cost by batch size per run (boot excluded; `Sample::batch_sizes`
    /// keys).
    #[serde(default)]
    pub batch_sizes: BTreeMap<String, Stat>,
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
    let size_keys: std::collections::BTreeSet<String> = ss
        .iter()
        .flat_map(|s| s.batch_sizes.keys().cloned())
        .collect();
    let batch_sizes = size_keys
        .into_iter()
        .map(|k| {
            let v = per(&|s| s.batch_sizes.get(&k).copied().unwrap_or(0.0));
            (k, v)
        })
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
            // Frames zeroed or copied, whole-table and A/D operations and leaf zaps (a
            // host resync's stand-in) are no update's cost.
            let phase = |n: &str| s.phases.get(n).copied().unwrap_or(0.0);
            let other: f64 = NON_UPDATE_PHASES.iter().map(|n| phase(n)).sum();
            ratio(s.vmm_mmu_ns - other, s.vmm_pte_updates)
        }),
        vmm_pte_updates: per(&|s| s.vmm_pte_updates),
        phases_ns,
        batch_sizes,
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

fn exit_floor(iterations: u32) -> Value {
    let out = Command::new(pvmm_e2e::pvmm_bin())
        .args(["bench-exits", "--iterations"])
        .arg(iterations.to_string())
        .args(["--repeat", "5", "--json"])
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
pub struct Args {
    /// `--pages=N`.
    pub pages: u32,
    /// `--repeat=N`.
    pub repeat: u32,
    /// `--out=DIR`.
    pub out: std::path::PathBuf,
    /// `--hypercall=pio|vmcall|auto` (default pio), passed to every UP run.
    pub transport: String,
    /// `--floor-iterations=N`: iterations of `pvmm bench-exits` (default 20000).
    pub floor_iterations: u32,
    /// `--bed=DIR`: the SVM bed's matrix (`DIR/results.json`) rendered beside this host's.
    pub bed: Option<std::path::PathBuf>,
    /// `--host-note=TEXT`: what the report says about the host besides what it detects.
    pub host_note: Option<String>,
    /// Not `--smp=off`: the SMP rows run too (they need every PV mode on 2 and 4 vCPUs).
    pub smp: bool,
    /// `--smp=only`: the SMP rows and cost rows only (no UP matrix, no plots).
    pub smp_only: bool,
    /// Not `--smp=cost`: the SMP rows run with the cost rows (`--smp=cost`: only the cost
    /// rows).
    pub smp_rows: bool,
}

/// Whether `a` is one of the options [`args`] reads.
fn known_arg(a: &str) -> bool {
    const VALUED: [&str; 7] = [
        "--pages=",
        "--repeat=",
        "--out=",
        "--hypercall=",
        "--floor-iterations=",
        "--bed=",
        "--host-note=",
    ];
    const FLAGS: [&str; 4] = ["--smp=off", "--smp=only", "--smp=cost", "--modes=five"];
    VALUED.iter().any(|p| a.starts_with(p)) || FLAGS.contains(&a)
}

fn args() -> Result<Args, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(bad) = args.iter().find(|a| !known_arg(a)) {
        return Err(format!(
            "{bad}: unknown option (want --pages=N --repeat=N --out=DIR --hypercall=pio|vmcall|auto --floor-iterations=N --bed=DIR --host-note=TEXT --smp=off|only|cost --modes=five)"
        ));
    }
    let text = |k: &str| args.iter().find_map(|a| a.strip_prefix(k));
    let get = |k: &str, d: u32| match text(k) {
        None => Ok(d),
        Some(v) => v
            .parse::<u32>()
            .map(|n| n.max(1))
            .map_err(|_| format!("{k}{v}: not a positive number")),
    };
    let transport = text("--hypercall=").unwrap_or("pio").to_string();
    if !["pio", "vmcall", "auto"].contains(&transport.as_str()) {
        return Err(format!("--hypercall={transport}: want pio, vmcall or auto"));
    }
    Ok(Args {
        pages: get("--pages=", 256)?,
        repeat: get("--repeat=", 3)?,
        out: text("--out=").unwrap_or("bench").into(),
        transport,
        floor_iterations: get("--floor-iterations=", 20000)?,
        bed: text("--bed=").map(Into::into),
        host_note: text("--host-note=").map(Into::into),
        smp: !args.iter().any(|x| x == "--smp=off"),
        smp_only: args.iter().any(|x| x == "--smp=only"),
        smp_rows: !args.iter().any(|x| x == "--smp=cost"),
    })
}

/// What the matrix measured: its points, the errors, and the VMM's own view of the host
/// (the `vm` object of the first baseline run's stats: transport, pool-resync verdict).
struct Measured {
    points: Vec<Point>,
    errors: Vec<String>,
    vm: Value,
}

/// Runs every (mode, workload) `a.repeat` times.
fn measure(a: &Args, hz: f64, bar: &ProgressBar) -> Measured {
    let mut points = Vec::new();
    let mut errors = Vec::new();
    let mut vm = Value::Null;
    for m in &modes() {
        bar.set_message(format!("{} baseline", m.label()));
        let mut bases = Vec::new();
        for _ in 0..a.repeat {
            let cmd = format!("console=ttyS0 selftest=none {}", m.cmdline());
            match run::run_guest(&cmd, &a.transport) {
                Ok((v, _)) => bases.push(v),
                Err(e) => errors.push(e),
            }
            bar.inc(1);
        }
        let Some(base) = bases.first().cloned() else {
            continue;
        };
        if vm.is_null() {
            vm = base["vm"].clone();
        }
        for w in WORKLOADS {
            bar.set_message(format!("{} {w}", m.label()));
            let mut ss = Vec::new();
            for _ in 0..a.repeat {
                let cmd = format!(
                    "console=ttyS0 selftest={w} pages={} {}",
                    a.pages,
                    m.cmdline()
                );
                let r = run::run_guest(&cmd, &a.transport);
                match r.and_then(|(v, c)| run::sample(&v, &c, w, &base)) {
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
    Measured { points, errors, vm }
}

/// The SMP rows, the remote-flush cost rows and the host's load while they ran.
#[derive(Default)]
struct SmpMeasured {
    points: Vec<smp::SmpPoint>,
    cost: Vec<smp_cost::CostPoint>,
    load: smp_cost::Load,
}

/// The UP matrix (unless `--smp=only`), then the SMP and cost rows (unless `--smp=off`).
fn measure_all(a: &Args, hz: f64, floor_ns: f64) -> (Measured, SmpMeasured) {
    let up_runs = (modes().len() * (WORKLOADS.len() + 1)) as u64 * u64::from(a.repeat);
    let smp_rows = if a.smp_rows { smp::runs(a.repeat) } else { 0 };
    let smp_runs = smp_rows + smp_cost::runs(a.repeat);
    let total = if a.smp_only { 0 } else { up_runs } + if a.smp { smp_runs } else { 0 };
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} [{elapsed_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut m = if a.smp_only {
        Measured {
            points: Vec::new(),
            errors: Vec::new(),
            vm: Value::Null,
        }
    } else {
        measure(a, hz, &bar)
    };
    let tick = |msg: &str| {
        bar.set_message(msg.to_string());
        bar.inc(1);
    };
    let mut out = SmpMeasured::default();
    if a.smp {
        let (points, e) = if a.smp_rows {
            smp::measure(a.repeat, hz, &tick)
        } else {
            (Vec::new(), Vec::new())
        };
        m.errors.extend(e);
        let (cost, load, e) = smp_cost::measure(a.repeat, floor_ns, &tick);
        m.errors.extend(e);
        out = SmpMeasured { points, cost, load };
    }
    bar.finish_with_message("done");
    (m, out)
}

/// Writes `results.json`, `report.md` and the plots into `a.out`; false if one failed.
fn write_outputs(a: &Args, m: &Measured, smp: &SmpMeasured, results: &Value) -> bool {
    let (host, floor) = (&results["host"], &results["exit_floor"]);
    let mut md = report::report(&m.points, floor, host, a.pages, a.repeat);
    if let Some(dir) = &a.bed {
        bed::section(&mut md, &m.points, floor, host, dir);
    }
    let floor_ns = floor["floor_ns"].as_f64().unwrap_or(0.0);
    if !smp.points.is_empty() {
        smp::section(&mut md, &smp.points, floor_ns);
        strategies::smp_note(&mut md, &smp.points);
    }
    if !smp.cost.is_empty() {
        smp_cost::section(&mut md, &smp.cost, &smp.load, floor_ns);
    }
    let json = serde_json::to_string_pretty(results).unwrap_or_default();
    let mut ok = true;
    for (file, text) in [("results.json", json), ("report.md", md)] {
        if let Err(e) = std::fs::write(a.out.join(file), text) {
            eprintln!("bench-matrix: {file}: {e}");
            ok = false;
        }
    }
    for (metric, file, title) in [
        ("exits", "exits_per_op.svg", "exits per operation (page)"),
        ("us", "us_per_op.svg", "guest µs per operation (page)"),
    ] {
        if a.smp_only {
            break;
        }
        if let Err(e) = plot::plot(&m.points, metric, &a.out.join(file), title) {
            eprintln!("plot {file}: {e}");
            ok = false;
        }
    }
    ok
}

fn main() {
    let a = args().unwrap_or_else(|e| {
        eprintln!("bench-matrix: {e}");
        std::process::exit(2);
    });
    let hz = tsc_hz();
    let floor = exit_floor(a.floor_iterations);
    let (m, smp) = measure_all(&a, hz, floor["floor_ns"].as_f64().unwrap_or(0.0));
    let host = report::host_facts(&a, &m.vm);
    if let Err(e) = std::fs::create_dir_all(&a.out) {
        eprintln!("bench-matrix: cannot create {}: {e}", a.out.display());
        std::process::exit(1);
    }
    println!("bench-matrix: host {}", report::host_line(&host));
    let results = serde_json::json!({"pages": a.pages, "repeat": a.repeat, "tsc_hz": hz,
        "host": host, "exit_floor": floor, "points": m.points, "smp": smp.points,
        "smp_cost": smp.cost, "smp_cost_load": smp.load, "errors": m.errors});
    let ok = write_outputs(&a, &m, &smp, &results);
    println!(
        "wrote {}/results.json, report.md, exits_per_op.svg, us_per_op.svg ({} points, {} errors)",
        a.out.display(),
        m.points.len(),
        m.errors.len()
    );
    for e in m.errors.iter().take(5) {
        eprintln!("error: {}", e.lines().next().unwrap_or(""));
    }
    if !ok || !m.errors.is_empty() || (m.points.is_empty() && !a.smp_only) {
        std::process::exit(1);
    }
}
