//! What a new user hits first (one test per item of the first-use review): a forced
//! transport that cannot work, truncated and wrong kernel files, exit codes that do not
//! collide, machine-readable output on its own stream, a table that adds up, bad input
//! found before the VM starts, usage and help, verbosity levels, the default kernel and
//! the cached transport probe.

use pvmm_e2e::*;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A one-line error with exit code 200.
fn setup_error(o: &Output, expect: &str) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(200), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e}");
    assert!(e.contains(expect), "expected '{expect}' in: {e}");
}

#[test]
fn a_forced_vmcall_that_cannot_work_fails_within_a_second() {
    if !kvm_available("a_forced_vmcall_that_cannot_work_fails_within_a_second") {
        return;
    }
    let t = Instant::now();
    let out = Command::new(pvmm_bin())
        .args(["run", "--kernel", guest().to_str().unwrap()])
        .args([
            "--cmdline",
            "console=ttyS0 selftest=none",
            "--hypercall",
            "vmcall",
        ])
        .args(["--serial", "none", "--stats", "json", "--timeout", "60"])
        .env("PVMM_CACHE_DIR", "off")
        .output()
        .unwrap();
    let took = t.elapsed();
    if out.status.code() == Some(0) {
        // A host with hardware virtualization: vmcall really works.
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["vm"]["hypercall_transport"], "vmcall");
        return;
    }
    setup_error(&out, "--hypercall vmcall cannot work here");
    assert!(stderr(&out).contains("use --hypercall pio or auto"));
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[test]
fn kernel_files_that_are_not_kernels_are_named_as_such() {
    let g = std::fs::read(guest()).unwrap();
    let cut = temp("truncated.elf");
    std::fs::write(&cut, &g[..8192]).unwrap();
    let out = run(&["--kernel", cut.to_str().unwrap()]);
    let _ = std::fs::remove_file(&cut);
    setup_error(&out, "the file is truncated");
    // A static user-space program: one PT_LOAD plus a PT_TLS segment.
    let mut prog = tiny_elf(0x40_0000, &[0xf4]);
    prog[56..58].copy_from_slice(&2u16.to_le_bytes());
    prog[120..124].copy_from_slice(&7u32.to_le_bytes());
    let p = temp("static-program");
    std::fs::write(&p, prog).unwrap();
    let out = run(&["--kernel", p.to_str().unwrap()]);
    let _ = std::fs::remove_file(&p);
    setup_error(&out, "is a user-space program, not a kernel");
    let low = temp("low-entry.elf");
    std::fs::write(&low, tiny_elf(0x1000, &[0xf4])).unwrap();
    let out = run(&["--kernel", low.to_str().unwrap()]);
    let _ = std::fs::remove_file(&low);
    setup_error(&out, "its entry point is below 1 MiB");
    let dir = std::env::temp_dir();
    setup_error(
        &run(&["--kernel", dir.to_str().unwrap()]),
        "it is a directory",
    );
}

#[test]
fn guest_statuses_and_vmm_conditions_never_share_an_exit_code() {
    if !kvm_available("guest_statuses_and_vmm_conditions_never_share_an_exit_code") {
        return;
    }
    let code = |c: &str| {
        run_guest(
            &format!("console=ttyS0 selftest=none exit={c}"),
            &["--serial", "none", "--stats", "none", "--hypercall", "pio"],
        )
    };
    assert_eq!(code("2").status.code(), Some(2), "guest 2 stays 2");
    let high = code("200");
    assert_eq!(high.status.code(), Some(127), "{}", stderr(&high));
    assert!(stderr(&high).contains("guest exit status 200 (reported as 127)"));
    setup_error(&run(&["--vcpus", "0"]), "invalid vCPU count");
    let help = Command::new(pvmm_bin()).arg("--help").output().unwrap();
    let h = stdout(&help);
    for row in ["0-127", "128+N", "200 ", "205 ", "208 "] {
        assert!(h.contains(row), "exit table row {row} in --help: {h}");
    }
}

#[test]
fn json_goes_to_stdout_alone_and_never_mixes_with_the_console() {
    setup_error(
        &run(&["--stats", "json"]),
        "JSON statistics go to stdout, where the guest console also goes",
    );
    setup_error(
        &run(&["--stats-interval", "1"]),
        "JSON statistics go to stdout",
    );
    if !kvm_available("json_goes_to_stdout_alone_and_never_mixes_with_the_console") {
        return;
    }
    let out = run_guest(
        "console=ttyS0 selftest=none",
        &["--serial", "none", "--stats", "json", "--hypercall", "pio"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is exactly one JSON object");
    assert_eq!(v["kind"], "final");
    assert!(stderr(&out).is_empty(), "nothing else: {}", stderr(&out));
}

#[test]
fn the_table_adds_up_and_labels_summed_figures() {
    if !kvm_available("the_table_adds_up_and_labels_summed_figures") {
        return;
    }
    let out = run_guest(
        "console=ttyS0 selftest=all mmu=pv-lazy pages=16",
        &[
            "--serial",
            "none",
            "--stats",
            "table",
            "--vcpus",
            "2",
            "--hypercall",
            "pio",
        ],
    );
    let t = stderr(&out);
    assert!(t.contains("vCPU time, summed over 2 vCPU(s)"), "{t}");
    assert!(t.contains("Per vCPU:"), "{t}");
    let section = t
        .split("Where the VMM time went")
        .nth(1)
        .and_then(|s| s.split("\n\n").next())
        .expect("breakdown section");
    let us = |l: &str| -> f64 {
        l.split_whitespace()
            .rev()
            .nth(1)
            .and_then(|w| w.parse().ok())
            .unwrap_or(0.0)
    };
    let rows: Vec<&str> = section.lines().skip(2).collect();
    let (total, items) = rows.split_last().expect("rows");
    let sum: f64 = items.iter().map(|l| us(l)).sum();
    assert!(
        total.starts_with("total") && total.ends_with("100.00%"),
        "{section}"
    );
    assert!(
        (sum - us(total)).abs() < 0.05 * items.len() as f64,
        "{section}"
    );
    for s in ["hypercalls  MMU_BATCH", "devices     serial", "other"] {
        assert!(section.contains(s), "{s} in {section}");
    }
    if t.contains("io_exits                      0") {
        assert!(
            t.contains("note: io_exits is 0 although pvmm handled"),
            "{t}"
        );
    }
}

#[test]
fn bad_input_is_found_before_the_vm_starts() {
    let t = Instant::now();
    let out = run_guest(
        "console=ttyS0 selftest=all",
        &["--stats-file", "/nonexistent/dir/stats.json"],
    );
    setup_error(
        &out,
        "cannot create stats file '/nonexistent/dir/stats.json'",
    );
    assert!(
        stderr(&out).contains("No such file or directory"),
        "OS reason"
    );
    assert!(stdout(&out).is_empty(), "the guest never ran");
    assert!(t.elapsed() < Duration::from_secs(5));
    setup_error(
        &run(&["--shadow-pool", "4K"]),
        "--shadow-pool must be between 2M and 64G",
    );
    for m in ["0", "1K", "2M"] {
        setup_error(&run(&["--mem", m]), "--mem must be between 16M and 1024G");
    }
    setup_error(
        &run(&["--stats-interval", "0"]),
        "invalid statistics interval '0'",
    );
}

#[test]
fn pvmm_alone_prints_usage_and_help_has_the_sections_a_user_needs() {
    let out = Command::new(pvmm_bin()).output().unwrap();
    assert_eq!(out.status.code(), Some(200));
    let e = stderr(&out);
    assert!(
        e.contains("Usage: pvmm <COMMAND>") && e.contains("run"),
        "{e}"
    );
    assert!(!e.contains("pvmm: pvmm:"), "{e}");
    let h = Command::new(pvmm_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let h = stdout(&h);
    for s in [
        "EXIT STATUS:",
        "CONSOLE:",
        "ENVIRONMENT:",
        "EXAMPLES:",
        "Ctrl-a x",
    ] {
        assert!(h.contains(s), "{s} in run --help");
    }
}

#[test]
fn each_v_adds_detail() {
    if !kvm_available("each_v_adds_detail") {
        return;
    }
    let levels: Vec<usize> = ["-v", "-vv", "-vvv"]
        .iter()
        .map(|v| {
            let out = run_guest(
                "console=ttyS0 selftest=none",
                &[
                    v,
                    "--serial",
                    "none",
                    "--stats",
                    "none",
                    "--hypercall",
                    "pio",
                ],
            );
            stderr(&out).lines().filter(|l| l.starts_with('[')).count()
        })
        .collect();
    assert!(levels[0] < levels[1] && levels[1] < levels[2], "{levels:?}");
}

#[test]
fn the_bundled_guest_is_the_default_and_the_probe_verdict_is_cached() {
    if !kvm_available("the_bundled_guest_is_the_default_and_the_probe_verdict_is_cached") {
        return;
    }
    let cache = temp("probe-cache");
    let go = || {
        Command::new(pvmm_bin())
            .args([
                "run",
                "--cmdline",
                "console=ttyS0 selftest=none",
                "--serial",
                "none",
            ])
            .args(["--stats", "json"])
            .env("PVMM_GUEST", guest())
            .env("PVMM_CACHE_DIR", &cache)
            .output()
            .unwrap()
    };
    let first: serde_json::Value = serde_json::from_slice(&go().stdout).expect("first run");
    let second: serde_json::Value = serde_json::from_slice(&go().stdout).expect("second run");
    let _ = std::fs::remove_dir_all(&cache);
    assert_eq!(first["vm"]["transport_choice"], "auto");
    assert_eq!(first["vm"]["transport_probe_cached"], false);
    assert_eq!(second["vm"]["transport_probe_cached"], true);
    assert_eq!(second["vm"]["transport_probe_ns"], 0);
    assert_eq!(
        first["vm"]["hypercall_transport"],
        second["vm"]["hypercall_transport"]
    );
}
