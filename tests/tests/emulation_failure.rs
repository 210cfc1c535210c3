//! An instruction the host's KVM cannot emulate ends the VM with a one-line reason that
//! names the instruction bytes at RIP (read through the guest's page tables).

use pvmm_e2e::*;
use vmm::error::exit_code;

/// Boots a guest whose first instruction is `code` (at 2 MiB, in long mode with the boot
/// page tables); returns (exit status, stderr).
fn boot_code(name: &str, code: &[u8]) -> (i32, String) {
    let elf = temp(name);
    std::fs::write(&elf, tiny_elf(0x20_0000, code)).expect("writing the test kernel");
    let out = run(&[
        "--kernel",
        elf.to_str().unwrap_or_default(),
        "--timeout",
        "30",
        "--stats",
        "none",
    ]);
    let _ = std::fs::remove_file(&elf);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_instruction_kvm_cannot_emulate_is_named() {
    if !kvm_available("an_instruction_kvm_cannot_emulate_is_named") {
        return;
    }
    // xrstor (%rsi), then hlt in a loop: a CPL0 xrstor is beyond a software KVM's emulator;
    // with hardware virtualization it runs (and faults without an IDT).
    let (code, stderr) = boot_code("xrstor.elf", &[0x48, 0x0f, 0xae, 0x2e, 0xf4, 0xeb, 0xfd]);
    if code != exit_code::INTERNAL_ERROR {
        eprintln!("SKIP: this host's KVM ran xrstor (status {code}): nothing to diagnose");
        return;
    }
    let line = stderr
        .lines()
        .find(|l| l.starts_with("pvmm: "))
        .unwrap_or_else(|| panic!("no one-line reason in:\n{stderr}"));
    assert!(
        line.contains("instruction at rip 0x200000: bytes 48 0f ae 2e f4 eb fd")
            && line.ends_with("(xrstor)"),
        "{line}"
    );
}
