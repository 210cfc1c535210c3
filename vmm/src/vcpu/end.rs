//! Why a vCPU stopped, and how that maps to the process exit code and a one-line message.

use crate::error::exit_code;

/// Why a vCPU stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest called EXIT with this status.
    GuestExit(u8),
    /// The guest reset or powered off through the i8042 or a system event.
    Reset,
    /// Triple fault.
    TripleFault,
    /// KVM_EXIT_FAIL_ENTRY with the hardware reason.
    FailEntry(u64),
    /// KVM_EXIT_INTERNAL_ERROR with its suberror and, where the VMM could read the code at
    /// RIP, a one-line diagnosis of the instruction (see `vcpu::diagnose`).
    InternalError(u32, Option<String>),
    /// An exit the VMM does not handle.
    Unhandled(&'static str),
    /// Another vCPU (or the timeout) ended the VM.
    Stopped,
    /// A KVM ioctl failed.
    VmmFailure(String),
    /// `--check-shadow` found an engine invariant violated after an MMU batch.
    ShadowInvariant(String),
}

impl VcpuEnd {
    /// True when the vCPU ended because of an error (its registers are worth dumping).
    pub fn is_failure(&self) -> bool {
        !matches!(
            self,
            VcpuEnd::GuestExit(_) | VcpuEnd::Reset | VcpuEnd::Stopped
        )
    }

    /// (exit code, reason name, one-line message) of a VM that ended this way.
    pub fn describe(&self) -> (i32, &'static str, Option<String>) {
        match self {
            VcpuEnd::GuestExit(c) => (
                exit_code::for_guest(*c),
                "guest-exit",
                (i32::from(*c) > exit_code::GUEST_MAX).then(|| {
                    format!(
                        "guest exit status {c} (reported as {})",
                        exit_code::GUEST_MAX
                    )
                }),
            ),
            VcpuEnd::Reset => (0, "reset", None),
            VcpuEnd::TripleFault => (
                exit_code::TRIPLE_FAULT,
                "triple-fault",
                Some("guest triple-faulted (KVM_EXIT_SHUTDOWN)".into()),
            ),
            VcpuEnd::FailEntry(r) => (
                exit_code::FAIL_ENTRY,
                "fail-entry",
                Some(format!(
                    "KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, reason {r:#x})"
                )),
            ),
            VcpuEnd::InternalError(s, insn) => (
                exit_code::INTERNAL_ERROR,
                "internal-error",
                Some(match insn {
                    Some(d) => format!(
                        "KVM could not run the guest's instruction (KVM_EXIT_INTERNAL_ERROR, suberror {s}): {d}"
                    ),
                    None => format!("KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {s})"),
                }),
            ),
            VcpuEnd::Unhandled(n) => (
                exit_code::UNHANDLED_EXIT,
                "unhandled-exit",
                Some(format!("unhandled vCPU exit: {n}")),
            ),
            VcpuEnd::Stopped => (exit_code::VMM_FAILURE, "stopped", Some("VM stopped".into())),
            VcpuEnd::VmmFailure(m) => (exit_code::VMM_FAILURE, "vmm-failure", Some(m.clone())),
            VcpuEnd::ShadowInvariant(v) => (
                exit_code::SHADOW_INVARIANT,
                "shadow-invariant",
                Some(format!("shadow invariant violated after an MMU batch: {v}")),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emulation_failure_names_the_instruction_in_one_line() {
        let d = "instruction at rip 0x1000: bytes 0f ae 2e (xrstor)".to_string();
        let (code, reason, msg) = VcpuEnd::InternalError(1, Some(d)).describe();
        assert_eq!(
            (code, reason),
            (exit_code::INTERNAL_ERROR, "internal-error")
        );
        let msg = msg.unwrap();
        assert!(
            msg.ends_with("bytes 0f ae 2e (xrstor)") && !msg.contains('\n'),
            "{msg}"
        );
    }

    #[test]
    fn every_end_has_a_code_and_a_reason() {
        assert_eq!(VcpuEnd::GuestExit(3).describe(), (3, "guest-exit", None));
        let (code, _, msg) = VcpuEnd::GuestExit(255).describe();
        assert_eq!(code, exit_code::GUEST_MAX);
        assert!(msg.unwrap().contains("255"));
        assert_eq!(VcpuEnd::Reset.describe(), (0, "reset", None));
        assert_eq!(VcpuEnd::TripleFault.describe().0, exit_code::TRIPLE_FAULT);
        assert_eq!(VcpuEnd::FailEntry(7).describe().0, exit_code::FAIL_ENTRY);
        assert_eq!(
            VcpuEnd::InternalError(1, None).describe().0,
            exit_code::INTERNAL_ERROR
        );
        assert_eq!(
            VcpuEnd::Unhandled("debug").describe().0,
            exit_code::UNHANDLED_EXIT
        );
        assert!(VcpuEnd::VmmFailure("x".into()).is_failure());
        assert!(!VcpuEnd::Stopped.is_failure());
    }
}
