//! Per-thread seccomp filters (defence in depth: a guest that found a bug in the VMM still
//! cannot open files, start processes or reach the network from it).
//!
//! Each thread kind ([`ThreadKind`]) has an allow-list in [`rules`]; [`Filters::compile`]
//! turns them into BPF programs with seccompiler once, before any thread starts, and each
//! thread calls [`Filters::install`] for itself before it touches guest input. A syscall
//! outside the list traps into [`sigsys`], which kills the VM (`--seccomp kill`, exit code
//! [`crate::error::exit_code::SECCOMP`]) or refuses it and reports the first one
//! (`--seccomp log`). `--seccomp off` installs nothing.

pub mod ioctls;
pub mod names;
pub mod rules;
pub mod sigsys;

use rules::{Allowed, Arg, Context};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// What a filter does with a syscall outside its list (`--seccomp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
#[repr(u8)]
pub enum SeccompMode {
    /// End the VM with one line and exit code 208.
    #[default]
    Kill = 1,
    /// Refuse the syscall (EPERM), report the first one, keep running.
    Log = 2,
    /// No filters.
    Off = 0,
}

/// The kinds of threads that get a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum ThreadKind {
    /// A vCPU thread (`KVM_RUN` and the exit path).
    Vcpu = 0,
    /// The supervisor (main) thread.
    Supervisor = 1,
    /// The stdin → UART thread.
    Stdin = 2,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vcpu, ThreadKind::Supervisor, ThreadKind::Stdin];
}

/// Building or installing a filter failed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the rules.
    #[error("compiling the {kind:?} seccomp filter")]
    Compile {
        /// Which filter.
        kind: ThreadKind,
        /// seccompiler's error.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// The kernel refused the filter.
    #[error("installing the {kind:?} seccomp filter")]
    Install {
        /// Which filter.
        kind: ThreadKind,
        /// seccompiler's error.
        #[source]
        source: seccompiler::Error,
    },
}

/// The compiled filters of one VM (none with `--seccomp off`).
#[derive(Debug)]
pub struct Filters {
    mode: SeccompMode,
    programs: BTreeMap<ThreadKind, BpfProgram>,
}

fn condition(a: Arg) -> Result<SeccompCondition, seccompiler::BackendError> {
    let (index, op, value) = match a {
        Arg::Is(i, v) => (i, SeccompCmpOp::Eq, v),
        Arg::Without(i, mask) => (i, SeccompCmpOp::MaskedEq(mask), 0),
    };
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
}

/// The seccompiler rule map of an allow-list (entries for one syscall are alternatives).
pub fn rule_map(
    list: &[Allowed],
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for a in list {
        let rules = map.entry(a.nr).or_default();
        if !a.args.is_empty() {
            let conds = a
                .args
                .iter()
                .map(|&c| condition(c))
                .collect::<Result<_, _>>()?;
            rules.push(SeccompRule::new(conds)?);
        }
    }
    Ok(map)
}

/// The BPF program of one allow-list: listed calls allowed, the rest trapped.
pub fn program(list: &[Allowed]) -> Result<BpfProgram, seccompiler::Error> {
    let filter = SeccompFilter::new(
        rule_map(list)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

impl Filters {
    /// Compiles every thread kind's filter for `mode` and installs the SIGSYS handler.
    pub fn compile(mode: SeccompMode) -> Result<Filters, SeccompError> {
        let mut programs = BTreeMap::new();
        if mode != SeccompMode::Off {
            let ctx = Context {
                pid: std::process::id(),
                kick_signal: crate::kick::kick_signal(),
            };
            for kind in ThreadKind::ALL {
                let p = program(&rules::allowed(kind, &ctx))
                    .map_err(|source| SeccompError::Compile { kind, source })?;
                programs.insert(kind, p);
            }
            sigsys::install(mode).map_err(SeccompError::Handler)?;
        }
        Ok(Filters { mode, programs })
    }

    /// The mode the filters were compiled for.
    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    /// Puts the calling thread (thread `index` of `kind`) under its filter; a no-op with
    /// `--seccomp off`. Irreversible for the thread.
    pub fn install(&self, kind: ThreadKind, index: usize) -> Result<(), SeccompError> {
        let Some(p) = self.programs.get(&kind) else {
            return Ok(());
        };
        sigsys::set_label(sigsys::ThreadLabel::new(kind, index));
        seccompiler::apply_filter(p).map_err(|source| SeccompError::Install { kind, source })
    }
}

#[cfg(test)]
mod tests;
