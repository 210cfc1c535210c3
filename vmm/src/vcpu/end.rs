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
    /// KVM_EXIT_INTERNAL_ERROR with its suberror.
    InternalError(u32),
    /// An exit the VMM does not handle.
    Unhandled(&'static str),
    /// Another vCPU (or the timeout) ended the VM.
    Stopped,
    /// A KVM ioctl failed.
    VmmFailure(String),
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
            VcpuEnd::GuestExit(c) => (i32::from(*c), "guest-exit", None),
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
            VcpuEnd::InternalError(s) => (
                exit_code::INTERNAL_ERROR,
                "internal-error",
                Some(format!(
                    "KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {s})"
                )),
            ),
            VcpuEnd::Unhandled(n) => (
                exit_code::UNHANDLED_EXIT,
                "unhandled-exit",
                Some(format!("unhandled vCPU exit: {n}")),
            ),
            VcpuEnd::Stopped => (exit_code::VMM_FAILURE, "stopped", Some("VM stopped".into())),
            VcpuEnd::VmmFailure(m) => (exit_code::VMM_FAILURE, "vmm-failure", Some(m.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_has_a_code_and_a_reason() {
        assert_eq!(VcpuEnd::GuestExit(3).describe().0, 3);
        assert_eq!(VcpuEnd::Reset.describe(), (0, "reset", None));
        assert_eq!(VcpuEnd::TripleFault.describe().0, exit_code::TRIPLE_FAULT);
        assert_eq!(VcpuEnd::FailEntry(7).describe().0, exit_code::FAIL_ENTRY);
        assert_eq!(
            VcpuEnd::InternalError(1).describe().0,
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
