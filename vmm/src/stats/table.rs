//! The `perf kvm stat report`-like table. Every `time%` column is a share of one total, the
//! VMM time summed over vCPUs, and the breakdown section adds up to it; per-vCPU and summed
//! figures are labelled as such.

use super::batch_size::BatchSizeRow;
use super::report::{Dist, Report, VcpuReport};
use crate::hcall::contract::NON_UPDATE_PHASES;
use std::fmt::Write as _;

/// KVM counters shown in the table (all are in the JSON).
const KVM_TABLE: [&str; 12] = [
    "exits",
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "pf_taken",
    "pf_guest",
    "pf_fixed",
    "tlb_flush",
    "invlpg",
    "insn_emulation",
    "hypercalls",
];

fn us(ns: u64) -> String {
    format!("{:.2}", ns as f64 / 1000.0)
}

fn ms(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1e6)
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        "0.00%".into()
    } else {
        format!("{:.2}%", part as f64 * 100.0 / whole as f64)
    }
}

/// The human-readable table.
pub fn to_table(r: &Report) -> String {
    let mut o = String::new();
    header(&mut o, r);
    exits(&mut o, &r.merged);
    breakdown(&mut o, &r.merged);
    ports(&mut o, &r.merged);
    hypercalls(&mut o, &r.merged);
    mmu_phases(&mut o, r);
    if r.vcpus.len() > 1 {
        per_vcpu(&mut o, r);
        smp(&mut o, r);
    }
    if let Some(mmu) = &r.mmu {
        let _ = writeln!(o, "\nShadow MMU (whole VM):");
        render_mmu(&mut o, mmu);
    }
    kvm_counters(&mut o, &r.merged);
    o
}

fn header(o: &mut String, r: &Report) {
    let m = &r.merged;
    let n = r.vm.vcpus;
    let probe = match (r.vm.transport_choice.as_str(), r.vm.transport_probe_cached) {
        ("auto", true) => "auto, cached probe verdict".to_string(),
        ("auto", false) => format!("auto, probe {} ms", ms(r.vm.transport_probe_ns)),
        (how, _) => how.to_string(),
    };
    let _ = writeln!(o, "\n=== pvmm exit statistics: {n} vCPU(s) ===");
    let _ = writeln!(
        o,
        "end: {} (exit code {})   wall: {} ms   hypercalls via: {} ({probe})",
        r.vm.end_reason,
        r.vm.exit_code,
        ms(r.vm.wall_ns),
        r.vm.hypercall_transport,
    );
    let pr = &r.vm.pool_resync;
    let how = match (pr.choice.as_str(), pr.probe_cached) {
        ("auto", true) => "auto, cached probe verdict".to_string(),
        ("auto", false) => format!("auto, probe {} ms", ms(pr.probe_ns)),
        (how, _) => how.to_string(),
    };
    let verdict = match (pr.needed, pr.leaf_zap) {
        (false, _) => "not needed",
        (true, false) => "needed",
        (true, true) => "needed, changed leaves zapped",
    };
    let remote = match (pr.remote_flush.as_str(), pr.kernel_flush.as_str()) {
        ("", _) => "kick".to_string(),
        (mode, "") => mode.to_string(),
        (mode, trigger) => format!("{mode} ({trigger})"),
    };
    let _ = writeln!(
        o,
        "pool resync: {verdict} ({how}); remote flushes: {remote}"
    );
    let cpu = m.kvm_run_ns + m.vmm_ns;
    let _ = writeln!(
        o,
        "vCPU time, summed over {n} vCPU(s): {} ms = in KVM_RUN {} ms ({}) + in the VMM {} ms ({})",
        ms(cpu),
        ms(m.kvm_run_ns),
        pct(m.kvm_run_ns, cpu),
        ms(m.vmm_ns),
        pct(m.vmm_ns, cpu),
    );
    let _ = writeln!(
        o,
        "time% below: share of the VMM time ({} ms); latencies in µs",
        ms(m.vmm_ns)
    );
}

fn dist_cols(d: &Dist) -> String {
    format!(
        "{:>9} {:>9} {:>9} {:>9} {:>9}",
        us(d.min_ns),
        us(d.mean_ns),
        us(d.p50_ns),
        us(d.p99_ns),
        us(d.max_ns)
    )
}

fn exits(o: &mut String, m: &VcpuReport) {
    let total_exits: u64 = m.exits.iter().map(|e| e.value.count).sum();
    let _ = writeln!(o, "\nUserspace exits, by VMM handling time (all vCPUs):");
    let _ = writeln!(
        o,
        "{:<16} {:>10} {:>8} {:>12} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "reason", "samples", "samples%", "time(µs)", "time%", "min", "mean", "p50", "p99", "max"
    );
    for e in &m.exits {
        let d = &e.value;
        let _ = writeln!(
            o,
            "{:<16} {:>10} {:>8} {:>12} {:>8} {}",
            e.name,
            d.count,
            pct(d.count, total_exits),
            us(d.total_ns),
            pct(d.total_ns, m.vmm_ns),
            dist_cols(d)
        );
    }
    let _ = writeln!(
        o,
        "{:<16} {:>10} {:>8} {:>12} {:>8}",
        "total",
        total_exits,
        "100.00%",
        us(m.vmm_ns),
        pct(m.vmm_ns, m.vmm_ns)
    );
}

fn breakdown(o: &mut String, m: &VcpuReport) {
    let _ = writeln!(
        o,
        "\nWhere the VMM time went (all vCPUs; rows add up to the total):"
    );
    let _ = writeln!(
        o,
        "{:<11} {:<44} {:>10} {:>12} {:>8}",
        "section", "item", "count", "time(µs)", "time%"
    );
    let mut sum = 0;
    for r in &m.vmm_breakdown {
        sum += r.total_ns;
        let count = if r.section == "other" {
            "-".to_string()
        } else {
            r.count.to_string()
        };
        let _ = writeln!(
            o,
            "{:<11} {:<44} {:>10} {:>12} {:>8}",
            r.section,
            r.name,
            count,
            us(r.total_ns),
            pct(r.total_ns, m.vmm_ns)
        );
    }
    let _ = writeln!(
        o,
        "{:<11} {:<44} {:>10} {:>12} {:>8}",
        "total",
        "",
        "",
        us(sum),
        pct(sum, m.vmm_ns)
    );
}

fn ports(o: &mut String, m: &VcpuReport) {
    if !m.pio.is_empty() {
        let _ = writeln!(
            o,
            "\nPort I/O exits (all vCPUs; the doorbell's time includes its hypercalls):"
        );
        let _ = writeln!(
            o,
            "{:<8} {:<4} {:<14} {:>10} {:>12} {:>8} {:>9} {:>9} {:>9}",
            "port", "dir", "device", "samples", "time(µs)", "time%", "mean", "p99", "max"
        );
        for p in &m.pio {
            let _ = writeln!(
                o,
                "{:<8} {:<4} {:<14} {:>10} {:>12} {:>8} {:>9} {:>9} {:>9}",
                format!("{:#x}", p.port),
                p.dir,
                p.device,
                p.dist.count,
                us(p.dist.total_ns),
                pct(p.dist.total_ns, m.vmm_ns),
                us(p.dist.mean_ns),
                us(p.dist.p99_ns),
                us(p.dist.max_ns)
            );
        }
    }
    for x in &m.mmio {
        let _ = writeln!(
            o,
            "mmio {:<12} {:<4} {:>10} {:>12} {:>8}",
            x.device,
            x.dir,
            x.dist.count,
            us(x.dist.total_ns),
            pct(x.dist.total_ns, m.vmm_ns)
        );
    }
}

fn hypercalls(o: &mut String, m: &VcpuReport) {
    if m.hypercalls.is_empty() {
        return;
    }
    let _ = writeln!(o, "\nHypercalls, by handling time (all vCPUs):");
    let _ = writeln!(
        o,
        "{:<12} {:>10} {:>12} {:>8} {:>9} {:>9} {:>9} {:>14}  errors",
        "op", "calls", "time(µs)", "time%", "mean", "p99", "max", "entries/call"
    );
    for h in &m.hypercalls {
        let errs: Vec<String> = h.errors.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let entries = h
            .entries_per_call
            .as_ref()
            .map(|d| format!("{:.1}", d.total as f64 / d.count.max(1) as f64))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            o,
            "{:<12} {:>10} {:>12} {:>8} {:>9} {:>9} {:>9} {:>14}  {}",
            h.op,
            h.dist.count,
            us(h.dist.total_ns),
            pct(h.dist.total_ns, m.vmm_ns),
            us(h.dist.mean_ns),
            us(h.dist.p99_ns),
            us(h.dist.max_ns),
            entries,
            if errs.is_empty() {
                "-".into()
            } else {
                errs.join(" ")
            }
        );
    }
    for e in &m.effects {
        let _ = writeln!(
            o,
            "  then {:<16} {:>8} x  total {:>12} µs ({})  mean {:>9} µs  p99 {:>9} µs",
            e.name,
            e.value.count,
            us(e.value.total_ns),
            pct(e.value.total_ns, m.vmm_ns),
            us(e.value.mean_ns),
            us(e.value.p99_ns)
        );
    }
}

/// Where MMU_BATCH time went, by phase, and the VMM's cost per PTE update without the
/// zeroing of ZERO_FRAME entries (host resyncs are effects, outside MMU_BATCH time).
fn mmu_phases(o: &mut String, r: &Report) {
    let m = &r.merged;
    if m.mmu_batch_phases.is_empty() {
        return;
    }
    let batch_ns = m
        .hypercalls
        .iter()
        .find(|h| h.op == "MMU_BATCH")
        .map_or(0, |h| h.dist.total_ns);
    let _ = writeln!(
        o,
        "\nMMU_BATCH phases (all vCPUs; share of MMU_BATCH time {} µs; latencies in µs):",
        us(batch_ns)
    );
    let _ = writeln!(
        o,
        "{:<12} {:>10} {:>12} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "phase", "batches", "time(µs)", "share", "min", "mean", "p50", "p99", "max"
    );
    for p in &m.mmu_batch_phases {
        let _ = writeln!(
            o,
            "{:<12} {:>10} {:>12} {:>8} {}",
            p.name,
            p.value.count,
            us(p.value.total_ns),
            pct(p.value.total_ns, batch_ns),
            dist_cols(&p.value)
        );
    }
    let updates = r
        .mmu
        .as_ref()
        .and_then(|v| v["pte_updates"].as_u64())
        .unwrap_or(0);
    let zero: u64 = m
        .mmu_batch_phases
        .iter()
        .filter(|p| NON_UPDATE_PHASES.contains(&p.name.as_str()))
        .map(|p| p.value.total_ns)
        .sum();
    if updates > 0 {
        let _ = writeln!(
            o,
            "per PTE update: {:.0} ns (MMU_BATCH time without {}, {} µs, / {} PT_UPDATEs)",
            batch_ns.saturating_sub(zero) as f64 / updates as f64,
            NON_UPDATE_PHASES.join(", "),
            us(batch_ns.saturating_sub(zero)),
            updates
        );
    }
    batch_sizes(o, &m.mmu_batch_sizes);
}

/// The update cost by batch size: what a batch costs whatever its size, and what each
/// update adds.
fn batch_sizes(o: &mut String, rows: &[BatchSizeRow]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(o, "by PT_UPDATEs per batch (the same time, split):");
    let _ = writeln!(
        o,
        "{:<12} {:>10} {:>12} {:>12} {:>14} {:>14}",
        "updates", "batches", "PT_UPDATEs", "time(µs)", "µs/batch", "ns/PT_UPDATE"
    );
    for r in rows {
        let class = match r.max_updates {
            Some(max) if max == r.min_updates => format!("{max}"),
            Some(max) => format!("{}-{max}", r.min_updates),
            None => format!("{}+", r.min_updates),
        };
        let per_update = if r.pt_updates > 0 {
            format!("{:.0}", r.update_ns as f64 / r.pt_updates as f64)
        } else {
            "-".to_string()
        };
        let _ = writeln!(
            o,
            "{:<12} {:>10} {:>12} {:>12} {:>14.2} {:>14}",
            class,
            r.batches,
            r.pt_updates,
            us(r.update_ns),
            r.update_ns as f64 / 1000.0 / r.batches.max(1) as f64,
            per_update
        );
    }
}

fn per_vcpu(o: &mut String, r: &Report) {
    let _ = writeln!(o, "\nPer vCPU:");
    let _ = writeln!(
        o,
        "{:<6} {:>10} {:>14} {:>14}",
        "vcpu", "exits", "KVM_RUN(ms)", "VMM(ms)"
    );
    for v in &r.vcpus {
        let _ = writeln!(
            o,
            "{:<6} {:>10} {:>14} {:>14}",
            v.vcpu.unwrap_or(0),
            v.exits_total,
            ms(v.kvm_run_ns),
            ms(v.vmm_ns)
        );
    }
}

/// Remote flush delivery and world stops, per vCPU (the vCPU whose batches caused them).
fn smp(o: &mut String, r: &Report) {
    let _ = writeln!(o, "\nSMP TLB (per issuing vCPU):");
    let _ = writeln!(
        o,
        "{:<6} {:>10} {:>8} {:>8} {:>8} {:>8} {:>12} {:>12} {:>9} {:>14}",
        "vcpu",
        "requested",
        "sent",
        "avoided",
        "kernel",
        "kicks",
        "kick p50 µs",
        "kick p99 µs",
        "w.stops",
        "w.stop mean µs"
    );
    for v in &r.vcpus {
        let s = &v.smp;
        let _ = writeln!(
            o,
            "{:<6} {:>10} {:>8} {:>8} {:>8} {:>8} {:>12} {:>12} {:>9} {:>14}",
            v.vcpu.unwrap_or(0),
            s.remote_flushes_requested,
            s.remote_flushes_sent,
            s.remote_flushes_avoided,
            s.kernel_flushes,
            s.kicks,
            us(s.kick_rtt.p50_ns),
            us(s.kick_rtt.p99_ns),
            s.world_stops,
            us(s.world_stop.mean_ns)
        );
    }
    let _ = writeln!(
        o,
        "kick p50 parts (µs): kick -> target out of KVM_RUN / -> acknowledged / -> issuer awake"
    );
    for v in r.vcpus.iter().filter(|v| v.smp.kick_rtt.count > 0) {
        let s = &v.smp;
        let _ = writeln!(
            o,
            "{:<6} {:>12} {:>12} {:>12}",
            v.vcpu.unwrap_or(0),
            us(s.kick_exit.p50_ns),
            us(s.kick_apply.p50_ns),
            us(s.kick_wake.p50_ns)
        );
    }
}

fn kvm_counters(o: &mut String, m: &VcpuReport) {
    if m.kvm.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\nKVM in-kernel counters (KVM_GET_STATS_FD, delta over the run, summed over vCPUs;\n\
         kept by the host's KVM, which counts exits it sees, handled in the kernel or not):"
    );
    for k in KVM_TABLE {
        if let Some(c) = m.kvm.get(k) {
            let _ = writeln!(o, "  {:<18} {:>12}", k, c.delta);
        }
    }
    let userspace_io: u64 = m.pio.iter().map(|p| p.dist.count).sum();
    let kvm_io = m.kvm.get("io_exits").map_or(0, |c| c.delta);
    if kvm_io == 0 && userspace_io > 0 {
        let _ = writeln!(
            o,
            "  note: io_exits is 0 although pvmm handled {userspace_io} port-I/O exits: this host's \
             KVM does not maintain that counter (a software KVM without VMX/SVM exit handlers)"
        );
    }
}

/// The page-table write trap's counters (guest mmu=emulate / mmu=wrpt), when in use.
fn render_pt_trap(o: &mut String, t: &serde_json::Value) {
    let mode = t["mode"].as_str().unwrap_or("hypercall");
    if mode == "hypercall" {
        return;
    }
    let _ = writeln!(o, "  page-table write trap (mode {mode}):");
    let n = |k: &str| t[k].as_u64().unwrap_or(0);
    for k in [
        "trapped_writes",
        "emulated_writes",
        "refused_writes",
        "passthrough_writes",
        "unhooks",
        "rehooks",
        "revalidated_entries",
        "revalidated_max",
        "lru_evictions",
        "spurious_faults",
    ] {
        let _ = writeln!(o, "    {k:<24} {}", n(k));
    }
    if let Some(h) = t["revalidated_per_rehook"].as_object() {
        let parts: Vec<String> = ["0", "1", "2-8", "9-64", "65-512"]
            .iter()
            .map(|b| format!("{b}:{}", h.get(*b).and_then(|v| v.as_u64()).unwrap_or(0)))
            .collect();
        let _ = writeln!(o, "    {:<24} {}", "re-hooks by entries", parts.join(" "));
    }
}

fn render_mmu(o: &mut String, v: &serde_json::Value) {
    render_pt_trap(o, &v["pt_trap"]);
    if let serde_json::Value::Object(map) = v {
        for (k, val) in map.iter().filter(|(k, _)| k.as_str() != "pt_trap") {
            match val {
                serde_json::Value::Object(inner) if !inner.is_empty() => {
                    let parts: Vec<String> =
                        inner.iter().map(|(a, b)| format!("{a}={b}")).collect();
                    let _ = writeln!(o, "  {:<26} {}", k, parts.join(" "));
                }
                serde_json::Value::Object(_) => {}
                _ => {
                    let _ = writeln!(o, "  {:<26} {}", k, val);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::report::{build, VmInfo};
    use crate::stats::{Dir, VcpuStats};

    fn info(vcpus: usize) -> VmInfo {
        VmInfo {
            end_reason: "guest-exit".into(),
            exit_code: 0,
            wall_ns: 5_000_000,
            vcpus,
            mem_bytes: 1 << 28,
            hypercall_transport: "pio".into(),
            transport_choice: "auto".into(),
            transport_probe_ns: 1,
            transport_probe_cached: false,
            pool_resync: Default::default(),
            guest_status: Some(0),
        }
    }

    fn vcpu() -> VcpuStats {
        let mut s = VcpuStats::default();
        s.exit("io", 1000);
        s.exit("io", 5000);
        s.pio(0x3f8, Dir::Out, "serial", 900);
        s.pio(hypercall::DOORBELL_PORT, Dir::Out, "pvmm-doorbell", 4800);
        s.hypercall("MMU_BATCH", 4000, None, Some(10));
        s.effect("host_resync", 500);
        s.mmu_phases(&[("copy_in", 1000), ("apply", 2000), ("zero_frame", 500)]);
        s.vmm_ns = 6000;
        s.kvm_run_ns = 20_000;
        s
    }

    #[test]
    fn the_breakdown_adds_up_to_the_vmm_time() {
        let r = build(info(2), &[vcpu(), vcpu()], None);
        let m = &r.merged;
        let sum: u64 = m.vmm_breakdown.iter().map(|s| s.total_ns).sum();
        assert_eq!(sum, m.vmm_ns);
        let names: Vec<&str> = m.vmm_breakdown.iter().map(|s| s.section).collect();
        assert_eq!(names, ["devices", "hypercalls", "effects", "other"]);
        // devices 1800 + hypercalls 8000 + effects 1000 = 10800 of 12000 ns.
        assert_eq!(m.vmm_breakdown[3].total_ns, 1200);
        let t = to_table(&r);
        assert!(t.contains("summed over 2 vCPU(s)"), "{t}");
        assert!(t.contains("Per vCPU:"), "{t}");
        let total = t.lines().find(|l| l.starts_with("total ")).unwrap_or("");
        assert!(total.contains("100.00%"), "{t}");
        let bd = t.split("Where the VMM time went").nth(1).unwrap_or("");
        let last = bd.lines().find(|l| l.starts_with("total")).unwrap_or("");
        assert!(last.contains("12.00") && last.contains("100.00%"), "{t}");
    }

    #[test]
    fn mmu_batch_phases_are_a_section_with_the_cost_per_update() {
        let mmu = serde_json::json!({"pte_updates": 35});
        let t = to_table(&build(info(1), &[vcpu()], Some(mmu)));
        let sec = t.split("MMU_BATCH phases").nth(1).unwrap_or("");
        let rows: Vec<&str> = sec.lines().skip(2).take(3).collect();
        assert!(
            rows[0].starts_with("copy_in") && rows[0].contains("25.00%"),
            "{t}"
        );
        assert!(
            rows[1].starts_with("apply") && rows[1].contains("50.00%"),
            "{t}"
        );
        assert!(rows[2].starts_with("zero_frame"), "{t}");
        // (4000 - 500) ns / 35 updates.
        assert!(sec.contains("per PTE update: 100 ns"), "{t}");
    }

    #[test]
    fn the_header_names_the_remote_flush_delivery_and_its_trigger() {
        let header = |remote: &str, trigger: &str| {
            let mut i = info(2);
            i.pool_resync.remote_flush = remote.into();
            i.pool_resync.kernel_flush = trigger.into();
            let t = to_table(&build(i, &[vcpu()], None));
            t.lines()
                .find(|l| l.starts_with("pool resync:"))
                .map(|l| l.split("remote flushes: ").nth(1).unwrap_or("").to_string())
                .unwrap_or_default()
        };
        assert_eq!(header("kernel", "dirty_log"), "kernel (dirty_log)");
        assert_eq!(header("kernel", "pkey"), "kernel (pkey)");
        assert_eq!(header("kick", ""), "kick");
        assert_eq!(header("", ""), "kick");
    }

    #[test]
    fn the_update_cost_is_split_by_batch_size() {
        let mut s = vcpu();
        s.mmu_batch_size(0, 2_000);
        s.mmu_batch_size(20, 8_000);
        s.mmu_batch_size(300, 60_000);
        let mmu = serde_json::json!({"pte_updates": 320});
        let t = to_table(&build(info(1), &[s], Some(mmu)));
        let sec = t.split("by PT_UPDATEs per batch").nth(1).unwrap_or("");
        let row = |class: &str| {
            sec.lines()
                .find(|l| l.split_whitespace().next() == Some(class))
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        // class, batches, PT_UPDATEs, time (µs), µs/batch, ns/PT_UPDATE.
        assert_eq!(row("0"), ["0", "1", "0", "2.00", "2.00", "-"], "{t}");
        assert_eq!(
            row("16-255"),
            ["16-255", "1", "20", "8.00", "8.00", "400"],
            "{t}"
        );
        assert_eq!(
            row("256+"),
            ["256+", "1", "300", "60.00", "60.00", "200"],
            "{t}"
        );
        assert!(row("1").is_empty(), "no batch of one update: {t}");
    }

    #[test]
    fn a_counter_the_host_does_not_keep_is_explained() {
        let mut s = vcpu();
        s.kvm_end.insert("io_exits".into(), 0);
        s.kvm_end.insert("exits".into(), 9);
        let t = to_table(&build(info(1), &[s], None));
        assert!(
            t.contains("note: io_exits is 0 although pvmm handled 2"),
            "{t}"
        );
    }
}
