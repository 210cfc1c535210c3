//! The bundled guest's command line: bad options stop it with a TAP `Bail out!` and a
//! non-zero status, `help` prints the reference (the same text as docs/guest.md), the
//! whole 4095-byte command line is read, and `zero=cpu copy=cpu` passes the suite in the PV
//! modes.

use pvmm_e2e::*;
use std::process::Output;

/// Every option the guest documents (docs/guest.md and `help`).
const OPTIONS: [&str; 13] = [
    "help",
    "console=",
    "mmu=",
    "selftest=",
    "pages=",
    "seed=",
    "lazy_batch=",
    "zero=",
    "copy=",
    "exit=",
    "debug_faults",
    "break=",
    "drop_at=",
];

const HELP_FIRST: &str = "pvmm-guest options";
const HELP_LAST: &str = "end of pvmm-guest options";

fn console(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).replace('\r', "")
}

fn boot(cmdline: &str) -> Output {
    run_guest(cmdline, &["--stats", "none", "--timeout", "300"])
}

/// The guest refuses `cmdline`: a `Bail out!` line naming `what`, nothing run, non-zero.
fn assert_bails(cmdline: &str, what: &str) {
    let out = boot(cmdline);
    let text = console(&out);
    let bail = text
        .lines()
        .find(|l| l.starts_with("Bail out!"))
        .unwrap_or_else(|| panic!("{cmdline}: no Bail out! line:\n{text}"));
    assert!(
        bail.contains(what),
        "{cmdline}: '{bail}' does not name {what}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("ok ") || l.starts_with("1..")),
        "{cmdline}: tests ran after a bad option:\n{text}"
    );
    let code = out.status.code();
    assert!(
        code.is_some() && code != Some(0),
        "{cmdline}: exit status {code:?}, expected a non-zero status"
    );
}

#[test]
fn bad_options_and_values_bail_out_with_a_non_zero_status() {
    if !kvm_available("bad_options_and_values_bail_out_with_a_non_zero_status") {
        return;
    }
    // `selftest=none` keeps the old behaviour (ignoring the bad word) fast to refute.
    assert_bails("console=ttyS0 mmu=bogus selftest=none", "'bogus'");
    assert_bails("console=ttyS0 selftest=bogus", "'bogus'");
    assert_bails("console=ttyS0 selftest=zap,bogus", "'bogus'");
    assert_bails("console=ttyS0 selftest=none pages=abc", "'abc'");
    assert_bails("console=ttyS0 selftest=none pages=0", "pages=");
    assert_bails("console=ttyS0 selftest=none lazy_batch=0", "lazy_batch=");
    assert_bails("console=ttyS0 selftest=none zero=gpu", "'gpu'");
    assert_bails("console=ttyS0 selftest=none exit=256", "exit=");
    assert_bails("console=ttyS0 selftest=none frobnicate=1", "'frobnicate=1'");
}

#[test]
fn help_prints_the_reference_of_every_option_and_exits_0() {
    if !kvm_available("help_prints_the_reference_of_every_option_and_exits_0") {
        return;
    }
    let out = boot("help selftest=none");
    let text = console(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let start = text
        .find(HELP_FIRST)
        .unwrap_or_else(|| panic!("no reference in:\n{text}"));
    let end = text[start..]
        .find(HELP_LAST)
        .map(|e| start + e + HELP_LAST.len())
        .unwrap_or_else(|| panic!("reference not closed:\n{text}"));
    let reference = &text[start..end];
    for o in OPTIONS {
        assert!(
            reference.lines().any(|l| l.starts_with(o)),
            "option {o} missing from the reference:\n{reference}"
        );
    }
    for status in ["64", "69", "127"] {
        assert!(
            reference
                .lines()
                .any(|l| l.trim_start().starts_with(status)),
            "exit status {status} missing:\n{reference}"
        );
    }
    assert!(
        !text.contains("TAP version 13"),
        "help ran the selftests:\n{text}"
    );
    // `help` alone, and `help` beside a bad option: the same reference, status 0.
    for cmdline in ["help", "console=ttyS0 mmu=bogus help"] {
        let out = boot(cmdline);
        let t = console(&out);
        assert_eq!(out.status.code(), Some(0), "{cmdline}: {t}");
        assert!(t.contains(reference), "{cmdline}: another reference:\n{t}");
    }
    // docs/guest.md carries the same reference, so the two cannot drift.
    let doc = std::fs::read_to_string(root().join("docs/guest.md")).expect("docs/guest.md");
    assert!(
        doc.contains(reference),
        "docs/guest.md does not contain the guest's `help` output verbatim:\n{reference}"
    );
}

/// `console=ttyS0 selftest=none seed=1 seed=1 ... exit=7`, exactly `len` bytes long.
fn long_cmdline(len: usize) -> String {
    let head = "console=ttyS0 selftest=none";
    let tail = " exit=7";
    let mut s = String::from(head);
    while s.len() + " seed=1".len() + tail.len() <= len {
        s.push_str(" seed=1");
    }
    while s.len() + tail.len() < len {
        s.push(' ');
    }
    s.push_str(tail);
    assert_eq!(s.len(), len);
    s
}

#[test]
fn the_whole_command_line_is_read_and_its_last_option_wins() {
    if !kvm_available("the_whole_command_line_is_read_and_its_last_option_wins") {
        return;
    }
    // 1500 bytes: past the old 1 KiB cut; 4095: the longest the VMM accepts.
    for len in [1500, 4095] {
        let cmdline = long_cmdline(len);
        let out = boot(&cmdline);
        let text = console(&out);
        assert!(
            text.contains(&format!("cmdline: {cmdline}\n")),
            "{len} bytes: the banner does not echo the whole command line:\n{text}"
        );
        assert_eq!(
            out.status.code(),
            Some(7),
            "{len} bytes: the final exit=7 was not applied:\n{text}"
        );
    }
    // A later word overrides an earlier one.
    let out = boot("console=ttyS0 selftest=none exit=3 exit=5");
    assert_eq!(out.status.code(), Some(5), "{}", console(&out));
}

fn zero_cpu_suite(mode: &str) {
    let cmdline = format!("console=ttyS0 selftest=all mmu={mode} zero=cpu copy=cpu pages=64");
    let out = boot(&cmdline);
    let text = console(&out);
    let tap = Tap::parse(&text).unwrap_or_else(|e| panic!("{mode}: bad TAP ({e}):\n{text}"));
    // The whole suite: 11 UP tests, 8 SMP tests (on one vCPU here), hostile.
    assert_eq!(tap.plan, Some(20), "{text}");
    assert_eq!(tap.points.len(), 20, "{text}");
    for p in &tap.points {
        assert!(
            p.ok && p.skip.is_none(),
            "{mode} zero=cpu copy=cpu: {} {:?}",
            p.name,
            p.diag
        );
    }
    assert!(
        text.contains("zero=cpu copy=cpu ram_end"),
        "{mode}: not in zero=cpu copy=cpu:\n{text}"
    );
    let hostile = tap.get("hostile").expect("hostile test");
    assert!(
        hostile.diag.iter().all(|l| !l.contains("MISMATCH")),
        "{:?}",
        hostile.diag
    );
    assert!(
        !text.contains("did not match"),
        "{mode}: a mismatch is reported although every refusal matched:\n{text}"
    );
    assert_eq!(out.status.code(), Some(0), "{mode}: {text}");
}

#[test]
fn cpu_frame_ops_pass_the_whole_suite_in_pv_and_pv_lazy() {
    if !kvm_available("cpu_frame_ops_pass_the_whole_suite_in_pv_and_pv_lazy") {
        return;
    }
    zero_cpu_suite("pv");
    zero_cpu_suite("pv-lazy");
}
