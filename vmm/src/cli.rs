//! Command-line interface: `pvmm run ...`, parsed with clap, plus the value parsers it uses.

use crate::error::exit_code;
use crate::layout::{MAX_MEM, MAX_POOL, MIN_MEM, MIN_POOL};
pub use crate::seccomp::SeccompMode;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Where `make` puts the bundled PV guest, relative to the workspace root.
pub const BUNDLED_GUEST: &str = "guest-images/target/x86_64-unknown-linux-gnu/release/pvmm-guest";

/// pvmm: a rust-vmm style VMM with a shadow-paging paravirtual MMU and exit statistics.
#[derive(Parser, Debug)]
#[command(
    name = "pvmm",
    version,
    about,
    long_about = None,
    arg_required_else_help = true,
    after_help = epilogue()
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// pvmm subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest kernel and run it until it exits.
    #[command(after_help = epilogue())]
    Run(RunArgs),
    /// Measure the raw exit floor (bare port writes) against NULL hypercalls, in one run.
    BenchExits {
        /// Iterations of each loop.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
        iterations: u32,
        /// Repetitions (median and spread are reported).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
        repeat: u32,
        /// Print one JSON object (floor_ns, null_ns, ratio medians) instead of text.
        #[arg(long)]
        json: bool,
        /// Seccomp filters on the benchmark's vCPU threads: kill, log or off.
        #[arg(long, value_enum, default_value = "kill")]
        seccomp: SeccompMode,
        /// Measure without and with seccomp filters, interleaved in one run, and report both.
        #[arg(long, conflicts_with = "seccomp")]
        compare_seccomp: bool,
    },
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    /// The VMM's stdout (and stdin when it is a terminal or FIFO).
    Stdio,
    /// Append to a file.
    File(PathBuf),
    /// Discard output.
    None,
}

/// How the exit statistics are reported when the VM ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StatsMode {
    /// An aligned, human-readable table.
    Table,
    /// One JSON object (schema in docs/stats-json.md).
    Json,
    /// No report.
    None,
}

/// Hypercall transport selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HypercallMode {
    /// Probe once: vmcall if a real KVM_EXIT_HYPERCALL arrives, otherwise pio.
    Auto,
    /// `vmcall`/`vmmcall` tunnelled through KVM_HC_MAP_GPA_RANGE.
    Vmcall,
    /// Port-I/O doorbell.
    Pio,
}

/// Whether the shadow pool's memslot is re-registered (with every vCPU parked) when KVM must
/// forget what it derived from the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PoolResync {
    /// Probe once per host (cached) whether VMM writes into a shadow table reach a running
    /// guest without re-registration (hosts with EPT/NPT); resync only where they do not.
    Auto,
    /// Always resync (a software-shadowing KVM needs it).
    Always,
    /// Never resync: flushes are CR3 loads through KVM_SET_SREGS only (wrong on a
    /// software-shadowing KVM).
    Never,
}

/// What makes KVM flush every vCPU in a kernel flush (docs/pv-abi.md §6.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelFlushTrigger {
    /// The dirty-log trigger where its start-up probe passes, else the protection-key zap.
    Auto,
    /// A dirty-log fetch of a page of pvmm's own that KVM itself dirtied (two ioctls).
    DirtyLog,
    /// A protection-key flip of the changed pool frames' host mappings.
    Pkey,
}

/// How remote TLB flushes reach other vCPUs (docs/pv-abi.md §6.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RemoteFlush {
    /// The kernel flush where the host needs no pool resync and has protection keys,
    /// else kicks.
    Auto,
    /// Kick each target out of `KVM_RUN`; it flushes on its own thread.
    Kick,
    /// Zap the host's mappings of the changed pool frames: KVM flushes every vCPU in the
    /// host kernel (needs protection keys and a host that needs no pool resync).
    Kernel,
}

/// Whether changed leaves are zapped rather than resynced (docs/pv-abi.md §6.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LeafZap {
    /// Where the host needs the pool resync, has protection keys and its probe (cached per
    /// host) finds that zapping a frame's host mapping drops KVM's translations to it.
    Auto,
    /// Never: every changed leaf the host may have cached is resynced with its chunk.
    Off,
}

/// Arguments of `pvmm run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Guest kernel: a 64-bit ELF (vmlinux or the bundled PV kernel) or a bzImage
    /// [default: $PVMM_GUEST, else the bundled guest built by `make`]
    #[arg(long, value_name = "PATH", default_value_os_t = default_kernel(), hide_default_value = true)]
    pub kernel: PathBuf,
    /// Initial ramdisk, placed at the top of low RAM.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "console=ttyS0")]
    pub cmdline: String,
    /// Guest RAM size, 16M..1024G; accepts K, M, G suffixes (e.g. 256M).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_mem)]
    pub mem: u64,
    /// Number of vCPUs (1..=64).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_vcpus)]
    pub vcpus: u8,
    /// Serial console: stdio, file=PATH or none.
    #[arg(long, value_name = "MODE", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialMode,
    /// Exit statistics report printed when the VM ends.
    #[arg(long, value_enum, default_value = "table")]
    pub stats: StatsMode,
    /// Write the statistics report to this file (created before the VM starts) instead of
    /// stderr (table) or stdout (json).
    #[arg(long, value_name = "PATH")]
    pub stats_file: Option<PathBuf>,
    /// Also write one JSON report of deltas every SECS seconds (JSON Lines, to --stats-file
    /// or stdout).
    #[arg(long, value_name = "SECS", value_parser = parse_interval)]
    pub stats_interval: Option<f64>,
    /// End the VM after this many seconds (exit code 205).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<f64>,
    /// Hypercall transport advertised to the guest.
    #[arg(long, value_enum, default_value = "auto")]
    pub hypercall: HypercallMode,
    /// Shadow page-table pool size (guest-physical memory owned by the VMM), 2M..64G;
    /// K/M/G suffixes.
    #[arg(long, value_name = "SIZE", default_value = "32M", value_parser = parse_pool)]
    pub shadow_pool: u64,
    /// Verbose: -v logs set-up steps and dumps registers when the VM ends, -vv adds every
    /// hypercall, -vvv every exit (stderr).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Per-thread seccomp filters: kill (a syscall outside a thread's allow-list ends the
    /// VM: one line, exit code 208), log (it is refused with EPERM and the first one
    /// reported; the VM goes on) or off.
    #[arg(long, value_enum, default_value = "kill")]
    pub seccomp: SeccompMode,
    /// Become this user before opening anything (pvmm must start as root; with --gid).
    #[arg(long, value_name = "UID", requires = "gid")]
    pub uid: Option<u32>,
    /// Become this group before opening anything (with --uid).
    #[arg(long, value_name = "GID", requires = "uid")]
    pub gid: Option<u32>,
    /// Run the shadow engine's invariant checker after every MMU batch; the first violation
    /// ends the VM (exit code 207). Slow: for debugging and the test suite.
    #[arg(long)]
    pub check_shadow: bool,
    /// Test only: write hypercall responses without the page-table guard (re-opens the hole
    /// --check-shadow must catch).
    #[arg(long, hide = true)]
    pub debug_unguarded_response: bool,
    /// Test only: vCPU 0 makes a syscall outside its allow-list at its first exit.
    #[arg(long, hide = true)]
    pub debug_seccomp_violation: bool,
    /// Offer the page-table write modes (guest mmu=emulate, mmu=wrpt): auto probes the
    /// read-only memslot trap at start-up and offers them where it works; off never does.
    #[arg(long, value_enum, default_value = "auto")]
    pub pt_trap: crate::ptwrite::PtTrapMode,
    /// Test only: apply trapped page-table stores (and re-hooked wrpt entries) without
    /// validating them; the e2e suite expects the failure.
    #[arg(long, hide = true)]
    pub debug_pt_trap_no_validate: bool,
    /// Test only: unhook a wrpt L1 without dropping its parents' shadow entries.
    #[arg(long, hide = true)]
    pub debug_pt_trap_keep_parents: bool,
    /// Test only: unhook a wrpt L1 without harvesting its A/D bits first.
    #[arg(long, hide = true)]
    pub debug_pt_trap_no_harvest: bool,
    /// Test only: other vCPUs apply root switches but drop the TLB flushes a batch needs on
    /// them (the SMP TLB selftests must then fail).
    #[arg(long, hide_short_help = true)]
    pub debug_drop_remote_flushes: bool,
    /// Host resync of the shadow pool: auto (probe), always, never.
    #[arg(long, value_enum, default_value = "auto")]
    pub pool_resync: PoolResync,
    /// Remote TLB flushes: auto, kick (signal the target), kernel (a host-kernel flush).
    #[arg(long, value_enum, default_value = "auto")]
    pub remote_flush: RemoteFlush,
    /// What the kernel flush makes KVM flush with: auto (dirty-log where it works, else
    /// pkey), dirty-log, pkey.
    #[arg(long, value_enum, default_value = "auto")]
    pub kernel_flush_trigger: KernelFlushTrigger,
    /// Test only: the kernel flush counts its targets flushed without zapping anything
    /// (the SMP TLB selftests must then fail).
    #[arg(long, hide_short_help = true)]
    pub debug_kernel_flush_no_zap: bool,
    /// Changed leaves on a host that needs the pool resync: auto (zap their old target
    /// frames where the probe says it works), off (resync their chunks).
    #[arg(long, value_enum, default_value = "auto")]
    pub leaf_zap: LeafZap,
    /// Test only: leaf zaps are listed but not made (the selftests must then fail).
    #[arg(long, hide_short_help = true)]
    pub debug_leaf_zap_skip: bool,
    /// Filter the supervisor (calling) thread too; `bench-exits`, whose main thread runs
    /// several VMs in turn, filters only the VM's own threads.
    #[arg(skip = true)]
    pub seccomp_supervisor: bool,
}

impl RunArgs {
    /// Checks combinations of flags that each parse alone; one line on error.
    pub fn validate(&self) -> Result<(), String> {
        let json_on_stdout = self.stats_file.is_none()
            && (self.stats == StatsMode::Json || self.stats_interval.is_some());
        if json_on_stdout && self.serial == SerialMode::Stdio {
            return Err(
                "JSON statistics go to stdout, where the guest console also goes: \
                 add --stats-file PATH, or move the console with --serial file=PATH|none"
                    .into(),
            );
        }
        if self.kernel.is_dir() {
            return Err(format!(
                "cannot read kernel '{}': it is a directory",
                self.kernel.display()
            ));
        }
        Ok(())
    }
}

/// Parses a size with an optional K/M/G (binary) suffix; a bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    match parse_size_or_zero(s)? {
        0 => Err(format!(
            "invalid size '{s}': must be between 1 byte and 16 EiB"
        )),
        v => Ok(v),
    }
}

/// As [`parse_size`], but 0 is a value (the caller checks its own range).
fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => {
                    return Err(format!(
                        "invalid size '{s}': unknown suffix '{c}' (use K, M or G)"
                    ))
                }
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid size '{s}': expected a number with an optional K/M/G suffix")
    })?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size '{s}': must be between 1 byte and 16 EiB"))
}

/// The kernel used when `--kernel` is not given: `$PVMM_GUEST`, else the bundled guest
/// next to the binary's workspace (`target/release/pvmm` → `guest-images/...`), else the
/// bundled guest's path relative to the current directory.
pub fn default_kernel() -> PathBuf {
    if let Some(p) = std::env::var_os("PVMM_GUEST") {
        return PathBuf::from(p);
    }
    let beside_binary = std::env::current_exe().ok().and_then(|exe| {
        let root = exe.parent()?.parent()?.parent()?;
        Some(root.join(BUNDLED_GUEST))
    });
    match beside_binary {
        Some(p) if p.exists() => p,
        _ => PathBuf::from(BUNDLED_GUEST),
    }
}

/// `--help`'s closing sections: exit status, environment, examples, console keys.
pub fn epilogue() -> String {
    format!(
        "{}\n\n{}",
        exit_code::TABLE,
        "\
CONSOLE:
  With --serial stdio on a terminal, keys go to the guest. Ctrl-a x ends the VM (with the
  report, exit 130); Ctrl-a Ctrl-a sends one Ctrl-a. SIGINT, SIGTERM and SIGHUP also end
  the VM cleanly: the report is printed and the terminal restored.

ENVIRONMENT:
  PVMM_GUEST        default for --kernel (make exports it)
  PVMM_LOG          log filter, env_logger syntax (e.g. PVMM_LOG=vmm=debug)
  PVMM_CACHE_DIR    where the --hypercall auto probe's verdict is cached
                    (default $XDG_CACHE_HOME/pvmm or ~/.cache/pvmm; 'off' disables)
  PVMM_KVM_DEVICE   KVM device node (default /dev/kvm)

EXAMPLES:
  pvmm run                                   boot the bundled guest (its selftests need
                                             --cmdline \"console=ttyS0 selftest=all\")
  pvmm run --cmdline \"console=ttyS0 selftest=all mmu=pv-lazy\" --stats table
  pvmm run --kernel bzImage --initrd initrd.cpio --cmdline \"console=ttyS0\" --mem 1G
  pvmm run --serial none --stats json | jq .merged.exits_total
  pvmm run --stats-interval 1 --stats-file stats.jsonl --cmdline \"selftest=all\"
  pvmm run --cmdline help                    list the bundled guest's options
  pvmm bench-exits --iterations 20000 --repeat 5"
    )
}

/// Parses `--mem`: a size between [`MIN_MEM`] and [`MAX_MEM`], a multiple of 4 KiB.
pub fn parse_mem(s: &str) -> Result<u64, String> {
    parse_bounded(s, "--mem", MIN_MEM, MAX_MEM)
}

/// Parses `--shadow-pool`: a size between [`MIN_POOL`] and [`MAX_POOL`], a multiple of 4 KiB.
pub fn parse_pool(s: &str) -> Result<u64, String> {
    parse_bounded(s, "--shadow-pool", MIN_POOL, MAX_POOL)
}

fn parse_bounded(s: &str, flag: &str, min: u64, max: u64) -> Result<u64, String> {
    let range = format!("{flag} must be between {} and {}", human(min), human(max));
    let v = parse_size_or_zero(s).map_err(|e| format!("{e}; {range}"))?;
    if v < min || v > max {
        return Err(format!("invalid size '{s}': {range}"));
    }
    if !v.is_multiple_of(4096) {
        return Err(format!(
            "invalid size '{s}': {flag} must be a multiple of 4K"
        ));
    }
    Ok(v)
}

fn human(v: u64) -> String {
    match v {
        v if v >= 1 << 30 && v.is_multiple_of(1 << 30) => format!("{}G", v >> 30),
        v if v >= 1 << 20 && v.is_multiple_of(1 << 20) => format!("{}M", v >> 20),
        v => format!("{}K", v >> 10),
    }
}

/// Parses `--vcpus`: 1..=64.
pub fn parse_vcpus(s: &str) -> Result<u8, String> {
    match s.trim().parse::<u8>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err(format!(
            "invalid vCPU count '{s}': must be between 1 and 64"
        )),
    }
}

/// Parses `--serial stdio|file=PATH|none`.
pub fn parse_serial(s: &str) -> Result<SerialMode, String> {
    match s {
        "stdio" => Ok(SerialMode::Stdio),
        "none" | "off" => Ok(SerialMode::None),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
            _ => Err(format!(
                "invalid serial mode '{s}': use stdio, file=PATH or none"
            )),
        },
    }
}

/// Parses `--stats-interval SECS`: a positive number of seconds.
pub fn parse_interval(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "invalid statistics interval '{s}': expected a positive number of seconds"
        )),
    }
}

/// Parses `--timeout SECS`: a positive number of seconds.
pub fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "invalid timeout '{s}': expected a positive number of seconds"
        )),
    }
}

impl RunArgs {
    /// The engine's trap switches from the `--debug-pt-trap-*` flags.
    pub fn trap_debug(&self) -> shadow::TrapDebug {
        shadow::TrapDebug {
            no_validate: self.debug_pt_trap_no_validate,
            keep_parents: self.debug_pt_trap_keep_parents,
            no_harvest: self.debug_pt_trap_no_harvest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_sizes_name_one_range() {
        assert_eq!(parse_mem("16M"), Ok(16 << 20));
        for bad in ["0", "1K", "2M", "2T", "abc"] {
            let e = parse_mem(bad).unwrap_err();
            assert!(
                e.contains("--mem must be between 16M and 1024G"),
                "{bad}: {e}"
            );
        }
        assert!(parse_mem("16390K").unwrap_err().contains("multiple of 4K"));
        assert!(parse_pool("4K").unwrap_err().contains("between 2M and 64G"));
        assert_eq!(parse_pool("2M"), Ok(2 << 20));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn vcpus_and_serial_and_timeout() {
        assert_eq!(parse_vcpus("1"), Ok(1));
        assert!(parse_vcpus("0").is_err());
        assert!(parse_vcpus("65").is_err());
        assert_eq!(
            parse_serial("file=/tmp/x"),
            Ok(SerialMode::File("/tmp/x".into()))
        );
        assert_eq!(parse_serial("none"), Ok(SerialMode::None));
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tcp").is_err());
        assert_eq!(parse_interval("0.5"), Ok(0.5));
        assert!(parse_interval("0").unwrap_err().contains("interval"));
        assert_eq!(parse_timeout("1.5"), Ok(1.5));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("nan").is_err());
    }

    #[test]
    fn full_command_line() {
        let cli = Cli::try_parse_from([
            "pvmm",
            "run",
            "--kernel",
            "k.elf",
            "--mem",
            "128M",
            "--vcpus",
            "2",
            "--serial",
            "none",
            "--stats",
            "json",
            "--stats-file",
            "s.json",
            "--timeout",
            "5",
            "--hypercall",
            "pio",
            "-vv",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("run")
        };
        assert_eq!(a.mem, 128 << 20);
        assert_eq!(a.vcpus, 2);
        assert_eq!(a.serial, SerialMode::None);
        assert_eq!(a.stats, StatsMode::Json);
        assert_eq!(a.hypercall, HypercallMode::Pio);
        assert_eq!(a.verbose, 2);
        assert_eq!(a.timeout, Some(5.0));
        assert!(Cli::try_parse_from(["pvmm", "run", "--kernel", "k", "--vcpus", "0"]).is_err());
        let bare = Cli::try_parse_from(["pvmm", "run"]).unwrap();
        let Command::Run(bare) = bare.command else {
            panic!("run")
        };
        assert!(bare.kernel.ends_with("pvmm-guest"), "{:?}", bare.kernel);
        assert!(
            Cli::try_parse_from(["pvmm"]).is_err(),
            "no subcommand: usage"
        );
        let d = Cli::try_parse_from(["pvmm", "run", "--kernel", "k"]).unwrap();
        let Command::Run(d) = d.command else {
            panic!("run")
        };
        assert_eq!(d.mem, 256 << 20);
        assert_eq!(d.stats, StatsMode::Table);
    }
}
