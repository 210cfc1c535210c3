//! Command-line interface: `pvmm run ...`, parsed with clap, plus the value parsers it uses.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// pvmm: a rust-vmm style VMM with a shadow-paging paravirtual MMU and exit statistics.
#[derive(Parser, Debug)]
#[command(name = "pvmm", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// pvmm subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest kernel and run it until it exits.
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

/// Arguments of `pvmm run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Guest kernel: a 64-bit ELF (vmlinux or the bundled PV kernel) or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk, placed at the top of low RAM.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "console=ttyS0")]
    pub cmdline: String,
    /// Guest RAM size; accepts K, M, G suffixes (e.g. 256M).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
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
    /// Write the statistics report to this file instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub stats_file: Option<PathBuf>,
    /// Also write one JSON line of deltas every SECS seconds to --stats-file (or stderr).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub stats_interval: Option<f64>,
    /// End the VM after this many seconds (exit code 104).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<f64>,
    /// Hypercall transport advertised to the guest.
    #[arg(long, value_enum, default_value = "auto")]
    pub hypercall: HypercallMode,
    /// Shadow page-table pool size (guest-physical memory owned by the VMM); K/M/G suffixes.
    #[arg(long, value_name = "SIZE", default_value = "32M", value_parser = parse_size)]
    pub shadow_pool: u64,
    /// Verbose: log to stderr (repeat for more) and dump registers when the VM ends.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Parses a size with an optional K/M/G (binary) suffix; a bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
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
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("invalid size '{s}': must be between 1 byte and 16 EiB"))
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

/// Parses `--timeout SECS`: a positive number of seconds.
pub fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "invalid timeout '{s}': expected a positive number of seconds"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(Cli::try_parse_from(["pvmm", "run"]).is_err());
        let d = Cli::try_parse_from(["pvmm", "run", "--kernel", "k"]).unwrap();
        let Command::Run(d) = d.command else {
            panic!("run")
        };
        assert_eq!(d.mem, 256 << 20);
        assert_eq!(d.stats, StatsMode::Table);
    }
}
