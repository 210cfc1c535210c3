//! Bad command-line input: one clear line, exit code 200, no panic or backtrace.

use pvmm_e2e::*;
use std::process::Command;

fn check(out: std::process::Output, expect: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(200), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(expect), "expected '{expect}' in: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn missing_kernel_file() {
    check(
        run(&["--kernel", "/nonexistent/kernel"]),
        "cannot read kernel '/nonexistent/kernel'",
    );
}

#[test]
fn not_a_kernel() {
    let f = temp("notakernel");
    std::fs::write(&f, vec![0x42u8; 4096]).unwrap();
    let out = run(&["--kernel", f.to_str().unwrap()]);
    let _ = std::fs::remove_file(&f);
    if !kvm_available("not_a_kernel") {
        return;
    }
    check(out, "neither a 64-bit ELF nor a bzImage");
}

#[test]
fn mem_too_small_for_the_kernel() {
    if !kvm_available("mem_too_small_for_the_kernel") {
        return;
    }
    let f = temp("elf32m");
    std::fs::write(&f, tiny_elf(0x200_0000, &[0; 16])).unwrap();
    let out = run(&["--kernel", f.to_str().unwrap(), "--mem", "16M"]);
    let _ = std::fs::remove_file(&f);
    check(out, "too small for the kernel");
    check(
        run(&["--kernel", guest().to_str().unwrap(), "--mem", "1M"]),
        "--mem must be between 16M and 1024G",
    );
}

#[test]
fn unparsable_sizes_and_counts() {
    check(
        run(&["--kernel", "k", "--mem", "12Q"]),
        "invalid size '12Q'",
    );
    check(
        run(&["--kernel", "k", "--mem", "lots"]),
        "invalid size 'lots'",
    );
    check(
        run(&["--kernel", "k", "--vcpus", "0"]),
        "invalid vCPU count '0'",
    );
    check(
        run(&["--kernel", "k", "--serial", "tcp"]),
        "invalid serial mode",
    );
    check(run(&["--kernel", "k", "--timeout=-3"]), "invalid timeout");
    check(
        run(&["--kernel", "k", "--stats", "xml"]),
        "invalid value 'xml'",
    );
    let out = Command::new(pvmm_bin())
        .args(["run", "--mem", "1G"])
        .env("PVMM_GUEST", "/nonexistent/default-guest")
        .output()
        .unwrap();
    check(out, "cannot read kernel '/nonexistent/default-guest'");
}

#[test]
fn no_kvm_device() {
    let out = Command::new(pvmm_bin())
        .args(["run", "--kernel", "k"])
        .env("PVMM_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .unwrap();
    check(out, "cannot open /nonexistent/kvm");
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(pvmm_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let h = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--mem",
        "--vcpus",
        "--serial",
        "--stats",
        "--stats-file",
        "--timeout",
        "--hypercall",
        "--verbose",
    ] {
        assert!(h.contains(flag), "{flag} missing from help");
    }
}
