//! `make bench` cannot silently break: the bench-matrix binary runs a tiny configuration
//! (the `BENCH_PAGES=16 BENCH_REPEAT=1` of the Makefile, without criterion) into a temporary
//! directory, and every output must exist and parse, with every cell measured.

use pvmm_e2e::*;
use serde_json::Value;
use std::process::Command;

#[test]
fn a_tiny_bench_matrix_writes_every_output() {
    if !kvm_available("a_tiny_bench_matrix_writes_every_output") {
        return;
    }
    let dir = temp(&format!("bench-matrix-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_bench-matrix"))
        .args(["--pages=16", "--repeat=1"])
        .arg(format!("--out={}", dir.display()))
        .env("PVMM_BIN", pvmm_bin())
        .env("PVMM_GUEST", guest())
        .output()
        .expect("run bench-matrix");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench-matrix failed: {stderr}");
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("results.json")).expect("results.json"),
    )
    .expect("results.json parses");
    assert_eq!(results["pages"], 16);
    assert_eq!(
        results["errors"].as_array().map(Vec::len),
        Some(0),
        "{results}"
    );
    let points = results["points"].as_array().expect("points");
    // 11 modes (native, pv, pv-lazy/1024 with fault-around on and off; pv-lazy/16, 64,
    // 256; emulate, wrpt) times 6 workloads.
    assert_eq!(points.len(), 11 * 6, "every cell measured");
    for mode in ["emulate", "wrpt"] {
        let p = points
            .iter()
            .find(|p| p["workload"] == "zap" && p["mode"] == mode)
            .expect("a trap-mode cell");
        assert!(p["trapped_per_op"]["median"].as_f64() > Some(0.0), "{p}");
        assert!(p["ptes_per_pt_page"]["median"].as_f64() > Some(1.0), "{p}");
    }
    let md = std::fs::read_to_string(dir.join("report.md")).expect("report.md");
    assert!(
        md.contains("## Five strategies") && md.contains("**Conclusion"),
        "{md}"
    );
    let populate = points
        .iter()
        .find(|p| p["workload"] == "populate" && p["mode"] == "pv-lazy/1024")
        .expect("populate pv-lazy/1024");
    let fault = &populate["ops"]["fault (demand-zero)"];
    assert_eq!(fault["faults_per_page"]["median"], 1.0 / 16.0, "{populate}");
    assert!(populate["phases_ns"]["apply"]["median"].as_f64() > Some(0.0));
    // The boot's pin is a table op, charged to no update; the demand faults are batches of
    // one fault-around window (16 updates).
    assert!(
        populate["phases_ns"]["table_ops"]["median"].is_number(),
        "{populate}"
    );
    assert!(
        populate["batch_sizes"]["16.pt_updates"]["median"].as_f64() >= Some(16.0),
        "{populate}"
    );
    check_smp_rows(&results);
    let md = std::fs::read_to_string(dir.join("report.md")).expect("report.md");
    for section in [
        "Host:",
        "Resync:",
        "## Headline: PTE updates per exit, per operation",
        "## The fault path",
        "pv-lazy ÷ native",
        "## MMU_BATCH phases",
        "## VMM cost by batch size",
        "## Every cell",
        "## SMP: remote flushes per operation",
    ] {
        assert!(md.contains(section), "report.md lacks '{section}':\n{md}");
    }
    for svg in ["exits_per_op.svg", "us_per_op.svg"] {
        let s = std::fs::read_to_string(dir.join(svg)).expect(svg);
        assert!(s.contains("<svg") && s.contains("</svg>"), "{svg}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The SMP rows: 4 workloads x 5 modes x 2 and 4 vCPUs, with the VMM's remote-flush
/// counters in the PV modes; no remote flush at all for never-touched pages.
fn check_smp_rows(results: &Value) {
    let smp = results["smp"].as_array().expect("smp rows");
    assert_eq!(smp.len(), 4 * 5 * 2, "every SMP cell measured: {results}");
    for p in smp.iter().filter(|p| p["mmu"] != "native") {
        assert!(
            p["remote_sent_per_op"].is_object(),
            "no VMM SMP counters: {p}"
        );
        if p["workload"] == "smp_flush_avoid" {
            // Never-touched pages need no remote flush, so none is requested or sent and no
            // kick can be for them. (Kicks themselves are not compared with the baseline: a
            // delivery kicks its target only if it is inside KVM_RUN at that moment, which
            // differs between the two runs for the same deliveries.)
            assert_eq!(p["remote_requested_per_op"]["median"], 0.0, "{p}");
            assert_eq!(p["remote_sent_per_op"]["median"], 0.0, "{p}");
        } else {
            assert!(
                p["remote_sent_per_op"]["median"].as_f64() > Some(0.0),
                "{p}"
            );
        }
    }
}
