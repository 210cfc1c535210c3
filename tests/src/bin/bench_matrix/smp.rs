//! The SMP rows: the guest's SMP workloads on 2 and 4 vCPUs in each MMU mode. Per
//! operation (a round of the workload: one unmap, mprotect, harvest, ... while a thread on
//! another CPU holds the translation): the VMM's remote flushes (requested, sent) and kicks,
//! the kernel's own shootdown IPIs (native), and guest µs. The VMM figures subtract a
//! baseline boot with the same vCPU count (AP bring-up), like the UP rows; for
//! `smp_flush_avoid` the baseline (VMM and guest figures) is the same workload with one
//! page, so that its threads' start and end cancel out and only the never-touched pages
//! remain.

use crate::{stat, Stat};
use pvmm_e2e::{guest, pvmm_bin, temp, Tap};
use serde::Serialize;
use serde_json::Value;
use std::process::Command;

/// The SMP workloads and their operations per run.
pub const WORKLOADS: [(&str, f64); 4] = [
    ("smp_unmap", 8.0),
    ("smp_mprotect", 8.0),
    ("smp_dirty", 24.0),
    ("smp_flush_avoid", 4.0),
];

/// vCPU counts measured.
pub const VCPUS: [u32; 2] = [2, 4];

/// MMU modes measured.
pub const MODES: [&str; 5] = ["native", "pv", "pv-lazy", "emulate", "wrpt"];

/// One (workload, mode, vCPUs) cell.
#[derive(Clone, Debug, Serialize)]
pub struct SmpPoint {
    /// Workload.
    pub workload: String,
    /// `mmu=`.
    pub mmu: String,
    /// `--vcpus`.
    pub vcpus: u32,
    /// Operations per run.
    pub ops: f64,
    /// Remote flushes the VMM was asked for, per operation (None: the VMM has no SMP
    /// counters).
    pub remote_requested_per_op: Option<Stat>,
    /// Remote flushes delivered to a live vCPU, per operation.
    pub remote_sent_per_op: Option<Stat>,
    /// Kick signals, per operation.
    pub kicks_per_op: Option<Stat>,
    /// The guest kernel's shootdown IPIs per operation (native mode).
    pub guest_flush_ipis_per_op: Stat,
    /// Guest µs per operation (TSC of the whole test).
    pub us_per_op: Stat,
    /// The issuer's wait for remote deliveries (`remote_delivery_wait`) per remote flush
    /// sent, µs (None: nothing was sent).
    pub delivery_us_per_target: Option<Stat>,
    /// Stopped-world pool resyncs' park time (`world_stop_park`) per remote flush sent, µs:
    /// what a remote flush costs on a host that needs the resync (None: none).
    pub world_stop_us_per_target: Option<Stat>,
}

/// Total time of the merged effect `name`, ns (0 when absent).
pub fn effect_ns(v: &Value, name: &str) -> f64 {
    v["merged"]["effects"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
        .and_then(|e| e["total_ns"].as_f64())
        .unwrap_or(0.0)
}

/// The VMM's SMP counter `key`: the merged figure, else the sum over vCPUs.
pub fn smp_counter(v: &Value, key: &str) -> Option<f64> {
    if let Some(n) = v["merged"]["smp"][key].as_f64() {
        return Some(n);
    }
    let per: Vec<f64> = v["vcpus"]
        .as_array()?
        .iter()
        .filter_map(|c| c["smp"][key].as_f64())
        .collect();
    (!per.is_empty()).then(|| per.iter().sum())
}

/// One run with `--vcpus`; (stats, console).
fn run(cmdline: &str, vcpus: u32) -> Result<(Value, String), String> {
    let (v, console, code) = run_with(cmdline, vcpus, &[])?;
    if code != Some(0) {
        return Err(format!("{cmdline} --vcpus {vcpus}: exit {code:?}"));
    }
    Ok((v, console))
}

/// One run with `--vcpus` and `extra` pvmm flags, whatever the guest's verdict: (stats,
/// console, pvmm's exit code).
pub fn run_with(
    cmdline: &str,
    vcpus: u32,
    extra: &[&str],
) -> Result<(Value, String, Option<i32>), String> {
    let f = temp(&format!(
        "bench-smp-{}-{vcpus}-{}-{}.json",
        std::process::id(),
        cmdline.len(),
        extra.len()
    ));
    let out = Command::new(pvmm_bin())
        .args(["run", "--kernel"])
        .arg(guest())
        .args(["--cmdline", cmdline, "--vcpus", &vcpus.to_string()])
        .args(["--stats", "json", "--stats-file"])
        .arg(&f)
        .args(["--timeout", "300", "--hypercall", "pio"])
        .args(extra)
        .output()
        .map_err(|e| format!("{}: {e}", pvmm_bin().display()))?;
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = std::fs::read_to_string(&f).map_err(|e| format!("{cmdline}: no stats ({e})"))?;
    let _ = std::fs::remove_file(&f);
    let v = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    Ok((v, console, out.status.code()))
}

/// `key=value` of the counter line `# <name>: ...`.
fn counter(tap: &Tap, name: &str, key: &str) -> f64 {
    let prefix = format!("{name}:");
    tap.get(name)
        .into_iter()
        .flat_map(|p| p.diag.iter())
        .filter_map(|l| l.strip_prefix(&prefix))
        .flat_map(|rest| rest.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}

/// One sample: (remote requested, sent, kicks) less the baseline, guest IPIs, cycles, and
/// (delivery wait, world-stop park) ns less the baseline.
type Raw = (Option<[f64; 3]>, f64, f64, [f64; 2]);

/// A baseline: the VMM's stats and, where the baseline runs the workload itself, its guest
/// counters (flush IPIs, cycles) to subtract too.
struct Base {
    stats: Value,
    guest: (f64, f64),
}

/// The baseline run of workload `w`.
fn baseline(w: &str, mmu: &str, vcpus: u32) -> Result<Base, String> {
    let sel = if w == "smp_flush_avoid" {
        "smp_flush_avoid pages=1"
    } else {
        "none"
    };
    let (stats, console) = run(&format!("console=ttyS0 selftest={sel} mmu={mmu}"), vcpus)?;
    let tap = Tap::parse(&console)?;
    let guest = (counter(&tap, w, "flush_ipis"), counter(&tap, w, "cycles"));
    Ok(Base { stats, guest })
}

fn sample(w: &str, mmu: &str, vcpus: u32, b: &Base) -> Result<Raw, String> {
    let base = &b.stats;
    let (v, console) = run(&format!("console=ttyS0 selftest={w} mmu={mmu}"), vcpus)?;
    let tap = Tap::parse(&console)?;
    if !tap.get(w).is_some_and(|p| p.ok && p.skip.is_none()) {
        return Err(format!("{w} {mmu} --vcpus {vcpus}: not ok or skipped"));
    }
    let keys = ["remote_flushes_requested", "remote_flushes_sent", "kicks"];
    let vmm = keys.map(|k| Some(smp_counter(&v, k)? - smp_counter(base, k).unwrap_or(0.0)));
    let vmm = if vmm.iter().all(Option::is_some) {
        Some(vmm.map(|x| x.unwrap_or(0.0)))
    } else {
        None
    };
    let waits =
        ["remote_delivery_wait", "world_stop_park"].map(|e| effect_ns(&v, e) - effect_ns(base, e));
    Ok((
        vmm,
        counter(&tap, w, "flush_ipis") - b.guest.0,
        counter(&tap, w, "cycles") - b.guest.1,
        waits,
    ))
}

/// Measures every cell `repeat` times.
pub fn measure(repeat: u32, hz: f64, tick: &dyn Fn(&str)) -> (Vec<SmpPoint>, Vec<String>) {
    let (mut points, mut errors) = (Vec::new(), Vec::new());
    for vcpus in VCPUS {
        for mmu in MODES {
            for (w, ops) in WORKLOADS {
                tick(&format!("smp {mmu} --vcpus {vcpus} {w} baseline"));
                let base = match baseline(w, mmu, vcpus) {
                    Ok(v) => v,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                };
                let ss: Vec<Raw> = (0..repeat)
                    .filter_map(|_| {
                        sample(w, mmu, vcpus, &base)
                            .map_err(|e| errors.push(e))
                            .ok()
                    })
                    .collect();
                if ss.is_empty() {
                    continue;
                }
                let vmm = |i: usize| -> Option<Stat> {
                    let v: Option<Vec<f64>> = ss.iter().map(|s| Some(s.0?[i] / ops)).collect();
                    v.map(stat)
                };
                let per_target = |i: usize| -> Option<Stat> {
                    let v: Vec<f64> = ss
                        .iter()
                        .filter_map(|s| {
                            let sent = s.0?[1];
                            (sent > 0.0).then(|| s.3[i] / sent / 1000.0)
                        })
                        .collect();
                    (!v.is_empty()).then(|| stat(v))
                };
                points.push(SmpPoint {
                    workload: w.into(),
                    mmu: mmu.into(),
                    vcpus,
                    ops,
                    remote_requested_per_op: vmm(0),
                    remote_sent_per_op: vmm(1),
                    kicks_per_op: vmm(2),
                    guest_flush_ipis_per_op: stat(ss.iter().map(|s| s.1 / ops).collect()),
                    us_per_op: stat(ss.iter().map(|s| s.2 / hz * 1e6 / ops).collect()),
                    delivery_us_per_target: per_target(0),
                    world_stop_us_per_target: per_target(1),
                });
            }
        }
    }
    (points, errors)
}

/// Runs per [`measure`] call (for the progress bar).
pub fn runs(repeat: u32) -> u64 {
    (VCPUS.len() * MODES.len() * WORKLOADS.len() * (1 + repeat as usize)) as u64
}

/// The report's SMP section.
pub fn section(o: &mut String, points: &[SmpPoint], floor_ns: f64) {
    use std::fmt::Write;
    let _ = writeln!(o, "\n## SMP: remote flushes per operation\n");
    let _ = writeln!(o, "An operation is one round of the workload (an unmap, mprotect or dirty harvest with a thread on another vCPU holding the translation; for `smp_flush_avoid` a map+unmap of never-touched pages with the space live on every vCPU). VMM counters less a boot with the same vCPU count (for `smp_flush_avoid`, less the same workload on one page); `-`: the VMM reports no SMP counters. Medians. A delivery kicks its target only if the target is inside KVM_RUN at that moment, so kicks/op can differ from run to run for the same deliveries (for `smp_flush_avoid`, remote requested/op and sent/op are the never-touched pages' own: 0 means no kick was for them).\n");
    let _ = writeln!(o, "The cost of a remote flush per target vCPU, in exit floors measured in the same run ({:.1} µs): `delivery` is the issuer's wait until every target acknowledged (`remote_delivery_wait`), `world stop` the park time of the stopped-world pool resyncs (`world_stop_park`, only where the host needs the resync; the targets apply their deliveries on the way to parking, so it includes them and `delivery` is then near 0), both per remote flush sent. Goal: ≤ 2 exit floors per target; the cost rows below have it on 1, 2 and 4 vCPUs and for kick delivery.\n", floor_ns / 1000.0);
    let _ = writeln!(o, "| workload | mmu | vCPUs | remote requested/op | remote sent/op | kicks/op | guest IPIs/op | µs/op | delivery ÷ floor per target | world stop ÷ floor per target |");
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|");
    let floors = |s: &Option<Stat>| match s {
        Some(s) if floor_ns > 0.0 => format!("{:.1}", s.median * 1000.0 / floor_ns),
        _ => "-".to_string(),
    };
    let f = |s: &Option<Stat>| {
        s.as_ref()
            .map_or("-".to_string(), |s| format!("{:.2}", s.median))
    };
    for p in points {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.0} | {} | {} |",
            p.workload,
            p.mmu,
            p.vcpus,
            f(&p.remote_requested_per_op),
            f(&p.remote_sent_per_op),
            f(&p.kicks_per_op),
            p.guest_flush_ipis_per_op.median,
            p.us_per_op.median,
            floors(&p.delivery_us_per_target),
            floors(&p.world_stop_us_per_target)
        );
    }
}
