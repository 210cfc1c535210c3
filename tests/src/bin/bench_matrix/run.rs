//! One guest run and the figures taken from it: the TAP diagnostics (guest counters and the
//! per-operation lines) and the stats JSON (VMM time by MMU_BATCH phase, shadow counters),
//! each less a baseline run of the same mode without selftests (boot and exit only). The
//! boot's pin of the kernel L4, one entry of several ms whose time varies by milliseconds
//! from run to run, is in the `table_ops` phase, which is no PTE update's cost.

use pvmm_e2e::{guest, pvmm_bin, temp, Tap};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;

/// An MMU configuration of the guest.
#[derive(Clone, Debug, Serialize)]
pub struct Mode {
    /// `mmu=`.
    pub mmu: &'static str,
    /// `lazy_batch=` (pv-lazy).
    pub batch: Option<u32>,
    /// `fault_around=`.
    pub fault_around: u32,
}

/// The guest's default `fault_around=`.
pub const FA_DEFAULT: u32 = 16;

impl Mode {
    /// `native`, `pv-lazy/1024`, with ` fa=0` when fault-around is not the default.
    pub fn label(&self) -> String {
        let base = match self.batch {
            Some(b) => format!("{}/{b}", self.mmu),
            None => self.mmu.to_string(),
        };
        if self.fault_around == FA_DEFAULT {
            base
        } else {
            format!("{base} fa={}", self.fault_around)
        }
    }

    /// The guest options of this mode.
    pub fn cmdline(&self) -> String {
        let batch = self.batch.map(|b| format!(" lazy_batch={b}"));
        format!(
            "mmu={}{} fault_around={}",
            self.mmu,
            batch.unwrap_or_default(),
            self.fault_around
        )
    }
}

/// The figures of one operation line of a workload (`<op> ...: ..., P PTE updates, H MMU
/// hypercalls[, E entries]`, and for the fault path `F faults`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct OpFig {
    /// PTE writes (PT_UPDATE, leaf or not; ZERO_FRAME is no PTE update).
    pub updates: f64,
    /// MMU_BATCH hypercalls, one exit each.
    pub exits: f64,
    /// Entries sent, ZERO_FRAME included (0 where the line does not say).
    pub entries: f64,
    /// Page faults (the fault path only).
    pub faults: f64,
    /// Pages the operation covered.
    pub pages: f64,
}

/// One run's raw figures (less the baseline where the VMM counts the boot).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    /// Userspace exits.
    pub exits: f64,
    /// Guest counters of the test: MMU hypercalls, PTE updates, faults, TSC cycles.
    pub mmu_hypercalls: f64,
    /// PTE writes by the guest kernel.
    pub pte_updates: f64,
    /// Page faults the kernel handled.
    pub faults: f64,
    /// TSC cycles of the test.
    pub cycles: f64,
    /// MMU_BATCH handling time, ns.
    pub vmm_mmu_ns: f64,
    /// PT_UPDATEs the shadow engine applied.
    pub vmm_pte_updates: f64,
    /// MMU_BATCH time by phase, ns.
    pub phases: BTreeMap<String, f64>,
    /// MMU_BATCH update cost by batch size: `<min updates>.batches`, `.pt_updates` and
    /// `.update_ns` (docs/stats-json.md, `mmu_batch_sizes`).
    pub batch_sizes: BTreeMap<String, f64>,
    /// Host resyncs (pool memslot re-registrations).
    pub host_resyncs: f64,
    /// Flushes the engine performed / avoided.
    pub flushes_performed: f64,
    /// Flushes the engine avoided (never accessed, upgrade only, merged).
    pub flushes_avoided: f64,
    /// Per-operation lines by operation name.
    pub ops: BTreeMap<String, OpFig>,
    /// The trap modes' figures.
    pub trap: TrapFig,
}

/// The page-table write figures of one run: the guest's flush windows and, in the trap
/// modes, the VMM's trap counters (less the baseline).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrapFig {
    /// PTE writes summed over flush windows (guest `pt_ptes`).
    pub pt_ptes: f64,
    /// Distinct page-table pages written, summed over flush windows (guest `pt_pages`).
    pub pt_pages: f64,
    /// Spurious faults (guest).
    pub spurious: f64,
    /// Trapped stores (VMM).
    pub trapped: f64,
    /// Re-hooks and the entries they re-validated (VMM, wrpt).
    pub rehooks: f64,
    /// See `rehooks`.
    pub revalidated: f64,
}

/// The trap counters of `stats` less `base`.
fn trap_fig(stats: &Value, base: &Value, g: &dyn Fn(&str) -> f64) -> TrapFig {
    let (t, b) = (&stats["mmu"]["pt_trap"], &base["mmu"]["pt_trap"]);
    let d = |k: &str| num(&t[k]) - num(&b[k]);
    TrapFig {
        pt_ptes: g("pt_ptes"),
        pt_pages: g("pt_pages"),
        spurious: g("spurious"),
        trapped: d("trapped_writes"),
        rehooks: d("rehooks"),
        revalidated: d("revalidated_entries"),
    }
}

/// The operation lines of each workload: (operation, prefix of its diagnostic line).
pub fn op_lines(workload: &str, pv: bool) -> &'static [(&'static str, &'static str)] {
    match (workload, pv) {
        ("populate", true) => &[
            ("populate", "populate zero=vmm"),
            ("fault (demand-zero)", "demand-zero of"),
        ],
        ("populate", false) => &[
            ("populate", "populate zero=cpu"),
            ("fault (demand-zero)", "demand-zero of"),
        ],
        ("zap", _) => &[("zap", "full zap of")],
        ("mprotect", _) => &[("mprotect", "mprotect RO of")],
        ("mremap", _) => &[("mremap", "mremap of")],
        ("fork_cow", _) => &[("fork", "fork of")],
        _ => &[],
    }
}

/// Runs the guest once over `--hypercall transport`; returns (stats JSON, console).
pub fn run_guest(cmdline: &str, transport: &str) -> Result<(Value, String), String> {
    let f = temp(&format!(
        "bench-{}-{}.json",
        std::process::id(),
        cmdline.len()
    ));
    let out = Command::new(pvmm_bin())
        .args(["run", "--kernel"])
        .arg(guest())
        .args(["--cmdline", cmdline, "--stats", "json", "--stats-file"])
        .arg(&f)
        .args(["--timeout", "300", "--hypercall", transport])
        .output()
        .map_err(|e| format!("{}: {e}", pvmm_bin().display()))?;
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

/// `key=value` pairs of the counter line `# <name>: ...`.
fn counters(tap: &Tap, name: &str) -> BTreeMap<String, f64> {
    let prefix = format!("{name}:");
    tap.get(name)
        .into_iter()
        .flat_map(|p| p.diag.iter())
        .filter_map(|l| l.strip_prefix(&prefix))
        .flat_map(|rest| rest.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| v.parse::<f64>().ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// The number before `word` in `line` (words split at spaces and punctuation).
fn before(line: &str, word: &str) -> Option<f64> {
    let words: Vec<&str> = line
        .split([' ', ',', '(', ')', ':'])
        .filter(|w| !w.is_empty())
        .collect();
    let i = words.iter().position(|w| *w == word)?;
    words.get(i.checked_sub(1)?)?.parse().ok()
}

/// The figures of the diagnostic line of `test` starting with `prefix`.
fn op_fig(tap: &Tap, test: &str, prefix: &str) -> Option<OpFig> {
    let line = tap.get(test)?.diag.iter().find(|l| l.starts_with(prefix))?;
    let pages = line
        .strip_prefix(prefix)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|w| w.trim_end_matches(':').parse().ok());
    Some(OpFig {
        updates: before(line, "PTE")?,
        exits: before(line, "MMU")?,
        entries: before(line, "entries").unwrap_or(0.0),
        faults: before(line, "faults").unwrap_or(0.0),
        pages: pages.or_else(|| before(line, "pages")).unwrap_or(0.0),
    })
}

/// The populate test's zeroing-comparison round (PV modes with `zero=vmm` also populate
/// once with CPU zeroing, which is not how they populate): its cycles (the whole round)
/// and its operation line, to leave out of the workload's figures; None without one.
fn comparison_round(tap: &Tap, test: &str) -> Option<(f64, OpFig)> {
    let prefix = "zeroing comparison round:";
    let line = tap.get(test)?.diag.iter().find(|l| l.starts_with(prefix))?;
    let cycles = before(line, "cycles")?;
    Some((cycles, op_fig(tap, test, "populate zero=cpu")?))
}

/// A number of the stats JSON (0 when absent).
fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// The sum of an object's numbers.
fn sum_obj(v: &Value) -> f64 {
    v.as_object()
        .map_or(0.0, |m| m.values().filter_map(Value::as_f64).sum())
}

/// The MMU_BATCH row of a report's hypercalls.
fn mmu_batch(stats: &Value) -> Value {
    stats["merged"]["hypercalls"]
        .as_array()
        .and_then(|a| a.iter().find(|h| h["op"] == "MMU_BATCH").cloned())
        .unwrap_or(Value::Null)
}

/// MMU_BATCH time by phase (name → total ns). The boot's pin of the kernel L4, which
/// validates and shadows the whole kernel half (~5-12 ms here, varying with the host's
/// load), is in `table_ops`, which no PTE update is charged with.
fn phases(stats: &Value) -> BTreeMap<String, f64> {
    stats["merged"]["mmu_batch_phases"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["name"].as_str()?.to_string(), num(&p["total_ns"]))))
        .collect()
}

/// A run's `mmu_batch_sizes`, flattened: `<min updates>.<field>` → value.
fn batch_sizes(stats: &Value) -> BTreeMap<String, f64> {
    let rows = stats["merged"]["mmu_batch_sizes"]
        .as_array()
        .into_iter()
        .flatten();
    rows.flat_map(|r| {
        let class = r["min_updates"].as_u64().unwrap_or(0);
        ["batches", "pt_updates", "update_ns"].map(|f| (format!("{class}.{f}"), num(&r[f])))
    })
    .collect()
}

/// `now` less `base`, key by key.
fn less(now: BTreeMap<String, f64>, base: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    now.into_iter()
        .map(|(k, v)| {
            let b = base.get(&k).copied().unwrap_or(0.0);
            (k, v - b)
        })
        .collect()
}

/// MMU_BATCH time of a run, ns.
fn mmu_batch_ns(stats: &Value) -> f64 {
    num(&mmu_batch(stats)["total_ns"])
}

/// The host resyncs of a report.
fn resyncs(stats: &Value) -> f64 {
    stats["merged"]["effects"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["name"] == "host_resync")
        .map(|e| num(&e["count"]))
        .sum()
}

/// The figures of a workload run, less the baseline `base` of the same mode.
pub fn sample(
    stats: &Value,
    console: &str,
    workload: &str,
    base: &Value,
) -> Result<Sample, String> {
    let tap = Tap::parse(console)?;
    let p = tap
        .get(workload)
        .ok_or(format!("no TAP point for {workload}"))?;
    if !p.ok {
        return Err(format!("{workload} failed: {:?}", p.diag));
    }
    let d = counters(&tap, workload);
    let g = |k: &str| d.get(k).copied().unwrap_or(0.0);
    // Each MMU hypercall of the comparison round is one exit.
    let (cmp_cycles, cmp) = comparison_round(&tap, workload).unwrap_or_default();
    let pv = stats["mmu"].is_object();
    let ops = op_lines(workload, pv)
        .iter()
        .filter_map(|(op, prefix)| Some((op.to_string(), op_fig(&tap, workload, prefix)?)))
        .collect();
    let (m, b) = (&stats["mmu"], &base["mmu"]);
    let phases = less(phases(stats), &phases(base));
    let batch_sizes = less(batch_sizes(stats), &batch_sizes(base));
    Ok(Sample {
        exits: num(&stats["merged"]["exits_total"])
            - num(&base["merged"]["exits_total"])
            - cmp.exits,
        mmu_hypercalls: g("mmu_hypercalls") - cmp.exits,
        pte_updates: g("pte_updates") - cmp.updates,
        faults: g("faults"),
        cycles: g("cycles") - cmp_cycles,
        vmm_mmu_ns: mmu_batch_ns(stats) - mmu_batch_ns(base),
        vmm_pte_updates: num(&m["pte_updates"]) - num(&b["pte_updates"]),
        phases,
        batch_sizes,
        host_resyncs: resyncs(stats) - resyncs(base),
        flushes_performed: sum_obj(&m["flushes_performed"]) - sum_obj(&b["flushes_performed"]),
        flushes_avoided: sum_obj(&m["flushes_avoided"]) - sum_obj(&b["flushes_avoided"]),
        ops,
        trap: trap_fig(stats, base, &g),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zeroing_comparison_round_is_found() {
        let console = "TAP version 13\n1..1\n# populate zero=cpu: 256 pages in 900 cycles (3/page), 258 PTE updates, 1 MMU hypercalls, 260 entries\n# zeroing comparison round: 1000 cycles, not part of the workload\n# populate zero=vmm (ZERO_FRAME): 256 pages in 9 cycles (1/page), 257 PTE updates, 2 MMU hypercalls, 514 entries\nok 1 populate\n";
        let tap = Tap::parse(console).unwrap();
        let (c, f) = comparison_round(&tap, "populate").unwrap();
        assert_eq!((c, f.updates, f.exits), (1000.0, 258.0, 1.0));
        let native = console.replace(
            "# zeroing comparison round: 1000 cycles, not part of the workload\n",
            "",
        );
        assert!(comparison_round(&Tap::parse(&native).unwrap(), "populate").is_none());
    }

    #[test]
    fn operation_lines_are_read() {
        let console = "TAP version 13\n1..1\n# populate zero=vmm (ZERO_FRAME): 256 pages in 9 cycles (1/page), 257 PTE updates, 2 MMU hypercalls, 514 entries\n# demand-zero of 256 pages (fault_around=16): 16 faults, 5 cycles/page, 257 PTE updates, 17 MMU hypercalls, 514 entries\nok 1 populate\n";
        let tap = Tap::parse(console).unwrap();
        let p = op_fig(&tap, "populate", "populate zero=vmm").unwrap();
        assert_eq!(
            (p.updates, p.exits, p.entries, p.pages),
            (257.0, 2.0, 514.0, 256.0)
        );
        let f = op_fig(&tap, "populate", "demand-zero of").unwrap();
        assert_eq!(
            (f.faults, f.updates, f.exits, f.pages),
            (16.0, 257.0, 17.0, 256.0)
        );
    }
}
