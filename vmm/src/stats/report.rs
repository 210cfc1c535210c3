//! Renders statistics as a `perf kvm stat report`-like table or as one JSON object.
//!
//! The JSON schema is documented in `docs/stats-json.md`; bump [`SCHEMA_VERSION`] on any
//! breaking change (removing or renaming a field, changing a unit).

use super::{Latency, VcpuStats};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Version of the JSON schema.
pub const SCHEMA_VERSION: u32 = 1;

/// Facts about the whole run.
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    /// How the VM ended: "guest-exit", "reset", "triple-fault", "timeout", ...
    pub end_reason: String,
    /// Process exit code.
    pub exit_code: i32,
    /// Wall-clock time from VM creation to end, ns.
    pub wall_ns: u64,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Hypercall transport advertised: "pio" or "vmcall".
    pub hypercall_transport: String,
    /// How the transport was chosen: "auto" or "forced".
    pub transport_choice: String,
    /// Time the `auto` probe took, ns (0 when forced).
    pub transport_probe_ns: u64,
}

/// One distribution, flattened for JSON.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Dist {
    /// Number of samples.
    pub count: u64,
    /// Sum.
    pub total_ns: u64,
    /// Minimum.
    pub min_ns: u64,
    /// Mean.
    pub mean_ns: u64,
    /// Median.
    pub p50_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// Maximum.
    pub max_ns: u64,
}

impl From<&Latency> for Dist {
    fn from(l: &Latency) -> Dist {
        Dist {
            count: l.count(),
            total_ns: l.total(),
            min_ns: l.min(),
            mean_ns: l.mean(),
            p50_ns: l.quantile(0.5),
            p99_ns: l.quantile(0.99),
            max_ns: l.max(),
        }
    }
}

/// A KVM counter over the run.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct KvmCounter {
    /// Value when the vCPU was created.
    pub start: u64,
    /// Value at the end.
    pub end: u64,
    /// `end - start` (saturating).
    pub delta: u64,
}

/// Statistics of one vCPU (or all merged), as serialised.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuReport {
    /// vCPU index, or `null` for the merged view.
    pub vcpu: Option<usize>,
    /// Total userspace exits.
    pub exits_total: u64,
    /// Time inside KVM_RUN, ns.
    pub kvm_run_ns: u64,
    /// Time in the VMM between KVM_RUNs, ns.
    pub vmm_ns: u64,
    /// Exits by reason, sorted by total handling time (descending).
    pub exits: Vec<Named<Dist>>,
    /// Port I/O by port and direction.
    pub pio: Vec<PioRow>,
    /// MMIO by device and direction.
    pub mmio: Vec<MmioRow>,
    /// Hypercalls by op.
    pub hypercalls: Vec<HypercallRow>,
    /// VMM work on the vCPU after hypercalls (part of the exits' handling time).
    pub effects: Vec<Named<Dist>>,
    /// KVM in-kernel counters (`KVM_GET_STATS_FD`).
    pub kvm: BTreeMap<String, KvmCounter>,
}

/// A named distribution.
#[derive(Clone, Debug, Serialize)]
pub struct Named<T> {
    /// Name (exit reason).
    pub name: String,
    /// Distribution.
    #[serde(flatten)]
    pub value: T,
}

/// One port row.
#[derive(Clone, Debug, Serialize)]
pub struct PioRow {
    /// Port number.
    pub port: u16,
    /// "in" or "out".
    pub dir: &'static str,
    /// Device on that port, or "unassigned".
    pub device: &'static str,
    /// Handling time.
    #[serde(flatten)]
    pub dist: Dist,
}

/// One MMIO row.
#[derive(Clone, Debug, Serialize)]
pub struct MmioRow {
    /// Device, or "unassigned".
    pub device: &'static str,
    /// "in" (read) or "out" (write).
    pub dir: &'static str,
    /// Handling time.
    #[serde(flatten)]
    pub dist: Dist,
}

/// One hypercall op row.
#[derive(Clone, Debug, Serialize)]
pub struct HypercallRow {
    /// Op name.
    pub op: &'static str,
    /// Handling time.
    #[serde(flatten)]
    pub dist: Dist,
    /// Errors by code name.
    pub errors: BTreeMap<&'static str, u64>,
    /// Entries per call (MMU_BATCH only; the `_ns` fields hold entry counts).
    pub entries_per_call: Option<Dist>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Run facts.
    pub vm: VmInfo,
    /// All vCPUs merged.
    pub merged: VcpuReport,
    /// Each vCPU.
    pub vcpus: Vec<VcpuReport>,
    /// Shadow MMU counters (present when the VM ran the PV MMU).
    pub mmu: Option<serde_json::Value>,
}

/// Builds the serialisable view of one vCPU's statistics.
pub fn vcpu_report(vcpu: Option<usize>, s: &VcpuStats) -> VcpuReport {
    let mut exits: Vec<_> = s
        .exits
        .iter()
        .map(|(k, v)| Named {
            name: (*k).to_string(),
            value: Dist::from(v),
        })
        .collect();
    exits.sort_by(|a, b| {
        b.value
            .total_ns
            .cmp(&a.value.total_ns)
            .then(a.name.cmp(&b.name))
    });
    let mut pio: Vec<_> = s
        .pio
        .iter()
        .map(|(&(port, dir), (dev, l))| PioRow {
            port,
            dir: dir.name(),
            device: dev,
            dist: Dist::from(l),
        })
        .collect();
    pio.sort_by(|a, b| {
        b.dist
            .total_ns
            .cmp(&a.dist.total_ns)
            .then(a.port.cmp(&b.port))
    });
    let mmio = s
        .mmio
        .iter()
        .map(|(&(device, dir), l)| MmioRow {
            device,
            dir: dir.name(),
            dist: Dist::from(l),
        })
        .collect();
    let mut hypercalls: Vec<_> = s
        .hypercalls
        .iter()
        .map(|(op, o)| HypercallRow {
            op,
            dist: Dist::from(&o.latency),
            errors: o.errors.clone(),
            entries_per_call: (o.entries.count() > 0).then(|| Dist::from(&o.entries)),
        })
        .collect();
    hypercalls.sort_by_key(|h| std::cmp::Reverse(h.dist.total_ns));
    let kvm = s
        .kvm_end
        .iter()
        .map(|(k, &end)| {
            let start = s.kvm_start.get(k).copied().unwrap_or(0);
            (
                k.clone(),
                KvmCounter {
                    start,
                    end,
                    delta: end.saturating_sub(start),
                },
            )
        })
        .collect();
    let effects = s
        .effects
        .iter()
        .map(|(k, v)| Named {
            name: (*k).to_string(),
            value: Dist::from(v),
        })
        .collect();
    VcpuReport {
        vcpu,
        effects,
        exits_total: s.total_exits(),
        kvm_run_ns: s.kvm_run_ns,
        vmm_ns: s.vmm_ns,
        exits,
        pio,
        mmio,
        hypercalls,
        kvm,
    }
}

/// Builds the report from per-vCPU statistics.
pub fn build(vm: VmInfo, per_vcpu: &[VcpuStats], mmu: Option<serde_json::Value>) -> Report {
    let merged = super::merge_all(per_vcpu);
    Report {
        schema_version: SCHEMA_VERSION,
        vm,
        merged: vcpu_report(None, &merged),
        vcpus: per_vcpu
            .iter()
            .enumerate()
            .map(|(i, s)| vcpu_report(Some(i), s))
            .collect(),
        mmu,
    }
}

/// The JSON form (one object, pretty-printed).
pub fn to_json(r: &Report) -> String {
    serde_json::to_string_pretty(r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn us(ns: u64) -> String {
    format!("{:.2}", ns as f64 / 1000.0)
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        "0.00%".into()
    } else {
        format!("{:.2}%", part as f64 * 100.0 / whole as f64)
    }
}

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

/// The human-readable table.
pub fn to_table(r: &Report) -> String {
    let m = &r.merged;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\n=== pvmm exit statistics (all {} vCPU(s)) ===",
        r.vm.vcpus
    );
    let _ = writeln!(
        o,
        "end: {} (exit code {})   wall: {} ms   in KVM_RUN: {} ms ({})   in VMM: {} ms ({})   hypercalls via: {} ({})",
        r.vm.end_reason,
        r.vm.exit_code,
        us(r.vm.wall_ns / 1000),
        us(m.kvm_run_ns / 1000),
        pct(m.kvm_run_ns, m.kvm_run_ns + m.vmm_ns),
        us(m.vmm_ns / 1000),
        pct(m.vmm_ns, m.kvm_run_ns + m.vmm_ns),
        r.vm.hypercall_transport,
        r.vm.transport_choice,
    );
    let total_exits: u64 = m.exits.iter().map(|e| e.value.count).sum();
    let total_ns: u64 = m.exits.iter().map(|e| e.value.total_ns).sum();
    let _ = writeln!(
        o,
        "\nUserspace exits, by VMM handling time (latencies in µs):"
    );
    let _ = writeln!(
        o,
        "{:<16} {:>10} {:>8} {:>12} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "reason", "samples", "samples%", "time(µs)", "time%", "min", "mean", "p50", "p99", "max"
    );
    for e in &m.exits {
        let d = &e.value;
        let _ = writeln!(
            o,
            "{:<16} {:>10} {:>8} {:>12} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
            e.name,
            d.count,
            pct(d.count, total_exits),
            us(d.total_ns),
            pct(d.total_ns, total_ns),
            us(d.min_ns),
            us(d.mean_ns),
            us(d.p50_ns),
            us(d.p99_ns),
            us(d.max_ns)
        );
    }
    let _ = writeln!(o, "{:<16} {:>10}", "total", total_exits);
    if !m.pio.is_empty() {
        let _ = writeln!(o, "\nPort I/O, by VMM handling time:");
        let _ = writeln!(
            o,
            "{:<8} {:<4} {:<10} {:>10} {:>12} {:>8} {:>9} {:>9} {:>9}",
            "port", "dir", "device", "samples", "time(µs)", "time%", "mean", "p99", "max"
        );
        let pio_ns: u64 = m.pio.iter().map(|p| p.dist.total_ns).sum();
        for p in &m.pio {
            let _ = writeln!(
                o,
                "{:<8} {:<4} {:<10} {:>10} {:>12} {:>8} {:>9} {:>9} {:>9}",
                format!("{:#x}", p.port),
                p.dir,
                p.device,
                p.dist.count,
                us(p.dist.total_ns),
                pct(p.dist.total_ns, pio_ns),
                us(p.dist.mean_ns),
                us(p.dist.p99_ns),
                us(p.dist.max_ns)
            );
        }
    }
    if !m.mmio.is_empty() {
        let _ = writeln!(o, "\nMMIO:");
        for x in &m.mmio {
            let _ = writeln!(
                o,
                "{:<12} {:<4} {:>10} {:>12}",
                x.device,
                x.dir,
                x.dist.count,
                us(x.dist.total_ns)
            );
        }
    }
    if !m.hypercalls.is_empty() {
        let _ = writeln!(o, "\nHypercalls, by handling time:");
        let _ = writeln!(
            o,
            "{:<12} {:>10} {:>12} {:>9} {:>9} {:>9} {:>14}  errors",
            "op", "calls", "time(µs)", "mean", "p99", "max", "entries/call"
        );
        for h in &m.hypercalls {
            let errs: Vec<String> = h.errors.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let entries = h
                .entries_per_call
                .as_ref()
                .map(|d| format!("{:.1}", d.total_ns as f64 / d.count.max(1) as f64))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                o,
                "{:<12} {:>10} {:>12} {:>9} {:>9} {:>9} {:>14}  {}",
                h.op,
                h.dist.count,
                us(h.dist.total_ns),
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
    }
    if !m.effects.is_empty() {
        let _ = writeln!(
            o,
            "\nVMM effects after hypercalls (included in the io exit time):"
        );
        for e in &m.effects {
            let _ = writeln!(
                o,
                "  {:<16} {:>8} x  total {:>12} µs  mean {:>9} µs  p99 {:>9} µs",
                e.name,
                e.value.count,
                us(e.value.total_ns),
                us(e.value.mean_ns),
                us(e.value.p99_ns)
            );
        }
    }
    if let Some(mmu) = &r.mmu {
        let _ = writeln!(o, "\nShadow MMU:");
        render_mmu(&mut o, mmu);
    }
    if !m.kvm.is_empty() {
        let _ = writeln!(
            o,
            "\nKVM in-kernel counters (KVM_GET_STATS_FD, delta over the run):"
        );
        for k in KVM_TABLE {
            if let Some(c) = m.kvm.get(k) {
                let _ = writeln!(o, "  {:<18} {:>12}", k, c.delta);
            }
        }
    }
    o
}

fn render_mmu(o: &mut String, v: &serde_json::Value) {
    if let serde_json::Value::Object(map) = v {
        for (k, val) in map {
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
    use crate::stats::Dir;

    fn info() -> VmInfo {
        VmInfo {
            end_reason: "guest-exit".into(),
            exit_code: 0,
            wall_ns: 5_000_000,
            vcpus: 1,
            mem_bytes: 1 << 28,
            hypercall_transport: "pio".into(),
            transport_choice: "auto".into(),
            transport_probe_ns: 1,
        }
    }

    fn keys(v: &serde_json::Value) -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    }

    /// Guards schema version 1 (docs/stats-json.md): removing or renaming any of these keys
    /// is a breaking change and needs a new SCHEMA_VERSION.
    #[test]
    fn schema_v1_keys_are_stable() {
        let mut s = VcpuStats::default();
        s.exit("io", 10);
        s.pio(0x3f8, Dir::Out, "serial", 10);
        s.mmio("dev", Dir::In, 3);
        s.hypercall("MMU_BATCH", 5, Some("EINVAL"), Some(4));
        s.kvm_end.insert("exits".into(), 3);
        let v: serde_json::Value =
            serde_json::from_str(&to_json(&build(info(), &[s], None))).unwrap();
        assert_eq!(SCHEMA_VERSION, 1);
        assert_eq!(keys(&v), ["merged", "mmu", "schema_version", "vcpus", "vm"]);
        assert_eq!(
            keys(&v["vm"]),
            [
                "end_reason",
                "exit_code",
                "hypercall_transport",
                "mem_bytes",
                "transport_choice",
                "transport_probe_ns",
                "vcpus",
                "wall_ns"
            ]
        );
        let m = &v["merged"];
        assert_eq!(
            keys(m),
            [
                "effects",
                "exits",
                "exits_total",
                "hypercalls",
                "kvm",
                "kvm_run_ns",
                "mmio",
                "pio",
                "vcpu",
                "vmm_ns"
            ]
        );
        let dist = [
            "count", "max_ns", "mean_ns", "min_ns", "p50_ns", "p99_ns", "total_ns",
        ];
        let with = |extra: &[&str]| {
            let mut k: Vec<String> = dist.iter().chain(extra).map(|s| s.to_string()).collect();
            k.sort();
            k
        };
        assert_eq!(keys(&m["exits"][0]), with(&["name"]));
        assert_eq!(keys(&m["pio"][0]), with(&["device", "dir", "port"]));
        assert_eq!(keys(&m["mmio"][0]), with(&["device", "dir"]));
        assert_eq!(
            keys(&m["hypercalls"][0]),
            with(&["entries_per_call", "errors", "op"])
        );
        assert_eq!(keys(&m["hypercalls"][0]["entries_per_call"]), with(&[]));
        assert_eq!(keys(&m["kvm"]["exits"]), ["delta", "end", "start"]);
    }

    #[test]
    fn json_has_documented_fields_and_sorted_rows() {
        let mut s = VcpuStats::default();
        s.exit("io", 10);
        s.exit("io", 10);
        s.exit("hlt", 1000);
        s.pio(0x3f8, Dir::Out, "serial", 10);
        s.hypercall("NULL", 5, None, None);
        s.kvm_end.insert("exits".into(), 3);
        let r = build(info(), &[s], None);
        let v: serde_json::Value = serde_json::from_str(&to_json(&r)).unwrap();
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["vm"]["exit_code"], 0);
        assert_eq!(v["merged"]["exits_total"], 3);
        assert_eq!(v["merged"]["exits"][0]["name"], "hlt", "sorted by cost");
        assert_eq!(v["merged"]["pio"][0]["port"], 0x3f8);
        assert_eq!(v["merged"]["kvm"]["exits"]["delta"], 3);
        assert_eq!(v["vcpus"][0]["vcpu"], 0);
        let t = to_table(&r);
        assert!(
            t.contains("hlt") && t.contains("0x3f8") && t.contains("NULL"),
            "{t}"
        );
    }
}
