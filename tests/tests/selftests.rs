//! The guest selftest suite in each MMU mode, read with a TAP consumer, plus the stats JSON.

use pvmm_e2e::*;
use serde_json::Value;

const PAGES: &str = "pages=256";

fn suite(mode: &str, extra: &str) -> (std::process::Output, Tap, Value) {
    let f = temp(&format!("suite-{mode}-{}.json", extra.len()));
    let cmdline = format!("console=ttyS0 selftest=all mmu={mode} {PAGES} {extra}");
    let out = run_guest(
        &cmdline,
        &[
            "--stats",
            "json",
            "--stats-file",
            f.to_str().unwrap(),
            "--timeout",
            "300",
        ],
    );
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let tap = Tap::parse(&console).unwrap_or_else(|e| panic!("{mode}: bad TAP ({e}):\n{console}"));
    let stats: Value = serde_json::from_str(&std::fs::read_to_string(&f).expect("stats file"))
        .expect("stats JSON");
    let _ = std::fs::remove_file(&f);
    (out, tap, stats)
}

/// The `<n>` of "<op>...: ..., <n> MMU hypercalls" in the diagnostics of `test`.
fn op_hypercalls(tap: &Tap, test: &str, op: &str) -> u64 {
    let p = tap.get(test).unwrap_or_else(|| panic!("no test {test}"));
    let line = p
        .diag
        .iter()
        .find(|l| l.starts_with(op))
        .unwrap_or_else(|| panic!("{test}: no '{op}' line in {:?}", p.diag));
    let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
    let i = words
        .iter()
        .position(|w| *w == "MMU")
        .unwrap_or_else(|| panic!("no count in '{line}'"));
    words[i - 1]
        .parse()
        .unwrap_or_else(|_| panic!("no count in '{line}'"))
}

const ALL: [&str; 20] = [
    "populate",
    "zap",
    "mprotect",
    "mremap",
    "fork_cow",
    "exit_teardown",
    "ad_young",
    "ad_dirty",
    "relocate",
    "flush_avoid",
    "fault_around",
    "smp_unmap",
    "smp_mprotect",
    "smp_remap",
    "smp_dirty",
    "smp_exit_mmap",
    "smp_flush_avoid",
    "smp_fork_cow",
    "smp_hammer",
    "hostile",
];

fn check_suite(mode: &str) -> Tap {
    let (out, tap, stats) = suite(mode, "");
    let console = String::from_utf8_lossy(&out.stdout);
    assert_eq!(tap.plan, Some(ALL.len() as u32), "{console}");
    assert_eq!(tap.points.len(), ALL.len(), "{console}");
    for name in ALL {
        let p = tap
            .get(name)
            .unwrap_or_else(|| panic!("{mode}: no test {name}"));
        assert!(p.ok, "{mode}: not ok {name}: {:?}", p.diag);
        if mode == "native" && name == "hostile" {
            assert!(
                p.skip.is_some(),
                "hostile is PV-only and must SKIP in native mode"
            );
        } else {
            assert!(p.skip.is_none(), "{mode}: {name} skipped: {:?}", p.skip);
        }
    }
    assert_eq!(
        out.status.code(),
        Some(0),
        "{mode}: guest exit status is its failure count"
    );
    assert_eq!(stats["vm"]["end_reason"], "guest-exit");
    if mode != "native" {
        assert!(
            stats["mmu"]["pte_updates"].as_u64().unwrap_or(0) > 0,
            "{mode}: the shadow MMU did the work"
        );
    }
    tap
}

#[test]
fn suite_passes_in_native_mode() {
    if kvm_available("suite_passes_in_native_mode") {
        check_suite("native");
    }
}

#[test]
fn suite_passes_in_pv_and_pv_lazy_and_lazy_batches() {
    if !kvm_available("suite_passes_in_pv_and_pv_lazy_and_lazy_batches") {
        return;
    }
    let pv = check_suite("pv");
    let lazy = check_suite("pv-lazy");
    // The operation itself (populate of N pages, a full zap, mprotect of the range, fork's
    // copy): the guest prints "<op>: ..., <n> MMU hypercalls" for each.
    for (test, op) in [
        ("populate", "populate zero=vmm"),
        ("zap", "full zap of 256 pages"),
        ("mprotect", "mprotect RO of 256 pages"),
        ("fork_cow", "fork of 256 pages"),
    ] {
        let (a, b) = (op_hypercalls(&pv, test, op), op_hypercalls(&lazy, test, op));
        assert!(b > 0, "{op}: pv-lazy issued no hypercalls?");
        assert!(
            a >= 32 * b,
            "{op}: pv {a} MMU hypercalls vs pv-lazy {b}: less than 32x fewer"
        );
        eprintln!("{op}: pv {a} vs pv-lazy {b} MMU hypercalls ({}x)", a / b);
    }
    // Exit teardown in PV modes: O(1) hypercalls in the number of PTEs.
    for tap in [&pv, &lazy] {
        let p = tap.get("exit_teardown").expect("exit_teardown");
        let lines: Vec<&String> = p
            .diag
            .iter()
            .filter(|l| l.starts_with("teardown of"))
            .collect();
        assert_eq!(lines.len(), 2, "{:?}", p.diag);
        // One region, then four (their PTE counts include the pages fault-around mapped).
        let (small, big) = (
            op_hypercalls(tap, "exit_teardown", lines[0]),
            op_hypercalls(tap, "exit_teardown", lines[1]),
        );
        assert!(
            small == big && big <= 2,
            "teardown hypercalls {small} vs {big}"
        );
    }
    // The hostile test refused every attack (it is `ok` only if each got its documented error).
    let h = lazy.get("hostile").unwrap();
    assert!(
        h.ok && h.diag.iter().any(|l| l.contains("expected")),
        "{:?}",
        h.diag
    );
}

#[test]
fn suite_passes_in_emulate_and_wrpt() {
    if !kvm_available("suite_passes_in_emulate_and_wrpt") {
        return;
    }
    for mode in ["emulate", "wrpt"] {
        let (out, tap, stats) = suite(mode, "");
        let console = String::from_utf8_lossy(&out.stdout);
        assert_eq!(tap.points.len(), ALL.len(), "{console}");
        for name in ALL {
            let p = tap
                .get(name)
                .unwrap_or_else(|| panic!("{mode}: no test {name}"));
            assert!(p.ok && p.skip.is_none(), "{mode}: {name}: {:?}", p.diag);
        }
        assert_eq!(out.status.code(), Some(0), "{mode}: {console}");
        let t = &stats["mmu"]["pt_trap"];
        assert_eq!(t["mode"], mode, "{t}");
        let n = |k: &str| t[k].as_u64().unwrap_or(0);
        assert!(n("trapped_writes") > 0, "{mode}: the stores trapped: {t}");
        // The hostile test's plain stores were refused (and nothing else was).
        assert!(n("refused_writes") >= 3, "{mode}: {t}");
        if mode == "emulate" {
            assert_eq!(n("unhooks"), 0, "{t}");
            // Every trapped store was emulated, refused or (a stale alias) written through.
            let handled = n("emulated_writes") + n("refused_writes") + n("passthrough_writes");
            assert!(handled >= n("trapped_writes"), "{t}");
        } else {
            // Every unhooked L1 is re-hooked but those still unhooked when the guest exits.
            let (u, r) = (n("unhooks"), n("rehooks"));
            assert!(u > 0 && r <= u && u - r <= 4, "{t}");
            assert!(n("revalidated_entries") >= n("rehooks") / 2, "{t}");
            assert!(
                n("spurious_faults") > 0,
                "{mode}: demand faults retried: {t}"
            );
        }
    }
}

#[test]
fn flush_avoid_needs_no_vmm_flush_for_untouched_unmaps() {
    if !kvm_available("flush_avoid_needs_no_vmm_flush_for_untouched_unmaps") {
        return;
    }
    let run = |sel: &str| {
        let f = temp(&format!("fa-{sel}.json"));
        let out = run_guest(
            &format!("console=ttyS0 mmu=pv-lazy {PAGES} selftest={sel}"),
            &[
                "--stats",
                "json",
                "--stats-file",
                f.to_str().unwrap(),
                "--timeout",
                "120",
            ],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let _ = std::fs::remove_file(&f);
        v
    };
    let base = run("none");
    let fa = run("flush_avoid");
    let count = |v: &Value, k: &str, r: &str| v["mmu"][k][r].as_u64().unwrap_or(0);
    // Reasons an unmap could cause. Creating and ending the test process retypes a table
    // frame (type_downgrade / rights_restored); that is not an unmap.
    for reason in [
        "leaf_removed",
        "leaf_downgraded",
        "non_leaf_changed",
        "guest_invlpg",
        "guest_flush_tlb",
    ] {
        let n = count(&fa, "flushes_performed", reason) - count(&base, "flushes_performed", reason);
        assert_eq!(
            n, 0,
            "untouched unmaps needed no flush ({reason}): {}",
            fa["mmu"]
        );
    }
    let avoided = count(&fa, "flushes_avoided", "never_accessed")
        - count(&base, "flushes_avoided", "never_accessed");
    assert!(
        avoided >= 256,
        "never-accessed removals counted as avoided flushes: {avoided}"
    );
}

#[test]
fn a_broken_backend_is_caught() {
    if !kvm_available("a_broken_backend_is_caught") {
        return;
    }
    let (out, tap, _) = suite("pv-lazy", "break=drop_update");
    assert!(
        tap.failures() > 0,
        "dropping one queued update must fail the suite"
    );
    assert_eq!(out.status.code(), Some(tap.failures() as i32));
}

/// One run of `selftest=<sel>` with `fault_around=<fa>`: its TAP and stats JSON.
fn fa_run(mode: &str, sel: &str, fa: u32) -> (Tap, Value) {
    let (out, tap, stats) = suite(mode, &format!("selftest={sel} fault_around={fa}"));
    let console = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{mode} fault_around={fa}: {console}"
    );
    assert!(tap.points.iter().all(|p| p.ok), "{console}");
    (tap, stats)
}

#[test]
fn fault_around_prefaults_old_pages_and_reclaim_needs_no_flush() {
    if !kvm_available("fault_around_prefaults_old_pages_and_reclaim_needs_no_flush") {
        return;
    }
    for mode in ["native", "pv", "pv-lazy"] {
        let (on, on_stats) = fa_run(mode, "populate,fault_around", 16);
        let (off, off_stats) = fa_run(mode, "populate,fault_around", 0);
        // The demand-zero sweep of 256 pages: one fault per 16-page window, 256 without.
        let dz = "demand-zero of 256 pages";
        assert_eq!(on.diag_count("populate", dz, "faults"), 16, "{mode}");
        assert_eq!(off.diag_count("populate", dz, "faults"), 256, "{mode}");
        assert_eq!(
            on.diag_count("populate", dz, "PTE"),
            256 + 1,
            "{mode}: the pages and their L1"
        );
        if mode == "pv-lazy" {
            // One batch per fault: 16 PTE updates per exit on the fault path.
            assert_eq!(on.diag_count("populate", dz, "MMU"), 16, "{mode}");
            assert_eq!(off.diag_count("populate", dz, "MMU"), 256, "{mode}");
        }
        // Reclaim: the prefaulted pages never touched are found and unmapped; without
        // fault-around there are none.
        let re = "reclaim:";
        let dropped = on.diag_count("fault_around", re, "prefaulted");
        assert!(dropped > 100, "{mode}: only {dropped} pages reclaimed");
        assert_eq!(off.diag_count("fault_around", re, "prefaulted"), 0);
        assert_eq!(on.diag_count("fault_around", re, "guest"), 0, "{mode}");
        if mode == "native" {
            continue;
        }
        // The VMM: every reclaimed page was a never-accessed removal (no flush), and the
        // flushes it did perform are the same with and without fault-around.
        let avoided = |v: &Value| {
            v["mmu"]["flushes_avoided"]["never_accessed"]
                .as_u64()
                .unwrap_or(0)
        };
        assert_eq!(
            avoided(&on_stats) - avoided(&off_stats),
            dropped,
            "{mode}: never-accessed removals vs pages reclaimed"
        );
        assert_eq!(
            on_stats["mmu"]["flushes_performed"], off_stats["mmu"]["flushes_performed"],
            "{mode}: the reclaim caused flushes"
        );
    }
}
