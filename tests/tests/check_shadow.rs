//! `--check-shadow`: the engine's invariant checker after every MMU batch. The whole suite
//! passes with it in both PV modes, and it catches a deliberately re-opened isolation hole
//! (a batch that types its own request block, answered without the page-table guard).

use hypercall::{op, MmuEntry, RequestHeader, DOORBELL_PORT};
use pvmm_e2e::*;

const LOAD: u64 = 0x10_0000;
const VERSION_BLOCK: u64 = LOAD + 0x1000;
/// Alone in its frame, so that the frame is a valid L1 once pinned.
const PIN_BLOCK: u64 = LOAD + 0x2000;
const PIN_ENTRIES: u64 = LOAD + 0x3000;
const FLUSH_BLOCK: u64 = LOAD + 0x4000;
const FLUSH_ENTRIES: u64 = LOAD + 0x5000;
const EXIT_BLOCK: u64 = LOAD + 0x6000;

/// VERSION; MMU_BATCH [PIN_L1 of the block's own frame]; MMU_BATCH [FLUSH_TLB]; EXIT 0.
fn self_typing_guest() -> Vec<u8> {
    let mut img = vec![0x66, 0xba];
    img.extend_from_slice(&DOORBELL_PORT.to_le_bytes()); // mov dx, doorbell
    for block in [VERSION_BLOCK, PIN_BLOCK, FLUSH_BLOCK, EXIT_BLOCK] {
        img.push(0xb8); // mov eax, block
        img.extend_from_slice(&(block as u32).to_le_bytes());
        img.push(0xef); // out dx, eax
    }
    img.push(0xf4); // hlt
    img.resize(0x7000, 0);
    let mut put = |at: u64, bytes: &[u8]| {
        let o = (at - LOAD) as usize;
        img[o..o + bytes.len()].copy_from_slice(bytes);
    };
    let major = u64::from(hypercall::ABI_MAJOR);
    put(
        VERSION_BLOCK,
        &RequestHeader::new(op::VERSION, [major, 0, 0, 0]).to_bytes(),
    );
    let pin = RequestHeader::new(op::MMU_BATCH, [PIN_ENTRIES, 1, 0, 0]).to_bytes();
    put(PIN_BLOCK, &pin[..hypercall::RESPONSE_OFFSET]);
    put(PIN_ENTRIES, &MmuEntry::pin(1, PIN_BLOCK).to_bytes());
    put(
        FLUSH_BLOCK,
        &RequestHeader::new(op::MMU_BATCH, [FLUSH_ENTRIES, 1, 0, 0]).to_bytes(),
    );
    put(FLUSH_ENTRIES, &MmuEntry::flush_tlb().to_bytes());
    put(EXIT_BLOCK, &RequestHeader::new(op::EXIT, [0; 4]).to_bytes());
    img
}

fn run_self_typing(extra: &[&str]) -> std::process::Output {
    let k = temp(&format!("self-typing-{}.elf", extra.len()));
    std::fs::write(&k, tiny_elf(LOAD, &self_typing_guest())).unwrap();
    let mut args = vec!["--kernel", k.to_str().unwrap(), "--hypercall", "pio"];
    args.extend_from_slice(&["--serial", "none", "--stats", "none", "--timeout", "60"]);
    args.extend_from_slice(extra);
    let out = run(&args);
    let _ = std::fs::remove_file(&k);
    out
}

#[test]
fn check_shadow_catches_a_response_written_into_a_page_table() {
    if !kvm_available("check_shadow_catches_a_response_written_into_a_page_table") {
        return;
    }
    let ok = run_self_typing(&["--check-shadow"]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "guarded: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = run_self_typing(&["--check-shadow", "--debug-unguarded-response"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(207), "{err}");
    assert!(
        err.contains("shadow invariant violated after an MMU batch"),
        "{err}"
    );
}

#[test]
fn the_whole_suite_passes_under_check_shadow() {
    if !kvm_available("the_whole_suite_passes_under_check_shadow") {
        return;
    }
    for mode in ["pv", "pv-lazy"] {
        let out = run_guest(
            &format!("console=ttyS0 selftest=all mmu={mode} pages=64"),
            &["--check-shadow", "--stats", "none", "--timeout", "600"],
        );
        let console = String::from_utf8_lossy(&out.stdout);
        let tap =
            Tap::parse(&console).unwrap_or_else(|e| panic!("{mode}: bad TAP ({e}):\n{console}"));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{mode}: {}\n{console}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            tap.failures() == 0 && tap.plan.unwrap_or(0) > 0,
            "{mode}: {console}"
        );
    }
}
