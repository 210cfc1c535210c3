//! The five page-table update strategies side by side (native, a hypercall per update,
//! batched, trap-and-emulate, writable page tables): guest µs and exits per page, PTEs
//! written per page-table page between two flushes, the trap modes' own figures, ratios
//! within the run, and a conclusion computed from them.

use crate::{Point, WORKLOADS};
use std::fmt::Write as _;

/// The five strategies: (`mmu=`, `lazy_batch=`), in report order.
pub const FIVE: [(&str, Option<u32>); 5] = [
    ("native", None),
    ("pv", None),
    ("pv-lazy", Some(1024)),
    ("emulate", None),
    ("wrpt", None),
];

/// The four PV strategies (native makes no exits and is the floor, not a contender).
const PV: [&str; 4] = ["pv", "pv-lazy/1024", "emulate", "wrpt"];

fn get<'a>(points: &'a [Point], w: &str, m: &str) -> Option<&'a Point> {
    points.iter().find(|p| p.workload == w && p.mode == m)
}

fn us(p: &Point) -> f64 {
    p.guest_us_per_op.median
}

/// The fastest PV strategy of workload `w` and its µs/op.
fn winner(points: &[Point], w: &str) -> Option<(&'static str, f64)> {
    PV.iter()
        .filter_map(|m| get(points, w, m).map(|p| (*m, us(p))))
        .filter(|(_, t)| *t > 0.0)
        .min_by(|a, b| a.1.total_cmp(&b.1))
}

fn table(o: &mut String, points: &[Point]) {
    let _ = writeln!(o, "| workload | PTEs per PT page between flushes | native µs/op | pv µs/op | pv-lazy µs/op | emulate µs/op | wrpt µs/op | exits/op pv / lazy / emulate / wrpt | emulate ÷ pv-lazy | wrpt ÷ pv-lazy | wrpt ÷ emulate | fastest PV strategy |");
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for w in WORKLOADS {
        let g = |m: &str| get(points, w, m);
        let cell = |m: &str| g(m).map_or("-".into(), |p| format!("{:.0}", us(p)));
        let exits: Vec<String> = PV
            .iter()
            .map(|m| g(m).map_or("-".into(), |p| format!("{:.2}", p.exits_per_op.median)))
            .collect();
        let div = |a: &str, b: &str| match (g(a), g(b)) {
            (Some(a), Some(b)) if us(b) > 0.0 => format!("{:.2}", us(a) / us(b)),
            _ => "-".into(),
        };
        let ptes = g("pv-lazy/1024")
            .or_else(|| g("native"))
            .map_or("-".into(), |p| format!("{:.1}", p.ptes_per_pt_page.median));
        let win = winner(points, w).map_or("-".into(), |(m, _)| m.to_string());
        let _ = writeln!(
            o,
            "| {w} | {ptes} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {win} |",
            cell("native"),
            cell("pv"),
            cell("pv-lazy/1024"),
            cell("emulate"),
            cell("wrpt"),
            exits.join(" / "),
            div("emulate", "pv-lazy/1024"),
            div("wrpt", "pv-lazy/1024"),
            div("wrpt", "emulate"),
        );
    }
}

fn trap_table(o: &mut String, points: &[Point]) {
    let _ = writeln!(o, "\n| workload | emulate: trapped stores/op | wrpt: trapped stores/op | wrpt: entries re-validated per re-hook | wrpt: spurious faults/op |");
    let _ = writeln!(o, "|---|---|---|---|---|");
    for w in WORKLOADS {
        let f = |m: &str, h: fn(&Point) -> f64| {
            get(points, w, m).map_or("-".into(), |p| format!("{:.2}", h(p)))
        };
        let _ = writeln!(
            o,
            "| {w} | {} | {} | {} | {} |",
            f("emulate", |p| p.trapped_per_op.median),
            f("wrpt", |p| p.trapped_per_op.median),
            f("wrpt", |p| p.revalidated_per_rehook.median),
            f("wrpt", |p| p.spurious_per_op.median),
        );
    }
}

/// Geometric mean of `a ÷ b` (µs/op) over the workloads that have both.
fn geo_ratio(points: &[Point], a: &str, b: &str) -> Option<f64> {
    let rs: Vec<f64> = WORKLOADS
        .iter()
        .filter_map(|w| Some((get(points, w, a)?, get(points, w, b)?)))
        .filter(|(x, y)| us(x) > 0.0 && us(y) > 0.0)
        .map(|(x, y)| (us(x) / us(y)).ln())
        .collect();
    (!rs.is_empty()).then(|| (rs.iter().sum::<f64>() / rs.len() as f64).exp())
}

/// Geometric mean of `a ÷ b` of exits per page over the workloads that have both.
fn geo_exits(points: &[Point], a: &str, b: &str) -> Option<f64> {
    let rs: Vec<f64> = WORKLOADS
        .iter()
        .filter_map(|w| Some((get(points, w, a)?, get(points, w, b)?)))
        .map(|(x, y)| (x.exits_per_op.median, y.exits_per_op.median))
        .filter(|(x, y)| *x > 0.0 && *y > 0.0)
        .map(|(x, y)| (x / y).ln())
        .collect();
    (!rs.is_empty()).then(|| (rs.iter().sum::<f64>() / rs.len() as f64).exp())
}

/// The workload with the fewest PTEs per page-table page between flushes, and that count.
fn sparsest(points: &[Point]) -> Option<(&'static str, f64)> {
    WORKLOADS
        .iter()
        .filter_map(|w| get(points, w, "pv-lazy/1024").map(|p| (*w, p.ptes_per_pt_page.median)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
}

fn conclusion(o: &mut String, points: &[Point], software_kvm: bool) {
    let mut wins: Vec<(&str, usize)> = PV.iter().map(|m| (*m, 0)).collect();
    for w in WORKLOADS {
        if let Some((m, _)) = winner(points, w) {
            if let Some(c) = wins.iter_mut().find(|(x, _)| *x == m) {
                c.1 += 1;
            }
        }
    }
    let wins: Vec<String> = wins.iter().map(|(m, n)| format!("{m} {n}")).collect();
    let r = |a, b| geo_ratio(points, a, b).map_or("-".into(), |x| format!("{x:.2}"));
    let e = |a, b| geo_exits(points, a, b).map_or("-".into(), |x| format!("{x:.2}"));
    let ptes: Vec<f64> = WORKLOADS
        .iter()
        .filter_map(|w| get(points, w, "pv-lazy/1024"))
        .map(|p| p.ptes_per_pt_page.median)
        .collect();
    let (lo, hi) = ptes
        .iter()
        .fold((f64::MAX, 0.0f64), |(l, h), &x| (l.min(x), h.max(x)));
    let _ = writeln!(o, "\n**Conclusion (computed from the tables above, one run).** Fastest PV strategy per workload: {}. Geometric means over the workloads, µs/op: emulate ÷ pv-lazy = {}, wrpt ÷ pv-lazy = {}, wrpt ÷ emulate = {}, pv ÷ pv-lazy = {}, pv-lazy ÷ native = {}; exits/op: emulate ÷ pv-lazy = {}, wrpt ÷ pv-lazy = {}, pv ÷ pv-lazy = {}. PTEs written per page-table page between two flushes range from {:.1} to {:.1}.",
        wins.join(", "),
        r("emulate", "pv-lazy/1024"),
        r("wrpt", "pv-lazy/1024"),
        r("wrpt", "emulate"),
        r("pv", "pv-lazy/1024"),
        r("pv-lazy/1024", "native"),
        e("emulate", "pv-lazy/1024"),
        e("wrpt", "pv-lazy/1024"),
        e("pv", "pv-lazy/1024"),
        if ptes.is_empty() { 0.0 } else { lo },
        hi,
    );
    if let Some((w, n)) = sparsest(points) {
        let sp = get(points, w, "wrpt").map_or(0.0, |p| p.spurious_per_op.median);
        let rv = get(points, w, "wrpt").map_or(0.0, |p| p.revalidated_per_rehook.median);
        let _ = writeln!(o, "\nWhere fewest PTEs change per page-table page between flushes ({w}: {n:.1}), writable page tables re-validate {rv:.1} entries per re-hook and take {sp:.2} spurious faults per page.");
    }
    let dense = |a: &str| geo_exits(points, a, "pv-lazy/1024").unwrap_or(0.0);
    let per_store = geo_ratio(points, "emulate", "pv").unwrap_or(0.0);
    let _ = writeln!(
        o,
        "Writable page tables make {:.2}x the exits of pv-lazy and emulation {:.2}x (geometric means); emulation's guest time is {:.2}x that of one hypercall per update ({}).",
        dense("wrpt"),
        dense("emulate"),
        per_store,
        if per_store < 1.0 {
            "a trapped store costs the guest less than building and sending an entry"
        } else {
            "a trapped store costs the guest no less than a hypercall"
        }
    );
    if software_kvm {
        let _ = writeln!(o, "\nOn this host guest CPL 0 code is emulated (about 1 µs per instruction), so µs/op orders the strategies by the guest kernel instructions each update costs (queueing and sending entries, or one store) more than by exits; host resyncs (memslot re-registrations, counted in the last table) and the other helpers' load on the 2 CPUs make µs/op spread between repetitions, while exits/op and the PTE counts are exact.");
    }
}

/// The five-strategy section of the report.
pub fn section(o: &mut String, points: &[Point], software_kvm: bool) {
    if !points.iter().any(|p| p.mmu == "emulate" || p.mmu == "wrpt") {
        return;
    }
    let _ = writeln!(o, "## Five strategies: hypercall, batched, trap-and-emulate, writable page tables (and native)\n");
    let _ = writeln!(o, "`pv`: one MMU_BATCH hypercall per update; `pv-lazy/1024`: updates batched per lazy section; `emulate`: plain stores to the page tables, each trapped (a store through the read-only RAM alias exits as MMIO) and validated like a PT_UPDATE; `wrpt`: the first trapped store to an L1 unhooks it, later stores are plain, and it is re-validated in one pass at the next MMU hypercall or spurious fault. All at `fault_around=16`, µs/op is guest time per page. *PTEs per PT page between flushes* is the guest's count of PTE writes per distinct page-table page within one flush window (an outermost lazy section, or one write outside any), the quantity the 2006 thread argued about; it is a property of the workload (the same in every mode), shown from the pv-lazy run. Ratios are of medians within this run.\n");
    table(o, points);
    trap_table(o, points);
    conclusion(o, points, software_kvm);
    let _ = writeln!(o);
}

/// Geometric mean over the SMP cells of `a ÷ b` remote flushes sent per operation.
fn smp_ratio(points: &[crate::smp::SmpPoint], a: &str, b: &str) -> Option<f64> {
    let sent = |p: &crate::smp::SmpPoint| p.remote_sent_per_op.as_ref().map(|s| s.median);
    let rs: Vec<f64> = points
        .iter()
        .filter(|p| p.mmu == a)
        .filter_map(|x| {
            let y = points
                .iter()
                .find(|y| y.mmu == b && y.workload == x.workload && y.vcpus == x.vcpus)?;
            Some((sent(x)?, sent(y)?))
        })
        .filter(|(x, y)| *x > 0.0 && *y > 0.0)
        .map(|(x, y)| (x / y).ln())
        .collect();
    (!rs.is_empty()).then(|| (rs.iter().sum::<f64>() / rs.len() as f64).exp())
}

/// The SMP comparison of the trap modes, after the SMP table (computed from its cells).
pub fn smp_note(o: &mut String, points: &[crate::smp::SmpPoint]) {
    let r = |a| smp_ratio(points, a, "pv-lazy");
    if let (Some(w), Some(e)) = (r("wrpt"), r("emulate")) {
        let _ = writeln!(o, "\nRemote flushes sent per operation, geometric mean over the SMP cells: wrpt ÷ pv-lazy = {w:.2}, emulate ÷ pv-lazy = {e:.2} (every unhook drops a parent entry other vCPUs may hold; every trapped store that needs a flush is one delivery).");
    }
}
