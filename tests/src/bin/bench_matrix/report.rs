//! `report.md`: the host, the five strategies side by side (`strategies`), the headline
//! (per-operation PTE updates per exit, the fault path, VMM cost per update, pv-lazy ÷
//! native), the MMU_BATCH phases, then every cell.

use crate::run::FA_DEFAULT;
use crate::{Point, WORKLOADS};
use serde_json::{json, Value};
use std::fmt::Write as _;
use vmm::hcall::contract::NON_UPDATE_PHASES;

/// The nested-paging switches of the loaded KVM module (`kvm_amd npt=Y`), or "".
fn kvm_paging() -> String {
    [
        ("kvm_amd npt", "/sys/module/kvm_amd/parameters/npt"),
        ("kvm_intel ept", "/sys/module/kvm_intel/parameters/ept"),
    ]
    .iter()
    .filter_map(|(k, p)| Some(format!("{k}={}", std::fs::read_to_string(p).ok()?.trim())))
    .collect::<Vec<_>>()
    .join(", ")
}

/// What the report says about the host: CPU, kernel, hardware virtualization, the transport
/// and pool-resync verdict the VMM reported (`vm`: a baseline run's stats), `--host-note`.
pub fn host_facts(a: &crate::Args, vm: &Value) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let hw = flags.split_whitespace().any(|f| f == "vmx" || f == "svm");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let used = vm["hypercall_transport"].as_str().unwrap_or("?");
    let transport = if a.transport == "pio" {
        format!("{used} (forced with --hypercall pio in every run)")
    } else {
        format!(
            "{used} (--hypercall {} in every UP run{})",
            a.transport,
            if a.smp {
                "; the SMP rows force pio"
            } else {
                ""
            }
        )
    };
    json!({
        "cpu": field("model name"),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "kernel": kernel.trim(),
        "hardware_virtualization": hw,
        "kvm_paging": kvm_paging(),
        "transport": transport,
        "hypercall_transport": used,
        "pool_resync_needed": vm["pool_resync"]["needed"],
        "pool_resync_choice": vm["pool_resync"]["choice"],
        "leaf_zap": vm["pool_resync"]["leaf_zap"],
        "note": a.host_note,
    })
}

/// One line of machine-readable host facts (the SVM bed's judge reads it).
pub fn host_line(host: &Value) -> String {
    format!(
        "transport={} resync_needed={} hw_virt={} kvm_paging={}",
        host["hypercall_transport"].as_str().unwrap_or("?"),
        host["pool_resync_needed"],
        host["hardware_virtualization"],
        host["kvm_paging"].as_str().unwrap_or("").replace(' ', "_"),
    )
}

/// The pool-resync verdict of `host` and the resyncs counted in `points`, in words.
pub fn resync_verdict(host: &Value, points: &[Point]) -> String {
    let resyncs: f64 = points.iter().map(|p| p.host_resyncs.median).sum();
    let counted = format!("{resyncs:.0} host resyncs counted over the cells (medians)");
    match host["pool_resync_needed"].as_bool() {
        Some(true) if host["leaf_zap"].as_bool() == Some(true) => format!("needed (the VMM's verdict, `vm.pool_resync.needed`; this KVM caches translations from the pool and sees only guest writes to it), with leaf zaps (`vm.pool_resync.leaf_zap`, docs/pv-abi.md §6.6): a changed leaf is forgotten by a zap of its old target frame's host mapping (MMU_BATCH phase `host_zap`), only other changes re-register memslots (host_resync time is an effect, outside MMU_BATCH time); {counted}"),
        Some(true) => format!("needed (the VMM's verdict, `vm.pool_resync.needed`): memslot re-registration after flushes (this KVM caches translations from the pool and sees only guest writes to it; host_resync time is an effect, outside MMU_BATCH time); {counted}"),
        Some(false) => format!("not needed (the VMM's verdict, `vm.pool_resync.needed`: its pool writes reach the running guest, nested paging); {counted}"),
        None if resyncs > 0.0 => format!("memslot re-registration after flushes; {counted}"),
        None => format!("none seen; {counted}"),
    }
}

fn find<'a>(points: &'a [Point], w: &str, mode: &str) -> Option<&'a Point> {
    points.iter().find(|p| p.workload == w && p.mode == mode)
}

/// `a ÷ b` of a figure of two points, or `-`.
fn div(a: Option<&Point>, b: Option<&Point>, f: fn(&Point) -> f64) -> String {
    match (a, b) {
        (Some(a), Some(b)) if f(b) > 0.0 => format!("{:.2}", f(a) / f(b)),
        _ => "-".into(),
    }
}

fn host_section(o: &mut String, points: &[Point], host: &Value, floor: &Value) {
    let hw = host["hardware_virtualization"].as_bool().unwrap_or(false);
    let paging = host["kvm_paging"].as_str().unwrap_or("");
    let _ = writeln!(
        o,
        "Host: {} ({} CPUs), Linux {}, {}{}. Transport: {}. Resync: {}.\n",
        host["cpu"].as_str().unwrap_or("?"),
        host["cpus"],
        host["kernel"].as_str().unwrap_or("?"),
        if hw {
            "hardware virtualization (vmx/svm) present"
        } else {
            "no vmx/svm: a software KVM"
        },
        if paging.is_empty() {
            String::new()
        } else {
            format!(" ({paging})")
        },
        host["transport"].as_str().unwrap_or("?"),
        resync_verdict(host, points),
    );
    if let Some(note) = host["note"].as_str() {
        let _ = writeln!(o, "{note}\n");
    }
    if !floor.is_null() {
        let _ = writeln!(
            o,
            "Exit floor (bare port write, measured in this run): {:.0} ns; NULL hypercall (pio doorbell): {:.0} ns; ratio {:.3}.\n",
            floor["floor_ns"].as_f64().unwrap_or(0.0),
            floor["null_ns"].as_f64().unwrap_or(0.0),
            floor["ratio"].as_f64().unwrap_or(0.0)
        );
    }
}

/// The headline modes: (label, column title).
const HEAD_MODES: [&str; 6] = [
    "pv",
    "pv fa=0",
    "pv-lazy/1024",
    "pv-lazy/1024 fa=0",
    "pv-lazy/256",
    "pv-lazy/16",
];

fn ops_section(o: &mut String, points: &[Point]) {
    let _ = writeln!(o, "## Headline: PTE updates per exit, per operation\n");
    let _ = writeln!(o, "An exit here is one MMU_BATCH hypercall (each is one userspace exit). PTE updates are the guest kernel's page-table writes (PT_UPDATE entries, leaf or not); **ZERO_FRAME entries are not counted as updates** (they zero a frame, they write no PTE), so a batch that also zeroes its new frames carries about twice as many entries: the second figure in each cell is entries per exit with ZERO_FRAME. Bulk operations are the op lines of the selftests (one call over all pages); the fault path is populate's demand-zero sweep (one fault per fault-around window). `fa=0` is `fault_around=0`, the behaviour before fault-around; unmarked modes use the default `fault_around={FA_DEFAULT}`. Native mode makes no exits for page-table writes.\n");
    let _ = write!(o, "| operation |");
    for m in HEAD_MODES {
        let _ = write!(o, " {m} |");
    }
    let _ = writeln!(o, "\n|---|{}", "---|".repeat(HEAD_MODES.len()));
    for (op, w) in [
        ("populate", "populate"),
        ("zap", "zap"),
        ("mprotect", "mprotect"),
        ("mremap", "mremap"),
        ("fork", "fork_cow"),
        ("fault (demand-zero)", "populate"),
    ] {
        let _ = write!(o, "| {op} |");
        for m in HEAD_MODES {
            let cell = find(points, w, m).and_then(|p| p.ops.get(op)).map_or_else(
                || "-".into(),
                |x| {
                    format!(
                        "{:.1} ({:.1})",
                        x.updates_per_exit.median, x.entries_per_exit.median
                    )
                },
            );
            let _ = write!(o, " {cell} |");
        }
        let _ = writeln!(o);
    }
}

fn fault_section(o: &mut String, points: &[Point]) {
    let _ = writeln!(o, "\n## The fault path (populate's demand-zero sweep)\n");
    let _ = writeln!(o, "| mode | faults/page | PTE updates/fault | exits/fault | PTE updates/exit | populate µs/op |\n|---|---|---|---|---|---|");
    for p in points.iter().filter(|p| p.workload == "populate") {
        let Some(f) = p.ops.get("fault (demand-zero)") else {
            continue;
        };
        let _ = writeln!(
            o,
            "| {} | {:.4} | {:.1} | {:.2} | {} | {:.2} |",
            p.mode,
            f.faults_per_page.median,
            f.updates_per_fault.median,
            f.exits_per_fault.median,
            if p.mmu == "native" {
                "-".to_string()
            } else {
                format!("{:.1}", f.updates_per_exit.median)
            },
            p.guest_us_per_op.median
        );
    }
}

fn ratio_section(o: &mut String, points: &[Point], host: &Value) {
    let _ = writeln!(
        o,
        "\n## Per workload: faults/op, µs/op, VMM ns/update, pv-lazy ÷ native\n"
    );
    let _ = writeln!(o, "VMM ns/update: MMU_BATCH time less its zero_frame, copy_frame, table_ops (PIN, UNPIN, NEW_BASEPTR, SET_KERNEL_ROOT, RELOCATE_TABLE: whole tables validated, torn down or shadowed, the boot's 5–12 ms pin of the kernel L4 among them), ad_ops (SYNC_AD, QUERY_AD) and host_zap phases, divided by the PT_UPDATEs the engine applied, both less the baseline run; the MMU_BATCH phases table below also has the total with the table and A/D operations. Host resyncs are outside MMU_BATCH time, and the leaf zaps that stand in for them are left out. {}\n", if host["pool_resync_needed"].as_bool() == Some(false) {
        "Ratios divide guest µs/op; this host needs no resync, so there are none in them."
    } else if host["leaf_zap"].as_bool() == Some(true) {
        "Ratios divide guest µs/op; on this host changed leaves are zapped (tens of µs each) rather than resynced, and guest kernel code, emulated at about 1 µs per instruction, dominates them."
    } else {
        "Ratios divide guest µs/op, which on this host are dominated by the host resyncs (memslot re-registrations of 0.6–9 ms each, varying with the host's load), so they spread widely between repetitions."
    });
    let _ = writeln!(o, "| workload | native µs/op | pv-lazy/1024 µs/op | pv-lazy ÷ native | native fa=0 µs/op | pv-lazy/1024 fa=0 µs/op | pv-lazy ÷ native (fa=0) | faults/op pv-lazy (fa=0) | VMM ns/update pv | VMM ns/update pv-lazy/1024 (fa=0) |\n|---|---|---|---|---|---|---|---|---|---|");
    let us = |p: &Point| p.guest_us_per_op.median;
    for w in WORKLOADS {
        let g = |m: &str| find(points, w, m);
        let f = |m: &str, h: fn(&Point) -> f64| g(m).map_or("-".into(), |p| format!("{:.2}", h(p)));
        let fo = |m: &str| g(m).map_or("-".into(), |p| format!("{:.3}", p.faults_per_op.median));
        let ns = |m: &str| {
            g(m).map_or("-".into(), |p| {
                format!("{:.0}", p.vmm_ns_per_pte_update.median)
            })
        };
        let _ = writeln!(
            o,
            "| {w} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} ({}) |",
            f("native", us),
            f("pv-lazy/1024", us),
            div(g("pv-lazy/1024"), g("native"), us),
            f("native fa=0", us),
            f("pv-lazy/1024 fa=0", us),
            div(g("pv-lazy/1024 fa=0"), g("native fa=0"), us),
            fo("pv-lazy/1024"),
            fo("pv-lazy/1024 fa=0"),
            ns("pv"),
            ns("pv-lazy/1024"),
            ns("pv-lazy/1024 fa=0"),
        );
    }
}

/// The header of a phases table: the leading `columns`, one per phase, then the total.
pub fn phases_header(o: &mut String, columns: &[&str]) {
    let _ = write!(o, "|");
    for c in columns.iter().chain(&PHASES) {
        let _ = write!(o, " {c} |");
    }
    let _ = writeln!(
        o,
        " per PT_UPDATE: total without {} | with table_ops and ad_ops |\n|{}---|---|",
        NON_UPDATE_PHASES.join(", "),
        "---|".repeat(columns.len() + PHASES.len())
    );
}

/// The MMU_BATCH phases, in report order.
pub const PHASES: [&str; 10] = [
    "request",
    "copy_in",
    "apply",
    "zero_frame",
    "copy_frame",
    "table_ops",
    "ad_ops",
    "end_batch",
    "host_zap",
    "response",
];

/// The PT_UPDATEs of mode `m` summed over the workloads, each phase's ns per PT_UPDATE (in
/// `PHASES` order) and their total without the [`NON_UPDATE_PHASES`]; None if the mode
/// applied none.
pub fn phases_per_update(points: &[Point], m: &str) -> Option<(f64, Vec<f64>, f64)> {
    let ps: Vec<&Point> = points.iter().filter(|p| p.mode == m).collect();
    let updates: f64 = ps.iter().map(|p| p.vmm_pte_updates.median).sum();
    if ps.is_empty() || updates <= 0.0 {
        return None;
    }
    let phase = |n: &str| -> f64 {
        ps.iter()
            .filter_map(|p| p.phases_ns.get(n))
            .map(|s| s.median)
            .sum::<f64>()
            / updates
            + 0.0 // an empty sum is -0.0
    };
    let per: Vec<f64> = PHASES.iter().map(|n| phase(n)).collect();
    let total = PHASES
        .iter()
        .zip(&per)
        .filter(|(n, _)| !NON_UPDATE_PHASES.contains(n))
        .map(|(_, v)| v)
        .sum();
    Some((updates, per, total))
}

fn phases_section(o: &mut String, points: &[Point]) {
    let _ = writeln!(o, "\n## MMU_BATCH phases\n");
    let _ = writeln!(o, "Where the VMM's MMU_BATCH time went (`mmu_batch_phases` in the stats JSON), summed over the six workloads (medians per workload, baseline subtracted as above), in ns per PT_UPDATE applied. `request`: block checks and decoding in the dispatcher; `copy_in`: the one copy of the entries; `apply`: engine lock, decode and apply of PT_UPDATE, INVLPG and FLUSH_TLB entries; `zero_frame`; `copy_frame`; `table_ops`: PIN, UNPIN, NEW_BASEPTR, SET_KERNEL_ROOT and RELOCATE_TABLE (whole tables validated, torn down or shadowed; the boot's pin of the kernel L4 is one); `ad_ops`: SYNC_AD and QUERY_AD; `end_batch`: flush/resync decision; `host_zap`: the leaf zaps that stand in for host resyncs (docs/pv-abi.md §6.6); `response`: the guarded response write.\n");
    phases_header(o, &["mode", "PT_UPDATEs"]);
    for m in [
        "pv",
        "pv fa=0",
        "pv-lazy/1024",
        "pv-lazy/1024 fa=0",
        "pv-lazy/16",
    ] {
        phases_row(o, &format!("| {m}"), m, points);
    }
}

/// The size classes of `mmu_batch_sizes` (docs/stats-json.md): their smallest and largest
/// PT_UPDATEs per batch, and their label.
const SIZE_CLASSES: [(u64, &str); 5] = [
    (0, "0"),
    (1, "1"),
    (2, "2–15"),
    (16, "16–255"),
    (256, "256+"),
];

/// The update cost of mode `m` by batch size, summed over the workloads (medians per
/// workload, baseline subtracted): per class, (label, batches, PT_UPDATEs, ns).
pub fn batch_size_sums(points: &[Point], m: &str) -> Vec<(&'static str, f64, f64, f64)> {
    let ps: Vec<&Point> = points.iter().filter(|p| p.mode == m).collect();
    let sum = |k: &str| -> f64 {
        ps.iter()
            .filter_map(|p| p.batch_sizes.get(k))
            .map(|s| s.median)
            .sum::<f64>()
            + 0.0
    };
    SIZE_CLASSES
        .iter()
        .map(|&(min, label)| {
            let f = |field: &str| sum(&format!("{min}.{field}"));
            (label, f("batches"), f("pt_updates"), f("update_ns"))
        })
        .filter(|&(_, batches, ..)| batches > 0.5)
        .collect()
}

fn batch_size_section(o: &mut String, points: &[Point]) {
    let _ = writeln!(
        o,
        "
## VMM cost by batch size
"
    );
    let _ = writeln!(o, "The update cost of the phases table (MMU_BATCH time without {}) split by the PT_UPDATEs each batch applied (`mmu_batch_sizes` in the stats JSON), summed over the six workloads (medians per workload, baseline subtracted). A batch costs a fixed amount whatever its size (dispatcher, engine lock, end of batch, response; class 0 holds batches of table, flush and frame entries only) and an amount per update: µs/batch of the small classes is the fixed cost, ns/PT_UPDATE of the largest class what an update adds. Run-wide ns/update (the tables above) mixes the two in the proportions of the workload.\n", NON_UPDATE_PHASES.join(", "));
    let _ = writeln!(
        o,
        "| mode | PT_UPDATEs per batch | batches | PT_UPDATEs | µs/batch | ns/PT_UPDATE |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    for m in ["pv", "pv-lazy/1024", "pv-lazy/1024 fa=0", "pv-lazy/16"] {
        for (label, batches, updates, ns) in batch_size_sums(points, m) {
            let per_update = if updates > 0.5 {
                format!("{:.0}", ns / updates)
            } else {
                "-".into()
            };
            let _ = writeln!(
                o,
                "| {m} | {label} | {batches:.0} | {updates:.0} | {:.2} | {per_update} |",
                ns / 1000.0 / batches
            );
        }
    }
}

/// One row of a phases table for mode `m` of `points`, led by `lead` (`| a | b` without the
/// closing bar); nothing where the mode has no PT_UPDATEs.
pub fn phases_row(o: &mut String, lead: &str, m: &str, points: &[Point]) {
    let Some((updates, per, total)) = phases_per_update(points, m) else {
        return;
    };
    let _ = write!(o, "{lead} | {updates:.0} |");
    let mut tables = 0.0;
    for (n, v) in PHASES.iter().zip(per) {
        let _ = write!(o, " {v:.0} |");
        if matches!(*n, "table_ops" | "ad_ops") {
            tables += v;
        }
    }
    let _ = writeln!(o, " {total:.0} | {:.0} |", total + tables);
}

fn all_section(o: &mut String, points: &[Point], floor: &Value) {
    let floor_us = floor["floor_ns"].as_f64().unwrap_or(0.0) / 1000.0;
    let _ = writeln!(o, "\n## Every cell\n");
    let _ = writeln!(o, "| workload | mode | exits/op | MMU hypercalls/op | PTE updates/hypercall | faults/op | guest µs/op | µs/op ÷ exit floor | VMM ns/PTE update | host resyncs | flushes performed | flushes avoided |");
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for p in points {
        let ratio = if floor_us > 0.0 {
            p.guest_us_per_op.median / floor_us
        } else {
            0.0
        };
        let _ = writeln!(
            o,
            "| {} | {} | {:.3} [{:.3}–{:.3}] | {:.4} | {:.1} | {:.3} | {:.2} [{:.2}–{:.2}] | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} |",
            p.workload, p.mode, p.exits_per_op.median, p.exits_per_op.min, p.exits_per_op.max,
            p.mmu_hypercalls_per_op.median, p.pte_updates_per_hypercall.median, p.faults_per_op.median,
            p.guest_us_per_op.median, p.guest_us_per_op.min, p.guest_us_per_op.max, ratio,
            p.vmm_ns_per_pte_update.median, p.host_resyncs.median, p.flushes_performed.median,
            p.flushes_avoided.median
        );
    }
}

/// The whole report.
pub fn report(points: &[Point], floor: &Value, host: &Value, pages: u32, repeat: u32) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# pvmm MMU-mode benchmark\n\n{pages} pages per workload run, {repeat} repetitions; medians (with [min–max] in the last table). An operation is one page. Regenerate with `make bench` (`BENCH_PAGES`, `BENCH_REPEAT`).\n");
    host_section(&mut o, points, host, floor);
    let software_kvm = !host["hardware_virtualization"].as_bool().unwrap_or(false);
    crate::strategies::section(&mut o, points, software_kvm);
    ops_section(&mut o, points);
    fault_section(&mut o, points);
    ratio_section(&mut o, points, host);
    phases_section(&mut o, points);
    batch_size_section(&mut o, points);
    all_section(&mut o, points, floor);
    let _ = writeln!(
        o,
        "\nPlots: `exits_per_op.svg`, `us_per_op.svg`. Raw data: `results.json`."
    );
    o
}
