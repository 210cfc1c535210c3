//! Errors of the monitor and the process exit codes they map to.

use std::path::PathBuf;

/// Exit codes of `pvmm run` (also documented in the README).
pub mod exit_code {
    /// Bad command-line input or a VM that could not be set up.
    pub const SETUP: i32 = 2;
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    pub const TRIPLE_FAULT: i32 = 100;
    /// KVM could not enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    pub const FAIL_ENTRY: i32 = 101;
    /// KVM reported an internal error (`KVM_EXIT_INTERNAL_ERROR`, e.g. emulation failure).
    pub const INTERNAL_ERROR: i32 = 102;
    /// An exit the VMM does not handle.
    pub const UNHANDLED_EXIT: i32 = 103;
    /// `--timeout` expired.
    pub const TIMEOUT: i32 = 104;
    /// A KVM ioctl failed while the VM was running.
    pub const VMM_FAILURE: i32 = 105;
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
