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

const ALL: [&str; 11] = [
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
        let small = op_hypercalls(tap, "exit_teardown", "teardown of 261 PTEs");
        let big = op_hypercalls(tap, "exit_teardown", "teardown of 1029 PTEs");
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
