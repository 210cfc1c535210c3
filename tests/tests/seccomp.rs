//! Seccomp filters and privilege dropping, end to end: a forbidden syscall kills the VM with
//! the documented code and line (`--seccomp kill`, the default) or is refused and reported
//! while the run goes on (`--seccomp log`); the selftest suite and `bench-exits` pass with
//! the filters on; `--uid/--gid` really switch user before anything is opened.

use pvmm_e2e::*;
use serde_json::Value;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Output;

/// The code of a seccomp kill (README, `--help`).
const SECCOMP_KILLED: i32 = 208;
const QUICK: &str = "console=ttyS0 selftest=none exit=0";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn kill_mode_ends_the_vm_with_the_documented_code_and_one_line() {
    if !kvm_available("kill_mode_ends_the_vm_with_the_documented_code_and_one_line") {
        return;
    }
    let out = run_guest(
        QUICK,
        &[
            "--debug-seccomp-violation",
            "--serial",
            "none",
            "--timeout",
            "60",
        ],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(SECCOMP_KILLED), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(
            "pvmm: seccomp: thread vcpu0 made syscall socket (41) outside its allow-list; \
             VM killed (--seccomp kill, exit code 208)"
        ),
        "{err}"
    );
    // The same with the mode spelled out (the first run used the default).
    let out = run_guest(
        QUICK,
        &[
            "--debug-seccomp-violation",
            "--seccomp",
            "kill",
            "--serial",
            "none",
        ],
    );
    assert_eq!(out.status.code(), Some(SECCOMP_KILLED), "{}", stderr(&out));
}

#[test]
fn log_mode_reports_the_first_violation_and_the_run_completes() {
    if !kvm_available("log_mode_reports_the_first_violation_and_the_run_completes") {
        return;
    }
    let f = temp("seccomp-log.json");
    let out = run_guest(
        QUICK,
        &[
            "--debug-seccomp-violation",
            "--seccomp",
            "log",
            "--stats",
            "json",
            "--stats-file",
            f.to_str().unwrap(),
            "--timeout",
            "60",
        ],
    );
    let err = stderr(&out);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap_or_default())
        .unwrap_or_else(|e| panic!("no final report ({e}); stderr: {err}"));
    let _ = std::fs::remove_file(&f);
    assert_eq!(out.status.code(), Some(0), "stderr: {err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("pvmm-guest"));
    assert_eq!(report["vm"]["end_reason"], "guest-exit", "{report}");
    assert!(
        err.contains(
            "thread vcpu0 made syscall socket (41) outside its allow-list; \
             refused with EPERM, run continues (--seccomp log)"
        ),
        "{err}"
    );
    assert!(
        err.contains("1 syscall(s) outside the allow-lists were refused (--seccomp log); the first: socket in vcpu0"),
        "{err}"
    );
    // Off: no filter, nothing to report.
    let out = run_guest(
        QUICK,
        &[
            "--debug-seccomp-violation",
            "--seccomp",
            "off",
            "--serial",
            "none",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("seccomp"), "{}", stderr(&out));
}

/// The selftest suite with filters on (the default) in every MMU mode, on two vCPUs, with
/// the flags that add syscalls: interval statistics, a stats file, a serial file, -v.
#[test]
fn selftests_pass_under_the_filters_in_every_mmu_mode_with_smp_and_interval_stats() {
    if !kvm_available("selftests_pass_under_the_filters_in_every_mmu_mode") {
        return;
    }
    for mode in ["native", "pv", "pv-lazy"] {
        let (stats, serial) = (
            temp(&format!("sc-{mode}.jsonl")),
            temp(&format!("sc-{mode}.txt")),
        );
        let serial_arg = format!("file={}", serial.display());
        let out = run_guest(
            &format!("console=ttyS0 selftest=all mmu={mode} pages=32"),
            &[
                "--vcpus",
                "2",
                "--stats-interval",
                "0.2",
                "--stats-file",
                stats.to_str().unwrap(),
                "--serial",
                &serial_arg,
                "-v",
                "--timeout",
                "300",
            ],
        );
        let console = std::fs::read_to_string(&serial).unwrap_or_default();
        let lines = std::fs::read_to_string(&stats).unwrap_or_default();
        let _ = (std::fs::remove_file(&serial), std::fs::remove_file(&stats));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{mode}: {err}\n{console}");
        assert!(!err.contains("seccomp"), "{mode}: {err}");
        let tap = Tap::parse(&console).unwrap_or_else(|e| panic!("{mode}: {e}\n{console}"));
        assert!(tap.plan.is_some_and(|p| p > 0), "{mode}: {console}");
        assert_eq!(tap.failures(), 0, "{mode}: {console}");
        let last: Value = serde_json::from_str(lines.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{mode}: final line ({e}): {lines}"));
        assert_eq!(last["kind"], "final", "{mode}");
    }
}

#[test]
fn bench_exits_passes_under_the_filters_and_compares_with_none() {
    if !kvm_available("bench_exits_passes_under_the_filters") {
        return;
    }
    let bench = |args: &[&str]| {
        let out = std::process::Command::new(pvmm_bin())
            .arg("bench-exits")
            .args(["--iterations", "200", "--repeat", "2", "--json"])
            .args(args)
            .output()
            .expect("spawning pvmm");
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        serde_json::from_slice::<Value>(&out.stdout).expect("one JSON object")
    };
    let v = bench(&[]);
    assert_eq!(v["seccomp"], "kill", "{v}");
    assert!(v["ratio"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    let v = bench(&["--compare-seccomp"]);
    assert_eq!(v["off"]["seccomp"], "off", "{v}");
    assert_eq!(v["kill"]["seccomp"], "kill", "{v}");
    assert!(
        v["ratio_kill_over_off"].as_f64().is_some_and(|r| r > 0.0),
        "{v}"
    );
}

/// A private copy of the KVM device node owned by `uid`/`gid` with `mode` (how a jailer
/// gives an unprivileged VMM its device), and a directory that user can write.
fn jail(name: &str, owner: (u32, u32), mode: u32) -> (std::path::PathBuf, String) {
    let dir = temp(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let node = dir.join("kvm");
    let rdev = std::fs::metadata("/dev/kvm").unwrap().rdev();
    let c = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
    // SAFETY: creating a character device node by a valid C string (we are root).
    let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, rdev) };
    assert_eq!(made, 0, "mknod: {}", std::io::Error::last_os_error());
    std::os::unix::fs::chown(&node, Some(owner.0), Some(owner.1)).unwrap();
    // The guest kernel, readable by anyone (the checkout may not be).
    std::fs::copy(guest(), dir.join("guest")).unwrap();
    std::fs::set_permissions(dir.join("guest"), std::fs::Permissions::from_mode(0o644)).unwrap();
    (dir, node.to_str().unwrap().to_string())
}

fn run_as_nobody(dir: &std::path::Path, node: &str, extra: &[&str]) -> Output {
    std::process::Command::new(pvmm_bin())
        .arg("run")
        .args(["--kernel", dir.join("guest").to_str().unwrap()])
        .args(["--cmdline", QUICK, "--serial", "none", "--hypercall", "pio"])
        .args(["--uid", "65534", "--gid", "65534"])
        .args(extra)
        .env("PVMM_KVM_DEVICE", node)
        .env("PVMM_CACHE_DIR", "off")
        .output()
        .expect("spawning pvmm")
}

fn root_and_kvm(test: &str) -> bool {
    if !kvm_available(test) {
        return false;
    }
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {test}: --uid/--gid need root");
        return false;
    }
    true
}

#[test]
fn uid_and_gid_switch_user_before_anything_is_opened() {
    if !root_and_kvm("uid_and_gid_switch_user_before_anything_is_opened") {
        return;
    }
    let (dir, node) = jail("uid-ok", (65534, 65534), 0o600);
    let stats = dir.join("stats.json");
    let out = run_as_nobody(
        &dir,
        &node,
        &["--stats", "json", "--stats-file", stats.to_str().unwrap()],
    );
    let owner = std::fs::metadata(&stats).map(|m| (m.uid(), m.gid()));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The stats file was created by the new user: nothing was opened as root.
    assert_eq!(owner.ok(), Some((65534, 65534)));
}

#[test]
fn uid_without_access_to_kvm_is_a_clear_one_line_error() {
    if !root_and_kvm("uid_without_access_to_kvm_is_a_clear_one_line_error") {
        return;
    }
    let (dir, node) = jail("uid-denied", (0, 0), 0o600);
    let out = run_as_nobody(&dir, &node, &[]);
    let _ = std::fs::remove_dir_all(&dir);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(200), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "cannot open {node} as uid 65534 gid 65534 (that user needs read-write access to it): Permission denied"
        )),
        "{err}"
    );
}

#[test]
fn uid_needs_gid() {
    let out = run(&["--uid", "65534"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(200), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("--gid"), "{err}");
}

#[test]
fn uid_from_a_non_root_process_is_a_clear_one_line_error() {
    if !root_and_kvm("uid_from_a_non_root_process_is_a_clear_one_line_error") {
        return;
    }
    use std::os::unix::process::CommandExt;
    let (dir, node) = jail("uid-unprivileged", (65534, 65534), 0o600);
    // The binary, where the unprivileged user can run it (the checkout may be private).
    let bin = dir.join("pvmm");
    std::fs::copy(pvmm_bin(), &bin).unwrap();
    let out = std::process::Command::new(&bin)
        .arg("run")
        .args(["--kernel", dir.join("guest").to_str().unwrap()])
        .args(["--uid", "1234", "--gid", "1234"])
        .env("PVMM_KVM_DEVICE", &node)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("spawning pvmm as nobody");
    let _ = std::fs::remove_dir_all(&dir);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(200), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains(
            "cannot drop privileges to uid 1234 gid 1234 (--uid/--gid need pvmm to start as root): setgroups: Operation not permitted"
        ),
        "{err}"
    );
}
