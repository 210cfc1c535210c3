//! Errors of the monitor and the process exit codes they map to.

use std::path::PathBuf;

/// Exit codes of `pvmm` (the table is in `--help` and README). Three ranges that never
/// collide: the guest's own EXIT status (0–127), a signal that ended the VM (128 + signal
/// number), and the VMM's own conditions (200 and up).
pub mod exit_code {
    /// Highest guest status passed through as is; higher statuses are reported as this.
    pub const GUEST_MAX: i32 = 127;
    /// A VM ended by signal N exits with `SIGNAL_BASE + N` (130 for SIGINT, 143 for SIGTERM).
    pub const SIGNAL_BASE: i32 = 128;
    /// Bad command-line input or a VM that could not be set up.
    pub const SETUP: i32 = 200;
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    pub const TRIPLE_FAULT: i32 = 201;
    /// KVM could not enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    pub const FAIL_ENTRY: i32 = 202;
    /// KVM reported an internal error (`KVM_EXIT_INTERNAL_ERROR`, e.g. emulation failure).
    pub const INTERNAL_ERROR: i32 = 203;
    /// An exit the VMM does not handle.
    pub const UNHANDLED_EXIT: i32 = 204;
    /// `--timeout` expired.
    pub const TIMEOUT: i32 = 205;
    /// A KVM ioctl failed while the VM was running.
    pub const VMM_FAILURE: i32 = 206;
    /// `--check-shadow` found a violated shadow-engine invariant.
    pub const SHADOW_INVARIANT: i32 = 207;
    /// A VMM thread made a system call outside its seccomp filter (`--seccomp kill`).
    pub const SECCOMP: i32 = 208;

    /// The process exit code for a guest EXIT status.
    pub fn for_guest(status: u8) -> i32 {
        i32::from(status).min(GUEST_MAX)
    }

    /// The table shown in `--help` and the README.
    pub const TABLE: &str = "\
EXIT STATUS:
  0-127    the guest's EXIT status (a status above 127 is reported as 127; the real
           value is in the message and in the JSON report as vm.guest_status)
  0        also: the guest reset or powered off (i8042, ACPI/PSCI system event)
  128+N    ended by signal N: 129 SIGHUP, 130 SIGINT, 143 SIGTERM, or the console escape
           (Ctrl-a x, reported as 130)
  200      bad command-line input, or the VM could not be set up
  201      the guest triple-faulted
  202      KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY)
  203      KVM internal error (e.g. an instruction the host cannot emulate)
  204      a vCPU exit the VMM does not handle
  205      --timeout expired
  206      a KVM call failed while the VM ran
  207      --check-shadow found a shadow-engine invariant violated
  208      a VMM thread broke its seccomp filter (--seccomp kill)";
}

#[cfg(test)]
mod tests {
    use super::exit_code::*;

    #[test]
    fn exit_code_ranges_do_not_collide() {
        assert_eq!(for_guest(0), 0);
        assert_eq!(for_guest(127), 127);
        assert_eq!(for_guest(255), GUEST_MAX);
        let vmm = [
            SETUP,
            TRIPLE_FAULT,
            FAIL_ENTRY,
            INTERNAL_ERROR,
            UNHANDLED_EXIT,
            TIMEOUT,
            VMM_FAILURE,
            SHADOW_INVARIANT,
            SECCOMP,
        ];
        for c in vmm {
            assert!(c > SIGNAL_BASE + 64 && c <= 255, "{c}");
            assert!(TABLE.contains(&format!("  {c} ")), "{c} documented");
        }
    }
}

/// Setting up the VM failed; every variant is one clear line for the user.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `/dev/kvm` is missing or not accessible.
    #[error("cannot open {1}: {0} (is KVM available and do you have permission?)")]
    NoKvm(std::io::Error, String),
    /// The kernel file could not be opened.
    #[error("cannot read kernel '{path}': {source}")]
    KernelFile {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The initrd file could not be read.
    #[error("cannot read initrd '{path}': {source}")]
    InitrdFile {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel is neither ELF nor bzImage.
    #[error("kernel '{0}' is neither a 64-bit ELF nor a bzImage")]
    NotAKernel(PathBuf),
    /// The kernel format is recognised but unusable.
    #[error("kernel '{path}' cannot be loaded: {why}")]
    BadKernel {
        /// The path given.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Guest RAM is too small.
    #[error("--mem {mem} bytes is too small: at least {need} bytes are needed")]
    MemTooSmall {
        /// RAM size given.
        mem: u64,
        /// RAM needed.
        need: u64,
    },
    /// The kernel image does not fit in guest RAM.
    #[error(
        "--mem {mem} bytes is too small for the kernel '{path}' (it does not fit in guest RAM)"
    )]
    KernelTooBig {
        /// RAM size given.
        mem: u64,
        /// The kernel.
        path: PathBuf,
    },
    /// A size is not a multiple of 4 KiB.
    #[error("{what} must be a multiple of 4 KiB")]
    Unaligned {
        /// Which flag.
        what: &'static str,
    },
    /// The initrd does not fit below the kernel-visible RAM limit.
    #[error("initrd of {size} bytes does not fit in guest RAM")]
    InitrdTooBig {
        /// Its size.
        size: u64,
    },
    /// The command line is too long or has a NUL byte.
    #[error("invalid --cmdline: {0}")]
    Cmdline(String),
    /// The serial output or stats file could not be opened.
    #[error("cannot open '{path}': {source}")]
    OutputFile {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `--hypercall vmcall` on a host where `vmcall` never reaches userspace.
    #[error(
        "--hypercall vmcall cannot work here: vmcall does not exit to userspace on this host \
         (no hardware virtualization; the probe's vmcall got no KVM_EXIT_HYPERCALL within 200 ms); \
         use --hypercall pio or auto"
    )]
    VmcallUnavailable,
    /// A KVM ioctl failed during setup.
    #[error("VM setup failed: {what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Another set-up step (memory, threads, signals, boot structures) failed.
    #[error("VM setup failed: {what}: {source}")]
    Other {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: BoxError,
    },
}

/// A boxed error that keeps its source chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Opens `path` for appending (creating it), as an output file of the run.
pub fn open_output(path: &std::path::Path) -> Result<std::fs::File, SetupError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| SetupError::OutputFile {
            path: path.to_path_buf(),
            source,
        })
}

impl SetupError {
    /// A failed KVM ioctl.
    pub fn kvm(what: &'static str, source: kvm_ioctls::Error) -> SetupError {
        SetupError::Kvm { what, source }
    }

    /// Any other failed step; `source` may be an error or a message.
    pub fn other(what: &'static str, source: impl Into<BoxError>) -> SetupError {
        SetupError::Other {
            what,
            source: source.into(),
        }
    }
}
