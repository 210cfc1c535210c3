//! `make bench`: runs the guest selftest workloads as benchmarks across MMU modes and
//! lazy-batch sizes, with the exit floor and the NULL-hypercall cost measured in the same
//! run, and writes `bench/results.json`, `bench/report.md` and SVG plots.
//!
//! An "operation" is one page of a workload (`pages=N` pages per run). Exits per operation
//! subtract a per-mode baseline run with no selftest (boot + exit only).

use indicatif::{ProgressBar, ProgressStyle};
use pvmm_e2e::{guest, pvmm_bin, temp, Tap};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

const WORKLOADS: [&str; 6] = [
    "populate",
    "zap",
    "mprotect",
    "mremap",
    "fork_cow",
    "flush_avoid",
];

#[derive(Clone, Debug, Serialize)]
struct Mode {
    mmu: &'static str,
    batch: Option<u32>,
}

impl Mode {
    fn label(&self) -> String {
        match self.batch {
            Some(b) => format!("{}/{b}", self.mmu),
            None => self.mmu.to_string(),
        }
    }
    fn cmdline(&self) -> String {
        match self.batch {
            Some(b) => format!("mmu={} lazy_batch={b}", self.mmu),
            None => format!("mmu={}", self.mmu),
        }
    }
}

/// One run's raw figures.
#[derive(Clone, Debug, Default, Serialize)]
struct Sample {
    exits: f64,
    mmu_hypercalls: f64,
    pte_updates: f64,
    cycles: f64,
    vmm_mmu_ns: f64,
    vmm_pte_updates: f64,
    flushes_performed: f64,
    flushes_avoided: f64,
}

/// Median and spread of one metric over repetitions.
#[derive(Clone, Debug, Serialize)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(f64::total_cmp);
    Stat {
        median: v.get(v.len() / 2).copied().unwrap_or(0.0),
        min: v.first().copied().unwrap_or(0.0),
        max: v.last().copied().unwrap_or(0.0),
    }
}

#[derive(Clone, Debug, Serialize)]
struct Point {
    workload: String,
    mode: String,
    pages: u32,
    exits_per_op: Stat,
    mmu_hypercalls_per_op: Stat,
    pte_updates_per_hypercall: Stat,
    guest_us_per_op: Stat,
    vmm_ns_per_pte_update: Stat,
    flushes_performed: Stat,
    flushes_avoided: Stat,
}

fn sum_obj(v: &Value) -> f64 {
    v.as_object()
        .map_or(0.0, |m| m.values().filter_map(Value::as_f64).sum())
}

/// Runs the guest once; returns (stats JSON, console).
fn run_guest(cmdline: &str) -> Result<(Value, String), String> {
    let f = temp(&format!("bench-{}.json", cmdline.len()));
    let out = Command::new(pvmm_bin())
        .args([
            "run",
            "--kernel",
            guest().to_str().unwrap_or_default(),
            "--cmdline",
            cmdline,
            "--stats",
            "json",
            "--stats-file",
        ])
        .arg(&f)
        .args(["--timeout", "300", "--hypercall", "pio"])
        .output()
        .map_err(|e| e.to_string())?;
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = std::fs::read_to_string(&f).map_err(|e| {
        format!(
            "{cmdline}: no stats ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let _ = std::fs::remove_file(&f);
    let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    if out.status.code() != Some(0) {
        return Err(format!(
            "{cmdline}: exit code {:?}\n{console}",
            out.status.code()
        ));
    }
    Ok((v, console))
}

/// `key=value` pairs of the diagnostic line `# <name>: ...`.
fn diag(tap: &Tap, name: &str) -> BTreeMap<String, f64> {
    let prefix = format!("{name}:");
    tap.get(name)
        .into_iter()
        .flat_map(|p| p.diag.iter())
        .chain(tap.preamble.iter())
        .filter_map(|l| l.strip_prefix(&prefix))
        .flat_map(|rest| rest.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| v.parse::<f64>().ok().map(|v| (k.to_string(), v)))
        .collect()
}

fn sample(stats: &Value, console: &str, workload: &str, base: &Value) -> Result<Sample, String> {
    let tap = Tap::parse(console)?;
    let p = tap
        .get(workload)
        .ok_or(format!("no TAP point for {workload}"))?;
    if !p.ok {
        return Err(format!("{workload} failed: {:?}", p.diag));
    }
    let d = diag(&tap, workload);
    let g = |k: &str| d.get(k).copied().unwrap_or(0.0);
    let exits = stats["merged"]["exits_total"].as_f64().unwrap_or(0.0)
        - base["merged"]["exits_total"].as_f64().unwrap_or(0.0);
    let hc = stats["merged"]["hypercalls"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mmu_ns = hc
        .iter()
        .find(|h| h["op"] == "MMU_BATCH")
        .and_then(|h| h["total_ns"].as_f64())
        .unwrap_or(0.0);
    let mmu = &stats["mmu"];
    Ok(Sample {
        exits,
        mmu_hypercalls: g("mmu_hypercalls"),
        pte_updates: g("pte_updates"),
        cycles: g("cycles"),
        vmm_mmu_ns: mmu_ns,
        vmm_pte_updates: mmu["pte_updates"].as_f64().unwrap_or(0.0),
        flushes_performed: sum_obj(&mmu["flushes_performed"])
            - sum_obj(&base["mmu"]["flushes_performed"]),
        flushes_avoided: sum_obj(&mmu["flushes_avoided"])
            - sum_obj(&base["mmu"]["flushes_avoided"]),
    })
}

fn tsc_hz() -> f64 {
    let t = Instant::now();
    let c0 = unsafe { std::arch::x86_64::_rdtsc() };
    std::thread::sleep(Duration::from_millis(200));
    let c1 = unsafe { std::arch::x86_64::_rdtsc() };
    (c1 - c0) as f64 / t.elapsed().as_secs_f64()
}

fn exit_floor() -> Value {
    let out = Command::new(pvmm_bin())
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str, d: u32| {
        args.iter()
            .find_map(|a| a.strip_prefix(k).and_then(|v| v.parse().ok()))
            .unwrap_or(d)
    };
    let pages = get("--pages=", 256);
    let repeat = get("--repeat=", 3);
    let out_dir = std::path::PathBuf::from(
        args.iter()
            .find_map(|a| a.strip_prefix("--out="))
            .unwrap_or("bench"),
    );
    let mut modes = vec![
        Mode {
            mmu: "native",
            batch: None,
        },
        Mode {
            mmu: "pv",
            batch: None,
        },
    ];
    for b in [16, 64, 256, 1024] {
        modes.push(Mode {
            mmu: "pv-lazy",
            batch: Some(b),
        });
    }
    let hz = tsc_hz();
    let floor = exit_floor();
    let total = (modes.len() * (WORKLOADS.len() + 1)) as u64 * u64::from(repeat);
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} [{elapsed_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut points = Vec::new();
    let mut errors = Vec::new();
    for m in &modes {
        bar.set_message(format!("{} baseline", m.label()));
        let mut bases = Vec::new();
        for _ in 0..repeat {
            match run_guest(&format!("console=ttyS0 selftest=none {}", m.cmdline())) {
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
            for _ in 0..repeat {
                match run_guest(&format!(
                    "console=ttyS0 selftest={w} pages={pages} {}",
                    m.cmdline()
                ))
                .and_then(|(v, c)| sample(&v, &c, w, &base))
                {
                    Ok(s) => ss.push(s),
                    Err(e) => errors.push(e),
                }
                bar.inc(1);
            }
            if ss.is_empty() {
                continue;
            }
            let per = |f: &dyn Fn(&Sample) -> f64| stat(ss.iter().map(f).collect());
            let n = f64::from(pages);
            points.push(Point {
                workload: w.into(),
                mode: m.label(),
                pages,
                exits_per_op: per(&|s| s.exits / n),
                mmu_hypercalls_per_op: per(&|s| s.mmu_hypercalls / n),
                pte_updates_per_hypercall: per(&|s| {
                    if s.mmu_hypercalls > 0.0 {
                        s.pte_updates / s.mmu_hypercalls
                    } else {
                        0.0
                    }
                }),
                guest_us_per_op: per(&|s| s.cycles / hz * 1e6 / n),
                vmm_ns_per_pte_update: per(&|s| {
                    if s.vmm_pte_updates > 0.0 {
                        s.vmm_mmu_ns / s.vmm_pte_updates
                    } else {
                        0.0
                    }
                }),
                flushes_performed: per(&|s| s.flushes_performed),
                flushes_avoided: per(&|s| s.flushes_avoided),
            });
        }
    }
    bar.finish_with_message("done");
    let _ = std::fs::create_dir_all(&out_dir);
    let results = serde_json::json!({"pages": pages, "repeat": repeat, "tsc_hz": hz, "exit_floor": floor, "points": points, "errors": errors});
    let _ = std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&results).unwrap_or_default(),
    );
    let _ = std::fs::write(
        out_dir.join("report.md"),
        report(&points, &floor, pages, repeat),
    );
    for (metric, file, title) in [
        ("exits", "exits_per_op.svg", "exits per operation (page)"),
        ("us", "us_per_op.svg", "guest µs per operation (page)"),
    ] {
        if let Err(e) = plot(&points, metric, &out_dir.join(file), title) {
            eprintln!("plot {file}: {e}");
        }
    }
    println!(
        "wrote {}/results.json, report.md, exits_per_op.svg, us_per_op.svg ({} points, {} errors)",
        out_dir.display(),
        points.len(),
        errors.len()
    );
    for e in errors.iter().take(5) {
        eprintln!("error: {}", e.lines().next().unwrap_or(""));
    }
}

fn find<'a>(points: &'a [Point], w: &str, mode: &str) -> Option<&'a Point> {
    points.iter().find(|p| p.workload == w && p.mode == mode)
}

fn report(points: &[Point], floor: &Value, pages: u32, repeat: u32) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# pvmm MMU-mode benchmark\n\n{pages} pages per workload run, {repeat} repetitions; medians with [min–max]. An operation is one page.\n");
    if !floor.is_null() {
        let _ = writeln!(
            o,
            "Exit floor (bare port write): {:.0} ns; NULL hypercall: {:.0} ns; ratio {:.3}.\n",
            floor["floor_ns"].as_f64().unwrap_or(0.0),
            floor["null_ns"].as_f64().unwrap_or(0.0),
            floor["ratio"].as_f64().unwrap_or(0.0)
        );
    }
    let floor_us = floor["floor_ns"].as_f64().unwrap_or(0.0) / 1000.0;
    let _ = writeln!(o, "| workload | mode | exits/op | MMU hypercalls/op | PTE updates/hypercall | guest µs/op | µs/op ÷ exit floor | VMM ns/PTE update | flushes performed | flushes avoided |");
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|");
    for p in points {
        let ratio = if floor_us > 0.0 {
            p.guest_us_per_op.median / floor_us
        } else {
            0.0
        };
        let _ = writeln!(
            o,
            "| {} | {} | {:.3} [{:.3}–{:.3}] | {:.4} | {:.1} | {:.2} [{:.2}–{:.2}] | {:.2} | {:.0} | {:.0} | {:.0} |",
            p.workload, p.mode, p.exits_per_op.median, p.exits_per_op.min, p.exits_per_op.max, p.mmu_hypercalls_per_op.median,
            p.pte_updates_per_hypercall.median, p.guest_us_per_op.median, p.guest_us_per_op.min, p.guest_us_per_op.max, ratio,
            p.vmm_ns_per_pte_update.median, p.flushes_performed.median, p.flushes_avoided.median
        );
    }
    let _ = writeln!(o, "\n## Ratios (guest µs/op and MMU hypercalls/op)\n\n| workload | pv ÷ pv-lazy/1024 (µs) | pv-lazy/1024 ÷ native (µs) | pv ÷ pv-lazy/1024 (hypercalls) |\n|---|---|---|---|");
    for w in WORKLOADS {
        let (pv, lazy, nat) = (
            find(points, w, "pv"),
            find(points, w, "pv-lazy/1024"),
            find(points, w, "native"),
        );
        let r = |a: Option<&Point>, b: Option<&Point>, f: fn(&Point) -> f64| match (a, b) {
            (Some(a), Some(b)) if f(b) > 0.0 => format!("{:.2}", f(a) / f(b)),
            _ => "-".into(),
        };
        let _ = writeln!(
            o,
            "| {w} | {} | {} | {} |",
            r(pv, lazy, |p| p.guest_us_per_op.median),
            r(lazy, nat, |p| p.guest_us_per_op.median),
            r(pv, lazy, |p| p.mmu_hypercalls_per_op.median)
        );
    }
    let _ = writeln!(
        o,
        "\nPlots: `exits_per_op.svg`, `us_per_op.svg`. Raw data: `results.json`."
    );
    o
}

fn plot(points: &[Point], metric: &str, path: &std::path::Path, title: &str) -> Result<(), String> {
    use plotters::prelude::*;
    let modes: Vec<String> = {
        let mut m: Vec<String> = points.iter().map(|p| p.mode.clone()).collect();
        m.dedup();
        m
    };
    let val = |p: &Point| {
        if metric == "exits" {
            p.exits_per_op.median
        } else {
            p.guest_us_per_op.median
        }
    };
    let ymax = points.iter().map(val).fold(0.0, f64::max).max(1e-3) * 1.1;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..(modes.len().max(1) as f64 - 0.5).max(0.5), 0f64..ymax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_labels(modes.len().max(1))
        .x_label_formatter(&|x| modes.get(x.round() as usize).cloned().unwrap_or_default())
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, w) in WORKLOADS.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let series: Vec<(f64, f64)> = modes
            .iter()
            .enumerate()
            .filter_map(|(x, m)| find(points, w, m).map(|p| (x as f64, val(p))))
            .collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(*w)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                series
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
