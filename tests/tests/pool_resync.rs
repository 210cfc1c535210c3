//! The host resync switched off: on a host that caches translations from the shadow pool
//! and does not see the VMM's writes to it (a software-shadowing KVM, where the start-up
//! probe says `pool_resync.needed`), the UP selftests that reduce or remove mappings must
//! fail with `--pool-resync never`, and pass with the resync (`auto`), per chunk of the
//! pool that a changed entry made stale. On a host that needs no resync there is nothing
//! to switch off: the test says so and checks only that both runs pass.

use pvmm_e2e::{kvm_available, run_guest_stats, Tap};

/// Selftests that remove or reduce mappings a TLB (or the host's cache of the pool) holds.
const SEL: &str = "selftest=zap,mprotect,mremap,fork_cow,exit_teardown pages=64";

/// One pv-lazy run with `--pool-resync <resync>`: (TAP, the stats' `pool_resync.needed`,
/// console).
fn run(resync: &str) -> (Tap, Option<bool>, String) {
    let cmdline = format!("console=ttyS0 mmu=pv-lazy {SEL}");
    let name = format!("pool-resync-{resync}");
    let (out, stats) = run_guest_stats(&name, &cmdline, &["--pool-resync", resync]);
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let tap = Tap::parse(&console).unwrap_or_else(|e| panic!("{resync}: {e}: {console}"));
    let needed = stats["vm"]["pool_resync"]["needed"].as_bool();
    (tap, needed, console)
}

#[test]
fn the_suite_needs_the_host_resync_where_the_probe_says_so() {
    if !kvm_available("the_suite_needs_the_host_resync_where_the_probe_says_so") {
        return;
    }
    let (tap, needed, console) = run("auto");
    assert!(
        !tap.points.is_empty() && tap.points.iter().all(|p| p.ok),
        "with the resync: {console}"
    );
    let (tap, _, console) = run("never");
    let failed = tap.points.iter().filter(|p| !p.ok).count();
    match needed {
        Some(true) => assert!(
            failed > 0 || tap.points.len() < 5,
            "--pool-resync never passed on a host that needs the resync: {console}"
        ),
        Some(false) => {
            eprintln!("SKIP the switched-off half: this host sees the VMM's pool writes (no resync needed)");
            assert_eq!(failed, 0, "no resync needed, yet never failed: {console}");
        }
        None => panic!("no pool_resync verdict in the stats"),
    }
}
