//! Leaf zaps (docs/pv-abi.md §6.6): on a host that needs the pool resync and whose probe
//! found that zapping a frame's host mapping drops KVM's translations to it, changed
//! leaves are forgotten by a zap of their old target frames instead of a resync of their
//! pool chunks. The UP selftests that reduce or remove mappings must pass with the zaps
//! (and make them), and fail when the zaps are listed but not made
//! (`--debug-leaf-zap-skip`). Elsewhere the test says why it checks less.

use pvmm_e2e::{kvm_available, run_guest_stats, Tap};
use serde_json::Value;

/// Selftests that remove or reduce mappings the host's cache of the pool holds.
const SEL: &str = "selftest=zap,mprotect,mremap,fork_cow,ad_young,ad_dirty pages=64";

/// One pv-lazy run with `extra` flags: (TAP, stats JSON, console).
fn run(name: &str, extra: &[&str]) -> (Tap, Value, String) {
    let cmdline = format!("console=ttyS0 mmu=pv-lazy {SEL}");
    let (out, stats) = run_guest_stats(&format!("leaf-zap-{name}"), &cmdline, extra);
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let tap = Tap::parse(&console).unwrap_or_else(|e| panic!("{name}: {e}: {console}"));
    (tap, stats, console)
}

fn all_pass(tap: &Tap) -> bool {
    !tap.points.is_empty() && tap.points.iter().all(|p| p.ok)
}

fn counter(stats: &Value, key: &str) -> u64 {
    stats["mmu"]["leaf_zap"][key].as_u64().unwrap_or(0)
}

#[test]
fn changed_leaves_are_zapped_and_a_skipped_zap_fails_the_suite() {
    if !kvm_available("changed_leaves_are_zapped_and_a_skipped_zap_fails_the_suite") {
        return;
    }
    let (tap, stats, console) = run("auto", &["--leaf-zap", "auto"]);
    assert!(all_pass(&tap), "with leaf zaps: {console}");
    let pr = &stats["vm"]["pool_resync"];
    let (Some(needed), Some(on)) = (pr["needed"].as_bool(), pr["leaf_zap"].as_bool()) else {
        panic!("no pool_resync verdict in the stats");
    };
    assert_eq!(
        on,
        stats["mmu"]["leaf_zap"]["enabled"].as_bool() == Some(true),
        "the verdict and the handler agree"
    );
    let (tap, off, console) = run("off", &["--leaf-zap", "off"]);
    assert!(all_pass(&tap), "with resyncs only: {console}");
    assert_eq!(counter(&off, "zaps"), 0, "--leaf-zap off zaps nothing");
    if !on {
        eprintln!(
            "SKIP the switched-off half: leaf zaps are off on this host (resync needed: {needed})"
        );
        return;
    }
    assert!(
        counter(&stats, "frames") > 0 && counter(&stats, "calls") > 0,
        "leaf zaps on, but none made: {}",
        stats["mmu"]["leaf_zap"]
    );
    let chunks = |s: &Value| s["merged"]["smp"]["resync_chunks"].as_u64().unwrap_or(0);
    assert!(
        chunks(&stats) < chunks(&off),
        "zaps must stand in for resyncs: {} chunks resynced with them, {} without",
        chunks(&stats),
        chunks(&off)
    );
    let (tap, _, console) = run("skip", &["--leaf-zap", "auto", "--debug-leaf-zap-skip"]);
    let failed = tap.points.iter().filter(|p| !p.ok).count();
    assert!(
        failed > 0 || tap.points.len() < 5,
        "listed but unmade leaf zaps went unnoticed: {console}"
    );
}

/// On 2 vCPUs a leaf zap also flushes the other vCPUs (the host drops every translation to
/// the zapped frames and flushes every TLB that could hold one), so remote flushes that
/// stem only from such leaves are not delivered: the SMP TLB tests pass with most remote
/// flushes done that way, and fail when the zaps are listed but not made.
#[test]
fn remote_flushes_ride_the_leaf_zap_and_a_skipped_zap_fails_the_smp_tests() {
    if !kvm_available("remote_flushes_ride_the_leaf_zap_and_a_skipped_zap_fails_the_smp_tests") {
        return;
    }
    const SMP: &str = "console=ttyS0 mmu=pv-lazy selftest=smp_unmap,smp_mprotect,smp_dirty";
    let (out, stats) = run_guest_stats("leaf-zap-smp", SMP, &["--vcpus", "2"]);
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let tap = Tap::parse(&console).unwrap_or_else(|e| panic!("{e}: {console}"));
    assert!(all_pass(&tap), "with leaf zaps on 2 vCPUs: {console}");
    if stats["vm"]["pool_resync"]["leaf_zap"].as_bool() != Some(true) {
        eprintln!("SKIP the rest: leaf zaps are off on this host");
        return;
    }
    let smp = |k: &str| stats["merged"]["smp"][k].as_u64().unwrap_or(0);
    assert!(
        smp("kernel_flushes") > smp("remote_flushes_sent"),
        "most remote flushes should ride the zaps: {}",
        stats["merged"]["smp"]
    );
    let (out, _) = run_guest_stats(
        "leaf-zap-smp-skip",
        SMP,
        &["--vcpus", "2", "--debug-leaf-zap-skip"],
    );
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let tap = Tap::parse(&console).unwrap_or_default();
    let failed = tap.points.iter().filter(|p| !p.ok).count();
    assert!(
        failed > 0 || tap.points.len() < 3,
        "remote flushes counted done by unmade zaps went unnoticed: {console}"
    );
}
