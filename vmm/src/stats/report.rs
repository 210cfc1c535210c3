//! The serialisable statistics report: one schema for the final report and for every
//! `--stats-interval` line (documented in `docs/stats-json.md`; bump [`SCHEMA_VERSION`] on
//! any breaking change: removing or renaming a field, changing a unit). The table is in
//! [`super::table`].

use super::batch_size::BatchSizeRow;
use super::{Latency, VcpuStats};
use serde::Serialize;
use std::collections::BTreeMap;

/// Version of the JSON schema.
pub const SCHEMA_VERSION: u32 = 2;

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
    /// Time the `auto` probe took, ns (0 when forced or cached).
    pub transport_probe_ns: u64,
    /// The `auto` verdict came from the per-host cache (no probe ran).
    pub transport_probe_cached: bool,
    /// The guest's EXIT status, when it exited that way (the exit code caps it at 127).
    pub guest_status: Option<u8>,
    /// Whether this host needs the shadow-pool resync, and how that was decided.
    pub pool_resync: PoolResyncInfo,
}

/// The pool-resync verdict (`--pool-resync`, the start-up probe).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PoolResyncInfo {
    /// The pool memslot is re-registered (world stopped) when KVM must forget pool
    /// translations; false: VMM writes reach the running guest (nested paging).
    pub needed: bool,
    /// "auto" (probed or cached) or "forced".
    pub choice: String,
    /// The probe's time, ns (0 if forced or cached).
    pub probe_ns: u64,
    /// The verdict came from the per-host cache.
    pub probe_cached: bool,
    /// How remote TLB flushes are delivered: "kick" or "kernel" (docs/pv-abi.md §6.5).
    pub remote_flush: String,
    /// What the kernel flush triggers KVM's flush with: "dirty_log" or "pkey" (empty for
    /// kicks; docs/pv-abi.md §6.5).
    pub kernel_flush: String,
    /// Changed leaves are zapped instead of resynced (docs/pv-abi.md §6.6).
    pub leaf_zap: bool,
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

/// A distribution of counts (not times), flattened for JSON.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Counts {
    /// Number of samples.
    pub count: u64,
    /// Sum.
    pub total: u64,
    /// Minimum.
    pub min: u64,
    /// Mean.
    pub mean: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
}

impl From<&Latency> for Counts {
    fn from(l: &Latency) -> Counts {
        Counts {
            count: l.count(),
            total: l.total(),
            min: l.min(),
            mean: l.mean(),
            p50: l.quantile(0.5),
            p99: l.quantile(0.99),
            max: l.max(),
        }
    }
}

/// One row of the VMM-time breakdown: the rows of a report add up to `vmm_ns`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TimeShare {
    /// "devices", "hypercalls", "effects" or "other".
    pub section: &'static str,
    /// Device name (with port), hypercall op, effect name, or what "other" holds.
    pub name: String,
    /// Occurrences (0 for "other").
    pub count: u64,
    /// Time, ns.
    pub total_ns: u64,
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
    /// Where `vmm_ns` went: devices, hypercalls by op, effects, other; adds up to `vmm_ns`.
    pub vmm_breakdown: Vec<TimeShare>,
    /// Where MMU_BATCH handling time went, by phase in the order they run (one sample per
    /// batch and phase; the phases add up to the MMU_BATCH time less a few clock reads).
    pub mmu_batch_phases: Vec<Named<Dist>>,
    /// MMU_BATCH update cost by PT_UPDATEs per batch (size classes that saw a batch).
    pub mmu_batch_sizes: Vec<BatchSizeRow>,
    /// KVM in-kernel counters (`KVM_GET_STATS_FD`).
    pub kvm: BTreeMap<String, KvmCounter>,
    /// Remote TLB flush delivery and world stops this vCPU caused.
    pub smp: SmpReport,
}

/// [`crate::stats::SmpStats`], as serialised.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SmpReport {
    /// Other vCPUs this vCPU's batches needed a flush or root switch on.
    pub remote_flushes_requested: u64,
    /// Requests posted to live vCPUs.
    pub remote_flushes_sent: u64,
    /// Other vCPUs a flush-needing batch did not interrupt (nothing held there).
    pub remote_flushes_avoided: u64,
    /// Other vCPUs flushed in the host kernel instead (a zap of stale pool frames).
    pub kernel_flushes: u64,
    /// Zaps made for them.
    pub kernel_zaps: u64,
    /// Kick signals sent for deliveries.
    pub kicks: u64,
    /// Kick round trips (first kick to acknowledgement).
    pub kick_rtt: Dist,
    /// Their parts: kick to the target leaving `KVM_RUN`.
    pub kick_exit: Dist,
    /// Leaving `KVM_RUN` to the acknowledgement (the target's flush).
    pub kick_apply: Dist,
    /// The acknowledgement to the issuer noticing it.
    pub kick_wake: Dist,
    /// Deliveries of other vCPUs' batches applied on this vCPU.
    pub deliveries_applied: u64,
    /// World stops led for host resyncs.
    pub world_stops: u64,
    /// Kicks sent to park vCPUs for them.
    pub world_stop_kicks: u64,
    /// Each world stop's duration.
    pub world_stop: Dist,
    /// Host resyncs skipped because a later one covered the batch.
    pub resyncs_merged: u64,
    /// Pool chunks (memslots) the host resyncs re-registered.
    pub resync_chunks: u64,
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
    /// Entries per call (MMU_BATCH only).
    pub entries_per_call: Option<Counts>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// "final" (when the VM ended) or "interval" (a `--stats-interval` line).
    pub kind: &'static str,
    /// Time since the VM was created, ns.
    pub t_ns: u64,
    /// Time this report covers, ns: the whole run for "final" (`t_ns`), the interval since
    /// the previous line for "interval" (its figures are deltas over that interval).
    pub interval_ns: u64,
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
    VcpuReport {
        vcpu,
        vmm_breakdown: breakdown(s),
        effects: named(&s.effects),
        mmu_batch_phases: phase_rows(s),
        mmu_batch_sizes: s.mmu_batch_sizes.rows(),
        exits_total: s.total_exits(),
        kvm_run_ns: s.kvm_run_ns,
        vmm_ns: s.vmm_ns,
        exits: exit_rows(s),
        pio: pio_rows(s),
        mmio: s
            .mmio
            .iter()
            .map(|(&(device, dir), l)| MmioRow {
                device,
                dir: dir.name(),
                dist: Dist::from(l),
            })
            .collect(),
        hypercalls: hypercall_rows(s),
        kvm: kvm_counters(s),
        smp: SmpReport {
            remote_flushes_requested: s.smp.remote_requested,
            remote_flushes_sent: s.smp.remote_sent,
            remote_flushes_avoided: s.smp.remote_avoided,
            kernel_flushes: s.smp.kernel_flushes,
            kernel_zaps: s.smp.kernel_zaps,
            kicks: s.smp.kicks,
            kick_rtt: Dist::from(&s.smp.kick_rtt),
            kick_exit: Dist::from(&s.smp.kick_exit),
            kick_apply: Dist::from(&s.smp.kick_apply),
            kick_wake: Dist::from(&s.smp.kick_wake),
            deliveries_applied: s.smp.deliveries_applied,
            world_stops: s.smp.world_stops,
            world_stop_kicks: s.smp.world_stop_kicks,
            world_stop: Dist::from(&s.smp.world_stop),
            resyncs_merged: s.smp.resyncs_merged,
            resync_chunks: s.smp.resync_chunks,
        },
    }
}

fn named(m: &BTreeMap<&'static str, Latency>) -> Vec<Named<Dist>> {
    m.iter()
        .map(|(k, v)| Named {
            name: (*k).to_string(),
            value: Dist::from(v),
        })
        .collect()
}

/// The MMU_BATCH phases in the order they run (names outside [`PHASE_ORDER`] last).
fn phase_rows(s: &VcpuStats) -> Vec<Named<Dist>> {
    let mut rows = named(&s.mmu_phases);
    let rank = |n: &str| {
        PHASE_ORDER
            .iter()
            .position(|p| *p == n)
            .unwrap_or(usize::MAX)
    };
    rows.sort_by_key(|r| rank(&r.name));
    rows
}

/// The MMU_BATCH phases, in the order one batch runs them.
pub const PHASE_ORDER: [&str; 10] = [
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

/// Exit reasons, the most expensive first.
fn exit_rows(s: &VcpuStats) -> Vec<Named<Dist>> {
    let mut exits = named(&s.exits);
    exits.sort_by(|a, b| {
        b.value
            .total_ns
            .cmp(&a.value.total_ns)
            .then(a.name.cmp(&b.name))
    });
    exits
}

/// Ports, the most expensive first.
fn pio_rows(s: &VcpuStats) -> Vec<PioRow> {
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
    pio
}

/// Hypercall ops, the most expensive first.
fn hypercall_rows(s: &VcpuStats) -> Vec<HypercallRow> {
    let mut hypercalls: Vec<_> = s
        .hypercalls
        .iter()
        .map(|(op, o)| HypercallRow {
            op,
            dist: Dist::from(&o.latency),
            errors: o.errors.clone(),
            entries_per_call: (o.entries.count() > 0).then(|| Counts::from(&o.entries)),
        })
        .collect();
    hypercalls.sort_by_key(|h| std::cmp::Reverse(h.dist.total_ns));
    hypercalls
}

fn kvm_counters(s: &VcpuStats) -> BTreeMap<String, KvmCounter> {
    s.kvm_end
        .iter()
        .map(|(k, &end)| {
            let start = s.kvm_start.get(k).copied().unwrap_or(0);
            let delta = end.saturating_sub(start);
            (k.clone(), KvmCounter { start, end, delta })
        })
        .collect()
}

/// Splits a vCPU's VMM time into devices (by device and port, the doorbell excluded: its
/// time is the hypercall's), hypercalls by op, effects by name, and the rest.
/// Effects whose time is already part of a hypercall's (the kernel flush is made inside
/// MMU_BATCH): left out of the breakdown so that its rows add up.
const EFFECTS_INSIDE_HYPERCALLS: [&str; 1] = ["remote_kernel_flush"];

fn breakdown(s: &VcpuStats) -> Vec<TimeShare> {
    let mut rows = Vec::new();
    for (&(port, dir), (dev, l)) in &s.pio {
        if *dev != crate::hcall::doorbell::DOORBELL_NAME {
            rows.push(share(
                "devices",
                format!("{dev} {port:#x} {}", dir.name()),
                l,
            ));
        }
    }
    for (&(dev, dir), l) in &s.mmio {
        rows.push(share("devices", format!("{dev} mmio {}", dir.name()), l));
    }
    for (op, o) in &s.hypercalls {
        rows.push(share("hypercalls", (*op).to_string(), &o.latency));
    }
    for (name, l) in &s.effects {
        if !EFFECTS_INSIDE_HYPERCALLS.contains(name) {
            rows.push(share("effects", (*name).to_string(), l));
        }
    }
    let accounted: u64 = rows.iter().map(|r| r.total_ns).sum();
    rows.push(TimeShare {
        section: "other",
        name: "exit decode, transport, statistics, signals".into(),
        count: 0,
        total_ns: s.vmm_ns.saturating_sub(accounted),
    });
    rows
}

fn share(section: &'static str, name: String, l: &Latency) -> TimeShare {
    TimeShare {
        section,
        name,
        count: l.count(),
        total_ns: l.total(),
    }
}

/// The final report from per-vCPU statistics.
pub fn build(vm: VmInfo, per_vcpu: &[VcpuStats], mmu: Option<serde_json::Value>) -> Report {
    let t = vm.wall_ns;
    build_kind("final", t, t, vm, per_vcpu, mmu)
}

/// A report of `kind` at `t_ns` covering `interval_ns`, from per-vCPU statistics.
pub fn build_kind(
    kind: &'static str,
    t_ns: u64,
    interval_ns: u64,
    vm: VmInfo,
    per_vcpu: &[VcpuStats],
    mmu: Option<serde_json::Value>,
) -> Report {
    let merged = super::merge_all(per_vcpu);
    Report {
        schema_version: SCHEMA_VERSION,
        kind,
        t_ns,
        interval_ns,
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

/// The JSON Lines form (one compact object).
pub fn to_json_line(r: &Report) -> String {
    serde_json::to_string(r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
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
            transport_probe_cached: false,
            pool_resync: Default::default(),
            guest_status: Some(0),
        }
    }

    fn keys(v: &serde_json::Value) -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    }

    #[test]
    fn vm_keys_are_stable() {
        let v: serde_json::Value =
            serde_json::from_str(&to_json(&build(info(), &[VcpuStats::default()], None))).unwrap();
        assert_eq!(
            keys(&v["vm"]),
            [
                "end_reason",
                "exit_code",
                "guest_status",
                "hypercall_transport",
                "mem_bytes",
                "pool_resync",
                "transport_choice",
                "transport_probe_cached",
                "transport_probe_ns",
                "vcpus",
                "wall_ns"
            ]
        );
        assert_eq!(
            keys(&v["vm"]["pool_resync"]),
            [
                "choice",
                "kernel_flush",
                "leaf_zap",
                "needed",
                "probe_cached",
                "probe_ns",
                "remote_flush"
            ]
        );
        assert_eq!(keys(&v["merged"]["smp"]).len(), 16);
    }

    /// Guards schema version 2 (docs/stats-json.md): removing or renaming any of these keys
    /// is a breaking change and needs a new SCHEMA_VERSION.
    #[test]
    fn schema_v2_keys_are_stable() {
        let mut s = VcpuStats::default();
        s.exit("io", 10);
        s.pio(0x3f8, Dir::Out, "serial", 10);
        s.mmio("dev", Dir::In, 3);
        s.hypercall("MMU_BATCH", 5, Some("EINVAL"), Some(4));
        s.kvm_end.insert("exits".into(), 3);
        let v: serde_json::Value =
            serde_json::from_str(&to_json(&build(info(), &[s], None))).unwrap();
        assert_eq!(SCHEMA_VERSION, 2);
        assert_eq!(
            keys(&v),
            [
                "interval_ns",
                "kind",
                "merged",
                "mmu",
                "schema_version",
                "t_ns",
                "vcpus",
                "vm"
            ]
        );
        assert_eq!(v["kind"], "final");
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
                "mmu_batch_phases",
                "mmu_batch_sizes",
                "pio",
                "smp",
                "vcpu",
                "vmm_breakdown",
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
        assert_eq!(
            keys(&m["hypercalls"][0]["entries_per_call"]),
            ["count", "max", "mean", "min", "p50", "p99", "total"]
        );
        assert_eq!(
            keys(&m["vmm_breakdown"][0]),
            ["count", "name", "section", "total_ns"]
        );
        assert_eq!(keys(&m["kvm"]["exits"]), ["delta", "end", "start"]);
    }

    #[test]
    fn mmu_batch_phases_are_in_run_order() {
        let mut s = VcpuStats::default();
        s.mmu_phases(&[("response", 1), ("apply", 3), ("request", 1)]);
        s.mmu_phases(&[("response", 2), ("apply", 5), ("request", 1)]);
        let v: serde_json::Value =
            serde_json::from_str(&to_json(&build(info(), &[s], None))).unwrap();
        let rows = v["merged"]["mmu_batch_phases"].as_array().unwrap().clone();
        let order: Vec<&str> = rows.iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(order, ["request", "apply", "response"], "run order");
        let mut k = keys(&rows[0]);
        k.retain(|k| k != "name");
        assert_eq!(
            k,
            ["count", "max_ns", "mean_ns", "min_ns", "p50_ns", "p99_ns", "total_ns"]
        );
        assert_eq!(
            (rows[1]["count"].as_u64(), rows[1]["total_ns"].as_u64()),
            (Some(2), Some(8))
        );
    }

    #[test]
    fn mmu_batch_sizes_are_serialised_by_class_and_tabled() {
        let mut s = VcpuStats::default();
        s.mmu_batch_size(1, 9_000);
        s.mmu_batch_size(1, 11_000);
        s.mmu_batch_size(512, 102_400);
        let r = build(info(), &[s], None);
        let v: serde_json::Value = serde_json::from_str(&to_json(&r)).unwrap();
        let rows = v["merged"]["mmu_batch_sizes"].as_array().unwrap().clone();
        assert_eq!(rows.len(), 2, "only the classes that saw a batch: {rows:?}");
        assert_eq!(
            keys(&rows[0]),
            [
                "batches",
                "max_updates",
                "min_updates",
                "pt_updates",
                "update_ns"
            ]
        );
        assert_eq!(
            (
                rows[0]["min_updates"].as_u64(),
                rows[0]["max_updates"].as_u64()
            ),
            (Some(1), Some(1))
        );
        assert_eq!(rows[0]["batches"], 2);
        assert_eq!(rows[1]["min_updates"], 256);
        assert!(rows[1]["max_updates"].is_null());
        assert_eq!(rows[1]["update_ns"], 102_400);
        assert_eq!(
            v["vcpus"][0]["mmu_batch_sizes"],
            v["merged"]["mmu_batch_sizes"]
        );
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
        assert_eq!(v["schema_version"], 2);
        assert_eq!(v["vm"]["exit_code"], 0);
        assert_eq!(v["merged"]["exits_total"], 3);
        assert_eq!(v["merged"]["exits"][0]["name"], "hlt", "sorted by cost");
        assert_eq!(v["merged"]["pio"][0]["port"], 0x3f8);
        assert_eq!(v["merged"]["kvm"]["exits"]["delta"], 3);
        assert_eq!(v["vcpus"][0]["vcpu"], 0);
        let t = crate::stats::table::to_table(&r);
        assert!(
            t.contains("hlt") && t.contains("0x3f8") && t.contains("NULL"),
            "{t}"
        );
    }
}
