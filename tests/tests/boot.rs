//! Boots the bundled guest with each `--stats` mode and each hypercall transport.

use pvmm_e2e::*;
use serde_json::Value;

const BANNER: &str = "pvmm-guest";

fn stats_json(cmdline: &str, extra: &[&str]) -> (std::process::Output, Value) {
    let f = temp(&format!("stats-{}.json", cmdline.len() + extra.len()));
    let fs = f.to_str().unwrap().to_string();
    let mut args = vec![
        "--stats",
        "json",
        "--stats-file",
        fs.as_str(),
        "--timeout",
        "120",
    ];
    args.extend_from_slice(extra);
    let out = run_guest(cmdline, &args);
    let text = std::fs::read_to_string(&f).unwrap_or_else(|e| {
        panic!(
            "no stats file ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let _ = std::fs::remove_file(&f);
    (
        out,
        serde_json::from_str(&text).expect("stats file is one JSON object"),
    )
}

#[test]
fn boots_with_json_stats_and_plausible_values() {
    if !kvm_available("boots_with_json_stats_and_plausible_values") {
        return;
    }
    let (out, v) = stats_json(
        "console=ttyS0 selftest=none exit=0",
        &["--hypercall", "pio"],
    );
    let console = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(console.contains(BANNER), "{console}");
    assert!(
        console.contains("cmdline: console=ttyS0 selftest=none exit=0"),
        "{console}"
    );
    assert!(console.contains("usable"), "e820 printed: {console}");
    assert_eq!(v["schema_version"], 2);
    assert_eq!(v["kind"], "final");
    assert_eq!(v["vm"]["guest_status"], 0);
    assert_eq!(v["vm"]["end_reason"], "guest-exit");
    assert_eq!(v["vm"]["exit_code"], 0);
    assert_eq!(v["vm"]["hypercall_transport"], "pio");
    let m = &v["merged"];
    // Every console byte is one `out` to 0x3f8 (plus a CR per LF).
    let serial_out = m["pio"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == 0x3f8 && p["dir"] == "out")
        .expect("serial row");
    assert!(
        serial_out["count"].as_u64().unwrap() >= console.len() as u64,
        "{serial_out}"
    );
    let io = m["exits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "io")
        .expect("io exits");
    assert!(io["count"].as_u64().unwrap() >= console.len() as u64);
    for k in [
        "min_ns", "mean_ns", "p50_ns", "p99_ns", "max_ns", "total_ns",
    ] {
        assert!(io[k].is_u64(), "{k} in {io}");
    }
    assert!(
        io["min_ns"].as_u64() <= io["p50_ns"].as_u64()
            && io["p50_ns"].as_u64() <= io["max_ns"].as_u64()
    );
    assert!(m["kvm_run_ns"].as_u64().unwrap() > 0 && m["vmm_ns"].as_u64().unwrap() > 0);
    let hc = m["hypercalls"].as_array().unwrap();
    assert!(
        hc.iter().any(|h| h["op"] == "VERSION" && h["count"] == 1),
        "{hc:?}"
    );
    assert!(
        hc.iter().any(|h| h["op"] == "EXIT" && h["count"] == 1),
        "{hc:?}"
    );
    // KVM's own counters: at least as many exits as userspace saw.
    let kexits = m["kvm"]["exits"]["delta"]
        .as_u64()
        .expect("kvm exits counter");
    assert!(
        kexits >= m["exits_total"].as_u64().unwrap(),
        "kvm {kexits} vs {}",
        m["exits_total"]
    );
    assert_eq!(v["vcpus"].as_array().unwrap().len(), 1);
}

#[test]
fn guest_exit_status_is_the_vmm_exit_code_and_table_is_printed() {
    if !kvm_available("guest_exit_status_is_the_vmm_exit_code_and_table_is_printed") {
        return;
    }
    let out = run_guest("console=ttyS0 selftest=none exit=7", &["--stats", "table"]);
    assert_eq!(out.status.code(), Some(7));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pvmm exit statistics")
            && err.contains("Userspace exits")
            && err.contains("0x3f8"),
        "{err}"
    );
    let out = run_guest(
        "console=ttyS0 selftest=none",
        &["--stats", "none", "--serial", "none"],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("exit statistics"));
}

#[test]
fn serial_to_file() {
    if !kvm_available("serial_to_file") {
        return;
    }
    let f = temp("serial.txt");
    let arg = format!("file={}", f.display());
    let out = run_guest(
        "console=ttyS0 selftest=none",
        &["--serial", &arg, "--stats", "none"],
    );
    assert_eq!(out.status.code(), Some(0));
    let text = std::fs::read_to_string(&f).unwrap();
    let _ = std::fs::remove_file(&f);
    assert!(text.contains(BANNER));
}

fn host_has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.contains(" vmx") || c.contains(" svm"))
        .unwrap_or(false)
}

#[test]
fn auto_transport_picks_pio_here_quickly() {
    if !kvm_available("auto_transport_picks_pio_here_quickly") {
        return;
    }
    let (out, v) = stats_json("console=ttyS0 selftest=none", &["--hypercall", "auto"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(v["vm"]["transport_choice"], "auto");
    let probe_ns = v["vm"]["transport_probe_ns"].as_u64().unwrap();
    assert!(probe_ns < 1_000_000_000, "probe took {probe_ns} ns");
    if !host_has_hw_virt() {
        // This host's vmcall never reaches userspace (DEVELOPERS.md).
        assert_eq!(v["vm"]["hypercall_transport"], "pio");
    }
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        console.contains(&format!(
            "pv: transport {}",
            v["vm"]["hypercall_transport"].as_str().unwrap()
        )),
        "{console}"
    );
}

#[test]
fn vmcall_transport_where_it_exits() {
    if !kvm_available("vmcall_transport_where_it_exits") {
        return;
    }
    let (_, v) = stats_json("console=ttyS0 selftest=none", &["--hypercall", "auto"]);
    if v["vm"]["hypercall_transport"] != "vmcall" {
        eprintln!("SKIP vmcall_transport_where_it_exits: the auto probe found that vmcall does not exit to userspace on this host");
        return;
    }
    let (out, v) = stats_json(
        "console=ttyS0 selftest=none exit=5",
        &["--hypercall", "vmcall"],
    );
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(v["vm"]["hypercall_transport"], "vmcall");
}

#[test]
fn timeout_ends_a_runaway_guest() {
    if !kvm_available("timeout_ends_a_runaway_guest") {
        return;
    }
    // A kernel that spins forever: `jmp .`.
    let f = temp("spin.elf");
    std::fs::write(&f, tiny_elf(0x10_0000, &[0xeb, 0xfe])).unwrap();
    let out = run(&[
        "--kernel",
        f.to_str().unwrap(),
        "--timeout",
        "1",
        "--stats",
        "none",
    ]);
    let _ = std::fs::remove_file(&f);
    assert_eq!(
        out.status.code(),
        Some(205),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--timeout"));
}

#[test]
fn stats_interval_writes_delta_lines_then_the_report() {
    if !kvm_available("stats_interval_writes_delta_lines_then_the_report") {
        return;
    }
    // `out 0x80, al; jmp .-2`: a steady stream of POST-port exits.
    let k = temp("post-loop.elf");
    std::fs::write(&k, tiny_elf(0x10_0000, &[0xe6, 0x80, 0xeb, 0xfc])).unwrap();
    let f = temp("interval.jsonl");
    let out = run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--stats",
        "json",
        "--stats-file",
        f.to_str().unwrap(),
        "--stats-interval",
        "0.1",
        "--timeout",
        "0.55",
        "--hypercall",
        "pio",
    ]);
    assert_eq!(out.status.code(), Some(205));
    let text = std::fs::read_to_string(&f).unwrap();
    let _ = std::fs::remove_file(&f);
    let _ = std::fs::remove_file(&k);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert!(lines.len() >= 4, "{} lines", lines.len());
    let (ticks, last) = lines.split_at(lines.len() - 1);
    assert_eq!(last[0]["kind"], "final", "final report is the last line");
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    for l in &lines {
        assert_eq!(l["schema_version"], 2, "one schema for every line: {l}");
        assert_eq!(keys(l), keys(&last[0]), "same fields on every line");
        assert!(
            l["merged"]["exits"].is_array(),
            "exits is a list everywhere"
        );
    }
    let total: u64 = ticks
        .iter()
        .map(|l| l["merged"]["exits_total"].as_u64().unwrap())
        .sum();
    let final_total = last[0]["merged"]["exits_total"].as_u64().unwrap();
    assert!(
        total <= final_total && total > 0,
        "deltas {total} vs final {final_total}"
    );
    for l in ticks {
        assert_eq!(l["kind"], "interval");
        assert!(l["interval_ns"].as_u64().unwrap() >= 50_000_000, "{l}");
        let io = l["merged"]["exits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "io")
            .map_or(0, |e| e["count"].as_u64().unwrap());
        assert!(io > 0, "every interval saw POST writes: {l}");
    }
}
