//! The remote-flush cost rows: what delivering a remote flush costs per target vCPU, as a
//! ratio to the exit floor measured in the same run, on 1, 2 and 4 vCPUs, separately for
//! the two ways a delivery happens:
//!
//! - `world stop`: the host needs the pool resync (`--pool-resync auto` decided so), every
//!   delivery rides a stopped world; per target = (the leader's park time + its wait for
//!   acknowledgements) ÷ remote flushes sent.
//! - `kernel`: where the host needs no resync, `--remote-flush auto` flushes the targets
//!   in the host kernel (the dirty-log trigger, or a protection-key zap of the stale pool
//!   frames; no exit to the VMM); per target = the trigger's time ÷ targets it flushed. `--pool-resync never
//!   --remote-flush kernel` forces it (a cost row only where the host needs the resync).
//! - `kick`: `--pool-resync never --remote-flush kick` forces kick delivery (signal, the target's flush on its
//!   own thread, acknowledgement). On a host that needs the resync this is a COST ROW ONLY:
//!   the workloads' results are not correct there (their guest verdict is shown); only the
//!   VMM's delivery figures are used. Per target = the issuer's delivery wait ÷ sent.
//!
//! VMM figures less a boot with the same vCPU count and flags; the kick round-trip
//! percentiles are those of the workload run (the baseline boot has no kicks worth
//! counting).

use crate::smp::{effect_ns, run_with, smp_counter};
use crate::{stat, Stat};
use pvmm_e2e::Tap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Workloads measured (one round = one remote flush per other vCPU holding the page).
const WORKLOADS: [&str; 2] = ["smp_unmap", "smp_mprotect"];
/// vCPU counts.
const VCPUS: [u32; 3] = [1, 2, 4];
/// The MMU mode.
const MMU: &str = "pv-lazy";
/// The goal, in exit floors per target.
const GOAL_FLOORS: f64 = 2.0;

/// One (workload, vCPUs, delivery) cell.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CostPoint {
    /// Workload.
    pub workload: String,
    /// `mmu=`.
    pub mmu: String,
    /// `--vcpus`.
    pub vcpus: u32,
    /// `--pool-resync` given (`auto`: the host's verdict; `never`: forced off).
    pub pool_resync: String,
    /// `--remote-flush` given (`auto`, `kick`, `kernel`).
    #[serde(default)]
    pub remote_flush: String,
    /// Every sample's guest test passed (false is expected for `never` where the host
    /// needs the resync: a cost row only).
    pub guest_ok: bool,
    /// Remote flushes sent per run (deliveries posted and kernel flushes).
    pub sent: Stat,
    /// Of them, targets flushed in the host kernel per run.
    #[serde(default)]
    pub kernel: Stat,
    /// Delivery kicks per run.
    pub kicks: Stat,
    /// World stops per run.
    pub world_stops: Stat,
    /// (Delivery wait + world-stop park) per remote flush sent, in exit floors.
    pub per_target_floors: Option<Stat>,
    /// Kick round trip p50, exit floors.
    pub kick_rtt_p50_floors: Option<Stat>,
    /// Its parts (p50, exit floors): kick to exit, exit to acknowledgement, to the
    /// issuer's wake-up.
    pub kick_parts_p50_floors: Option<[Stat; 3]>,
    /// World-stop duration per stop (parking, deliveries, resync), exit floors.
    pub world_stop_per_stop_floors: Option<Stat>,
}

/// One sample's raw figures.
#[derive(Default)]
struct Raw {
    sent: f64,
    kernel: f64,
    kicks: f64,
    stops: f64,
    per_target_ns: Option<f64>,
    kick_p50_ns: Option<f64>,
    kick_parts_p50_ns: Option<[f64; 3]>,
    stop_ns: Option<f64>,
    ok: bool,
}

fn counter(v: &Value, b: &Value, key: &str) -> f64 {
    smp_counter(v, key).unwrap_or(0.0) - smp_counter(b, key).unwrap_or(0.0)
}

fn dist(v: &Value, key: &str, field: &str) -> f64 {
    v["merged"]["smp"][key][field].as_f64().unwrap_or(0.0)
}

fn raw(v: &Value, b: &Value, ok: bool) -> Raw {
    let kernel = counter(v, b, "kernel_flushes");
    let sent = counter(v, b, "remote_flushes_sent") + kernel;
    let wait = [
        "remote_delivery_wait",
        "world_stop_park",
        "remote_kernel_flush",
    ]
    .iter()
    .map(|e| effect_ns(v, e) - effect_ns(b, e))
    .sum::<f64>();
    let stops = counter(v, b, "world_stops");
    let stop_total = dist(v, "world_stop", "total_ns") - dist(b, "world_stop", "total_ns");
    // A VMM without the parts (an older build) reports only the round trip.
    let kicked = dist(v, "kick_rtt", "count") > 0.0;
    let parts = kicked && v["merged"]["smp"]["kick_exit"].is_object();
    Raw {
        sent,
        kernel,
        kicks: counter(v, b, "kicks"),
        stops,
        per_target_ns: (sent > 0.0).then(|| wait / sent),
        kick_p50_ns: kicked.then(|| dist(v, "kick_rtt", "p50_ns")),
        kick_parts_p50_ns: parts
            .then(|| ["kick_exit", "kick_apply", "kick_wake"].map(|k| dist(v, k, "p50_ns"))),
        stop_ns: (stops > 0.0).then(|| stop_total / stops),
        ok,
    }
}

fn cell(w: &str, vcpus: u32, (resync, flush): Delivery, repeat: u32) -> Result<Vec<Raw>, String> {
    let flags = ["--pool-resync", resync, "--remote-flush", flush];
    let (base, _, code) = run_with(
        &format!("console=ttyS0 selftest=none mmu={MMU}"),
        vcpus,
        &flags,
    )?;
    if code != Some(0) {
        return Err(format!(
            "baseline {MMU} --vcpus {vcpus} {resync}: exit {code:?}"
        ));
    }
    (0..repeat)
        .map(|_| {
            let cmd = format!("console=ttyS0 selftest={w} mmu={MMU}");
            let (v, console, _) = run_with(&cmd, vcpus, &flags)?;
            let ok = Tap::parse(&console)
                .ok()
                .and_then(|t| t.get(w).map(|p| p.ok && p.skip.is_none()))
                .unwrap_or(false);
            if !ok && resync != "never" {
                return Err(format!("{w} {MMU} --vcpus {vcpus}: not ok or skipped"));
            }
            Ok(raw(&v, &base, ok))
        })
        .collect()
}

fn point(w: &str, vcpus: u32, (resync, flush): Delivery, ss: &[Raw], floor_ns: f64) -> CostPoint {
    let fl = |ns: f64| if floor_ns > 0.0 { ns / floor_ns } else { 0.0 };
    let opt = |f: &dyn Fn(&Raw) -> Option<f64>| {
        let v: Vec<f64> = ss.iter().filter_map(f).map(fl).collect();
        (!v.is_empty()).then(|| stat(v))
    };
    let part = |i: usize| opt(&|s| s.kick_parts_p50_ns.map(|k| k[i]));
    let parts = match (part(0), part(1), part(2)) {
        (Some(a), Some(b), Some(c)) => Some([a, b, c]),
        _ => None,
    };
    CostPoint {
        workload: w.into(),
        mmu: MMU.into(),
        vcpus,
        pool_resync: resync.into(),
        remote_flush: flush.into(),
        guest_ok: ss.iter().all(|s| s.ok),
        sent: stat(ss.iter().map(|s| s.sent).collect()),
        kernel: stat(ss.iter().map(|s| s.kernel).collect()),
        kicks: stat(ss.iter().map(|s| s.kicks).collect()),
        world_stops: stat(ss.iter().map(|s| s.stops).collect()),
        per_target_floors: opt(&|s| s.per_target_ns),
        kick_rtt_p50_floors: opt(&|s| s.kick_p50_ns),
        kick_parts_p50_floors: parts,
        world_stop_per_stop_floors: opt(&|s| s.stop_ns),
    }
}

/// A cell's `--pool-resync` and `--remote-flush`.
type Delivery = (&'static str, &'static str);

/// The cells: every workload on 1, 2 and 4 vCPUs with the host's choices, and on 2 and 4
/// with the resync off and each delivery forced.
fn cells() -> Vec<(&'static str, u32, Delivery)> {
    let mut c = Vec::new();
    for w in WORKLOADS {
        for v in VCPUS {
            c.push((w, v, ("auto", "auto")));
            if v > 1 {
                c.push((w, v, ("never", "kick")));
                c.push((w, v, ("never", "kernel")));
            }
        }
    }
    c
}

/// Runs per [`measure`] call (for the progress bar).
pub fn runs(repeat: u32) -> u64 {
    (cells().len() * (1 + repeat as usize)) as u64
}

/// The host's load while the cost rows ran: (`/proc/loadavg` before, after, cores).
pub type Load = (String, String, usize);

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Measures every cost cell `repeat` times, ratios against `floor_ns`.
pub fn measure(
    repeat: u32,
    floor_ns: f64,
    tick: &dyn Fn(&str),
) -> (Vec<CostPoint>, Load, Vec<String>) {
    let before = loadavg();
    let (mut points, mut errors) = (Vec::new(), Vec::new());
    for (w, v, d) in cells() {
        tick(&format!(
            "smp cost {w} --vcpus {v} --pool-resync {} --remote-flush {}",
            d.0, d.1
        ));
        match cell(w, v, d, repeat) {
            Ok(ss) if !ss.is_empty() => points.push(point(w, v, d, &ss, floor_ns)),
            Ok(_) => {}
            Err(e) => errors.push(e),
        }
        for _ in 0..repeat {
            tick("");
        }
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    (points, (before, loadavg(), cores), errors)
}

fn med(s: &Option<Stat>) -> String {
    s.as_ref().map_or("-".into(), |s| {
        format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max)
    })
}

fn verdict(p: &CostPoint) -> &'static str {
    match &p.per_target_floors {
        None => "- (no remote target)",
        Some(s) if s.median <= GOAL_FLOORS => "met",
        Some(_) => "not met",
    }
}

/// The report's cost section.
pub fn section(o: &mut String, points: &[CostPoint], load: &Load, floor_ns: f64) {
    use std::fmt::Write;
    let _ = writeln!(
        o,
        "\n## SMP: remote-flush cost per target vCPU, in exit floors\n"
    );
    table(o, points, load, floor_ns);
}

/// The cost table with its legend (this host's section, or the SVM bed's).
pub fn table(o: &mut String, points: &[CostPoint], load: &Load, floor_ns: f64) {
    use std::fmt::Write;
    let _ = writeln!(o, "Exit floor of this run: {:.1} µs (bare port write). `{MMU}`. Per target: (issuer's delivery wait + world-stop park + kernel flush) ÷ remote flushes sent (deliveries and kernel flushes), median (min–max) over the samples; goal ≤ {GOAL_FLOORS} floors per target. `auto/auto`: the host's choices (where the host needs the resync, with leaf zaps the remote flushes that stem only from changed leaves are done by the zap that makes the host forget them, counted as kernel flushes with the zap's whole time, the rest are kicks or ride a stopped world whose own kicks are not delivery kicks; where it needs no resync, remote flushes go through the host kernel, by the dirty-log trigger where its probe passes, else by protection keys, else by kicks; a root switch of `DETACH` is always a kick, on the target's own thread). `never/kick`, `never/kernel`: the resync off and that delivery forced — **a cost row only where the host needs the resync: the workload is not correct there** (guest verdict shown). Kick round trip and its parts (kick → target out of KVM_RUN → flush acknowledged → issuer awake) are p50 of the workload run. Host: {} cores, load average {} before, {} after.\n", floor_ns / 1000.0, load.2, load.0, load.1);
    let _ = writeln!(o, "| workload | vCPUs | --pool-resync / --remote-flush | guest ok | sent/run | kernel/run | kicks/run | world stops/run | per target ÷ floor | kick RTT p50 ÷ floor | exit / apply / wake p50 ÷ floor | world stop ÷ floor per stop | ≤ {GOAL_FLOORS} floors |");
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for p in points {
        let parts = p.kick_parts_p50_floors.as_ref().map_or("-".into(), |k| {
            format!(
                "{:.1} / {:.1} / {:.1}",
                k[0].median, k[1].median, k[2].median
            )
        });
        let _ = writeln!(
            o,
            "| {} | {} | {} / {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
            p.workload,
            p.vcpus,
            p.pool_resync,
            if p.remote_flush.is_empty() {
                "kick"
            } else {
                &p.remote_flush
            },
            if p.guest_ok { "yes" } else { "no (cost only)" },
            p.sent.median,
            p.kernel.median,
            p.kicks.median,
            p.world_stops.median,
            med(&p.per_target_floors),
            med(&p.kick_rtt_p50_floors),
            parts,
            med(&p.world_stop_per_stop_floors),
            verdict(p)
        );
    }
}
