//! The SVM bed's column set: `make bench` runs the five strategies inside the SVM test bed
//! (`tests/svm-bed`, step `bench:<pages>x<repeat>:<transport>`), which brings the bed's
//! `results.json` out into a directory; `--bed=DIR` renders it here beside this host's
//! figures. Absolute times in the bed are inflated by QEMU's emulation, so the comparable
//! figures are counts (exits, updates per exit) and ratios within each host's own run (to
//! its exit floor, pv-lazy ÷ native).

use crate::report::{phases_header, phases_row, resync_verdict};
use crate::smp_cost::{self, CostPoint};
use crate::{strategies::FIVE, Point, WORKLOADS};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

/// The bed's matrix as read back from its `results.json`.
struct Bed {
    points: Vec<Point>,
    floor: Value,
    host: Value,
    pages: u64,
    repeat: u64,
    errors: usize,
    /// The remote-flush cost rows (a `benchcost:` step, or a `benchcostonly:` one in
    /// `dir/cost/`), the bed's load meanwhile and the exit floor of their run.
    cost: Vec<CostPoint>,
    cost_load: smp_cost::Load,
    cost_floor: Value,
}

/// The cost rows, their load and exit floor from a `results.json`.
fn cost_of(v: &Value) -> (Vec<CostPoint>, smp_cost::Load, Value) {
    (
        serde_json::from_value(v["smp_cost"].clone()).unwrap_or_default(),
        serde_json::from_value(v["smp_cost_load"].clone()).unwrap_or_default(),
        v["exit_floor"].clone(),
    )
}

/// Reads `dir/results.json`; the error says why there is none. `dir/SKIPPED` holds the
/// reason when the bed could not run, and wins over an older `results.json`.
fn load(dir: &Path) -> Result<Bed, String> {
    if let Ok(why) = std::fs::read_to_string(dir.join("SKIPPED")) {
        return Err(why.trim().to_string());
    }
    let file = dir.join("results.json");
    let text =
        std::fs::read_to_string(&file).map_err(|e| format!("no {} ({e})", file.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let points: Vec<Point> = serde_json::from_value(v["points"].clone())
        .map_err(|e| format!("{}: points: {e}", file.display()))?;
    if points.is_empty() {
        return Err(format!("{} has no points", file.display()));
    }
    // A cost-only run of its own (`benchcost:` puts its rows in the main one).
    let own = std::fs::read_to_string(dir.join("cost").join("results.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok());
    let (cost, cost_load, cost_floor) = cost_of(own.as_ref().unwrap_or(&v));
    Ok(Bed {
        points,
        floor: v["exit_floor"].clone(),
        host: v["host"].clone(),
        pages: v["pages"].as_u64().unwrap_or(0),
        repeat: v["repeat"].as_u64().unwrap_or(0),
        errors: v["errors"].as_array().map_or(0, Vec::len),
        cost,
        cost_load,
        cost_floor,
    })
}

fn labels() -> Vec<String> {
    FIVE.iter()
        .map(|(m, b)| b.map_or(m.to_string(), |b| format!("{m}/{b}")))
        .collect()
}

fn find<'a>(points: &'a [Point], w: &str, mode: &str) -> Option<&'a Point> {
    points.iter().find(|p| p.workload == w && p.mode == mode)
}

fn floor_ns(floor: &Value) -> f64 {
    floor["floor_ns"].as_f64().unwrap_or(0.0)
}

/// `f` of the point, formatted with `digits`, or `-`.
fn cell(p: Option<&Point>, digits: usize, f: impl Fn(&Point) -> f64) -> String {
    p.map_or("-".into(), |p| format!("{:.*}", digits, f(p)))
}

fn describe(o: &mut String, who: &str, host: &Value, points: &[Point], floor: &Value, cfg: String) {
    let _ = writeln!(
        o,
        "- **{who}**: {} ({} CPUs), Linux {}{}. Transport: {}. Resync: {}. Exit floor (bare port write, same run): {:.0} ns. {cfg}.",
        host["cpu"].as_str().unwrap_or("?"),
        host["cpus"],
        host["kernel"].as_str().unwrap_or("?"),
        host["kvm_paging"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map_or(String::new(), |s| format!(", {s}")),
        host["transport"].as_str().unwrap_or("?"),
        resync_verdict(host, points),
        floor_ns(floor),
    );
}

fn cells_table(o: &mut String, here: &[Point], hf: f64, bed: &Bed) {
    let bf = floor_ns(&bed.floor);
    let _ = writeln!(o, "\n| workload | mode | exits/op here | exits/op bed | µs/op ÷ exit floor here | µs/op ÷ exit floor bed | VMM ns/PTE update here | VMM ns/PTE update bed | VMM ns/update ÷ exit floor here | VMM ns/update ÷ exit floor bed |");
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|");
    let per_floor = |f: f64| {
        move |p: &Point| {
            if f > 0.0 {
                p.guest_us_per_op.median * 1000.0 / f
            } else {
                0.0
            }
        }
    };
    let ns_floor = |f: f64| {
        move |p: &Point| {
            if f > 0.0 {
                p.vmm_ns_per_pte_update.median / f
            } else {
                0.0
            }
        }
    };
    for w in WORKLOADS {
        for m in labels() {
            let (h, b) = (find(here, w, &m), find(&bed.points, w, &m));
            if h.is_none() && b.is_none() {
                continue;
            }
            let native = m == "native";
            let ns = |p: Option<&Point>, d| {
                if native {
                    "-".into()
                } else {
                    cell(p, d, |p| p.vmm_ns_per_pte_update.median)
                }
            };
            let nsf = |p: Option<&Point>, f| {
                if native {
                    "-".into()
                } else {
                    cell(p, 3, ns_floor(f))
                }
            };
            let _ = writeln!(
                o,
                "| {w} | {m} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(h, 3, |p| p.exits_per_op.median),
                cell(b, 3, |p| p.exits_per_op.median),
                cell(h, 2, per_floor(hf)),
                cell(b, 2, per_floor(bf)),
                ns(h, 0),
                ns(b, 0),
                nsf(h, hf),
                nsf(b, bf),
            );
        }
    }
}

fn ops_table(o: &mut String, here: &[Point], bed: &Bed) {
    let _ = writeln!(o, "\nPTE updates per exit per operation (ZERO_FRAME not counted; bulk operations put at most a run's pages in one exit), and for the fault path PTE updates per fault:\n");
    let _ = writeln!(
        o,
        "| operation | pv here | pv bed | pv-lazy/1024 here | pv-lazy/1024 bed |\n|---|---|---|---|---|"
    );
    let ops = [
        ("populate", "populate"),
        ("zap", "zap"),
        ("mprotect", "mprotect"),
        ("mremap", "mremap"),
        ("fork", "fork_cow"),
        ("fault (demand-zero)", "populate"),
    ];
    for (op, w) in ops {
        let fault = op.starts_with("fault");
        let f = |pts: &[Point], m: &str| {
            find(pts, w, m)
                .and_then(|p| p.ops.get(op))
                .map_or("-".into(), |x| {
                    if fault {
                        format!("{:.1}/fault", x.updates_per_fault.median)
                    } else {
                        format!("{:.1}", x.updates_per_exit.median)
                    }
                })
        };
        let _ = writeln!(
            o,
            "| {op} | {} | {} | {} | {} |",
            f(here, "pv"),
            f(&bed.points, "pv"),
            f(here, "pv-lazy/1024"),
            f(&bed.points, "pv-lazy/1024"),
        );
    }
}

/// pv-lazy/1024 ÷ native guest µs/op of workload `w`.
fn lazy_over_native(points: &[Point], w: &str) -> Option<f64> {
    let l = find(points, w, "pv-lazy/1024")?.guest_us_per_op.median;
    let n = find(points, w, "native")?.guest_us_per_op.median;
    (n > 0.0 && l > 0.0).then_some(l / n)
}

fn geo(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp())
}

fn ratio_table(o: &mut String, here: &[Point], bed: &Bed) {
    let _ = writeln!(
        o,
        "\n| workload | pv-lazy/1024 ÷ native here | pv-lazy/1024 ÷ native bed |\n|---|---|---|"
    );
    let (mut hs, mut bs) = (Vec::new(), Vec::new());
    let fmt = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.2}"));
    for w in WORKLOADS {
        let (h, b) = (lazy_over_native(here, w), lazy_over_native(&bed.points, w));
        hs.extend(h);
        bs.extend(b);
        let _ = writeln!(o, "| {w} | {} | {} |", fmt(h), fmt(b));
    }
    let _ = writeln!(
        o,
        "| geometric mean | {} | {} |",
        fmt(geo(&hs)),
        fmt(geo(&bs))
    );
}

fn phases_table(o: &mut String, here: &[Point], bed: &Bed) {
    let _ = writeln!(o, "\nMMU_BATCH phases, ns per PT_UPDATE applied (summed over the workloads, as in the phases table above):\n");
    phases_header(o, &["mode", "host", "PT_UPDATEs"]);
    for m in ["pv", "pv-lazy/1024", "emulate", "wrpt"] {
        for (who, pts) in [("here", here), ("bed", &bed.points[..])] {
            phases_row(o, &format!("| {m} | {who}"), m, pts);
        }
    }
}

/// The section: both hosts stated, then the bed's figures beside this host's (`here`,
/// `floor`, `host`); or why the bed's matrix is missing.
pub fn section(o: &mut String, here: &[Point], floor: &Value, host: &Value, dir: &Path) {
    let _ = writeln!(o, "\n## This host and the SVM bed side by side\n");
    let bed = match load(dir) {
        Ok(b) => b,
        Err(why) => {
            let _ = writeln!(
                o,
                "The SVM bed's column set was not measured in this run: {why}."
            );
            return;
        }
    };
    let _ = writeln!(o, "The same five strategies in the SVM test bed (`tests/svm-bed`: QEMU TCG with `-cpu qemu64,+svm,+npt`, a stock Debian kernel with kvm_amd, pvmm and its guest inside; the bed's own report and raw data are in `{}`). **QEMU TCG + SVM/NPT bed: absolute µs are emulation-inflated; compare ratios** (to each host's own exit floor, measured in the same run) and counts.\n", dir.display());
    let here_pages = here.first().map_or(0, |p| p.pages);
    describe(
        o,
        "This host",
        host,
        here,
        floor,
        format!("{here_pages} pages per run"),
    );
    let cfg = format!(
        "{} pages per run, {} repetition(s){}",
        bed.pages,
        bed.repeat,
        if bed.errors > 0 {
            format!(", {} runs failed", bed.errors)
        } else {
            String::new()
        }
    );
    describe(o, "SVM bed", &bed.host, &bed.points, &bed.floor, cfg);
    if u64::from(here_pages) != bed.pages {
        let _ = writeln!(o, "\nThe two ran different page counts: per-page figures include each run's set-up amortized over its pages, and bulk operations can put at most one run's pages in an exit.");
    }
    cells_table(o, here, floor_ns(floor), &bed);
    ops_table(o, here, &bed);
    ratio_table(o, here, &bed);
    phases_table(o, here, &bed);
    cost_rows(o, &bed);
}

/// The bed's remote-flush cost rows, where its run had them: there the kernel flush or
/// the kick is the delivery (nested paging, no resync), so they are the figures the goal
/// is about.
fn cost_rows(o: &mut String, bed: &Bed) {
    if bed.cost.is_empty() {
        let _ = writeln!(o, "\nThe bed's run had no remote-flush cost rows (a `bench:` step; `make bench BENCH_SVM_COST=1` adds them).");
        return;
    }
    let _ = writeln!(
        o,
        "\n### Remote-flush cost per target vCPU in the SVM bed, in its exit floors\n"
    );
    smp_cost::table(o, &bed.cost, &bed.cost_load, floor_ns(&bed.cost_floor));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn point(w: &str, mode: &str, us: f64, exits: f64) -> Value {
        let st = |x: f64| json!({"median": x, "min": x, "max": x});
        json!({"workload": w, "mode": mode, "mmu": mode.split('/').next(), "fault_around": 16,
            "pages": 16, "exits_per_op": st(exits), "mmu_hypercalls_per_op": st(0.0),
            "pte_updates_per_hypercall": st(0.0), "faults_per_op": st(0.0),
            "guest_us_per_op": st(us), "vmm_ns_per_pte_update": st(500.0),
            "vmm_pte_updates": st(100.0), "phases_ns": {"apply": st(20000.0)},
            "host_resyncs": st(0.0), "flushes_performed": st(0.0), "flushes_avoided": st(0.0),
            "ops": {}, "ptes_per_pt_page": st(0.0), "trapped_per_op": st(0.0),
            "revalidated_per_rehook": st(0.0), "spurious_per_op": st(0.0)})
    }

    fn dir(name: &str) -> std::path::PathBuf {
        let d = pvmm_e2e::temp(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_bed_columns_stand_beside_this_hosts() {
        let d = dir("bed-columns");
        let bed = json!({"pages": 16, "repeat": 1, "errors": [],
            "exit_floor": {"floor_ns": 100000.0},
            "host": {"cpu": "QEMU Virtual CPU", "transport": "vmcall (forced)",
                "pool_resync_needed": false, "kvm_paging": "kvm_amd npt=Y"},
            "points": [point("zap", "native", 400.0, 1.0), point("zap", "pv-lazy/1024", 600.0, 2.0)]});
        std::fs::write(d.join("results.json"), bed.to_string()).unwrap();
        let here: Vec<Point> = serde_json::from_value(json!([
            point("zap", "native", 20.0, 3.0),
            point("zap", "pv-lazy/1024", 10.0, 4.0)
        ]))
        .unwrap();
        let host = json!({"cpu": "EPYC", "transport": "pio", "pool_resync_needed": true});
        let mut o = String::new();
        section(&mut o, &here, &json!({"floor_ns": 10000.0}), &host, &d);
        assert!(
            o.contains("absolute µs are emulation-inflated; compare ratios"),
            "{o}"
        );
        assert!(
            o.contains("Resync: not needed") && o.contains("Resync: needed"),
            "{o}"
        );
        // µs/op ÷ floor: 10 µs / 10 µs here, 600 µs / 100 µs in the bed; exits beside.
        assert!(
            o.contains(
                "| zap | pv-lazy/1024 | 4.000 | 2.000 | 1.00 | 6.00 | 500 | 500 | 0.050 | 0.005 |"
            ),
            "{o}"
        );
        assert!(o.contains("| zap | 0.50 | 1.50 |"), "pv-lazy ÷ native: {o}");
        assert!(
            o.contains("| pv-lazy/1024 | bed | 100 | 0 | 0 | 200 |"),
            "phases: {o}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_skipped_bed_says_why() {
        let d = dir("bed-skipped");
        std::fs::write(d.join("SKIPPED"), "the SVM bed skipped: no QEMU\n").unwrap();
        std::fs::write(d.join("results.json"), "{\"points\": []}").unwrap();
        let mut o = String::new();
        section(&mut o, &[], &Value::Null, &Value::Null, &d);
        assert!(
            o.contains("not measured in this run: the SVM bed skipped: no QEMU."),
            "{o}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
