//! The page-table write trap (guest `mmu=emulate` and `mmu=wrpt`): the refusal where it is
//! not offered, and every mechanism's debug switch, each expected to fail when off.

use pvmm_e2e::*;

fn hostile(mode: &str, extra: &[&str]) -> std::process::Output {
    let cmdline = format!("console=ttyS0 selftest=hostile mmu={mode} pages=64");
    let mut args = vec!["--check-shadow", "--stats", "none", "--timeout", "300"];
    args.extend_from_slice(extra);
    run_guest(&cmdline, &args)
}

fn texts(o: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_modes_are_refused_clearly_without_the_trap() {
    if !kvm_available("the_modes_are_refused_clearly_without_the_trap") {
        return;
    }
    for mode in ["emulate", "wrpt"] {
        let o = hostile(mode, &["--pt-trap", "off"]);
        let t = texts(&o);
        assert_eq!(o.status.code(), Some(69), "{t}");
        assert!(
            t.contains(&format!(
                "Bail out! mmu={mode} needs the VMM to trap page-table stores"
            )),
            "{t}"
        );
    }
}

#[test]
fn hostile_stores_are_refused_in_both_modes_and_the_checker_agrees() {
    if !kvm_available("hostile_stores_are_refused_in_both_modes_and_the_checker_agrees") {
        return;
    }
    for mode in ["emulate", "wrpt"] {
        let o = hostile(mode, &[]);
        let t = texts(&o);
        assert_eq!(o.status.code(), Some(0), "{mode}: {t}");
        assert_eq!(t.matches("# hostile: plain store").count(), 3, "{t}");
        assert!(
            t.contains("through a writable mapping of a page table"),
            "{t}"
        );
        assert!(!t.contains("MISMATCH"), "{t}");
    }
}

#[test]
fn unvalidated_trapped_stores_are_caught() {
    if !kvm_available("unvalidated_trapped_stores_are_caught") {
        return;
    }
    for mode in ["emulate", "wrpt"] {
        let o = hostile(mode, &["--debug-pt-trap-no-validate"]);
        let t = texts(&o);
        assert_ne!(o.status.code(), Some(0), "{mode}: {t}");
        assert!(
            t.contains("shadow invariant") || t.contains("MISMATCH"),
            "{mode}: {t}"
        );
    }
}

#[test]
fn an_unhooked_l1_left_reachable_is_caught() {
    if !kvm_available("an_unhooked_l1_left_reachable_is_caught") {
        return;
    }
    let o = hostile("wrpt", &["--debug-pt-trap-keep-parents"]);
    let t = texts(&o);
    assert_eq!(o.status.code(), Some(207), "{t}");
    assert!(t.contains("unhooked"), "{t}");
}

#[test]
fn a_dirty_bit_without_the_unhook_harvest_is_lost() {
    if !kvm_available("a_dirty_bit_without_the_unhook_harvest_is_lost") {
        return;
    }
    let ok = texts(&hostile("wrpt", &[]));
    assert!(
        ok.contains("dirty bit in the unhooked L1's entry: set ok"),
        "{ok}"
    );
    let o = hostile("wrpt", &["--debug-pt-trap-no-harvest"]);
    let t = texts(&o);
    assert_ne!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("dirty bit in the unhooked L1's entry: LOST MISMATCH"),
        "{t}"
    );
}
